"""05_train_diffusion.py and 06_sample.py on a tiny world with the tiny Qwen3: the schedule, the feature
cache, the loss, resume, two processes = one, safe checkpoints and bad input."""
import importlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import common
import models
import plumbing
from plumbing import DataError
from tests.cli import assert_one_line, cli_error, script_error
from tests import diffusion_stubs as stubs
from tests.diffusion_stubs import COLOURS, TINY, StubEncoder, make_world

ROOT = Path(__file__).resolve().parents[1]
t2x = importlib.import_module("05_train_diffusion")
sample = importlib.import_module("06_sample")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def flags(tmp, data, *extra, out="out"):
    return ["--data", str(data), "--out", str(tmp / out), "--cache-dir", str(tmp.parent / "cache"), *TINY, *extra]


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_schedule_exactly_7_image_steps_in_every_10():
    kinds = [common.step_kind(s, (7, 3)) for s in range(200)]
    for s in range(0, 191):
        assert kinds[s:s + 10].count("image") == 7
    assert kinds[:10] != ["image"] * 7 + ["video"] * 3  # videos spread out, not bunched
    assert [common.step_kind(s, (1, 1)) for s in range(4)].count("video") == 2


def test_loss_falls(tmp_path, world):
    argv = flags(tmp_path, world, "--lr", "2e-3", "--steps", "80", "--ckpt-every", "80")
    run = stubs.built(argv)
    t2x.main(argv)
    trained = run.trained(tmp_path / "out/checkpoints/step_00000080.pt")
    for kind in ("image", "video"):
        first, last = (stubs.fixed_loss(run, m, kind) for m in (run.model, trained))
        assert last < 0.8 * first, (kind, first, last)


def test_stopped_killed_and_resumed_run_is_bit_identical(tmp_path, world):
    t2x.main(flags(tmp_path, world, "--steps", "8", "--ckpt-every", "4", out="a"))
    t2x.main(flags(tmp_path, world, "--steps", "8", "--ckpt-every", "4", "--stop-at", "6", out="b"))
    newest = tmp_path / "b/checkpoints/step_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # killed while writing step 6: resume falls back to 4
    t2x.main(flags(tmp_path, world, "--steps", "8", "--ckpt-every", "4", "--resume", out="b"))
    sa, sb = ckpt(tmp_path / "a/checkpoints/step_00000008.pt"), ckpt(tmp_path / "b/checkpoints/step_00000008.pt")
    assert sa["step"] == sb["step"] == 8 and sa["streams"] == sb["streams"]
    for part in ("model",):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), k
    for k in sa["ema"]["model"]:
        assert torch.equal(sa["ema"]["model"][k], sb["ema"]["model"][k]), k
    ea, eb = load_file(tmp_path / "a/model.safetensors"), load_file(tmp_path / "b/model.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_resume_needs_no_flags_and_refuses_what_differs(tmp_path, world):
    t2x.main(flags(tmp_path, world, "--steps", "4", "--ckpt-every", "2", "--stop-at", "2", "--dit", "64x2"))
    out = str(tmp_path / "out")
    # No shape flags: the checkpoint has them (64 wide, not the default 128).
    t2x.main(["--out", out, "--resume", "--cache-dir", str(tmp_path.parent / "cache")])
    assert ckpt(tmp_path / "out/checkpoints/step_00000004.pt")["step"] == 4
    t2x.main(flags(tmp_path, world, "--steps", "6", "--dit", "64x2", "--resume"))  # a longer plan is fine
    for extra, what in [(["--patch", "2x2"], r"--patch \[2, 2\] contradicts"), (["--seed", "1"], "--seed 1 contradicts"),
                        (["--batch", "2:2"], r"--batch \[2, 2\] contradicts")]:
        with pytest.raises(DataError, match=what):
            t2x.main(flags(tmp_path, world, "--steps", "8", "--resume", "--dit", "64x2", *extra))
    other = make_world(tmp_path / "other", seed=1)  # same path name, different content
    with pytest.raises(DataError, match="--data .* contradicts"):
        t2x.main(flags(tmp_path, other, "--steps", "8", "--resume", "--dit", "64x2"))


def test_resume_refuses_changed_data_or_retrained_encoder(tmp_path, world, monkeypatch):
    data = make_world(tmp_path / "w")
    t2x.main(flags(tmp_path, data, "--steps", "4", "--stop-at", "2", "--ckpt-every", "2"))
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same records, reordered in place
    with pytest.raises(DataError, match="differs in data_sha256"):
        t2x.main(flags(tmp_path, data, "--steps", "4", "--resume"))
    data.write_text("\n".join(lines) + "\n")
    import encoders
    real = encoders.load_encoder

    def retrained(*a, **k):
        enc = real(*a, **k)
        enc.fingerprint = "weights-written-again"
        return enc
    monkeypatch.setattr(encoders, "load_encoder", retrained)
    with pytest.raises(DataError, match="differs in encoder_id"):
        t2x.main(flags(tmp_path, data, "--steps", "4", "--resume"))


def test_fresh_run_refuses_a_folder_with_a_run_and_overwrite_waits_for_the_first_checkpoint(tmp_path, world):
    t2x.main(flags(tmp_path, world, "--steps", "6", "--ckpt-every", "3"))
    old = sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir())
    with pytest.raises(DataError, match="already holds a run"):
        t2x.main(flags(tmp_path, world, "--steps", "2"))
    with pytest.raises(DataError, match="--interleave"):  # fails before its first checkpoint
        t2x.main(flags(tmp_path, world, "--steps", "2", "--overwrite", "--interleave", "0:0"))
    assert sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir()) == old
    t2x.main(flags(tmp_path, world, "--steps", "2", "--overwrite"))
    assert [p.name for p in (tmp_path / "out/checkpoints").iterdir()] == ["step_00000002.pt"]


