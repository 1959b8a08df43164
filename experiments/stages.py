"""What the experiments share: a stage run as a logged subprocess, a run folder's recipe kept, the smoke
world and DiT, the commands of 01 and 06, and whether a DiT or its eval is done (so a rerun keeps it)."""
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import plumbing  # noqa: E402
from plumbing import DataError, newest_step  # noqa: E402

ASPECTS = ("colour", "count", "position", "shape", "motion", "speed")  # 06's order
KINDS = ("image", "video")
# 06's three measures of one run (docs/results.md, "The generation side's instruments")
MEASURES = {"classifier": "classifier accuracy", "mismatched": "prompt - mismatched", "floor": "prompt - floor"}


def measure_tables(report, measure):
    """{kind: {aspect or "all": {mean, se, ...}}} of one eval.json's `measure`; the classifier's is empty when
    06 ran without it."""
    return report.get("classifier", {}).get("results", {}) if measure == "classifier" else \
        report[f"gain over {measure}"]
SMOKE_WORLD = ["--bench-fraction", "0.02", "--t2x-images", "8", "--t2x-videos", "4", "--vqa", "4", "--pairs", "16",
               "--eval-scenes", "8", "--seed", "0"]
SMOKE_TRAIN = ["--size", "8", "--dit", "32x2", "--patch", "4x2", "--batch", "4:2", "--warmup", "0", "--ckpt-every", "3",
               "--log-every", "3", "--max-length", "32"]


def script(name):
    return [sys.executable, str(ROOT / name)]


def world_command(out):
    """01 building the smoke world into OUT/world."""
    world = out / "world"
    return script("01_build_ted6k.py") + ["--out", str(world / "ted6k"), "--world-out", str(world / "world"),
                                          *SMOKE_WORLD]


def eval_command(args, dit, out):
    return script("06_sample.py") + [
        "--eval", "--ckpt", str(dit), "--out", str(out), "--eval-data", args.eval_data,
        "--eval-images", str(args.eval_images), "--eval-videos", str(args.eval_videos),
        "--eval-seeds", str(args.eval_seeds), "--sample-steps", str(args.sample_steps), "--threads", str(args.threads),
        *args.eval_args]


def dit_done(steps, dit):
    return newest_step(dit) >= steps and (dit / "model.safetensors").is_file()


def eval_done(steps, dit, ev=None):
    """eval.json (in `ev`, else DIT/eval) exists, scores the last step and is newer than the DiT it scored."""
    path, model = (ev or dit / "eval") / "eval.json", dit / "model.safetensors"
    if not path.is_file() or not model.is_file():
        return False
    return plumbing.read_json(path).get("step") == steps and path.stat().st_mtime >= model.stat().st_mtime


def code_version():
    """The commit the stages run from ("+changes" when the checkout differs from it); None outside git."""
    def git(*words):
        return subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True)
    head = git("rev-parse", "HEAD")
    if head.returncode:
        return None
    edited = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+changes" if edited else "")


def resolve(args, paths, extra_args):
    """Every path flag absolute (given, else the smoke world's or the repo's default), and the extra-flag
    strings split into lists."""
    for key, (full, smoke) in paths.items():
        given = getattr(args, key)
        setattr(args, key, str(Path(given).resolve()) if given else str(smoke if args.smoke else ROOT / full))
    for key in extra_args:
        try:
            setattr(args, key, shlex.split(getattr(args, key)))
        except ValueError as e:
            raise DataError(f"--{key.replace('_', '-')}: {e}") from None
    return args


def keep_recipe(out, settings, what, dry_run=False):
    """OUT/settings.json: written on the first run, and a rerun whose recipe (the flags that change a result)
    differs from the one OUT's kept runs were made with is refused."""
    path = Path(out) / "settings.json"
    if path.is_file():
        old = plumbing.read_json(path)
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            k = diff[0]
            raise DataError(f"{out} holds {what} made with --{k.replace('_', '-')} {old.get(k)!r}, not "
                            f"{settings[k]!r}: rerun with its settings, or another --out")
    elif not dry_run:
        plumbing.atomic_write_json(path, settings)
    return settings


def run_stage(cmd, log_path, what, cwd=None):
    """Run one stage's command in `cwd`, its output appended to `log_path`; its wall seconds. A failure is
    one DataError line with the stage's last output line."""
    print(f"  $ {shlex.join(cmd)}", flush=True)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - t0
    if rc:
        lines = [x for x in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
        raise DataError(f"{what} failed (exit {rc}): {lines[-1].strip() if lines else 'no output'} "
                        f"(log: {log_path})")
    return seconds
