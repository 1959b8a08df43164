"""The pixel checker: reads a scene back out of an image or video and scores a sample against its prompt.

No model judges here: `read_objects` segments a frame into objects (colour, shape, size, cell) and
`check_sample` scores generated pixels against the scene they were asked for, per aspect (colour,
count, position, shape, motion, speed). On the world's own renders every aspect is 1.0. Used by 06
(`--eval`) and by the tests that check 01's media.

    import random
    from world import scenes, checker
    scene = scenes.sample_scene(random.Random(0), "video")
    print(checker.check_sample(scenes.render_video(scene), scene))   # all 1.0
"""
import copy
import math
import random

import numpy as np
from scipy import ndimage, optimize

from .scenes import (BACKGROUND, COLOURS, DIRECTIONS, IMAGE_SIZE, PALETTE, SHAPES, first_segment, position, visible,
                     write_caption)

#################################################################################
#                          Reading objects out of pixels                        #
#################################################################################
# Reads objects back out of pixels without looking at the scene: nearest-palette labels (with a
# distance threshold so muddy pixels count as background), 4-connected components per colour,
# small components ignored, then centroid -> cell, fill ratio -> shape, bounding box -> size.
# `check_sample` then matches the read objects to the scene's and scores each aspect.

COLOUR_THRESHOLD = 110.0   # max RGB distance to a palette colour (black/background wins ties)
MIN_AREA = 6               # components smaller than this (at 32x32) are noise
SQUARE_FILL, TRIANGLE_FILL = 0.92, 0.68
_PAL = np.array([BACKGROUND] + [PALETTE[c] for c in COLOURS], np.float32)


def segment(frame):
    """Palette label per pixel: 0 = background, k = COLOURS[k - 1]."""
    f = frame.astype(np.float32)
    d = np.sqrt(((f[:, :, None, :] - _PAL[None, None]) ** 2).sum(-1))
    labels = d.argmin(-1)
    labels[d.min(-1) > COLOUR_THRESHOLD] = 0
    return labels


def _components(labels):
    """4-connected components of equal non-zero label: list of (label, [ys], [xs])."""
    comps = []
    for lab in np.unique(labels[labels > 0]):
        parts, n = ndimage.label(labels == lab)
        for k in range(1, n + 1):
            ys, xs = np.nonzero(parts == k)
            comps.append((int(lab), ys.tolist(), xs.tolist()))
    return comps


def read_objects(frame):
    """Objects in one RGB frame: [{colour, shape, size, cell, cx, cy, area, fill}], largest first."""
    h, w = frame.shape[:2]
    scale = w / IMAGE_SIZE
    out = []
    for lab, ys, xs in _components(segment(frame)):
        area = len(ys)
        if area < MIN_AREA * scale * scale:
            continue
        bw, bh = (max(xs) - min(xs) + 1), (max(ys) - min(ys) + 1)
        fill = area / (bw * bh)
        cx, cy = sum(xs) / area, sum(ys) / area
        # Triangle centroids sit low in the box; the box centre is the object's position.
        bx, by = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
        shape = "square" if fill >= SQUARE_FILL else ("circle" if fill >= TRIANGLE_FILL else "triangle")
        out.append({"colour": COLOURS[lab - 1], "shape": shape,
                    "size": "large" if max(bw, bh) >= 7 * scale else "small",
                    "cell": [min(2, int(by * 3 / h)), min(2, int(bx * 3 / w))],
                    "cx": bx / scale, "cy": by / scale, "mx": cx / scale, "my": cy / scale,
                    "area": area / (scale * scale), "fill": fill})
    out.sort(key=lambda o: -o["area"])
    return out


#################################################################################
#                             Scoring a sample                                  #
#################################################################################

def _match(expected, found):
    """Best assignment of expected objects [(colour, x, y)] to found ones (index or None: cost 100)."""
    found = found[:6]
    cost = np.full((len(expected), len(found) + len(expected)), 100.0)
    for i, (colour, x, y) in enumerate(expected):
        for j, f in enumerate(found):
            cost[i, j] = (0 if f["colour"] == colour else 60.0) + math.hypot(f["cx"] - x, f["cy"] - y)
    rows, cols = optimize.linear_sum_assignment(cost)
    return [int(c) if c < len(found) else None for c in cols[np.argsort(rows)]]


