"""GPU smoke test for stage 1 (03_finetune_qwen3vl.py) at the real model's width.

A Qwen3-VL config with Qwen3-VL-8B's widths (text 4096 wide, 32 heads / 8 KV heads of 128,
MLP 12288, vocab 151,936; vision 1152 wide, patch 16, merge 2, out 4096) but only 2 text layers
and 2 vision blocks, random weights, a synthetic batch of images + text. It runs a few AdamW steps
through the pieces 03 uses (encoders' freezing and DDP/FSDP2 wrapping, plumbing's lr schedule, a loss
on the answer tokens only) in bf16 autocast with fp32 master weights, and prints tokens/s, step time
and peak GPU memory. Where there is no CUDA it says so and exits 0.

    python bench/gpu_smoke_qwen3vl.py                           # single GPU (plain)
    torchrun --nproc_per_node=1 bench/gpu_smoke_qwen3vl.py      # plain, then FSDP2 (fully_shard per layer)
    torchrun --nproc_per_node=8 bench/gpu_smoke_qwen3vl.py --mode fsdp --layers 8

It also prints what a full 36-layer fine-tune needs for weights, gradients and AdamW state (FSDP
divides that by the number of GPUs; activations do not shrink).
"""
import gc
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: shared modules
import encoders  # noqa: E402
import plumbing  # noqa: E402
from plumbing import autocast, init_distributed, log  # noqa: E402

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 151655, 151656, 151652, 151653


def real_width_config(layers, vision_depth, tiny=False):
    """Qwen3-VL-8B-Instruct's widths with few layers (`tiny`: 1/32 of the widths, for a CPU check)."""
    from transformers import Qwen3VLConfig
    w = 32 if tiny else 1
    text = dict(vocab_size=151936, hidden_size=4096 // w, intermediate_size=12288 // w, num_hidden_layers=layers,
                num_attention_heads=32 // w * 2 if tiny else 32, num_key_value_heads=2 if tiny else 8,
                head_dim=128 // (4 if tiny else 1), max_position_embeddings=262144, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                 "mrope_section": [4, 6, 6] if tiny else [24, 20, 20], "mrope_interleaved": True})
    vision = dict(depth=vision_depth, hidden_size=64 if tiny else 1152, intermediate_size=4304 // w,
                  num_heads=4 if tiny else 16, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=4096 // w, num_position_embeddings=2304,
                  deepstack_visual_indexes=list(range(min(3, vision_depth))))
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                         video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                         vision_end_token_id=VISION_END, tie_word_embeddings=False)


def synthetic_batch(batch, seq_len, image_side, device, gen):
    """Images of `image_side`^2 pixels (one per sample) followed by text; the last quarter is the 'answer'."""
    grid = image_side // 16
    n_patches, n_tokens = grid * grid, grid * grid // 4
    ids = torch.randint(1000, 150000, (batch, seq_len), generator=gen)
    ids[:, 3] = VISION_START
    ids[:, 4:4 + n_tokens] = IMAGE_TOKEN
    ids[:, 4 + n_tokens] = VISION_END
    mm = torch.zeros_like(ids)
    mm[:, 4:4 + n_tokens] = 1
    labels = torch.full_like(ids, -100)
    labels[:, -seq_len // 4:] = ids[:, -seq_len // 4:]
    pixels = torch.randn(batch * n_patches, 3 * 2 * 16 * 16, generator=gen)
    thw = torch.tensor([[1, grid, grid]] * batch)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                                             pixel_values=pixels, image_grid_thw=thw).items()}, labels.to(device)


