"""The paper's Table 5 on the built-in world: fixed Norm-Avg vs layer weights learned throughout vs two-step,
over several DiT seeds, paired by seed.

Three arms with the same DiT, batches, optimiser, steps and seed, differing only in the layer fusion:
norm-avg (05 --fusion norm-avg), continuous (04 --freeze never) and two-step (04, then 05 --init-from to the
same total steps). A seed fixes the DiT's init, data order and noise; 06 --eval scores each arm on the
same prompts and noise. Paper (GenAI-Bench T2I): Norm-Avg 76.17, learned throughout 75.94, two-step 77.01.

    python experiments/ablation_layer_weights.py --threads 1                   # 3 seeds x 3 arms x 600 steps, CPU
    python experiments/ablation_layer_weights.py --dry-run                     # print the commands still to run
    python experiments/ablation_layer_weights.py --smoke --out /tmp/ablation   # tiny world, encoder, DiT: minutes
    python experiments/ablation_layer_weights.py --analyse-only runs/ablation  # table and Fig. 4 from disk alone
    python experiments/ablation_layer_weights.py --analyse-only docs/table5.json   # from a kept table alone

Restartable: a killed run is continued by the same command (finished arms and evals are kept); the recipe
goes to OUT/settings.json and a rerun with another into the same OUT is refused. OUT/table.json and
table.md hold, per arm, the mean +- s.e. over seeds of 06's three measures (classifier accuracy, prompt -
mismatched, prompt - floor) and the paired differences between arms
(mean +- s.e. of the per-seed differences, and how many are > 0), and the layer weights of every 04 run;
OUT/table_fig4.png plots them against the step (the paper's Fig. 4). OUT/seed_S/ARM/ holds each run, its
eval/, logs/ and seconds.json.
"""
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stages import (ASPECTS, KINDS, MEASURES, ROOT, SMOKE_TRAIN, dit_done, eval_command, eval_done,  # noqa: E402
                    keep_recipe, measure_tables, resolve, run_stage, script, world_command)
import models  # noqa: E402
import plumbing  # noqa: E402
from plumbing import DataError, newest_step  # noqa: E402
ARMS = ("norm-avg", "continuous", "two-step")  # the evaluated arms, in the table's order
JOINT = "two-step-joint"  # two-step's first half: 04 until the freeze
PAIRS = (("two-step", "norm-avg"), ("continuous", "norm-avg"), ("two-step", "continuous"))

# One DiT recipe for every arm: 04 and 05 share their defaults.
SAME = ["--ckpt-every", "200"]
# Sizes: (full, smoke). The encoder is the paper's: its stage-1 encoder (03's; since the ladder pretrains against
# hard negatives its DiT draws the prompt's colour, docs/results.md). `--encoder minilm` gives the earlier table.
DEFAULTS = {"encoder": ("runs/stage1/model", "tiny-qwen3"), "seeds": ([0, 1, 2], [0, 1]), "steps": (600, 6),
            "eval_images": (24, 4), "eval_videos": (12, 4), "eval_seeds": (2, 2), "sample_steps": (50, 4)}
RECIPE = ("smoke", "encoder", "steps", "eval_images", "eval_videos", "eval_seeds", "sample_steps", "data",
          "eval_data", "train_args", "eval_args")


#################################################################################
#                                   Flags                                       #
#################################################################################