def test_two_processes_match_one(tmp_path, world):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = ["--data", str(world), "--cache-dir", str(tmp_path / "cache"), *TINY, "--steps", "5", "--ckpt-every", "5"]
    script = str(ROOT / "05_train_diffusion.py")
    subprocess.run([sys.executable, script, "--out", str(tmp_path / "one"), *args],
                   check=True, env=env, cwd=ROOT, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                    "--out", str(tmp_path / "two"), *args], check=True, env=env, cwd=ROOT, timeout=300)
    one, two = ckpt(tmp_path / "one/checkpoints/step_00000005.pt"), ckpt(tmp_path / "two/checkpoints/step_00000005.pt")
    assert one["streams"] == two["streams"]
    for k, v in one["model"].items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-4, atol=2e-5, msg=k)
    torch.manual_seed(0)
    init = models.DiT(**models.dit_shape(one["config"])).state_dict()
    assert sum(float((one["model"][k] - v).abs().sum()) for k, v in init.items()) > 0, "it trained"


def test_cache_rebuilt_when_encoder_or_layers_change(tmp_path):
    LayerFusion, d = models.LayerFusion, plumbing.Dist()
    texts = ["", "a red square", "a blue square moving left"]
    enc = StubEncoder("stub-a")
    bank, p1 = common.feature_bank(enc, LayerFusion("norm-avg", 3), texts, 8, tmp_path, d)
    assert enc.calls == 3
    bank2, p2 = common.feature_bank(enc, LayerFusion("norm-avg", 3), texts, 8, tmp_path, d)
    assert enc.calls == 3 and p2 == p1 and torch.equal(bank.feats, bank2.feats)  # served from cache
    retrained = StubEncoder("stub-a")
    retrained.fingerprint = "same name, new weights"
    paths = {p1}
    for e, f, t, n, *store in [(StubEncoder("stub-b", seed=1), LayerFusion("norm-avg", 3), texts, 8),
                               (retrained, LayerFusion("norm-avg", 3), texts, 8),
                               (enc, LayerFusion("last", 3), texts, 8),
                               (enc, LayerFusion("learned", 3), texts, 8),
                               (enc, LayerFusion("norm-avg", 3), texts + ["a green square"], 8),
                               (enc, LayerFusion("norm-avg", 3), texts, 2),
                               (enc, LayerFusion("norm-avg", 3), texts, 8, torch.bfloat16),
                               (enc, LayerFusion("frozen", 3, weights=[0.2, 0.3, 0.5]), texts, 8),
                               (enc, LayerFusion("frozen", 3, weights=[0.1, 0.3, 0.6]), texts, 8)]:
        before = e.calls
        _, p = common.feature_bank(e, f, t, n, tmp_path, d, *store)
        assert e.calls > before and p not in paths
        paths.add(p)
    # the cached fused features are the fusion of the encoder's output, unpadded
    hidden, mask = enc.encode(texts[1:2], max_length=8)
    feats, m = bank.batch([1], "cpu")
    torch.testing.assert_close(feats[0, :int(mask.sum())], LayerFusion("norm-avg", 3)(hidden)[0])
    feats, m = bank.batch([0, 2], "cpu")  # the empty caption has no tokens
    assert m[0].sum() == 0 and m[1].sum() == 5


