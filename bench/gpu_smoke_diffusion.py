"""GPU smoke test for the paper's diffusion backbones in 04/05 (`--backbone wan|lumina2`) at full size.

Wan2.1-T2V-1.3B (`--backbone-config paper`, 30 layers) and Lumina-Image-2.0 2B (26 layers), built by
models.DiffusersBackbone from random weights, train a few AdamW steps on random latents shaped like a
256x256 image and a 256x256 video through each model's VAE (Wan2.1's AutoencoderKLWan: 16 channels, /8,
1+T/4 frames; Lumina's FLUX AutoencoderKL: 16 channels, /8, images only) and random text features of
Qwen3-VL-8B's width, with 05's rectified-flow loss, bf16 autocast over fp32 weights and AdamW. Wan runs an
image step and a video step (05 interleaves them 7:3); Lumina an image step. It prints tokens/s (latent
patches), step time and peak GPU memory. Under torchrun the model is wrapped in DDP, as in 05. Where
there is no CUDA it says so and exits 0; `--tiny` runs the same code on a CPU with the tiny configs.

    python bench/gpu_smoke_diffusion.py                                  # single GPU, both backbones
    torchrun --nproc_per_node=1 bench/gpu_smoke_diffusion.py             # the same under DDP
    python bench/gpu_smoke_diffusion.py --layers 8 --image-batch 8       # fewer layers if memory runs out
    python bench/gpu_smoke_diffusion.py --backbones wan --frames 81      # Wan2.1's own 81-frame clips
    python bench/gpu_smoke_diffusion.py --tiny --device cpu              # a check of this script (a test runs it)

Per-GPU batches default to 05's recipe on 4 nodes x 8 GPUs: 512 / 32 = 16 images, 128 / 32 = 4 videos.
"""
import gc
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: shared modules
import models  # noqa: E402
import plumbing  # noqa: E402
from plumbing import autocast, init_distributed, log  # noqa: E402

LATENT_CHANNELS, SPATIAL, TEMPORAL = 16, 8, 4  # Wan2.1's VAE and FLUX's both: 16 channels, /8; Wan /4 in time


