"""experiments/sweep_ted_vs_generation.py: the smoke sweep end to end (run, kept, resumed), the analysis
recomputed from sweep.json, its statistics on tables whose answers are known, and bad flags."""
import importlib
import importlib.util
import itertools
import json
import random
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from plumbing import DataError
from tests.cli import assert_one_line, cli_error, run_stages_here, script_error

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "sweep_ted_vs_generation.py"
_spec = importlib.util.spec_from_file_location("sweep_ted_vs_generation", SCRIPT)
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

A, B, C = (c.name for c in sweep.SMOKE_CONFIGS)


@pytest.fixture
def stages(monkeypatch):
    return run_stages_here(monkeypatch, sweep)


def run_sweep(capsys, *argv):
    """What the sweep printed; it must succeed."""
    capsys.readouterr()
    sweep.main(list(argv))
    return capsys.readouterr().out


def mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def midranks(v):
    """Ranks with ties at their average, counted directly (not the script's ranks())."""
    return np.array([(v < e).sum() + ((v == e).sum() + 1) / 2 for e in v])


def command_after(stdout, header):
    """The command the dry run printed under the line starting with `header`."""
    lines = stdout.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header))
    assert lines[i + 1].startswith("  $ "), lines[i:i + 2]
    return shlex.split(lines[i + 1][4:])


#################################################################################
#                    The smoke sweep: run, kill, resume, analyse                #
#################################################################################

