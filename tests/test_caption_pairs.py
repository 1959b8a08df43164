"""tools/caption_pairs.py: caption pairs from a folder or jsonl of media, written by a tiny
random Qwen3-VL (gibberish, but real processor, chat template and sampling), one record per good item,
failures counted and named, a rerun that skips finished items, and a killed run's half line repaired."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import encoders
from common import load_pairs
from plumbing import DataError
from tests.cli import assert_one_line, cli_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import caption_pairs as build  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Qwen3-VL save_pretrained folder (model + processor), built in a temp folder."""
    torch.set_num_threads(1)
    return encoders.build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny") / "qwen3vl", seed=0)


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


def _gif(path, frames=4):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(9)
    ims = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(frames)]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=125, loop=0)


@pytest.fixture
def media(tmp_path):
    """Two PNGs, a 4-frame GIF one folder down, a corrupt PNG and a file that is not media."""
    root = tmp_path / "media"
    _png(root / "a.png", 1)
    _png(root / "b.png", 2)
    _gif(root / "sub" / "clip.gif")
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a picture")
    (root / "notes.txt").write_text("not media")
    return root


def _run(media, tiny, out, *extra):
    return build.main(["--media", str(media), "--captioner", str(tiny), "--out", str(out),
                       "--max-new-tokens", "8", "--max-frames", "4", "--threads", "1", "--device", "cpu", *extra])


def test_folder_gives_one_pair_per_good_item_and_a_rerun_resumes(media, tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pairs" / "caption_pairs.jsonl"
    stats = _run(media, tiny, out)
    log = capsys.readouterr().out
    assert (stats["done"], stats["skipped"], stats["failed"]) == (3, 0, 1)
    assert [name for name, _ in stats["failures"]] == ["bad.png"] and "failed: bad.png: unreadable image" in log
    assert "3 done, 0 skipped (already there), 1 failed, of 4 items" in log
    assert stats["cut"] <= 6 and f"{stats['cut']} of 6 captions stopped at --max-new-tokens 8" in log
    recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert {r["media"]: r["kind"] for r in recs} == {"a.png": "image", "b.png": "image", "sub/clip.gif": "video"}
    for r in recs:
        assert set(r) == {"a", "b", "kind", "media"}
        assert isinstance(r["a"], str) and r["a"].strip() and isinstance(r["b"], str) and r["b"].strip()
        assert r["a"] != r["b"]  # two prompts, two samples
    pairs = load_pairs(out)
    assert len(pairs) == 3 and pairs[2][0].startswith("Caption Type: video\n")
    full = out.read_bytes()

    # A rerun captions nothing already there: only the corrupt file is tried (and fails) again.
    calls, real_call = [], build.Captioner.__call__
    monkeypatch.setattr(build.Captioner, "__call__",
                        lambda self, name, *a: calls.append(name) or real_call(self, name, *a))
    stats = _run(media, tiny, out)
    assert (stats["done"], stats["skipped"], stats["failed"]) == (0, 3, 1)
    assert calls == [] and out.read_bytes() == full

    # A run killed in the middle of its last line: the half line is dropped, and that item alone is
    # captioned again, with the same seed, so the file is as an uninterrupted run wrote it.
    out.write_bytes(full[:-20])
    capsys.readouterr()
    stats = _run(media, tiny, out)
    assert "dropped a half-written last line" in capsys.readouterr().out
    assert (stats["done"], stats["skipped"], stats["failed"]) == (1, 2, 1)
    assert calls == [recs[-1]["media"]] and out.read_bytes() == full


def test_jsonl_of_media_relative_to_it(tmp_path, tiny, capsys):
    _png(tmp_path / "d" / "pics" / "a.png", 3)
    _gif(tmp_path / "d" / "clips" / "walk.gif")
    lines = [{"media": "pics/a.png"}, {"media": "clips/walk.gif", "kind": "video"}, {"media": "pics/gone.png"},
             {"media": "pics/a.png"}]  # a repeat is captioned once
    src = tmp_path / "d" / "media.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    stats = _run(src, tiny, tmp_path / "p.jsonl", "--sample-seed", "3")
    assert (stats["done"], stats["skipped"], stats["failed"]) == (2, 0, 1)
    assert stats["failures"][0][0] == "pics/gone.png" and "no such file" in stats["failures"][0][1]
    recs = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(r["media"], r["kind"]) for r in recs] == [("pics/a.png", "image"), ("clips/walk.gif", "video")]


