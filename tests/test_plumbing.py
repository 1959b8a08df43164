"""plumbing.py: atomic writes, reading with clear errors, safe checkpoints, flag types, the lr schedule."""
import argparse
import json
import os
import pickle
import stat

import pytest
import torch

import plumbing
from plumbing import DataError


def test_atomic_write_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    plumbing.atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    class Boom:
        pass

    with pytest.raises(TypeError):
        plumbing.atomic_write_json(path, {"a": Boom()})
    assert json.loads(path.read_text()) == {"a": 1}, "a failed write must not touch the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"], "no temp file left behind"


def test_written_files_follow_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        plumbing.atomic_write_text(tmp_path / "a.txt", "x")
        plumbing.atomic_dir(tmp_path / "folder", lambda d: (d / "f").write_text("y"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def test_atomic_dir_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "world"
    plumbing.atomic_dir(final, lambda d: (d / "v1.txt").write_text("old"))

    def broken(d):
        (d / "half.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        plumbing.atomic_dir(final, broken)
    assert sorted(p.name for p in final.iterdir()) == ["v1.txt"]
    plumbing.atomic_dir(final, lambda d: (d / "v2.txt").write_text("new"))
    assert sorted(p.name for p in final.iterdir()) == ["v2.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"], "no temp or old folder left"


def test_stale_temps_from_a_kill_are_removed(tmp_path):
    stale, fresh = tmp_path / ".step_1.pt.abc.tmp", tmp_path / ".step_2.pt.def.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(stale, (0, 0))
    plumbing.remove_stale_temps(tmp_path)
    assert not stale.exists() and fresh.exists(), "only temps old enough that no writer owns them"


def test_read_jsonl_names_file_line_and_problem(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": "x", "b": "y"}\n{"a": "x"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: missing key\(s\) \['b'\]"):
        plumbing.read_jsonl(path, required=("a", "b"))
    path.write_text('{"a": "x"}\n{"a": \n')
    with pytest.raises(DataError, match=r"data.jsonl:2: malformed JSON"):
        plumbing.read_jsonl(path)
    path.write_text("\n")
    with pytest.raises(DataError, match="no records"):
        plumbing.read_jsonl(path)
    with pytest.raises(DataError, match="no such file"):
        plumbing.read_jsonl(tmp_path / "missing.jsonl")
    path.write_bytes(b'{"a": "caf\xe9"}\n')
    with pytest.raises(DataError, match="data.jsonl: not UTF-8"):
        plumbing.read_jsonl(path)


def test_read_json_reports_truncation_and_duplicate_keys(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text('{"image_0": {"caption": "a red')
    with pytest.raises(DataError, match=r"bench.json: malformed JSON at line 1"):
        plumbing.read_json(path)
    path.write_text('{"image_0": {"caption": "a"}, "image_0": {"caption": "b"}}')
    with pytest.raises(DataError, match=r"bench.json: duplicate key\(s\) \['image_0'\]"):
        plumbing.read_json(path)


def test_rng_state_roundtrips_through_a_weights_only_checkpoint(tmp_path):
    import random
    import numpy as np
    plumbing.seed_everything(3)
    plumbing.atomic_torch_save({"kind": "t", "rng": plumbing.rng_state()}, tmp_path / "c.pt")
    a = (torch.rand(4), np.random.rand(3), random.random())
    plumbing.set_rng_state(plumbing.load_checkpoint(tmp_path / "c.pt", "t")["rng"])
    b = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


class Payload:
    """Unpickling this runs code: what a malicious 'checkpoint' would do."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoints" / "step_00000001.pt"
    path.parent.mkdir()
    with open(path, "wb") as f:
        pickle.dump({"kind": "gran-ted/dit", "x": Payload()}, f)
    with pytest.raises(DataError, match="not a readable checkpoint"):
        plumbing.load_checkpoint(path, "gran-ted/dit")
    with pytest.raises(DataError, match="not a readable checkpoint"):
        plumbing.load_latest_checkpoint(tmp_path, "gran-ted/dit")
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_of_another_kind_or_not_a_checkpoint_is_refused(tmp_path):
    plumbing.atomic_torch_save({"kind": "stage1", "step": 1}, tmp_path / "a.pt")
    with pytest.raises(DataError, match="a.pt: not a gran-ted/dit checkpoint"):
        plumbing.load_checkpoint(tmp_path / "a.pt", "gran-ted/dit")
    (tmp_path / "b.pt").write_text("hello")
    with pytest.raises(DataError, match="b.pt: not a readable checkpoint"):
        plumbing.load_checkpoint(tmp_path / "b.pt", "gran-ted/dit")
    with pytest.raises(DataError, match="no such checkpoint"):
        plumbing.load_checkpoint(tmp_path / "missing.pt", "gran-ted/dit")


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    assert plumbing.load_latest_checkpoint(tmp_path, "k") == (None, None)
    for step in (5, 120, 30):
        plumbing.save_checkpoint(tmp_path, step, {"kind": "k", "step": step}, keep=5)
    path, state = plumbing.load_latest_checkpoint(tmp_path, "k")
    assert state["step"] == 120 and path.name == "step_00000120.pt"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # a kill mid-write (without the atomic rename)
    path, state = plumbing.load_latest_checkpoint(tmp_path, "k")
    assert state["step"] == 30


def test_save_checkpoint_keeps_newest_and_replaces_another_run_only_after_writing(tmp_path):
    old = [plumbing.save_checkpoint(tmp_path, s, {"kind": "k", "step": s}, keep=5) for s in (500, 1000)]
    new = plumbing.save_checkpoint(tmp_path, 4, {"kind": "k", "step": 4}, keep=2, replaces=old)
    assert plumbing.list_checkpoints(tmp_path) == [new]
    for s in (8, 12):
        plumbing.save_checkpoint(tmp_path, s, {"kind": "k", "step": s}, keep=2)
    assert [p.name for p in plumbing.list_checkpoints(tmp_path)] == ["step_00000008.pt", "step_00000012.pt"]


def test_load_state_dict_names_the_mismatch_in_one_line():
    small, big = torch.nn.Linear(2, 3), torch.nn.Linear(2, 4)
    with pytest.raises(DataError, match="model.pt does not fit this model: .*size mismatch") as e:
        plumbing.load_state_dict(small, big.state_dict(), "model.pt")
    assert "\n" not in str(e.value)
    plumbing.load_state_dict(small, torch.nn.Linear(2, 3).state_dict(), "ok")


def test_flag_types_refuse_out_of_range_values():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=plumbing.positive_int)
    p.add_argument("--p", type=plumbing.fraction)
    assert p.parse_args(["--steps", "3", "--p", "0.5"]).steps == 3
    for bad in (["--steps", "0"], ["--steps", "-60"], ["--steps", "x"], ["--p", "1.5"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_given_flags_are_the_ones_typed():
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--resume", action="store_true")
    assert plumbing.given_flags(p, ["--lr", "1e-3", "--resume"]) == {"lr", "resume"}
    assert plumbing.given_flags(p, []) == set()


def test_lr_warmup_then_constant_or_cosine_to_a_floor():
    f = plumbing.lr_factor
    assert [f(s, 100, 10) for s in (0, 9, 50, 99)] == [0.1, 1.0, 1.0, 1.0]
    assert f(9, 100, 10, "cosine") == 1.0 and f(10, 100, 10, "cosine") == 1.0
    assert abs(f(55, 100, 10, "cosine") - 0.5) < 1e-9 and f(99, 100, 10, "cosine") < 1e-3
    assert abs(f(100, 100, 10, "cosine", floor=0.1) - 0.1) < 1e-9
    assert abs(f(55, 100, 10, "cosine", floor=0.1) - 0.55) < 1e-9


def test_run_cli_prints_one_line_and_exits_2(capsys):
    def main():
        raise DataError("data.jsonl:3: caption must be a non-empty string")
    with pytest.raises(SystemExit) as e:
        plumbing.run_cli(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: data.jsonl:3: caption must be a non-empty string\n"
