"""01_build_ted6k.py: exact counts, the public file format, the training splits, determinism, input
validation with clear errors and no half-written output, folders replaced whole (a failed or killed
rebuild leaves the previous one intact), and tools/ted_from_llm.py (a fake generator and a tiny random
transformers model)."""
import copy
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import plumbing
from common import normalise_ted
from plumbing import DataError, read_jsonl
from world import checker, claims, scenes

build = importlib.import_module("01_build_ted6k")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import ted_from_llm as llm  # noqa: E402


@pytest.fixture
def world_bench(world_benchmark):
    return world_benchmark


def _tiny_args(out):
    return ["--out", str(out / "ted6k"), "--world-out", str(out / "world"), "--bench-fraction", "0.02",
            "--t2x-images", "6", "--t2x-videos", "4", "--vqa", "12", "--pairs", "8", "--eval-scenes", "4"]


#################################################################################
#                                --source world                                 #
#################################################################################

def test_world_benchmark_has_the_papers_16_cells(world_bench):
    bench, side = world_bench
    counts = build.count_cells(bench)
    for stype, (n_img, n_vid) in build.PAPER_COUNTS.items():
        assert counts[(stype, "image")] == n_img and counts[(stype, "video")] == n_vid, stype
    assert sum(counts.values()) == 6641
    assert sum(k.startswith("image_") for k in bench) == 260 and sum(k.startswith("video_") for k in bench) == 766
    table = build.format_table(counts)
    assert "| all | 1374 | 5267 | 6641 | 1374 | 5267 |" in table


def test_world_benchmark_is_in_the_public_format(world_bench):
    bench, _ = world_bench
    for key, rec in bench.items():
        assert set(rec) == {"caption", "caption_type", "statements"}
        assert key.startswith(rec["caption_type"] + "_")
        assert set(rec["statements"]) == set(claims.STATEMENT_TYPES)
        for stype, info in rec["statements"].items():
            assert set(info) == {"question", "correct_statement", "incorrect_statements"}
            if info["correct_statement"]["status"] == "success":
                assert len(info["incorrect_statements"]) == 3
                assert all(o["status"] == "success" for o in info["incorrect_statements"])
            else:
                assert info["correct_statement"]["statement"] is None and info["incorrect_statements"] == []
            if rec["caption_type"] == "image" and stype in claims.VIDEO_ONLY_TYPES:
                assert info["correct_statement"]["status"] != "success"
    # The public reader's path through the file (normalise) keeps every instance.
    assert build.count_cells(normalise_ted(bench, "<bench>")) == build.count_cells(bench)


def test_world_benchmark_ocr_only_where_asked(world_bench):
    """Captions without an OCR statement show no words: a null type means 'nothing of this kind'."""
    bench, side = world_bench
    for key, rec in bench.items():
        has_words = any(o["word"] for o in side[key]["scene"]["objects"])
        assert has_words == (rec["statements"]["OCR"]["correct_statement"]["status"] == "success")


