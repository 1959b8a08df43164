import json

import pytest
import torch

import common


def test_atomic_write_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    common.atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    class Boom:
        pass

    with pytest.raises(TypeError):
        common.atomic_write_json(path, {"a": Boom()})
    assert json.loads(path.read_text()) == {"a": 1}, "a failed write must not touch the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"], "no temp file left behind"


def test_read_jsonl_names_file_line_and_problem(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": "x", "b": "y"}\n{"a": "x"}\n')
    with pytest.raises(common.DataError, match=r"data.jsonl:2: missing key\(s\) \['b'\]"):
        common.read_jsonl(path, required=("a", "b"))
    path.write_text('{"a": "x"}\n{"a": \n')
    with pytest.raises(common.DataError, match=r"data.jsonl:2: malformed JSON"):
        common.read_jsonl(path)
    path.write_text("\n")
    with pytest.raises(common.DataError, match="no records"):
        common.read_jsonl(path)
    with pytest.raises(common.DataError, match="no such file"):
        common.read_jsonl(tmp_path / "missing.jsonl")


def test_read_json_reports_truncation(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text('{"image_0": {"caption": "a red')
    with pytest.raises(common.DataError, match=r"bench.json: malformed JSON at line 1"):
        common.read_json(path)


def test_rng_state_roundtrip_replays_the_same_numbers():
    common.seed_everything(3)
    state = common.rng_state()
    a = torch.rand(4)
    common.set_rng_state(state)
    assert torch.equal(a, torch.rand(4))


def test_strict_load_refuses_other_shapes():
    small, big = torch.nn.Linear(2, 3), torch.nn.Linear(2, 4)
    with pytest.raises(common.DataError, match="shape mismatches"):
        common.load_state_dict_strict(small, big.state_dict())
    common.load_state_dict_strict(small, torch.nn.Linear(2, 3).state_dict())


def test_latest_checkpoint_picks_highest_step(tmp_path):
    assert common.latest_checkpoint(tmp_path) is None
    for step in (5, 120, 30):
        common.atomic_torch_save({"step": step}, common.checkpoint_path(tmp_path, step))
    assert torch.load(common.latest_checkpoint(tmp_path))["step"] == 120
