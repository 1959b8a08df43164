"""Tests for 03_finetune_qwen3vl.py on the tiny Qwen3-VL and a hand-made VQA set (no world needed)."""
import importlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import encoders
import plumbing
from plumbing import DataError
from tests.cli import cli_error, script_error

ft = importlib.import_module("03_finetune_qwen3vl")
ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


#################################################################################
#                                 Fixtures                                      #
#################################################################################

def write_vqa(folder, n_images=12, n_videos=6, seed=0):
    """A tiny VQA set: coloured squares (PNG) and squares moving left or right (8-frame GIF)."""
    folder = Path(folder)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    recs = []
    for i in range(n_images):
        c = names[i % len(names)]
        img = np.zeros((32, 32, 3), np.uint8)
        x, y = rng.integers(2, 20, size=2)
        img[y:y + 10, x:x + 10] = COLOURS[c]
        Image.fromarray(img).save(folder / "media" / f"img{i}.png")
        recs.append({"media": f"media/img{i}.png", "kind": "image", "perspective": "colour",
                     "messages": [{"role": "user", "content": "What colour is the square?"},
                                  {"role": "assistant", "content": c},
                                  {"role": "user", "content": "How many squares are there?"},
                                  {"role": "assistant", "content": "one"}]})
    for i in range(n_videos):
        c, right = names[i % len(names)], bool(i % 2)
        frames = []
        for t in range(8):
            f = np.zeros((32, 32, 3), np.uint8)
            x = 4 + 2 * t if right else 18 - 2 * t
            f[12:22, x:x + 8] = COLOURS[c]
            frames.append(Image.fromarray(f))
        frames[0].save(folder / "media" / f"vid{i}.gif", save_all=True, append_images=frames[1:], duration=125, loop=0)
        recs.append({"media": f"media/vid{i}.gif", "kind": "video", "perspective": "motion",
                     "messages": [{"role": "user", "content": "Which way does the square move?"},
                                  {"role": "assistant", "content": "right" if right else "left"}]})
    path = folder / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One tiny Qwen3-VL base directory shared by the module's tests."""
    return encoders.build_tiny_qwen3vl(tmp_path_factory.mktemp("base") / "tiny", seed=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_vqa(tmp_path_factory.mktemp("vqa"))


def flags_for(data, out, base, *extra):
    return ["--data", str(data), "--out", str(out), "--model", str(base), "--steps", "4", "--batch-size", "4",
            "--warmup", "1", "--eval-size", "0", "--ckpt-every", "0", "--lr", "1e-3", *extra]


def args_for(data, out, base, *extra):
    return ft.get_parser().parse_args(flags_for(data, out, base, *extra))


#################################################################################
#                                Labels, media                                  #
#################################################################################

def test_only_assistant_tokens_carry_loss(data, base):
    _, processor = encoders.load_qwen3vl(base)
    recs = common.read_vqa_records(data)
    batch = ft.Collator(processor)([recs[0], recs[-1]])  # an image and a video, padded together
    tok = processor.tokenizer
    for b, rec in enumerate([recs[0], recs[-1]]):
        kept = batch["labels"][b][batch["labels"][b] != ft.IGNORE]
        want = "".join(m["content"] + "<|im_end|>" for m in rec["messages"] if m["role"] == "assistant")
        assert tok.decode(kept) == want
        # no question text, no role header, no vision or padding token leaks into the labels
        full = tok.decode(batch["input_ids"][b])
        assert rec["messages"][0]["content"] in full and rec["messages"][0]["content"] not in tok.decode(kept)
    vision = batch["mm_token_type_ids"] != 0
    assert vision.any() and (batch["labels"][vision] == ft.IGNORE).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == ft.IGNORE).all()


def test_images_and_videos_both_go_through(data, base):
    model, processor = encoders.load_qwen3vl(base)
    recs = common.read_vqa_records(data)
    img, vid = recs[0], recs[-1]
    batch = ft.Collator(processor)([img, vid])
    assert batch["pixel_values"].shape[0] > 0 and batch["pixel_values_videos"].shape[0] > 0
    assert batch["image_grid_thw"].shape[0] == 1 and batch["video_grid_thw"].tolist()[0][0] == 4  # 8 frames / 2
    labels = batch.pop("labels")
    out = model(**batch)
    assert torch.isfinite(out.logits).all()
    # the pixels matter: a different image changes the prediction for the answer tokens
    batch2 = ft.Collator(processor)([recs[1], vid])
    batch2.pop("labels")
    out2 = model(**batch2)
    assert not torch.allclose(out.logits[0, -3:], out2.logits[0, -3:])
    assert (labels != ft.IGNORE).sum() > 0


