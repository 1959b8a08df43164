"""Does TED predict generation? The paper's headline correlation (Tables 3 and 4) on the built-in world.

For each encoder configuration (encoder x layer-feature strategy) the sweep runs the stages as they are:
02 for the TED score (mean and seed std), 05 for a DiT with one recipe for all (only the encoder and
fusion change), 06 --eval for its generation measures per aspect, images and videos apart. After each finished
configuration it writes OUT/sweep.json, and from that table alone OUT/sweep_analysis.{json,md},
sweep_scatter.png and sweep_heatmap.png: Pearson r and Spearman rho with bootstrap 95% intervals and
p-values (scipy.stats), the statement-type x aspect matrix, and the cost of ranking with 02 vs with 05 + 06.

    python experiments/sweep_ted_vs_generation.py --threads 1             # the default configurations (hours)
    python experiments/sweep_ted_vs_generation.py --dry-run               # print the commands, run nothing
    python experiments/sweep_ted_vs_generation.py --only minilm-last,gemma3-norm-avg
    python experiments/sweep_ted_vs_generation.py --dit-seed 1 --only minilm-last,smollm2-last   # a second DiT each
    python experiments/sweep_ted_vs_generation.py --smoke --out /tmp/sweep    # 3 tiny configurations, minutes
    python experiments/sweep_ted_vs_generation.py --analyse-only runs/sweep/sweep.json
    python experiments/sweep_ted_vs_generation.py --analyse-only docs/sweep.json     # the committed table

Restartable: finished stages are kept and an unfinished DiT continues from its newest checkpoint, so a
killed sweep is continued by the same command; the recipe goes to OUT/settings.json and a rerun with
other settings into the same OUT is refused. Seconds are each stage's process wall time. OUT/configs/NAME/
holds each stage's outputs, logs and seconds.json; with --smoke, OUT/world/ holds the tiny world. The committed
table continues in a fresh checkout (its rows are kept, only what they lack runs):

    mkdir -p runs/sweep && cp docs/sweep.json runs/sweep/ && python experiments/sweep_ted_vs_generation.py
"""
import functools
import itertools
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stages import (ASPECTS, KINDS, MEASURES, ROOT, SMOKE_TRAIN, code_version, dit_done, eval_command,  # noqa: E402
                    eval_done, keep_recipe, measure_tables, resolve, run_stage, script, world_command)
import plumbing  # noqa: E402
from plumbing import DataError, newest_step  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    encoder: str
    strategy: str
    needs: str = ""  # the stage that writes the encoder's folder, when it is not built in


# The design (issue 23): the three real encoders at a single layer and at Norm-Avg; dose-response series
# whose order is predicted in advance (MiniLM's layers 1, 3 and 5 of 6 and its last; SmolLM2's layers 8 and
# 16 of 30 and its last: deeper is better on both axes); and a control that carries the words but no
# context (MiniLM's embeddings, `minilm-words`); and the tiny Qwen3-VL ladder at Norm-Avg (the paper's chain:
# LLM twin, MLLM base, stage 1).
CONFIGS = (
    Config("minilm-last", "minilm", "last"),
    Config("minilm-norm-avg", "minilm", "norm-avg"),
    Config("smollm2-last", "smollm2", "last"),
    Config("smollm2-norm-avg", "smollm2", "norm-avg"),
    Config("gemma3-last", "gemma3", "last"),
    Config("gemma3-norm-avg", "gemma3", "norm-avg"),
    Config("minilm-layer0", "minilm", "layer:0"),
    Config("minilm-layer2", "minilm", "layer:2"),
    Config("minilm-layer4", "minilm", "layer:4"),
    Config("smollm2-layer7", "smollm2", "layer:7"),
    Config("smollm2-layer15", "smollm2", "layer:15"),
    Config("minilm-words", "minilm-words", "last"),
    Config("tiny-qwen3vl-llm-norm-avg", "tiny-qwen3vl-llm", "norm-avg"),
    Config("tiny-qwen3vl-base-norm-avg", "tiny-qwen3vl-base", "norm-avg"),
    Config("stage1-norm-avg", "runs/stage1/model", "norm-avg", needs="03_finetune_qwen3vl.py"),
)
SMOKE_CONFIGS = (
    Config("tiny-qwen3-norm-avg", "tiny-qwen3", "norm-avg"),
    Config("tiny-t5-last", "tiny-t5", "last"),
    Config("tiny-clip-penultimate", "tiny-clip", "penultimate"),
)

# Sizes: (full, smoke). Full sizes are the stages' own defaults, so a sweep row is comparable to a stage run.
DEFAULTS = {"steps": (3000, 6), "seeds": ([0, 1, 2], [0, 1]), "eval_images": (48, 4), "eval_videos": (24, 4),
            "eval_seeds": (4, 2), "sample_steps": (50, 4), "max_captions": (0, 0)}
