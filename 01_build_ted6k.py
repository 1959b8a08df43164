"""Stage 0: build (or import) the TED-6K benchmark, and write the built-in world's training splits.

TED-6K (GRAN-TED, arXiv 2512.15560, Sec. 3) pairs a detailed caption with, for each of nine statement
types, one true statement and three hard negatives (minimal edits that contradict the caption); an
encoder is scored by whether the true statement's embedding is the closest to the caption's.

Three sources, one output format (the public TED-6k.json format: keys image_N / video_N, each with
caption, caption_type and statements{type: {question, correct_statement, incorrect_statements}}):

    # the built-in world (default): exactly the paper's 16 (type, caption type) counts, 6,641
    # instances, plus the training splits for the later stages under runs/world/
    python 01_build_ted6k.py
    python 01_build_ted6k.py --t2x-images 20000 --t2x-videos 5000 --caption-pairs 50000 --vqa 20000

    # the public benchmark (or any file in its format): validate, normalise, print the counts
    python 01_build_ted6k.py --source file --input TED-6k.json

    # your own captions: statements written by a local instruct model, following the paper's recipe
    python 01_build_ted6k.py --source llm --captions captions.jsonl --generator Qwen/Qwen3-8B

captions.jsonl holds {"caption": str, "caption_type": "image"|"video", "key"?: str} per line.
Everything is single-process (it is I/O and text work, seconds to minutes), so there is no torchrun
form. Outputs: runs/ted6k/ted6k.json (+ runs/ted6k/scenes.json: the scene and the structured claim
behind every world statement) and runs/world/{caption_pairs,vqa,t2x,eval,scenes}.jsonl + media/.
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

from tqdm import tqdm

import world
from common import (DataError, atomic_write_bytes, atomic_write_json, read_json, read_jsonl, ted_records,
                    valid_option, write_jsonl)

# The paper's TED-6K counts per statement type: (image captions, video captions). 1,374 + 5,267 = 6,641.
PAPER_COUNTS = {
    "Action Recognition": (0, 755), "Adjective": (260, 761), "Adverb": (217, 611),
    "Basic Event": (259, 766), "Coreference": (198, 564), "OCR": (55, 159), "Quantity": (160, 588),
    "Spatial Relationship": (225, 455), "Temporal": (0, 608),
}
# Captions per caption type: the largest type count, so every cell can be filled exactly.
PAPER_CAPTIONS = {"image": 260, "video": 766}
KINDS = ("image", "video")


#################################################################################
#                         Reading and normalising a file                        #
#################################################################################

def normalise_benchmark(data, path="<benchmark>"):
    """Validate a TED-6k-format object and keep only usable options.

    A statement type whose positive is null or not `success` is dropped (the caption has nothing for
    it); negatives that are null or not `success` are dropped. Errors name the file and the record.
    """
    out = {}
    for key, rec in ted_records(data, path):
        where = f"{path}: record {key!r}"
        statements = {}
        for stype, info in rec["statements"].items():
            if stype not in world.STATEMENT_TYPES:
                raise DataError(f"{where}: unknown statement type {stype!r} (known: {world.STATEMENT_TYPES})")
            if not isinstance(info, dict):
                raise DataError(f"{where}, type {stype!r}: expected an object")
            for k in ("question", "correct_statement"):
                if k not in info:
                    raise DataError(f"{where}, type {stype!r}: missing key {k!r}")
            negs = info.get("incorrect_statements", [])
            if not isinstance(negs, list):
                raise DataError(f"{where}, type {stype!r}: 'incorrect_statements' must be a list")
            if not valid_option(info["correct_statement"]):
                continue        # null positive: nothing of this type in the caption
            valid = [{"statement": o["statement"], "status": "success"} for o in negs if valid_option(o)]
            if not valid:
                raise DataError(f"{where}, type {stype!r}: fewer than two valid options "
                                f"(the positive and no valid negative)")
            statements[stype] = {"question": info["question"],
                                 "correct_statement": {"statement": info["correct_statement"]["statement"],
                                                       "status": "success"},
                                 "incorrect_statements": valid}
        out[key] = {"caption": rec["caption"], "caption_type": rec["caption_type"], "statements": statements}
    return out


def count_cells(bench):
    """{(type, caption type): instances} over valid statements."""
    counts = {(t, k): 0 for t in world.STATEMENT_TYPES for k in KINDS}
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
    for t in world.STATEMENT_TYPES:
        i, v = counts[(t, "image")], counts[(t, "video")]
        row = f"| {t} | {i} | {v} | {i + v} |"
        if paper:
            row += f" {PAPER_COUNTS[t][0]} | {PAPER_COUNTS[t][1]} |"
        lines.append(row)
    ti = sum(counts[(t, "image")] for t in world.STATEMENT_TYPES)
    tv = sum(counts[(t, "video")] for t in world.STATEMENT_TYPES)
    lines.append(f"| all | {ti} | {tv} | {ti + tv} |" + (" 1374 | 5267 |" if paper else ""))
    return "\n".join(lines)


#################################################################################
#                          The world's benchmark                                #
#################################################################################

def _option(text):
    return {"statement": text, "status": "success"}


def _null_entry(stype):
    return {"question": world.QUESTIONS[stype], "correct_statement": {"statement": None, "status": "null"},
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
    pbar = tqdm(total=sum(round(PAPER_CAPTIONS[k] * fraction) for k in KINDS), desc="benchmark", leave=False)
    for kind_i, kind in enumerate(KINDS):
        n_caps = round(PAPER_CAPTIONS[kind] * fraction)
        types_of = [[] for _ in range(n_caps)]
        for stype in world.STATEMENT_TYPES:
            n = round(PAPER_COUNTS[stype][kind_i] * fraction)
            for i in rng.sample(range(n_caps), min(n, n_caps)):
                types_of[i].append(stype)
        for i in range(n_caps):
            wanted = [t for t in world.STATEMENT_TYPES if t in types_of[i]]
            for _ in range(5000):
                scene = world.sample_scene(rng, kind, words="OCR" in wanted,
                                           count_weights=world.BENCH_OBJECT_COUNT_WEIGHTS)
                if world.scene_key(scene) in taken:
                    continue
                # The caption first: negatives that match its words better than the positive go last.
                caption = world.write_captions(scene, rng)[0]
                made = world.make_statements(scene, rng, wanted, caption=caption) if wanted else {}
                if made is not None:
                    break
            else:
                raise RuntimeError(f"could not build a {kind} scene with types {wanted}")
            taken.add(world.scene_key(scene))
            key = f"{kind}_{i}"
            statements = {}
            for stype in world.STATEMENT_TYPES:
                if stype in made:
                    s = made[stype]
                    statements[stype] = {
                        "question": s["question"],
                        "correct_statement": _option(world.render_claim(s["correct"])),
                        "incorrect_statements": [_option(world.render_claim(c)) for c in s["incorrect"]]}
                else:
                    statements[stype] = _null_entry(stype)
            bench[key] = {"caption": caption, "caption_type": kind, "statements": statements}
            side[key] = {"scene": scene, "claims": {t: {"correct": s["correct"], "incorrect": s["incorrect"]}
                                                    for t, s in made.items()}}
            pbar.update(1)
    pbar.close()
    return bench, side


#################################################################################
#                          The world's training splits                          #
#################################################################################

def _fresh_scene(rng, kind, taken):
    """A scene not used anywhere else (benchmark, eval or another training record)."""
    for _ in range(1000):
        scene = world.sample_scene(rng, kind)
        key = world.scene_key(scene)
        if key not in taken:
            taken.add(key)
            return scene
    raise RuntimeError("scene space exhausted")


def _media_records(rng, prefix, n_images, n_videos, taken, out_dir, desc):
    """t2x-style records (media written under out_dir/media) for n_images + n_videos fresh scenes."""
    records = []
    kinds = ["image"] * n_images + ["video"] * n_videos
    for i, kind in enumerate(tqdm(kinds, desc=desc, leave=False)):
        scene = _fresh_scene(rng, kind, taken)
        data, ext = world.encode_media(scene)
        media = f"media/{prefix}_{i:06d}.{ext}"
        atomic_write_bytes(out_dir / media, data)
        captions = world.write_captions(scene, rng)
        records.append({"media": media, "caption": captions[0], "kind": kind,
                        "prompt": world.write_prompt(scene), "scene": scene, "captions": captions})
    return records


def interleave_kinds(kinds):
    """Indices of `kinds` with images and videos spread evenly (each in proportion to its count),
    so that any prefix (e.g. the first --vqa records) holds both kinds in the same ratio."""
    pos = {}
    for k in set(kinds):
        idx = [i for i, x in enumerate(kinds) if x == k]
        pos.update({i: (j + 0.5) / len(idx) for j, i in enumerate(idx)})
    return sorted(range(len(kinds)), key=lambda i: (pos[i], kinds[i]))


def write_world_splits(args, taken):
    """caption_pairs / vqa / t2x / eval / scenes jsonl + media under args.world_out."""
    out = Path(args.world_out)
    rng = random.Random(f"{args.seed}-train")
    # Held-out first, so its scenes are excluded from every training split.
    eval_recs = _media_records(random.Random(f"{args.seed}-eval"), "eval", args.eval // 2,
                               args.eval - args.eval // 2, taken, out, "eval media")
    t2x = _media_records(rng, "t2x", args.t2x_images, args.t2x_videos, taken, out, "t2x media")
    mixed = interleave_kinds([r["kind"] for r in t2x])
    vqa = []
    for i in tqdm(range(args.vqa if t2x else 0), desc="vqa", leave=False):
        rec = t2x[mixed[i % len(mixed)]]
        vqa.append({"media": rec["media"], "kind": rec["kind"],
                    "messages": world.write_vqa(rec["scene"], rng, rec["captions"])})
    pairs = []
    for i in tqdm(range(args.caption_pairs), desc="caption pairs", leave=False):
        scene = _fresh_scene(rng, "image" if i % 2 == 0 else "video", taken)
        a, b = world.write_captions(scene, rng)
        pairs.append({"a": a, "b": b, "kind": scene["kind"]})
    scenes = [{"id": Path(r["media"]).stem, "split": split, "kind": r["kind"], "media": r["media"],
               "scene": r["scene"]} for split, recs in (("eval", eval_recs), ("t2x", t2x)) for r in recs]
    strip = lambda r: {k: r[k] for k in ("media", "caption", "kind", "prompt", "scene")}
    write_jsonl(out / "eval.jsonl", [strip(r) for r in eval_recs])
    write_jsonl(out / "t2x.jsonl", [strip(r) for r in t2x])
    write_jsonl(out / "vqa.jsonl", vqa)
    write_jsonl(out / "caption_pairs.jsonl", pairs)
    write_jsonl(out / "scenes.jsonl", scenes)
    # A few renders at the viewing size, words legible, for people.
    prev = [r["scene"] for r in t2x[:8] if r["kind"] == "image"]
    if prev:
        import numpy as np
        tiles = []
        for s in prev:   # a grey rule between tiles
            tiles += [world.render_image(s, world.VIEW_SCALE), np.full((world.IMAGE_SIZE * world.VIEW_SCALE, 4, 3), 96, np.uint8)]
        grid = np.concatenate(tiles[:-1], axis=1)
        atomic_write_bytes(out / "preview.png", world.encode_png(grid))
    vids = [r["scene"] for r in t2x if r["kind"] == "video"][:1]
    if vids:
        atomic_write_bytes(out / "preview.gif", world.encode_gif(world.render_video(vids[0], world.VIEW_SCALE)))
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
    return (f"Here is a detailed caption of a{'n image' if kind == 'image' else ' video'}.\n\nCaption: {caption}\n\n"
            f"Write ONE short statement (about 15 words) that is true according to the caption and is "
            f"about {TYPE_HINTS[stype]} ({stype}). If the caption says nothing of this kind, answer null.\n"
            'Reply with JSON only: {"statement": "..."} or {"statement": null}')


def negative_prompt(caption, kind, stype, positive):
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

    def __init__(self, name_or_path, max_new_tokens=256, device=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens

    def generate(self, prompt):
        msgs = [{"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = prompt + "\n"
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self.torch.no_grad():
            out = self.model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens, pad_token_id=pad)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _failed(reason):
    return {"statement": None, "status": f"failed: {reason}"}


def llm_statements(caption, kind, stype, generator):
    """One statement-type entry in TED-6k format, written by `generator`; failures are marked, never raised."""
    try:
        reply = generator.generate(positive_prompt(caption, kind, stype))
    except Exception as e:  # a generator that crashes on one prompt must not stop the run
        return {"question": world.QUESTIONS[stype], "correct_statement": _failed(f"generation error {e!r}"),
                "incorrect_statements": []}
    obj = parse_json_object(reply)
    entry = {"question": world.QUESTIONS[stype], "incorrect_statements": []}
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
        reply = generator.generate(negative_prompt(caption, kind, stype, pos))
        obj = parse_json_object(reply)
    except Exception as e:
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
    """[(key, caption, kind)] from a captions jsonl; errors name the file and line."""
    recs = read_jsonl(path, required=("caption",))
    out, n = [], {"image": 0, "video": 0}
    for i, r in enumerate(recs, 1):
        kind = r.get("caption_type", r.get("kind"))
        if kind not in KINDS:
            raise DataError(f"{path}: record {i}: caption_type {kind!r} is not 'image' or 'video'")
        if not isinstance(r["caption"], str) or not r["caption"].strip():
            raise DataError(f"{path}: record {i}: empty caption")
        key = r.get("key") or f"{kind}_{n[kind]}"
        n[kind] += 1
        out.append((key, r["caption"], kind))
    keys = [k for k, _, _ in out]
    if len(set(keys)) != len(keys):
        raise DataError(f"{path}: duplicate keys")
    return out


def build_from_llm(captions, generator):
    """TED-6k-format dict for [(key, caption, kind)] with statements from `generator`."""
    bench = {}
    for key, caption, kind in tqdm(captions, desc="llm statements"):
        types = [t for t in world.STATEMENT_TYPES if kind == "video" or t not in world.VIDEO_ONLY_TYPES]
        bench[key] = {"caption": caption, "caption_type": kind,
                      "statements": {t: llm_statements(caption, kind, t, generator) for t in types}}
    return bench


#################################################################################
#                                   Main                                        #
#################################################################################

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["world", "file", "llm"], default="world")
    p.add_argument("--out", default="runs/ted6k", help="folder for ted6k.json (and scenes.json)")
    p.add_argument("--world-out", default="runs/world", help="folder for the training splits (--source world)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input", help="--source file: a TED-6k.json-format file")
    p.add_argument("--captions", help="--source llm: captions jsonl")
    p.add_argument("--generator", help="--source llm: hub id or local folder of an instruct model")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--bench-fraction", type=float, default=1.0,
                   help="scale the paper's counts (1.0 = the full 6,641 instances)")
    p.add_argument("--caption-pairs", type=int, default=4000)
    p.add_argument("--vqa", type=int, default=2000)
    p.add_argument("--t2x-images", type=int, default=3000)
    p.add_argument("--t2x-videos", type=int, default=1000)
    p.add_argument("--eval", type=int, default=100, help="held-out scenes for 06's fidelity eval")
    p.add_argument("--no-splits", action="store_true", help="--source world: write the benchmark only")
    return p.parse_args(argv)


def main(argv=None, generator=None):
    args = parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    if args.source == "world":
        taken = set()
        bench, side = build_world_benchmark(args.seed, args.bench_fraction, taken)
        sizes = {} if args.no_splits else write_world_splits(args, taken)
        atomic_write_json(out / "scenes.json", side, indent=None)
        atomic_write_json(out / "ted6k.json", bench)
        counts = count_cells(bench)
        print(format_table(counts, paper=args.bench_fraction == 1.0))
        if sizes:
            print("training splits in", args.world_out, ":", ", ".join(f"{k} {v}" for k, v in sizes.items()))
    elif args.source == "file":
        if not args.input:
            raise SystemExit("--source file needs --input TED-6k.json")
        bench = normalise_benchmark(read_json(args.input), args.input)
        atomic_write_json(out / "ted6k.json", bench)
        counts = count_cells(bench)
        print(format_table(counts))
        if not sum(counts.values()):
            print(f"warning: {args.input} holds no usable instance", file=sys.stderr)
    else:
        if not args.captions or not (args.generator or generator):
            raise SystemExit("--source llm needs --captions FILE and --generator MODEL")
        captions = read_captions(args.captions)
        generator = generator or HFGenerator(args.generator, args.max_new_tokens)
        bench = build_from_llm(captions, generator)
        atomic_write_json(out / "ted6k.json", bench)
        counts = count_cells(bench)
        print(format_table(counts, paper=False))
    print(f"wrote {out / 'ted6k.json'} ({sum(counts.values())} instances) in {time.time() - t0:.1f}s")
    return bench


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        raise SystemExit(f"error: {e}")
