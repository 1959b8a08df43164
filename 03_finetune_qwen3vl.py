"""Stage 1 of GRAN-TED: visual-semantic fine-tuning of Qwen3-VL on VQA + captioning data.

The paper fine-tunes Qwen3-VL-8B-Instruct on question/answer pairs about attributes, spatial
relations, temporal order, counts and text in images and videos, so that the text encoder it
becomes carries the visual semantics a diffusion model needs. This script is that stage: the
loss is on the assistant's tokens only, images and videos both go through the real
`Qwen3VLProcessor` and `Qwen3VLForConditionalGeneration`, and rank 0 writes a consolidated
`save_pretrained` directory (model + processor) that `encoders.load_encoder` (02, 04, 05) loads.

With no `--model` it builds the tiny Qwen3-VL of `encoders.build_tiny_qwen3vl` (real classes, a
few layers, the world's byte-level BPE), saves it as the base model (`runs/stage1/base/`),
fine-tunes it on the world's VQA (`runs/world/vqa.jsonl`, written by 01) and scores held-out
questions per perspective against chance (`runs/stage1/vqa_eval.json`, `.md`).

    python 03_finetune_qwen3vl.py                                  # CPU, built-in data: 3-8 min on 2 cores
    python 03_finetune_qwen3vl.py --resume                         # continue from the last checkpoint
    torchrun --nproc_per_node=2 03_finetune_qwen3vl.py             # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=8 03_finetune_qwen3vl.py --fsdp --grad-ckpt \\
        --model Qwen/Qwen3-VL-8B-Instruct --data my_vqa.jsonl --steps 3000 --batch-size 128 --grad-accum 8 \\
        --lr 1e-5 --warmup 100 --max-pixels 200704 --frames 16 --max-length 4096 --eval-size 0
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 \\
        03_finetune_qwen3vl.py --fsdp --grad-ckpt --model /path/Qwen3-VL-8B-Instruct --data my_vqa.jsonl ...

Then measure what the stage buys (02's norm-avg TED-6K score, base vs fine-tuned):
    python 02_probe_encoders.py --encoders runs/stage1/base,runs/stage1/model --strategies norm-avg

Data: jsonl, one record a line, media paths relative to the jsonl's folder:
    {"media": "media/0001.png", "kind": "image" | "video",
     "messages": [{"role": "user", "content": "What colour is the circle?"},
                  {"role": "assistant", "content": "red"}, ...]}
The media belongs to the first user turn. Optional "perspective" (str) groups the held-out
accuracy. `--captions FILE` adds `{media, caption, kind}` records as "describe" turns.

`--batch-size` is the global batch (all ranks and accumulation steps together), so the same flags
train the same model on any number of processes. The loss is the mean over all assistant tokens
of the global batch. Checkpoints (`runs/stage1/checkpoints/`) hold model, optimiser, scheduler,
step, data position and every rank's RNG; `--resume` continues the same loss curve.
"""
import argparse
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from common import (DataError, atomic_torch_save, atomic_write_json, atomic_write_text, autocast,
                    checkpoint_path, cleanup_distributed, init_distributed, latest_checkpoint, log,
                    pick_dtype, read_jsonl, resolve_media, rng_state, seed_everything, set_rng_state)

IGNORE = -100
KINDS = ("image", "video")
ROLES = ("system", "user", "assistant")
MAX_BAD_FRACTION = 0.01
TINY_MIN_PIXELS = 64 * 64  # the tiny model's default: 2x upsampled 32x32 renders (held-out colour 13% -> 37%)
DESCRIBE_PROMPT = {"image": "Describe this image in detail.", "video": "Describe this video in detail."}


#################################################################################
#                             Records and media                                 #
#################################################################################

