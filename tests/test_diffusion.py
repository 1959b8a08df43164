"""05_train_diffusion.py: schedule, cache, loss, resume, DDP, bad input. Tiny model, stub encoder."""
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from common import DataError
from tests.diffusion_stubs import TINY, StubEncoder, make_world

ROOT = Path(__file__).resolve().parents[1]
train_mod = importlib.import_module("05_train_diffusion")


def args_for(tmp, data, *extra):
    return train_mod.get_parser().parse_args(
        ["--data", str(data), "--out", str(tmp / "out"), "--cache-dir", str(tmp / "cache"), *TINY, *extra])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def test_schedule_exactly_7_image_steps_in_every_10():
    kinds = [train_mod.step_kind(s, (7, 3)) for s in range(200)]
    for s in range(0, 191):
        assert kinds[s:s + 10].count("image") == 7
    assert kinds[:10] != ["image"] * 7 + ["video"] * 3  # videos spread out, not bunched
    assert [train_mod.step_kind(s, (1, 1)) for s in range(4)].count("video") == 2


def test_lr_warmup_then_constant_or_cosine():
    f = train_mod.lr_factor
    assert [f(s, 100, 10) for s in (0, 9, 50, 99)] == [0.1, 1.0, 1.0, 1.0]
    assert f(9, 100, 10, "cosine") == 1.0 and f(10, 100, 10, "cosine") == 1.0
    assert abs(f(55, 100, 10, "cosine") - 0.5) < 1e-9 and f(99, 100, 10, "cosine") < 1e-3


def test_loss_falls(tmp_path, world):
    res = train_mod.train(args_for(tmp_path, world, "--steps", "80", "--lr", "2e-3"), encoder=StubEncoder())
    first, last = sum(res["losses"][:10]) / 10, sum(res["losses"][-10:]) / 10
    assert last < 0.8 * first, (first, last)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_killed_and_resumed_run_is_bit_identical(tmp_path, world):
    a = train_mod.train(args_for(tmp_path / "a", world, "--steps", "8", "--ckpt-every", "4"), encoder=StubEncoder())
    b_args = args_for(tmp_path / "b", world, "--steps", "8", "--ckpt-every", "4", "--stop-after", "6")
    train_mod.train(b_args, encoder=StubEncoder())  # "killed" at step 6: last checkpoint is step 4
    assert common_latest(tmp_path / "b" / "out").name == "step_00000004.pt"
    b = train_mod.train(args_for(tmp_path / "b", world, "--steps", "8", "--ckpt-every", "4", "--resume"),
                        encoder=StubEncoder())
    sa, sb = _state(a["checkpoint"]), _state(b["checkpoint"])
    assert sa["step"] == sb["step"] == 8
    for part in ("model",):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), k
    for k in sa["ema"]["model"]:
        assert torch.equal(sa["ema"]["model"][k], sb["ema"]["model"][k]), k
    assert sa["streams"] == sb["streams"]
    assert a["losses"][6:] == b["losses"][-2:]


def common_latest(out):
    import common
    return common.latest_checkpoint(out)


DRIVER = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {root!r})
    import importlib
    from tests.diffusion_stubs import StubEncoder
    m = importlib.import_module("05_train_diffusion")
    m.train(m.get_parser().parse_args(sys.argv[1:]), encoder=StubEncoder())