def test_frames_and_max_pixels(data, base):
    _, processor = encoders.load_qwen3vl(base)
    vid = common.read_vqa_records(data)[-1]
    b4 = ft.Collator(processor, frames=4)([vid])
    assert b4["video_grid_thw"].tolist()[0][0] == 2
    ft.keep_pixel_limits(processor, 4, 64 * 64, 64 * 64)  # what 03 does to the processor it trains and saves
    big = ft.Collator(processor, frames=4)([common.read_vqa_records(data)[0], vid])
    assert big["image_grid_thw"].tolist()[0] == [1, 8, 8]
    assert big["video_grid_thw"].tolist()[0][1:] == [8, 8]  # each of the 4 frames gets the image's budget


class Oracle(torch.nn.Module):
    """A 'model' whose greedy answer is whatever `answer(prompt)` says, as the tokenizer writes it."""

    def __init__(self, processor, answer):
        super().__init__()
        self.processor, self.answer = processor, answer

    def generate(self, input_ids, **kw):
        tok = self.processor.tokenizer
        replies = [tok.encode(self.answer(tok.decode(row, skip_special_tokens=True)) + "<|im_end|>",
                              add_special_tokens=False) for row in input_ids.tolist()]
        width = max(map(len, replies))
        return torch.cat([input_ids, torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in replies])], 1)


def test_vqa_eval_scores_a_known_case(data, base):
    """Held out: 2 images (colour c0 / c1, then "one") and 2 videos (left, right); the model says "Left." to
    everything, so 1 of 6 is right. From the 18 training records: the colour perspective's majority answer
    is "one" (12 of 36 answers), motion's "left" (3 of 6, first seen), so always answering it gets 3 of 6."""
    _, processor = encoders.load_qwen3vl(base)
    recs = common.read_vqa_records(data)
    held = recs[0:2] + recs[12:14]
    args = ft.get_parser().parse_args(["--max-frames", "4"])
    res = ft.evaluate_vqa(Oracle(processor, lambda prompt: "Left."), processor, held, recs, args,
                          torch.device("cpu"), torch.float32)
    assert res["per_perspective"]["motion"] == {"n": 2, "accuracy": 0.5, "majority_baseline": 0.5,
                                                "chance_uniform": 0.5, "distinct_train_answers": 2}
    colour = res["per_perspective"]["colour"]
    assert (colour["n"], colour["accuracy"], colour["majority_baseline"]) == (4, 0.0, 0.5)
    assert colour["chance_uniform"] == 1 / (len(COLOURS) + 1)  # the colours and "one"
    assert res["overall"]["n"] == 6 and res["overall"]["accuracy"] == pytest.approx(1 / 6)
    assert res["overall"]["majority_baseline"] == pytest.approx(0.5)


#################################################################################
#                                  Bad input                                    #
#################################################################################

def _rewrite(path, out, fn):
    recs = [json.loads(line) for line in Path(path).read_text().splitlines()]
    out.write_text("".join(json.dumps(fn(i, r)) + "\n" for i, r in enumerate(recs)))
    return out


def test_no_assistant_turn_names_the_line(data, tmp_path):
    bad = _rewrite(data, data.parent / "noasst.jsonl",
                   lambda i, r: dict(r, messages=r["messages"][:1]) if i == 2 else r)
    with pytest.raises(DataError, match=r"noasst\.jsonl:3: no assistant turn"):
        common.read_vqa_records(bad)


def test_unknown_kind_names_the_line(data):
    bad = _rewrite(data, data.parent / "kind.jsonl", lambda i, r: dict(r, kind="audio") if i == 4 else r)
    with pytest.raises(DataError, match=r"kind\.jsonl:5: unknown media kind 'audio'"):
        common.read_vqa_records(bad)


