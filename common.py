"""Shared plumbing for the GRAN-TED scripts: device and dtype, torchrun setup, seeding, rank-0
logging, atomic writes, jsonl reading with clear errors, and resumable checkpoints.

The text-encoder side (encoders, layer fusion, context aggregator, InfoNCE) lives in `encoders.py`
and the diffusion side (DiT, rectified flow, EMA) in `dit.py`; see the README for why it is split.
"""
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


class DataError(ValueError):
    """Bad input: the message names the file, the record and the problem."""


#################################################################################
#                              Device and dtype                                 #
#################################################################################

def pick_device(requested=None):
    """`cuda` when there is one (or `requested`), else `cpu`."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device, requested="auto"):
    """bf16 on a GPU that supports it, fp32 on CPU (CPU bf16 matmuls are slow and imprecise)."""
    if requested != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device, dtype):
    """Autocast to `dtype` on GPU; a no-op context on CPU or in fp32."""
    device = torch.device(device)
    enabled = device.type == "cuda" and dtype != torch.float32
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


#################################################################################
#                                Distributed                                    #
#################################################################################

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def init_distributed(device=None):
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE; nccl on GPU, gloo on CPU. Single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world_size, device)


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed, rank=0):
    """Seed python, numpy and torch; each rank gets its own offset so augmentations differ."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def is_main_process():
    """True on rank 0 of a torchrun job, and in a plain single process."""
    return int(os.environ.get("RANK", 0)) == 0


def log(*args, **kwargs):
    """print on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


#################################################################################
#                          Atomic writes and reading                            #
#################################################################################

def atomic_write_bytes(path, data):
    """Write to a temp file in the same folder, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, indent=1):
    """Deterministic JSON (key order as given, fixed separators) written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path, records):
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def atomic_torch_save(obj, path):
    """torch.save through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path):
    """json.load with an error that names the file and the position of the fault."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def ted_records(data, path):
    """The (key, record) pairs of a TED-6k-format object, each checked for its record-level shape: an
    object with a non-empty caption, caption_type image or video, and a statements object."""
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty JSON object keyed image_N / video_N")
    for key, rec in data.items():
        where = f"{path}: record {key!r}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
        for k in ("caption", "caption_type", "statements"):
            if k not in rec:
                raise DataError(f"{where}: missing key {k!r}")
        if not isinstance(rec["caption"], str) or not rec["caption"].strip():
            raise DataError(f"{where}: empty caption")
        if rec["caption_type"] not in ("image", "video"):
            raise DataError(f"{where}: caption_type {rec['caption_type']!r} is not 'image' or 'video'")
        if not isinstance(rec["statements"], dict):
            raise DataError(f"{where}: 'statements' must be an object keyed by statement type")
        yield key, rec


def valid_option(opt):
    """A TED-6k option counts when its statement is a non-empty string and its status is `success`."""
    return isinstance(opt, dict) and opt.get("status") == "success" and isinstance(opt.get("statement"), str) \
        and opt["statement"].strip() != ""


def read_jsonl(path, required=()):
    """Records of a jsonl file; each must be an object holding the `required` keys."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise DataError(f"{path}:{lineno}: missing key(s) {missing}")
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def resolve_media(jsonl_path, media):
    """Media paths in a jsonl are relative to the jsonl's folder unless absolute."""
    p = Path(media)
    return p if p.is_absolute() else Path(jsonl_path).parent / p


#################################################################################
#                                Checkpoints                                    #
#################################################################################

def rng_state():
    """Every RNG a resumed run needs to continue the same curve."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(out_dir, step):
    return Path(out_dir) / "checkpoints" / f"step_{step:08d}.pt"


def latest_checkpoint(out_dir):
    """The newest `checkpoints/step_*.pt` under `out_dir`, or None."""
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def load_state_dict_strict(module, state_dict, what="checkpoint"):
    """load_state_dict that refuses any missing, unexpected or mis-shaped tensor, naming them."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise DataError(f"{what} does not match this model: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}, shape mismatches {shapes[:5]}")
    module.load_state_dict(state_dict)
