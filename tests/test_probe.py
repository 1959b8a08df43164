"""02_probe_encoders.py and common's TED-6K / caption-pair readers: the scoring protocol with known answers,
bad input (one line, previous results untouched), DDP == single process."""
import hashlib
import importlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import models
import encoders
import plumbing
from common import DataError

probe = importlib.import_module("02_probe_encoders")
ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- hand-built data
# TED-style data with known answers: captions state three (colour, shape) facts; positives are caption
# facts, negatives are absent facts.

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
TYPES = ["Adjective", "Quantity", "Spatial Relationship"]
FACT = re.compile(r"(red|green|blue|yellow|purple|orange) (circle|square|triangle)")


def scene(rng):
    """Three distinct (colour, shape) facts."""
    return rng.sample([(c, s) for c in COLOURS for s in SHAPES], 3)


def caption(facts, style):
    if style == 0:
        return " ".join(f"There is a {c} {s}." for c, s in facts)
    return "The picture holds " + ", ".join(f"one {c} {s}" for c, s in reversed(facts)) + "."


def make_benchmark(n=24, seed=0):
    """TED-format dict: each instance's positives are caption facts, negatives are absent facts."""
    rng = random.Random(seed)
    bench = {}
    for i in range(n):
        kind = "image" if i % 2 == 0 else "video"
        facts = scene(rng)
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in facts]
        statements = {}
        for t in TYPES:
            pos = rng.choice(facts)
            negs = rng.sample(absent, 3)
            statements[t] = {"question": "?", "correct_statement": {"statement": f"The {pos[0]} {pos[1]} is shown.",
                                                                     "status": "success"},
                             "incorrect_statements": [{"statement": f"The {c} {s} is shown.", "status": "success"}
                                                      for c, s in negs]}
        bench[f"{kind}_{i}"] = {"caption": caption(facts, 0), "caption_type": kind, "statements": statements}
    return bench


def make_pairs(n=64, seed=1):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        facts = scene(rng)
        out.append({"a": caption(facts, 0), "b": caption(facts, 1), "kind": "image" if i % 2 else "video"})
    return out


def write(tmp_path, n_bench=24, n_pairs=64):
    bench, pairs = tmp_path / "ted.json", tmp_path / "pairs.jsonl"
    bench.write_text(json.dumps(make_benchmark(n_bench)))
    pairs.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(n_pairs)))
    return bench, pairs


def facts_of(text):
    return set(FACT.findall(text))



def oracle(text):
    """Bag of the (colour, shape) facts a text states: the caption contains the positive's fact only."""
    v = torch.zeros(len(COLOURS) * len(SHAPES))
    for c, s in facts_of(text):
        v[COLOURS.index(c) * len(SHAPES) + SHAPES.index(s)] = 1
    return v


def questions(tmp_path, n=24):
    bench, _ = write(tmp_path, n_bench=n)
    return common.read_ted(bench)[1]


# ----------------------------------------------------------------------------- scoring protocol

def test_oracle_scores_100(tmp_path):
    r = probe.score_questions(questions(tmp_path), oracle)
    assert r["overall"] == 100.0 and r["n"] == 72
    assert set(r["by_type"]) == set(TYPES) and set(r["by_caption_type"]) == {"image", "video"}
    assert all(v == 100.0 for v in r["by_both"].values())


def test_anti_oracle_and_constant_score_0(tmp_path):
    qs = questions(tmp_path)
    # anti-oracle: captions embed the facts they do NOT state, so the positive is always the farthest
    anti = lambda t: 1 - oracle(t) if t.startswith("Caption Type:") else oracle(t)  # noqa: E731
    assert probe.score_questions(qs, anti)["overall"] == 0.0
    # a constant encoder ties every option: a tie is not a win, whatever the option order
    assert probe.score_questions(qs, lambda t: torch.ones(4))["overall"] == 0.0


