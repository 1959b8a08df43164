"""Benchmark the default DiT: training throughput and 50-step sampling time (not a test).

Training is timed on 05's step over synthetic media and text features (common.t2x_batch's batch
gathering, the loss, backward, gradient clipping, AdamW and the EMA update, as 05's loop does them) and
reported as samples/s per kind and for the 7:3 mix, and as achieved FLOP/s (FLOPs counted by torch's
FlopCounterMode over one step) over the FLOP/s of a 1024x1024 fp32 matmul measured in the same run,
the machine's practical peak for this kind of work: always compare fractions from one run, the peak
itself moves from day to day.

    python bench/bench_diffusion.py                    # 05's default DiT and batches, CPU
    python bench/bench_diffusion.py --threads 1        # on a busy machine
    python bench/bench_diffusion.py --device cuda --dtype bf16
    python bench/bench_diffusion.py --dit 192x3 --batch 8:2            # another DiT and batch
"""
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plumbing  # noqa: E402
import common  # noqa: E402
import models  # noqa: E402


def timeit(fn, iters, warmup=2, sync=lambda: None):
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def sampling_times(model, rf, args, d, dtype, sync):
    """50 Euler steps with CFG (two forward passes a step, batched): seconds per batch and per sample."""
    out = {}
    for kind, T, cfg in (("image", 1, 4.0), ("video", args.frames, 5.0)):
        for n in (1, 16):
            z = torch.randn(n, 3, T, args.size, args.size, device=d)
            cond = (torch.randn(n, args.text_len, args.text_dim, device=d), torch.ones(n, args.text_len, dtype=torch.bool, device=d))
            null = (torch.randn(1, 2, args.text_dim, device=d), torch.ones(1, 2, dtype=torch.bool, device=d))

            def sample():
                with torch.no_grad(), plumbing.autocast(d, dtype):
                    rf.sample(model, z, cond, null, steps=args.sample_steps, cfg=cfg)
            sec = timeit(sample, 2, warmup=1, sync=sync)
            out[f"{kind}, batch {n}"] = {"s_per_batch": sec, "s_per_sample": sec / n}
    return out


def table(result, r, peak, d, dtype, sample_steps):
    """The markdown lines printed and kept in the json."""
    lines = [f"DiT {result['params'] / 1e6:.2f}M params on {d} ({result['threads']} threads, {dtype}); "
             f"1024^2 fp32 matmul: {peak / 1e9:.1f} GFLOP/s",
             "| training | batch | s/step | samples/s | GFLOP/step | achieved GFLOP/s | of matmul peak |", "|---|---|---|---|---|---|---|"]
    for kind in ("image", "video"):
        t = r[kind]
        lines.append(f"| {kind} | {t['batch']} | {t['s_per_step']:.3f} | {t['samples_per_s']:.1f} | {t['gflop_per_step']:.1f} | "
                     f"{t['achieved_gflops']:.1f} | {t['fraction_of_matmul_peak']:.0%} |")
    m = r["7:3 mix"]
    lines.append(f"| 7:3 mix | - | {m['s_per_step']:.3f} | - | - | - | {m['fraction_of_matmul_peak']:.0%} |")
    lines += ["", f"| {sample_steps}-step sampling (CFG) | s/batch | s/sample |", "|---|---|---|"]
    lines += [f"| {k} | {v['s_per_batch']:.2f} | {v['s_per_sample']:.3f} |" for k, v in result["sample"].items()]
    return lines