def test_bad_media_skipped_then_refused(data, base, tmp_path):
    corrupt = data.parent / "media" / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    recs = common.read_vqa_records(data)
    many = recs * 20  # 360 records: one bad one is < 1%
    many[5] = dict(many[5], _path=str(corrupt), media="media/corrupt.png")
    kept, n_bad = common.scan_vqa_media(many, 8, plumbing.init_distributed("cpu"))
    assert n_bad == 1 and len(kept) == len(many) - 1
    few = list(recs)
    few[0] = dict(few[0], _path=str(data.parent / "media" / "missing.png"), media="media/missing.png")
    with pytest.raises(DataError, match=r"vqa\.jsonl:1 \(media/missing\.png: FileNotFoundError"):
        common.scan_vqa_media(few, 8, plumbing.init_distributed("cpu"))


#################################################################################
#                          Training, saving, resuming                           #
#################################################################################

def test_save_reload_identical_hidden_states(data, base, tmp_path):
    summary = ft.train(args_for(data, tmp_path / "run", base, "--steps", "3"))
    assert summary["steps"] == 3
    saved = tmp_path / "run" / "model"
    model, processor = encoders.load_qwen3vl(saved)
    again, _ = encoders.load_qwen3vl(saved)
    orig, _ = encoders.load_qwen3vl(base)
    batch = ft.Collator(processor)(common.read_vqa_records(data)[:2])
    batch.pop("labels")
    with torch.no_grad():
        h1 = model(**batch, output_hidden_states=True).hidden_states
        h2 = again(**batch, output_hidden_states=True).hidden_states
        h0 = orig(**batch, output_hidden_states=True).hidden_states
    assert all(torch.equal(a, b) for a, b in zip(h1, h2))
    assert not torch.allclose(h1[-1], h0[-1])  # and it did train
    # the encoder loader the later stages use reads it too
    enc = encoders.load_encoder(str(saved))
    hidden, mask = enc.encode(["a red square moves left"])
    assert hidden.shape[0] == enc.num_layers and mask.any()


def test_resume_continues_the_same_curve(data, base, tmp_path):
    full = ft.train(args_for(data, tmp_path / "a", base, "--steps", "6"))
    first = ft.train(args_for(data, tmp_path / "b", base, "--steps", "6", "--ckpt-every", "3", "--stop-at", "3"))
    assert first["steps"] == 3 and not (tmp_path / "b" / "model").exists()
    rest = ft.train(args_for(data, tmp_path / "b", base, "--steps", "6", "--ckpt-every", "3", "--resume"))
    a = [l for _, l in full["losses"]]
    b = [l for _, l in first["losses"] + rest["losses"]]
    assert [s for s, _ in rest["losses"]] == [4, 5, 6]
    assert b == a  # bit for bit: model, optimiser, schedule, data position and RNG all restored
    assert a[-1] < a[0]
    saved = [encoders.load_qwen3vl(tmp_path / run / "model")[0].state_dict() for run in "ab"]
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def _torchrun(tmp_path, data, base, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "03_finetune_qwen3vl.py"), "--data", str(data), "--out", str(out), "--model", str(base),
           "--steps", "3", "--batch-size", "4", "--warmup", "1", "--eval-size", "0", "--ckpt-every", "0",
           "--lr", "1e-3", *extra]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_two_processes_agree_with_one(data, base, tmp_path):
    one = ft.train(args_for(data, tmp_path / "one", base, "--steps", "3"))
    two = _torchrun(tmp_path, data, base, tmp_path / "two")
    assert two["world_size"] == 2
    np.testing.assert_allclose([l for _, l in two["losses"]], [l for _, l in one["losses"]], rtol=1e-4)


def test_fsdp_two_processes_saves_a_dir_that_reloads(data, base, tmp_path):
    out = tmp_path / "fsdp"
    summ = _torchrun(tmp_path, data, base, out, "--fsdp", "--ckpt-every", "3")
    assert summ["steps"] == 3 and (out / "checkpoints" / "step_00000003.pt").is_file()
    one = ft.train(args_for(data, tmp_path / "one", base, "--steps", "3"))
    np.testing.assert_allclose([l for _, l in summ["losses"]], [l for _, l in one["losses"]], rtol=1e-4)
    model, processor = encoders.load_qwen3vl(out / "model")
    ref, _ = encoders.load_qwen3vl(tmp_path / "one" / "model")
    start, _ = encoders.load_qwen3vl(base)
    # Adam turns float-order noise in near-zero gradients into ~1e-5 weight noise; the steps are ~1e-3
    sd, rd, bd = model.state_dict(), ref.state_dict(), start.state_dict()
    assert sd.keys() == rd.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], rd[k], rtol=0, atol=1e-4, msg=k)
    assert (sd["lm_head.weight"] - bd["lm_head.weight"]).abs().max() > 1e-3