def test_random_features_score_chance(tmp_path):
    qs = questions(tmp_path, n=200)  # 600 questions, 4 options each

    def rand(t):
        g = torch.Generator().manual_seed(int(hashlib.md5(t.encode()).hexdigest()[:8], 16))
        return torch.randn(32, generator=g)

    acc = probe.score_questions(qs, rand)["overall"]
    assert 19.0 < acc < 31.0, acc


def test_bag_of_words_reference_known_answers():
    q = lambda pos, negs: {"key": "k", "caption": "a red circle left of a blue square", "kind": "image",  # noqa: E731
                           "type": "Adjective", "positive": pos, "negatives": negs}
    # only the positive shares the caption's words: it wins
    assert probe.bag_of_words_reference([q("red circle", ["green circle", "yellow triangle"])])["overall"] == 100.0
    # a re-binding uses the same words: a tie, and a tie is not a win
    assert probe.bag_of_words_reference([q("red circle blue square", ["blue circle red square"])])["overall"] == 0.0
    # a negative closer in words wins
    assert probe.bag_of_words_reference([q("green circle", ["red circle"])])["overall"] == 0.0


def test_questions_beyond_words_are_the_ones_the_bag_of_words_gets_wrong():
    q = lambda pos, negs: {"key": "k", "caption": "a red circle left of a blue square", "kind": "image",  # noqa: E731
                           "type": "Adjective", "positive": pos, "negatives": negs}
    qs = [q("red circle", ["green circle"]), q("red circle blue square", ["blue circle red square"]),
          q("green circle", ["red circle"]), q("blue square", ["yellow square"])]
    bow = probe.bag_of_words_reference(qs)
    assert [x["beyond_words"] for x in qs] == [False, True, True, False]
    assert bow["overall"] == 50.0 and bow["beyond_words"] == 0.0  # by construction
    # an encoder that answers only the second question: 25% overall, 50% of the two beyond words
    second = lambda t: torch.tensor([1.0, 0.0]) if t in ("red circle blue square",) or "Caption" in t \
        else torch.tensor([0.0, 1.0])  # noqa: E731
    r = probe.score_questions(qs, second)
    assert r["overall"] == 25.0 and r["beyond_words"] == 50.0


# ----------------------------------------------------------------------------- zero-shot reference

class StubEncoder:
    """An encoder whose every token of a text carries `vector(text)`; padding carries large noise, so a
    pooled vector that is not exactly vector(text) (padding counted in) scores wrongly."""

    num_layers, max_length = 1, 64

    def __init__(self, vector):
        self.vector = vector
        self.width = len(vector("x"))

    def tokenizer(self, texts, truncation=True, max_length=None):
        return {"input_ids": [[0] * len(t.split()) for t in texts]}

    def encode(self, texts):
        lengths = [len(t.split()) for t in texts]
        hidden = 1000 * torch.randn(1, len(texts), max(lengths), self.width)
        mask = torch.zeros(len(texts), max(lengths), dtype=torch.long)
        for i, (t, n) in enumerate(zip(texts, lengths)):
            hidden[0, i, :n] = self.vector(t)
            mask[i, :n] = 1
        return hidden, mask


def zero_shot(qs, vector):
    """The zero-shot reference of a stub encoder, through 02's own embedding and scoring path."""
    enc = StubEncoder(vector)
    args = probe.get_parser().parse_args(["--token-budget", "64"])  # several batches, each with padding
    args.feature_dtype = torch.float32
    texts = probe.benchmark_texts(qs)
    emb = probe.embed_texts(enc, probe.make_fusions(["last"], enc), [], texts, args, "cpu")
    assert set(emb) == {("last", probe.ZERO_SHOT)}  # no aggregator: only the reference
    row = {t: i for i, t in enumerate(texts)}
    return probe.score_questions(qs, lambda t: emb["last", probe.ZERO_SHOT][row[t]])["overall"]


