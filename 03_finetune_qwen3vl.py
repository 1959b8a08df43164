"""03: stage 1 of GRAN-TED, visual-semantic fine-tuning of Qwen3-VL on VQA and captioning data.

The paper fine-tunes Qwen3-VL-8B-Instruct on questions about attributes, spatial relations, temporal
order, counts and text in images and videos, so the encoder it becomes carries the visual semantics a
diffusion model needs. Here the real Qwen3VLProcessor and Qwen3VLForConditionalGeneration train with the
loss on the assistant's tokens only; rank 0 writes a save_pretrained folder that 02, 04 and 05 load. With
no --model it fine-tunes the tiny pretrained `tiny-qwen3vl-base` on 01's targeted VQA and scores held-out
questions per perspective (runs/stage1/vqa_eval.md).

    python 03_finetune_qwen3vl.py                                  # CPU, built-in data (--resume continues)
    torchrun --nproc_per_node=2 03_finetune_qwen3vl.py             # DDP: the same model as one process
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HEAD:29500 \
        03_finetune_qwen3vl.py --fsdp --grad-ckpt --model Qwen/Qwen3-VL-8B-Instruct --data my_vqa.jsonl \
        --steps 3000 --batch-size 128 --grad-accum 8 --lr 1e-5 --max-pixels 200704 --max-frames 16
    python 02_probe_encoders.py --encoders tiny-qwen3vl-base,runs/stage1/model --strategies norm-avg

Data: jsonl of {"media", "kind", "messages": [{"role": "user", ...}, {"role": "assistant", "content",
"perspective"?}, ...]}, media relative to the jsonl; --captions adds {media, caption, kind} as describe
turns. --batch-size is global (ranks x accumulation), so any process count trains the same model.
"""
import argparse
import re
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
from common import GRAD_CLIP, check_same_run, read_vqa_media, read_vqa_records, scan_vqa_media, tensorboard
from plumbing import DataError, autocast, log

IGNORE = encoders.IGNORE
KIND = "gran-ted/stage1"  # the checkpoint's kind tag
# The settings that make the loss curve; a checkpoint carries them and --resume refuses one that differs.
RUN_KEYS = ("model", "data", "captions", "seed", "lr", "batch_size", "steps", "warmup", "decay", "freeze_vision", "max_frames", "max_pixels", "min_pixels", "max_length", "eval_size")


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


def keep_pixel_limits(processor, frames, max_pixels, min_pixels):
    """Write the pixel limits into the processor (per image, per video frame), so that training, the eval
    and the saved model all use them."""
    for proc, scale in ((processor.image_processor, 1), (processor.video_processor, frames)):
        size = dict(proc.size or {})
        if max_pixels is not None:
            size["longest_edge"] = max_pixels * scale  # a video may use --max-frames x the frame budget
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels * scale
        proc.size = size


class Collator:
    """Load media, render the chat template, run the processor, and build assistant-only labels."""

    def __init__(self, processor, frames=8, max_length=None):
        self.processor, self.frames, self.max_length = processor, frames, max_length
        tok = processor.tokenizer
        self.header_ids = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.end_id = tok.convert_tokens_to_ids("<|im_end|>")

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
        if videos:
            kwargs["videos"], kwargs["videos_kwargs"] = videos, dict(video_metadata=metas, do_sample_frames=False)
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

def tiny_base(d):
    """The pretrained tiny Qwen3-VL (`tiny-qwen3vl-base`, as 02 names it): encoders' cached folder, built
    there by rank 0 the first time (a few CPU-minutes)."""
    if d.is_main:
        encoders.ladder_dir("tiny-qwen3vl-base")
    d.barrier()
    return encoders.ladder_dir("tiny-qwen3vl-base")


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


def save_pretrained_dir(model, processor, config, out, stale, d, save_dtype, fsdp):
    """Rank 0 writes the consolidated save_pretrained folder (model + processor) as OUT/model, swapped in
    whole; a run that wrote no checkpoint then drops the old run's (--overwrite)."""
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
        plumbing.atomic_dir(out / "model", build)
        for old in stale:
            old.unlink(missing_ok=True)
        log(f"saved {out / 'model'}")
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


def start_state(args, run, d):
    """(the checkpoint state to continue or None, the old run's checkpoints that --overwrite replaces once
    this run has written), decided on rank 0 (the others get {} when resuming); a refusal is raised on every
    rank, so none waits for the others."""
    state, stale, error = None, [], None
    if d.is_main:
        try:
            state, stale = claim_out(Path(args.out), args, run)
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
    return state, stale


