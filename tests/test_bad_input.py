"""Bad input through the general mechanisms, one row per case: one validation of a model configuration (models.check_model_config), from 05's flags and from a
model file handed to 06, one guarded load of an encoder folder (encoders._load_dir), and 06's prompts
checked before any model loads: each bad case is one stderr line naming the flag or file, exit 2, no traceback,
and nothing written."""
import importlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

import common
import models
from tests.cli import assert_one_line, cli_error
from tests.diffusion_stubs import TINY, make_world

from tests.test_probe import make_benchmark
from tests.test_sweep import make_table, sweep

t2x = importlib.import_module("05_train_diffusion")
sample = importlib.import_module("06_sample")

# A run config as 05 writes it into model.safetensors, small enough to build.
GOOD = {"backbone": "dit", "text_norm": "none", "text_dim": 8, "channels": 3, "dit": [32, 2], "patch": [4, 2], "size": 16,
        "latent_shape": None, "backbone_kwargs": None, "fusion": "norm-avg",
        "num_layers": 2, "encoder": "tiny-qwen3"}

MODEL_FILES = {  # id: (change to GOOD, or a raw metadata dict; what the one line must say)
    "no run config": ({"kind": "gran-ted/dit", "step": "1"}, "its metadata holds no run config"),
    "huge depth": ({"dit": [32, 1_000_000]}, "dit must be [width, depth], integers in [1, 65536]"),
    "over 20B parameters": ({"dit": [8192, 60_000]}, "is over 20B parameters"),
    "width a string": ({"dit": ["wide", 2]}, "dit must be [width, depth], integers in [1, 65536], got ['wide', 2]"),
    "width not in heads": ({"dit": [48, 2]}, "DiT width 48 is not a multiple of the head width 32"),
    "patch one number": ({"patch": 4}, "patch must be [side, frames]"),
    "unknown backbone": ({"backbone": "unet"}, "backbone must be one of dit, lumina2, wan"),
    "missing backbone": ({"backbone": None}, "backbone must be one of"),
    "size and patch": ({"size": 18}, "the 18-pixel side is not divisible by the patch 4"),
    "no fusion": ({"fusion": None, "num_layers": None}, "no usable layer fusion"),
}


@pytest.mark.parametrize("case", MODEL_FILES)
def test_a_bad_model_file_is_one_line(tmp_path, capsys, case):
    change, message = MODEL_FILES[case]
    meta = change if "kind" in change else {"kind": "gran-ted/dit", "step": "1",
                                            "config": json.dumps({k: v for k, v in {**GOOD, **change}.items()
                                                                  if v is not None or k in GOOD and GOOD[k] is None})}
    path = tmp_path / "model.safetensors"
    weights = {f"dit.{k}": v for k, v in models.make_model(GOOD).state_dict().items()} if case == "no fusion" else {}
    save_file(weights, str(path), metadata=meta)
    code, err = cli_error(sample.main, ["--ckpt", str(path), "--out", str(tmp_path / "s")], capsys)
    assert_one_line(code, err, message)
    assert str(path) in err and not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


FLAGS = {  # id: (05 flags, what the one line must say)
    "wan layers negative": (["--backbone", "wan", "--backbone-config", '{"num_layers": -1}'],
                            "num_layers must be an integer in [1, 65536], got -1"),
    "wan layers a word": (["--backbone", "wan", "--backbone-config", '{"num_layers": "two"}'],
                          "num_layers must be an integer in [1, 65536], got 'two'"),
    "wan ffn huge": (["--backbone", "wan", "--backbone-config", '{"ffn_dim": 1000000000000}'],
                     "ffn_dim must be an integer in [1, 65536]"),
    "size and patch": (["--size", "10"], "the 10-pixel side is not divisible by the patch 4"),
    "width not in heads": (["--dit", "48x2"], "DiT width 48 is not a multiple of the head width 32"),
    "size and VAE factor": (["--vae", "tiny-wan-vae", "--size", "6"], "--size 6 is not divisible by the VAE's spatial factor 4"),
}


@pytest.mark.parametrize("case", FLAGS)
def test_a_bad_model_config_from_flags_is_one_line(tmp_path, world, capsys, case):
    extra, message = FLAGS[case]
    out = tmp_path / "out"
    argv = ["--data", str(world), "--out", str(out), "--cache-dir", str(tmp_path.parent / "cache"), *TINY, *extra]
    assert_one_line(*cli_error(t2x.main, argv, capsys), message)
    assert not out.exists() or not any(out.rglob("*.*"))  # no checkpoint, model, log or tensorboard file