def check_record(path, lineno, rec):
    """Validate one VQA record's structure; media problems are checked separately (they are skippable)."""
    where = f"{path}:{lineno}"
    if rec.get("kind") not in KINDS:
        raise DataError(f"{where}: unknown media kind {rec.get('kind')!r} (expected 'image' or 'video')")
    if not isinstance(rec.get("media"), str) or not rec["media"]:
        raise DataError(f"{where}: 'media' must be a non-empty path string")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{'role': system|user|assistant, 'content': str}}")
    roles = [m["role"] for m in msgs]
    if "assistant" not in roles or not any(m["content"].strip() for m in msgs if m["role"] == "assistant"):
        raise DataError(f"{where}: no assistant turn (nothing to train on)")
    if "user" not in roles or roles.index("user") > roles.index("assistant"):
        raise DataError(f"{where}: the first assistant turn must follow a user turn (which holds the media)")


def read_records(path, captions=False):
    """[(lineno, record)] of a VQA jsonl (or, with `captions`, {media, caption, kind} as describe turns)."""
    path = Path(path)
    recs = read_jsonl(path, required=("media", "kind", "caption") if captions else ("media", "kind", "messages"))
    linenos = [i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    out = []
    for lineno, rec in zip(linenos, recs):
        if captions:
            if rec["kind"] not in KINDS:
                raise DataError(f"{path}:{lineno}: unknown media kind {rec['kind']!r} (expected 'image' or 'video')")
            rec = {"media": rec["media"], "kind": rec["kind"], "perspective": "describe",
                   "messages": [{"role": "user", "content": DESCRIBE_PROMPT[rec["kind"]]},
                                {"role": "assistant", "content": rec["caption"]}]}
        check_record(path, lineno, rec)
        rec = dict(rec, _file=str(path), _line=lineno, _path=str(resolve_media(path, rec["media"])))
        out.append(rec)
    return out


def load_image(path):
    """An RGB image as uint8 [H, W, 3]."""
    from PIL import Image
    with Image.open(path) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


def load_video(path, frames):
    """`frames` frames sampled uniformly from a GIF/MP4: (uint8 [T, H, W, 3], metadata dict)."""
    from PIL import Image, ImageSequence
    fps = None
    if str(path).lower().endswith((".gif", ".png", ".webp")):
        with Image.open(path) as im:
            all_frames = [np.array(f.convert("RGB"), dtype=np.uint8) for f in ImageSequence.Iterator(im)]
            duration = im.info.get("duration")
        fps = 1000.0 / duration if duration else None
    else:
        import imageio.v3 as iio  # mp4 etc. need imageio's pyav or ffmpeg plugin
        all_frames = list(iio.imread(path))
        fps = iio.immeta(path).get("fps")
    if len(all_frames) < 2:
        raise ValueError(f"a video needs at least 2 frames, got {len(all_frames)}")
    n = min(frames, len(all_frames)) if frames else len(all_frames)
    n -= n % 2  # Qwen3-VL groups frames in temporal patches of 2
    idx = np.linspace(0, len(all_frames) - 1, n).round().astype(int).tolist()
    meta = {"total_num_frames": len(all_frames), "fps": float(fps or 2.0), "frames_indices": idx}
    return np.stack([all_frames[i] for i in idx]), meta


def load_media(rec, frames):
    """The record's pixels (and video metadata), raising on a missing or undecodable file."""
    path = rec["_path"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file {path}")
    if rec["kind"] == "image":
        return load_image(path), None
    return load_video(path, frames)


def scan_media(records, frames, d):
    """Drop records whose media is missing or corrupt (sharded over ranks); refuse > 1% bad."""
    bad = []
    for i in range(d.rank, len(records), d.world_size):
        try:
            load_media(records[i], frames)
        except Exception as e:  # any decode failure means the file is unusable
            bad.append((i, f"{type(e).__name__}: {e}"))
    if d.enabled:
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, bad)
        bad = sorted(b for part in gathered for b in part)
    if bad:
        examples = "; ".join(f"{records[i]['_file']}:{records[i]['_line']} ({records[i]['media']}: {why})"
                             for i, why in bad[:3])
        if len(bad) > MAX_BAD_FRACTION * len(records):
            raise DataError(f"{len(bad)} of {len(records)} records have missing or corrupt media "
                            f"(> {MAX_BAD_FRACTION:.0%}); first: {examples}")
        log(f"skipped {len(bad)} of {len(records)} records with missing or corrupt media; first: {examples}")
    drop = {i for i, _ in bad}
    return [r for i, r in enumerate(records) if i not in drop], len(bad)


def split_heldout(records, eval_size, seed):
    """Hold out whole media (every question about them) until `eval_size` records are held out."""
    media = sorted({r["_path"] for r in records})
    order = np.random.default_rng(seed).permutation(len(media))
    held, count = set(), 0
    per_media = Counter(r["_path"] for r in records)
    for j in order:
        if count >= eval_size or len(held) >= len(media) // 5:  # never more than a fifth of the media
            break
        held.add(media[j])
        count += per_media[media[j]]
    return [r for r in records if r["_path"] not in held], [r for r in records if r["_path"] in held]


#################################################################################
#                     Chat formatting and assistant-only labels                 #
#################################################################################

def to_conversation(rec, upto=None):
    """Chat-template messages: the media placeholder goes first in the first user turn."""
    msgs, placed = [], False
    for m in rec["messages"][:upto]:
        if m["role"] == "user" and not placed:
            msgs.append({"role": "user", "content": [{"type": rec["kind"]}, {"type": "text", "text": m["content"]}]})
            placed = True
        else:
            msgs.append({"role": m["role"], "content": m["content"]})
    return msgs


def assistant_labels(input_ids, header_ids, end_id):
    """Labels that keep each assistant reply (and its <|im_end|>) and ignore everything else."""
    labels = torch.full_like(input_ids, IGNORE)
    h = len(header_ids)
    for b, row in enumerate(input_ids.tolist()):
        i, n = 0, len(row)
        while i + h <= n:
            if row[i:i + h] == header_ids:
                j = i + h
                while j < n and row[j] != end_id:
                    j += 1
                labels[b, i + h:min(j + 1, n)] = input_ids[b, i + h:min(j + 1, n)]
                i = j
            else:
                i += 1
    return labels


class Collator:
    """Load media, render the chat template, run the processor, and build assistant-only labels."""

    def __init__(self, processor, frames=8, max_pixels=None, min_pixels=None, max_length=None):
        self.processor, self.frames, self.max_length = processor, frames, max_length
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        tok = processor.tokenizer
        self.header_ids = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.end_id = tok.convert_tokens_to_ids("<|im_end|>")

    def size_kwargs(self, frames=1, default=None):
        """Processor `size` overrides: pixels per image or per frame (videos scale by frame count)."""
        if self.max_pixels is None and self.min_pixels is None:
            return {}
        size = dict(default or {})
        if self.max_pixels is not None:
            size["longest_edge"] = self.max_pixels * frames
        if self.min_pixels is not None:
            size["shortest_edge"] = self.min_pixels * frames
        return {"size": size}

    def encode(self, recs, texts, left_pad=False):
        """Processor call on already-rendered `texts` with each record's media."""
        images, videos, metas = [], [], []
        for rec in recs:
            try:
                pixels, meta = load_media(rec, self.frames)
            except Exception as e:  # the media scan passed, so the file changed under us
                raise DataError(f"{rec['_file']}:{rec['_line']}: cannot read {rec['media']}: {e}") from None
            (images if meta is None else videos).append(pixels)
            if meta is not None:
                metas.append(meta)
        kwargs = {}
        if images:
            kwargs["images"] = images
            kwargs["images_kwargs"] = self.size_kwargs(1, self.processor.image_processor.size)
        if videos:
            kwargs["videos"] = videos
            # a video may use --frames x the per-frame budget (shorter clips get sharper frames)
            vk = self.size_kwargs(self.frames or len(videos[0]), self.processor.video_processor.size)
            kwargs["videos_kwargs"] = dict(vk, video_metadata=metas, do_sample_frames=False)
        tok = self.processor.tokenizer
        old_side, tok.padding_side = tok.padding_side, ("left" if left_pad else "right")
        try:
            batch = self.processor(text=texts, padding=True, return_tensors="pt", **kwargs)
        finally:
            tok.padding_side = old_side
        return batch

    def __call__(self, recs):
        texts = [self.processor.apply_chat_template(to_conversation(r), tokenize=False) for r in recs]
        batch = self.encode(recs, texts)
        batch["labels"] = assistant_labels(batch["input_ids"], self.header_ids, self.end_id)
        batch["labels"][batch["attention_mask"] == 0] = IGNORE
        if self.max_length and batch["input_ids"].shape[1] > self.max_length:
            batch = self.truncate(batch, recs)
        return batch

    def truncate(self, batch, recs):
        """Cut sequences to --max-length, refusing a cut through the vision tokens."""
        keep = self.max_length
        mm = batch["mm_token_type_ids"]
        for b in range(mm.shape[0]):
            if mm[b, keep:].any():
                raise DataError(f"{recs[b]['_file']}:{recs[b]['_line']}: --max-length {keep} would cut the "
                                f"{recs[b]['kind']}'s tokens; raise it or lower --max-pixels / --frames")
        for k in ("input_ids", "attention_mask", "mm_token_type_ids", "labels"):
            batch[k] = batch[k][:, :keep]
        return batch


class Records(torch.utils.data.Dataset):
    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


class StepBatches(torch.utils.data.Sampler):
    """This rank's micro-batches from stream position `start_pos` on: epoch-seeded permutations of
    the data, cut into global batches, each split into [accumulation step][rank][micro-batch]."""

    def __init__(self, n, global_batch, grad_accum, rank, world_size, seed, start_pos, steps):
        self.n, self.gb, self.accum, self.rank, self.ws = n, global_batch, grad_accum, rank, world_size
        self.micro = global_batch // (grad_accum * world_size)
        self.seed, self.start_pos, self.steps = seed, start_pos, steps

    def positions(self, start, count):
        """Dataset indices at stream positions [start, start + count)."""
        out, cache = [], {}
        for p in range(start, start + count):
            epoch = p // self.n
            if epoch not in cache:
                cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out.append(int(cache[epoch][p % self.n]))
        return out

    def __iter__(self):
        for s in range(self.steps):
            idx = self.positions(self.start_pos + s * self.gb, self.gb)
            chunk = self.gb // self.accum
            for a in range(self.accum):
                part = idx[a * chunk:(a + 1) * chunk]
                yield part[self.rank * self.micro:(self.rank + 1) * self.micro]

    def __len__(self):
        return self.steps * self.accum


#################################################################################
#                                   Model                                       #
#################################################################################

def build_base(out_dir, d, seed):
    """The tiny Qwen3-VL (encoders.build_tiny_qwen3vl), written once as `out_dir` by rank 0."""
    import encoders
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if d.is_main and not (out_dir / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
        try:
            encoders.build_tiny_qwen3vl(tmp, seed=seed)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.rename(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"built the tiny Qwen3-VL base model in {out_dir}")
    if d.enabled:
        dist.barrier()
    return out_dir


def load_model(name_or_path, dtype=torch.float32):
    """Qwen3VLForConditionalGeneration + Qwen3VLProcessor from a hub id or a save_pretrained dir."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    processor = AutoProcessor.from_pretrained(name_or_path)
    model = Qwen3VLForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype)
    return model, processor


def set_trainable(model, freeze_vision):
    """Freeze the ViT (patch embed, position embed, blocks); its mergers (the projector) and the LLM train."""
    for name, p in model.named_parameters():
        vit = name.startswith("model.visual.") and ".merger" not in name and "deepstack_merger" not in name
        p.requires_grad_(not (freeze_vision and vit))
    return [p for p in model.parameters() if p.requires_grad]


def wrap_model(model, args, d, dtype):
    """DDP, or FSDP2 with one unit per decoder layer, then the root (which holds the vision tower)."""
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        # Vision blocks stay in the root unit: a rank whose batch holds images and videos runs the
        # tower twice, one with only images once, and per-block units would then mismatch collectives.
        for layer in model.model.language_model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [d.local_rank] if d.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    return model


def lr_factor(step, warmup, total, schedule, min_ratio=0.1):
    """Linear warmup, then constant or cosine decay to `min_ratio` of the peak."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def save_pretrained_dir(model, processor, config_source, out_dir, d, save_dtype, fsdp):
    """Rank 0 writes a consolidated save_pretrained dir (model + processor) atomically."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import Qwen3VLForConditionalGeneration
    inner = model.module if hasattr(model, "module") and not fsdp else model
    if fsdp or d.enabled:
        sd = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    if d.is_main:
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with torch.device("meta"):
            fresh = Qwen3VLForConditionalGeneration._from_config(config_source)
        fresh.load_state_dict({k: v.to(save_dtype) for k, v in sd.items()}, strict=True, assign=True)
        fresh.tie_weights()
        fresh.config.use_cache = True  # off only for training
        fresh.generation_config = inner.generation_config
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
        try:
            fresh.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            old = out_dir.parent / f".{out_dir.name}.old"
            if out_dir.exists():
                os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if d.enabled:
        dist.barrier()


#################################################################################
#                                 Checkpoints                                   #
#################################################################################

def save_checkpoint(out_dir, model, optimizer, scheduler, step, position, args, d, keep=2):
    """Model, optimiser, scheduler, step, data position and every rank's RNG, in one atomic file."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rngs = [rng_state()]
    if d.enabled:
        rngs = [None] * d.world_size
        dist.all_gather_object(rngs, rng_state())
    if d.is_main:
        path = checkpoint_path(out_dir, step)
        atomic_torch_save({"model": msd, "optimizer": osd, "scheduler": scheduler.state_dict(), "step": step,
                           "position": position, "rng": rngs, "args": vars(args)}, path)
        for old in sorted(path.parent.glob("step_*.pt"))[:-keep]:
            old.unlink()
    if d.enabled:
        dist.barrier()


def load_checkpoint(path, model, optimizer, scheduler, d):
    """Restore a checkpoint written by save_checkpoint (rank 0 reads; the rest get it broadcast)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    ck = torch.load(path, map_location="cpu", weights_only=False) if d.is_main or not d.enabled else None
    if d.enabled:
        meta = [None if ck is None else {k: ck[k] for k in ("scheduler", "step", "position", "rng")}]
        dist.broadcast_object_list(meta, src=0)
        meta = meta[0]
    else:
        meta = ck
    bcast = d.enabled
    msd = ck["model"] if ck is not None else {}
    osd = ck["optimizer"] if ck is not None else {}
    set_model_state_dict(model, msd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=bcast))
    # strict=False: a parameter that never received a gradient has no optimiser state to restore
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=bcast, strict=False))
    scheduler.load_state_dict(meta["scheduler"])
    if len(meta["rng"]) == d.world_size:
        set_rng_state(meta["rng"][d.rank])
    else:
        log(f"checkpoint was written by {len(meta['rng'])} ranks, now {d.world_size}: RNG states not restored")
    return meta["step"], meta["position"]


#################################################################################
#                                 Evaluation                                    #
#################################################################################

def normalise(text):
    """Lower-case, collapse spaces, drop trailing punctuation: how answers are compared."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?")


# Question patterns of the built-in world's VQA (world.write_vqa), for records with no "perspective".
PERSPECTIVES = [("describe", r"^(describe|write a detailed caption|what is shown)"), ("colour", r"^what colou?r"),
                 ("position", r"^where "), ("size", r"large or small"), ("ocr", r"^what word|written"),
                 ("speed", r"^how fast"), ("motion", r"^(in which direction|how does .* move)"),
                 ("event", r"^what happens"), ("count", r"^how many"), ("temporal", r"earlier|later|first"),
                 ("spatial", r"^(is|does) ")]


def perspective_of(rec, turn):
    """A turn's question perspective: its own or the record's "perspective" key, else the question's pattern."""
    given = rec["messages"][turn].get("perspective") or rec.get("perspective")
    if given:
        return given
    question = next((m["content"] for m in reversed(rec["messages"][:turn]) if m["role"] == "user"), "")
    for name, pattern in PERSPECTIVES:
        if re.search(pattern, question.strip().lower()):
            return name
    return "other"


def eval_items(records):
    """(record, turn index, reference, perspective) for every assistant turn of held-out records."""
    items = []
    for rec in records:
        for t, m in enumerate(rec["messages"]):
            if m["role"] == "assistant" and m["content"].strip():
                items.append((rec, t, m["content"], perspective_of(rec, t)))
    return items


@torch.no_grad()
def evaluate_vqa(model, processor, heldout, train, args, device, dtype):
    """Greedy answers to held-out questions: exact-match accuracy per perspective vs chance."""
    model.eval()
    collate = Collator(processor, args.frames, args.max_pixels, args.min_pixels)
    items = [it for it in eval_items(heldout) if it[3] not in args.eval_skip]
    answers_by_p = defaultdict(Counter)
    for it in eval_items(train):
        answers_by_p[it[3]][normalise(it[2])] += 1
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = processor.tokenizer.pad_token_id
    preds = []
    for s in tqdm(range(0, len(items), args.eval_batch), desc="eval", disable=not args.progress):
        chunk = items[s:s + args.eval_batch]
        texts = [processor.apply_chat_template(to_conversation(r, upto=t), tokenize=False,
                                               add_generation_prompt=True) for r, t, _, _ in chunk]
        batch = collate.encode([r for r, _, _, _ in chunk], texts, left_pad=True).to(device)
        with autocast(device, dtype):
            out = model.generate(**batch, max_new_tokens=args.eval_max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)
        new = out[:, batch["input_ids"].shape[1]:]
        preds += processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    per = defaultdict(lambda: {"n": 0, "correct": 0})
    examples = []
    for (rec, t, ref, p), pred in zip(items, preds):
        ok = normalise(pred) == normalise(ref)
        per[p]["n"] += 1
        per[p]["correct"] += int(ok)
        if len(examples) < 20:
            examples.append({"file": rec["_file"], "line": rec["_line"], "perspective": p,
                             "question": rec["messages"][t - 1]["content"] if t else "",
                             "reference": ref, "prediction": pred})
    results = {}
    for p in sorted(per):
        seen = answers_by_p[p]
        majority = seen.most_common(1)[0][0] if seen else None
        n_major = sum(normalise(ref) == majority for _, _, ref, q in items if q == p)
        results[p] = {"n": per[p]["n"], "accuracy": per[p]["correct"] / per[p]["n"],
                      "chance_uniform": 1.0 / len(seen) if seen else 0.0,
                      "majority_baseline": n_major / per[p]["n"], "distinct_train_answers": len(seen)}
    n = sum(v["n"] for v in results.values())
    overall = {"n": n, "accuracy": sum(v["accuracy"] * v["n"] for v in results.values()) / max(1, n),
               "chance_uniform": sum(v["chance_uniform"] * v["n"] for v in results.values()) / max(1, n),
               "majority_baseline": sum(v["majority_baseline"] * v["n"] for v in results.values()) / max(1, n)}
    return {"overall": overall, "per_perspective": results, "examples": examples}


def eval_markdown(res, title):
    lines = [f"# {title}", "", "| perspective | n | accuracy | chance (uniform over answers) | majority answer |",
             "|---|---|---|---|---|"]
    rows = list(res["per_perspective"].items()) + [("**overall**", res["overall"])]
    for p, v in rows:
        lines.append(f"| {p} | {v['n']} | {100 * v['accuracy']:.1f}% | {100 * v['chance_uniform']:.1f}% | "
                     f"{100 * v['majority_baseline']:.1f}% |")
    return "\n".join(lines) + "\n"


#################################################################################
#                                  Training                                     #
#################################################################################

def train(args):
    """Fine-tune; returns {"losses": [(step, loss)], ...}. Everything rank 0 writes goes under --out."""
    t_start = time.time()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    d = init_distributed(args.device)
    if d.device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)  # small matmuls: more threads mostly add contention
    seed_everything(args.seed, d.rank)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = pick_dtype(d.device, args.dtype)
    if args.batch_size % (args.grad_accum * d.world_size):
        raise ValueError(f"--batch-size {args.batch_size} must divide by --grad-accum x world size "
                         f"({args.grad_accum} x {d.world_size})")

    # ---- data
    records = read_records(args.data)
    if args.captions:
        records += read_records(args.captions, captions=True)
    records, n_bad = scan_media(records, args.frames, d)
    train_recs, heldout = split_heldout(records, args.eval_size, args.seed)
    if not train_recs:
        raise DataError(f"{args.data}: no records left to train on")
    log(f"data: {len(records)} records ({n_bad} skipped), train {len(train_recs)}, held out {len(heldout)} "
        f"({len({r['_path'] for r in heldout})} media)")

    # ---- model
    model_path = args.model or build_base(Path(args.base_out or out / "base"), d, args.seed)
    if args.min_pixels is None and args.model is None:
        args.min_pixels = TINY_MIN_PIXELS
    model, processor = load_model(model_path)
    pixel_limits = Collator(processor, args.frames, args.max_pixels, args.min_pixels)
    # the saved processor keeps the limits trained with, so the model is later used as trained
    processor.image_processor.size = pixel_limits.size_kwargs(1, processor.image_processor.size).get(
        "size", processor.image_processor.size)
    processor.video_processor.size = pixel_limits.size_kwargs(args.frames, processor.video_processor.size).get(
        "size", processor.video_processor.size)
    model.config.use_cache = False
    params = set_trainable(model, args.freeze_vision)
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    log(f"model {model_path}: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable; "
        f"device {d.device}, dtype {dtype}, world {d.world_size}, {'FSDP' if args.fsdp else 'DDP' if d.enabled else 'single'}")
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = model.config
    model.to(d.device)
    model = wrap_model(model, args, d, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup, args.steps, args.schedule))

    step, position = 0, 0
    if args.resume:
        ck = latest_checkpoint(out)
        if ck is None:
            log(f"--resume: no checkpoint under {out}/checkpoints, starting fresh")
        else:
            step, position = load_checkpoint(ck, model, optimizer, scheduler, d)
            log(f"resumed from {ck} at step {step}")

    stop = min(args.steps, args.stop_at or args.steps)
    sampler = StepBatches(len(train_recs), args.batch_size, args.grad_accum, d.rank, d.world_size,
                          args.seed, position, max(0, stop - step))
    loader = torch.utils.data.DataLoader(Records(train_recs), batch_sampler=sampler, num_workers=args.workers,
                                         collate_fn=Collator(processor, args.frames, args.max_pixels,
                                                             args.min_pixels, args.max_length))
    writer = None
    if d.is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(out / "tb")

    # ---- loop
    losses, it = [], iter(loader)
    model.train()
    bar = tqdm(total=stop, initial=step, desc="stage1", disable=not (d.is_main and args.progress))
    t_loop, tokens_seen = time.time(), 0
    while step < stop:
        micro = [next(it) for _ in range(args.grad_accum)]
        # the loss is a mean over every assistant token of the global batch, whatever the split
        n_tok = torch.tensor(float(sum(int((b["labels"] != IGNORE).sum()) for b in micro)), device=d.device)
        if d.enabled:
            dist.all_reduce(n_tok)
        total = torch.zeros((), device=d.device)
        for a, batch in enumerate(micro):
            batch = batch.to(d.device)
            labels = batch.pop("labels")
            tokens_seen += int(batch["attention_mask"].sum())
            last = a == len(micro) - 1
            if args.fsdp:
                model.set_requires_gradient_sync(last)
            sync = model.no_sync() if (d.enabled and not args.fsdp and not last) else _null()
            with sync:
                with autocast(d.device, dtype):
                    logits = model(**batch).logits
                ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                     ignore_index=IGNORE, reduction="sum")
                # DDP/FSDP average gradients over ranks; scale so the result is the global token mean
                (ce * d.world_size / n_tok.clamp(min=1)).backward()
            total += ce.detach()
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if d.enabled:
            dist.all_reduce(total)
        loss = (total / n_tok.clamp(min=1)).item()
        step += 1
        position += args.batch_size
        losses.append((step, loss))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if writer is not None:
            writer.add_scalar("loss", loss, step)
            writer.add_scalar("lr", lr, step)
            writer.add_scalar("grad_norm", float(gnorm), step)
        if step % args.log_every == 0 and not args.progress:
            log(f"step {step}/{args.steps} loss {loss:.4f} lr {lr:.2e}")
        if (args.ckpt_every and (step % args.ckpt_every == 0 or step == stop)) or step == stop < args.steps:
            save_checkpoint(out, model, optimizer, scheduler, step, position, args, d, args.keep)
    bar.close()
    train_time = time.time() - t_loop
    if writer is not None:
        writer.close()

    summary = {"steps": step, "losses": losses, "train_seconds": train_time,
               "tokens_per_second_per_rank": tokens_seen / max(train_time, 1e-9), "skipped_records": n_bad,
               "world_size": d.world_size, "model": str(model_path)}
    finished = step >= args.steps
    if finished:
        save_dtype = {"auto": dtype, "fp32": torch.float32, "bf16": torch.bfloat16}[args.save_dtype]
        save_pretrained_dir(model, processor, config, out / "model", d, save_dtype, args.fsdp)
        log(f"saved {out / 'model'}")
    del model, optimizer
    cleanup_distributed()  # the other ranks are done; rank 0 evaluates alone, free of collective timeouts

    # ---- held-out VQA, generated by the saved directory (which also checks that it loads)
    if finished and d.is_main and heldout and args.eval_size:
        fine, proc = load_model(out / "model", dtype=dtype if d.device.type == "cuda" else torch.float32)
        fine.to(d.device)
        res = evaluate_vqa(fine, proc, heldout, train_recs, args, d.device, dtype)
        res["model"] = str(out / "model")
        atomic_write_json(out / "vqa_eval.json", res)
        atomic_write_text(out / "vqa_eval.md", eval_markdown(res, "Held-out VQA, fine-tuned model (greedy, exact match)"))
        summary["vqa"] = {p: v["accuracy"] for p, v in res["per_perspective"].items()}
        summary["vqa_overall"] = res["overall"]
        log(eval_markdown(res, "Held-out VQA"))
    summary["wall_seconds"] = time.time() - t_start
    if d.is_main:
        atomic_write_json(out / "summary.json", summary, indent=None)
        if losses:
            log(f"loss {losses[0][1]:.4f} (step {losses[0][0]}) -> {losses[-1][1]:.4f} (step {losses[-1][0]}); "
                f"{summary['wall_seconds']:.0f}s")
    return summary


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id or save_pretrained dir; default: build the tiny Qwen3-VL")
    p.add_argument("--data", default="runs/world/vqa.jsonl", help="VQA jsonl {media, kind, messages}")
    p.add_argument("--captions", default=None,
                   help="optional jsonl {media, caption, kind} (e.g. runs/world/t2x.jsonl) added as describe turns")
    p.add_argument("--out", default="runs/stage1")
    p.add_argument("--base-out", default=None, help="where the tiny base model goes (default OUT/base)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (all ranks x accumulation)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
                   help="freeze the ViT (its mergers still train)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on every layer")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per decoder layer) instead of DDP")
    p.add_argument("--max-pixels", type=int, default=None, help="max pixels per image / per video frame")
    p.add_argument("--min-pixels", type=int, default=None,
                   help="min pixels per image / per video frame (default: the processor's; with no --model "
                        "64x64, so the world's 32x32 renders give 16 vision tokens instead of 4)")
    p.add_argument("--frames", type=int, default=8, help="frames sampled per video (even)")
    p.add_argument("--max-length", type=int, default=None, help="truncate sequences to this many tokens")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--save-dtype", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (0: torch's default)")
    p.add_argument("--eval-size", type=int, default=400, help="held-out records (whole media) for VQA eval")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--eval-max-new-tokens", type=int, default=16)
    p.add_argument("--eval-skip", nargs="*", default=["describe"], help="perspectives not scored by exact match")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step (checkpointed); --resume later")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    return p.parse_args(argv)


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