""")


def test_two_processes_match_one(tmp_path, world):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    common_args = ["--data", str(world), "--cache-dir", str(tmp_path / "cache"), *TINY, "--steps", "5",
                   "--ckpt-every", "5"]
    subprocess.run([sys.executable, str(driver), "--out", str(tmp_path / "one"), *common_args],
                   check=True, env=env, cwd=ROOT, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(driver), "--out", str(tmp_path / "two"), *common_args],
                   check=True, env=env, cwd=ROOT, timeout=300)
    one = _state(tmp_path / "one" / "checkpoints" / "step_00000005.pt")
    two = _state(tmp_path / "two" / "checkpoints" / "step_00000005.pt")
    assert one["streams"] == two["streams"]
    for k, v in one["model"].items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-4, atol=2e-5, msg=k)
    moved = sum(float((one["model"][k] - v).abs().sum()) for k, v in _init_state().items())
    assert moved > 0


def _init_state():
    torch.manual_seed(0)
    from dit import DiT
    return DiT(text_dim=16, hidden=32, depth=2, heads=2, patch=4, tpatch=2).state_dict()


def test_cache_rebuilt_when_encoder_or_layers_change(tmp_path):
    import common
    from encoders import LayerFusion
    d = common.Dist()
    texts = ["", "a red square", "a blue square moving left"]
    enc = StubEncoder("stub-a")
    bank, p1 = train_mod.feature_bank(enc, LayerFusion("norm-avg", 3), texts, 8, tmp_path, d)
    assert enc.calls == 3
    bank2, p2 = train_mod.feature_bank(enc, LayerFusion("norm-avg", 3), texts, 8, tmp_path, d)
    assert enc.calls == 3 and p2 == p1 and torch.equal(bank.feats, bank2.feats)  # served from cache
    paths = {p1}
    for e, f, t, n, *store in [(StubEncoder("stub-b", seed=1), LayerFusion("norm-avg", 3), texts, 8),
                       (enc, LayerFusion("last", 3), texts, 8),
                       (enc, LayerFusion("learned", 3), texts, 8),
                       (enc, LayerFusion("norm-avg", 3), texts + ["a green square"], 8),
                       (enc, LayerFusion("norm-avg", 3), texts, 2),
                       (enc, LayerFusion("norm-avg", 3), texts, 8, torch.bfloat16),
                       (enc, LayerFusion("frozen", 3, weights=[0.2, 0.3, 0.5]), texts, 8),
                       (enc, LayerFusion("frozen", 3, weights=[0.1, 0.3, 0.6]), texts, 8)]:
        before = e.calls
        _, p = train_mod.feature_bank(e, f, t, n, tmp_path, d, *store)
        assert e.calls > before and p not in paths
        paths.add(p)
    # a model folder retrained in place (same name, new files) gets a new cache
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    local = StubEncoder(str(folder))
    _, pa = train_mod.feature_bank(local, LayerFusion("norm-avg", 3), texts, 8, tmp_path, d)
    (folder / "model.safetensors").write_bytes(b"new weights")
    _, pb = train_mod.feature_bank(local, LayerFusion("norm-avg", 3), texts, 8, tmp_path, d)
    assert pa != pb and local.calls == 6
    # the cached fused features are the fusion of the encoder's output, unpadded
    hidden, mask = enc.encode(texts[1:2], max_length=8)
    feats, m = bank.batch([1], "cpu")
    torch.testing.assert_close(feats[0, :int(mask.sum())], LayerFusion("norm-avg", 3)(hidden)[0])
    feats, m = bank.batch([0, 2], "cpu")  # the empty caption has no tokens
    assert m[0].sum() == 0 and m[1].sum() == 5


def test_learned_fusion_trains_then_freezes(tmp_path, world):
    class Hook(train_mod.FusionHook):
        lr = 0.05
        history = []

        def should_freeze(self, step, fusion):
            return step == 3

        def after_step(self, step, fusion, writer):
            self.history.append(fusion.logits.detach().clone())

    hook = Hook()
    res = train_mod.train(args_for(tmp_path, world, "--steps", "6", "--fusion", "learned"), hook=hook,
                          encoder=StubEncoder())
    h = hook.history
    assert res["frozen_at"] == 3
    # (step 1 cannot move them: adaLN-zero makes the text path's gradient zero at initialisation)
    assert not torch.equal(h[1], h[2])  # moved while learning
    assert all(torch.equal(h[2], x) for x in h[3:])  # not after freezing


def test_unreadable_media_skipped_then_stop(tmp_path):
    data = make_world(tmp_path / "w", n_images=100, n_videos=0, size=4)
    lines = data.read_text().splitlines()
    (tmp_path / "w" / "media" / "000.png").write_bytes(b"not a png")
    data_, bad = train_mod.load_t2x(data, 4, 4)
    assert bad == 1 and len(data_["image"]["media"]) == 99  # 1% is tolerated
    (tmp_path / "w" / "media" / "001.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 of 100 media unreadable.*000\.png"):
        train_mod.load_t2x(data, 4, 4)
    assert lines


def test_empty_caption_file_and_bad_kind(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no records"):
        train_mod.load_t2x(empty, 8, 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"media": "x.png", "caption": "c", "kind": "audio"}\n')
    with pytest.raises(DataError, match="record 1: kind"):
        train_mod.load_t2x(bad, 8, 4)


def test_checkpoint_from_another_shape_is_refused(tmp_path, world):
    train_mod.train(args_for(tmp_path, world, "--steps", "2", "--ckpt-every", "2"), encoder=StubEncoder())
    ck = common_latest(tmp_path / "out")
    with pytest.raises(DataError, match="already holds checkpoints"):
        train_mod.train(args_for(tmp_path, world, "--steps", "2"), encoder=StubEncoder())
    with pytest.raises(DataError, match="does not match this model"):
        train_mod.train(args_for(tmp_path, world, "--steps", "4", "--resume", "--hidden", "48"), encoder=StubEncoder())
    with pytest.raises(DataError, match="does not match this model"):
        train_mod.train(args_for(tmp_path / "c", world, "--steps", "2", "--depth", "3", "--init-from", str(ck)),
                        encoder=StubEncoder())
    with pytest.raises(DataError, match="cannot resume.*image_batch"):
        train_mod.train(args_for(tmp_path, world, "--steps", "4", "--resume", "--image-batch", "2"),
                        encoder=StubEncoder())


#################################################################################
#                                  06_sample.py                                 #
#################################################################################

def test_sample_grids_are_seeded_and_written(tmp_path, world):
    from PIL import Image
    sample = importlib.import_module("06_sample")
    train_mod.train(args_for(tmp_path, world, "--steps", "3", "--ckpt-every", "3"), encoder=StubEncoder())
    model, state = sample.load_model(tmp_path / "out", "cpu")
    cond = sample.Conditioner(state, "cpu", encoder=StubEncoder())
    texts = ["a red square", "a blue square moving left"]
    px = sample.generate(model, cond, texts, [0, 1], "image", state, steps=3, cfg=4.0, batch=3)
    assert px.shape == (2, 2, 1, 8, 8, 3) and px.dtype.name == "uint8"
    alone = sample.generate(model, cond, texts[1:], [1], "image", state, steps=3, cfg=4.0, batch=1)
    assert abs(alone[0, 0].astype(int) - px[1, 1].astype(int)).max() <= 1  # a seed is a seed, whatever the batch
    vid = sample.generate(model, cond, texts, [0], "video", state, steps=2, cfg=5.0, batch=4)
    frames = sample.grid(vid, 4)
    assert frames.shape == (4, 2 * 33 + 1, 33 + 1, 3)
    sample.write_gif(tmp_path / "v.gif", frames)
    with Image.open(tmp_path / "v.gif") as im:
        assert im.n_frames == 4
    with pytest.raises(DataError, match="trained with encoder"):
        sample.Conditioner(state, "cpu", encoder=StubEncoder("other"))


def test_eval_scores_renders_model_and_floor(tmp_path):
    import json
    import random
    import world as W
    sample = importlib.import_module("06_sample")
    data = make_world(tmp_path / "w", n_images=8, n_videos=4, size=8, frames=W.FRAMES)
    train_mod.train(args_for(tmp_path, data, "--steps", "2", "--ckpt-every", "2", "--frames", str(W.FRAMES)),
                    encoder=StubEncoder())
    rng = random.Random(0)
    recs = []
    for kind in ("image", "image", "video"):
        scene = W.sample_scene(rng, kind)
        recs.append({"caption": W.write_captions(scene, rng)[0], "prompt": W.write_prompt(scene), "kind": kind, "scene": scene})
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    args = sample.get_parser().parse_args(["--eval", "--eval-data", str(tmp_path / "eval.jsonl"), "--steps", "2",
                                           "--eval-seeds", "2", "--out", str(tmp_path / "samples")])
    model, state = sample.load_model(tmp_path / "out", "cpu")
    report = sample.evaluate(args, model, state, sample.Conditioner(state, "cpu", encoder=StubEncoder()),
                             tmp_path / "samples")
    res = report["results"]
    assert res["renders (ceiling)"]["image"]["colour"] == {"mean": 1.0, "n": 2}  # one render per prompt
    assert res["DiT + prompt"]["image"]["colour"]["n"] == 4  # 2 prompts x 2 seeds
    assert res["renders (ceiling)"]["video"]["motion"]["mean"] == 1.0
    assert set(res["DiT + empty caption (floor)"]) == {"image", "video"}
    # The paired gain is the mean of per-sample differences, so it equals the difference of the means.
    for kind in ("image", "video"):
        for a, g in report["gain over floor"][kind].items():
            m, f = res["DiT + prompt"][kind][a]["mean"], res["DiT + empty caption (floor)"][kind][a]["mean"]
            if m is not None:
                assert g["mean"] == pytest.approx(m - f, abs=1e-9) and g["se"] is not None and g["se"] >= 0
    md = (tmp_path / "samples" / "eval.md").read_text()
    assert "| image | colour | 1.000 |" in md
    assert (tmp_path / "samples" / "eval_images.png").is_file() and (tmp_path / "samples" / "eval_videos.gif").is_file()
