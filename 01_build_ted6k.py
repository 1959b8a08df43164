"""01: build (or import) the TED-6K benchmark, and write the built-in world's training splits.

TED-6K (GRAN-TED, Sec. 3) pairs a detailed caption with, for each of nine statement types, one true
statement and three hard negatives (minimal edits that contradict the caption); an encoder is scored by
whether the true statement's embedding is the closest to the caption's. One output format (the public
TED-6k.json: keys image_N / video_N, each with caption, caption_type and statements), two sources:

    python 01_build_ted6k.py     # the built-in world: the paper's 16 cell counts, 6,641 instances
    python 01_build_ted6k.py --overwrite --t2x-images 20000 --t2x-videos 5000 --pairs 50000 --vqa 20000
    python 01_build_ted6k.py --source file --benchmark TED-6k.json    # check and normalise a file

Single process (seconds of text work). Writes runs/ted6k/ted6k.json (+ scenes.json: the scene and claim
behind every world statement) and runs/world/{caption_pairs,vqa,t2x,eval,scenes}.jsonl + media/. Each
folder is built beside its final place and swapped in whole, so a failed or killed run leaves the previous
one as it was; one that holds a benchmark or a world is replaced only with --overwrite. Statements for your
own captions and caption pairs from your own media are tools/ted_from_llm.py and tools/caption_pairs.py.
"""
import random
import time
from pathlib import Path

import numpy as np

import plumbing
from common import KINDS, read_ted, valid_option
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
#                               Output folders                                  #
#################################################################################

# What 01 writes in each folder. A folder holding anything else is someone else's: never replaced.
BENCH_FILES = {"ted6k.json", "scenes.json"}
WORLD_FILES = {"caption_pairs.jsonl", "vqa.jsonl", "t2x.jsonl", "eval.jsonl", "scenes.jsonl", "media",
               "preview.png", "preview.gif"}


def check_replaceable(folder, flag, ours, what, overwrite):
    """Refuse to replace a folder that holds files 01 does not write, or one holding `what` without --overwrite."""
    if plumbing.check_ours(folder, flag, ours, "01") and not overwrite:
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


def get_parser():
    p = plumbing.ArgumentParser(__doc__)
    nonneg = plumbing.nonneg_int
    p.add_argument("--source", choices=["world", "file"], default="world")
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
    stray = [d for d in SPLIT_FLAGS if d in given and args.no_splits]
    if stray:
        raise DataError(f"--{stray[0].replace('_', '-')} does nothing with --no-splits")
    if args.source == "file" and not args.benchmark:
        raise DataError("--source file needs --benchmark FILE (a TED-6k.json-format file)")
    if args.source == "world" and not args.no_splits:
        a, b = Path(args.out).resolve(), Path(args.world_out).resolve()
        if a == b or a in b.parents or b in a.parents:
            raise DataError(f"--out {args.out} and --world-out {args.world_out} must be separate folders")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args, plumbing.given_flags(parser, argv))
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
    else:
        bench, _ = read_ted(args.benchmark)   # refuses a file with nothing to score
        write_benchmark(out, bench)
        counts = count_cells(bench)
        log(format_table(counts))
    log(f"wrote {out / 'ted6k.json'} ({sum(counts.values())} instances) in {time.time() - t0:.1f}s")
    return bench


if __name__ == "__main__":
    plumbing.run_cli(main)