def get_parser():
    p = plumbing.ArgumentParser(__doc__)
    pos, nonneg = plumbing.positive_int, plumbing.nonneg_int
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--encoder", default=None,
                   help="every arm's text encoder (default 03's runs/stage1/model, as in the paper; smoke tiny-qwen3)")
    p.add_argument("--seeds", type=nonneg, nargs="+", default=None, help="DiT seeds (default 0 1 2; smoke 0 1)")
    p.add_argument("--steps", type=pos, default=None, help="total DiT steps of every arm (default 600; smoke 6)")
    p.add_argument("--eval-images", type=nonneg, default=None, help="06: held-out image prompts (default 24)")
    p.add_argument("--eval-videos", type=nonneg, default=None, help="06: held-out video prompts (default 12)")
    p.add_argument("--eval-seeds", type=pos, default=None, help="06: seeds per prompt (default 2)")
    p.add_argument("--sample-steps", type=pos, default=None, help="06: Euler steps (default 50)")
    p.add_argument("--data", default=None, help="04/05 --data (default runs/world/t2x.jsonl)")
    p.add_argument("--eval-data", default=None, help="06 --eval-data (default runs/world/eval.jsonl)")
    p.add_argument("--cache-dir", default=None, help="04/05's feature cache (default cache; smoke OUT/cache)")
    p.add_argument("--train-args", default="", help="extra flags for every 04 and 05 run (one string)")
    p.add_argument("--eval-args", default="", help="extra flags for every 06 run (one string)")
    p.add_argument("--threads", type=nonneg, default=1, help="torch CPU threads of every stage (0: torch's default)")
    p.add_argument("--smoke", action="store_true", help="tiny world, encoder and DiT: all arms in minutes (the tests)")
    p.add_argument("--dry-run", action="store_true", help="print the commands still to run, run nothing")
    p.add_argument("--analyse-only", default=None, metavar="OUT",
                   help="rewrite OUT's table.json, table.md and table_fig4.png from its runs on disk (or, given "
                        "a table's .json, its .md and _fig4.png from it alone), run nothing")
    return p


def parse_args(argv=None):
    """Flags with the size defaults filled in (full or smoke) and every path made absolute."""
    args = get_parser().parse_args(argv)
    for key, (full, smoke) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
    twice = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    if twice:
        raise DataError(f"--seeds: {twice[0]} is given twice")
    args.out = Path(args.out).resolve()
    world = args.out / "world" / "world"
    paths = {"data": ("runs/world/t2x.jsonl", world / "t2x.jsonl"),
             "eval_data": ("runs/world/eval.jsonl", world / "eval.jsonl"),
             "cache_dir": ("cache", args.out / "cache")}
    args.own_world = args.smoke and args.data is None and args.eval_data is None
    return resolve(args, paths, ("train_args", "eval_args"))


def check_settings(args):
    """Write OUT/settings.json, or refuse a rerun whose recipe differs from the one the kept runs were made with."""
    return keep_recipe(args.out, {k: getattr(args, k) for k in RECIPE}, "an ablation", args.dry_run)


#################################################################################
#                               Running the stages                              #
#################################################################################

def train_commands(args, seed):
    """The 04/05 command of every run of one seed. Always --resume: a stage starts fresh when there is no
    checkpoint, and continues one when there is."""
    d = args.out / f"seed_{seed}"
    same = ["--steps", str(args.steps), "--seed", str(seed), "--data", args.data, "--cache-dir", args.cache_dir,
            "--resume", "--threads", str(args.threads), *SAME, *(SMOKE_TRAIN if args.smoke else []), *args.train_args]
    fresh = ["--encoder", args.encoder]
    out = {arm: ["--out", str(d / arm)] for arm in (*ARMS, JOINT)}
    return {
        "norm-avg": script("05_train_diffusion.py") + fresh + ["--fusion", "norm-avg"] + out["norm-avg"] + same,
        "continuous": script("04_train_layer_weights.py") + fresh + ["--freeze", "never"] + out["continuous"] + same,
        JOINT: script("04_train_layer_weights.py") + fresh + out[JOINT] + same,
        # the encoder and fusion come from 04's checkpoint; the rest must equal it, and does
        "two-step": script("05_train_diffusion.py") + ["--init-from", str(d / JOINT)] + out["two-step"] + same,
    }


def frozen_at(joint):
    """The step at which 04 froze the weights, read from the newest checkpoint of two-step's first half; None
    while they still learn (summary.json can lag its checkpoint by a kill)."""
    _, state = plumbing.load_latest_checkpoint(joint, models.CKPT_KIND)
    return None if state is None else state.get("frozen_at")