@pytest.fixture(scope="module")
def bad_encoders(tmp_path_factory):
    """Copies of the tiny Qwen3 folder, each broken one way a handed-over folder can be."""
    import encoders
    root = tmp_path_factory.mktemp("encoders")
    good = encoders.tiny_model_dir("tiny-qwen3", cache_dir=root / "cache")
    out = {}
    for case in ("truncated weights", "bad config.json", "pickle weights"):
        folder = root / case.replace(" ", "_")
        shutil.copytree(good, folder)
        weights = folder / "model.safetensors"
        if case == "truncated weights":
            weights.write_bytes(weights.read_bytes()[:1000])
        elif case == "bad config.json":
            (folder / "config.json").write_text("{")
        else:  # no code may run while loading it: weights_only refuses the global
            weights.unlink()
            (folder / "pytorch_model.bin").write_bytes(pickle.dumps(print))
        out[case] = folder
    return out


@pytest.mark.parametrize("case", ["truncated weights", "bad config.json", "pickle weights"])
def test_a_broken_encoder_folder_is_one_line(tmp_path, world, bad_encoders, capsys, case):
    out, folder = tmp_path / "out", bad_encoders[case]
    argv = ["--data", str(world), "--out", str(out), "--cache-dir", str(tmp_path.parent / "cache"), *TINY,
            "--encoder", str(folder)]
    assert_one_line(*cli_error(t2x.main, argv, capsys), f"{folder}: not a model folder transformers can load")
    assert not out.exists() or not any(out.rglob("*.*"))


PROMPTS = {  # id: (06 flags ({file} = a prompt file holding `content`), content, what the one line must say)
    "empty prompt": (["--prompts", ""], None, "--prompts '': empty caption"),
    "blank prompt": (["--prompts", "  "], None, "empty caption"),
    "empty jsonl prompt": (["--prompt-file", "{file}.jsonl"], '{"prompt": ""}\n', "record 1: empty caption"),
    "audio kind": (["--prompt-file", "{file}.jsonl"], '{"prompt": "a red square", "kind": "audio"}\n',
                   "record 1: caption_type 'audio' is not 'image' or 'video'"),
    "numeric prompt": (["--prompt-file", "{file}.jsonl"], '{"prompt": 7}\n', "record 1: caption must be a string"),
    "not UTF-8": (["--prompt-file", "{file}.txt"], b"a red \xff square\n", "not UTF-8 text"),
    "no prompts": (["--prompt-file", "{file}.txt"], "\n  \n", "no prompts"),
}


@pytest.mark.parametrize("case", PROMPTS)
def test_bad_prompts_are_one_line_before_any_model_loads(tmp_path, capsys, case):
    flags, content, message = PROMPTS[case]
    argv = [a.replace("{file}", str(tmp_path / "prompts")) for a in flags]
    if content is not None:
        path = next(a for a in argv if a.startswith(str(tmp_path)))
        Path(path).write_bytes(content if isinstance(content, bytes) else content.encode())
    code, err = cli_error(sample.main, [*argv, "--ckpt", str(tmp_path / "no-model"), "--out", str(tmp_path / "s")],
                          capsys)
    assert_one_line(code, err, message)
    assert not (tmp_path / "s").exists()


TORCH_FILES = {  # id: (bytes of the file, or None for no file; what the one line must say)
    "missing": (None, "no such latent cache"),
    "empty": (b"", "not a readable latent cache"),
    "garbage": (b"not a torch file at all", "not a readable latent cache"),
    "truncated": ("truncated", "not a readable latent cache"),
    "a pickle that would run code": (pickle.dumps(print), "not a readable latent cache"),
    "not a dict": ("list", "not a latent cache (it holds a list)"),
}


@pytest.mark.parametrize("case", TORCH_FILES)
def test_one_guarded_torch_reader(tmp_path, case):
    import torch

    import plumbing
    content, message = TORCH_FILES[case]
    path = tmp_path / "latents_x.pt"
    if content in ("truncated", "list"):
        torch.save({"latents": torch.zeros(4, 4)} if content == "truncated" else [1, 2], path)
        if content == "truncated":
            path.write_bytes(path.read_bytes()[:100])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(plumbing.DataError) as e:
        plumbing.load_torch(path, "latent cache")
    assert str(e.value).startswith(str(path)) and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("first, then", [("04", "05"), ("05", "04")])