def test_smoke_sweep_keeps_finished_runs_resumes_a_stopped_dit_and_analysis_recomputes(tmp_path, stages, capsys):
    out = tmp_path / "sweep"
    flags = ["--smoke", "--out", str(out), "--threads", "1"]
    first = run_sweep(capsys, *flags, "--only", A)
    a_dir = out / "configs" / A
    assert (a_dir / "probe/results.json").is_file() and (a_dir / "eval/eval.json").is_file()
    assert [r["name"] for r in json.loads((out / "sweep.json").read_text())["configurations"]] == [A]
    assert "02 probe" in first and "05 train (from scratch)" in first
    kept_a = mtimes(a_dir / "probe") | mtimes(a_dir / "dit") | mtimes(a_dir / "eval")

    # The dry run prints what is left and runs nothing; B's DiT is then stopped at step 3 of 6, as a kill would.
    before = mtimes(out)
    dry = run_sweep(capsys, *flags, "--dry-run")
    assert mtimes(out) == before
    assert f"[1/3 {A}] 02 probe: kept" in dry and f"[1/3 {A}] 05 train: kept (step 6)" in dry
    assert f"[1/3 {A}] 06 eval: kept" in dry
    stop = command_after(dry, f"[2/3 {B}] 05 train (from scratch)")
    importlib.import_module("05_train_diffusion").main(stop[2:] + ["--stop-at", "3"])
    step3 = out / "configs" / B / "dit/checkpoints/step_00000003.pt"
    assert step3.is_file() and not step3.with_name("step_00000006.pt").exists()
    step3_mtime = step3.stat().st_mtime_ns

    full = run_sweep(capsys, *flags)
    ran = [line for line in full.splitlines() if line.startswith("  $ ")]
    assert not any(f"/configs/{A}/" in line for line in ran), ran  # nothing of A redone
    assert {k: v for k, v in mtimes(a_dir).items() if k in kept_a} == kept_a
    assert f"[2/3 {B}] 05 train (resumes from step 3)" in full
    assert step3.stat().st_mtime_ns == step3_mtime and step3.with_name("step_00000006.pt").is_file()
    assert "continuing" in (out / "configs" / B / "logs/05_train.log").read_text()  # 05 said it resumed at 3

    table = json.loads((out / "sweep.json").read_text())
    rows = table["configurations"]
    assert [r["name"] for r in rows] == [A, B, C] and table["pending"] == []
    for r in rows:
        assert r["ted"]["seeds"] == 2 and r["ted"]["std"] is not None and r["dit_step"] == 6
        assert r["commit"].split("+")[0] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                                           capture_output=True).stdout.strip()
        assert set(r["generation"]) == {"image", "video"}
        res = json.loads((out / "configs" / r["name"] / "probe/results.json").read_text())
        assert r["ted"]["beyond_words"] == res["encoders"][r["encoder"]]["strategies"][r["strategy"]]["beyond_words"]
        assert r["ted"]["beyond_words_questions"] == res["benchmark"]["beyond_words"] > 0
        ev = json.loads((out / "configs" / r["name"] / "eval/eval.json").read_text())
        for kind in ("image", "video"):  # each measure as 06 wrote it
            g = r["generation"][kind]
            assert g["floor"]["all"] == ev["gain over floor"][kind]["all"]
            assert g["mismatched"]["all"] == ev["gain over mismatched"][kind]["all"]
            assert g["classifier"]["all"]["mean"] == ev["classifier"]["results"][kind]["all"]["mean"]
            assert set(g["classifier"]["aspects"]) <= set(sweep.ASPECTS)
        assert all(r["seconds"][k] > 0 for k in ("probe", "train", "eval"))

    # The analysis on disk is what the table alone gives: r as numpy computes it, the same cost sums.
    analysis = json.loads((out / "sweep_analysis.json").read_text())
    x = np.array([r["ted"]["overall"] for r in rows])
    for kind, m in itertools.product(("image", "video"), sweep.MEASURES):
        y = np.array([r["generation"][kind][m]["all"]["mean"] for r in rows])
        got = analysis["correlation"][kind][m]["pearson"]["value"]
        if np.ptp(y) == 0:
            assert got is None
        else:
            assert got == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
            ranked = np.corrcoef(midranks(x), midranks(y))[0, 1]
            assert analysis["correlation"][kind][m]["spearman"]["value"] == pytest.approx(ranked, abs=1e-12)
    probe = sum(r["seconds"]["probe"] for r in rows)
    gen = sum(r["seconds"]["train"] + r["seconds"]["eval"] for r in rows)
    assert analysis["cost"]["ratio"] == pytest.approx(gen / probe)
    assert (out / "sweep_scatter.png").stat().st_size > 1000 and (out / "sweep_heatmap.png").stat().st_size > 1000
    assert "Pearson r" in (out / "sweep_analysis.md").read_text()

    # --analyse-only rebuilds the same analysis from sweep.json alone.
    (out / "sweep_analysis.json").unlink()
    run_sweep(capsys, "--analyse-only", str(out / "sweep.json"))
    assert json.loads((out / "sweep_analysis.json").read_text()) == analysis

    # A second DiT seed for A: its own 05 and 06 beside the kept probe and seed-0 DiT, in A's row.
    kept_a = mtimes(a_dir / "probe") | mtimes(a_dir / "dit") | mtimes(a_dir / "eval")
    second = run_sweep(capsys, *flags, "--only", A, "--dit-seed", "1")
    assert f"[1/1 {A}] 02 probe: kept" in second and "05 train (from scratch)" in second
    assert {k: v for k, v in mtimes(a_dir).items() if k in kept_a} == kept_a
    assert "--seed 1" in (a_dir / "logs/05_train_seed1.log").read_text()
    row = json.loads((out / "sweep.json").read_text())["configurations"][0]
    ev1 = json.loads((a_dir / "eval_seed1/eval.json").read_text())
    assert set(row["dit_seeds"]) == {"1"} and row["dit_seeds"]["1"]["generation"] == sweep.generation(ev1)
    assert row["dit_seeds"]["1"]["commit"] == row["commit"]
    assert json.loads((a_dir / "seconds.json").read_text())["train_seed1"] > 0
    noise = json.loads((out / "sweep_analysis.json").read_text())["dit_seed_noise"]["image"]["floor"]
    y = [row["generation"]["image"]["floor"]["all"]["mean"],
         row["dit_seeds"]["1"]["generation"]["image"]["floor"]["all"]["mean"]]
    assert noise["configurations_with_seeds"] == 1 and noise["seed_std"] == pytest.approx(np.std(y, ddof=1))

    # A fresh checkout continues the committed table: B's folder and settings.json are gone, sweep.json stays.
    # B's row stands for its probe and seed-0 DiT; a second DiT seed joins it; a rerun redoes nothing.
    before = json.loads((out / "sweep.json").read_text())
    shutil.rmtree(out / "configs" / B)
    (out / "settings.json").unlink()
    again = run_sweep(capsys, *flags, "--only", B, "--dit-seed", "1")
    assert f"[1/1 {B}] 02 probe: kept ({out / 'sweep.json'})" in again and "02_probe_encoders.py" not in again
    after = json.loads((out / "sweep.json").read_text())
    assert after["settings"] == before["settings"] == json.loads((out / "settings.json").read_text())
    b_before, b_after = before["configurations"][1], after["configurations"][1]
    assert set(b_after["dit_seeds"]) == {"1"} and b_after["dit_seeds"]["1"]["commit"] is not None
    assert {**b_after, "dit_seeds": {}} == {**b_before, "dit_seeds": {}}
    assert after["configurations"][::2] == before["configurations"][::2]
    assert "  $ " not in run_sweep(capsys, *flags, "--dry-run")


