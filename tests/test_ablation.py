"""experiments/ablation_layer_weights.py: the smoke ablation end to end (kept on a rerun, stopped runs resumed),
the table recomputed from the eval.json files, its statistics on tables whose answers are known, and bad flags."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

import common
from plumbing import DataError
from tests.cli import assert_one_line, cli_error, run_stages_here, script_error

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "ablation_layer_weights.py"
_spec = importlib.util.spec_from_file_location("ablation_layer_weights", SCRIPT)
abl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(abl)


@pytest.fixture
def stages(monkeypatch):
    return run_stages_here(monkeypatch, abl)


def contents(folder):
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def recompute(out, seeds, measure):
    """Per arm, kind and seed the mean over aspects of one of eval.json's measures, read directly."""
    got = {}
    for arm in abl.ARMS:
        for seed in seeds:
            report = json.loads((out / f"seed_{seed}" / arm / "eval" / "eval.json").read_text())
            values = report["classifier"]["results"] if measure == "classifier" else report[f"gain over {measure}"]
            for kind in ("image", "video"):
                vals = [v["mean"] for a, v in values[kind].items()
                        if a not in ("all", "questions") and v["mean"] is not None]
                got[arm, kind, seed] = sum(vals) / len(vals)
    return got


def check_measure(measure, got):
    """One measure's part of table.json against the values recomputed from the eval files (seeds 0 and 1)."""
    for arm in abl.ARMS:
        for kind in ("image", "video"):
            t = measure["arms"][arm][kind]
            per_seed = [got[arm, kind, s] for s in (0, 1)]
            assert [t["per_seed"][str(s)] for s in (0, 1)] == pytest.approx(per_seed, abs=1e-12)
            assert t["mean"] == pytest.approx(np.mean(per_seed), abs=1e-12)
            assert t["se"] == pytest.approx(np.std(per_seed, ddof=1) / math.sqrt(2), abs=1e-12) and t["n"] == 2
    for a, b in abl.PAIRS:
        for kind in ("image", "video"):
            diffs = [got[a, kind, s] - got[b, kind, s] for s in (0, 1)]
            c = measure["differences"][f"{a} - {b}"][kind]
            assert c["mean"] == pytest.approx(np.mean(diffs), abs=1e-12) and c["n"] == 2
            assert c["se"] == pytest.approx(np.std(diffs, ddof=1) / math.sqrt(2), abs=1e-12)


#################################################################################
#                  The smoke ablation: run, kept, resumed, analysed             #
#################################################################################