def test_zero_shot_reference_oracle_and_constant(tmp_path):
    qs = questions(tmp_path)
    # the positive's fact is the one of the caption's the options share: mean pooling keeps it, padding excluded
    assert zero_shot(qs, lambda t: oracle(t) + 0.0) == 100.0
    # a constant vector ties every option, and a tie is not a win
    assert zero_shot(qs, lambda t: torch.ones(8)) == 0.0
    mask = torch.tensor([[1, 1, 0]])
    feats = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [0.0, 99.0]]])
    torch.testing.assert_close(probe.mean_pool(feats, mask), torch.tensor([[1.0, 0.0]]))  # L2-normalised


def test_dropped_options_and_caption_template(tmp_path, capsys):
    bench = make_benchmark(2)
    st = bench["image_0"]["statements"]
    st["Adjective"]["incorrect_statements"][0]["status"] = "failed"
    st["Adjective"]["incorrect_statements"][1]["statement"] = None
    st["Quantity"]["correct_statement"] = {"statement": None, "status": "success"}
    st["Spatial Relationship"]["correct_statement"]["status"] = "failed"
    for n in st["Spatial Relationship"]["incorrect_statements"]:
        n["status"] = "error"
    st["Quantity"] = dict(st["Adjective"], correct_statement={"statement": "Two shapes.", "status": "success"},
                          incorrect_statements=[{"statement": "x", "status": "failed"}])  # no usable negative
    path = tmp_path / "b.json"
    path.write_text(json.dumps(bench))
    normal, qs = common.read_ted(path)
    assert "0 negative(s) identical to their positive and 1 statement(s) with a positive but no usable negative " \
        "left out" in capsys.readouterr().out
    assert list(normal["image_0"]["statements"]) == ["Adjective"]
    assert common.normalise_ted(normal, path) == normal  # its own output reads back unchanged
    mine = [q for q in qs if q["key"] == "image_0"]
    assert [q["type"] for q in mine] == ["Adjective"] and len(mine[0]["negatives"]) == 1
    assert len(qs) == 4
    texts = probe.benchmark_texts(qs)
    assert texts[0] == "Caption Type: image\nCaption: " + bench["image_0"]["caption"]
    assert len(texts) == len(set(texts))  # deduped


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("mutate,match", [
    (lambda b: b["image_0"].pop("caption"), "record 'image_0': missing key 'caption'"),
    (lambda b: b["image_0"].update(caption_type="audio"), "caption_type 'audio' is not 'image' or 'video'"),
    (lambda b: b["video_1"].update(statements=[]), "'statements' must be an object"),
    (lambda b: b["video_1"]["statements"]["Adjective"].pop("incorrect_statements"),
     "record 'video_1', type 'Adjective': missing key 'incorrect_statements'"),
    (lambda b: b.update(image_0=5), "expected an object"),
    (lambda b: b["image_0"]["statements"].update(Colour=b["image_0"]["statements"].pop("Adjective")),
     "record 'image_0': unknown statement type 'Colour'"),
    (lambda b: b["image_0"]["statements"]["Quantity"]["incorrect_statements"].append("The red square is shown."),
     r"type 'Quantity': incorrect_statements\[3\] must be an object"),
    (lambda b: b["image_0"]["statements"]["Quantity"]["correct_statement"].update(statement=7),
     "type 'Quantity': correct_statement: statement must be a string, got int"),
])
def test_invalid_benchmark_records(tmp_path, mutate, match):
    bench = make_benchmark(4)
    mutate(bench)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bench))
    with pytest.raises(DataError, match=match):
        common.read_ted(path)


def test_unscorable_or_malformed_benchmark(tmp_path):
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(DataError, match="non-empty JSON object"):
        common.read_ted(tmp_path / "empty.json")
    (tmp_path / "trunc.json").write_text('{"image_0": {')
    with pytest.raises(DataError, match="malformed JSON"):
        common.read_ted(tmp_path / "trunc.json")
    bench = make_benchmark(1)
    for q in bench["image_0"]["statements"].values():
        q["correct_statement"]["status"] = "failed"
    (tmp_path / "none.json").write_text(json.dumps(bench))
    with pytest.raises(DataError, match="no scorable statement"):
        common.read_ted(tmp_path / "none.json")


