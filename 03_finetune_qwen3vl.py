"""03: stage 1 of GRAN-TED, visual-semantic fine-tuning of Qwen3-VL on VQA and captioning data.

The paper fine-tunes Qwen3-VL-8B-Instruct on questions about attributes, spatial relations, temporal
order, counts and text in images and videos, so the encoder it becomes carries the visual semantics a
diffusion model needs. Here the real Qwen3VLProcessor and Qwen3VLForConditionalGeneration train with the
loss on the assistant's tokens only; rank 0 writes a save_pretrained folder that 02, 04 and 05 load. With
no --model it fine-tunes the tiny pretrained `tiny-qwen3vl-base` (copied to runs/stage1/base/ for 02) on
01's targeted VQA, and scores held-out questions per perspective (runs/stage1/vqa_eval.md).

    python 03_finetune_qwen3vl.py                                  # CPU, built-in data (--resume continues)
    torchrun --nproc_per_node=2 03_finetune_qwen3vl.py             # DDP: the same model as one process
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 \
        03_finetune_qwen3vl.py --fsdp --grad-ckpt --model Qwen/Qwen3-VL-8B-Instruct --data my_vqa.jsonl \
        --steps 3000 --batch-size 128 --grad-accum 8 --lr 1e-5 --max-pixels 200704 --max-frames 16
    python 02_probe_encoders.py --encoders runs/stage1/base,runs/stage1/model --strategies norm-avg

Data: jsonl of {"media", "kind", "messages": [{"role": "user", ...}, {"role": "assistant", "content",
"perspective"?}, ...]}, media relative to the jsonl; --captions adds {media, caption, kind} as describe
turns. --batch-size is global (ranks x accumulation), so any process count trains the same model.
Checkpoints hold everything a resume needs; --resume continues the same loss curve.
"""
import argparse
import re
import shutil
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import encoders
import plumbing
from common import check_same_run, read_vqa_media, read_vqa_records, scan_vqa_media
from plumbing import DataError, autocast, log

IGNORE = encoders.IGNORE
KIND = "gran-ted/stage1"  # the checkpoint's kind tag
# The settings that make the loss curve; a checkpoint carries them and --resume refuses one that differs.
RUN_KEYS = ("model", "data", "captions", "seed", "lr", "batch_size", "steps", "warmup", "decay",
            "grad_clip", "freeze_vision", "max_frames", "max_pixels", "min_pixels", "max_length", "eval_size")


#################################################################################
#                        Held-out split and batches                             #
#################################################################################

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


class StepBatches(torch.utils.data.Sampler):
    """This rank's micro-batches from stream position `start_pos` on: epoch-seeded permutations of
    the data, cut into global batches, each split into [accumulation step][rank][micro-batch]."""

    def __init__(self, n, global_batch, grad_accum, rank, world_size, seed, start_pos, steps):
        self.n, self.gb, self.accum, self.rank = n, global_batch, grad_accum, rank
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


def pixel_size(default, max_pixels, min_pixels, frames=1):
    """The processor's `size` with the pixel limits per image or per frame (a video scales by its frames)."""
    size = dict(default or {})
    if max_pixels is not None:
        size["longest_edge"] = max_pixels * frames
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels * frames
    return size


def keep_pixel_limits(processor, frames, max_pixels, min_pixels):
    """Write the limits into the processor, so that the saved model is later used as it was trained."""
    if max_pixels is not None or min_pixels is not None:
        processor.image_processor.size = pixel_size(processor.image_processor.size, max_pixels, min_pixels)
        processor.video_processor.size = pixel_size(processor.video_processor.size, max_pixels, min_pixels, frames)