#################################################################################
#                          Statistics with known answers                        #
#################################################################################

def make_table(xs, ys):
    """A sweep.json-shaped table: TED overall xs (Quantity = -xs), every generation measure ys for both kinds."""
    rows = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        cell = {"all": {"mean": y, "se": 0.01, "n": 8}, "aspects": {"colour": {"mean": y, "se": 0.01, "n": 8}}}
        gen = {k: {"prompts": 4, "seeds": 2, **{m: cell for m in sweep.MEASURES}} for k in ("image", "video")}
        rows.append({"name": f"c{i}", "encoder": f"e{i}", "family": "A" if 2 * i < len(xs) else "B",
                     "strategy": "norm-avg",
                     "ted": {"overall": x, "std": 0.5, "seeds": 3, "zero_shot": 60 - x, "beyond_words": x / 2,
                             "beyond_words_std": 0.5,
                             "by_type": {"Adjective": x, "Quantity": -x},
                             "by_type_std": {}, "by_caption_type": {}},
                     "generation": gen,
                     "seconds": {"probe": 1.0, "train": 40.0, "eval": 10.0}})
    return {"settings": {"steps": 10, "seeds": [0, 1, 2], "eval_images": 4, "eval_videos": 4, "eval_seeds": 2,
                         "smoke": False}, "configurations": rows}


def test_perfect_table_gives_r_1_and_a_shuffled_one_does_not(tmp_path):
    xs = [20.0, 25.0, 31.0, 34.0, 40.0, 47.0]
    a = sweep.analyse(make_table(xs, [0.01 * x + 0.2 for x in xs]), n_boot=2000)
    for kind, measure in itertools.product(("image", "video"), sweep.MEASURES):
        c = a["correlation"][kind][measure]
        assert c["pearson"]["value"] == pytest.approx(1.0) and c["spearman"]["value"] == pytest.approx(1.0)
        assert c["pearson"]["ci95"] == pytest.approx([1.0, 1.0]) and c["pearson"]["p"] < 0.01
        # exact over the 6! orderings: only the identity reaches r = 1; two-sided doubles it
        assert c["pearson"]["p_permutation"] == pytest.approx(2 / 720)
        zero_shot = a["correlation_zero_shot"][kind][measure]
        assert zero_shot["pearson"]["value"] == pytest.approx(-1.0)  # zero-shot = 60 - TED
        assert a["correlation_beyond_words"][kind][measure]["pearson"]["value"] == pytest.approx(1.0)  # TED / 2
    m = a["matrix"]
    assert m["r"][m["rows"].index("Quantity")][m["columns"].index("image colour")] == pytest.approx(-1.0)
    assert a["cost"]["ratio"] == pytest.approx(50.0)

    shuffled = [0.01 * x + 0.2 for x in xs]
    random.Random(3).shuffle(shuffled)
    s = sweep.analyse(make_table(xs, shuffled), n_boot=2000)["correlation"]["image"]["classifier"]
    assert s["pearson"]["value"] < 0.99 and s["spearman"]["value"] < 0.99
    assert s["pearson"]["value"] == pytest.approx(np.corrcoef(xs, shuffled)[0, 1])

    cubic = sweep.analyse(make_table(xs, [(x - 30) ** 3 for x in xs]), n_boot=200)["correlation"]["image"]["floor"]
    assert cubic["spearman"]["value"] == pytest.approx(1.0) and cubic["pearson"]["value"] < 0.99

    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(make_table(xs, shuffled)))
    sweep.write_analysis(path, n_boot=200)
    assert {p.name for p in tmp_path.iterdir()} >= {"sweep_analysis.json", "sweep_analysis.md", "sweep_scatter.png",
                                                    "sweep_heatmap.png"}