SMOKE_PROBE = ["--steps", "4", "--batch-size", "8", "--width", "32", "--out-dim", "32", "--heads", "2"]
RECIPE = ("smoke", "steps", "seeds", "eval_images", "eval_videos", "eval_seeds", "sample_steps", "max_captions",
          "benchmark", "caption_pairs", "data", "eval_data", "probe_args", "train_args", "eval_args")


#################################################################################
#                                   Flags                                       #
#################################################################################

def get_parser():
    p = plumbing.ArgumentParser(__doc__)
    pos, nonneg = plumbing.positive_int, plumbing.nonneg_int
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--only", action="append", default=[], help="configuration NAME (repeat, or a comma list)")
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    p.add_argument("--dry-run", action="store_true", help="print the commands still to run, run nothing")
    p.add_argument("--smoke", action="store_true",
                   help="tiny world, tiny encoders and sizes: the whole sweep in a few minutes (what the tests run)")
    p.add_argument("--steps", type=pos, default=None, help="DiT optimiser steps (default 3000; smoke 6)")
    p.add_argument("--dit-seed", type=nonneg, default=0,
                   help="05's seed; another than 0 trains and evaluates a further DiT beside the kept probe")
    p.add_argument("--seeds", type=nonneg, nargs="+", default=None,
                   help="02's aggregator seeds (default 0 1 2; smoke 0 1)")
    p.add_argument("--max-captions", type=nonneg, default=None, help="02: benchmark captions scored (0 = all)")
    p.add_argument("--eval-images", type=nonneg, default=None, help="06: held-out image prompts (default 48)")
    p.add_argument("--eval-videos", type=nonneg, default=None, help="06: held-out video prompts (default 24)")
    p.add_argument("--eval-seeds", type=pos, default=None, help="06: seeds per prompt (default 4)")
    p.add_argument("--sample-steps", type=pos, default=None, help="06: Euler steps (default 50)")
    p.add_argument("--benchmark", default=None, help="02 --benchmark (default runs/ted6k/ted6k.json)")
    p.add_argument("--caption-pairs", default=None, help="02 --caption-pairs (default runs/world/caption_pairs.jsonl)")
    p.add_argument("--data", default=None, help="05 --data (default runs/world/t2x.jsonl)")
    p.add_argument("--eval-data", default=None, help="06 --eval-data (default runs/world/eval.jsonl)")
    p.add_argument("--cache-dir", default=None, help="05's feature cache (default cache; smoke OUT/cache)")
    p.add_argument("--probe-args", default="", help="extra flags for every 02 run (one string)")
    p.add_argument("--train-args", default="", help="extra flags for every 05 run (one string)")
    p.add_argument("--eval-args", default="", help="extra flags for every 06 run (one string)")
    p.add_argument("--threads", type=nonneg, default=1, help="torch CPU threads of every stage (0: torch's default)")
    p.add_argument("--analyse-only", default=None, metavar="SWEEP_JSON",
                   help="recompute the analysis from a sweep.json (or its folder) and run nothing")
    p.add_argument("--bootstrap", type=pos, default=10000, help="bootstrap resamples over configurations")
    return p


def parse_args(argv=None):
    """Flags with the size defaults filled in (full or smoke) and every path made absolute."""
    args = get_parser().parse_args(argv)
    for key, (full, smoke) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
    args.out = Path(args.out).resolve()
    world = args.out / "world"
    paths = {"benchmark": ("runs/ted6k/ted6k.json", world / "ted6k/ted6k.json"),
             "caption_pairs": ("runs/world/caption_pairs.jsonl", world / "world/caption_pairs.jsonl"),
             "data": ("runs/world/t2x.jsonl", world / "world/t2x.jsonl"),
             "eval_data": ("runs/world/eval.jsonl", world / "world/eval.jsonl"),
             "cache_dir": ("cache", args.out / "cache")}
    args.own_world = args.smoke and all(getattr(args, k) is None for k in paths if k != "cache_dir")
    return resolve(args, paths, ("probe_args", "train_args", "eval_args"))


def select(args):
    """The configurations this run works on: all of them, or those --only names (in the table's order)."""
    table = SMOKE_CONFIGS if args.smoke else CONFIGS
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    known = {c.name for c in table}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DataError(f"--only: unknown configuration {unknown[0]!r} (one of {', '.join(c.name for c in table)}"
                        + ("; --smoke has its own" if not args.smoke else "") + ")")
    return [c for c in table if not names or c.name in names], table


def check_settings(args):
    """Write OUT/settings.json, or refuse a rerun whose recipe differs from the one the kept runs were made with.
    Paths inside the checkout are kept relative, and a sweep.json without its settings.json (a committed table
    copied into a fresh checkout) brings its own, so that another checkout can continue it."""
    settings = {k: getattr(args, k) for k in RECIPE}
    for k in ("benchmark", "caption_pairs", "data", "eval_data"):
        if Path(settings[k]).is_relative_to(ROOT):
            settings[k] = str(Path(settings[k]).relative_to(ROOT))
    table = args.out / "sweep.json"
    if table.is_file() and not (args.out / "settings.json").is_file() and not args.dry_run:
        plumbing.atomic_write_json(args.out / "settings.json", plumbing.read_json(table)["settings"])
    return keep_recipe(args.out, settings, "a sweep", args.dry_run)