class Collator:
    """Load media, render the chat template, run the processor, and build assistant-only labels."""

    def __init__(self, processor, frames=8, max_pixels=None, min_pixels=None, max_length=None):
        self.processor, self.frames, self.max_length = processor, frames, max_length
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        tok = processor.tokenizer
        self.header_ids = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.end_id = tok.convert_tokens_to_ids("<|im_end|>")

    def size_kwargs(self, default, frames=1):
        """Processor `size` overrides (none when no limit is set)."""
        if self.max_pixels is None and self.min_pixels is None:
            return {}
        return {"size": pixel_size(default, self.max_pixels, self.min_pixels, frames)}

    def encode(self, recs, texts, left_pad=False):
        """Processor call on already-rendered `texts` with each record's media."""
        images, videos, metas = [], [], []
        for rec in recs:
            try:
                pixels, meta = read_vqa_media(rec, self.frames)
            except Exception as e:  # the media scan passed, so the file changed under us
                raise DataError(f"{rec['_file']}:{rec['_line']}: cannot read {rec['media']}: {e}") from None
            (images if meta is None else videos).append(pixels)
            if meta is not None:
                metas.append(meta)
        kwargs = {}
        if images:
            kwargs["images"] = images
            kwargs["images_kwargs"] = self.size_kwargs(self.processor.image_processor.size)
        if videos:
            kwargs["videos"] = videos
            # a video may use --max-frames x the per-frame budget (shorter clips get sharper frames)
            vk = self.size_kwargs(self.processor.video_processor.size, self.frames)
            kwargs["videos_kwargs"] = dict(vk, video_metadata=metas, do_sample_frames=False)
        tok = self.processor.tokenizer
        old_side, tok.padding_side = tok.padding_side, ("left" if left_pad else "right")
        try:
            return self.processor(text=texts, padding=True, return_tensors="pt", **kwargs)
        finally:
            tok.padding_side = old_side

    def __call__(self, recs):
        texts = [self.processor.apply_chat_template(to_conversation(r), tokenize=False) for r in recs]
        batch = self.encode(recs, texts)
        batch["labels"] = encoders.assistant_labels(batch["input_ids"], self.header_ids, self.end_id)
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
                                f"{recs[b]['kind']}'s tokens; raise it or lower --max-pixels / --max-frames")
        for k in ("input_ids", "attention_mask", "mm_token_type_ids", "labels"):
            batch[k] = batch[k][:, :keep]
        return batch


#################################################################################
#                                   Model                                       #
#################################################################################

def tiny_base(out_dir, seed, d):
    """The pretrained tiny Qwen3-VL (`tiny-qwen3vl-base`) as `out_dir`, copied by rank 0 from encoders'
    cache (keyed by its recipe and seed; built there in a few CPU-minutes the first time); a folder
    built by another recipe or seed is replaced."""
    if d.is_main:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        source = encoders.ladder_dir("tiny-qwen3vl-base", seed=seed)
        key = {"built_from": source.name, "seed": seed}
        made = out_dir / "built_from.json"
        try:
            same = plumbing.read_json(made) == key
        except DataError:  # no folder yet, or one from before the key was recorded
            same = False
        if not same:
            def build(tmp):
                shutil.copytree(source, tmp, dirs_exist_ok=True)
                plumbing.atomic_write_json(tmp / made.name, key)
            plumbing.atomic_dir(out_dir, build)
            log(f"copied the pretrained tiny Qwen3-VL base to {out_dir}")
    d.barrier()
    return out_dir


def prepare_model(model_path, args, d, dtype):
    """(wrapped model, processor, config): the trainable part chosen, on the device, DDP or FSDP."""
    model, processor = encoders.load_qwen3vl(model_path)
    keep_pixel_limits(processor, args.max_frames, args.max_pixels, args.min_pixels)
    model.config.use_cache = False
    params = encoders.set_trainable(model, args.freeze_vision)
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    log(f"model {model_path}: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable; device {d.device}, "
        f"dtype {dtype}, world {d.world_size}, {'FSDP' if args.fsdp else 'DDP' if d.enabled else 'single'}")
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = model.config
    model.to(d.device)
    return encoders.wrap_model(model, d, dtype, args.fsdp), processor, config