def launch(args, label, cmd, folder, log_name, key):
    """Run one stage (or print it, with --dry-run); its seconds go to folder/seconds.json under `key`."""
    if args.dry_run:
        print(f"{label}:\n  $ {shlex.join(cmd)}")
        return
    print(label, flush=True)
    seconds = run_stage(cmd, folder / "logs" / log_name, label.replace("[", "").replace("]", ":"), cwd=ROOT)
    path = folder / "seconds.json"
    secs = plumbing.read_json(path) if path.is_file() else {}
    secs[key] = secs.get(key, 0.0) + seconds  # a resumed run adds its attempts (a killed one is not counted)
    plumbing.atomic_write_json(path, secs)


def run_seed(args, seed, cmds):
    """Every run and eval of one seed, each skipped when its result is kept."""
    d = args.out / f"seed_{seed}"
    for arm in ARMS:
        dit, label = d / arm, f"[seed {seed} {arm}]"
        stage = "05" if arm != "continuous" else "04"
        if dit_done(args.steps, dit):
            print(f"{label} {stage} train: kept (step {newest_step(dit)})")
        else:
            how = f"resumes from step {newest_step(dit)}" if newest_step(dit) else "from scratch"
            if arm == "two-step" and not newest_step(dit):  # its first half is needed until 05 has begun
                how, joint = "from the freeze", d / JOINT
                at = frozen_at(joint)
                if at is not None:
                    print(f"{label} 04 joint: kept (frozen at step {at})")
                else:
                    step = newest_step(joint)
                    launch(args, f"{label} 04 joint ({f'resumes from step {step}' if step else 'from scratch'})",
                           cmds[JOINT], joint, "04_train.log", "train")
                    if not args.dry_run and frozen_at(joint) is None:
                        raise DataError(f"seed {seed}: 04 ended at step {newest_step(joint)} without freezing the "
                                        f"weights (--train-args with --stop-at?): rerun to continue it")
            launch(args, f"{label} {stage} train ({how})", cmds[arm], dit, f"{stage}_train.log", "train")
            if not args.dry_run and not dit_done(args.steps, dit):
                raise DataError(f"seed {seed} {arm}: {stage} ended at step {newest_step(dit)} of {args.steps} "
                                f"(--train-args with --stop-at?): rerun to continue it")
        if eval_done(args.steps, dit):
            print(f"{label} 06 eval: kept ({dit / 'eval' / 'eval.json'})")
        else:
            launch(args, f"{label} 06 eval", eval_command(args, dit, dit / "eval"), dit, "06_eval.log", "eval")


#################################################################################
#                                  Statistics                                   #
#################################################################################

def mean_se(values):
    """Mean and standard error (sample std / sqrt(n)) of some numbers; se is None below 2, both for none."""
    v = np.asarray(list(values), float)
    return {"mean": float(v.mean()) if len(v) else None,
            "se": float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None, "n": int(len(v))}


def paired_difference(a, b):
    """a - b paired by seed ({seed: value} each; seeds on one side only are left out): mean and s.e. of the
    per-seed differences, their number, and how many are > 0."""
    seeds = sorted(set(a) & set(b), key=int)
    d = {s: a[s] - b[s] for s in seeds}
    return {**mean_se(d.values()), "positive": sum(v > 0 for v in d.values()), "per_seed": d}


def aspect_mean(gains):
    """The mean over aspects of one run's {aspect: gain}; None when it has none."""
    return sum(gains.values()) / len(gains) if gains else None


def run_gains(report, measure="floor"):
    """{kind: {aspect: value}} and {kind: s.e. of the aspect mean} of one eval.json's `measure` (MEASURES);
    aspects without a value (an image has no motion) are left out. The s.e. is 06's paired one over per-sample
    aspect means ("all"); an eval.json without it takes the aspects as independent."""
    gains, ses = {}, {}
    for kind, aspects in measure_tables(report, measure).items():
        got = {a: v for a, v in aspects.items() if a in ASPECTS and v.get("mean") is not None}
        if not got:
            continue
        gains[kind] = {a: v["mean"] for a, v in got.items()}
        s = [v["se"] for v in got.values() if v.get("se") is not None]
        ses[kind] = aspects["all"]["se"] if "all" in aspects else \
            math.sqrt(sum(x * x for x in s)) / len(got) if len(s) == len(got) else None
    return gains, ses


