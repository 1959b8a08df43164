"""01: build (or import) the TED-6K benchmark, and write the built-in world's training splits.

TED-6K (GRAN-TED, arXiv 2512.15560, Sec. 3) pairs a detailed caption with, for each of nine statement
types, one true statement and three hard negatives (minimal edits that contradict the caption); an
encoder is scored by whether the true statement's embedding is the closest to the caption's.

Three sources, one output format (the public TED-6k.json format: keys image_N / video_N, each with
caption, caption_type and statements{type: {question, correct_statement, incorrect_statements}}):

    # the built-in world (default): exactly the paper's 16 (type, caption type) counts, 6,641
    # instances, plus the training splits for the later stages under runs/world/
    python 01_build_ted6k.py
    python 01_build_ted6k.py --overwrite --t2x-images 20000 --t2x-videos 5000 --pairs 50000 --vqa 20000

    # the public benchmark (or any file in its format): check, normalise, print the counts
    python 01_build_ted6k.py --source file --benchmark TED-6k.json

    # your own captions: statements written by a local instruct model, following the paper's recipe
    python 01_build_ted6k.py --source llm --captions captions.jsonl --generator Qwen/Qwen3-8B

captions.jsonl holds {"caption": str, "caption_type": "image"|"video", "key"?: str} per line.

The benchmark and the world are single-process (I/O and text work, seconds to minutes), so there is
no torchrun form. Outputs: runs/ted6k/ted6k.json (+ runs/ted6k/scenes.json: the scene and the structured
claim behind every world statement) and runs/world/{caption_pairs,vqa,t2x,eval,scenes}.jsonl + media/.

Each output folder is built next to its final place and swapped in whole, so a failed or killed run
leaves the previous one as it was (never captions paired with another run's pictures). A folder that
already holds a benchmark or a world is replaced only with --overwrite.

A fourth source writes the probe's training data instead of a benchmark: caption pairs from your own
images and videos, each item described twice by a Qwen3-VL (two prompts, sampled at temperature 1.0 as
in the paper), in 02's caption-pair format {"a", "b", "kind", "media"}:

    python 01_build_ted6k.py --source media --media my_media/ --captioner Qwen/Qwen3-VL-8B-Instruct \\
        --pairs-out runs/pairs/caption_pairs.jsonl --max-new-tokens 1024 --frames 16 --max-pixels 401408
    python 01_build_ted6k.py --source media --media media.jsonl --captioner tiny-qwen3vl-base --threads 1

--media is a folder (searched recursively for .png .jpg .jpeg .bmp .webp images and .gif .mp4 .webm
.avi .mov videos) or a jsonl of {"media": path relative to the jsonl, "kind"?: "image"|"video"}. Each
item is one line of --pairs-out, written as soon as it is done: a killed run is simply rerun, and skips
what is already there (a half-written last line is dropped). Unreadable media and empty captions are
logged and counted, and stop nothing. 02 trains on the file with
`--caption-pairs runs/pairs/caption_pairs.jsonl`. One process captions one item at a time (both prompts
in one batch); for many GPUs, split the jsonl and give each process its own --pairs-out, then cat them.
"""
import argparse
import hashlib
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import plumbing
from common import IMAGE_EXT, KINDS, VIDEO_EXT, check_caption, read_ted, read_vqa_media, valid_option
from plumbing import DataError, log
from world import claims, scenes

# The paper's TED-6K counts per statement type: (image captions, video captions). 1,374 + 5,267 = 6,641.
PAPER_COUNTS = {
    "Action Recognition": (0, 755), "Adjective": (260, 761), "Adverb": (217, 611),
    "Basic Event": (259, 766), "Coreference": (198, 564), "OCR": (55, 159), "Quantity": (160, 588),
    "Spatial Relationship": (225, 455), "Temporal": (0, 608),
}
# Captions per caption type: the largest type count, so every cell can be filled exactly.
PAPER_CAPTIONS = {"image": 260, "video": 766}


#################################################################################
#                                   Counting                                    #
#################################################################################

def count_cells(bench):
    """{(type, caption type): instances} over valid statements."""
    counts = {(t, k): 0 for t in claims.STATEMENT_TYPES for k in KINDS}
    for rec in bench.values():
        for stype, info in rec["statements"].items():
            if valid_option(info.get("correct_statement")) and any(
                    valid_option(o) for o in info.get("incorrect_statements", [])):
                counts[(stype, rec["caption_type"])] += 1
    return counts