def test_leave_one_out_and_the_dit_seed_noise_on_known_tables():
    xs, ys = [20.0, 25.0, 31.0, 34.0, 40.0, 47.0], [0.1, 0.1, 0.1, 0.1, 0.1, 0.9]
    table = make_table(xs, ys)
    for i, r in enumerate(table["configurations"][:2]):  # a second DiT seed for two: +-0.2 from the first
        again = make_table([0.0], [ys[i] + (0.2 if i else -0.2)])["configurations"][0]["generation"]
        r["dit_seeds"] = {"1": {"generation": again, "commit": None}}
    a = sweep.analyse(table, n_boot=200)
    loo = a["leave_one_out"]["image"]["classifier"]
    assert loo["without e5"]["pearson"] is None and loo["without e5"]["n"] == 5  # the rest is constant
    assert loo["without e0"]["pearson"] == pytest.approx(np.corrcoef(xs[1:], ys[1:])[0, 1])
    assert loo["without B family"]["pearson"] is None and loo["without B family"]["n"] == 3  # A is constant
    assert loo["A family alone"]["pearson"] is None and loo["A family alone"]["n"] == 3
    assert loo["without A family"]["pearson"] == pytest.approx(np.corrcoef(xs[3:], ys[3:])[0, 1])
    assert loo["B family alone"] == loo["without A family"]
    noise = a["dit_seed_noise"]["video"]["mismatched"]
    assert noise["configurations_with_seeds"] == 2
    assert noise["seed_std"] == pytest.approx(np.sqrt(0.02))
    assert noise["interaction_std"] == pytest.approx(0.2)  # residuals +-0.1 over (2 - 1) x (2 - 1)
    assert noise["between_std"] == pytest.approx(np.std(ys, ddof=1))
    md = sweep.markdown(table, a)
    assert "without e5" in md and "without B family" in md and "B family alone" in md
    assert "| c1 (DiT seed 1) | | | +0.300 ± 0.010 |" in md
    table["configurations"][0]["dit_seeds"]["1"] = table["configurations"][1]["dit_seeds"]["1"]  # both +0.2
    shared = sweep.analyse(table, n_boot=20)["dit_seed_noise"]["video"]["mismatched"]
    assert shared["interaction_std"] == pytest.approx(0.0) and shared["seed_std"] > 0.1  # a shared shift cancels


def test_r_on_the_mean_of_dit_seeds_sees_through_their_noise():
    xs, noise = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.9, -1.2, 1.1, -0.8])
    table = make_table(list(xs), list(xs + noise))  # seed 0 and seed 1 err in opposite directions
    for r, y1 in zip(table["configurations"], xs - noise):
        r["dit_seeds"] = {"1": {"generation": make_table([0.0], [y1])["configurations"][0]["generation"]}}
    a = sweep.analyse(table, n_boot=20)
    sn = a["dit_seed_noise"]["image"]["classifier"]
    assert sn["seeds"] == ["0", "1"] and sn["n_common"] == 4
    assert sn["r_each_seed"] == pytest.approx([np.corrcoef(xs, xs + noise)[0, 1], np.corrcoef(xs, xs - noise)[0, 1]])
    assert max(sn["r_each_seed"]) < 0.9 and sn["r_seed_mean"] == pytest.approx(1.0)  # the mean is xs itself
    assert "| 0.64 (seed 0), 0.83 (seed 1) | 1.00 (n 4) |" in sweep.markdown(table, a)