def latent_shape(kind, side, frames):
    """[C, T', h, w] of one image (a 1-frame video) or video after the VAE."""
    t = 1 if kind == "image" else 1 + (frames - 1) // TEMPORAL
    return [LATENT_CHANNELS, t, side // SPATIAL, side // SPATIAL]


def build(backbone, args, device):
    """models.DiffusersBackbone at the paper's (or tiny) config, optionally cut to --layers, on `device`."""
    cfg = models.backbone_config(backbone, "tiny" if args.tiny else "paper", LATENT_CHANNELS, args.text_dim)
    full_layers = cfg["num_layers"]
    if args.layers:
        cfg["num_layers"] = min(args.layers, full_layers)
    with torch.device(device):
        model = models.DiffusersBackbone(backbone, cfg)
    if args.grad_ckpt:
        model.net.enable_gradient_checkpointing()
    return model, full_layers


def run(backbone, kind, args, d):
    """A few timed optimiser steps of one backbone on one kind of latent; returns a dict of numbers."""
    cuda = d.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model, full_layers = build(backbone, args, d.device)
    n_params = sum(p.numel() for p in model.parameters())
    blocks = model.net.blocks if backbone == "wan" else model.net.layers
    n_layer = sum(p.numel() for p in blocks[0].parameters())
    # DDP under torchrun, as 05 does (even one process: its gradient hooks cost time too)
    wrapped = DDP(model, device_ids=[d.local_rank] if cuda else None) if dist.is_initialized() else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    rf = models.RectifiedFlow()
    batch = args.image_batch if kind == "image" else args.video_batch
    shape = latent_shape(kind, args.side, args.frames)
    g = torch.Generator().manual_seed(d.rank)
    x = torch.randn([batch] + shape, generator=g).to(d.device)
    text = torch.randn(batch, args.text_len, args.text_dim, generator=g).to(d.device)
    mask = torch.ones(batch, args.text_len, dtype=torch.bool, device=d.device)
    times, losses = [], []
    for _ in range(args.steps):
        sync(cuda)
        start = time.time()
        t = rf.draw_t(batch, g).to(d.device)
        noise = torch.randn(x.shape, generator=g).to(d.device)
        with autocast(d.device, torch.bfloat16):
            loss = rf.loss(wrapped, x, (text, mask), t, noise).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(cuda)
        times.append(time.time() - start)
        losses.append(loss.item())
    timed = times[args.warmup_steps:] or times
    step_s = sum(timed) / len(timed)
    patch = model.config["patch_size"]
    pt, ph, pw = (patch if isinstance(patch, (list, tuple)) else [1, patch, patch])
    tokens = batch * (shape[1] // pt) * (shape[2] // ph) * (shape[3] // pw) * d.world_size
    out = {"backbone": backbone, "kind": kind, "latent": shape, "batch": batch, "world": d.world_size,
           "params_M": n_params / 1e6, "layer_M": n_layer / 1e6, "layers": model.config["num_layers"],
           "full_layers": full_layers, "step_s": step_s, "tokens_per_s": tokens / step_s,
           "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
           "loss_first": losses[0], "loss_last": losses[-1], "finite": all(map(math.isfinite, losses))}
    del model, wrapped, opt, x, text, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def sync(cuda):
    """Wait for the GPU, so the wall clock times the step and not its launch."""
    if cuda:
        torch.cuda.synchronize()


def get_parser():
    p = plumbing.ArgumentParser(__doc__)
    pos, nonneg = plumbing.positive_int, plumbing.nonneg_int
    p.add_argument("--backbones", default="wan,lumina2", help="comma-separated: wan, lumina2")
    p.add_argument("--layers", type=pos, default=None, help="cut each model to this many blocks (default: all)")
    p.add_argument("--side", type=pos, default=None, help="pixels per side before the VAE (default 256; --tiny 32)")
    p.add_argument("--frames", type=pos, default=None, help="video frames before the VAE (default 33; --tiny 9)")
    p.add_argument("--image-batch", type=pos, default=None, help="images per GPU (default 16; --tiny 2)")
    p.add_argument("--video-batch", type=pos, default=None, help="videos per GPU (default 4; --tiny 1)")
    p.add_argument("--text-len", type=pos, default=None, help="caption tokens (default 160, 05's --max-length)")
    p.add_argument("--text-dim", type=pos, default=None, help="encoder width (default 4096, Qwen3-VL-8B's)")
    p.add_argument("--steps", type=pos, default=8)
    p.add_argument("--warmup-steps", type=nonneg, default=3, help="steps left out of the timing")
    p.add_argument("--grad-ckpt", action="store_true", help="diffusers' gradient checkpointing")
    p.add_argument("--device", default="cuda", help="cuda; cpu only with --tiny (a check of this script)")
    p.add_argument("--tiny", action="store_true", help="the tiny configs and sizes: checks the script on a CPU")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    sizes = dict(side=(32, 256), frames=(9, 33), image_batch=(2, 16), video_batch=(1, 4), text_len=(8, 160),
                 text_dim=(64, 4096))
    for k, (tiny, real) in sizes.items():
        if getattr(args, k) is None:
            setattr(args, k, tiny if args.tiny else real)
    if args.side % (2 * SPATIAL):
        raise plumbing.DataError(f"--side {args.side}: must be a multiple of {2 * SPATIAL} (VAE /8, patch 2)")
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if not backbones or set(backbones) - {"wan", "lumina2"}:
        raise plumbing.DataError(f"--backbones {args.backbones!r}: expected wan, lumina2 or both")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP gpu_smoke_diffusion: no CUDA device here (nothing to measure)")
        return None
    d = init_distributed(args.device)
    if "RANK" in os.environ and not dist.is_initialized():  # torchrun with one process: DDP all the same
        dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo")
    cuda = d.device.type == "cuda"
    name = torch.cuda.get_device_name() if cuda else "CPU"
    log(f"{name} x{d.world_size}, torch {torch.__version__}; {'tiny' if args.tiny else 'paper'} configs, "
        f"{args.side}x{args.side} px, {args.frames} frames, captions {args.text_len} x {args.text_dim}, "
        f"{'bf16 autocast' if cuda else 'fp32 (autocast is GPU-only)'}, fp32 AdamW, grad ckpt {args.grad_ckpt}"
        f"{', DDP' if dist.is_initialized() else ''}")
    results = []
    for backbone in backbones:
        for kind in (["image", "video"] if backbone == "wan" else ["image"]):
            r = run(backbone, kind, args, d)
            results.append(r)
            log(f"[{backbone} {kind}] {r['params_M']:.0f}M params ({r['layers']}/{r['full_layers']} layers)  "
                f"latent {r['latent']} x{r['batch']}/GPU  step {r['step_s'] * 1000:.0f} ms  "
                f"{r['tokens_per_s']:,.0f} tokens/s  peak memory {r['peak_mem_GiB']:.2f} GiB/GPU  "
                f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}  finite={r['finite']}")
            if r["layers"] < r["full_layers"]:
                # fp32 weights + grads + AdamW moments = 16 bytes a parameter, before activations
                full = r["params_M"] + (r["full_layers"] - r["layers"]) * r["layer_M"]
                log(f"  all {r['full_layers']} layers: {full:.0f}M params, ~{16 * full * 1e6 / 2**30:.0f} GiB of "
                    "weights+grads+AdamW state per GPU under DDP (plus activations)")
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    plumbing.run_cli(main)