def analyse(gains, eval_se=None):
    """The table from gains[arm][seed][kind][aspect] (and 06's s.e. eval_se[arm][seed][kind]): per arm and
    kind the per-seed aspect mean, its mean +- s.e. over seeds, the same per aspect; the paired differences."""
    eval_se = eval_se or {}
    arms, seed_means = {}, {}
    for arm in ARMS:
        arms[arm] = {}
        for kind in KINDS:
            runs = {s: g[kind] for s, g in sorted(gains.get(arm, {}).items(), key=lambda x: int(x[0])) if kind in g}
            per_seed = {s: aspect_mean(g) for s, g in runs.items()}
            seed_means[arm, kind] = per_seed
            ses = [e[kind] for s, e in eval_se.get(arm, {}).items() if s in runs and e.get(kind) is not None]
            arms[arm][kind] = {
                **mean_se(per_seed.values()), "per_seed": per_seed,
                "aspects": {a: mean_se(g[a] for g in runs.values() if a in g) for a in ASPECTS
                            if any(a in g for g in runs.values())},
                "eval_se": sum(ses) / len(ses) if ses else None}
    diffs = {f"{a} - {b}": {kind: paired_difference(seed_means[a, kind], seed_means[b, kind]) for kind in KINDS}
             for a, b in PAIRS}
    return {"arms": arms, "differences": diffs}


#################################################################################
#                            The table and Fig. 4                               #
#################################################################################

def seed_folders(out):
    """{seed: OUT/seed_S} of every seed this OUT holds, in seed order."""
    found = {}
    for p in out.glob("seed_*"):
        if p.is_dir() and p.name[5:].isdigit():
            found[int(p.name[5:])] = p
    return dict(sorted(found.items()))


def collect(out, steps):
    """From the runs on disk: gains and eval s.e. per arm and seed (finished evals only), 04's summaries of
    the continuous and two-step-joint runs per seed, the stages' seconds, and what is still pending."""
    gains, ses = {m: {} for m in MEASURES}, {m: {} for m in MEASURES}
    summaries, seconds, pending = {"continuous": {}, JOINT: {}}, {"train": 0.0, "eval": 0.0}, []
    for seed, d in seed_folders(out).items():
        s = str(seed)
        for arm in ARMS:
            if eval_done(steps, d / arm):
                report = plumbing.read_json(d / arm / "eval" / "eval.json")
                for m in MEASURES:
                    gains[m].setdefault(arm, {})[s], ses[m].setdefault(arm, {})[s] = run_gains(report, m)
            else:
                pending.append(f"seed_{seed}/{arm}")
        for arm in (*ARMS, JOINT):
            if (d / arm / "seconds.json").is_file():
                for k, v in plumbing.read_json(d / arm / "seconds.json").items():
                    seconds[k] = seconds.get(k, 0.0) + v
        for arm in summaries:
            if (d / arm / "summary.json").is_file():
                summaries[arm][s] = plumbing.read_json(d / arm / "summary.json")
    return gains, ses, summaries, seconds, pending


def build_table(out):
    """table.json's content for OUT, from OUT/settings.json and the runs on disk."""
    if not (out / "settings.json").is_file():
        raise DataError(f"{out}: no ablation here (no settings.json)")
    settings = plumbing.read_json(out / "settings.json")
    gains, ses, summaries, seconds, pending = collect(out, settings["steps"])
    table = {"settings": settings, "seeds": sorted({int(s) for g in gains["floor"].values() for s in g}),
             "measures": {m: analyse(gains[m], ses[m]) for m in MEASURES}}
    table["freeze"] = {s: {k: summ.get(k) for k in ("frozen_at", "reason", "planned_steps")}
                       for s, summ in summaries[JOINT].items()}
    table["layer_weights"] = {arm: {s: {k: summ.get(k) for k in ("snapshots", "weights", "frozen_at", "planned_steps")}
                                    for s, summ in runs.items()} for arm, runs in summaries.items()}
    table["seconds"], table["pending"] = seconds, pending
    return table


