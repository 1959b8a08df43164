"""Benchmark the probe's feature extraction: dedupe + length-sorted batches vs naive per-question encoding.

Naive = what a direct evaluation loop does: for every (caption, statement type) question, encode the
caption and its options as one batch. Ours = what 02_probe_encoders.py does: every unique text once, in
batches of similar length (common.length_batches). Both run the same encoder and the same layer fusions
on the same questions (the first --captions captions of the benchmark, all their statement types), in
one process.

    python bench/bench_probe.py                                  # minilm on 01's benchmark
    python bench/bench_probe.py --encoder smollm2 --captions 40
    python bench/bench_probe.py --results runs/probe/results.json   # also list seconds per encoder of a probe run

Writes runs/bench_probe/bench.json. Timings on a shared machine vary; the ratio is what to read.
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: shared modules

import torch  # noqa: E402

import plumbing  # noqa: E402
from common import caption_text, length_batches, read_ted  # noqa: E402
from models import LayerFusion  # noqa: E402
from encoders import load_encoder  # noqa: E402
from plumbing import log  # noqa: E402


def question_texts(q):
    """The caption (as the probe formats it) and the options of one question."""
    return [caption_text(q["caption"], q["kind"]), q["positive"], *q["negatives"]]


def fuse(fusions, hidden):
    """Every strategy's features, rounded to bf16 as the probe stores them."""
    for f in fusions.values():
        f(hidden).to(torch.bfloat16)


def naive(encoder, fusions, questions):
    """Per question: caption + options in one batch, nothing shared between questions."""
    for q in questions:
        fuse(fusions, encoder.encode(question_texts(q))[0])


def ours(encoder, fusions, questions, token_budget):
    """02's path: unique texts, length-sorted batches within a padded-token budget."""
    texts = list(dict.fromkeys(t for q in questions for t in question_texts(q)))
    for idx in length_batches(encoder, texts, token_budget):
        fuse(fusions, encoder.encode([texts[i] for i in idx])[0])
    return len(texts)


def get_parser():
    p = plumbing.ArgumentParser(__doc__)
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--benchmark", default="runs/ted6k/ted6k.json")
    p.add_argument("--captions", type=plumbing.positive_int, default=60,
                   help="benchmark captions to time (all their questions)")
    p.add_argument("--strategies", default="last,penultimate,norm-avg")
    p.add_argument("--token-budget", type=plumbing.positive_int, default=16384)
    p.add_argument("--encoder-dtype", default="bf16", choices=["bf16", "fp32", "fp16", "auto"], help="encoder dtype, as 02's")
    p.add_argument("--threads", type=plumbing.nonneg_int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--results", default="runs/probe/results.json", help="a probe run to list timings from")
    p.add_argument("--out", default="runs/bench_probe")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    plumbing.set_threads(args.threads)
    questions = read_ted(args.benchmark)[1]
    keep = set(list(dict.fromkeys(q["key"] for q in questions))[:args.captions])
    questions = [q for q in questions if q["key"] in keep]
    encoder = load_encoder(args.encoder, dtype=plumbing.pick_dtype("cpu", args.encoder_dtype))
    fusions = {s: LayerFusion(s, encoder.num_layers) for s in args.strategies.split(",") if s}
    encoder.encode(["warm up"])

    t = time.perf_counter()
    n_unique = ours(encoder, fusions, questions, args.token_budget)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    naive(encoder, fusions, questions)
    t_naive = time.perf_counter() - t
    n_naive = sum(2 + len(q["negatives"]) for q in questions)
    report = {"encoder": args.encoder, "dtype": str(encoder.dtype), "captions": len(keep),
              "questions": len(questions), "texts_naive": n_naive, "texts_unique": n_unique,
              "naive_s": t_naive, "ours_s": t_ours, "speedup": t_naive / t_ours,
              "torch_threads": torch.get_num_threads()}
    log(f"{args.encoder} ({encoder.dtype}) on {len(questions)} questions / {len(keep)} captions: naive per-question "
        f"{t_naive:.1f} s ({n_naive} encodings), dedupe + length batches {t_ours:.1f} s ({n_unique} texts): "
        f"{report['speedup']:.1f}x")
    if Path(args.results).is_file():
        res = plumbing.read_json(args.results)
        report["probe_seconds"] = {n: r["timings"] for n, r in res["encoders"].items()}
        for n, tm in report["probe_seconds"].items():
            log(f"probe {n}: {tm['total_s']:.0f} s (load {tm['load_s']:.0f}, train {tm['train_s']:.0f}, "
                f"score {tm['score_s']:.0f})")
    plumbing.atomic_write_json(Path(args.out) / "bench.json", report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    plumbing.run_cli(main)