def test_caption_pair_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no records"):
        common.load_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": "x", "b": "", "kind": "image"}\n')
    with pytest.raises(DataError, match="record 1"):
        common.load_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "few.jsonl").write_text('{"a": "x", "b": "y", "kind": "image"}\n')
    with pytest.raises(DataError, match="fewer than one global batch"):
        probe.schedule(1, 10, 4, 0)


# Issue 12 through the command line: one line on stderr naming the file / record / flag and the problem,
# a non-zero exit, no traceback, and the previous results.json byte for byte.

def _edit(mutate):
    """A bad benchmark file: the hand-built benchmark after `mutate(dict)`, as JSON text."""
    def text():
        bench = make_benchmark(4)
        mutate(bench)
        return json.dumps(bench).encode()
    return text


def _image0(**kv):
    return _edit(lambda b: b["image_0"].update(kv))


def _adjective(edit):
    return _edit(lambda b: edit(b["image_0"]["statements"]["Adjective"]))


def _no_positive(b):
    for rec in b.values():
        for q in rec["statements"].values():
            q["correct_statement"]["status"] = "failed"


BAD_BENCHMARK = {
    "positive is a string": (_adjective(lambda q: q.update(correct_statement="The red circle is shown.")),
                             "record 'image_0', type 'Adjective': correct_statement must be an object"),
    "duplicate record key": (lambda: json.dumps(make_benchmark(2))[:-1].encode()
                             + b', "image_0": ' + json.dumps(make_benchmark(1)["image_0"]).encode() + b"}",
                             "duplicate key(s) ['image_0']"),
    "numeric caption": (_image0(caption=12), "record 'image_0': caption must be a string, got int"),
    "zero scorable instances": (_edit(_no_positive), "no scorable statement"),
    "not UTF-8": (lambda: b'{"image_0": {"caption": "caf\xe9"}}', "not UTF-8"),
}