def kept_rows(args):
    """{name: row} of OUT/sweep.json's rows whose probe folder is gone (a sweep continued in a fresh checkout
    from a committed table): each stands for its probe and seed-0 DiT, which are not redone."""
    path = args.out / "sweep.json"
    rows = plumbing.read_json(path)["configurations"] if path.is_file() else []
    return {r["name"]: r for r in rows if not (folders(args, r["name"])[1] / "results.json").is_file()}


#################################################################################
#                               Running the stages                              #
#################################################################################

def probe_command(args, cfg, out):
    return script("02_probe_encoders.py") + [
        "--encoders", cfg.encoder, "--strategies", cfg.strategy, "--seeds", *map(str, args.seeds),
        "--max-captions", str(args.max_captions), "--benchmark", args.benchmark,
        "--caption-pairs", args.caption_pairs, "--out", str(out), "--threads", str(args.threads),
        *(SMOKE_PROBE if args.smoke else []), *args.probe_args]


def train_command(args, cfg, out, seed=0):
    # Always --resume: 05 starts fresh when there is no checkpoint, and continues one when there is.
    return script("05_train_diffusion.py") + [
        "--encoder", cfg.encoder, "--fusion", cfg.strategy, "--steps", str(args.steps), "--data", args.data,
        "--cache-dir", args.cache_dir, "--out", str(out), "--resume", "--threads", str(args.threads),
        *(["--seed", str(seed)] if seed else []), *(SMOKE_TRAIN if args.smoke else []), *args.train_args]


def folders(args, name, seed=0):
    """Configuration NAME's folder, its probe, and the DiT and eval of one DiT seed (0: dit/ and eval/)."""
    d = args.out / "configs" / name
    tag = f"_seed{seed}" if seed else ""
    return d, d / "probe", d / f"dit{tag}", d / f"eval{tag}"


def seed_key(name, seed):
    """A seconds.json key of one DiT seed's stage: `train` for seed 0, `train_seed1` for seed 1."""
    return f"{name}_seed{seed}" if seed else name


def open_seconds(path, seed, dit, dry_run):
    """A configuration's seconds.json: the commit of its first stage (and of a further DiT seed's) noted,
    and a 05 attempt that a kill cut short counted up to its newest checkpoint (the rest is redone)."""
    secs = plumbing.read_json(path) if path.is_file() else {}
    if dry_run:
        return secs
    key = functools.partial(seed_key, seed=seed)
    if key("commit") not in secs and (seed or not path.is_file()):
        secs[key("commit")] = code_version()
    if key("train_started") in secs:
        ckpts = plumbing.list_checkpoints(dit)
        done_at = ckpts[-1].stat().st_mtime if ckpts else 0.0
        secs[key("train")] = secs.get(key("train"), 0.0) + max(0.0, done_at - secs.pop(key("train_started")))
        secs[key("train_interrupted")] = secs.get(key("train_interrupted"), 0) + 1
    plumbing.atomic_write_json(path, secs)
    return secs


def run_config(args, cfg, label):
    """02, 05, 06 for one configuration, each skipped when its result is kept; True once all three are done."""
    seed = args.dit_seed
    d, probe, dit, ev = folders(args, cfg.name, seed)
    key = functools.partial(seed_key, seed=seed)
    kept = kept_rows(args).get(cfg.name)
    if kept and not seed:
        print(f"{label} kept in {args.out / 'sweep.json'} (commit {kept['commit']})")
        return not args.dry_run
    secs_path = d / "seconds.json"
    secs = open_seconds(secs_path, seed, dit, args.dry_run)

    def save():
        if not args.dry_run:
            plumbing.atomic_write_json(secs_path, secs)
    if cfg.needs and not (ROOT / cfg.encoder / "config.json").is_file():
        message = f"{cfg.name}: {cfg.encoder} does not exist yet ({cfg.needs} writes it)"
        if not args.dry_run:
            raise DataError(message + "; run it first, or leave the configuration out with --only")
        print(f"{label} note: {message}")
    if kept or (probe / "results.json").is_file():
        print(f"{label} 02 probe: kept ({args.out / 'sweep.json' if kept else probe / 'results.json'})")
    elif args.dry_run:
        print(f"{label} 02 probe:\n  $ {shlex.join(probe_command(args, cfg, probe))}")
    else:
        print(f"{label} 02 probe", flush=True)
        secs["probe"] = run_stage(probe_command(args, cfg, probe), d / "logs/02_probe.log", f"{cfg.name}: 02",
                                  cwd=ROOT)
        save()
    if dit_done(args.steps, dit):
        print(f"{label} 05 train: kept (step {newest_step(dit)})")
    else:
        step = newest_step(dit)
        how = f"resumes from step {step}" if step else "from scratch"
        cmd = train_command(args, cfg, dit, seed)
        if args.dry_run:
            print(f"{label} 05 train ({how}):\n  $ {shlex.join(cmd)}")
        else:
            print(f"{label} 05 train ({how})", flush=True)
            secs[key("train_started")] = time.time()
            save()
            s = run_stage(cmd, d / f"logs/{key('05_train')}.log", f"{cfg.name}: 05", cwd=ROOT)
            secs.pop(key("train_started"))
            secs[key("train")] = secs.get(key("train"), 0.0) + s
            save()
            if not dit_done(args.steps, dit):
                raise DataError(f"{cfg.name}: 05 ended at step {newest_step(dit)} of {args.steps} "
                                f"(--train-args with --stop-at?): rerun to continue it")
    if eval_done(args.steps, dit, ev):
        print(f"{label} 06 eval: kept ({ev / 'eval.json'})")
    elif args.dry_run:
        print(f"{label} 06 eval:\n  $ {shlex.join(eval_command(args, dit, ev))}")
    else:
        print(f"{label} 06 eval", flush=True)
        secs[key("eval")] = run_stage(eval_command(args, dit, ev), d / f"logs/{key('06_eval')}.log", f"{cfg.name}: 06",
                                      cwd=ROOT)
        save()
    return not args.dry_run