def test_empty_or_failed_captions_are_counted_never_written(media, tmp_path, capsys):
    """write_caption_pairs with a stand-in captioner: an empty caption and a crash each fail one item."""
    def caption(name, kind, pixels, meta):
        if name == "b.png":
            return ["a caption", ""]
        if name == "sub/clip.gif":
            raise RuntimeError("CUDA out of memory\nmore lines")
        assert meta is None and pixels.shape == (32, 32, 3)
        return ["first", "second"]

    items = build.media_items(media)
    out = tmp_path / "p.jsonl"
    stats = build.write_caption_pairs(items, caption, out, frames=4)
    assert (stats["done"], stats["failed"]) == (1, 3)
    why = dict(stats["failures"])
    assert sorted(why) == ["b.png", "bad.png", "sub/clip.gif"]
    assert why["b.png"] == "empty caption from prompt b" and why["bad.png"].startswith("unreadable image")
    assert why["sub/clip.gif"] == "captioner error (RuntimeError: CUDA out of memory)"
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"a": "first", "b": "second", "kind": "image", "media": "a.png"}]


def test_a_captioner_that_never_works_stops_early(media, tmp_path):
    items = [(f"copy{i}.png", media / "a.png", "image") for i in range(build.MAX_EARLY_FAILURES + 5)]
    seen = []
    with pytest.raises(DataError, match=f"failed on the first {build.MAX_EARLY_FAILURES} readable items"):
        build.write_caption_pairs(items, lambda name, *a: seen.append(name) or ["", ""], tmp_path / "p.jsonl", 4)
    assert len(seen) == build.MAX_EARLY_FAILURES and (tmp_path / "p.jsonl").read_text() == ""


def test_nothing_captioned_is_one_line_exit_2(tmp_path, tiny, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "ok.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # the signature, then nothing
    argv = ["--media", str(tmp_path / "m"), "--captioner", str(tiny), "--threads", "1",
            "--out", str(tmp_path / "p.jsonl")]
    code, err = cli_error(build.main, argv, capsys)
    assert_one_line(code, err, "none of the 1 items could be captioned (first: ok.png: unreadable image")
    assert (tmp_path / "p.jsonl").read_text() == ""


@pytest.mark.parametrize("case", ["missing folder", "no media", "unknown kind", "media file", "foreign pairs",
                                  "media as out", "odd frames", "no captioner"])
def test_bad_input_is_one_line_exit_2_and_loads_no_model(case, media, tmp_path, capsys):
    pairs = tmp_path / "p.jsonl"
    src, extra = media, []
    if case == "missing folder":
        src, message = tmp_path / "nowhere", "nowhere: no such folder or file"
    elif case == "no media":
        src, message = tmp_path / "empty", "no images (.bmp .jpeg .jpg .png .webp) or videos"
        src.mkdir()
        (src / "readme.txt").write_text("x")
    elif case == "unknown kind":
        src, message = tmp_path / "m.jsonl", "record 1: no 'kind', and 'x.tif' has no known image or video extension"
        src.write_text('{"media": "x.tif"}\n')
    elif case == "media file":
        src, message = media / "a.png", "not one media file"
    elif case == "foreign pairs":  # e.g. the world's caption pairs: neither appended to nor cut
        pairs.write_text('{"a": "x", "b": "y", "kind": "image"}\n{"a": "half')
        message = "p.jsonl:1: not a record {a, b, kind, media} of this tool"
    elif case == "media as out":  # a jsonl of media whose records name media is not a half-finished output
        src, pairs, message = tmp_path / "m.jsonl", tmp_path / "m.jsonl", "m.jsonl is --media itself"
        src.write_text('{"media": "a.png"}\n')
    elif case == "odd frames":
        extra, message = ["--max-frames", "3"], "argument --max-frames: 3 is odd"
    else:
        message = "the following arguments are required: --captioner"
    if case != "no captioner":  # a folder that holds no model: loading it would be a different error
        extra += ["--captioner", str(tmp_path / "no-model-here")]
    before = pairs.read_bytes() if pairs.exists() else None
    code, err = cli_error(build.main, ["--media", str(src), "--out", str(pairs),
                                       "--threads", "1", *extra], capsys)
    assert_one_line(code, err, message)
    assert (pairs.read_bytes() if pairs.exists() else None) == before


def test_captions_cut_at_max_new_tokens_are_counted_for_written_records_only(media, tmp_path):
    class Fake:  # both captions of every item hit the limit; a.png's first caption comes back empty
        last_cut = 0

        def __call__(self, name, kind, pixels, meta):
            self.last_cut = 2
            return ["", "b"] if name == "a.png" else ["a", "b"]
    items = [("a.png", media / "a.png", "image"), ("b.png", media / "b.png", "image")]
    stats = build.write_caption_pairs(items, Fake(), tmp_path / "p.jsonl", 4)
    assert (stats["done"], stats["failed"], stats["cut"]) == (1, 1, 2)
