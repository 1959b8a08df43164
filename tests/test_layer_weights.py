"""04_train_layer_weights.py: learned fusion starts at norm-avg, trains with the DiT, freezes for good."""
import importlib
import math

import pytest
import torch

import encoders
from common import DataError
from tests.diffusion_stubs import TINY, StubEncoder, make_world

lw = importlib.import_module("04_train_layer_weights")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def args_for(tmp, data, *extra):
    return lw.get_parser().parse_args(["--data", str(data), "--out", str(tmp / "out"), "--cache-dir",
                                       str(tmp / "cache"), *TINY, "--weights-lr", "0.05", *extra])


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_freeze_criterion_triggers_on_converging_sequence_only():
    target = torch.tensor([0.1, 0.2, 0.3, 0.4])
    converging = FreezeRun(lambda t: target + 0.5 ** t * torch.tensor([1.0, -1.0, 0.5, -0.5]))
    assert converging is not None and converging > 5, "must wait for a full window and then fire"
    oscillating = FreezeRun(lambda t: target + 0.05 * math.sin(t / 3) * torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert oscillating is None
    drifting = FreezeRun(lambda t: target + 1e-3 * t * torch.tensor([1.0, -1.0, 0.0, 0.0]))  # slow but steady
    assert drifting is None


def FreezeRun(seq, window=5, tol=1e-3, steps=200):
    """The first step at which the criterion fires on `seq(t)`, or None."""
    crit = lw.FreezeCriterion(window, tol)
    for t in range(steps):
        if crit.update(seq(t)):
            return t
    return None


def test_learned_fusion_at_init_is_norm_avg():
    h = torch.randn(5, 2, 7, 16) * torch.arange(1, 6)[:, None, None, None]
    learned = encoders.LayerFusion("learned", 5)
    assert torch.equal(learned.logits.detach(), torch.zeros(5))
    torch.testing.assert_close(learned(h), encoders.LayerFusion("norm-avg", 5)(h), rtol=0, atol=1e-6)


def test_joint_training_freezes_and_then_weights_stay_put(tmp_path, world):
    """Freeze at step 4 of 10 but keep training (the hook's stop is off): the DiT moves on, the
    layer weights and their optimiser state do not; the encoder never gets a gradient."""
    enc = encoders.load_encoder("tiny-qwen3")
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    args = args_for(tmp_path, world, "--steps", "10", "--ckpt-every", "4", "--freeze-fraction", "0.4",
                    "--keep", "10")
    hook = lw.LayerWeightHook(args, enc.name, enc.num_layers)
    hook.stop_on_freeze = False
    res = lw.train_diffusion.train(args, hook=hook, encoder=enc)
    assert res["frozen_at"] == 4 and res["step"] == 10
    at4, at8 = _ckpt(tmp_path / "out/checkpoints/step_00000004.pt"), _ckpt(res["checkpoint"])
    assert not torch.equal(at4["fusion"]["logits"], torch.zeros(enc.num_layers)), "weights learned before the freeze"
    assert torch.equal(at4["fusion"]["logits"], at8["fusion"]["logits"]), "frozen weights moved"
    assert torch.equal(res["fusion"].logits.detach(), at8["fusion"]["logits"])
    assert any(not torch.equal(at4["model"][k], at8["model"][k]) for k in at8["model"]), "the DiT kept training"
    logits_state = at8["opt"]["state"][len(at8["opt"]["param_groups"][0]["params"])]  # group 1 holds the logits
    assert float(logits_state["step"]) == 4, "no optimiser updates after the freeze"
    assert torch.equal(logits_state["exp_avg"], at4["opt"]["state"][len(at4["opt"]["param_groups"][0]["params"])]["exp_avg"])
    assert [len(g["params"]) for g in at8["opt"]["param_groups"]][1] == 1, "the weight group holds the logits alone"
    for k, v in enc.model.state_dict().items():
        assert torch.equal(v, before[k]), f"encoder parameter {k} changed"
    assert all(p.grad is None for p in enc.model.parameters())


def test_run_writes_weights_that_reload_to_the_same_fusion(tmp_path, world):
    enc = StubEncoder(num_layers=3)
    res = lw.run(args_for(tmp_path, world, "--steps", "9", "--freeze-fraction", "0.5"), encoder=enc)
    out = tmp_path / "out"
    assert res["frozen_at"] == 5 and res["step"] == 5, "04 stops at the freeze; 05 continues"
    for name in ("layer_weights.pt", "dit.pt", "weights.png", "summary.json"):
        assert (out / name).is_file(), name
    w = encoders.load_layer_weights(out / "layer_weights.pt", enc.name, enc.num_layers)
    h = torch.randn(3, 2, 4, 16)
    torch.testing.assert_close(encoders.LayerFusion("frozen", 3, weights=w)(h), res["fusion"](h), rtol=0, atol=1e-6)
    with pytest.raises(DataError, match="layer weights are for encoder 'stub' with 3 layers"):
        encoders.load_layer_weights(out / "layer_weights.pt", "another-encoder", 3)
    with pytest.raises(DataError, match="with 3 layers, not 'stub' with 4"):
        encoders.load_layer_weights(out / "layer_weights.pt", "stub", 4)

    # 05 continues from both: frozen fusion, DiT initialised from 04's checkpoint.
    train = lw.train_diffusion
    args05 = train.get_parser().parse_args(["--data", str(world), "--out", str(tmp_path / "out05"), "--cache-dir",
                                            str(tmp_path / "cache"), *TINY, "--steps", "4", "--fusion", "frozen",
                                            "--layer-weights", str(out / "layer_weights.pt"), "--init-from",
                                            str(out / "dit.pt")])
    res05 = train.train(args05, encoder=StubEncoder(num_layers=3))
    assert res05["step"] == 4
    torch.testing.assert_close(res05["fusion"].layer_weights(), w)


def test_probe_takes_frozen_with_layer_weights_flag():
    probe = importlib.import_module("02_probe_encoders")
    args = probe.parse_args(["--strategies", "norm-avg,frozen", "--layer-weights", "w.pt"])
    assert args.strategies == ["norm-avg", "frozen:w.pt"]
    with pytest.raises(SystemExit):
        probe.parse_args(["--strategies", "frozen"])