def test_a_pickle_payload_as_checkpoint_never_runs(tmp_path, world, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))
    path = tmp_path / "out/checkpoints/step_00000001.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps({"kind": models.CKPT_KIND, "x": Payload()}))
    with pytest.raises(DataError, match="not a readable checkpoint"):
        t2x.main(flags(tmp_path, world, "--steps", "2", "--resume"))
    with pytest.raises(DataError, match="not a readable checkpoint"):
        t2x.main(flags(tmp_path, world, "--steps", "2", "--init-from", str(path), out="o2"))
    assert not (tmp_path / "PWNED").exists()


def test_unreadable_media_skipped_then_stop(tmp_path):
    data = make_world(tmp_path / "w", n_images=100, n_videos=0, size=4)
    (tmp_path / "w/media/000.png").write_bytes(b"not a png")
    loaded = common.load_t2x(data, 4, 4)
    assert len(loaded["image"]["media"]) == 99  # 1% is tolerated
    (tmp_path / "w/media/001.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 of 100 media unreadable.*000\.png"):
        common.load_t2x(data, 4, 4)


def test_16_bit_grey_png_reads_as_its_grey_not_white(tmp_path):
    import numpy as np
    from PIL import Image
    grey = np.full((8, 8), 32768, np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    px = common.read_image(tmp_path / "g.png")
    assert px.shape == (8, 8, 3) and abs(int(px[0, 0, 0]) - 128) <= 1


#################################################################################
#                           One clean line for bad input                        #
#################################################################################

def first_record(**change):
    """A data-file edit: change fields of the first record."""
    def edit(text):
        lines = text.splitlines()
        lines[0] = json.dumps({**json.loads(lines[0]), **change})
        return "\n".join(lines) + "\n"
    return edit


BAD_05 = [  # (extra flags, data-file edit, what the one line must say)
    (["--steps", "0"], None, "argument --steps: 0 is out of range: must be >= 1"),
    (["--batch", "0:2"], None, "--batch 0:2: the image batch must be a positive multiple"),
    (["--batch", "4"], None, "--batch: '4': expected IMAGES:VIDEOS"),
    (["--dit", "128"], None, "--dit: '128': expected WIDTHxDEPTH"),
    (["--interleave", "0:0"], None, "--interleave: '0:0'"),
    (["--frames", "1"], None, "--frames"),
    (["--fusion", "frozen"], None, "--fusion frozen needs --layer-weights"),
    (["--fusion", "layer:9"], None, "K must be in"),
    (["--encoder", "no-such-encoder"], None, "unknown encoder 'no-such-encoder'"),
    (["--init-from", "nowhere"], None, "--init-from nowhere: no checkpoints"),
    ([], first_record(caption=""), "t2x.jsonl: record 1: caption must be a non-empty string"),
    ([], first_record(caption=7), "t2x.jsonl: record 1: caption must be a non-empty string"),
    ([], first_record(kind="audio"), "t2x.jsonl: record 1: kind must be 'image' or 'video'"),
    ([], first_record(media="media/missing.png"), "SKIP"),
    ([], lambda t: t + "{oops\n", "malformed JSON"),
    ([], lambda t: "", "no records"),
]


@pytest.mark.parametrize("extra,edit,message", BAD_05, ids=[m[:24] for *_, m in BAD_05])
def test_05_bad_input_is_one_line(tmp_path, world, extra, edit, message, capsys):
    data = tmp_path / "t2x.jsonl"
    data.write_text(edit(Path(world).read_text()) if edit else Path(world).read_text())
    (tmp_path / "media").symlink_to(Path(world).parent / "media")
    if message == "SKIP":  # one missing file of 36 is skipped with a warning (the 1% rule allows none here)
        message = "1 of 36 media unreadable"
    assert_one_line(*cli_error(t2x.main, flags(tmp_path, data, "--steps", "2", *extra), capsys), message)
    assert not (tmp_path / "out/checkpoints").exists()


def test_05_bad_flag_from_the_real_command_line(tmp_path, world):
    assert_one_line(*script_error("05_train_diffusion.py", flags(tmp_path, world, "--interleave", "0:0")),
                    "--interleave: '0:0'")


#################################################################################
#                                  06_sample.py                                 #
#################################################################################

@pytest.fixture(scope="module")
def trained(tmp_path_factory, world):
    """A 3-step run at the world checker's frame count."""
    from world import scenes
    tmp = tmp_path_factory.mktemp("trained")
    data = make_world(tmp / "w", n_images=8, n_videos=4, size=8, frames=scenes.FRAMES)
    t2x.main(flags(tmp, data, "--steps", "3", "--ckpt-every", "3", "--frames", str(scenes.FRAMES)))
    return tmp / "out"


def test_sample_grids_are_seeded_and_written(tmp_path, trained):
    from PIL import Image
    model, config, fusion, step = models.load_dit(trained)
    config["step"] = step
    cond = sample.conditioner(config, fusion, "cpu")
    texts = ["a red square", "a blue square moving left"]
    px = sample.generate(model, cond, texts, [0, 1], "image", config, steps=3, cfg=4.0, batch=3)
    assert px.shape == (2, 2, 1, 8, 8, 3) and px.dtype.name == "uint8"
    alone = sample.generate(model, cond, texts[1:], [1], "image", config, steps=3, cfg=4.0, batch=1)
    assert abs(alone[0, 0].astype(int) - px[1, 1].astype(int)).max() <= 1  # a seed is a seed, whatever the batch
    vid = sample.generate(model, cond, texts, [0], "video", config, steps=2, cfg=5.0, batch=4)
    frames = sample.grid(vid, 4)
    assert frames.shape == (config["frames"], 2 * 33 + 1, 33 + 1, 3)
    sample.write_grid(tmp_path / "v.gif", frames)
    with Image.open(tmp_path / "v.gif") as im:
        assert im.n_frames == config["frames"]
    config["encoder_id"] = "trained on other weights"
    with pytest.raises(DataError, match="has changed since this DiT was trained"):
        sample.conditioner(config, fusion, "cpu")


def test_06_reads_the_shape_from_the_file_and_refuses_other_files(tmp_path, trained):
    sample.main(["--ckpt", str(trained), "--out", str(tmp_path / "s"), "--prompts", "a red square",
                 "--sample-seeds", "0", "--sample-steps", "2"])
    assert (tmp_path / "s/images.png").is_file()
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    for bad, message in [(tmp_path / "bad.safetensors", "not a safetensors file"),
                         (trained / "checkpoints/step_00000003.pt", "not a safetensors file"),
                         (tmp_path / "nothing", "no such file")]:
        with pytest.raises(DataError, match=message):
            sample.main(["--ckpt", str(bad), "--out", str(tmp_path / "s2")])


def test_eval_scores_renders_model_and_floor(tmp_path, trained):
    from world import scenes
    rng = random.Random(0)
    recs = []
    for kind in ("image", "image", "video"):
        scene = scenes.sample_scene(rng, kind)
        recs.append({"caption": scenes.write_captions(scene, rng)[0], "prompt": scenes.write_prompt(scene),
                     "kind": kind, "scene": scene})
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    sample.main(["--ckpt", str(trained), "--eval", "--eval-data", str(tmp_path / "eval.jsonl"), "--sample-steps", "2",
                 "--eval-seeds", "2", "--out", str(tmp_path / "samples")])
    report = json.loads((tmp_path / "samples/eval.json").read_text())
    res = report["results"]
    assert res["renders (ceiling)"]["image"]["colour"] == {"mean": 1.0, "se": 0.0, "n": 2}  # one render per prompt
    assert res["DiT + prompt"]["image"]["colour"]["n"] == 4  # 2 prompts x 2 seeds
    assert res["renders (ceiling)"]["video"]["motion"]["mean"] == 1.0
    assert set(res["DiT + empty caption (floor)"]) == {"image", "video"}
    # The paired gain is the mean of per-sample differences, so it equals the difference of the means.
    for kind in ("image", "video"):
        for a, g in report["gain over floor"][kind].items():
            if a == "all":  # each sample's mean over its aspects, from the per-sample table
                rows = report["samples"][kind]
                assert len(rows) == g["n"] == res["DiT + prompt"][kind]["colour"]["n"]
                want = [sum(r["matched"][x] - r["floor"][x] for x in sample.ASPECTS if r["matched"][x] is not None)
                        / sum(r["matched"][x] is not None for x in sample.ASPECTS) for r in rows]
                assert g["mean"] == pytest.approx(sum(want) / len(want), abs=1e-9)
                continue
            m, f = res["DiT + prompt"][kind][a]["mean"], res["DiT + empty caption (floor)"][kind][a]["mean"]
            if m is not None:
                assert g["mean"] == pytest.approx(m - f, abs=1e-9) and g["se"] is not None and g["se"] >= 0
        assert report["classifier"]["results"][kind]["all"]["n"] > 0 and "all" in report["gain over mismatched"][kind]
    md = (tmp_path / "samples/eval.md").read_text()
    assert "| image | colour | 1.000 |" in md
    assert (tmp_path / "samples/eval_images.png").is_file() and (tmp_path / "samples/eval_videos.gif").is_file()


BAD_06 = [(["--sample-steps", "0"], "--sample-steps"), (["--batch-size", "0"], "--batch-size"),
          (["--ckpt", "nowhere"], "nowhere: no such file")]


@pytest.mark.parametrize("extra,message", BAD_06, ids=[m for _, m in BAD_06])
def test_06_bad_input_is_one_line(tmp_path, extra, message, capsys):
    assert_one_line(*cli_error(sample.main, ["--out", str(tmp_path / "s"), *extra], capsys), message)


def test_06_bad_input_from_the_real_command_line(tmp_path):
    assert_one_line(*script_error("06_sample.py", ["--out", str(tmp_path / "s"), "--ckpt", "nowhere"]),
                    "nowhere: no such file")


def test_05_copied_out_with_its_shared_modules_trains_on_a_users_jsonl(tmp_path):
    """05 and the modules it imports, alone in an empty folder (no world/, no tests/), train a DiT on a jsonl
    of the user's own images with MiniLM."""
    for name in ("05_train_diffusion.py", "common.py", "models.py", "plumbing.py", "encoders.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "media").mkdir()
    recs = []
    for i, (colour, rgb) in enumerate(list(COLOURS.items()) * 2):
        px = np.zeros((16, 16, 3), np.uint8)
        px[4:12, 4:12] = rgb
        Image.fromarray(px).save(tmp_path / "media" / f"{i}.png")
        recs.append({"media": f"media/{i}.png", "caption": f"a {colour} square", "kind": "image"})
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "05_train_diffusion.py", "--data", "mine.jsonl", "--encoder", "minilm", "--size", "16",
                    "--steps", "2", "--batch", "4:2", "--dit", "32x1"],
                   check=True, cwd=tmp_path, env=env, timeout=300)
    assert ckpt(tmp_path / "runs/diffusion/checkpoints/step_00000002.pt")["config"]["encoder"] == "minilm"