#################################################################################
#                                  The table                                    #
#################################################################################

# The generation measures of 06 --eval, each per aspect and over all aspects with its s.e.: the DiT's
# diffusion-classifier accuracy, and its guided samples' paired gain over a mismatched prompt and over the
# empty-caption floor.


def generation(report):
    """Per kind and measure: {"all": {mean, se, n}, "aspects": {aspect: {mean, se, n}}} from one eval.json."""
    out = {}
    for kind, settings in report["settings"].items():
        tables = {m: measure_tables(report, m).get(kind) for m in MEASURES}
        out[kind] = {"prompts": settings["prompts"], "seeds": settings["seeds"]}
        for m, t in tables.items():
            if t and t["all"]["mean"] is not None:
                out[kind][m] = {"all": t["all"], "aspects": {a: t[a] for a in ASPECTS
                                                             if a in t and t[a]["mean"] is not None}}
    return out


def table_row(args, cfg, kept=None):
    """One configuration's row from its stages' own outputs (or its kept row, with any further DiT seeds);
    None until all three are done."""
    d, probe, dit, ev = folders(args, cfg.name)
    secs = plumbing.read_json(d / "seconds.json") if (d / "seconds.json").is_file() else {}
    more = {}  # further DiT seeds (--dit-seed) whose eval is done: their generation measures
    for n in sorted(int(path.name[len("dit_seed"):]) for path in d.glob("dit_seed*")):
        _, _, dit_n, ev_n = folders(args, cfg.name, n)
        if dit_done(args.steps, dit_n) and eval_done(args.steps, dit_n, ev_n):
            more[str(n)] = {"generation": generation(plumbing.read_json(ev_n / "eval.json")),
                            "commit": secs.get(seed_key("commit", n))}
    if kept:
        return {**kept, "dit_seeds": {**kept["dit_seeds"], **more}}
    if not ((probe / "results.json").is_file() and dit_done(args.steps, dit) and eval_done(args.steps, dit, ev)):
        return None
    res = plumbing.read_json(probe / "results.json")
    enc = res["encoders"].get(cfg.encoder, {})
    if cfg.strategy not in enc.get("strategies", {}):
        raise DataError(f"{probe / 'results.json'}: holds no {cfg.encoder} {cfg.strategy} result (another sweep's "
                        f"folder?): remove it to probe again")
    r = enc["strategies"][cfg.strategy]
    return {
        "name": cfg.name, "encoder": cfg.encoder, "strategy": cfg.strategy, "family": enc["family"],
        "ted": {"overall": r["overall"], "std": r["std"]["overall"], "seeds": len(r["seeds"]),
                "by_type": r["by_type"], "by_type_std": r["std"]["by_type"],
                "by_caption_type": r["by_caption_type"], "zero_shot": r["zero_shot"]["overall"],
                "questions": res["benchmark"]["questions"], "beyond_words": r.get("beyond_words"),
                "beyond_words_std": r["std"].get("beyond_words"),
                "beyond_words_questions": res["benchmark"].get("beyond_words")},
        "generation": generation(plumbing.read_json(ev / "eval.json")), "dit_seeds": more,
        "dit_step": newest_step(dit), "commit": secs.get("commit"),
        "seconds": {"probe": secs.get("probe"), "train": secs.get("train"), "eval": secs.get("eval"),
                    "train_interrupted": secs.get("train_interrupted", 0),
                    "probe_in_02": enc["timings"]["total_s"]},
        "commands": {"02": shlex.join(probe_command(args, cfg, probe)),
                     "05": shlex.join(train_command(args, cfg, dit)),
                     "06": shlex.join(eval_command(args, dit, ev))},
    }