def claim_out(out, args, run):
    """--out holds one run: --resume continues its newest checkpoint (the same run only); a new run refuses a
    folder that holds another unless --overwrite."""
    has_model = (out / "model" / "config.json").is_file()
    if args.resume:
        path, state = plumbing.load_latest_checkpoint(out, KIND)
        if state is not None:
            check_same_run(state.get("run", {}), run, f"--resume {path}")
            log(f"resuming from {path} at step {state['step']}")
            return state, []
        if has_model and not args.overwrite:
            raise DataError(f"--resume: {out} holds a finished model and no checkpoint to continue; "
                            f"pass --overwrite to train a new one")
        log(f"--resume: no checkpoint under {out / 'checkpoints'}, starting fresh")
    held = plumbing.list_checkpoints(out)
    if (held or has_model) and not args.overwrite:
        raise DataError(f"--out {out} already holds a run ({'checkpoints' if held else 'a finished model'}); "
                        f"pass --resume to continue it or --overwrite to replace it")
    return None, held


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


def answers(records):
    """(record, turn, reference, perspective) for every assistant turn; the perspective is the reply's own,
    else the record's, else "other"."""
    return [(rec, t, m["content"], m.get("perspective") or rec.get("perspective") or "other")
            for rec in records for t, m in enumerate(rec["messages"])
            if m["role"] == "assistant" and m["content"].strip()]


@torch.no_grad()
def evaluate_vqa(model, processor, heldout, train, args, device, dtype):
    """Greedy answers to held-out questions: exact-match accuracy per perspective, beside chance (uniform
    over the answers seen in training) and always giving the training set's most common answer."""
    model.eval()
    collate = Collator(processor, args.max_frames)
    items = [it for it in answers(heldout) if it[3] != "describe"]  # free text: no exact match
    seen = defaultdict(Counter)
    for _, _, ref, p in answers(train):
        seen[p][normalise(ref)] += 1
    eos, pad = processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), processor.tokenizer.pad_token_id
    preds = []
    for s in plumbing.progress(range(0, len(items), 64), desc="eval"):
        chunk = items[s:s + 64]
        texts = [processor.apply_chat_template(to_conversation(r, upto=t), tokenize=False,
                                               add_generation_prompt=True) for r, t, _, _ in chunk]
        batch = collate.encode([r for r, _, _, _ in chunk], texts, left_pad=True).to(device)
        with autocast(device, dtype):
            out = model.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=pad)
        preds += processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    rows = defaultdict(list)  # perspective -> (right, the majority answer would be right)
    for (_, _, ref, p), pred in zip(items, preds):
        majority = seen[p].most_common(1)[0][0] if seen[p] else None
        rows[p].append((normalise(pred) == normalise(ref), normalise(ref) == majority))
    per = {p: {"n": len(r), "accuracy": sum(a for a, _ in r) / len(r), "majority_baseline": sum(b for _, b in r) / len(r),
               "chance_uniform": 1.0 / len(seen[p]) if seen[p] else 0.0, "distinct_train_answers": len(seen[p])}
           for p, r in sorted(rows.items())}
    n = sum(v["n"] for v in per.values())
    overall = {"n": n, **{k: sum(v[k] * v["n"] for v in per.values()) / max(1, n)
                          for k in ("accuracy", "chance_uniform", "majority_baseline")}}
    return {"overall": overall, "per_perspective": per}


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
    """(train records, held-out records); records with unreadable media are skipped (up to a limit)."""
    records = read_vqa_records(args.data)
    if args.captions:
        records += read_vqa_records(args.captions, captions=True)
    records, n_bad = scan_vqa_media(records, args.max_frames, d)
    train_recs, heldout = split_heldout(records, args.eval_size, args.seed)
    if not train_recs:
        raise DataError(f"{args.data}: no records left to train on")
    log(f"data: {len(records)} records ({n_bad} skipped), train {len(train_recs)}, held out {len(heldout)} "
        f"({len({r['_path'] for r in heldout})} media)")
    return train_recs, heldout


