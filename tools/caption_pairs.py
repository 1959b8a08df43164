"""Caption pairs from your own images and videos, for the probe's aggregator (02 --caption-pairs).

Each item is described twice by a Qwen3-VL (two prompts, sampled at temperature 1.0 as in the paper):

    python tools/caption_pairs.py --media my_media/ --captioner Qwen/Qwen3-VL-8B-Instruct \\
        --out runs/pairs/caption_pairs.jsonl --max-new-tokens 1024 --max-frames 16 --max-pixels 401408
    python tools/caption_pairs.py --media media.jsonl --captioner tiny-qwen3vl-base --threads 1

Each item becomes one line {"a", "b", "kind", "media"} of --out as soon as it is done, so a killed run is
simply rerun. Unreadable media and empty captions are logged and counted. For many GPUs, split a --media
jsonl, give each process its own --out, then cat them.
"""
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import plumbing  # noqa: E402
from common import IMAGE_EXT, KINDS, VIDEO_EXT, read_vqa_media  # noqa: E402
from plumbing import DataError, log  # noqa: E402

# The paper has Qwen3-VL write ~500k pairs, two prompts per item at temperature 1.0. These two (our wording)
# ask for the same content in two forms, so a pair differs in wording and order, not in what it says.

PROMPT_VIDEO = {
    "a": " Then tell what happens from start to end: every action, who or what performs it, the direction "
         "and speed of each movement, and the order in which the events occur.",
    "b": " Step 3, the events: in time order, what each object or person does and how it moves, from the "
         "first frame to the last.",
}
PROMPT = {
    "a": "Describe this {kind} exhaustively, in plain prose. Name every object and person you can see and "
         "give each one's attributes (colour, size, shape, material, texture, pose), say how many there "
         "are of each kind of thing and where everything is relative to everything else (left, right, "
         "above, below, in front, behind), and copy any visible text word for word.{video} Report only "
         "what can be seen.",
    "b": "Write a structured description of this {kind} in plain text. Step 1, the objects: one at a time, "
         "say what it is, how many of it there are, what it looks like (colour, size, shape, material) and "
         "any text written on it, exactly. Step 2, the layout: where the objects are relative to one "
         "another and within the frame.{video} Include every visible detail and nothing that is not "
         "visible.",
}
# A run whose captioner raises (or writes nothing) on this many items in a row, before any success, stops.
MAX_EARLY_FAILURES = 20


def caption_prompt(which, kind):
    """Prompt `a` (exhaustive prose) or `b` (objects, layout, events) for an image or a video."""
    return PROMPT[which].format(kind=kind, video=PROMPT_VIDEO[which] if kind == "video" else "")


