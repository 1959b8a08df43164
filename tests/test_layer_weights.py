"""04_train_layer_weights.py: the learned fusion starts at Norm-Avg, trains with the DiT, freezes for good,
and 05 --init-from continues the very same run."""
import importlib
import math

import pytest
import torch
from safetensors.torch import load_file

import models
from plumbing import DataError
from tests.cli import assert_one_line, cli_error, script_error
from tests.diffusion_stubs import TINY, make_world

lw = importlib.import_module("04_train_layer_weights")
t2x = importlib.import_module("05_train_diffusion")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def flags(tmp, data, *extra, out="out"):
    return ["--data", str(data), "--out", str(tmp / out), "--cache-dir", str(tmp.parent / "cache"), *TINY,
            "--weights-lr", "0.05", *extra]


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def first_freeze(seq, window=5, tol=1e-3, steps=200):
    """The first step at which the criterion fires on `seq(t)`, or None."""
    crit = models.FreezeCriterion(window, tol)
    for t in range(steps):
        if crit.update(seq(t)):
            return t
    return None


def test_freeze_criterion_triggers_on_converging_sequence_only():
    target = torch.tensor([0.1, 0.2, 0.3, 0.4])
    converging = first_freeze(lambda t: target + 0.5 ** t * torch.tensor([1.0, -1.0, 0.5, -0.5]))
    assert converging is not None and converging > 5, "must wait for a full window and then fire"
    oscillating = first_freeze(lambda t: target + 0.05 * math.sin(t / 3) * torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert oscillating is None
    drifting = first_freeze(lambda t: target + 1e-3 * t * torch.tensor([1.0, -1.0, 0.0, 0.0]))  # slow but steady
    assert drifting is None


def test_learned_fusion_at_init_is_norm_avg():
    h = torch.randn(5, 2, 7, 16) * torch.arange(1, 6)[:, None, None, None]
    learned = models.LayerFusion("learned", 5)
    assert torch.equal(learned.logits.detach(), torch.zeros(5))
    torch.testing.assert_close(learned(h), models.LayerFusion("norm-avg", 5)(h), rtol=0, atol=1e-6)


def test_weights_learn_then_stay_put_after_the_freeze(tmp_path, world):
    """Freeze at step 4 of 10 and train on (--run-to-end): the DiT moves on, the layer weights and their
    optimiser state do not."""
    argv = flags(tmp_path, world, "--steps", "10", "--ckpt-every", "4", "--freeze", "0.4", "--run-to-end")
    lw.main(argv + ["--stop-at", "4"])
    at4 = ckpt(tmp_path / "out/checkpoints/step_00000004.pt")
    lw.main(argv + ["--resume"])
    at8, at10 = (ckpt(tmp_path / f"out/checkpoints/step_{s:08d}.pt") for s in (8, 10))
    assert at10["frozen_at"] == 4 and at10["step"] == 10
    assert not torch.equal(at4["fusion"]["logits"], torch.zeros(4)), "weights learned before the freeze"
    assert torch.equal(at4["fusion"]["logits"], at10["fusion"]["logits"]), "frozen weights moved"
    assert any(not torch.equal(at8["model"][k], at10["model"][k]) for k in at10["model"]), "the DiT kept training"
    n_dit = len(at10["opt"]["param_groups"][0]["params"])
    assert [len(g["params"]) for g in at10["opt"]["param_groups"]] == [n_dit, 1], "the DiT, then the logits alone"
    logits_state = at10["opt"]["state"][n_dit]
    assert float(logits_state["step"]) == 4, "no optimiser updates after the freeze"
    assert torch.equal(logits_state["exp_avg"], at4["opt"]["state"][n_dit]["exp_avg"])
    exported = load_file(tmp_path / "out/model.safetensors")
    assert torch.equal(exported["fusion.logits"], at10["fusion"]["logits"])


def test_04_then_05_is_one_joint_then_frozen_run(tmp_path, world):
    """04 stops at its freeze; 05 --init-from (no shape, step or encoder flags, a DiT shape unlike 05's
    defaults) continues from the step 04 reached and ends bit for bit where one uninterrupted run ends."""
    shape = ["--dit", "64x3"]
    lw.main(flags(tmp_path, world, "--steps", "9", "--freeze", "0.5", *shape, out="stage2"))
    out = tmp_path / "stage2"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000005.pt"], "04 stops at the freeze"
    for name in ("layer_weights.pt", "model.safetensors", "weights.png", "summary.json", "args.json"):
        assert (out / name).is_file(), name
    w = models.load_layer_weights(out / "layer_weights.pt", "tiny-qwen3", 4)
    frozen = ckpt(out / "checkpoints/step_00000005.pt")
    torch.testing.assert_close(w, torch.softmax(frozen["fusion"]["logits"], 0))
    with pytest.raises(DataError, match="layer weights are for encoder 'tiny-qwen3' with 4 layers"):
        models.load_layer_weights(out / "layer_weights.pt", "another-encoder", 4)

    t2x.main(["--init-from", str(out), "--out", str(tmp_path / "stage2b"), "--cache-dir", str(tmp_path.parent / "cache")])
    lw.main(flags(tmp_path, world, "--steps", "9", "--freeze", "0.5", *shape, "--run-to-end", out="whole"))
    two, one = ckpt(tmp_path / "stage2b/checkpoints/step_00000009.pt"), ckpt(tmp_path / "whole/checkpoints/step_00000009.pt")
    assert two["config"]["dit"] == [64, 3] and two["frozen_at"] == one["frozen_at"] == 5
    for part in ("model", "fusion"):
        for k in one[part]:
            assert torch.equal(one[part][k], two[part][k]), (part, k)
    for k in one["ema"]["model"]:
        assert torch.equal(one["ema"]["model"][k], two["ema"]["model"][k]), k
    assert one["streams"] == two["streams"] and one["sched"]["last_epoch"] == two["sched"]["last_epoch"] == 9
    with pytest.raises(DataError, match=r"--dit \[32, 3\] contradicts"):
        t2x.main(["--init-from", str(out), "--out", str(tmp_path / "c"), "--dit", "32x3"])


def test_04_resumes_mid_joint_training_on_the_same_curve(tmp_path, world):
    lw.main(flags(tmp_path, world, "--steps", "8", "--freeze", "0.75", out="a"))
    lw.main(flags(tmp_path, world, "--steps", "8", "--freeze", "0.75", "--stop-at", "3", out="b"))
    lw.main(flags(tmp_path, world, "--steps", "8", "--freeze", "0.75", "--resume", out="b"))
    a, b = ckpt(tmp_path / "a/checkpoints/step_00000006.pt"), ckpt(tmp_path / "b/checkpoints/step_00000006.pt")
    assert torch.equal(a["fusion"]["logits"], b["fusion"]["logits"])
    assert all(torch.equal(x, y) for x, y in zip(a["extra"]["history"], b["extra"]["history"]))
    assert a["extra"]["snapshots"].keys() == b["extra"]["snapshots"].keys() and a["extra"]["reason"] == b["extra"]["reason"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


BAD_04 = [(["--steps", "0"], "argument --steps: 0 is out of range"),
          (["--freeze", "0"], "argument --freeze: 0 is out of range"),
          (["--freeze", "sometime"], "argument --freeze: 'sometime' is not a number in (0, 1] or never"),
          (["--encoder", "runs/stage1/model"], "runs/stage1/model does not exist")]


@pytest.mark.parametrize("extra,message", BAD_04, ids=[m for _, m in BAD_04])
def test_04_bad_input_is_one_line(tmp_path, world, extra, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/stage1/model here
    assert_one_line(*cli_error(lw.main, [*flags(tmp_path, world), *extra], capsys), message)


def test_04_bad_flag_from_the_real_command_line(tmp_path, world):
    assert_one_line(*script_error("04_train_layer_weights.py", [*flags(tmp_path, world), "--steps", "0"]),
                    "argument --steps: 0 is out of range")