def write_table(args, settings, table):
    """sweep.json: every finished configuration of this OUT (not only --only's), in the list's order."""
    kept = kept_rows(args)
    rows = [r for r in (table_row(args, c, kept.get(c.name)) for c in table) if r is not None]
    sweep = {"settings": settings, "configurations": rows,
             "pending": [c.name for c in table if c.name not in {r["name"] for r in rows}]}
    plumbing.atomic_write_json(args.out / "sweep.json", sweep)
    return sweep


#################################################################################
#                                  Statistics                                   #
#################################################################################

def r_of(name, x, y):
    """Pearson r or Spearman rho along the last axis; nan where a side is constant."""
    if name == "spearman":
        x, y = stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant resample is nan, counted below
        return stats.pearsonr(x, y, axis=-1).statistic


def correlation(x, y, n_boot=10000, seed=0):
    """r and rho over configurations, each with a percentile bootstrap 95% interval (resamples with a
    constant side dropped), scipy's p-value and a permutation p (exact when n_boot covers every ordering)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    out = {"n": len(x)}
    for name in ("pearson", "spearman"):
        res = {"value": None, "ci95": None, "p": None, "p_permutation": None}
        if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
            test = stats.pearsonr(x, y) if name == "pearson" else stats.spearmanr(x, y)
            boot = r_of(name, x[idx], y[idx])
            boot = boot[~np.isnan(boot)]
            perm = stats.permutation_test((y,), lambda v, axis=-1: r_of(name, x, v), permutation_type="pairings",
                                          vectorized=True, n_resamples=n_boot, random_state=seed)
            res.update(value=float(test.statistic), p=float(test.pvalue), p_permutation=float(perm.pvalue),
                       ci95=[float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if len(boot) else None)
        out[name] = res
    return out


#################################################################################
#                                   Analysis                                    #
#################################################################################

def seed_noise(rows, kind, m):
    """The DiT's own seed noise against the spread between configurations: the std of one measure over DiT
    seeds (pooled over the configurations with more than one) and over configurations (their seed-0 DiTs);
    TED's r on each DiT seed and on their mean."""
    between = [r["generation"][kind][m]["all"]["mean"] for r in rows]
    groups, ted = [], []
    for y0, r in zip(between, rows):
        more = {s: x["generation"][kind][m]["all"]["mean"] for s, x in r.get("dit_seeds", {}).items()
                if m in x["generation"].get(kind, {})}
        if more:
            groups.append({"0": y0, **more})
            ted.append(r["ted"]["overall"])
    within = float(np.sqrt(np.mean([np.var(list(v.values()), ddof=1) for v in groups]))) if groups else None
    # A DiT seed fixes init and data order for every configuration, so part of its effect is shared and
    # cancels between rows at the same seed. What does not cancel is the configuration x seed interaction:
    # the two-way residual std over the configurations that ran the most common set of seeds.
    sets = [tuple(sorted(v)) for v in groups]
    common = max(sets, key=sets.count, default=())
    y = np.array([[v[s] for s in common] for v, ran in zip(groups, sets) if ran == common])
    x = [t for t, ran in zip(ted, sets) if ran == common]
    interaction, r_seed, r_mean = None, [], None
    if len(y) > 1:
        res = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()
        interaction = float(np.sqrt((res ** 2).sum() / ((y.shape[0] - 1) * (y.shape[1] - 1))))
        # If the DiT's seed noise hides a real relation, TED's r on these configurations rises when each
        # is measured by the mean of its DiT seeds rather than by any one seed.
        r_seed = [correlation(x, col, n_boot=1)["pearson"]["value"] for col in y.T]
        r_mean = correlation(x, y.mean(1), n_boot=1)["pearson"]["value"]
    return {"configurations_with_seeds": len(groups), "seed_std": within, "interaction_std": interaction,
            "between_std": float(np.std(between, ddof=1)) if len(between) > 1 else None,
            "seeds": list(common), "n_common": len(y), "r_each_seed": r_seed, "r_seed_mean": r_mean}