def test_exact_permutation_p_and_constant_sides():
    # 4! = 24 orderings, fewer than the resamples: exact; only the identity reaches r = 1, doubled
    c = sweep.correlation([1, 2, 3, 4], [1, 8, 27, 64])
    assert c["spearman"]["value"] == pytest.approx(1.0) and c["spearman"]["p_permutation"] == pytest.approx(2 / 24)
    assert c["pearson"]["value"] < 1.0
    assert sweep.correlation([1, 2, 3], [5, 5, 5])["pearson"]["value"] is None


#################################################################################
#                                   Bad flags                                   #
#################################################################################

def test_unknown_configuration_is_one_line_from_the_real_command_line(tmp_path):
    code, err = script_error("experiments/sweep_ted_vs_generation.py",
                             ["--smoke", "--only", "nope", "--out", str(tmp_path / "s")])
    assert_one_line(code, err, "--only: unknown configuration 'nope'")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "argument --steps: 0 is out of range"),
    (["--only", f"{A},minilm-last"], "unknown configuration 'minilm-last'"),
    (["--train-args", "--hidden '64"], "--train-args: No closing quotation"),
    (["--analyse-only", "nowhere/sweep.json"], "no such sweep table"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, argv, message):
    assert_one_line(*cli_error(sweep.main, ["--smoke", "--out", str(tmp_path / "s"), *argv], capsys), message)


def test_a_rerun_with_another_recipe_is_refused_and_a_dry_run_writes_nothing(tmp_path, capsys):
    sweep.main(["--smoke", "--out", str(tmp_path / "dry"), "--dry-run"])
    printed = capsys.readouterr().out
    assert not (tmp_path / "dry").exists()
    for stage in ("01_build_ted6k.py", "02_probe_encoders.py", "05_train_diffusion.py", "06_sample.py"):
        assert stage in printed
    sweep.check_settings(sweep.parse_args(["--smoke", "--out", str(tmp_path / "s")]))
    code, err = cli_error(sweep.main, ["--smoke", "--out", str(tmp_path / "s"), "--steps", "7"], capsys)
    assert_one_line(code, err, "holds a sweep made with --steps 6, not 7")
    with pytest.raises(DataError, match="03_finetune_qwen3vl.py writes it"):
        args = sweep.parse_args(["--out", str(tmp_path / "full")])
        sweep.run_config(args, sweep.Config("x", "runs/no-such-model", "last", needs="03_finetune_qwen3vl.py"), "")


def test_a_sweep_killed_during_05_counts_that_attempt_up_to_its_newest_checkpoint(tmp_path, capsys):
    """All three stages kept on disk (stand-in files); seconds.json still says 05 was running when the sweep died."""
    import os
    args = sweep.parse_args(["--smoke", "--out", str(tmp_path)])
    cfg = sweep.SMOKE_CONFIGS[0]
    d, probe, dit, ev = sweep.folders(args, cfg.name)
    for path, text in [(probe / "results.json", "{}"), (dit / "checkpoints/step_00000006.pt", ""),
                       (dit / "model.safetensors", ""), (ev / "eval.json", '{"step": 6}'),
                       (d / "seconds.json", '{"probe": 2.0, "train": 10.0, "train_started": 1000.0}')]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    os.utime(dit / "checkpoints/step_00000006.pt", (1030.0, 1030.0))
    os.utime(dit / "model.safetensors", (1030.0, 1030.0))
    assert sweep.run_config(args, cfg, "")
    assert "$ " not in capsys.readouterr().out  # nothing re-run
    secs = json.loads((d / "seconds.json").read_text())
    assert secs == {"probe": 2.0, "train": 40.0, "train_interrupted": 1}