def test_a_stage_resumes_only_its_own_runs(tmp_path, world, capsys, first, then):
    """05 --resume pointed at a 04 run (or the reverse) is refused and leaves the run byte-identical."""
    lw = importlib.import_module("04_train_layer_weights")
    main = {"04": lw.main, "05": t2x.main}
    out = tmp_path / "run"
    argv = ["--data", str(world), "--out", str(out), "--cache-dir", str(tmp_path.parent / "cache"), *TINY,
            "--steps", "2", "--ckpt-every", "2"]
    main[first](argv)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    code, err = cli_error(main[then], argv + ["--resume"], capsys)
    assert_one_line(code, err, "--resume: " + str(out / "checkpoints"))
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_06_writes_only_into_a_folder_of_its_own(tmp_path, world, capsys):
    """06 --out pointed at a 05 run folder is refused (the folder holds files 06 does not write) and left
    byte-identical; a folder 06 wrote before is written again."""
    run = tmp_path / "run"
    t2x.main(["--data", str(world), "--out", str(run), "--cache-dir", str(tmp_path.parent / "cache"), *TINY,
              "--steps", "1", "--ckpt-every", "1"])
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    argv = ["--ckpt", str(run), "--prompts", "a red square", "--sample-seeds", "0", "--sample-steps", "1"]
    assert_one_line(*cli_error(sample.main, argv + ["--out", str(run)], capsys), f"--out {run}: holds ['args.json'")
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    for _ in range(2):
        sample.main(argv + ["--out", str(tmp_path / "s")])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["image_prompts.txt", "images.png"]


# The analyses' tables: read whole and checked (finite numbers, this script's shape) before anything is written.
TABLES = {  # id: (edit of a valid sweep.json's text, what the one line must say)
    "NaN": (lambda t: t.replace('"overall": 20.0', '"overall": NaN'), "NaN where a number belongs"),
    "Infinity": (lambda t: t.replace('"mean": 0.4', '"mean": Infinity', 1), "Infinity where a number belongs"),
    "a string": (lambda t: t.replace('"overall": 20.0', '"overall": "high"'), "not a sweep table this script wrote"),
    "no settings": (lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "settings"}),
                    "not a sweep table this script wrote"),
}


@pytest.mark.parametrize("case", TABLES)
def test_a_bad_table_is_one_line_and_replaces_no_analysis(tmp_path, capsys, case):
    xs = [20.0, 25.0, 31.0, 34.0]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(make_table(xs, [0.01 * x + 0.2 for x in xs])))
    sweep.write_analysis(path, n_boot=50)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    edit, message = TABLES[case]
    path.write_text(edit(path.read_text()))
    code, err = cli_error(sweep.main, ["--analyse-only", str(path)], capsys)
    assert_one_line(code, err, message)
    assert str(path) in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "sweep.json"} == \
        {k: v for k, v in before.items() if k != "sweep.json"}


def test_a_negative_identical_to_its_positive_is_left_out_not_refused(tmp_path, capsys):
    """The public TED-6K has a few such options: they are unusable (a tie is not a win), so they are left out and
    counted, and a statement with no negative left goes; the file is not refused."""
    bench = make_benchmark(1)
    st = bench["image_0"]["statements"]
    pos = st["Adjective"]["correct_statement"]["statement"]
    st["Adjective"]["incorrect_statements"][0]["statement"] = pos + " "  # the option ties: unusable
    st["Quantity"]["incorrect_statements"] = [{"statement": st["Quantity"]["correct_statement"]["statement"],
                                                "status": "success"}]  # nothing usable left: the statement goes
    path = tmp_path / "b.json"
    path.write_text(json.dumps(bench))
    normal, qs = common.read_ted(path)
    assert "2 negative(s) identical to their positive and 1 statement(s)" in capsys.readouterr().out
    negs = normal["image_0"]["statements"]["Adjective"]["incorrect_statements"]
    assert len(negs) == len(st["Adjective"]["incorrect_statements"]) - 1 and all(n["statement"] != pos for n in negs)
    assert "Quantity" not in normal["image_0"]["statements"]