def analyse(sweep, n_boot=10000, seed=0):
    """Everything the analysis reports, from the table alone."""
    rows = sweep["configurations"]
    out = {"configurations": [r["name"] for r in rows], "bootstrap": {"resamples": n_boot, "seed": seed},
           "correlation": {}, "correlation_zero_shot": {}, "correlation_beyond_words": {}, "leave_one_out": {},
           "dit_seed_noise": {}, "matrix": {}, "cost": {}}
    for kind, m in itertools.product(KINDS, MEASURES):
        have = [r for r in rows if m in r["generation"].get(kind, {})]
        y = [r["generation"][kind][m]["all"]["mean"] for r in have]
        c = correlation([r["ted"]["overall"] for r in have], y, n_boot, seed)
        out["correlation"].setdefault(kind, {})[m] = dict(c, configurations=[r["name"] for r in have])
        # The same with 02's zero-shot reference (mean-pooled features, no aggregator): does the trained
        # probe add predictive power over the encoder's raw similarity? And with TED on the questions the
        # bag of words gets wrong: does leaving out what words alone decide make it a better predictor?
        for key, ted in (("correlation_zero_shot", "zero_shot"), ("correlation_beyond_words", "beyond_words")):
            pts = [(r["ted"][ted], yr) for r, yr in zip(have, y) if r["ted"].get(ted) is not None]
            out[key].setdefault(kind, {})[m] = correlation(*zip(*pts), n_boot, seed) if pts else correlation([], [])
        # Does one encoder, or one family, carry r? The correlation with its configurations left out in turn;
        # and does TED rank the configurations inside one family? The correlation within each family alone.
        families = sorted({r["family"] for r in have})
        groups = [("encoder", e, f"without {e}", False) for e in sorted({r["encoder"] for r in have})]
        groups += [("family", f, f"without {f} family", False) for f in families]
        groups += [("family", f, f"{f} family alone", True) for f in families]
        for field, value, label, alone in groups:
            rest = [(r["ted"]["overall"], yr) for r, yr in zip(have, y) if (r[field] == value) == alone]
            c = correlation(*zip(*rest), n_boot=1) if rest else correlation([], [])
            out["leave_one_out"].setdefault(kind, {}).setdefault(m, {})[label] = {
                "n": c["n"], "pearson": c["pearson"]["value"], "spearman": c["spearman"]["value"]}
        out["dit_seed_noise"].setdefault(kind, {})[m] = seed_noise(have, kind, m)
    # Statement type (rows) x the classifier's aspects (columns): Adjective <-> colour, Quantity <-> count,
    # Spatial <-> position and Adverb <-> speed are where a diagonal could show.
    types = sorted({t for r in rows for t in r["ted"]["by_type"]})
    columns = [(k, a) for k in KINDS for a in ASPECTS
               if any(a in r["generation"].get(k, {}).get("classifier", {}).get("aspects", {}) for r in rows)]
    out["matrix"] = {"measure": "classifier", "rows": ["overall"] + types, "columns": [f"{k} {a}" for k, a in columns],
                     "r": [], "n": []}
    for t in out["matrix"]["rows"]:
        r_row, n_row = [], []
        for k, a in columns:
            pts = [(r["ted"]["overall"] if t == "overall" else r["ted"]["by_type"][t],
                    r["generation"][k]["classifier"]["aspects"][a]["mean"]) for r in rows
                   if (t == "overall" or t in r["ted"]["by_type"])
                   and a in r["generation"].get(k, {}).get("classifier", {}).get("aspects", {})]
            r_row.append(correlation(*zip(*pts), n_boot=1)["pearson"]["value"] if pts else None)
            n_row.append(len(pts))
        out["matrix"]["r"].append(r_row)
        out["matrix"]["n"].append(n_row)
    probe = [r["seconds"]["probe"] for r in rows]
    gen = [(r["seconds"]["train"] or 0) + (r["seconds"]["eval"] or 0) for r in rows]
    if rows and all(p is not None for p in probe):
        out["cost"] = {"configurations": len(rows), "probe_s": sum(probe), "train_eval_s": sum(gen),
                       "train_s": sum(r["seconds"]["train"] or 0 for r in rows),
                       "eval_s": sum(r["seconds"]["eval"] or 0 for r in rows),
                       "ratio": sum(gen) / sum(probe) if sum(probe) > 0 else None}
    return out


def _fmt(v, digits=3, sign=False):
    return "-" if v is None else f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _mean_se(v, digits=3):
    return "-" if v is None else f"{v['mean']:+.{digits}f} ± {_fmt(v['se'], digits)}"


def robustness_markdown(a, cols):
    """The leave-one-encoder-or-family-out, family-alone and DiT-seed tables of sweep_analysis.md."""
    left_out = list(dict.fromkeys(e for k, m in cols for e in a["leave_one_out"][k][m]))
    lines = ["", "## Leave one encoder or family out, or keep one family alone: Pearson r / Spearman rho of TED", "",
             "| kind | measure | " + " | ".join(left_out) + " |",
             "|---|---|" + "---|" * len(left_out)]
    for kind, m in cols:
        loo = a["leave_one_out"][kind][m]
        lines.append(f"| {kind} | {MEASURES[m]} | " + " | ".join(
            f"{_fmt(loo[e]['pearson'], 2)} / {_fmt(loo[e]['spearman'], 2)} (n {loo[e]['n']})" if e in loo else "-"
            for e in left_out) + " |")
    lines += ["", "## The DiT's own seed noise vs the spread between configurations", "",
              "| kind | measure | configurations with >1 DiT seed | std over DiT seeds | configuration x seed std | "
              "std over configurations | r of TED, each DiT seed | r of TED, mean of the DiT seeds |",
              "|---|---|---|---|---|---|---|---|"]
    for kind, m in cols:
        sn = a["dit_seed_noise"][kind][m]
        seeds = ", ".join(f"{_fmt(r, 2)} (seed {s})" for s, r in zip(sn["seeds"], sn["r_each_seed"]))
        lines.append(f"| {kind} | {MEASURES[m]} | {sn['configurations_with_seeds']} | {_fmt(sn['seed_std'])} | "
                     f"{_fmt(sn['interaction_std'])} | {_fmt(sn['between_std'])} | {seeds or '-'} | "
                     f"{_fmt(sn['r_seed_mean'], 2)} (n {sn['n_common']}) |")
    lines += ["", "The r columns use the configurations that ran every DiT seed listed: if the DiT's seed noise "
                  "hides a relation, r on their mean is expected above r on any one seed."]
    return lines