def train_step(model, micro, params, optimizer, scheduler, args, d, dtype):
    """One optimiser step over the accumulated micro-batches: (loss, grad norm, lr)."""
    # the loss is a mean over every assistant token of the global batch, whatever the split
    n_tok = torch.tensor(float(sum(int((b["labels"] != IGNORE).sum()) for b in micro)), device=d.device)
    if d.enabled:
        dist.all_reduce(n_tok)
    total = torch.zeros((), device=d.device)
    for a, batch in enumerate(micro):
        batch = batch.to(d.device)
        labels = batch.pop("labels")
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
    gnorm = torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if d.enabled:
        dist.all_reduce(total)
    return (total / n_tok.clamp(min=1)).item(), float(gnorm), lr


def train(args):
    """Fine-tune; returns the run's summary. Everything rank 0 writes goes under --out."""
    d = plumbing.init_distributed(args.device)
    if d.device.type == "cpu":
        plumbing.set_threads(args.threads)  # small matmuls: more threads mostly add contention
    plumbing.seed_everything(args.seed, d.rank)
    out, dtype = Path(args.out), plumbing.pick_dtype(d.device, args.dtype)
    if args.batch_size % (args.grad_accum * d.world_size):
        raise DataError(f"--batch-size {args.batch_size} must divide by --grad-accum x {d.world_size} processes")
    run = run_signature(args)
    start, stale = start_state(args, run, d)

    # Data, model (DDP or FSDP), AdamW; a resumed run takes the step, data position, optimiser and RNGs back.
    train_recs, heldout = load_data(args, d)
    model_path = args.model or tiny_base(d)
    model, processor, config = prepare_model(model_path, args, d, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = plumbing.lr_scheduler(optimizer, args.steps, args.warmup, args.decay, floor=0.1)
    step, position = restore(start, model, optimizer, scheduler, d) if start is not None else (0, 0)
    stop = min(args.steps, args.stop_at or args.steps)
    batches = data_loader(train_recs, processor, args, d, position, max(0, stop - step))
    writer = tensorboard(out, d)

    # The loop: one optimiser step over --grad-accum micro-batches; tensorboard every step, a log line every
    # --log-every; a checkpoint every --ckpt-every steps and always when stopping before --steps (--resume).
    losses, t_loop = [], time.time()
    model.train()
    for step in plumbing.progress(range(step + 1, stop + 1), total=stop, initial=step, desc="stage1"):
        micro = [next(batches) for _ in range(args.grad_accum)]
        loss, gnorm, lr = train_step(model, micro, params, optimizer, scheduler, args, d, dtype)
        position += args.batch_size
        losses.append((step, loss))
        if step % args.log_every == 0:
            log(f"step {step}/{args.steps} loss {loss:.4f} lr {lr:.2e}")
        if writer is not None:
            for name, value in (("loss", loss), ("lr", lr), ("grad_norm", gnorm)):
                writer.add_scalar(name, value, step)
        if (args.ckpt_every and (step % args.ckpt_every == 0 or step == stop)) or step == stop < args.steps:
            state = checkpoint_state(model, optimizer, scheduler, step, position, run, d)
            if d.is_main:
                plumbing.save_checkpoint(out, step, state, replaces=stale)
                stale = []  # the old run's checkpoints (--overwrite) go once this run has one
            d.barrier()
    if writer is not None:
        writer.close()
    summary = {"steps": step, "losses": losses, "train_seconds": time.time() - t_loop, "world_size": d.world_size,
               "model": str(model_path)}
    finished = step >= args.steps
    if finished:
        save_pretrained_dir(model, processor, config, out, stale, d, dtype, args.fsdp)
    del model, optimizer
    plumbing.cleanup_distributed()  # rank 0 evaluates alone, free of collective timeouts
    if finished and d.is_main and heldout:
        summary.update(evaluate_saved(out, heldout, train_recs, args, d, dtype))
    if d.is_main:
        plumbing.atomic_write_json(out / "summary.json", summary, indent=None)
        log(f"loss {losses[0][1]:.4f} -> {losses[-1][1]:.4f} over steps {losses[0][0]}-{step}, "
            f"{summary['train_seconds']:.0f}s" if losses else f"nothing to train: step {step}")
    return summary


def data_loader(records, processor, args, d, position, steps):
    """This rank's micro-batches from the global batch order's `position` on, for `steps` optimiser steps."""
    sampler = StepBatches(len(records), args.batch_size, args.grad_accum, d.rank, d.world_size, args.seed,
                          position, steps)
    collate = Collator(processor, args.max_frames, args.max_length)
    return iter(torch.utils.data.DataLoader(records, batch_sampler=sampler, collate_fn=collate))


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
