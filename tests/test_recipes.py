"""The README's real-scale recipes (T2I: Lumina-Image-2.0; T2V: Wan2.1-T2V-1.3B), read out of README.md
and run at CPU size: only the sizes change (model config, pixels, frames, batches, steps at the same
freeze fraction, tiny local stand-ins for the model folders, the encoder and the data), so the README
cannot drift from commands that work. Also bench/gpu_smoke_diffusion.py's --tiny path."""
import importlib
import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch

import models
from tests import diffusion_stubs as stubs

ROOT = Path(__file__).resolve().parents[1]
# The paper's numbers (shared/PAPER_FACTS.md, "Diffusion setup"): the README's recipes must say them.
PAPER = {"t2i": dict(backbone="lumina2", steps=144000, freeze=96000, image_batch=512, video_batch=0),
         "t2v": dict(backbone="wan", steps=20000, freeze=12000, image_batch=512, video_batch=128)}


@pytest.fixture(autouse=True)
def one_thread_and_one_encoder_load(monkeypatch):
    yield from stubs.one_thread_and_one_encoder_load(monkeypatch)


def recipe(name):
    """The commands of the README block marked `<!-- recipe: NAME -->`, each a list of argv tokens."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(rf"<!-- recipe: {name} -->\s*```bash\n(.*?)```", text, re.S)
    assert len(found) == 1, f"README.md needs exactly one block marked <!-- recipe: {name} -->"
    joined = re.sub(r"\\\n\s*", " ", found[0])
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def script_and_args(cmd):
    """A `torchrun ... SCRIPT.py ARGS` or `python SCRIPT.py ARGS` line -> (script stem, ARGS)."""
    i = next(i for i, tok in enumerate(cmd) if tok.endswith(".py"))
    return Path(cmd[i]).stem, cmd[i + 1:]


def flag(args, name):
    return args[args.index(name) + 1] if name in args else None


def tiny_steps(fraction):
    """The fewest steps (>= 6) whose freeze step fraction * steps is a whole number, as 96k/144k is."""
    return next(n for n in range(6, 100) if abs(fraction * n - round(fraction * n)) < 1e-9)


def stand_ins(tmp):
    """Tiny local folders in the layouts the recipes name: a Lumina-Image-2.0 pipeline (vae/: an
    AutoencoderKL) and a Wan2.1 pipeline (transformer/: a saved tiny Wan; vae/: the tiny Wan VAE)."""
    import diffusers
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            scaling_factor=0.5, shift_factor=0.1).save_pretrained(tmp / "lumina/vae")
    models.load_vae(models.TINY_VAE)[0].save_pretrained(tmp / "wan/vae")
    net = models.diffusers_class("wan")(**models.backbone_config("wan", "tiny", 4, 24))  # 4 latent channels
    net.save_pretrained(tmp / "wan/transformer")
    return {"lumina2": tmp / "lumina", "wan": tmp / "wan"}


def shrink(stem, args, tmp, models, data, prompts, steps):
    """The same command at CPU size: sizes and paths replaced, nothing else."""
    backbone = flag(args, "--backbone")
    tiny = {"--size": "16", "--frames": "4", "--batch": "4:2",
            "--steps": str(steps), "--sample-steps": "2", "--vae": str(models.get(backbone)),
            "--encoder": "tiny-qwen3", "--data": str(data),
            "--prompt-file": str(prompts)}
    out = []
    for i, tok in enumerate(args):
        prev = args[i - 1] if i else None
        if prev == "--backbone-config":  # the paper's size, or a pretrained model's folder
            tok = "tiny" if tok == "paper" else str(models.get(backbone))
        elif prev in tiny:
            tok = tiny[prev]
        elif tok.startswith("runs/"):
            tok = str(tmp / tok)
        out.append(tok)
    cpu = ["--device", "cpu", "--threads", "1"]
    if stem == "06_sample":
        return out + cpu + ["--sample-seeds", "0"]
    extra = ["--max-length", "8", "--log-every", "2"] if stem == "04_train_layer_weights" else []
    return out + cpu + ["--cache-dir", str(tmp / "cache")] + extra


@pytest.mark.parametrize("name", list(PAPER))
def test_readme_recipe_runs_at_tiny_size(tmp_path, name):
    paper = PAPER[name]
    cmds = [script_and_args(c) for c in recipe(name)]
    assert [s for s, _ in cmds] == ["04_train_layer_weights", "05_train_diffusion", "06_sample"]
    (_, a04), (_, a05), (_, a06) = cmds
    # the recipe is the paper's run
    fraction = float(flag(a04, "--freeze"))
    assert flag(a04, "--backbone") == paper["backbone"] and int(flag(a04, "--steps")) == paper["steps"]
    assert math.ceil(fraction * paper["steps"]) == paper["freeze"]  # 04's freeze step, as WeightWatch computes it
    assert flag(a04, "--size") == "256" and float(flag(a04, "--lr")) == 1e-4
    assert flag(a04, "--batch") == f"{paper['image_batch']}:{paper['video_batch']}"  # T2I: images only
    assert flag(a04, "--vae") and flag(a05, "--init-from") == flag(a04, "--out")
    assert flag(a06, "--ckpt") == flag(a05, "--out")

    steps = tiny_steps(fraction)
    models = stand_ins(tmp_path)
    data = stubs.make_world(tmp_path / "world", n_images=8, n_videos=4, size=8, frames=4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue square moving left\n")
    for stem, args in cmds:
        importlib.import_module(stem).main(shrink(stem, args, tmp_path, models, data, prompts, steps))

    freeze = round(fraction * steps)
    lw, final = tmp_path / flag(a04, "--out"), tmp_path / flag(a05, "--out")
    summary = json.loads((lw / "summary.json").read_text())
    assert summary["frozen_at"] == freeze and summary["reason"] == f"reached step {freeze}"
    at_freeze = torch.load(lw / f"checkpoints/step_{freeze:08d}.pt", map_location="cpu", weights_only=True)
    last = torch.load(final / f"checkpoints/step_{steps:08d}.pt", map_location="cpu", weights_only=True)
    assert last["step"] == steps and last["frozen_at"] == freeze
    assert last["config"]["backbone"] == paper["backbone"] and last["config"]["vae"] == str(models[paper["backbone"]])
    assert torch.equal(last["fusion"]["logits"], at_freeze["fusion"]["logits"])  # frozen from there on
    assert not torch.equal(at_freeze["fusion"]["logits"], torch.zeros_like(at_freeze["fusion"]["logits"]))
    if name == "t2v":  # both kinds trained (7:3); the pretrained model's config, the encoder's text width
        assert last["config"]["backbone_kwargs"]["text_dim"] == last["config"]["text_dim"] != 24
        assert set(last["streams"]) == {"image", "video"} and last["streams"]["video"] != {"epoch": 0, "pos": 0}
    samples = tmp_path / flag(a06, "--out")
    assert (samples / ("images.png" if name == "t2i" else "videos.gif")).is_file()


def test_gpu_smoke_diffusion_tiny_runs_on_cpu():
    """The smoke script's own code path (both backbones, latents of each VAE's shape, AdamW, timing) at tiny size."""
    smoke = importlib.import_module("bench.gpu_smoke_diffusion")
    if not torch.cuda.is_available():
        assert smoke.main([]) is None  # says so and exits 0
    results = smoke.main(["--tiny", "--device", "cpu", "--steps", "3", "--warmup-steps", "1", "--layers", "1"])
    assert [(r["backbone"], r["kind"]) for r in results] == [("wan", "image"), ("wan", "video"), ("lumina2", "image")]
    for r in results:
        assert r["finite"] and r["tokens_per_s"] > 0 and r["step_s"] > 0
        assert (r["layers"], r["full_layers"]) == (1, 2)  # --layers cuts the tiny config's 2 blocks
    # 32 px and 9 frames through a /8 VAE with 16 channels (Wan: 1 + 8/4 latent frames)
    assert [r["latent"] for r in results] == [[16, 1, 4, 4], [16, 3, 4, 4], [16, 1, 4, 4]]
    assert [r["tokens_per_s"] * r["step_s"] for r in results] == pytest.approx([2 * 4, 1 * 3 * 4, 2 * 4])