def markdown(sweep, a):
    rows = sweep["configurations"]
    s = sweep["settings"]
    cols = list(itertools.product(KINDS, MEASURES))

    def measures(g):
        return " | ".join(_mean_se(g.get(k, {}).get(m, {}).get("all")) for k, m in cols)

    lines = ["# Does TED predict generation?", "",
             f"{len(rows)} configurations; DiT {s['steps']} steps each, the same recipe; TED: mean ± std over "
             f"{len(s['seeds'])} aggregator seeds; generation: 06 --eval over all aspects ± s.e. (classifier "
             f"accuracy on the held-out scenes; the guided samples' paired gains over a mismatched prompt and over "
             f"the empty-caption floor), {s['eval_images']} image / {s['eval_videos']} video prompts x "
             f"{s['eval_seeds']} seeds." + (" **Smoke sizes: not a result.**" if s["smoke"] else ""), "",
             "| configuration | TED overall (%) | TED beyond words (%) | "
             + " | ".join(f"{k} {MEASURES[m]}" for k, m in cols) + " | 02 s | 05+06 s |",
             "|---|---|---|" + "---|" * len(cols) + "---|---|"]
    for r in rows:
        g, sec = r["generation"], r["seconds"]
        beyond = r["ted"].get("beyond_words")
        lines.append(f"| {r['name']} | {r['ted']['overall']:.2f} ± {_fmt(r['ted']['std'], 2)} | "
                     + ("-" if beyond is None else f"{beyond:.2f} ± {_fmt(r['ted']['beyond_words_std'], 2)}") + " | "
                     + measures(g) + f" | {sec['probe']:.0f} | {(sec['train'] or 0) + (sec['eval'] or 0):.0f} |")
        for seed, x in sorted(r.get("dit_seeds", {}).items()):  # the same encoder, another DiT seed
            lines.append(f"| {r['name']} (DiT seed {seed}) | | | " + measures(x["generation"]) + " | | |")
    lines += ["", "## TED overall vs each generation measure", "",
              "| TED | kind | measure | n | Pearson r [95% CI] | p | Spearman rho [95% CI] | p |",
              "|---|---|---|---|---|---|---|---|"]
    for key, what in (("correlation", "trained"), ("correlation_zero_shot", "zero-shot"),
                      ("correlation_beyond_words", "trained, beyond words")):
        for kind, m in cols:
            c = a[key][kind][m]
            cells = []
            for name in ("pearson", "spearman"):
                v = c[name]
                ci = f" [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]" if v["ci95"] else ""
                cells += [f"{_fmt(v['value'], 2)}{ci}", "-" if v["p"] is None else f"{v['p']:.2g}"]
            task = "T2I (image)" if kind == "image" else "T2V (video)"
            lines.append(f"| {what} | {task} | {MEASURES[m]} | {c['n']} | " + " | ".join(cells) + " |")
    lines += ["", f"Intervals: percentile bootstrap over configurations, {a['bootstrap']['resamples']} resamples, "
                  f"seed {a['bootstrap']['seed']} (resamples with a constant side dropped). p: "
                  f"scipy.stats.pearsonr / spearmanr; the permutation p is in sweep_analysis.json. Paper: r = 0.99 "
                  f"over 6 T2I configurations (p = 1.1e-4), 0.96 over 4 T2V."]
    lines += robustness_markdown(a, cols)
    m = a["matrix"]
    lines += ["", "## Pearson r: TED statement type (rows) vs classifier aspect (columns)", "",
              "| type | " + " | ".join(m["columns"]) + " |", "|---|" + "---|" * len(m["columns"])]
    lines += [f"| {t} | " + " | ".join(_fmt(v, 2) for v in vals) + " |" for t, vals in zip(m["rows"], m["r"])]
    c = a["cost"]
    if c:
        lines += ["", "## Cost of ranking the configurations", "",
                  f"02 (TED): {c['probe_s']:.0f} s in all; 05 + 06 (train {c['train_s']:.0f} s + eval "
                  f"{c['eval_s']:.0f} s): {c['train_eval_s']:.0f} s; ratio {_fmt(c['ratio'], 1)}x "
                  f"(paper: ~750x). Wall seconds of each stage's process, {c['configurations']} configurations."]
    return "\n".join(lines) + "\n"