def save_pretrained_dir(model, processor, config, folder, d, save_dtype, fsdp):
    """Rank 0 writes the consolidated save_pretrained folder (model + processor) as OUT/model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import Qwen3VLForConditionalGeneration
    inner = model.module if hasattr(model, "module") and not fsdp else model
    if fsdp or d.enabled:
        sd = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu() for k, v in inner.state_dict().items()}
    if d.is_main:
        with torch.device("meta"):
            fresh = Qwen3VLForConditionalGeneration._from_config(config)
        fresh.load_state_dict({k: v.to(save_dtype) for k, v in sd.items()}, strict=True, assign=True)
        fresh.tie_weights()
        fresh.config.use_cache = True  # off only for training
        fresh.generation_config = inner.generation_config

        def build(tmp):
            fresh.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        folder.save_model(build)
    d.barrier()


#################################################################################
#                          Run folder and checkpoints                           #
#################################################################################

def run_signature(args):
    """What the run is (RUN_KEYS, and the data files' bytes), as plain types for the checkpoint."""
    for flag, path in (("--data", args.data), ("--captions", args.captions)):
        if path is not None and not Path(path).is_file():
            raise DataError(f"{flag} {path}: no such file")
    run = {k: getattr(args, k) for k in RUN_KEYS}
    run.update(data=str(args.data), data_sha256=plumbing.file_digest(args.data),
               captions_sha256=plumbing.file_digest(args.captions) if args.captions else None)
    return run


class RunFolder:
    """--out: one run's checkpoints and model. A new run refuses a folder that holds another unless
    --overwrite, and then removes the old run's checkpoints only once it has written its own."""

    def __init__(self, out, args, run):
        self.out, self.args, self.run = Path(out), args, run
        self.stale = []  # the old run's checkpoints, while this run has written nothing

    def start(self):
        """Rank 0: the checkpoint state to continue from, or None for a fresh run."""
        has_model = (self.out / "model" / "config.json").is_file()
        if self.args.resume:
            path, state = plumbing.load_latest_checkpoint(self.out, KIND)
            if state is not None:
                check_same_run(state.get("run", {}), self.run, f"--resume {path}")
                log(f"resuming from {path} at step {state['step']}")
                return state
            if has_model and not self.args.overwrite:
                raise DataError(f"--resume: {self.out} holds a finished model and no checkpoint to continue; "
                                f"pass --overwrite to train a new one")
            log(f"--resume: no checkpoint under {self.out / 'checkpoints'}, starting fresh")
        held = plumbing.list_checkpoints(self.out)
        if (held or has_model) and not self.args.overwrite:
            what = "checkpoints" if held else "a finished model"
            raise DataError(f"--out {self.out} already holds a run ({what}); pass --resume to continue it "
                            f"or --overwrite to replace it")
        self.stale = held
        return None

    def save_checkpoint(self, state):
        """checkpoints/step_N.pt (rank 0), then the old run's checkpoints go."""
        plumbing.save_checkpoint(self.out, state["step"], state, replaces=self.stale)
        self.stale = []

    def save_model(self, build):
        """OUT/model, swapped in whole; a run that wrote no checkpoint then drops the old run's."""
        plumbing.atomic_dir(self.out / "model", build)
        for old in self.stale:
            old.unlink(missing_ok=True)
        self.stale = []


def start_state(folder, d):
    """`folder.start()` decided on rank 0 (the checkpoint's state there, {} on the other ranks when
    resuming); a refusal is raised on every rank, so none waits for the others."""
    state, error = None, None
    if d.is_main:
        try:
            state = folder.start()
        except DataError as e:
            error = str(e)
    if d.enabled:
        box = [error, state is not None]
        dist.broadcast_object_list(box, src=0)
        error, resuming = box
        state = state if d.is_main else ({} if resuming else None)
    if error:
        plumbing.cleanup_distributed()  # every rank leaves the group together, none aborts mid-collective
        raise DataError(error)
    return state


def checkpoint_state(model, optimizer, scheduler, step, position, run, d):
    """Everything a resume needs, as tensors and plain types (rank 0; None elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rngs = [plumbing.rng_state()]
    if d.enabled:
        rngs = [None] * d.world_size
        dist.all_gather_object(rngs, plumbing.rng_state())
    if not d.is_main:
        return None
    return {"kind": KIND, "model": msd, "optimizer": osd, "scheduler": scheduler.state_dict(), "step": step,
            "position": position, "rng": rngs, "run": run}


def restore(state, model, optimizer, scheduler, d):
    """Load a checkpoint's state (held by rank 0, broadcast to the others); returns (step, position)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    meta = [{k: state[k] for k in ("scheduler", "step", "position", "rng")} if d.is_main else None]
    if d.enabled:
        dist.broadcast_object_list(meta, src=0)
    meta = meta[0]
    opts = {"full_state_dict": True, "broadcast_from_rank0": d.enabled}
    set_model_state_dict(model, state.get("model", {}), options=StateDictOptions(**opts))
    # strict=False: a parameter that never received a gradient has no optimiser state to restore
    set_optimizer_state_dict(model, optimizer, state.get("optimizer", {}),
                             options=StateDictOptions(**opts, strict=False))
    scheduler.load_state_dict(meta["scheduler"])
    if len(meta["rng"]) == d.world_size:
        plumbing.set_rng_state(meta["rng"][d.rank])
    else:
        log(f"checkpoint was written by {len(meta['rng'])} ranks, now {d.world_size}: RNG states not restored")
    return meta["step"], meta["position"]


#################################################################################
#                                 Evaluation                                    #
#################################################################################

def normalise(text):
    """Lower-case, collapse spaces, drop trailing punctuation: how answers are compared."""
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!?")


def eval_items(records):
    """(record, turn index, reference, perspective) for every assistant turn; the perspective is the
    reply's own, else the record's, else "other"."""
    return [(rec, t, m["content"], m.get("perspective") or rec.get("perspective") or "other")
            for rec in records for t, m in enumerate(rec["messages"])
            if m["role"] == "assistant" and m["content"].strip()]


@torch.no_grad()
def evaluate_vqa(model, processor, heldout, train, args, device, dtype):
    """Greedy answers to held-out questions: exact-match accuracy per perspective vs chance."""
    model.eval()
    collate = Collator(processor, args.max_frames, args.max_pixels, args.min_pixels)
    items = [it for it in eval_items(heldout) if it[3] != "describe"]  # free text: no exact match
    answers_by_p = defaultdict(Counter)
    for it in eval_items(train):
        answers_by_p[it[3]][normalise(it[2])] += 1
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = processor.tokenizer.pad_token_id
    preds = []
    for s in plumbing.progress(range(0, len(items), 64), desc="eval"):
        chunk = items[s:s + 64]
        texts = [processor.apply_chat_template(to_conversation(r, upto=t), tokenize=False,
                                               add_generation_prompt=True) for r, t, _, _ in chunk]
        batch = collate.encode([r for r, _, _, _ in chunk], texts, left_pad=True).to(device)
        with autocast(device, dtype):
            out = model.generate(**batch, max_new_tokens=16, do_sample=False,
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


def evaluate_saved(out, heldout, train_recs, args, d, dtype):
    """Held-out VQA answered by the saved folder (which also checks that it loads); written to OUT."""
    model, processor = encoders.load_qwen3vl(out / "model", dtype=dtype if d.device.type == "cuda" else torch.float32)
    res = evaluate_vqa(model.to(d.device), processor, heldout, train_recs, args, d.device, dtype)
    res["model"] = str(out / "model")
    plumbing.atomic_write_json(out / "vqa_eval.json", res)
    plumbing.atomic_write_text(out / "vqa_eval.md", eval_markdown(res, "Held-out VQA, fine-tuned model (greedy, exact match)"))
    log(eval_markdown(res, "Held-out VQA"))
    return {"vqa": {p: v["accuracy"] for p, v in res["per_perspective"].items()}, "vqa_overall": res["overall"]}


#################################################################################
#                                  Training                                     #
#################################################################################

def load_data(args, d):
    """(train records, held-out records, records skipped for bad media)."""
    records = read_vqa_records(args.data)
    if args.captions:
        records += read_vqa_records(args.captions, captions=True)
    records, n_bad = scan_vqa_media(records, args.max_frames, d)
    train_recs, heldout = split_heldout(records, args.eval_size, args.seed)
    if not train_recs:
        raise DataError(f"{args.data}: no records left to train on")
    log(f"data: {len(records)} records ({n_bad} skipped), train {len(train_recs)}, held out {len(heldout)} "
        f"({len({r['_path'] for r in heldout})} media)")
    return train_recs, heldout, n_bad


def train_step(model, micro, params, optimizer, scheduler, args, d, dtype):
    """One optimiser step over the accumulated micro-batches: (loss, grad norm, lr, tokens seen)."""
    # the loss is a mean over every assistant token of the global batch, whatever the split
    n_tok = torch.tensor(float(sum(int((b["labels"] != IGNORE).sum()) for b in micro)), device=d.device)
    if d.enabled:
        dist.all_reduce(n_tok)
    total, tokens = torch.zeros((), device=d.device), 0
    for a, batch in enumerate(micro):
        batch = batch.to(d.device)
        labels = batch.pop("labels")
        tokens += int(batch["attention_mask"].sum())
        last = a == len(micro) - 1
        if args.fsdp:
            model.set_requires_gradient_sync(last)
        with model.no_sync() if (d.enabled and not args.fsdp and not last) else nullcontext():
            with autocast(d.device, dtype):
                logits = model(**batch).logits
            ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                 ignore_index=IGNORE, reduction="sum")
            # DDP/FSDP average gradients over ranks; scale so the result is the global token mean
            (ce * d.world_size / n_tok.clamp(min=1)).backward()
        total += ce.detach()
    gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if d.enabled:
        dist.all_reduce(total)
    return (total / n_tok.clamp(min=1)).item(), float(gnorm), lr, tokens


def tensorboard(out, d):
    """A tensorboard writer under OUT/tb on rank 0 (None elsewhere)."""
    if not d.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(out / "tb")


def log_step(writer, step, loss, lr, gnorm, args):
    """Tensorboard scalars every step; a log line every --log-every steps."""
    if step % args.log_every == 0:
        log(f"step {step}/{args.steps} loss {loss:.4f} lr {lr:.2e}")
    if writer is not None:
        writer.add_scalar("loss", loss, step)
        writer.add_scalar("lr", lr, step)
        writer.add_scalar("grad_norm", gnorm, step)


def train(args):
    """Fine-tune; returns the run's summary. Everything rank 0 writes goes under --out."""
    t_start = time.time()
    d = plumbing.init_distributed(args.device)
    if d.device.type == "cpu":
        plumbing.set_threads(args.threads)  # small matmuls: more threads mostly add contention
    plumbing.seed_everything(args.seed, d.rank)
    out, dtype = Path(args.out), plumbing.pick_dtype(d.device, args.dtype)
    if args.batch_size % (args.grad_accum * d.world_size):
        raise DataError(f"--batch-size {args.batch_size} must divide by --grad-accum x {d.world_size} processes")
    folder = RunFolder(out, args, run_signature(args))
    start = start_state(folder, d)
    train_recs, heldout, n_bad = load_data(args, d)
    model_path = args.model or tiny_base(out / "base", args.seed, d)
    model, processor, config = prepare_model(model_path, args, d, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = plumbing.lr_scheduler(optimizer, args.steps, args.warmup, args.decay, floor=0.1)
    step, position = restore(start, model, optimizer, scheduler, d) if start is not None else (0, 0)
    stop = min(args.steps, args.stop_at or args.steps)
    batches = data_loader(train_recs, processor, args, d, position, max(0, stop - step))
    writer = tensorboard(out, d)

    losses, tokens_seen, t_loop = [], 0, time.time()
    bar = plumbing.progress(total=stop, initial=step, desc="stage1")
    model.train()
    while step < stop:
        micro = [next(batches) for _ in range(args.grad_accum)]
        loss, gnorm, lr, tokens = train_step(model, micro, params, optimizer, scheduler, args, d, dtype)
        step, position, tokens_seen = step + 1, position + args.batch_size, tokens_seen + tokens
        losses.append((step, loss))
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}")
        log_step(writer, step, loss, lr, gnorm, args)
        # a stop before --steps always leaves a checkpoint, so that --resume can continue
        if (args.ckpt_every and (step % args.ckpt_every == 0 or step == stop)) or step == stop < args.steps:
            state = checkpoint_state(model, optimizer, scheduler, step, position, folder.run, d)
            if d.is_main:
                folder.save_checkpoint(state)
            d.barrier()
    bar.close()
    train_time = time.time() - t_loop
    if writer is not None:
        writer.close()

    summary = {"steps": step, "losses": losses, "train_seconds": train_time,
               "tokens_per_second_per_rank": tokens_seen / max(train_time, 1e-9), "skipped_records": n_bad,
               "world_size": d.world_size, "model": str(model_path)}
    finished = step >= args.steps
    if finished:
        save_pretrained_dir(model, processor, config, folder, d, dtype, args.fsdp)
        log(f"saved {out / 'model'}")
    del model, optimizer
    plumbing.cleanup_distributed()  # rank 0 evaluates alone, free of collective timeouts
    if finished and d.is_main and heldout:
        summary.update(evaluate_saved(out, heldout, train_recs, args, d, dtype))
    summary["wall_seconds"] = time.time() - t_start
    if d.is_main:
        write_summary(out, summary, losses)
    return summary


def data_loader(records, processor, args, d, position, steps):
    """This rank's micro-batches from the global batch order's `position` on, for `steps` optimiser steps."""
    sampler = StepBatches(len(records), args.batch_size, args.grad_accum, d.rank, d.world_size, args.seed,
                          position, steps)
    collate = Collator(processor, args.max_frames, args.max_pixels, args.min_pixels, args.max_length)
    return iter(torch.utils.data.DataLoader(records, batch_sampler=sampler, collate_fn=collate))


def write_summary(out, summary, losses):
    plumbing.atomic_write_json(out / "summary.json", summary, indent=None)
    if losses:
        log(f"loss {losses[0][1]:.4f} (step {losses[0][0]}) -> {losses[-1][1]:.4f} (step {losses[-1][0]}); "
            f"{summary['wall_seconds']:.0f}s")


#################################################################################
#                                Command line                                   #
#################################################################################

def get_parser():
    p = plumbing.ArgumentParser(__doc__)
    pos, nonneg = plumbing.positive_int, plumbing.nonneg_int
    p.add_argument("--model", default=None, help="hub id or save_pretrained folder; default: the tiny Qwen3-VL")
    p.add_argument("--data", default="runs/world/vqa.jsonl", help="VQA jsonl {media, kind, messages}")
    p.add_argument("--captions", default=None,
                   help="optional jsonl {media, caption, kind} (e.g. runs/world/t2x.jsonl) added as describe turns")
    p.add_argument("--out", default="runs/stage1")
    p.add_argument("--steps", type=pos, default=600)
    p.add_argument("--batch-size", type=pos, default=32, help="global batch (all ranks x accumulation)")
    p.add_argument("--grad-accum", type=pos, default=1)
    p.add_argument("--lr", type=plumbing.positive_float, default=2e-3)
    p.add_argument("--warmup", type=nonneg, default=30)
    p.add_argument("--decay", choices=["cosine", "constant"], default="cosine", help="to 0.1 x --lr at --steps")
    p.add_argument("--grad-clip", type=plumbing.positive_float, default=1.0)
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
                   help="freeze the ViT (its mergers still train)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on every layer")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per decoder layer) instead of DDP")
    p.add_argument("--max-pixels", type=pos, default=None, help="max pixels per image / per video frame")
    p.add_argument("--min-pixels", type=pos, default=None,
                   help="min pixels per image / per video frame (default: the processor's; the tiny model's "
                        "is 64x64, so the world's 32x32 renders give 16 vision tokens instead of 4)")
    p.add_argument("--max-frames", type=plumbing.even_frames, default=8, help="at most this many frames per video (even)")
    p.add_argument("--max-length", type=pos, default=None, help="truncate sequences to this many tokens")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--threads", type=nonneg, default=1, help="torch CPU threads per process (0: torch's default)")
    p.add_argument("--eval-size", type=nonneg, default=400, help="held-out records (whole media) for VQA eval")
    p.add_argument("--ckpt-every", type=nonneg, default=200, help="0: only when stopping before --steps")
    p.add_argument("--stop-at", type=pos, default=None, help="stop after this step with a checkpoint; --resume later")
    p.add_argument("--resume", action="store_true", help="continue the newest checkpoint under --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run under --out (once this one has written)")
    p.add_argument("--seed", type=nonneg, default=0)
    p.add_argument("--log-every", type=pos, default=50, help="a log line every N steps (tensorboard gets every step)")
    return p


def main(argv=None):
    return train(get_parser().parse_args(argv))


if __name__ == "__main__":
    plumbing.run_cli(main)