def _cell(v, sign=True):
    if v.get("mean") is None:
        return "-"
    m = f"{v['mean']:+.3f}" if sign else f"{v['mean']:.3f}"
    return m + (f" ± {v['se']:.3f}" if v.get("se") is not None else "")


def markdown(table):
    s, ms = table["settings"], table["measures"]
    lines = ["# Layer weights: fixed Norm-Avg vs learned throughout vs two-step (the paper's Table 5)", "",
             f"Encoder {s['encoder']}; every arm {s['steps']} DiT steps, the same recipe and, per seed, the same "
             f"init and data order; seeds {', '.join(map(str, table['seeds'])) or '-'}. 06's three measures, each "
             f"a mean over aspects: diffusion-classifier accuracy (chance 0.25), and the samples' paired gain over "
             f"the mismatched prompt and over the empty caption; {s['eval_images']} image / {s['eval_videos']} "
             f"video prompts x {s['eval_seeds']} seeds, {s['sample_steps']} Euler steps."
             + (" **Smoke sizes: not a result.**" if s["smoke"] else ""), "",
             "## Per arm: mean ± s.e. over seeds", "",
             "| measure | kind | aspect | " + " | ".join(ARMS) + " |", "|---|---|---|" + "---|" * len(ARMS)]
    for m, label in MEASURES.items():
        a = ms[m]["arms"]
        for kind in KINDS:
            for asp in ASPECTS:
                if any(asp in a[arm][kind]["aspects"] for arm in ARMS):
                    lines.append(f"| {label} | {kind} | {asp} | " + " | ".join(
                        _cell(a[arm][kind]["aspects"].get(asp, {})) for arm in ARMS) + " |")
            lines.append(f"| {label} | {kind} | **mean** (n seeds) | " + " | ".join(
                f"**{_cell(a[arm][kind])}** ({a[arm][kind]['n']})" for arm in ARMS) + " |")
            lines.append(f"| {label} | {kind} | eval s.e. of one run | " + " | ".join(
                "-" if a[arm][kind]["eval_se"] is None else f"{a[arm][kind]['eval_se']:.3f}" for arm in ARMS) + " |")
    lines += ["", "## Per seed: mean over aspects", "", "| seed | measure | kind | " + " | ".join(ARMS)
              + " | two-step froze at |", "|---|---|---|" + "---|" * (len(ARMS) + 1)]
    for seed in table["seeds"]:
        f = table["freeze"].get(str(seed), {})
        froze = f"step {f['frozen_at']} of {f['planned_steps']} ({f['reason']})" if f.get("frozen_at") else "-"
        for m, label in MEASURES.items():
            for kind in KINDS:
                vals = [ms[m]["arms"][arm][kind]["per_seed"].get(str(seed)) for arm in ARMS]
                lines.append(f"| {seed} | {label} | {kind} | " + " | ".join(
                    "-" if v is None else f"{v:+.3f}" for v in vals) + f" | {froze} |")
    pairs = [f"{a} - {b}" for a, b in PAIRS]
    lines += ["", "## Paired by seed: mean ± s.e. of the per-seed differences (n seeds, how many > 0)", "",
              "| measure | kind | " + " | ".join(pairs) + " |", "|---|---|" + "---|" * len(pairs)]
    for m, label in MEASURES.items():
        for kind in KINDS:
            cells = [ms[m]["differences"][p][kind] for p in pairs]
            lines.append(f"| {label} | {kind} | " + " | ".join(
                f"{_cell(c)} (n={c['n']}, {c['positive']} > 0)" for c in cells) + " |")
    lines += ["", "Paper (GenAI-Bench T2I): Norm-Avg 76.17, learned throughout 75.94, two-step 77.01. A difference "
                  "within about 2 s.e. of 0 is not a finding; with 3 seeds the s.e. itself is rough.",
              "", f"Wall seconds of the stages' processes: train {table['seconds'].get('train', 0):.0f}, eval "
                  f"{table['seconds'].get('eval', 0):.0f}. Pending: {', '.join(table['pending']) or 'none'}."]
    return "\n".join(lines) + "\n"