def _cli(tmp_path, capsys, *args, in_subprocess=False):
    """Run 02 as the command line does (run_cli), with small settings, against a folder holding a previous
    result. In-process by default (a python + torch start per row would cost seconds each); a few rows
    also run as a real subprocess."""
    bench, pairs = write(tmp_path, n_bench=4, n_pairs=16)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text('{"previous": true}\n')
    base = {"--benchmark": str(bench), "--caption-pairs": str(pairs), "--out": str(out), "--encoders": "tiny-qwen3",
            "--steps": "2", "--batch-size": "8", "--width": "32", "--out-dim": "16", "--heads": "4",
            "--encoder-dtype": "fp32", "--threads": "1", "--seeds": "0"}
    base.update(dict(zip(args[0::2], args[1::2])))
    argv = ["--overwrite"] + [x for kv in base.items() for x in kv]
    if in_subprocess:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        r = subprocess.run([sys.executable, "02_probe_encoders.py"] + argv, cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        rc, stdout, stderr = r.returncode, r.stdout, r.stderr
    else:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            plumbing.run_cli(lambda: probe.main(argv))
        rc = e.value.code
        stdout, stderr = capsys.readouterr()
    assert rc not in (0, None) and "Traceback" not in stderr, stderr
    assert (out / "results.json").read_text() == '{"previous": true}\n'
    assert not (out / "aggregators").exists()
    return stdout, stderr


@pytest.mark.parametrize("case", sorted(BAD_BENCHMARK))
def test_bad_benchmark_one_line_and_previous_results_kept(tmp_path, capsys, case):
    make, expected = BAD_BENCHMARK[case]
    bad = tmp_path / "bad.json"
    bad.write_bytes(make())
    _, stderr = _cli(tmp_path, capsys, "--benchmark", str(bad), in_subprocess=case == "positive is a string")
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and expected in lines[0], stderr


@pytest.mark.parametrize("args,expected", [
    (["--encoders", "tiny-qwen3,no-such-encoder"], "'no-such-encoder' is not one of"),   # refused before any runs
    (["--encoders", "tiny-qwen3,runs/no/such/model"], "'runs/no/such/model' is not a local path"),
    (["--strategies", "last,learned"], "--strategies learned"),
    (["--strategies", "frozen"], "--strategies frozen needs --layer-weights"),
    (["--max-pairs", "-60"], "argument --max-pairs: -60 is out of range"),
    (["--batch-size", "0"], "argument --batch-size: 0 is out of range"),
    (["--grad-clip", "0"], "argument --grad-clip: 0 is out of range"),
    (["--threads", "auto"], "argument --threads: 'auto' is not a non-negative integer"),
])
def test_bad_flags_refused_before_anything_runs(tmp_path, capsys, args, expected):
    stdout, stderr = _cli(tmp_path, capsys, *args, in_subprocess=args[0] == "--max-pairs")
    assert len(stderr.strip().splitlines()) == 1 and expected in stderr, stderr  # no usage text
    assert "step 1/" not in stdout


def test_a_seed_given_twice_is_refused(tmp_path):
    with pytest.raises(DataError, match="--seeds 0 1 0: a seed given twice"):
        probe.main(["--seeds", "0", "1", "0", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_existing_results_need_overwrite(tmp_path):
    bench, pairs = write(tmp_path, n_bench=4, n_pairs=16)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")
    with pytest.raises(DataError, match="already holds probe results: --overwrite"):
        probe.main(["--benchmark", str(bench), "--caption-pairs", str(pairs), "--out", str(tmp_path / "out"),
                    "--encoders", "tiny-qwen3"])


def test_failure_at_the_second_encoder_keeps_previous_results(tmp_path, capsys):
    """A run that fails part-way (here: layer weights that fit the first encoder, not the second) writes
    nothing: results.json, results.md and aggregators/ land together, once every encoder is done."""
    models.save_layer_weights(tmp_path / "w.pt", models.LayerFusion("learned", 4), "tiny-qwen3", 4)
    stdout, stderr = _cli(tmp_path, capsys, "--encoders", "tiny-qwen3,tiny-t5", "--strategies",
                          f"frozen:{tmp_path / 'w.pt'}")
    assert "tiny-qwen3: frozen" in stdout  # the first encoder ran to the end
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "layer weights are for encoder 'tiny-qwen3'" in lines[0], stderr
    assert not (tmp_path / "out" / "results.md").exists()


# ----------------------------------------------------------------------------- batching

def test_length_batches_cover_once_within_budget():
    import encoders
    enc = encoders.load_encoder("tiny-qwen3")
    texts = [("red circle " * (i % 7 + 1)).strip() for i in range(24)]
    batches = common.length_batches(enc, texts, token_budget=40)
    assert sorted(i for b in batches for i in b) == list(range(24))
    lengths = [len(enc.tokenizer(t)["input_ids"]) for t in texts]
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 40
    # embeddings do not depend on which batch a text lands in
    args = probe.get_parser().parse_args(["--out-dim", "8"])
    args.feature_dtype = torch.float32
    fusions = probe.make_fusions(["norm-avg"], enc)
    torch.manual_seed(0)
    aggs = {"norm-avg": models.ContextAggregator(enc.width, 16, 8, heads=2).eval()}
    args.token_budget = 40
    a = probe.embed_texts(enc, fusions, [aggs], texts, args, "cpu")
    args.token_budget = 4000
    b = probe.embed_texts(enc, fusions, [aggs], texts, args, "cpu")
    assert set(a) == {("norm-avg", 0), ("norm-avg", probe.ZERO_SHOT)}
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- end to end, DDP

ARGS = ["--encoders", "tiny-qwen3", "--strategies", "last,norm-avg", "--seeds", "0", "1", "--steps", "6",
        "--batch-size", "8", "--width", "32", "--out-dim", "16", "--heads", "4", "--feature-dtype", "fp32",
        "--lr", "1e-3", "--encoder-dtype", "fp32", "--device", "cpu", "--threads", "1"]


def _run(tmp_path, bench, pairs, out, nproc):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "02_probe_encoders.py"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + os.getpid() % 1000)] + cmd[1:]
    subprocess.run(cmd + ARGS + ["--benchmark", str(bench), "--caption-pairs", str(pairs), "--out", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    return json.loads((out / "results.json").read_text())


def test_end_to_end_and_torchrun_matches_single_process(tmp_path):
    bench, pairs = write(tmp_path, n_bench=12, n_pairs=32)
    one = _run(tmp_path, bench, pairs, tmp_path / "one", 1)
    two = _run(tmp_path, bench, pairs, tmp_path / "two", 2)
    assert two["config"]["world_size"] == 2 and one["config"]["world_size"] == 1
    r1, r2 = one["encoders"]["tiny-qwen3"], two["encoders"]["tiny-qwen3"]
    for s in ("last", "norm-avg"):
        assert 0 <= r1["strategies"][s]["overall"] <= 100
        assert r1["strategies"][s]["values"]["overall"] == r2["strategies"][s]["values"]["overall"]
        assert r1["strategies"][s]["values"]["by_type"] == r2["strategies"][s]["values"]["by_type"]
        assert r1["strategies"][s]["zero_shot"] == r2["strategies"][s]["zero_shot"]
        assert abs(r1["strategies"][s]["loss_first"] - r2["strategies"][s]["loss_first"]) < 1e-4
        sd1 = plumbing.load_checkpoint(tmp_path / "one" / "aggregators" / f"tiny-qwen3__{s}.pt",
                                       probe.AGGREGATOR_KIND)["state_dict"]
        sd2 = plumbing.load_checkpoint(tmp_path / "two" / "aggregators" / f"tiny-qwen3__{s}.pt",
                                       probe.AGGREGATOR_KIND)["state_dict"]
        init = models.ContextAggregator(64, 32, 16, 4).state_dict()
        assert any(not torch.allclose(sd1[k], init[k]) for k in sd1)  # it trained
        for k in sd1:
            torch.testing.assert_close(sd1[k], sd2[k], atol=1e-4, rtol=1e-4, msg=k)
    assert (tmp_path / "two" / "aggregators" / "tiny-qwen3__last__seed1.pt").is_file()
    md = (tmp_path / "one" / "results.md").read_text()
    assert "| LLM | tiny-qwen3 | 4 |" in md and "Table 2" in md and "from 2 seeds" in md
    assert list((tmp_path / "one" / "tb").glob("tiny-qwen3/events.*"))


def _small_probe(tmp_path, out, *flags):
    bench, pairs = write(tmp_path, n_bench=6, n_pairs=16)
    return probe.main(["--encoders", "tiny-qwen3", "--strategies", "last,norm-avg", "--steps", "4", "--batch-size", "8",
                       "--width", "32", "--out-dim", "16", "--heads", "4", "--encoder-dtype", "fp32", "--feature-dtype", "fp32",
                       "--lr", "1e-3", "--threads", "1", "--benchmark", str(bench), "--caption-pairs", str(pairs),
                       "--out", str(tmp_path / out), "--overwrite", *flags])


def test_seeds_report_mean_std_and_the_same_seed_gives_the_same_number(tmp_path):
    two = _small_probe(tmp_path, "two", "--seeds", "5", "6")["encoders"]["tiny-qwen3"]["strategies"]
    one = _small_probe(tmp_path, "one", "--seeds", "6")["encoders"]["tiny-qwen3"]["strategies"]
    for s in ("last", "norm-avg"):
        r = two[s]
        assert r["seeds"] == [5, 6] and len(r["values"]["overall"]) == 2
        assert r["overall"] == pytest.approx(sum(r["values"]["overall"]) / 2)
        assert r["std"]["overall"] == pytest.approx(statistics.stdev(r["values"]["overall"]))
        assert r["std"]["overall"] is not None and all(v is not None for v in r["std"]["by_type"].values())
        assert set(r["values"]["by_caption_type"]) == {"image", "video"}
        # seed 6 alone, in another run, gives exactly the number it gave as the second of two seeds
        assert one[s]["overall"] == r["values"]["overall"][1]
        assert one[s]["by_type"] == {t: v[1] for t, v in r["values"]["by_type"].items()}
        assert one[s]["std"]["overall"] is None
        assert one[s]["zero_shot"] == r["zero_shot"]  # the reference needs no seed
    md = (tmp_path / "two" / "results.md").read_text()
    assert "from 2 seeds" in md and " ± " in md and "tiny-qwen3 zero-shot" in md
    assert "from 1 seed" in (tmp_path / "one" / "results.md").read_text()
    assert sorted(p.name for p in (tmp_path / "two" / "aggregators").iterdir()) == [
        "tiny-qwen3__last.pt", "tiny-qwen3__last__seed6.pt", "tiny-qwen3__norm-avg.pt",
        "tiny-qwen3__norm-avg__seed6.pt"]


# ----------------------------------------------------------------------------- pairs vs benchmark

NOTICE = "describe the built-in world's coloured shapes"


def test_mismatch_notice_for_another_benchmark_with_the_world_pairs(tmp_path):
    build = importlib.import_module("01_build_ted6k")
    build.main(["--no-splits", "--bench-fraction", "0.01", "--out", str(tmp_path / "ted")])
    world_bench = tmp_path / "ted" / "ted6k.json"
    world = tmp_path / "world"
    world.mkdir()
    (world / "caption_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_pairs(16)))
    (world / "scenes.jsonl").write_text("{}\n")
    other, own_pairs = write(tmp_path, n_bench=4, n_pairs=16)

    def notice(bench, pairs):
        args = probe.get_parser().parse_args(["--benchmark", str(bench), "--caption-pairs", str(pairs)])
        return probe.pairs_mismatch(args)

    assert notice(world_bench, world / "caption_pairs.jsonl") is None  # the world's benchmark, the world's pairs
    line = notice(other, world / "caption_pairs.jsonl")
    assert NOTICE in line and "--caption-pairs" in line and "zero-shot" in line and "\n" not in line
    assert notice(other, own_pairs) is None  # the user's own pairs: nothing to say
    # the world's ted6k.json copied away from its scenes.json is not recognised as the world's
    (tmp_path / "copy.json").write_bytes(world_bench.read_bytes())
    assert notice(tmp_path / "copy.json", world / "caption_pairs.jsonl") is not None
    # nor a file 01 imported (--source file) into the default folder: 01 swaps the folder whole
    build.main(["--source", "file", "--benchmark", str(other), "--out", str(tmp_path / "ted"), "--overwrite"])
    assert notice(world_bench, world / "caption_pairs.jsonl") is not None


def test_mismatch_notice_printed_before_training(tmp_path, capsys):
    bench, _ = write(tmp_path, n_bench=4, n_pairs=16)
    world = tmp_path / "world"
    world.mkdir()
    (world / "caption_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_pairs(16)))
    (world / "scenes.jsonl").write_text("{}\n")
    probe.main(["--encoders", "tiny-qwen3", "--strategies", "last", "--steps", "1", "--batch-size", "8", "--seeds", "0",
                "--width", "32", "--out-dim", "16", "--heads", "4", "--encoder-dtype", "fp32", "--threads", "1",
                "--benchmark", str(bench), "--caption-pairs", str(world / "caption_pairs.jsonl"),
                "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert out.count(NOTICE) == 1 and out.index(NOTICE) < out.index("step 1/1")


def test_frozen_strategy_takes_the_layer_weights_flag(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"")
    args = probe.get_parser().parse_args(["--strategies", "norm-avg,frozen", "--layer-weights", str(tmp_path / "w.pt")])
    probe.check_strategies(args)
    assert args.strategies == ["norm-avg", f"frozen:{tmp_path / 'w.pt'}"]
    with pytest.raises(DataError, match="needs --layer-weights"):
        probe.check_strategies(probe.get_parser().parse_args(["--strategies", "frozen"]))
    with pytest.raises(DataError, match="--layer-weights is for the strategy frozen"):
        probe.check_strategies(probe.get_parser().parse_args(["--layer-weights", str(tmp_path / "w.pt")]))


def test_streaming_one_epoch_and_frozen_strategy(tmp_path):
    """--steps 0 = one epoch, features streamed batch by batch; frozen:PATH reads 04's layer weights."""
    bench, pairs = write(tmp_path, n_bench=6, n_pairs=16)
    fusion = models.LayerFusion("learned", 4)
    models.save_layer_weights(tmp_path / "w.pt", fusion, "tiny-qwen3", 4)
    args = ["--encoders", "tiny-qwen3", "--strategies", f"norm-avg,frozen:{tmp_path / 'w.pt'}", "--steps", "0",
            "--seeds", "0", "1",
            "--batch-size", "8", "--width", "32", "--out-dim", "16", "--heads", "4", "--encoder-dtype", "fp32",
            "--feature-dtype", "fp32", "--benchmark", str(bench), "--caption-pairs", str(pairs),
            "--out", str(tmp_path / "out"), "--threads", "1", "--overwrite"]
    r = probe.main(args)["encoders"]["tiny-qwen3"]["strategies"]
    frozen = f"frozen:{tmp_path / 'w.pt'}"
    assert len(r["norm-avg"]) and r["norm-avg"]["n"] == 18
    # uniform frozen weights == norm-avg: same features, same seed, same batches -> same result
    assert r[frozen]["values"]["overall"] == r["norm-avg"]["values"]["overall"]
    assert abs(r[frozen]["loss_last"] - r["norm-avg"]["loss_last"]) < 1e-4
    assert r["norm-avg"]["seeds"] == [0, 1] and r["norm-avg"]["values"]["loss_first"][0] \
        != r["norm-avg"]["values"]["loss_first"][1]  # each seed its own start and batches
    models.save_layer_weights(tmp_path / "w.pt", fusion, "minilm", 6)
    with pytest.raises(DataError, match="layer weights are for encoder 'minilm'"):
        probe.main(args)


def test_default_zoo_runs_without_the_stage1_rung_until_03_has_run(tmp_path, capsys, monkeypatch):
    """The default zoo names 03's output folder; before 03 has run it is left out with one line, after it
    is probed like any other encoder."""
    bench, pairs = write(tmp_path, n_bench=4, n_pairs=16)
    stage1 = tmp_path / "stage1"
    monkeypatch.setattr(probe, "DEFAULT_ZOO", ("tiny-qwen3", str(stage1)))
    argv = ["--strategies", "last", "--steps", "1", "--batch-size", "8", "--seeds", "0", "--width", "32",
            "--out-dim", "16", "--heads", "4", "--encoder-dtype", "fp32", "--threads", "1", "--benchmark", str(bench),
            "--caption-pairs", str(pairs), "--overwrite", "--out", str(tmp_path / "out")]
    assert list(probe.main(argv)["encoders"]) == ["tiny-qwen3"]
    assert "does not exist yet" in capsys.readouterr().out
    encoders.build_tiny_qwen3vl(stage1, seed=0, hidden=32)
    assert list(probe.main(argv)["encoders"]) == ["tiny-qwen3", str(stage1)]
    assert "does not exist yet" not in capsys.readouterr().out
