"""Benchmark the probe's feature extraction: dedupe + length-sorted batches vs naive per-instance encoding.

Naive = what a direct evaluation loop does: for every (caption, statement type) question, encode the
caption and its four options as one batch. Ours = 02_probe_encoders.py: every unique text once, in
batches of similar length. Both run the same encoder and the same layer fusions on the same questions
(the first --captions captions of the benchmark, all their statement types), in one process.

    python bench_probe.py                                  # minilm on 01's benchmark
    python bench_probe.py --encoder smollm2 --captions 40
    python bench_probe.py --results runs/probe/results.json   # also list seconds per encoder of a probe run

Writes runs/bench_probe/bench.json. Timings on a shared machine vary; the ratio is what to read.
"""
import argparse
import importlib
import json
import time
from pathlib import Path

import torch

from common import atomic_write_json, log, read_json
from encoders import load_encoder

probe = importlib.import_module("02_probe_encoders")


def naive(encoder, fusions, questions):
    """Per question: caption + options in one batch, nothing shared between questions."""
    for q in questions:
        texts = [probe.caption_text(q["caption"], q["kind"]), q["positive"], *q["negatives"]]
        hidden, _ = encoder.encode(texts)
        for f in fusions.values():
            f(hidden).to(torch.bfloat16)


def ours(encoder, fusions, questions, token_budget):
    """02's path: unique texts, length-sorted batches."""
    texts = probe.benchmark_texts(questions)
    probe.extract(encoder, fusions, texts, token_budget, torch.bfloat16)
    return len(texts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--benchmark", default="runs/ted6k/ted6k.json")
    p.add_argument("--captions", type=int, default=60, help="benchmark captions to time (all their questions)")
    p.add_argument("--strategies", default="last,penultimate,norm-avg")
    p.add_argument("--token-budget", type=int, default=16384)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--results", default="runs/probe/results.json", help="a probe run to list timings from")
    p.add_argument("--out", default="runs/bench_probe")
    args = p.parse_args(argv)

    questions = probe.load_benchmark(args.benchmark)
    keys = list(dict.fromkeys(q["key"] for q in questions))[:args.captions]
    keep = set(keys)
    questions = [q for q in questions if q["key"] in keep]
    encoder = load_encoder(args.encoder, dtype=probe.encoder_dtype("cpu", args.dtype))
    fusions = probe.make_fusions(args.strategies.split(","), encoder)
    encoder.encode(["warm up"])

    t = time.perf_counter()
    n_unique = ours(encoder, fusions, questions, args.token_budget)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    naive(encoder, fusions, questions)
    t_naive = time.perf_counter() - t
    n_naive = sum(2 + len(q["negatives"]) for q in questions)
    report = {"encoder": args.encoder, "dtype": str(encoder.dtype), "captions": len(keys),
              "questions": len(questions), "texts_naive": n_naive, "texts_unique": n_unique,
              "naive_s": t_naive, "ours_s": t_ours, "speedup": t_naive / t_ours,
              "torch_threads": torch.get_num_threads()}
    log(f"{args.encoder} ({encoder.dtype}) on {len(questions)} questions / {len(keys)} captions: naive per-instance "
        f"{t_naive:.1f} s ({n_naive} encodings), dedupe + length batches {t_ours:.1f} s ({n_unique} texts): "
        f"{report['speedup']:.1f}x")
    if Path(args.results).is_file():
        res = read_json(args.results)
        report["probe_seconds"] = {n: r["timings"] for n, r in res["encoders"].items()}
        for n, r in res["encoders"].items():
            tm = r["timings"]
            log(f"probe {n}: {tm['total_s']:.0f} s (load {tm['load_s']:.0f}, train {tm['train_s']:.0f}, "
                f"score {tm['score_s']:.0f})")
    atomic_write_json(Path(args.out) / "bench.json", report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