def test_smoke_ablation_keeps_finished_runs_resumes_stopped_ones_and_the_table_is_the_eval_files(tmp_path, stages,
                                                                                                   capsys):
    out = tmp_path / "abl"
    flags = ["--smoke", "--out", str(out), "--threads", "1"]
    abl.main(flags)
    assert [Path(c[1]).name for c in stages] == ["01_build_ted6k.py"] + [
        "05_train_diffusion.py", "06_sample.py", "04_train_layer_weights.py", "06_sample.py",
        "04_train_layer_weights.py", "05_train_diffusion.py", "06_sample.py"] * 2
    for seed in (0, 1):
        d = out / f"seed_{seed}"
        for arm in abl.ARMS:
            assert abl.dit_done(6, d / arm) and abl.eval_done(6, d / arm), (seed, arm)
            assert (d / arm / "logs").is_dir() and (d / arm / "seconds.json").is_file()
        # the same seed and recipe in every arm: the same DiT init, data order and noise
        base = json.loads((d / "norm-avg" / "args.json").read_text())
        assert base["seed"] == seed and base["steps"] == 6 and base["lr"] == 5e-4
        for arm in ("continuous", abl.JOINT, "two-step"):
            args = json.loads((d / arm / "args.json").read_text())
            keys = [k for k in base if k in args and k not in common.NOW_ONLY + ("fusion",)]
            assert len(keys) > 15 and {k: args[k] for k in keys} == {k: base[k] for k in keys}, arm
        assert json.loads((d / abl.JOINT / "summary.json").read_text())["frozen_at"] == 4  # 2/3 of 6

    # table.json is what the eval.json files give, recomputed here directly.
    table = json.loads((out / "table.json").read_text())
    assert table["seeds"] == [0, 1] and table["pending"] == []
    for m in abl.MEASURES:
        check_measure(table["measures"][m], recompute(out, (0, 1), m))
    assert table["freeze"]["1"] == {"frozen_at": 4, "reason": "reached step 4", "planned_steps": 6}
    assert "step 4 of 6 (reached step 4)" in (out / "table.md").read_text()
    fig4 = out / "table_fig4.png"
    assert fig4.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig4.stat().st_size > 10000
    assert table["layer_weights"]["continuous"]["1"]["weights"] == json.loads(
        (out / "seed_1/continuous/summary.json").read_text())["weights"]

    # A rerun launches nothing and changes nothing (logs included) but the analysis it rewrites.
    before = {p: b for p, b in contents(out).items() if p.parent != out}
    stages.clear()
    abl.main(flags)
    assert stages == [] and {p: b for p, b in contents(out).items() if p.parent != out} == before
    assert "[seed 1 two-step] 05 train: kept (step 6)" in capsys.readouterr().out

    # Killed runs: seed 1's norm-avg after its step-3 checkpoint, its two-step in the first half (04) after step 3.
    d = out / "seed_1"
    (d / "norm-avg/checkpoints/step_00000006.pt").unlink()
    (d / abl.JOINT / "checkpoints/step_00000004.pt").unlink()
    for p in sorted((d / "two-step").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    kept = {p: b for p, b in contents(out / "seed_0").items()}
    capsys.readouterr()
    abl.main(flags)
    printed = capsys.readouterr().out
    assert [(Path(c[1]).name, c[c.index("--out") + 1]) for c in stages] == [
        ("05_train_diffusion.py", str(d / "norm-avg")), ("06_sample.py", str(d / "norm-avg/eval")),
        ("04_train_layer_weights.py", str(d / abl.JOINT)), ("05_train_diffusion.py", str(d / "two-step")),
        ("06_sample.py", str(d / "two-step/eval"))]
    assert "[seed 1 norm-avg] 05 train (resumes from step 3)" in printed
    assert "[seed 1 two-step] 04 joint (resumes from step 3)" in printed
    assert "[seed 1 continuous] 06 eval: kept" in printed
    assert "continuing" in (d / "norm-avg/logs/05_train.log").read_text().split("$ ")[-1]  # 05 took up step 3
    assert "at step 3" in (d / abl.JOINT / "logs/04_train.log").read_text().split("$ ")[-1]
    assert contents(out / "seed_0") == kept
    assert abl.dit_done(6, d / "two-step") and abl.eval_done(6, d / "norm-avg")
    table = json.loads((out / "table.json").read_text())
    assert table["measures"]["floor"]["arms"]["norm-avg"]["image"]["per_seed"]["1"] == pytest.approx(
        recompute(out, (1,), "floor")["norm-avg", "image", 1], abs=1e-12)

    # --analyse-only rebuilds the same table from the files alone, and its markdown and Fig. 4 from a kept table.
    (out / "table.json").unlink()
    (out / "table_fig4.png").unlink()
    abl.main(["--analyse-only", str(out)])
    assert json.loads((out / "table.json").read_text()) == table and (out / "table_fig4.png").is_file()
    kept = tmp_path / "kept" / "table5.json"
    kept.parent.mkdir()
    kept.write_text((out / "table.json").read_text())
    abl.main(["--analyse-only", str(kept)])
    assert (kept.parent / "table5.md").read_text() == (out / "table.md").read_text()
    assert (kept.parent / "table5_fig4.png").stat().st_size > 10000


#################################################################################
#                          Statistics with known answers                        #
#################################################################################

def test_paired_difference_on_a_known_table():
    # per-seed differences 1, 2, 3: mean 2, sample std 1, s.e. 1/sqrt(3); seed 3 has no partner and is left out
    c = abl.paired_difference({0: 3.0, 1: 5.0, 2: 7.0, 3: 100.0}, {0: 2.0, 1: 3.0, 2: 4.0})
    assert c["mean"] == pytest.approx(2.0) and c["se"] == pytest.approx(1 / math.sqrt(3))
    assert c["n"] == 3 and c["positive"] == 3 and list(c["per_seed"]) == [0, 1, 2]
    one = abl.paired_difference({"4": 1.0}, {"4": 1.5})
    assert one["mean"] == pytest.approx(-0.5) and one["se"] is None and one["n"] == 1 and one["positive"] == 0
    assert abl.paired_difference({}, {"0": 1.0}) == {"mean": None, "se": None, "n": 0, "positive": 0, "per_seed": {}}


def test_analyse_on_a_hand_made_table():
    # two aspects per run, so each seed's aspect mean is the midpoint; two-step beats norm-avg by 0.1 on
    # seed 0 and 0.3 on seed 1 (mean 0.2, s.e. 0.1); continuous has seed 0 only
    g = {"norm-avg": {"0": {"image": {"colour": 0.2, "count": 0.0}}, "1": {"image": {"colour": 0.4, "count": 0.2}}},
         "two-step": {"0": {"image": {"colour": 0.3, "count": 0.1}}, "1": {"image": {"colour": 0.7, "count": 0.5}}},
         "continuous": {"0": {"image": {"colour": 0.0, "count": 0.0}}}}
    ses = {"norm-avg": {"0": {"image": 0.02}, "1": {"image": 0.04}}}
    t = abl.analyse(g, ses)
    na = t["arms"]["norm-avg"]["image"]
    assert na["per_seed"] == pytest.approx({"0": 0.1, "1": 0.3}) and na["mean"] == pytest.approx(0.2)
    assert na["se"] == pytest.approx(0.1) and na["eval_se"] == pytest.approx(0.03)
    assert na["aspects"]["colour"]["mean"] == pytest.approx(0.3) and na["aspects"]["colour"]["se"] == pytest.approx(0.1)
    d = t["differences"]["two-step - norm-avg"]["image"]
    assert d["mean"] == pytest.approx(0.2) and d["se"] == pytest.approx(0.1) and d["n"] == 2 and d["positive"] == 2
    c = t["differences"]["two-step - continuous"]["image"]
    assert c["n"] == 1 and c["mean"] == pytest.approx(0.2) and c["se"] is None
    assert t["arms"]["norm-avg"]["video"]["n"] == 0 and t["differences"]["continuous - norm-avg"]["video"]["n"] == 0


def test_run_gains_leaves_out_aspects_without_a_value():
    report = {"gain over floor": {
        "image": {"colour": {"mean": 0.3, "se": 0.03}, "count": {"mean": 0.1, "se": 0.04},
                  "motion": {"mean": None, "se": None}},
        "video": {"colour": {"mean": None, "se": None}}}}
    gains, ses = abl.run_gains(report)
    assert gains == {"image": {"colour": 0.3, "count": 0.1}}
    assert ses["image"] == pytest.approx(0.05 / 2)  # sqrt(0.03^2 + 0.04^2) / 2 aspects
    # the classifier's table has the same shape, and its "all" (over questions) gives the s.e., not the mean
    report["classifier"] = {"results": {"image": {"colour": {"mean": 0.5, "se": 0.1}, "count": {"mean": 1.0, "se": 0.0},
                                                  "all": {"mean": 0.6, "se": 0.07}}}}
    gains, ses = abl.run_gains(report, "classifier")
    assert gains == {"image": {"colour": 0.5, "count": 1.0}} and ses == {"image": 0.07}


#################################################################################
#                         The runner, bad flags, reruns                         #
#################################################################################

def test_the_real_runner_logs_and_a_failing_stage_is_one_line(tmp_path):
    log = tmp_path / "logs/x.log"
    assert abl.run_stage([sys.executable, "-c", "print('hello')"], log, "x") >= 0
    with pytest.raises(DataError, match=r"^seed 0 x failed \(exit 3\): it broke \(log: "):
        abl.run_stage([sys.executable, "-c", "import sys; print('it broke'); sys.exit(3)"], log, "seed 0 x")
    text = log.read_text()
    assert text.count("$ ") == 2 and "hello" in text and "it broke" in text  # appended, not overwritten


def test_a_bad_flag_from_the_real_command_line_is_one_line(tmp_path):
    code, err = script_error("experiments/ablation_layer_weights.py",
                             ["--smoke", "--out", str(tmp_path / "a"), "--seeds", "0", "1", "0"])
    assert_one_line(code, err, "--seeds: 0 is given twice")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "argument --steps: 0 is out of range"),
    (["--seeds", "-1"], "argument --seeds: -1 is out of range"),
    (["--train-args", "--hidden '64"], "--train-args: No closing quotation"),
    (["--analyse-only", "nowhere"], "no ablation here (no settings.json)"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, argv, message):
    assert_one_line(*cli_error(abl.main, ["--smoke", "--out", str(tmp_path / "a"), *argv], capsys), message)