def check_sample(pixels, scene):
    """Score pixels ([H,W,3] image or [T,H,W,3] video) against a scene, per aspect in [0, 1].

    colour/shape/position: fraction of the scene's objects read back right (unmatched = wrong);
    count: 1 if exactly the right number of objects is read (videos: fraction of frames);
    motion/speed (videos): fraction of objects (moving objects, for speed) whose initial direction /
    speed class read from the centroid track is right; None for images or when nothing moves.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise TypeError(f"check_sample expects uint8 RGB pixels (0-255), got {pixels.dtype}")
    objs = scene["objects"]
    if scene["kind"] == "image" or pixels.ndim == 3:
        frames = pixels[None] if pixels.ndim == 3 else pixels[:1]
    else:
        frames = pixels
    video = scene["kind"] == "video"
    T = len(frames)
    reads = [read_objects(f) for f in frames]
    # Per frame: which read object is which scene object.
    tracks = [[None] * T for _ in objs]
    count_ok = []
    for t in range(T):
        vis = [i for i, o in enumerate(objs) if not video or visible(o, t)]
        exp = [(objs[i]["colour"],) + tuple(position(objs[i], t)) for i in vis]
        for i, j in zip(vis, _match(exp, reads[t])):
            tracks[i][t] = reads[t][j] if j is not None else None
        count_ok.append(len(reads[t]) == len(vis))
    colour, shape, pos, motion, speed = [], [], [], [], []
    for i, o in enumerate(objs):
        frames_i = [t for t in range(T) if not video or visible(o, t)]
        got = [tracks[i][t] for t in frames_i]
        hits = [g for g in got if g is not None]
        colour.append(sum(g["colour"] == o["colour"] for g in hits) / max(1, len(got)) > 0.5)
        shape.append(sum(g["shape"] == o["shape"] for g in hits) / max(1, len(got)) > 0.5)
        first = got[0] if got else None
        pos.append(first is not None and first["cell"] == o["cell"])
        if video:
            t0, t1 = first_segment(o)
            a, b = tracks[i][t0] if t0 < T else None, tracks[i][min(t1, T - 1)]
            if a is None or b is None or t1 <= t0:
                motion.append(False)
                if o["direction"] != "none":
                    speed.append(False)
                continue
            dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
            steps = t1 - t0
            per_step = max(abs(dx), abs(dy)) / steps
            if per_step < 0.5:
                d = "none"
            elif abs(dx) >= abs(dy):
                d = "right" if dx > 0 else "left"
            else:
                d = "down" if dy > 0 else "up"
            motion.append(d == o["direction"])
            if o["direction"] != "none":
                speed.append(("fast" if per_step >= 1.5 else "slow") == o["speed"])
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else None
    return {"colour": mean(colour), "count": mean(count_ok), "position": mean(pos), "shape": mean(shape),
            "motion": mean(motion) if video else None, "speed": mean(speed) if video else None}


#################################################################################
#             Hard-negative captions (the diffusion classifier's options)       #
#################################################################################
# The generation-side twin of a TED question: a scene's caption against captions of the same scene
# with one aspect changed, all written in one style with one wording seed so they differ only where
# the edit shows. Truth is exact: the negatives describe scenes that are not the rendered one.

ASPECTS = ("colour", "count", "position", "shape", "motion", "speed")


def _edits(scene, aspect):
    """Every one-aspect edit of the scene, as a list of edited copies."""
    objs, out = scene["objects"], []
    free = [[r, c] for r in range(3) for c in range(3) if [r, c] not in [o["cell"] for o in objs]]
    video = scene["kind"] == "video"

    def edited(i, **change):
        new = copy.deepcopy(scene)
        new["objects"][i].update(change)
        return new
    for i, o in enumerate(objs):
        if aspect == "colour":
            out += [edited(i, colour=c) for c in COLOURS if c != o["colour"]]
        elif aspect == "shape":
            out += [edited(i, shape=s) for s in SHAPES if s != o["shape"]]
        elif aspect == "position":
            out += [edited(i, cell=cell) for cell in free]
        elif aspect == "count":
            if len(objs) > 1:
                new = copy.deepcopy(scene)
                del new["objects"][i]
                out.append(new)
            for cell in free[:2]:
                new = copy.deepcopy(scene)
                new["objects"].append(dict(copy.deepcopy(o), cell=cell))
                out.append(new)
        elif aspect == "motion" and video:
            for d in DIRECTIONS:
                if d != o["direction"]:
                    keep = o["event"] == "disappears" or d != "none"  # a still object cannot stop or turn
                    out.append(edited(i, direction=d, speed=None if d == "none" else o["speed"] or "slow",
                                      event=o["event"] if keep else None, event_frame=o["event_frame"] if keep else None))
        elif aspect == "speed" and video and o["direction"] != "none":
            out.append(edited(i, speed="fast" if o["speed"] == "slow" else "slow"))
    return out


def hard_negatives(scene, aspect, n=3, seed=0, style=0):
    """(true caption, up to n distinct captions of one-aspect edits of the scene); [] when the aspect
    cannot be edited (motion and speed of an image, speed when nothing moves)."""
    wording = lambda sc: write_caption(sc, style, random.Random(seed))
    true = wording(scene)
    edits = _edits(scene, aspect)
    random.Random(seed).shuffle(edits)
    negatives = []
    for e in edits:
        text = wording(e)
        if text != true and text not in negatives:
            negatives.append(text)
        if len(negatives) == n:
            break
    return true, negatives