def _snapshots(summary):
    """(steps, [steps, layers] weights) of one 04 summary.json."""
    steps = sorted(int(k) for k in summary["snapshots"])
    return np.array(steps), np.array([summary["snapshots"][str(k)] for k in steps], float)


def plot_fig4(summaries, path):
    """Softmax weight of each layer against the step: learned throughout, and two-step until its freeze
    (dotted on to the end of the run, where 05 keeps it). Thin lines: seeds; thick: their mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    titles = {"continuous": "learned throughout (continuous)", JOINT: "two-step: learned, then frozen"}
    for ax, arm in zip(axes, titles):
        runs = summaries.get(arm, {})
        ax.set_xlabel("DiT step")
        if not runs:
            ax.set_title(f"{titles[arm]}: no run yet", fontsize=9)
            continue
        n = len(next(iter(runs.values()))["weights"])
        colour = [matplotlib.colormaps["viridis"](i / max(1, n - 1)) for i in range(n)]
        curves = [_snapshots(s) for s in runs.values()]
        for (steps, w), s in zip(curves, runs.values()):
            for i in range(n):
                ax.plot(steps, w[:, i], color=colour[i], lw=0.7, alpha=0.45)
                if s.get("frozen_at"):
                    ax.plot([s["frozen_at"], s["planned_steps"]], [s["weights"][i]] * 2, color=colour[i], lw=0.7,
                            ls=":", alpha=0.6)
            if s.get("frozen_at"):
                ax.axvline(s["frozen_at"], color="grey", ls="--", lw=0.8)
        common_steps = sorted(set.intersection(*(set(st.tolist()) for st, _ in curves)))
        if common_steps:
            mean = np.mean([w[np.isin(st, common_steps)] for st, w in curves], axis=0)
            for i in range(n):
                ax.plot(common_steps, mean[:, i], color=colour[i], lw=2, label=f"layer {i + 1}" if n <= 12 else None)
        ax.axhline(1 / n, color="black", ls="--", lw=0.8, label="Norm-Avg (1/N)")
        froze = sorted({s["frozen_at"] for s in runs.values() if s.get("frozen_at")})
        ax.set_title(f"{titles[arm]}, {len(runs)} seed(s)" + (f"; frozen at step {', '.join(map(str, froze))}"
                                                               if froze else ""), fontsize=9)
        ax.legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("softmax layer weight")
    fig.tight_layout()
    plumbing.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_analysis(path):
    """From a run folder's settings.json and runs (OUT/table.json written), or from a kept table's .json alone:
    the table's markdown (.md) and Fig. 4 (_fig4.png) beside it; the table."""
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        table = plumbing.read_json(path)
    else:
        table, path = build_table(path), path / "table.json"
        plumbing.atomic_write_json(path, table)
    try:
        text = markdown(table)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: not a table this script wrote ({type(e).__name__}: {plumbing.first_line(e)})") \
            from None
    plumbing.atomic_write_text(path.with_suffix(".md"), text)
    if any(table.get("layer_weights", {}).values()):
        plot_fig4(table["layer_weights"], path.with_name(f"{path.stem}_fig4.png"))
    return table


#################################################################################
#                                      Main                                     #
#################################################################################

def main(argv=None):
    args = parse_args(argv)
    if args.analyse_only:
        print(markdown(write_analysis(Path(args.analyse_only).resolve())))
        return
    check_settings(args)
    if args.own_world:
        if Path(args.eval_data).is_file() and Path(args.data).is_file():
            print(f"01 world: kept ({args.out / 'world'})")
        elif args.dry_run:
            print(f"01 world:\n  $ {shlex.join(world_command(args.out))}")
        else:
            print("01 world", flush=True)
            run_stage(world_command(args.out), args.out / "world.log", "01", cwd=ROOT)
    t0 = time.time()
    for seed in args.seeds:
        run_seed(args, seed, train_commands(args, seed))
    if args.dry_run:
        return
    table = write_analysis(args.out)
    print(f"\n{args.out / 'table.json'} ({time.time() - t0:.0f} s this run)\n")
    print(markdown(table))


if __name__ == "__main__":
    plumbing.run_cli(main)