def test_a_json_that_is_not_a_table_is_one_line(tmp_path, capsys):
    bad = tmp_path / "table5.json"
    bad.write_text('{"settings": {"encoder": "x"}}')
    assert_one_line(*cli_error(abl.main, ["--analyse-only", str(bad)], capsys), "not a table this script wrote")
    assert not (tmp_path / "table5.md").exists()


def test_a_rerun_with_another_recipe_is_refused_and_a_dry_run_writes_nothing(tmp_path, capsys):
    abl.main(["--smoke", "--out", str(tmp_path / "dry"), "--dry-run"])
    printed = capsys.readouterr().out
    assert not (tmp_path / "dry").exists()
    assert printed.count("04_train_layer_weights.py") == 4 and printed.count("--init-from") == 2
    abl.check_settings(abl.parse_args(["--smoke", "--out", str(tmp_path / "a")]))
    code, err = cli_error(abl.main, ["--smoke", "--out", str(tmp_path / "a"), "--steps", "7"], capsys)
    assert_one_line(code, err, "holds an ablation made with --steps 6, not 7")
    code, err = cli_error(abl.main, ["--smoke", "--out", str(tmp_path / "a"), "--encoder", "tiny-t5"], capsys)
    assert_one_line(code, err, "holds an ablation made with --encoder 'tiny-qwen3', not 'tiny-t5'")
