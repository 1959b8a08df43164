"""The small plumbing every GRAN-TED script needs: user errors and the command-line wrapper, device and
dtype, torchrun setup, seeding, logging and progress, atomic writes, json/jsonl reading, checkpoints,
the learning-rate schedule, range-checked flag types, and running a stage as a logged subprocess (what
the experiments do).

The method itself (adapter, layer fusion, DiT, data loaders) lives in `common.py`.
"""
import argparse
import fnmatch
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


class DataError(ValueError):
    """Bad input: the message names the file, the record or flag, and the problem."""


def run_cli(main):
    """Run `main()`; a DataError is one line on stderr and exit status 2, never a traceback."""
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


#################################################################################
#                           Flags shared by the scripts                         #
#################################################################################

class ArgumentParser(argparse.ArgumentParser):
    """argparse with the scripts' conventions: `ArgumentParser(__doc__)` shows the script's docstring as
    written under --help, and a bad flag raises DataError, so `run_cli` prints one line
    ("error: argument --steps: ...") instead of the whole usage text."""

    def __init__(self, doc=None, **kwargs):
        if doc is not None:
            kwargs = {"description": doc.split("\n")[0], "epilog": "\n".join(doc.split("\n")[1:]),
                      "formatter_class": argparse.RawDescriptionHelpFormatter, **kwargs}
        super().__init__(**kwargs)

    def error(self, message):
        raise DataError(f"{message} (see --help)")


def bounded(cast, low, high=None, what=""):
    """An argparse type: `cast` the text and refuse values outside [low, high] with a one-line message."""
    def parse(text):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what or cast.__name__}") from None
        if v < low or (high is not None and v > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bound}")
        return v
    parse.__name__ = what or cast.__name__
    return parse


positive_int = bounded(int, 1, what="a positive integer")
nonneg_int = bounded(int, 0, what="a non-negative integer")
positive_float = bounded(float, 1e-300, what="a positive number")
nonneg_float = bounded(float, 0.0, what="a non-negative number")
fraction = bounded(float, 0.0, 1.0, what="a number in [0, 1]")


_NOT_GIVEN = object()


def even_frames(text):
    """A positive even frame count (Qwen3-VL groups video frames in pairs)."""
    n = positive_int(text)
    if n % 2:
        raise argparse.ArgumentTypeError(f"{text} is odd: Qwen3-VL groups video frames in pairs")
    return n


def given_flags(parser, argv=None):
    """The dests of the options the user typed, so that a checkpoint's settings can fill in the rest."""
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    probe = argparse.Namespace(**{k: _NOT_GIVEN for k in dests})
    parser.parse_args(argv, namespace=probe)
    return {k for k in dests if getattr(probe, k) is not _NOT_GIVEN}


def set_threads(threads):
    """--threads N: N torch CPU threads; 0 keeps torch's default (one per core)."""
    if threads:
        torch.set_num_threads(threads)


#################################################################################
#                              Device and dtype                                 #
#################################################################################

def pick_device(requested=None):
    """`cuda` when there is one (or `requested`), else `cpu`."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_dtype(device, requested="auto"):
    """bf16 on a GPU that supports it, fp32 on CPU (CPU bf16 matmuls are slow and imprecise)."""
    if requested != "auto":
        return DTYPES[requested]
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

    def barrier(self):
        if self.enabled:
            dist.barrier()


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


def setup(args):
    """What a training script does first: --threads, torchrun's process group (Dist), --seed."""
    set_threads(args.threads)
    d = init_distributed(args.device)
    seed_everything(args.seed)
    return d


def ddp(model, d):
    """The model under DDP when torchrun started several processes, else the model itself."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


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


#################################################################################
#                             Logging and progress                              #
#################################################################################

def log(*args, **kwargs):
    """print on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def progress(iterable=None, total=None, initial=0, desc=""):
    """A tqdm bar on rank 0 at a terminal; a log file (CI, a cluster job) gets the stage's own log lines only."""
    from tqdm import tqdm
    return tqdm(iterable, total=total, initial=initial, desc=desc, dynamic_ncols=True,
                disable=not (is_main_process() and sys.stderr.isatty()))


#################################################################################
#                          Atomic writes and reading                            #
#################################################################################

def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call `write(tmp_path)`, fsync, then rename over `path`: a reader never sees half a file, and a
    kill leaves the old file intact. Permissions follow the umask (as open() would), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, indent=1):
    """Deterministic JSON (key order as given) written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path, records):
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def atomic_torch_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_safetensors(tensors, path, metadata=None):
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_dir(final, build):
    """Build a folder with `build(tmp_dir)` next to `final`, then swap it in: the old folder is moved
    aside only once the new one is complete, and removed only after the swap."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        build(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def check_ours(folder, flag, ours, who):
    """The names in an output folder, refused if any is not one `who` writes (fnmatch patterns `ours`):
    such a folder is someone else's, and is left as it is."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{flag} {folder}: exists and is not a folder")
    held = sorted(p.name for p in folder.iterdir() if not p.name.endswith(".tmp")) if folder.is_dir() else []
    foreign = [n for n in held if not any(fnmatch.fnmatch(n, o) for o in ours)]
    if foreign:
        raise DataError(f"{flag} {folder}: holds {foreign[:3]}, which {who} does not write; give it a new or empty folder")
    return held


def remove_stale_temps(folder, older_than_s=3600):
    """Delete `.NAME.*.tmp` files a killed run left in `folder` (old enough that no writer owns them)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.glob(".*.tmp"):
        try:
            if time.time() - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        except OSError:
            pass