def media_items(source):
    """[(name, path, kind)] of a folder's images and videos (recursively, by extension) or of a jsonl of
    {"media", "kind"?} (paths relative to the jsonl); `name` (the path relative to the folder, or as the
    jsonl writes it) is what the pairs file records and what a resumed run matches."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXT | VIDEO_EXT)
        if not files:
            raise DataError(f"--media {source}: no images ({' '.join(sorted(IMAGE_EXT))}) or videos "
                            f"({' '.join(sorted(VIDEO_EXT))}) in the folder or below")
        return [(p.relative_to(source).as_posix(), p, "image" if p.suffix.lower() in IMAGE_EXT else "video")
                for p in files]
    if not source.exists():
        raise DataError(f"--media {source}: no such folder or file")
    if source.suffix.lower() in IMAGE_EXT | VIDEO_EXT:
        raise DataError(f"--media {source}: give a folder of media or a jsonl of {{\"media\", \"kind\"?}}, "
                        f"not one media file")
    items, seen = [], set()
    for i, r in enumerate(plumbing.read_jsonl(source, required=("media",)), 1):
        name, kind = r["media"], r.get("kind")
        if not isinstance(name, str) or not name:
            raise DataError(f"{source}: record {i}: 'media' must be a non-empty path string")
        ext = Path(name).suffix.lower()
        kind = kind or ("image" if ext in IMAGE_EXT else "video" if ext in VIDEO_EXT else None)
        if kind not in KINDS:
            raise DataError(f"{source}: record {i}: " + (f"kind must be 'image' or 'video', got {kind!r}" if "kind" in r
                            else f"no 'kind', and {name!r} has no known image or video extension"))
        if name not in seen:  # a repeated path would only be captioned twice
            seen.add(name)
            items.append((name, plumbing.resolve_media(source, name), kind))
    return items


def resume_pairs(path):
    """The media names already captioned in a pairs file. A last line without its newline is a record a
    killed run was writing: it is cut off (that item is captioned again, with the same seed)."""
    path = Path(path)
    if not path.exists():
        return set()
    if not path.is_file():
        raise DataError(f"--out {path}: not a file")
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    done = set()
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        if not isinstance(rec, dict) or set(rec) != {"a", "b", "kind", "media"} or not isinstance(rec["media"], str):
            raise DataError(f"--out {path}:{lineno}: not a record {{a, b, kind, media}} of this tool; "
                            f"give a new file or one this tool wrote")
        done.add(rec["media"])
    if end < len(data):  # only once the file is known to be ours
        with open(path, "r+b") as f:
            f.truncate(end)
        log(f"{path}: dropped a half-written last line ({len(data) - end} bytes) left by a killed run")
    return done


class Captioner:
    """A Qwen3-VL writing an item's two captions (prompts a and b, one batch), sampled with a seed per item."""

    def __init__(self, name_or_path, device=None, dtype="auto", max_new_tokens=1024, temperature=1.0,
                 max_pixels=None, seed=0):
        import encoders
        built = {"tiny-qwen3vl": encoders.tiny_model_dir, "tiny-qwen3vl-base": encoders.ladder_dir}
        name_or_path = built[name_or_path](name_or_path) if name_or_path in built else name_or_path
        self.device = plumbing.pick_device(device)
        self.model, self.processor = encoders.load_qwen3vl(name_or_path, dtype=plumbing.pick_dtype(self.device, dtype))
        self.model.to(self.device).eval()
        self.processor.tokenizer.padding_side = "left"  # both prompts continue from their last token
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        pad = self.processor.tokenizer.pad_token_id
        self.pad = pad if pad is not None else min(self.eos)
        self.max_new_tokens, self.temperature, self.max_pixels = max_new_tokens, temperature, max_pixels
        self.seed, self.last_cut = seed, 0  # last_cut: this item's captions that hit max_new_tokens

    @torch.no_grad()
    def __call__(self, name, kind, pixels, meta):
        """[caption a, caption b] of one decoded image (meta None) or video."""
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": caption_prompt(w, kind)}]}],
            tokenize=False, add_generation_prompt=True) for w in "ab"]
        proc, frames = (self.processor.image_processor, 1) if meta is None else (self.processor.video_processor, len(pixels))
        size = {} if self.max_pixels is None else {"size": dict(proc.size, longest_edge=self.max_pixels * frames)}
        kwargs = dict(images=[pixels] * 2, images_kwargs=size) if meta is None else dict(
            videos=[pixels] * 2, videos_kwargs=dict(size, video_metadata=[meta] * 2, do_sample_frames=False))
        batch = self.processor(text=texts, padding=True, return_tensors="pt", **kwargs).to(self.device)
        torch.manual_seed(int(hashlib.sha256(f"{self.seed}:{name}".encode()).hexdigest()[:15], 16))  # same on a rerun
        # Plain sampling at the temperature (top-k / top-p off): the paper gives only the temperature.
        out = self.model.generate(**batch, do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0,
                                  max_new_tokens=self.max_new_tokens, pad_token_id=self.pad)
        new = out[:, batch["input_ids"].shape[1]:]
        self.last_cut = sum(not self.eos & set(row) for row in new.tolist())
        return [t.strip() for t in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def write_caption_pairs(todo, caption, out, frames):
    """Caption each (name, path, kind) and append its record {a, b, kind, media} to `out`, one line
    written, flushed and synced per item (a kill loses at most the item in hand). Unreadable media,
    captioner errors and empty captions are logged and counted, never raised."""
    stats, early = {"done": 0, "failed": 0, "failures": [], "cut": 0}, 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for name, path, kind in plumbing.progress(todo, desc="caption pairs"):
            try:
                pixels, meta = read_vqa_media({"_path": str(path), "kind": kind}, frames)
            except Exception as e:  # any decoder failure means the same thing: this file is unusable
                why = f"unreadable {kind} ({type(e).__name__}: {e})"
            else:
                try:
                    a, b = caption(name, kind, pixels, meta)
                    why = None if a and b else f"empty caption from prompt {'a' if not a else 'b'}"
                except Exception as e:  # e.g. out of memory on one huge item: skip it, keep the run
                    why = f"captioner error ({type(e).__name__}: {plumbing.first_line(e)})"
                early += bool(why) and not stats["done"]  # the captioner's failures on readable items
            if why:
                stats["failed"] += 1
                stats["failures"].append((name, why))
                log(f"failed: {name}: {why}")
                if early >= MAX_EARLY_FAILURES:
                    raise DataError(f"the captioner failed on the first {early} readable items and captioned none "
                                    f"(last: {name}: {why}); nothing more written to {out}")
                continue
            f.write(json.dumps({"a": a, "b": b, "kind": kind, "media": name}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            stats["done"] += 1
            stats["cut"] += getattr(caption, "last_cut", 0)  # counted for written records only
    return stats


def main(argv=None):
    args = get_parser().parse_args(argv)
    t0, out = time.time(), Path(args.out)
    if out.resolve() == Path(args.media).resolve():
        raise DataError(f"--out {out} is --media itself; give a new file")
    items = media_items(args.media)
    done = resume_pairs(out)
    todo = [it for it in items if it[0] not in done]
    stats = {"done": 0, "failed": 0, "failures": [], "cut": 0}
    if todo:  # a finished run's rerun loads no model
        plumbing.set_threads(args.threads)
        captioner = Captioner(args.captioner, args.device, args.captioner_dtype, args.max_new_tokens, args.temperature,
                              args.max_pixels, args.sample_seed)
        stats = write_caption_pairs(todo, captioner, out, args.max_frames)
        if stats["done"]:
            log(f"{stats['cut']} of {2 * stats['done']} captions stopped at --max-new-tokens "
                f"{captioner.max_new_tokens}")
    stats["skipped"] = len(items) - len(todo)
    log(f"caption pairs in {out}: {stats['done']} done, {stats['skipped']} skipped (already there), "
        f"{stats['failed']} failed, of {len(items)} items, in {time.time() - t0:.1f}s")
    if not stats["done"] and not stats["skipped"]:
        first = stats["failures"][0]
        raise DataError(f"--media {args.media}: none of the {len(items)} items could be captioned "
                        f"(first: {first[0]}: {first[1]})")
    return stats


def get_parser():
    p = plumbing.ArgumentParser(__doc__)
    p.add_argument("--media", required=True, help="a folder of images and videos (searched recursively), or a "
                                                  'jsonl of {"media": path relative to the jsonl, "kind"?}')
    p.add_argument("--captioner", required=True, help="hub id or save_pretrained folder of a Qwen3-VL (or "
                                                      "tiny-qwen3vl, tiny-qwen3vl-base: the built-in tiny ones)")
    p.add_argument("--out", default="runs/pairs/caption_pairs.jsonl",
                   help="caption pairs {a, b, kind, media} for 02; appended to, so a rerun resumes")
    p.add_argument("--temperature", type=plumbing.positive_float, default=1.0, help="sampling temperature")
    p.add_argument("--sample-seed", type=int, default=0, help="with each item's path, seeds its sampling")
    p.add_argument("--max-frames", type=plumbing.even_frames, default=16, help="at most this many frames per video (even)")
    p.add_argument("--max-pixels", type=plumbing.positive_int, default=None,
                   help="max pixels per image / per video frame (default: the processor's)")
    p.add_argument("--max-new-tokens", type=plumbing.positive_int, default=1024, help="caption length limit")
    p.add_argument("--device", default=None, help="default: cuda when there is one")
    p.add_argument("--captioner-dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="auto: bf16 on a GPU that has it, else fp32")
    p.add_argument("--threads", type=plumbing.nonneg_int, default=0, help="torch CPU threads (0: torch's default)")
    return p


if __name__ == "__main__":
    plumbing.run_cli(main)