def training_times(out, args, d, dtype, sync, peak):
    """05's step (data path, loss, clip, AdamW, EMA) timed per kind into `out`; the last (model, flow)."""
    n = 64  # synthetic records per kind, every caption args.text_len tokens
    bank = common.FeatureBank(torch.randn(n * args.text_len, args.text_dim),
                              torch.arange(0, (n + 1) * args.text_len, args.text_len))
    media = {"image": torch.randint(0, 256, (n, 3, 1, args.size, args.size), dtype=torch.uint8),
             "video": torch.randint(0, 256, (n, 3, args.frames, args.size, args.size), dtype=torch.uint8)}
    dist = plumbing.Dist(device=d)
    for kind, T in (("image", 1), ("video", args.frames)):
        data = {k: {"media": media[k] if k == kind else None, "text_idx": list(range(n))} for k in ("image", "video")}
        run = SimpleNamespace(seed=0, batch=args.batch)
        torch.manual_seed(0)
        model = models.DiT(**models.dit_shape(dict(text_dim=args.text_dim, dit=args.dit, patch=args.patch, channels=3,
                                                   text_norm="none"))).to(d)
        ema, rf, batches = models.EMA(model), models.RectifiedFlow(), common.streams(data, run, dist)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=d.type in ("cpu", "cuda"))
        steps = iter(range(10 ** 6))

        def t2x_step():  # 05's loop body
            _, x, cond, t, noise = common.t2x_batch(data, bank, batches, next(steps), run, dist, rf)
            with plumbing.autocast(d, dtype):
                loss = rf.loss(model, x, cond, t, noise).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            ema.update(model)
        B = args.batch[kind == "video"]
        # Counted under the math attention: FlopCounterMode has no formula for the CPU flash kernel and
        # would count attention as free. Same arithmetic either way; only the count needs the math path.
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            t2x_step()
        flops = fc.get_total_flops()
        sec = timeit(t2x_step, args.iters, sync=sync)
        tokens = max(1, T // args.patch[1]) * (args.size // args.patch[0]) ** 2
        out[kind] = {"batch": B, "tokens_per_sample": tokens, "s_per_step": sec, "samples_per_s": B / sec,
                     "gflop_per_step": flops / 1e9, "achieved_gflops": flops / sec / 1e9,
                     "fraction_of_matmul_peak": flops / sec / peak}
    return model, rf


def main(argv=None):
    p = plumbing.ArgumentParser(__doc__)
    # 04's and 05's defaults
    p.add_argument("--dit", type=common.int_pair("x", "WIDTHxDEPTH"), default="128x6")
    p.add_argument("--patch", type=common.int_pair("x", "SIDExFRAMES"), default="4x2")
    p.add_argument("--batch", type=common.int_pair(":", "IMAGES:VIDEOS"), default="32:8")
    p.add_argument("--size", type=plumbing.positive_int, default=32)
    p.add_argument("--frames", type=plumbing.positive_int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--iters", type=int, default=10, help="timed training steps per kind")
    p.add_argument("--text-len", type=int, default=80, help="caption tokens (world captions: ~75)")
    p.add_argument("--text-dim", type=int, default=384, help="encoder width (MiniLM: 384)")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--out", default="runs/bench/diffusion.json")
    args = p.parse_args(argv)
    plumbing.set_threads(args.threads)
    d = plumbing.pick_device(args.device)
    dtype = plumbing.pick_dtype(d, args.dtype)
    sync = torch.cuda.synchronize if d.type == "cuda" else (lambda: None)
    torch.manual_seed(0)

    # ---- matmul peak ----
    a, b = torch.randn(1024, 1024, device=d), torch.randn(1024, 1024, device=d)
    peak = 2 * 1024 ** 3 / timeit(lambda: a @ b, 20, sync=sync)

    result = {"device": str(d), "threads": torch.get_num_threads(), "dtype": str(dtype),
              "matmul_peak_gflops": peak / 1e9, "train": {}}
    model, rf = training_times(result["train"], args, d, dtype, sync, peak)
    result.update(params=sum(q.numel() for q in model.parameters()), config=model.config)
    r = result["train"]
    mix = 0.7 * r["image"]["s_per_step"] + 0.3 * r["video"]["s_per_step"]
    result["train"]["7:3 mix"] = {"s_per_step": mix, "steps_per_s": 1 / mix,
                                  "fraction_of_matmul_peak": (0.7 * r["image"]["gflop_per_step"] + 0.3 * r["video"]["gflop_per_step"]) * 1e9 / mix / peak}

    model.eval()
    result["sample"] = sampling_times(model, rf, args, d, dtype, sync)
    lines = table(result, r, peak, d, dtype, args.sample_steps)
    print("\n".join(lines))
    result["table"] = "\n".join(lines)
    plumbing.atomic_write_json(Path(args.out), result)
    print(f"-> {args.out}")


if __name__ == "__main__":
    plumbing.run_cli(main)
