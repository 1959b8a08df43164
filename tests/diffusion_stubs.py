"""Test helpers for the diffusion tests: a tiny world, the tiny flags, and a stand-in text encoder for
the feature-cache tests (the stages themselves run the real tiny Qwen3 of encoders.py)."""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


class StubEncoder:
    """TextEncoder's interface (name, num_layers, width, dtype, device, encode) over a fixed random
    word table; counts the texts it encodes so tests can see whether a cache was used."""

    def __init__(self, name="stub", num_layers=3, width=16, seed=0):
        self.name, self.num_layers, self.width = name, num_layers, width
        self.dtype, self.device, self.fingerprint = torch.float32, torch.device("cpu"), f"stub-{seed}"
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(num_layers, 101, width, generator=g)
        self.calls = 0

    def encode(self, texts, max_length=16):
        self.calls += len(texts)
        ids = [[sum(map(ord, w)) % 101 for w in t.split()][:max_length] for t in texts]
        L = max(1, max(len(i) for i in ids))
        hidden = torch.zeros(self.num_layers, len(texts), L, self.width)
        mask = torch.zeros(len(texts), L, dtype=torch.bool)
        for b, row in enumerate(ids):
            for j, tok in enumerate(row):
                hidden[:, b, j] = self.table[:, tok] * (1 + torch.arange(self.num_layers)[:, None])
                mask[b, j] = True
        return hidden, mask


def make_world(root, n_images=24, n_videos=12, size=8, frames=4, seed=0):
    """PNG images and GIF videos of one coloured square (videos: moving right or left) + t2x.jsonl."""
    root = Path(root)
    (root / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    recs = []
    for i in range(n_images + n_videos):
        kind = "image" if i < n_images else "video"
        colour = names[rng.integers(len(names))]
        direction = ["left", "right"][rng.integers(2)]
        T = 1 if kind == "image" else frames
        arr = np.zeros((T, size, size, 3), np.uint8)
        for t in range(T):
            x = 1 + (t if direction == "right" else T - 1 - t) if kind == "video" else 2
            arr[t, 2:5, x:x + 3] = COLOURS[colour]
        if kind == "image":
            path = f"media/{i:03d}.png"
            Image.fromarray(arr[0]).save(root / path)
            cap = f"a {colour} square"
        else:
            path = f"media/{i:03d}.gif"
            frames_ = [Image.fromarray(a) for a in arr]
            frames_[0].save(root / path, save_all=True, append_images=frames_[1:], duration=100, loop=0)
            cap = f"a {colour} square moving {direction}"
        recs.append({"media": path, "caption": cap, "kind": kind})
    (root / "t2x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root / "t2x.jsonl"


TINY = ["--encoder", "tiny-qwen3", "--size", "8", "--frames", "4", "--dit", "32x2",
        "--patch", "4x2", "--batch", "4:2", "--warmup", "0",
        "--log-every", "2", "--max-length", "8", "--device", "cpu"]



_ENCODERS = {}  # (name, device, dtype) -> the encoder, loaded once per test session


def one_thread_and_one_encoder_load(monkeypatch):
    """Generator for an autouse fixture: one CPU thread, and each (frozen, so shareable) encoder loaded once."""
    import encoders
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    real = encoders.load_encoder

    def load(name, *a, **k):
        key = (str(name), str(k.get("device")), str(k.get("dtype")))
        if key not in _ENCODERS:
            _ENCODERS[key] = real(name, *a, **k)
        return _ENCODERS[key]
    monkeypatch.setattr(encoders, "load_encoder", load)
    yield
    torch.set_num_threads(threads)


def built(argv, fusion="norm-avg"):
    """What 05 builds before its loop from `argv` (data, features, run config, the initial model), for a
    test to look at; `.trained(path)` is the same model with a checkpoint's weights."""
    import importlib
    from types import SimpleNamespace
    import common
    import models
    import plumbing
    args = importlib.import_module("05_train_diffusion").get_parser().parse_args(argv)
    d = plumbing.Dist()
    data, encoder, fus, bank, vae_id = common.t2x_data(args, d, lambda enc: models.LayerFusion(fusion, enc.num_layers))
    config = common.run_config(args, encoder, data, vae_id)
    model = common.new_model(config, bank, fus, d.device)

    def trained(path):
        import copy
        other = copy.deepcopy(model)
        other.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
        return other
    return SimpleNamespace(args=args, data=data, bank=bank, fusion=fus, config=config, model=model,
                           rf=models.RectifiedFlow(), trained=trained)


def fixed_loss(run, model, kind, n=4):
    """The rectified-flow loss of `model` on one fixed batch of `run`'s data (fixed media, t, noise, captions)."""
    g = torch.Generator().manual_seed(123)
    x = run.data[kind]["media"][:n].float()
    x = x / 127.5 - 1 if run.data[kind]["media"].dtype == torch.uint8 else x
    cond = run.bank.batch(run.data[kind]["text_idx"][:n], "cpu")
    t = run.rf.draw_t(len(x), g)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        return float(run.rf.loss(model, x, cond, t, noise).mean())