def format_table(counts, paper=True):
    """Markdown table of the 16 (+2 empty) cells next to the paper's."""
    head = "| type | image | video | total |" + (" paper image | paper video |" if paper else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for t in claims.STATEMENT_TYPES:
        i, v = counts[(t, "image")], counts[(t, "video")]
        row = f"| {t} | {i} | {v} | {i + v} |"
        if paper:
            row += f" {PAPER_COUNTS[t][0]} | {PAPER_COUNTS[t][1]} |"
        lines.append(row)
    ti = sum(counts[(t, "image")] for t in claims.STATEMENT_TYPES)
    tv = sum(counts[(t, "video")] for t in claims.STATEMENT_TYPES)
    lines.append(f"| all | {ti} | {tv} | {ti + tv} |" + (" 1374 | 5267 |" if paper else ""))
    return "\n".join(lines)


#################################################################################
#                          The world's benchmark                                #
#################################################################################

def _option(text):
    """A usable TED-6k option."""
    return {"statement": text, "status": "success"}


def _null_entry(stype):
    """A statement type the caption says nothing about, as the public file writes it."""
    return {"question": claims.QUESTIONS[stype], "correct_statement": {"statement": None, "status": "null"},
            "incorrect_statements": []}


def build_world_benchmark(seed, fraction=1.0, taken=None):
    """(benchmark dict, side dict {key: {scene, claims}}) with the paper's counts (scaled by fraction).

    Which captions carry which statement types is drawn first, so every cell is exact; each caption's
    scene is then resampled until all of its types can be built. Only captions with an OCR statement
    have words on their objects, so the other captions really have nothing for OCR.
    """
    rng = random.Random(f"{seed}-benchmark")
    taken = taken if taken is not None else set()
    bench, side = {}, {}
    bar = plumbing.progress(total=sum(round(PAPER_CAPTIONS[k] * fraction) for k in KINDS), desc="benchmark")
    for kind_i, kind in enumerate(KINDS):
        n_caps = round(PAPER_CAPTIONS[kind] * fraction)
        types_of = [[] for _ in range(n_caps)]
        for stype in claims.STATEMENT_TYPES:
            n = round(PAPER_COUNTS[stype][kind_i] * fraction)
            for i in rng.sample(range(n_caps), min(n, n_caps)):
                types_of[i].append(stype)
        for i in range(n_caps):
            wanted = [t for t in claims.STATEMENT_TYPES if t in types_of[i]]
            for _ in range(5000):
                scene = scenes.sample_scene(rng, kind, words="OCR" in wanted,
                                            count_weights=claims.BENCH_OBJECT_COUNT_WEIGHTS)
                if scenes.scene_key(scene) in taken:
                    continue
                # The caption first: negatives that match its words better than the positive go last.
                caption = scenes.write_captions(scene, rng)[0]
                made = claims.make_statements(scene, rng, wanted, caption=caption) if wanted else {}
                if made is not None:
                    break
            else:
                raise RuntimeError(f"could not build a {kind} scene with types {wanted}")
            taken.add(scenes.scene_key(scene))
            key = f"{kind}_{i}"
            statements = {}
            for stype in claims.STATEMENT_TYPES:
                if stype in made:
                    s = made[stype]
                    statements[stype] = {
                        "question": s["question"],
                        "correct_statement": _option(claims.render_claim(s["correct"])),
                        "incorrect_statements": [_option(claims.render_claim(c)) for c in s["incorrect"]]}
                else:
                    statements[stype] = _null_entry(stype)
            bench[key] = {"caption": caption, "caption_type": kind, "statements": statements}
            side[key] = {"scene": scene, "claims": {t: {"correct": s["correct"], "incorrect": s["incorrect"]}
                                                    for t, s in made.items()}}
            bar.update()
    bar.close()
    return bench, side


#################################################################################
#                          The world's training splits                          #
#################################################################################

def _fresh_scene(rng, kind, taken):
    """A scene not used anywhere else (benchmark, eval or another training record)."""
    for _ in range(1000):
        scene = scenes.sample_scene(rng, kind)
        key = scenes.scene_key(scene)
        if key not in taken:
            taken.add(key)
            return scene
    raise RuntimeError("scene space exhausted")


def _media_records(rng, prefix, n_images, n_videos, taken, out_dir, desc):
    """t2x-style records (media written under out_dir/media) for n_images + n_videos fresh scenes."""
    records = []
    kinds = ["image"] * n_images + ["video"] * n_videos
    if kinds:
        (out_dir / "media").mkdir(exist_ok=True)
    for i, kind in enumerate(plumbing.progress(kinds, desc=desc)):
        scene = _fresh_scene(rng, kind, taken)
        data, ext = scenes.encode_media(scene)
        media = f"media/{prefix}_{i:06d}.{ext}"
        # out_dir is a temp folder that is swapped in whole, so each file need not be renamed into place.
        (out_dir / media).write_bytes(data)
        captions = scenes.write_captions(scene, rng)
        records.append({"media": media, "caption": captions[0], "kind": kind,
                        "prompt": scenes.write_prompt(scene), "scene": scene, "captions": captions})
    return records


def interleave_kinds(kinds):
    """Indices of `kinds` with images and videos spread evenly (each in proportion to its count),
    so that any prefix (e.g. the first --vqa records) holds both kinds in the same ratio."""
    pos = {}
    for k in set(kinds):
        idx = [i for i, x in enumerate(kinds) if x == k]
        pos.update({i: (j + 0.5) / len(idx) for j, i in enumerate(idx)})
    return sorted(range(len(kinds)), key=lambda i: (pos[i], kinds[i]))


def _write_previews(out, t2x):
    """A few renders at the viewing size, words legible, for people: preview.png and preview.gif."""
    prev = [r["scene"] for r in t2x[:8] if r["kind"] == "image"]
    if prev:
        tiles = []
        rule = np.full((scenes.IMAGE_SIZE * scenes.VIEW_SCALE, 4, 3), 96, np.uint8)  # grey, between tiles
        for s in prev:
            tiles += [scenes.render_image(s, scenes.VIEW_SCALE), rule]
        plumbing.atomic_write_bytes(out / "preview.png", scenes.encode_png(np.concatenate(tiles[:-1], axis=1)))
    vids = [r["scene"] for r in t2x if r["kind"] == "video"][:1]
    if vids:
        plumbing.atomic_write_bytes(out / "preview.gif",
                                    scenes.encode_gif(scenes.render_video(vids[0], scenes.VIEW_SCALE)))


def write_world_splits(args, taken, out):
    """caption_pairs / vqa / t2x / eval / scenes jsonl + media + previews under the folder `out`."""
    rng = random.Random(f"{args.seed}-train")
    # Held-out first, so its scenes are excluded from every training split.
    n_eval = args.eval_scenes
    eval_recs = _media_records(random.Random(f"{args.seed}-eval"), "eval", n_eval // 2, n_eval - n_eval // 2,
                               taken, out, "eval media")
    t2x = _media_records(rng, "t2x", args.t2x_images, args.t2x_videos, taken, out, "t2x media")
    mixed = interleave_kinds([r["kind"] for r in t2x])
    vqa = []
    for i in plumbing.progress(range(args.vqa if t2x else 0), desc="vqa"):
        rec = t2x[mixed[i % len(mixed)]]
        vqa.append({"media": rec["media"], "kind": rec["kind"],
                    "messages": scenes.write_vqa(rec["scene"], rng, rec["captions"])})
    pairs = []
    for i in plumbing.progress(range(args.pairs), desc="caption pairs"):
        scene = _fresh_scene(rng, "image" if i % 2 == 0 else "video", taken)
        a, b = scenes.write_captions(scene, rng)
        pairs.append({"a": a, "b": b, "kind": scene["kind"]})
    scene_recs = [{"id": Path(r["media"]).stem, "split": split, "kind": r["kind"], "media": r["media"],
                   "scene": r["scene"]} for split, recs in (("eval", eval_recs), ("t2x", t2x)) for r in recs]
    strip = lambda r: {k: r[k] for k in ("media", "caption", "kind", "prompt", "scene")}
    plumbing.write_jsonl(out / "eval.jsonl", [strip(r) for r in eval_recs])
    plumbing.write_jsonl(out / "t2x.jsonl", [strip(r) for r in t2x])
    plumbing.write_jsonl(out / "vqa.jsonl", vqa)
    plumbing.write_jsonl(out / "caption_pairs.jsonl", pairs)
    plumbing.write_jsonl(out / "scenes.jsonl", scene_recs)
    _write_previews(out, t2x)
    return {"eval": len(eval_recs), "t2x": len(t2x), "vqa": len(vqa), "caption_pairs": len(pairs)}


#################################################################################
#                      Statements from a local instruct model                   #
#################################################################################

TYPE_HINTS = {
    "Action Recognition": "the actions the subjects perform",
    "Adjective": "attributes such as colour, size, material or appearance",
    "Adverb": "how something is done or placed (manner, speed, degree)",
    "Basic Event": "what is present or what happens",
    "Coreference": "an object introduced and then referred back to (the former / the latter / it)",
    "OCR": "text visible in the image or video",
    "Quantity": "how many things there are",
    "Spatial Relationship": "where things are relative to each other",
    "Temporal": "the order in which things happen",
}


def positive_prompt(caption, kind, stype):
    """The prompt asking for one true statement of type `stype` (or null)."""
    return (f"Here is a detailed caption of a{'n image' if kind == 'image' else ' video'}.\n\nCaption: {caption}\n\n"
            f"Write ONE short statement (about 15 words) that is true according to the caption and is "
            f"about {TYPE_HINTS[stype]} ({stype}). If the caption says nothing of this kind, answer null.\n"
            'Reply with JSON only: {"statement": "..."} or {"statement": null}')


def negative_prompt(caption, kind, stype, positive):
    """The prompt asking for three minimal edits of `positive` that contradict the caption."""
    return (f"Here is a detailed caption of a{'n image' if kind == 'image' else ' video'}.\n\nCaption: {caption}\n\n"
            f"True statement ({stype}): {positive}\n\n"
            "Write exactly THREE statements that each contradict the caption and differ from the true "
            "statement as little as possible (change one detail of the kind above, keep the rest).\n"
            'Reply with JSON only: {"statements": ["...", "...", "..."]}')


def parse_json_object(text):
    """The first JSON object in a model's reply, or None."""
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch == "{":
            try:
                obj, _ = dec.raw_decode(text[i:])
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


class HFGenerator:
    """A local causal LM through transformers: chat template, greedy decoding."""

    def __init__(self, name_or_path, max_new_tokens=256, device=None, dtype="auto"):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.device = plumbing.pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=plumbing.pick_dtype(self.device, dtype)).to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def generate(self, prompt):
        """The model's reply to one user turn."""
        msgs = [{"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt + "\n"
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens, pad_token_id=pad)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _failed(reason):
    """An option the model did not deliver, kept in the file with the reason as its status."""
    return {"statement": None, "status": f"failed: {reason}"}


def llm_statements(caption, kind, stype, generator):
    """One statement-type entry in TED-6k format, written by `generator`; failures are marked, never raised."""
    try:
        reply = generator.generate(positive_prompt(caption, kind, stype))
    except Exception as e:  # a generator that crashes on one prompt must not stop the run
        return {"question": claims.QUESTIONS[stype], "correct_statement": _failed(f"generation error {e!r}"),
                "incorrect_statements": []}
    obj = parse_json_object(reply)
    entry = {"question": claims.QUESTIONS[stype], "incorrect_statements": []}
    if obj is None or "statement" not in obj:
        entry["correct_statement"] = _failed("no JSON object with a 'statement' key")
        return entry
    pos = obj["statement"]
    if pos is None:
        entry["correct_statement"] = {"statement": None, "status": "null"}
        return entry
    if not isinstance(pos, str) or not pos.strip():
        entry["correct_statement"] = _failed("statement is not a non-empty string")
        return entry
    pos = pos.strip()
    try:
        obj = parse_json_object(generator.generate(negative_prompt(caption, kind, stype, pos)))
    except Exception:  # as above: marked below as a failed negative
        obj = None
    negs = obj.get("statements") if obj else None
    if not isinstance(negs, list) or len(negs) != 3:
        entry["incorrect_statements"] = [_failed("expected a JSON list of exactly three statements")] * 3
    else:
        seen = {pos}
        for s in negs:
            if not isinstance(s, str) or not s.strip():
                entry["incorrect_statements"].append(_failed("not a non-empty string"))
            elif s.strip() in seen:
                entry["incorrect_statements"].append(_failed("duplicate of another option"))
            else:
                seen.add(s.strip())
                entry["incorrect_statements"].append({"statement": s.strip(), "status": "success"})
    ok = any(o["status"] == "success" for o in entry["incorrect_statements"])
    # Without a valid negative the instance cannot be scored: mark the positive too, so the file stays valid.
    entry["correct_statement"] = {"statement": pos, "status": "success"} if ok else \
        {"statement": pos, "status": "failed: no valid negative"}
    return entry


def read_captions(path):
    """[(key, caption, kind)] from a captions jsonl; errors name the file and record."""
    out, n = [], {"image": 0, "video": 0}
    for i, r in enumerate(plumbing.read_jsonl(path, required=("caption",)), 1):
        where = f"{path}: record {i}"
        kind = r.get("caption_type", r.get("kind"))
        check_caption(r["caption"], kind, where)
        key = r.get("key", f"{kind}_{n[kind]}")
        if not isinstance(key, str) or not key:
            raise DataError(f"{where}: key must be a non-empty string, got {key!r}")
        n[kind] += 1
        out.append((key, r["caption"], kind))
    dup = sorted(k for k, c in Counter(k for k, _, _ in out).items() if c > 1)
    if dup:
        raise DataError(f"{path}: duplicate key(s) {dup[:5]}")
    return out


def build_from_llm(captions, generator):
    """TED-6k-format dict for [(key, caption, kind)] with statements from `generator`."""
    bench = {}
    for key, caption, kind in plumbing.progress(captions, desc="llm statements"):
        types = [t for t in claims.STATEMENT_TYPES if kind == "video" or t not in claims.VIDEO_ONLY_TYPES]
        bench[key] = {"caption": caption, "caption_type": kind,
                      "statements": {t: llm_statements(caption, kind, t, generator) for t in types}}
    return bench


def most_common_failure(bench):
    """The most frequent `failed: ...` status in a generated benchmark (why nothing could be scored)."""
    statuses = Counter(o.get("status") for rec in bench.values() for info in rec["statements"].values()
                       for o in [info["correct_statement"]] + info["incorrect_statements"])
    failed = [(n, s) for s, n in statuses.items() if str(s).startswith("failed")]
    return max(failed)[1] if failed else "every positive was null"


#################################################################################
#                  Caption pairs from your media (a Qwen3-VL)                   #
#################################################################################
# 02 trains the probe's context aggregator on pairs of captions of one image or video. The paper has
# Qwen3-VL write ~500k of them, two prompts per item at temperature 1.0, both asking for everything
# visible. These two prompts (our wording) ask for the same content in two forms, free prose and
# objects / layout / events, so a pair differs in wording and order rather than in what it says.

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
        if kind is None:
            kind = "image" if ext in IMAGE_EXT else "video" if ext in VIDEO_EXT else None
            if kind is None:
                raise DataError(f"{source}: record {i}: no 'kind', and {name!r} has no known image or video extension")
        if kind not in KINDS:
            raise DataError(f"{source}: record {i}: kind must be 'image' or 'video', got {kind!r}")
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
        raise DataError(f"--pairs-out {path}: not a file")
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
        if not isinstance(rec, dict) or not isinstance(rec.get("media"), str):
            raise DataError(f"--pairs-out {path}:{lineno}: not a record {{a, b, kind, media}} of --source media; "
                            f"give a new file or one this mode wrote")
        done.add(rec["media"])
    if end < len(data):  # only once the file is known to be ours
        with open(path, "r+b") as f:
            f.truncate(end)
        log(f"{path}: dropped a half-written last line ({len(data) - end} bytes) left by a killed run")
    return done


def item_seed(seed, name):
    """The sampling seed of one item: the same on every rerun, whatever else is in the folder."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16)


class Captioner:
    """A Qwen3-VL writing an item's two captions (prompts a and b, one batch), sampled with a seed per item."""

    def __init__(self, name_or_path, device=None, dtype="auto", max_new_tokens=1024, temperature=1.0,
                 max_pixels=None, seed=0):
        import encoders
        if name_or_path == "tiny-qwen3vl":
            name_or_path = encoders.tiny_model_dir(name_or_path)
        elif name_or_path == "tiny-qwen3vl-base":
            name_or_path = encoders.ladder_dir(name_or_path)
        self.device = plumbing.pick_device(device)
        self.model, self.processor = encoders.load_qwen3vl(name_or_path, dtype=plumbing.pick_dtype(self.device, dtype))
        self.model.to(self.device).eval()
        self.processor.tokenizer.padding_side = "left"  # both prompts continue from their last token
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        pad = self.processor.tokenizer.pad_token_id
        self.pad = pad if pad is not None else min(self.eos)
        self.max_new_tokens, self.temperature, self.max_pixels = max_new_tokens, temperature, max_pixels
        self.seed, self.cut = seed, 0  # cut: captions that hit max_new_tokens

    def size(self, processor, frames=1):
        """Processor kwargs capping the pixels per image / per frame at --max-pixels (none: its own)."""
        return {} if self.max_pixels is None else {"size": dict(processor.size, longest_edge=self.max_pixels * frames)}

    @torch.no_grad()
    def __call__(self, name, kind, pixels, meta):
        """[caption a, caption b] of one decoded image (meta None) or video."""
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": caption_prompt(w, kind)}]}],
            tokenize=False, add_generation_prompt=True) for w in "ab"]
        if meta is None:
            kwargs = dict(images=[pixels] * 2, images_kwargs=self.size(self.processor.image_processor))
        else:
            vk = dict(self.size(self.processor.video_processor, len(pixels)), video_metadata=[meta] * 2,
                      do_sample_frames=False)
            kwargs = dict(videos=[pixels] * 2, videos_kwargs=vk)
        batch = self.processor(text=texts, padding=True, return_tensors="pt", **kwargs).to(self.device)
        torch.manual_seed(item_seed(self.seed, name))
        # Plain sampling at the temperature (top-k / top-p off): the paper gives only the temperature.
        out = self.model.generate(**batch, do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0,
                                  max_new_tokens=self.max_new_tokens, pad_token_id=self.pad)
        new = out[:, batch["input_ids"].shape[1]:]
        self.cut += sum(not self.eos & set(row) for row in new.tolist())
        return [t.strip() for t in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def write_caption_pairs(todo, caption, out, frames):
    """Caption each (name, path, kind) and append its record {a, b, kind, media} to `out`, one line
    written, flushed and synced per item (a kill loses at most the item in hand). Unreadable media,
    captioner errors and empty captions are logged and counted, never raised."""
    stats = {"done": 0, "failed": 0, "failures": []}
    early = 0

    def fail(name, why):
        stats["failed"] += 1
        stats["failures"].append((name, why))
        log(f"failed: {name}: {why}")

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for name, path, kind in plumbing.progress(todo, desc="caption pairs"):
            try:
                pixels, meta = read_vqa_media({"_path": str(path), "kind": kind}, frames)
            except Exception as e:  # any decoder failure means the same thing: this file is unusable
                fail(name, f"unreadable {kind} ({type(e).__name__}: {e})")
                continue
            try:
                a, b = caption(name, kind, pixels, meta)
                why = None if a and b else f"empty caption from prompt {'a' if not a else 'b'}"
            except Exception as e:  # e.g. out of memory on one huge item: skip it, keep the run
                why = f"captioner error ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]})"
            if why:
                fail(name, why)
                early += not stats["done"]
                if early >= MAX_EARLY_FAILURES:
                    raise DataError(f"the captioner failed on the first {early} readable items and captioned none "
                                    f"(last: {name}: {why}); nothing more written to {out}")
                continue
            f.write(json.dumps({"a": a, "b": b, "kind": kind, "media": name}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            stats["done"] += 1
    return stats


def caption_media(args):
    """--source media: caption pairs of every item of --media not yet in --pairs-out; the counts."""
    t0, out = time.time(), Path(args.pairs_out)
    items = media_items(args.media)
    done = resume_pairs(out)
    todo = [it for it in items if it[0] not in done]
    stats = {"done": 0, "failed": 0, "failures": []}
    if todo:  # a finished run's rerun loads no model
        plumbing.set_threads(args.threads)
        captioner = Captioner(args.captioner, args.device, args.dtype, args.max_new_tokens or 1024, args.temperature,
                              args.max_pixels, args.sample_seed)
        stats = write_caption_pairs(todo, captioner, out, args.frames)
        if stats["done"]:
            log(f"{captioner.cut} of {2 * stats['done']} captions stopped at --max-new-tokens "
                f"{captioner.max_new_tokens}")
    stats["skipped"] = len(items) - len(todo)
    log(f"caption pairs in {out}: {stats['done']} done, {stats['skipped']} skipped (already there), "
        f"{stats['failed']} failed, of {len(items)} items, in {time.time() - t0:.1f}s")
    if not stats["done"] and not stats["skipped"]:
        first = stats["failures"][0]
        raise DataError(f"--media {args.media}: none of the {len(items)} items could be captioned "
                        f"(first: {first[0]}: {first[1]})")
    return stats


#################################################################################
#                               Output folders                                  #
#################################################################################

# What 01 writes in each folder. A folder holding anything else is someone else's: never replaced.
BENCH_FILES = {"ted6k.json", "scenes.json"}
WORLD_FILES = {"caption_pairs.jsonl", "vqa.jsonl", "t2x.jsonl", "eval.jsonl", "scenes.jsonl", "media",
               "preview.png", "preview.gif"}


def check_replaceable(folder, flag, ours, what, overwrite):
    """Refuse to replace a folder that holds files 01 does not write, or one holding `what` without --overwrite."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise DataError(f"{flag} {folder}: exists and is not a folder")
    held = sorted(p.name for p in folder.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp")))
    foreign = [name for name in held if name not in ours]
    if foreign:
        raise DataError(f"{flag} {folder}: holds {foreign[:3]}, which 01 does not write; it replaces the whole "
                        f"folder, so give it a new or empty one")
    if held and not overwrite:
        raise DataError(f"{flag} {folder} already holds {what}: --overwrite to replace it once the new one is "
                        f"built, or another {flag}")


def require_instances(counts, why):
    """A benchmark with nothing to score is refused before it replaces anything."""
    if not sum(counts.values()):
        raise DataError(f"{why}; nothing written")


def write_benchmark(out, bench, side=None):
    """Swap in the folder `out` holding ted6k.json (and the world's scenes.json)."""
    def build(tmp):
        if side is not None:
            plumbing.atomic_write_json(tmp / "scenes.json", side, indent=None)
        plumbing.atomic_write_json(tmp / "ted6k.json", bench)
    plumbing.atomic_dir(out, build)


def build_world(args, out):
    """The world's benchmark into `out` and, unless --no-splits, its training splits into --world-out."""
    taken = set()
    bench, side = build_world_benchmark(args.seed, args.bench_fraction, taken)
    require_instances(count_cells(bench), f"--bench-fraction {args.bench_fraction}: the benchmark holds no instance")
    if args.no_splits:
        write_benchmark(out, bench, side)
        return bench, {}
    sizes = {}

    def build(tmp):
        sizes.update(write_world_splits(args, taken, tmp))
        # The benchmark goes in just before the world: its scenes are the ones the world left out.
        write_benchmark(out, bench, side)
    plumbing.atomic_dir(args.world_out, build)
    return bench, sizes


#################################################################################
#                                   Main                                        #
#################################################################################

# The --source world flags that --no-splits leaves with nothing to do.
SPLIT_FLAGS = ("world_out", "pairs", "vqa", "t2x_images", "t2x_videos", "eval_scenes")


def even_frames(text):
    """An argparse type: a positive even frame count (Qwen3-VL groups video frames in pairs)."""
    n = plumbing.positive_int(text)
    if n % 2:
        raise argparse.ArgumentTypeError(f"{text} is odd: Qwen3-VL groups video frames in pairs")
    return n


def get_parser():
    p = plumbing.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pos, nonneg = plumbing.positive_int, plumbing.nonneg_int
    p.add_argument("--source", choices=["world", "file", "llm", "media"], default="world")
    p.add_argument("--out", default="runs/ted6k", help="folder for ted6k.json (and scenes.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the benchmark / world already there (once the new one is built)")
    g = p.add_argument_group("--source world")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bench-fraction", type=plumbing.positive_float, default=1.0,
                   help="scale the paper's counts (1.0 = the full 6,641 instances)")
    g.add_argument("--world-out", default="runs/world", help="folder for the training splits")
    g.add_argument("--no-splits", action="store_true", help="write the benchmark only")
    g.add_argument("--t2x-images", type=nonneg, default=3000, help="text-to-image records (04, 05)")
    g.add_argument("--t2x-videos", type=nonneg, default=1000, help="text-to-video records (04, 05)")
    g.add_argument("--vqa", type=nonneg, default=2000, help="VQA records on the t2x media (03)")
    g.add_argument("--pairs", type=nonneg, default=4000, help="caption pairs for the probe's aggregator (02)")
    g.add_argument("--eval-scenes", type=nonneg, default=100, help="held-out scenes for 06's fidelity eval")
    g = p.add_argument_group("--source file")
    g.add_argument("--benchmark", help="a TED-6k.json-format file")
    g = p.add_argument_group("--source llm")
    g.add_argument("--captions", help="captions jsonl")
    g.add_argument("--generator", help="hub id or local folder of an instruct model")
    g = p.add_argument_group("--source media")
    g.add_argument("--media", help="a folder of images and videos (searched recursively), or a jsonl of "
                                   '{"media": path relative to the jsonl, "kind"?: image|video}')
    g.add_argument("--captioner", help="hub id or save_pretrained folder of a Qwen3-VL (or tiny-qwen3vl, "
                                       "tiny-qwen3vl-base: the built-in tiny ones)")
    g.add_argument("--pairs-out", default="runs/pairs/caption_pairs.jsonl",
                   help="caption pairs {a, b, kind, media} for 02; appended to, so a rerun resumes")
    g.add_argument("--temperature", type=plumbing.positive_float, default=1.0, help="sampling temperature")
    g.add_argument("--sample-seed", type=int, default=0, help="with each item's path, seeds its sampling")
    g.add_argument("--frames", type=even_frames, default=16, help="at most this many frames per video (even)")
    g.add_argument("--max-pixels", type=pos, default=None,
                   help="max pixels per image / per video frame (default: the processor's)")
    g = p.add_argument_group("--source llm / media")
    g.add_argument("--max-new-tokens", type=pos, default=None,
                   help="reply length limit (default: 256 for statements, 1024 for captions)")
    g.add_argument("--device", default=None, help="default: cuda when there is one")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="auto: bf16 on a GPU that has it, else fp32")
    g.add_argument("--threads", type=nonneg, default=0, help="torch CPU threads (0: torch's default)")
    return p


def check_flags(parser, args, given):
    """Refuse a flag the chosen --source would ignore (one of another source's group), and a source
    without its inputs."""
    for group in parser._action_groups:
        source = group.title.removeprefix("--source ")
        if source == group.title or args.source in source.split(" / "):
            continue
        stray = [a.option_strings[0] for a in group._group_actions if a.dest in given]
        if stray:
            raise DataError(f"{stray[0]} is for --source {source.replace(' / ', ' or ')}, not {args.source}")
    stray = [f for f in ("out", "overwrite") if f in given and args.source == "media"]
    if stray:
        raise DataError(f"--{stray[0]} is for the benchmark; --source media writes --pairs-out (and resumes it)")
    stray = [d for d in SPLIT_FLAGS if d in given and args.no_splits]
    if stray:
        raise DataError(f"--{stray[0].replace('_', '-')} does nothing with --no-splits")
    if args.source == "file" and not args.benchmark:
        raise DataError("--source file needs --benchmark FILE (a TED-6k.json-format file)")
    if args.source == "llm" and not (args.captions and args.generator):
        raise DataError("--source llm needs --captions FILE and --generator MODEL")
    if args.source == "media" and not (args.media and args.captioner):
        raise DataError("--source media needs --media FOLDER_OR_JSONL and --captioner QWEN3VL")
    if args.source == "world" and not args.no_splits:
        a, b = Path(args.out).resolve(), Path(args.world_out).resolve()
        if a == b or a in b.parents or b in a.parents:
            raise DataError(f"--out {args.out} and --world-out {args.world_out} must be separate folders")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args, plumbing.given_flags(parser, argv))
    if args.source == "media":
        return caption_media(args)
    t0 = time.time()
    out = Path(args.out)
    check_replaceable(out, "--out", BENCH_FILES, "a benchmark", args.overwrite)
    plumbing.remove_stale_temps(out.parent)
    if args.source == "world" and not args.no_splits:
        check_replaceable(args.world_out, "--world-out", WORLD_FILES, "a world", args.overwrite)
        plumbing.remove_stale_temps(Path(args.world_out).parent)
    if args.source == "world":
        bench, sizes = build_world(args, out)
        counts = count_cells(bench)
        log(format_table(counts, paper=args.bench_fraction == 1.0))
        if sizes:
            log("training splits in", args.world_out, ":", ", ".join(f"{k} {v}" for k, v in sizes.items()))
    elif args.source == "file":
        bench, _ = read_ted(args.benchmark)   # refuses a file with nothing to score
        write_benchmark(out, bench)
        counts = count_cells(bench)
        log(format_table(counts))
    else:
        captions = read_captions(args.captions)
        plumbing.set_threads(args.threads)
        generator = HFGenerator(args.generator, args.max_new_tokens or 256, args.device, args.dtype)
        bench = build_from_llm(captions, generator)
        counts = count_cells(bench)
        require_instances(counts, f"--generator {args.generator}: no scorable statement for the {len(captions)} "
                                  f"caption(s) of {args.captions} (most common: {most_common_failure(bench)})")
        write_benchmark(out, bench)
        log(format_table(counts, paper=False))
    log(f"wrote {out / 'ted6k.json'} ({sum(counts.values())} instances) in {time.time() - t0:.1f}s")
    return bench


if __name__ == "__main__":
    plumbing.run_cli(main)
