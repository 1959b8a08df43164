"""Feature standardisation at the DiT's input, on vs off, paired by seed, for several encoders.

Each (encoder, fusion, seed) trains two DiTs (05 --text-norm standardise / none) that share the DiT init,
data order and noise, then scores both with 06 --eval (sampling fidelity against the floor and the
mismatched-prompt control, and diffusion-classifier accuracy). Finished runs are kept; a killed run
resumes from its checkpoint, so the same command continues the experiment.

    python experiments/text_norm_on_off.py --encoders minilm smollm2 --seeds 0 1
    python experiments/text_norm_on_off.py --analyse-only runs/text_norm        # table.json + table.md

OUT/ENCODER-FUSION/seed_S/ARM/ holds each 05 run, its eval/ and the stages' logs.
"""
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stages import MEASURES, ROOT, measure_tables  # noqa: E402
import plumbing  # noqa: E402

ARMS = ("none", "standardise")  # the baseline, then the treatment
# The sweep's 600-step DiT recipe (docs/results.md), the default here so the two are comparable.
TRAIN = ("--steps 600 --dit 128x6 --batch 32:8 --lr 5e-4 --warmup 100 --ckpt-every 200")
EVAL = "--eval-images 32 --eval-videos 16 --eval-seeds 2"


def run_one(args, enc, fusion, seed, arm):
    """05 then 06 for one arm, each skipped when its output is already there."""
    out = Path(args.out) / f"{enc.replace('/', '_')}-{fusion}" / f"seed_{seed}" / arm
    (out / "logs").mkdir(parents=True, exist_ok=True)
    steps = [
        ("05", out / "model.safetensors", [sys.executable, str(ROOT / "05_train_diffusion.py"), "--resume",
         "--out", str(out), "--encoder", enc, "--fusion", fusion, "--seed", str(seed), "--text-norm", arm,
         "--data", args.data, "--cache-dir", args.cache_dir, "--threads", "1", *shlex.split(args.train_args)]),
        ("06", out / "eval" / "eval.json", [sys.executable, str(ROOT / "06_sample.py"), "--eval", "--ckpt", str(out),
         "--out", str(out / "eval"), "--eval-data", args.eval_data, "--threads", "1", *shlex.split(args.eval_args)]),
    ]
    for name, done, cmd in steps:
        if done.exists() and (name == "06" or _finished(out, args.train_args)):
            continue
        print(f"{out}: {name}", flush=True)
        with open(out / "logs" / f"{name}.log", "a") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode:
                print(f"{out}: {name} failed, see {out / 'logs' / f'{name}.log'}", flush=True)
                return


def _finished(out, train_args):
    """The run's model.safetensors is at its planned last step."""
    from safetensors import safe_open
    words = shlex.split(train_args)
    planned = int(words[words.index("--steps") + 1])
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return int(f.metadata()["step"]) >= planned


def arm_measures(report):
    """{kind: {measure: (mean, se)}} of one eval.json: over all aspects."""
    return {kind: {m: tuple(measure_tables(report, m).get(kind, {}).get("all", {}).get(k) for k in ("mean", "se"))
                   for m in MEASURES} for kind in report["settings"]}


def colour(report, kind):
    """(classifier accuracy, prompt - mismatched) for colour alone, each (mean, s.e.)."""
    c, g = report["classifier"]["results"][kind]["colour"], report["gain over mismatched"][kind]["colour"]
    return (c["mean"], c["se"]), (g["mean"], g["se"])


def analyse(out):
    """Per configuration and kind: each arm's mean over seeds, and treatment - baseline per seed (paired);
    then colour alone, run by run."""
    base, treat = arms = ARMS
    rows, colours = [], []
    for cfg in sorted(p for p in Path(out).iterdir() if p.is_dir()):
        per_seed = {}
        for sd in sorted(cfg.glob("seed_*")):
            evals = {arm: sd / arm / "eval" / "eval.json" for arm in arms}
            if all(p.exists() for p in evals.values()):
                reports = {arm: json.loads(p.read_text()) for arm, p in evals.items()}
                per_seed[sd.name] = {arm: arm_measures(r) for arm, r in reports.items()}
                colours += [{"config": cfg.name, "seed": sd.name, "arm": arm,
                             **{kind: colour(r, kind) for kind in ("image", "video")}} for arm, r in reports.items()]
        if not per_seed:
            continue
        for kind in ("image", "video"):
            row = {"config": cfg.name, "kind": kind, "seeds": sorted(per_seed)}
            for m in MEASURES:
                vals = {arm: [per_seed[s][arm][kind][m] for s in per_seed] for arm in arms}
                for arm in arms:
                    row[f"{m}:{arm}"] = float(np.mean([v[0] for v in vals[arm]]))
                    row[f"{m}:{arm}:eval_se"] = float(np.mean([v[1] for v in vals[arm]]))  # one run's own s.e.
                diff = [b[0] - a[0] for a, b in zip(vals[base], vals[treat])]
                row[f"{m}:diff"] = diff
            rows.append(row)
    table = {"arms": list(arms), "rows": rows, "measures": MEASURES, "colour": colours}
    plumbing.atomic_write_json(Path(out) / "table.json", table)
    lines = [f"| configuration | kind | measure | {base} | {treat} | {treat} - {base}, per seed |", "|---|---|---|---|---|---|"]
    for r in rows:
        for m, label in MEASURES.items():
            lines.append(f"| {r['config']} | {r['kind']} | {label} | {r[f'{m}:{base}']:+.3f} ± {r[f'{m}:{base}:eval_se']:.3f} | "
                         f"{r[f'{m}:{treat}']:+.3f} ± {r[f'{m}:{treat}:eval_se']:.3f} | "
                         + ", ".join(f"{d:+.3f}" for d in r[f"{m}:diff"]) + " |")
    lines += ["", "Arm cells: mean over seeds ± one run's eval s.e. (mean over seeds).", "",
              "Colour alone, each run (± that run's eval s.e.):", "",
              "| configuration | seed | arm | image colour: classifier | image colour: prompt - mismatched | "
              "video colour: classifier | video colour: prompt - mismatched |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {c['config']} | {c['seed']} | {c['arm']} | " + " | ".join(
        f"{m:+.3f} ± {s:.3f}" for kind in ("image", "video") for m, s in c[kind]) + " |" for c in colours]
    text = "\n".join(lines) + "\n"
    plumbing.atomic_write_text(Path(out) / "table.md", text)
    print(text)


def main():
    p = plumbing.ArgumentParser(__doc__)
    p.add_argument("--encoders", nargs="+", default=["minilm", "smollm2"], help="ENCODER or ENCODER:FUSION")
    p.add_argument("--fusion", default="norm-avg")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="runs/text_norm")
    p.add_argument("--data", default="runs/world/t2x.jsonl")
    p.add_argument("--eval-data", default="runs/world/eval.jsonl")
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--train-args", default=TRAIN)
    p.add_argument("--eval-args", default=EVAL)
    p.add_argument("--analyse-only", default=None, metavar="OUT")
    args = p.parse_args()
    if args.analyse_only:
        return analyse(args.analyse_only)
    for seed in args.seeds:
        for spec in args.encoders:
            enc, _, fusion = spec.partition(":")
            for arm in ARMS:
                run_one(args, enc, fusion or args.fusion, seed, arm)
    analyse(args.out)


if __name__ == "__main__":
    plumbing.run_cli(main)