#################################################################################
#                    Refusals: one line, nothing overwritten                    #
#################################################################################

@pytest.fixture(scope="module")
def stopped(data, base, tmp_path_factory):
    """A run stopped at step 2 of 6 (its checkpoint, no model yet), and its flags."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    flags = flags_for(data, out, base, "--steps", "6", "--stop-at", "2")
    ft.train(ft.get_parser().parse_args(flags))
    assert [p.name for p in plumbing.list_checkpoints(out)] == ["step_00000002.pt"]
    return out, flags


def run_03(capsys, *argv):
    """(exit code, stderr) of 03's command line (run_cli), in this process."""
    return cli_error(ft.main, list(argv), capsys)


def assert_one_line_error(result, *words):
    code, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for w in words:
        assert w in lines[0], lines[0]


def folder_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--batch-size", "0"), ("--grad-accum", "0"),
                                         ("--max-frames", "1"), ("--max-frames", "3"), ("--lr", "-1"),
                                         ("--stop-at", "0")])
def test_bad_numbers_refused_before_anything_is_written(stopped, capsys, flag, value):
    out, flags = stopped
    before = folder_bytes(out)
    r = run_03(capsys, *flags, "--overwrite", flag, value)
    assert_one_line_error(r, flag)
    assert folder_bytes(out) == before


def test_batch_that_does_not_split_is_refused(stopped, capsys):
    out, flags = stopped
    r = run_03(capsys, *flags, "--resume", "--batch-size", "6", "--grad-accum", "4")
    assert_one_line_error(r, "--batch-size 6", "--grad-accum")


def test_fresh_run_into_a_run_folder_is_refused_from_the_real_command_line(stopped, tmp_path):
    out, flags = stopped
    before = folder_bytes(out)
    r = script_error("03_finetune_qwen3vl.py", flags, cwd=tmp_path)
    assert_one_line_error(r, str(out), "--resume", "--overwrite")
    assert folder_bytes(out) == before


def test_resume_with_another_seed_is_refused(stopped, capsys):
    out, flags = stopped
    before = folder_bytes(out)
    r = run_03(capsys, *flags, "--resume", "--seed", "1")
    assert_one_line_error(r, "step_00000002.pt", "seed: 0 then, 1 now")
    assert folder_bytes(out) == before


def test_pickle_payload_checkpoint_is_refused_and_never_runs(data, base, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"kind": ft.KIND, "step": 1, "x": Payload()}, out / "checkpoints" / "step_00000001.pt")
    r = run_03(capsys, *flags_for(data, out, base), "--resume")
    assert_one_line_error(r, "step_00000001.pt", "not a readable checkpoint")
    assert not marker.exists()


def test_overwrite_replaces_the_old_run_once_the_new_one_is_written(stopped, data, base, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped[0], out)
    summary = ft.train(args_for(data, out, base, "--steps", "2", "--seed", "1", "--overwrite"))
    assert summary["steps"] == 2 and (out / "model" / "config.json").is_file()
    # the stopped run's checkpoint is gone, so a later --resume cannot continue the other run
    assert plumbing.list_checkpoints(out) == []
    with pytest.raises(DataError, match="finished model and no checkpoint"):
        ft.train(args_for(data, out, base, "--steps", "2", "--seed", "1", "--resume"))


#################################################################################
#                               GPU smoke script                                #
#################################################################################

def test_gpu_smoke_skips_without_cuda_and_runs_tiny_on_cpu(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_smoke_qwen3vl", ROOT / "bench" / "gpu_smoke_qwen3vl.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert smoke.main([]) is None
    assert "SKIP" in capsys.readouterr().out
    # the same code path at 1/32 of the widths, on the CPU: the loss is finite and the step is timed
    (r,) = smoke.main(["--device", "cpu", "--tiny", "--steps", "2", "--warmup-steps", "1", "--batch-size", "1",
                       "--seq-len", "24", "--image-side", "32"])
    assert r["finite"] and r["tokens_per_s"] > 0 and r["mode"] == "plain"