def file_digest(path, chunk=1 << 20):
    """sha256 of a file's bytes: what a resumed run checks its data against, and what keys a converted cache."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_text(path):
    """A user's UTF-8 text file, or one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_json(path):
    """json.load with an error that names the file and the position of the fault; duplicate keys and
    NaN / Infinity refused."""
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise DataError(f"{path}: duplicate key(s) {dup[:5]}")
        return dict(pairs)
    def not_finite(constant):
        raise DataError(f"{path}: {constant} where a number belongs")
    try:
        return json.loads(read_text(path), object_pairs_hook=no_duplicates, parse_constant=not_finite)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_jsonl(path, required=()):
    """Records of a jsonl file; each must be an object holding the `required` keys."""
    records = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
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
# Checkpoints are read with torch.load(weights_only=True): only tensors and plain containers, so a
# shared file cannot run code on the reader's machine. Every RNG state is therefore stored as
# tensors or plain python types, and each file names its `kind` so a wrong file gets a clear error.

def rng_state():
    """Every RNG a resumed run needs to continue the same curve, as tensors and plain types."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(out_dir, step):
    return Path(out_dir) / "checkpoints" / f"step_{step:08d}.pt"


def list_checkpoints(out_dir):
    """`checkpoints/step_*.pt` under `out_dir`, oldest first."""
    return sorted((Path(out_dir) / "checkpoints").glob("step_*.pt"))


def newest_step(out_dir):
    """The step of the newest checkpoint under a run folder (0 when none)."""
    ckpts = list_checkpoints(out_dir)
    return int(ckpts[-1].stem.split("_")[1]) if ckpts else 0


def save_checkpoint(out_dir, step, state, keep=2, replaces=()):
    """Write `state` atomically as checkpoints/step_N.pt, then delete the files of a run it `replaces`
    (--overwrite: the old run goes only once the new one has a checkpoint), then keep the newest `keep`."""
    path = checkpoint_path(out_dir, step)
    atomic_torch_save(state, path)
    for old in replaces:
        if Path(old) != path and Path(old).exists():
            Path(old).unlink()
    for old in list_checkpoints(out_dir)[:-keep]:
        old.unlink()
    return path


def first_line(e):
    """An exception's first line (diffusers' and safetensors' errors run to a paragraph), or its type."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def load_torch(path, what):
    """The one way a torch file is read (checkpoints, caches, layer weights): weights_only=True, so no code
    runs; a missing, truncated or foreign file is one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such {what}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle that weights_only refuses
        raise DataError(f"{path}: not a readable {what} ({first_line(e)})") from None
    if not isinstance(blob, dict):
        raise DataError(f"{path}: not a {what} (it holds a {type(blob).__name__})")
    return blob


def load_checkpoint(path, kind):
    """A checkpoint written by this repo (`state["kind"] == kind`)."""
    state = load_torch(path, "checkpoint")
    if state.get("kind") != kind:
        raise DataError(f"{path}: not a {kind} checkpoint (kind {state.get('kind')!r})")
    return state


def load_latest_checkpoint(out_dir, kind):
    """(path, state) of the newest readable checkpoint under `out_dir`, or (None, None). A newest file
    that a kill truncated is skipped, with a warning, for the one before it."""
    found = list_checkpoints(out_dir)
    for path in reversed(found):
        try:
            return path, load_checkpoint(path, kind)
        except DataError as e:
            if path == found[0]:
                raise
            log(f"warning: {e}; trying the previous checkpoint")
    return None, None


def load_state_dict(module, state_dict, what):
    """load_state_dict(strict=True) with a one-line DataError naming `what` when it does not fit."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise DataError(f"{what} does not fit this model: {str(e).splitlines()[1].strip()[:300]}") from None


#################################################################################
#                          Learning-rate schedule                               #
#################################################################################

def lr_factor(step, steps, warmup, decay="constant", floor=0.0):
    """Linear warm-up over `warmup` steps, then constant or a cosine to `floor` x the peak at `steps`."""
    f = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if decay == "cosine" and step >= warmup:
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        f *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def lr_scheduler(optimizer, steps, warmup, decay="constant", floor=0.0):
    """torch's LambdaLR over `lr_factor` (its state goes in the checkpoint)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup, decay, floor))