def test_main_writes_splits_deterministically(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    build.main(_tiny_args(a))
    build.main(_tiny_args(b))
    out = capsys.readouterr().out
    assert "| type | image | video |" in out
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 20
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert not [p for p in a.rglob("*.tmp")]
    # A different seed gives a different world.
    c = tmp_path / "c"
    build.main(_tiny_args(c) + ["--seed", "1"])
    assert (c / "ted6k/ted6k.json").read_bytes() != (a / "ted6k/ted6k.json").read_bytes()


def test_training_split_records(tmp_path):
    build.main(_tiny_args(tmp_path))
    wd = tmp_path / "world"
    pairs = read_jsonl(wd / "caption_pairs.jsonl", required=("a", "b", "kind"))
    assert len(pairs) == 8 and all(p["a"] != p["b"] for p in pairs)
    vqa = read_jsonl(wd / "vqa.jsonl", required=("media", "kind", "messages"))
    assert len(vqa) == 12 and all(r["messages"][0]["role"] == "user" for r in vqa)
    # Spread over images and videos in proportion (6 images, 4 videos), every answer tagged.
    assert [r["kind"] for r in vqa[:10]].count("video") == 4
    assert all("perspective" in m for r in vqa for m in r["messages"] if m["role"] == "assistant")
    t2x = read_jsonl(wd / "t2x.jsonl", required=("media", "caption", "kind", "prompt", "scene"))
    ev = read_jsonl(wd / "eval.jsonl", required=("media", "caption", "kind", "prompt", "scene"))
    assert [r["kind"] for r in t2x] == ["image"] * 6 + ["video"] * 4 and len(ev) == 4
    for rec in t2x + ev + vqa:
        px = scenes.load_media(wd / rec["media"])
        assert px.shape == ((32, 32, 3) if rec["kind"] == "image" else (8, 32, 32, 3))
    for rec in t2x + ev:
        scores = checker.check_sample(scenes.load_media(wd / rec["media"]), rec["scene"])
        assert all(v in (None, 1.0) for v in scores.values()), scores
    scene_recs = read_jsonl(wd / "scenes.jsonl", required=("id", "split", "kind", "media", "scene"))
    assert len(scene_recs) == 14
    # Benchmark, held-out and training scenes are disjoint.
    side = json.loads((tmp_path / "ted6k/scenes.json").read_text())
    keys = [scenes.scene_key(s["scene"]) for s in side.values()] + [scenes.scene_key(r["scene"]) for r in t2x + ev]
    assert len(set(keys)) == len(keys)
    assert (wd / "preview.png").is_file() and (wd / "preview.gif").is_file()


#################################################################################
#                                --source file                                  #
#################################################################################

def _base():
    ok = {"statement": "The circle is blue.", "status": "success"}
    return {
        "image_0": {"caption": "A red circle on black.", "caption_type": "image", "statements": {
            "Adjective": {"question": "q", "correct_statement": {"statement": "The circle is red.", "status": "success"},
                          "incorrect_statements": [ok, {"statement": None, "status": "failed"},
                                                   {"statement": "The circle is green.", "status": "error"}]},
            "OCR": {"question": "q", "correct_statement": None, "incorrect_statements": []},
            "Quantity": {"question": "q", "correct_statement": {"statement": None, "status": "success"},
                         "incorrect_statements": [ok]}}},
        "video_0": {"caption": "A blue square moves left.", "caption_type": "video", "statements": {
            "Action Recognition": {"question": "q",
                                   "correct_statement": {"statement": "The square moves left.", "status": "success"},
                                   "incorrect_statements": [dict(ok, statement=f"The square moves {d}.")
                                                            for d in ("right", "up", "down")]}}},
    }


def test_file_source_normalises(tmp_path, capsys):
    src = tmp_path / "TED-6k.json"
    src.write_text(json.dumps(_base()))
    out = build.main(["--source", "file", "--benchmark", str(src), "--out", str(tmp_path / "o")])
    assert set(out["image_0"]["statements"]) == {"Adjective"}        # null / non-success positives dropped
    assert out["image_0"]["statements"]["Adjective"]["incorrect_statements"] == [
        {"statement": "The circle is blue.", "status": "success"}]    # failed / null negatives dropped
    assert len(out["video_0"]["statements"]["Action Recognition"]["incorrect_statements"]) == 3
    written = json.loads((tmp_path / "o/ted6k.json").read_text())
    assert written == out
    assert "| Adjective | 1 | 0 | 1 |" in capsys.readouterr().out
    # Normalising is idempotent.
    assert normalise_ted(written, "<written>") == written


def test_file_source_roundtrips_the_world_benchmark(tmp_path):
    build.main(["--out", str(tmp_path), "--bench-fraction", "0.05", "--no-splits"])
    before = json.loads((tmp_path / "ted6k.json").read_text())
    after = build.main(["--source", "file", "--benchmark", str(tmp_path / "ted6k.json"), "--out", str(tmp_path / "n")])
    assert build.count_cells(after) == build.count_cells(before) and sum(build.count_cells(after).values()) > 300


def _set(path, value):
    def edit(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return d
    return edit


def _rename_type(d):
    d["image_0"]["statements"]["Colour"] = d["image_0"]["statements"].pop("Adjective")
    return d


BAD = {
    "missing key": (_set(["video_0", "caption"], KeyError), "record 'video_0': missing key 'caption'"),
    "missing statements": (_set(["image_0", "statements"], KeyError), "record 'image_0': missing key 'statements'"),
    "unknown type": (_rename_type, "record 'image_0': unknown statement type 'Colour'"),
    "caption type": (_set(["video_0", "caption_type"], "audio"), "record 'video_0': caption_type 'audio'"),
    "empty caption": (_set(["image_0", "caption"], "  "), "record 'image_0': empty caption"),
    "missing question": (_set(["video_0", "statements", "Action Recognition", "question"], KeyError),
                         "missing key 'question'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_file_source_errors_name_the_record(tmp_path, case):
    edit, expected = BAD[case]
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(edit(copy.deepcopy(_base()))))
    out = tmp_path / "o"
    out.mkdir()
    (out / "ted6k.json").write_text("previous")
    with pytest.raises(DataError) as e:
        build.main(["--source", "file", "--benchmark", str(src), "--out", str(out), "--overwrite"])
    assert str(src) in str(e.value) and expected in str(e.value), str(e.value)
    assert (out / "ted6k.json").read_text() == "previous"      # nothing half-written, nothing replaced
    assert [p.name for p in out.iterdir()] == ["ted6k.json"]


@pytest.mark.parametrize("text", ["{not json", json.dumps(_base())[:-40], "[]", "{}"])
def test_file_source_rejects_malformed_json(tmp_path, text):
    src = tmp_path / "bad.json"
    src.write_text(text)
    with pytest.raises(DataError) as e:
        build.main(["--source", "file", "--benchmark", str(src), "--out", str(tmp_path / "o")])
    assert str(src) in str(e.value)
    assert not (tmp_path / "o").exists()


def test_cli_reports_one_clear_error(tmp_path):
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(_set(["video_0", "caption_type"], "audio")(_base())))
    r = subprocess.run([sys.executable, str(ROOT / "01_build_ted6k.py"), "--source", "file", "--benchmark", str(src),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    assert "error:" in r.stderr and "video_0" in r.stderr and "Traceback" not in r.stderr


#################################################################################
#                         tools/ted_from_llm.py                                #
#################################################################################

class FakeGenerator:
    """Well-formed JSON (wrapped in chatter, as real models do); null for OCR."""

    def __init__(self):
        self.prompts = []

    def generate(self, prompt):
        self.prompts.append(prompt)
        if "Write ONE" in prompt:
            if "(OCR)" in prompt:
                return '{"statement": null}'
            return 'Sure! ```json\n{"statement": "The red circle is on the left."}\n```'
        return '{"statements": ["The blue circle is on the left.", "The red circle is on the right.", ' \
               '"The red square is on the left."]}'


class BadGenerator:
    """Every way a model's reply can be unusable, one per statement type (and one crash)."""

    def generate(self, prompt):
        if "Write ONE" in prompt:
            if "(Adjective)" in prompt:
                return "I think the circle is red."                       # no JSON
            if "(Quantity)" in prompt:
                raise RuntimeError("CUDA out of memory")                  # generator crashes
            if "(Adverb)" in prompt:
                return '{"statement": 42}'
            return '{"statement": "The circle is red."}'
        if "(Basic Event)" in prompt:
            return '{"statements": ["a", "b"]}'                           # two, not three
        if "(Coreference)" in prompt:
            return '{"statements": ["The circle is red.", "x", "x"]}'     # duplicates of the positive / each other
        return '{"statements": ["one", "two", "three"]}'


def _captions(tmp_path):
    p = tmp_path / "captions.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"caption": "A red circle on the left of a blue square.", "caption_type": "image"},
        {"caption": "A red circle slides left, then stops.", "kind": "video", "key": "clip_a"}]) + "\n")
    return p


def _llm_args(captions, out):
    return ["--captions", str(captions), "--generator", "fake", "--out", str(out)]


def _use_generator(monkeypatch, gen):
    """main builds its generator from --generator; here it gets `gen` whatever the name."""
    monkeypatch.setattr(llm, "HFGenerator", lambda *args, **kwargs: gen)


def test_llm_source_with_a_fake_generator(tmp_path, monkeypatch):
    gen = FakeGenerator()
    _use_generator(monkeypatch, gen)
    out = llm.main(_llm_args(_captions(tmp_path), tmp_path / "o"))
    assert list(out) == ["image_0", "clip_a"]
    assert set(out["image_0"]["statements"]) == set(claims.STATEMENT_TYPES) - set(claims.VIDEO_ONLY_TYPES)
    assert set(out["clip_a"]["statements"]) == set(claims.STATEMENT_TYPES)
    adj = out["clip_a"]["statements"]["Adjective"]
    assert adj["correct_statement"] == {"statement": "The red circle is on the left.", "status": "success"}
    assert [o["status"] for o in adj["incorrect_statements"]] == ["success"] * 3
    assert out["clip_a"]["statements"]["OCR"]["correct_statement"] == {"statement": None, "status": "null"}
    assert any("A red circle slides left" in p and "(Temporal)" in p for p in gen.prompts)
    counts = build.count_cells(normalise_ted(json.loads((tmp_path / "o/ted6k.json").read_text()), "ted6k.json"))
    assert counts[("Adjective", "video")] == 1 and counts[("OCR", "video")] == 0 and sum(counts.values()) == 6 + 8


def test_llm_source_marks_failures_instead_of_crashing(tmp_path, monkeypatch):
    _use_generator(monkeypatch, BadGenerator())
    out = llm.main(_llm_args(_captions(tmp_path), tmp_path / "o"))
    st = out["clip_a"]["statements"]
    for t in ("Adjective", "Quantity", "Adverb"):
        assert st[t]["correct_statement"]["status"].startswith("failed"), t
    assert all(o["status"].startswith("failed") for o in st["Basic Event"]["incorrect_statements"])
    assert st["Basic Event"]["correct_statement"]["status"].startswith("failed")   # unusable without a negative
    assert [o["status"] for o in st["Coreference"]["incorrect_statements"]] == \
        ["failed: duplicate of another option", "success", "failed: duplicate of another option"]
    assert st["Coreference"]["correct_statement"]["status"] == "success"
    assert st["OCR"]["correct_statement"]["status"] == "success"
    # The file is valid input for --source file.
    normal = normalise_ted(json.loads((tmp_path / "o/ted6k.json").read_text()), "ted6k.json")
    assert set(normal["clip_a"]["statements"]) == {"Coreference", "OCR", "Spatial Relationship", "Temporal",
                                                   "Action Recognition"}


def test_llm_captions_file_errors(tmp_path, monkeypatch):
    _use_generator(monkeypatch, FakeGenerator())
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"caption": "x", "caption_type": "audio"}) + "\n")
    with pytest.raises(DataError, match="record 1: caption_type 'audio'"):
        llm.main(_llm_args(p, tmp_path / "o"))
    p.write_text(json.dumps({"caption": "", "caption_type": "image"}) + "\n")
    with pytest.raises(DataError, match="record 1: empty caption"):
        llm.main(_llm_args(p, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def _tiny_causal_lm(path):
    """A randomly initialised 2-layer Llama with a word-level tokenizer and a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[UNK]", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(claims.text_corpus(200, seed=0), trainers.WordLevelTrainer(special_tokens=specials))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>",
                                 bos_token="<|im_start|>", eos_token="<|im_end|>")
    hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cfg = LlamaConfig(vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=hf.pad_token_id, bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    hf.save_pretrained(path)
    return path


def test_llm_source_with_a_tiny_random_model(tmp_path):
    """Real transformers generation end to end: the model emits garbage, every option is marked failed,
    and a benchmark with nothing to score is refused rather than written."""
    import torch
    torch.set_num_threads(1)
    model_dir = _tiny_causal_lm(tmp_path / "tiny")
    gen = llm.HFGenerator(str(model_dir), max_new_tokens=12)
    reply = gen.generate("Reply with JSON only")
    assert isinstance(reply, str)
    captions = _captions(tmp_path)
    for info in llm.build_from_llm(llm.read_captions(captions)[:1], gen)["image_0"]["statements"].values():
        assert info["correct_statement"]["status"].startswith("failed"), info
    with pytest.raises(DataError, match=r"--generator .*tiny: no scorable statement for the 2 caption\(s\) of "
                                        r".*captions.jsonl \(most common: failed: no JSON object"):
        llm.main(["--captions", str(captions), "--out", str(tmp_path / "o"),
                    "--generator", str(model_dir), "--max-new-tokens", "12", "--threads", "1", "--device", "cpu"])
    assert not (tmp_path / "o").exists()


#################################################################################
#              Bad input: one line, non-zero exit, nothing replaced             #
#################################################################################

@pytest.fixture(scope="module")
def previous(tmp_path_factory):
    """A finished tiny build (benchmark + world) that every failing run below must leave as it was."""
    root = tmp_path_factory.mktemp("previous")
    build.main(_tiny_args(root))
    return root


def _snapshot(root):
    """{relative path: bytes} of every file under root, and the folders, to compare byte for byte."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _ted(edit=None):
    """A valid TED-6k file's text, after `edit` on its object."""
    d = copy.deepcopy(_base())
    return json.dumps(edit(d) if edit else d)


def _all_null(d):
    for rec in d.values():
        for info in rec["statements"].values():
            info["correct_statement"] = {"statement": None, "status": "null"}
    return d


_DUP_RECORD = '{"image_0": %s, "image_0": %s}' % ((json.dumps(_base()["image_0"]),) * 2)
_CAPS = json.dumps({"caption": "A red circle.", "caption_type": "image"}) + "\n"

# id: (argv after the previous build's --out/--world-out ({bad} = a file holding `content`), content,
#      what the one error line must say). Every row also passes --overwrite, so only the bad input can stop it.
FILE = ["--source", "file", "--benchmark", "{bad}"]
LLM = ["@llm", "--generator", "fake", "--captions", "{bad}"]
ROWS = {
    # --source file: bad benchmark content, refused by common's TED-6K checks
    "positive is a string": (FILE, _ted(_set(["video_0", "statements", "Action Recognition", "correct_statement"],
                                             "The square moves left.")),
                             "record 'video_0', type 'Action Recognition': correct_statement must be an object"),
    "duplicate record keys": (FILE, _DUP_RECORD, "duplicate key(s) ['image_0']"),
    "numeric caption": (FILE, _ted(_set(["image_0", "caption"], 42)),
                        "record 'image_0': caption must be a string, got int"),
    "non-UTF-8": (FILE, b'{"image_0": {"caption": "caf\xe9"}}', "not UTF-8 text"),
    "zero scorable instances": (FILE, _ted(_all_null), "no scorable statement"),
    "no such benchmark": (["--source", "file", "--benchmark", "{bad}"], None, "bad.json: no such file"),
    # tools/ted_from_llm.py: bad captions file
    "numeric llm caption": (LLM, json.dumps({"caption": 7, "caption_type": "image"}),
                            "record 1: caption must be a string, got int"),
    "duplicate llm keys": (LLM, _CAPS.replace("}", ', "key": "a"}') * 2, "duplicate key(s) ['a']"),
    "non-UTF-8 captions": (LLM, b'{"caption": "\xff", "caption_type": "image"}\n', "not UTF-8 text"),
    "numeric llm key": (LLM, _CAPS.replace("}", ', "key": 3}'), "record 1: key must be a non-empty string"),
    # flags: range-checked, each used by its source, a source's inputs present
    "negative count": (["--pairs", "-1"], None, "argument --pairs: -1 is out of range"),
    "zero fraction": (["--bench-fraction", "0"], None, "argument --bench-fraction: 0 is out of range"),
    "count not a number": (["--t2x-images", "many"], None, "argument --t2x-images: 'many' is not"),
    "zero max-new-tokens": (LLM + ["--max-new-tokens", "0"], _CAPS, "argument --max-new-tokens: 0 is out of range"),
    "negative threads": (LLM + ["--threads", "-2"], _CAPS, "argument --threads: -2 is out of range"),
    "fraction with no instance": (["--bench-fraction", "0.0001"], None,
                                  "--bench-fraction 0.0001: the benchmark holds no instance"),
    "file source without file": (["--source", "file"], None, "--source file needs --benchmark"),
    "llm without model": (["@llm", "--captions", "{bad}"], _CAPS, "the following arguments are required: --generator"),
    "flag of a tool": (["--generator", "x"], None, "unrecognized arguments: --generator x"),
    "seed with a file": (FILE + ["--seed", "1"], _ted(), "--seed is for --source world, not file"),
    "split size without splits": (["--no-splits", "--vqa", "3"], None, "--vqa does nothing with --no-splits"),
}


def _bad_run(previous, tmp_path, row, overwrite=True):
    """Copy the previous build, write the row's bad file; (argv, folder holding the copy)."""
    argv, content, _ = row
    prev = tmp_path / "prev"
    shutil.copytree(previous, prev)
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = [a.replace("{bad}", str(bad)) for a in argv]
    out = ["--out", str(prev / "ted6k")] + ([] if "--source" in argv and argv[argv.index("--source") + 1] != "world"
                                            or "--no-splits" in argv or "@llm" in argv else ["--world-out", str(prev / "world")])
    return argv + out + (["--overwrite"] if overwrite else []), prev


def _one_line_error(argv, capsys):
    """Run argv through the CLI's own wrapper: (exit status, stderr)."""
    with pytest.raises(SystemExit) as e:
        plumbing.run_cli(lambda: llm.main(argv[1:]) if argv[0] == "@llm" else build.main(argv))
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", ROWS)
def test_bad_input_is_one_line_and_replaces_nothing(previous, tmp_path, case, capsys, monkeypatch):
    monkeypatch.setattr(llm, "HFGenerator", lambda *a, **k: FakeGenerator())
    argv, prev = _bad_run(previous, tmp_path, ROWS[case])
    before = _snapshot(prev)
    rc, err = _one_line_error(argv, capsys)
    assert rc != 0 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: ") and ROWS[case][2] in err, err
    if ROWS[case][0] in (FILE, LLM):
        assert str(tmp_path / "bad.json") in err          # names the file (and the record, in the rows above)
    assert _snapshot(prev) == before                      # previous output byte-identical, no temp left
    assert sorted(p.name for p in prev.parent.iterdir()) == sorted(["prev"] + (["bad.json"] if ROWS[case][1]
                                                                                 is not None else []))


def test_bad_input_from_the_command_line(previous, tmp_path, case="numeric caption"):
    """A row above through a real interpreter: one stderr line, exit status 2, nothing replaced."""
    argv, prev = _bad_run(previous, tmp_path, ROWS[case])
    before = _snapshot(prev)
    r = subprocess.run([sys.executable, str(ROOT / "01_build_ted6k.py")] + argv,
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and ROWS[case][2] in r.stderr, r.stderr
    assert _snapshot(prev) == before


def test_existing_output_needs_overwrite(previous, tmp_path, capsys):
    argv, prev = _bad_run(previous, tmp_path, ([], None, ""), overwrite=False)
    before = _snapshot(prev)
    rc, err = _one_line_error(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and "ted6k already holds a benchmark: --overwrite" in err, err
    rc, err = _one_line_error(argv[:-2] + ["--world-out", str(prev / "world"), "--out", str(tmp_path / "new")], capsys)
    assert rc == 2 and "world already holds a world: --overwrite" in err, err
    assert _snapshot(prev) == before and not (tmp_path / "new").exists()


@pytest.mark.parametrize("where", ["--out", "--world-out"])
def test_a_folder_01_did_not_write_is_never_replaced(previous, tmp_path, capsys, where):
    argv, prev = _bad_run(previous, tmp_path, ([], None, ""))
    folder = prev / ("ted6k" if where == "--out" else "world")
    (folder / "notes.txt").write_text("mine")
    before = _snapshot(prev)
    rc, err = _one_line_error(argv, capsys)
    assert rc == 2 and f"{where} {folder}: holds ['notes.txt'], which 01 does not write" in err, err
    assert _snapshot(prev) == before


def test_out_and_world_out_must_differ(tmp_path, capsys):
    rc, err = _one_line_error(["--out", str(tmp_path / "a"), "--world-out", str(tmp_path / "a" / "w")], capsys)
    assert rc == 2 and "must be separate folders" in err and not (tmp_path / "a").exists()


#################################################################################
#              Rebuilding over a previous build: replaced whole or not at all   #
#################################################################################

def _rebuild(previous, tmp_path, *extra):
    """A copy of the previous build and the argv that rebuilds it in place with another seed."""
    prev = tmp_path / "prev"
    shutil.copytree(previous, prev)
    return _tiny_args(prev) + ["--seed", "1", "--overwrite", *extra], prev


def test_failed_rebuild_leaves_the_previous_build_intact(previous, tmp_path, monkeypatch):
    """A rebuild that dies after writing media (here: while writing VQA) changes nothing: the world is
    built in a temp folder and swapped in whole, so captions never pair with another build's pictures."""
    argv, prev = _rebuild(previous, tmp_path)
    before = _snapshot(prev)

    def die(*args, **kwargs):
        if not list(prev.glob(".world.*.tmp/media/t2x_*")):
            raise AssertionError("the new media should be written by now")
        raise RuntimeError("killed mid-way")
    monkeypatch.setattr(scenes, "write_vqa", die)
    with pytest.raises(RuntimeError, match="killed mid-way"):
        build.main(argv)
    assert _snapshot(prev) == before                     # no file changed, no temp folder left behind


def test_rebuild_replaces_both_folders_whole(previous, tmp_path):
    """--overwrite with other sizes: no file of the previous world survives, benchmark and world agree."""
    argv, prev = _rebuild(previous, tmp_path, "--t2x-images", "2")
    build.main(argv)
    assert not (prev / "world/media/t2x_000005.png").exists()             # the previous run's 6th image
    t2x = read_jsonl(prev / "world/t2x.jsonl")
    assert len(t2x) == 6 and len(list((prev / "world/media").iterdir())) == 6 + 4
    for rec in t2x:
        scores = checker.check_sample(scenes.load_media(prev / "world" / rec["media"]), rec["scene"])
        assert all(v in (None, 1.0) for v in scores.values()), scores
    fresh = tmp_path / "fresh"
    build.main(argv[:-3] + ["--out", str(fresh / "ted6k"), "--world-out", str(fresh / "world"), "--t2x-images", "2"])
    assert _snapshot(prev) == _snapshot(fresh)                            # as if built into empty folders
    assert sorted(p.name for p in prev.iterdir()) == ["ted6k", "world"]


def test_killed_rebuild_leaves_the_previous_build_intact(previous, tmp_path):
    """kill -9 while the new world's media are being written: the previous build is byte-identical."""
    argv, prev = _rebuild(previous, tmp_path, "--t2x-images", "3000")
    before = _snapshot(prev)
    proc = subprocess.Popen([sys.executable, str(ROOT / "01_build_ted6k.py")] + argv, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(list(prev.glob(".world.*.tmp/media/t2x_*"))) < 20:
            assert proc.poll() is None and time.time() < deadline, "the rebuild ended before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert {k: v for k, v in _snapshot(prev).items() if not k.startswith(".world.")} == before  # its temp aside