def plot_scatter(sweep, a, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sweep["configurations"]
    fig, axes = plt.subplots(len(KINDS), len(MEASURES), figsize=(6 * len(MEASURES), 5 * len(KINDS)), squeeze=False)
    for (i, kind), (j, m) in itertools.product(enumerate(KINDS), enumerate(MEASURES)):
        ax = axes[i, j]
        for r in rows:
            g = r["generation"].get(kind, {}).get(m)
            if g is None:
                continue
            y = g["all"]["mean"]
            ax.errorbar(r["ted"]["overall"], y, xerr=r["ted"]["std"] or 0, yerr=g["all"]["se"] or 0, fmt="o", capsize=3)
            ax.annotate(r["name"], (r["ted"]["overall"], y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        c = a["correlation"][kind][m]
        ax.set_title(f"{'T2I' if kind == 'image' else 'T2V'} {MEASURES[m]}: r = {_fmt(c['pearson']['value'], 2)}, "
                     f"rho = {_fmt(c['spearman']['value'], 2)} (n = {c['n']})", fontsize=9)
        ax.set_xlabel("TED-6K accuracy (%), ± seed std")
        ax.set_ylabel(f"{kind} {MEASURES[m]}, ± s.e.")
        if m != "classifier":
            ax.axhline(0, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def plot_heatmap(a, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m = a["matrix"]
    vals = np.array([[np.nan if v is None else v for v in row] for row in m["r"]], float).reshape(
        len(m["rows"]), len(m["columns"]))
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(m["columns"]), 1.2 + 0.45 * len(m["rows"])))
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(m["columns"])), m["columns"], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(m["rows"])), m["rows"], fontsize=8)
    for i, j in itertools.product(range(vals.shape[0]), range(vals.shape[1])):
        if not np.isnan(vals[i, j]):
            ax.text(j, i, f"{vals[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(vals[i, j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="Pearson r over configurations")
    ax.set_title("TED statement type vs diffusion-classifier aspect")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_analysis(sweep_path, n_boot=10000):
    """From sweep.json (or a kept table, e.g. docs/sweep.json) alone: sweep_analysis.json, sweep_analysis.md,
    sweep_scatter.png and sweep_heatmap.png beside it (the table's name first); the analysis and its markdown."""
    sweep_path = Path(sweep_path)
    if sweep_path.is_dir():
        sweep_path = sweep_path / "sweep.json"
    if not sweep_path.is_file():
        raise DataError(f"{sweep_path}: no such sweep table")
    sweep = plumbing.read_json(sweep_path)
    if not isinstance(sweep, dict) or not isinstance(sweep.get("configurations"), list):
        raise DataError(f"{sweep_path}: not a sweep table (no 'configurations' list)")
    try:  # the whole analysis in memory first: a table it cannot read replaces nothing
        a = analyse(sweep, n_boot)
        text = markdown(sweep, a)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{sweep_path}: not a sweep table this script wrote ({type(e).__name__}: "
                        f"{plumbing.first_line(e)})") from None
    def beside(name):
        return sweep_path.with_name(f"{sweep_path.stem}_{name}")
    plumbing.atomic_write_json(beside("analysis.json"), a)
    plumbing.atomic_write_text(beside("analysis.md"), text)
    if sweep["configurations"]:
        plumbing.atomic_write(beside("scatter.png"), lambda tmp: plot_scatter(sweep, a, tmp))
        plumbing.atomic_write(beside("heatmap.png"), lambda tmp: plot_heatmap(a, tmp))
    return a, text


#################################################################################
#                                      Main                                     #
#################################################################################

def main(argv=None):
    args = parse_args(argv)
    if args.analyse_only:
        print(write_analysis(args.analyse_only, args.bootstrap)[1])
        return
    chosen, table = select(args)
    if args.list:
        for c in table:
            print(f"{c.name}: --encoder {c.encoder} --fusion {c.strategy}")
        return
    settings = check_settings(args)
    if args.own_world:
        ready = Path(args.eval_data).is_file() and Path(args.benchmark).is_file()
        if ready:
            print(f"01 world: kept ({args.out / 'world'})")
        elif args.dry_run:
            print(f"01 world:\n  $ {shlex.join(world_command(args.out))}")
        else:
            print("01 world", flush=True)
            run_stage(world_command(args.out), args.out / "world.log", "01", cwd=ROOT)
    t0 = time.time()
    for i, cfg in enumerate(chosen, 1):
        label = f"[{i}/{len(chosen)} {cfg.name}]"
        if run_config(args, cfg, label):
            write_table(args, settings, table)  # after every finished configuration
    if args.dry_run:
        return
    sweep = write_table(args, settings, table)
    text = write_analysis(args.out / "sweep.json", args.bootstrap)[1]
    print(f"\n{len(sweep['configurations'])} configurations in {args.out / 'sweep.json'} "
          f"({time.time() - t0:.0f} s this run); pending: {', '.join(sweep['pending']) or 'none'}\n")
    print(text)


if __name__ == "__main__":
    plumbing.run_cli(main)