def run(mode, args, d):
    """Build, wrap, and time a few optimiser steps; returns a dict of numbers."""
    from transformers import Qwen3VLForConditionalGeneration
    cuda = d.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    config = real_width_config(args.layers, args.vision_depth, args.tiny)
    with torch.device(d.device):
        model = Qwen3VLForConditionalGeneration(config)
    model.config.use_cache = False
    encoders.set_trainable(model, freeze_vision=True)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_layer = sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = encoders.wrap_model(model, d, torch.bfloat16, fsdp=mode == "fsdp")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), fused=cuda and mode == "plain")
    sched = plumbing.lr_scheduler(opt, args.steps, 2, "cosine", floor=0.1)  # 03's schedule
    gen = torch.Generator().manual_seed(d.rank)
    batch, labels = synthetic_batch(args.batch_size, args.seq_len, args.image_side, d.device, gen)
    times, losses = [], []
    for step in range(args.steps):
        sync(cuda)
        t = time.time()
        with autocast(d.device, torch.bfloat16):
            logits = model(**batch).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        sync(cuda)
        times.append(time.time() - t)
        losses.append(loss.item())
    timed = times[args.warmup_steps:] or times
    step_s = sum(timed) / len(timed)
    tokens = args.batch_size * args.seq_len * d.world_size
    out = {"mode": mode, "world": d.world_size, "params_M": n_params / 1e6, "trainable_M": n_train / 1e6,
           "layer_M": n_layer / 1e6,
           "step_s": step_s, "tokens_per_s": tokens / step_s, "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
           "loss_first": losses[0], "loss_last": losses[-1], "finite": all(map(math.isfinite, losses))}
    del model, opt, sched, params, batch, labels, logits, loss
    gc.collect()  # the optimiser and scheduler reference each other: free them before the next mode
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
    p.add_argument("--mode", choices=["auto", "plain", "fsdp", "both"], default="auto",
                   help="auto: plain alone, or plain then FSDP under torchrun")
    p.add_argument("--layers", type=pos, default=2, help="text decoder layers (Qwen3-VL-8B has 36)")
    p.add_argument("--vision-depth", type=pos, default=2, help="vision blocks (Qwen3-VL-8B has 27)")
    p.add_argument("--batch-size", type=pos, default=4, help="sequences per GPU")
    p.add_argument("--seq-len", type=pos, default=1024)
    p.add_argument("--image-side", type=pos, default=448, help="pixels per side of each synthetic image")
    p.add_argument("--steps", type=pos, default=8)
    p.add_argument("--warmup-steps", type=nonneg, default=3, help="steps left out of the timing")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--device", default="cuda", help="cuda; cpu only with --tiny (a check of this script)")
    p.add_argument("--tiny", action="store_true", help="1/32 widths: checks the script itself on a CPU")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP gpu_smoke_qwen3vl: no CUDA device here (nothing to measure)")
        return None
    under_torchrun = "RANK" in os.environ
    d = init_distributed(args.device)
    modes = {"auto": ["plain", "fsdp"] if under_torchrun else ["plain"], "both": ["plain", "fsdp"]}.get(args.mode, [args.mode])
    if "fsdp" in modes and not dist.is_initialized():
        if not under_torchrun:
            raise plumbing.DataError("--mode fsdp needs torchrun (torchrun --nproc_per_node=N bench/gpu_smoke_qwen3vl.py)")
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")  # FSDP needs a process group even on one GPU
    if d.world_size > 1 and "plain" in modes:
        modes.remove("plain")  # several ranks: plain would be DDP, which an 8B model does not fit; FSDP is the point
        modes = modes or ["fsdp"]
    name = torch.cuda.get_device_name() if d.device.type == "cuda" else "CPU"
    log(f"{name} x{d.world_size}, torch {torch.__version__}; Qwen3-VL-8B widths, "
        f"{args.layers} text layers, {args.vision_depth} vision blocks, batch {args.batch_size}x{args.seq_len} tokens "
        f"({(args.image_side // 32) ** 2} image tokens each), bf16 autocast, fp32 AdamW, grad ckpt {args.grad_ckpt}")
    results = []
    for mode in modes:
        r = run(mode, args, d)
        results.append(r)
        log(f"[{mode}] params {r['params_M']:.0f}M ({r['trainable_M']:.0f}M trainable)  step {r['step_s'] * 1000:.0f} ms  "
            f"{r['tokens_per_s']:,.0f} tokens/s  peak memory {r['peak_mem_GiB']:.2f} GiB/GPU  "
            f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}  finite={r['finite']}")
    r = results[0]
    # fp32 weights + grads + AdamW moments = 16 bytes per trainable parameter, before activations
    state = 16 * (r["trainable_M"] + (36 - args.layers) * r["layer_M"]) * 1e6 / 2**30
    log(f"one decoder layer {r['layer_M']:.0f}M params; full 36-layer fine-tune needs ~{state:.0f} GiB of "
        f"weights+grads+AdamW state: {state / 8:.0f} GiB/GPU with --fsdp on 8 GPUs (plus activations)")
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    plumbing.run_cli(main)
