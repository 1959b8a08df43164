"""The built-in synthetic world: every dataset this repo needs, derived from one plain scene dict.

A scene is a few coloured shapes on a black 32x32 canvas (a still image) or an 8-frame 32x32 clip in
which objects move (left/right/up/down, slowly or quickly), enter late, stop, turn around or
disappear. From the scene dict alone we derive:

- renders: `render_image` / `render_video` (and `VIEW_SCALE`x larger ones, where words are legible);
- captions: `write_captions` (two independently worded, detailed descriptions) and `write_prompt`;
- TED statements: `make_statements` builds, for each of the nine types, a structured *claim* that is
  true of the scene and three minimal edits of it that are false. A claim is a small JSON dict;
  `render_claim` turns it into text and `evaluate_claim` decides it against the scene, so truth is
  never decided by looking at strings;
- VQA: `write_vqa` (question/answer turns over the same perspectives, plus "describe" prompts);
- the checker: `read_objects` segments a frame back into objects and `check_sample` scores pixels
  against a scene per aspect (colour, count, position, shape, motion, speed);
- `text_corpus` for training tokenizers.

    import random, world
    rng = random.Random(0)
    scene = world.sample_scene(rng, "video")
    frames = world.render_video(scene)                 # uint8 [8, 32, 32, 3]
    print(world.write_captions(scene, rng)[0])
    print(world.check_sample(frames, scene))           # all 1.0 on the world's own renders

Only numpy and pillow are needed.
"""
import io
import itertools
import json
import math
import random
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#################################################################################
#                     Constants and difficulty knobs                            #
#################################################################################

IMAGE_SIZE = 32          # canvas side in pixels (what the diffusion model learns)
FRAMES = 8               # frames per video
VIEW_SCALE = 8           # upscaling for human viewing; words are drawn only at this size

# Very distinct saturated colours on black, so a noisy sample still maps to one palette entry.
PALETTE = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "magenta": (255, 0, 255), "cyan": (0, 255, 255), "orange": (255, 128, 0), "white": (255, 255, 255),
}
COLOURS = list(PALETTE)
BACKGROUND = (0, 0, 0)
SHAPES = ["square", "circle", "triangle"]   # fill ratios ~1.0, ~0.84, ~0.51 of the bounding box
SIZES = {"small": 5, "large": 9}            # side of the bounding box in pixels (odd: centred)
CELL_CENTRES = (5, 16, 27)                  # 3x3 grid; 11 px apart so two large shapes keep a 2 px gap
DIRECTIONS = ["left", "right", "up", "down", "none"]
DIR_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "none": (0, 0)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "none": "none"}
SPEEDS = {"slow": 1, "fast": 2}             # pixels per frame
EVENTS = ["appears", "disappears", "stops", "turns around"]
WORDS = ["CAT", "DOG", "SUN", "MAP", "BOX", "KEY", "CUP", "HAT", "PEN", "BUS", "OWL", "FOX", "JAM",
         "ZIP", "STOP", "EXIT", "SALE", "OPEN", "GO", "UP"]

# Difficulty knobs (the probe team may turn these to make TED-6K harder or easier).
OBJECT_COUNT_WEIGHTS = {1: 1, 2: 3, 3: 4, 4: 3}     # objects per training scene
# Two objects per benchmark scene: with 2-4 (and the knobs below at 2 / 0) every encoder in 02's zoo,
# and a random aggregator, scored 17-25%, below chance; the 9 types still all apply with two objects.
BENCH_OBJECT_COUNT_WEIGHTS = {2: 1}                 # objects per benchmark scene
MAX_FACTS = 3            # facts joined in one statement (more = more binding to get right)
NEGATIVE_STYLE = "permute"   # "permute": prefer negatives that reuse exactly the positive's words
#                              (a swap of bindings; invisible to bag-of-words); "any": any minimal edit
# How many of the 3 negatives substitute a value ABSENT from the scene (a colour no object has, a count
# no group has, a direction / speed / event no object has, a one-letter misspelling): like the real
# TED negatives, which bring in a contradicting value, these let lexical encoders earn partial credit.
ABSENT_NEGATIVES = 3          # for ABSENT_TYPES (Quantity, Adverb, OCR, Basic Event, Action Recognition)
ABSENT_NEGATIVES_BINDING = 1  # for the binding types (Adjective, Spatial, Temporal, Coreference): the other
#                               two re-bind the caption's own words (bag-of-words ties them with the positive)
ABSENT_TYPES = ("Action Recognition", "Adverb", "Basic Event", "OCR", "Quantity")
WORD_PROB = 0.15         # chance that an object carries a word (training scenes)
EVENT_PROB = 0.6         # chance that a video object has an event (stops / turns around / disappears)
LATE_ENTRY_PROB = 0.35   # chance that a video object enters after the first frame

STATEMENT_TYPES = ["Action Recognition", "Adjective", "Adverb", "Basic Event", "Coreference", "OCR",
                   "Quantity", "Spatial Relationship", "Temporal"]
VIDEO_ONLY_TYPES = ("Action Recognition", "Temporal")

NUMBER_WORDS = {0: "no", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
ROW_NAMES = ["top", "middle", "bottom"]
COL_NAMES = ["left", "middle", "right"]


#################################################################################
#                               Scenes                                          #
#################################################################################

def _weighted(rng, weights):
    """One key of `weights` drawn with probability proportional to its value."""
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def centre_of(cell):
    """Pixel centre (x, y) of a grid cell (row, col) at IMAGE_SIZE."""
    return CELL_CENTRES[cell[1]], CELL_CENTRES[cell[0]]


def event_frame(obj, event):
    """Frame at which `obj` undergoes `event`, or None when it does not."""
    if event == "appears":
        return obj["enter"] if obj.get("enter", 0) > 0 else None
    if obj.get("event") == event:
        return obj["event_frame"]
    return None


def visible(obj, t):
    """Whether a video object is on screen at frame t."""
    exit_ = obj["event_frame"] if obj.get("event") == "disappears" else FRAMES
    return obj.get("enter", 0) <= t < exit_


def position(obj, t):
    """Centre (x, y) of an object at frame t (images: t is ignored)."""
    x0, y0 = centre_of(obj["cell"])
    if "direction" not in obj:
        return x0, y0
    dx, dy = DIR_VECTORS[obj["direction"]]
    v = SPEEDS.get(obj["speed"], 0) if obj["speed"] else 0
    start, ev, f = obj["enter"], obj.get("event"), obj.get("event_frame")
    if ev == "stops":
        steps = min(t, f) - start
    elif ev == "turns around":
        steps = (f - start) - max(0, t - f) if t > f else t - start
    else:
        steps = t - start
    return x0 + dx * v * steps, y0 + dy * v * steps


def first_segment(obj):
    """(first frame, last frame) of the object's initial motion: what direction/speed describe."""
    start = obj.get("enter", 0)
    ev = obj.get("event")
    if ev in ("stops", "turns around"):
        return start, obj["event_frame"]
    if ev == "disappears":
        return start, obj["event_frame"] - 1
    return start, FRAMES - 1


def _box(obj, t):
    x, y = position(obj, t)
    h = SIZES[obj["size"]] // 2
    return x - h, y - h, x + h, y + h


def _boxes_apart(a, b, gap=2):
    """At least `gap` empty pixels between two inclusive boxes along some axis."""
    return (max(a[0], b[0]) - min(a[2], b[2]) - 1 >= gap) or (max(a[1], b[1]) - min(a[3], b[3]) - 1 >= gap)


def _video_object_ok(obj, placed):
    """Inside the canvas at every visible frame and never near another visible object."""
    for t in range(FRAMES):
        if not visible(obj, t):
            continue
        box = _box(obj, t)
        if box[0] < 0 or box[1] < 0 or box[2] > IMAGE_SIZE - 1 or box[3] > IMAGE_SIZE - 1:
            return False
        for other in placed:
            if visible(other, t) and not _boxes_apart(box, _box(other, t)):
                return False
    return True


def sample_scene(rng, kind, n_objects=None, words=None, count_weights=None):
    """A random scene: a plain JSON-able dict {"kind", "objects": [...]}.

    n_objects: fixed count (else drawn from count_weights or OBJECT_COUNT_WEIGHTS);
    words: True = at least one object carries a word, False = none, None = by chance.
    """
    assert kind in ("image", "video"), kind
    for _ in range(1000):
        n = n_objects or _weighted(rng, count_weights or OBJECT_COUNT_WEIGHTS)
        cells = rng.sample([[r, c] for r in range(3) for c in range(3)], n)
        objects = []
        for cell in cells:
            obj = {"shape": rng.choice(SHAPES), "colour": rng.choice(COLOURS),
                   "size": rng.choice(list(SIZES)), "cell": cell, "word": None}
            if words is None and rng.random() < WORD_PROB:
                obj["word"] = rng.choice(WORDS)
            if kind == "video":
                obj = _sample_motion(rng, obj, objects)
                if obj is None:
                    break
            objects.append(obj)
        if len(objects) != n:
            continue
        if words is True:
            # Two carriers whose words differ in one letter: reading the text, not spotting a
            # word, is what tells them apart.
            carriers = rng.sample(objects, min(2, len(objects)))
            carriers[0]["word"] = rng.choice(WORDS)
            if len(carriers) > 1:
                carriers[1]["word"] = _mutate_word(carriers[0]["word"], rng)
        return {"kind": kind, "objects": objects}
    raise RuntimeError("could not sample a scene")


def _sample_motion(rng, obj, placed, tries=60):
    """Give a video object motion, entry time and an optional event that fit the canvas."""
    for _ in range(tries):
        o = dict(obj)
        o["direction"] = rng.choice(DIRECTIONS)
        o["speed"] = rng.choice(list(SPEEDS)) if o["direction"] != "none" else None
        o["enter"] = rng.randint(1, 3) if rng.random() < LATE_ENTRY_PROB else 0
        o["event"], o["event_frame"] = None, None
        if rng.random() < EVENT_PROB:
            options = ["disappears"] + (["stops", "turns around"] if o["direction"] != "none" else [])
            ev = rng.choice(options)
            # The first motion segment lasts >= 3 steps so direction and speed are readable.
            lo, hi = (o["enter"] + 4, FRAMES - 1) if ev == "disappears" else (o["enter"] + 3, FRAMES - 2)
            if lo <= hi:
                o["event"], o["event_frame"] = ev, rng.randint(lo, hi)
        if _video_object_ok(o, placed):
            return o
    return None


def _mutate_word(word, rng):
    """The word with one letter changed (a different, still uppercase word)."""
    i = rng.randrange(len(word))
    letters = [c for c in "ABCDEFGHIJKLMNOPRSTUVWXYZ" if c != word[i]]
    return word[:i] + rng.choice(letters) + word[i + 1:]


def scene_key(scene):
    """A canonical string for a scene (to keep benchmark and training scenes disjoint)."""
    return json.dumps(scene, sort_keys=True, separators=(",", ":"))


#################################################################################
#                               Rendering                                       #
#################################################################################

def shape_mask(shape, side):
    """Boolean [side, side] mask of a shape filling its bounding box."""
    yy, xx = np.mgrid[0:side, 0:side]
    if shape == "square":
        return np.ones((side, side), bool)
    if shape == "circle":
        c = (side - 1) / 2
        return (xx - c) ** 2 + (yy - c) ** 2 <= (side / 2) ** 2
    if shape == "triangle":     # apex up; row y spans 2*(y//2)+1 pixels around the centre
        c = side // 2
        return np.abs(xx - c) <= (yy // 2)
    raise ValueError(shape)


_FONTS = {}


def _font(size):
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except TypeError:       # pillow < 10.1: fixed-size bitmap font
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def _draw_frame(scene, t, scale):
    """One RGB frame; words are drawn only when scale >= 4 (they would be noise at 32x32)."""
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for obj in scene["objects"]:
        if scene["kind"] == "video" and not visible(obj, t):
            continue
        side = SIZES[obj["size"]]
        x0, y0, _, _ = _box(obj, t)
        mask = np.zeros((IMAGE_SIZE + 2 * side, IMAGE_SIZE + 2 * side), bool)   # margin: clip at edges
        mask[y0 + side:y0 + 2 * side, x0 + side:x0 + 2 * side] = shape_mask(obj["shape"], side)
        canvas[mask[side:-side, side:-side]] = PALETTE[obj["colour"]]
    if scale == 1:
        return canvas
    big = np.repeat(np.repeat(canvas, scale, 0), scale, 1)
    words = [o for o in scene["objects"] if o.get("word") and (scene["kind"] == "image" or visible(o, t))]
    if not words or scale < 4:
        return big
    img = Image.fromarray(big)
    draw = ImageDraw.Draw(img)
    for obj in words:
        # As large as fits the shape's width (a triangle's lower half is the widest part).
        room = SIZES[obj["size"]] * scale * (0.75 if obj["shape"] == "triangle" else 0.9)
        font = _font(max(8, min(int(2.6 * scale), int(room / (0.62 * len(obj["word"]))))))
        x, y = position(obj, t)
        cx, cy = (x + 0.5) * scale, (y + 0.5 + (1.5 if obj["shape"] == "triangle" else 0)) * scale
        ink = (255, 255, 255) if obj["colour"] == "blue" else (0, 0, 0)   # black on blue is unreadable
        draw.text((cx, cy), obj["word"], fill=ink, font=font, anchor="mm")
    return np.asarray(img).copy()


def render_image(scene, scale=1):
    """uint8 [H, W, 3] with H = W = IMAGE_SIZE * scale."""
    return _draw_frame(scene, 0, scale)


def render_video(scene, scale=1):
    """uint8 [FRAMES, H, W, 3]."""
    return np.stack([_draw_frame(scene, t, scale) for t in range(FRAMES)])


def render(scene, scale=1):
    """render_image or render_video by the scene's kind."""
    return render_image(scene, scale) if scene["kind"] == "image" else render_video(scene, scale)


def _exact_palette_image(frame, mark=False):
    """A 'P' mode PIL image with the world palette, so GIF frames keep their exact colours.

    mark: paint one background pixel with a second palette entry that is also black. Pillow drops a
    GIF frame identical to the previous one (a still clip would lose frames); this keeps all of them
    while the RGB pixels stay exactly the same.
    """
    colours = [BACKGROUND] + [PALETTE[c] for c in COLOURS] + [BACKGROUND]
    flat = frame.reshape(-1, 3)
    codes = (flat[:, 0].astype(np.int64) << 16) | (flat[:, 1].astype(np.int64) << 8) | flat[:, 2]
    lut = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(colours[:-1])}
    uniq = np.unique(codes)
    if any(int(u) not in lut for u in uniq):
        return None
    idx = np.zeros(codes.shape, np.uint8)
    for u in uniq:
        idx[codes == u] = lut[int(u)]
    if mark:
        bg = np.nonzero(idx == 0)[0]
        if len(bg):
            idx[bg[0]] = len(colours) - 1
    img = Image.fromarray(idx.reshape(frame.shape[:2]), "P")
    img.putpalette([v for c in colours for v in c] + [0] * (3 * (256 - len(colours))))
    return img


def encode_png(frame):
    """PNG bytes of one RGB frame (deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def encode_gif(frames, duration_ms=250):
    """GIF bytes of [T, H, W, 3] frames; exact palette when the frames use only world colours."""
    imgs = [_exact_palette_image(f, mark=t % 2 == 1) for t, f in enumerate(frames)]
    if any(i is None for i in imgs):      # anti-aliased text at view scale: adaptive palette
        imgs = [Image.fromarray(f).convert("P", palette=Image.Palette.ADAPTIVE, colors=64) for f in frames]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=duration_ms,
                 loop=0, optimize=False, disposal=1)
    return buf.getvalue()


def encode_media(scene, scale=1):
    """(bytes, extension) of the scene's render: PNG for images, GIF for videos."""
    if scene["kind"] == "image":
        return encode_png(render_image(scene, scale)), "png"
    return encode_gif(render_video(scene, scale)), "gif"


def load_media(path):
    """uint8 [H, W, 3] from a PNG, or [T, H, W, 3] from a GIF (every frame, RGB)."""
    img = Image.open(path)
    n = getattr(img, "n_frames", 1)
    if str(path).lower().endswith(".gif") or n > 1:
        frames = []
        for i in range(n):
            img.seek(i)
            frames.append(np.asarray(img.convert("RGB")))
        return np.stack(frames)
    return np.asarray(img.convert("RGB"))


#################################################################################
#                        Words: references and phrases                          #
#################################################################################

def cell_phrase(cell, style=0):
    """Where a grid cell is, in words (style 1 uses other words)."""
    r, c = cell
    if style == 0:
        names = {(0, 0): "the top-left corner", (0, 1): "the top middle", (0, 2): "the top-right corner",
                 (1, 0): "the middle of the left side", (1, 1): "the centre",
                 (1, 2): "the middle of the right side", (2, 0): "the bottom-left corner",
                 (2, 1): "the bottom middle", (2, 2): "the bottom-right corner"}
    else:
        names = {(0, 0): "the upper left", (0, 1): "the upper centre", (0, 2): "the upper right",
                 (1, 0): "the far left", (1, 1): "the very centre", (1, 2): "the far right",
                 (2, 0): "the lower left", (2, 1): "the lower centre", (2, 2): "the lower right"}
    return names[(r, c)]


def article(phrase):
    """'a' or 'an' + phrase."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def np_phrase(ref, definite=True, plural=False, size_words=None):
    """Noun phrase for a reference dict {size?, colour?, shape?}."""
    words = []
    if ref.get("size"):
        words.append((size_words or {}).get(ref["size"], ref["size"]))
    if ref.get("colour"):
        words.append(ref["colour"])
    noun = ref.get("shape") or "object"
    words.append(noun + ("s" if plural else ""))
    text = " ".join(words)
    if plural:
        return text
    return ("the " + text) if definite else article(text)


def _bare_noun(ref, plural):
    """'red circles' / 'large object' (no article)."""
    return np_phrase(ref, plural=True)[:-1] if not plural else np_phrase(ref, plural=True)


def resolve(ref, scene):
    """Objects matching every attribute in `ref`."""
    return [o for o in scene["objects"] if all(o.get(k) == v for k, v in ref.items())]


def unique_ref(obj, scene, allowed=("shape", "colour", "size")):
    """The shortest description of `obj` (always naming its shape) that fits no other object."""
    orders = [("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")]
    for keys in orders:
        if any(k not in allowed for k in keys):
            continue
        ref = {k: obj[k] for k in keys}
        if len(resolve(ref, scene)) == 1:
            return ref
    return None


def full_ref(obj):
    return {"size": obj["size"], "colour": obj["colour"], "shape": obj["shape"]}


def the(ref):
    """'The red circle' with a capital."""
    s = np_phrase(ref)
    return s[0].upper() + s[1:]


def capital(s):
    return s[0].upper() + s[1:]


def join_and(items):
    """'a', 'a and b', 'a, b and c'."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


# One word each: "to the left" would share "to the" with every caption and outscore "upward".
DIR_PHRASES = {"left": "leftward", "right": "rightward", "up": "upward", "down": "downward"}
SPEED_WORDS = {"slow": "slowly", "fast": "quickly"}
EVENT_PHRASES = {"appears": "appears", "disappears": "disappears", "stops": "stops",
                 "turns around": "turns around"}
REL_PHRASES = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
INVERSE_REL = {"left": "right", "right": "left", "above": "below", "below": "above"}


def motion_phrase(direction, speed=None):
    if direction == "none":
        return "stays still"
    return "moves " + (SPEED_WORDS[speed] + " " if speed else "") + DIR_PHRASES[direction]


def relation_holds(rel, a_cell, b_cell):
    """Grid relation between two cells (rows grow downward)."""
    return {"left": a_cell[1] < b_cell[1], "right": a_cell[1] > b_cell[1],
            "above": a_cell[0] < b_cell[0], "below": a_cell[0] > b_cell[0]}[rel]


def true_relations(a_cell, b_cell):
    return [r for r in REL_PHRASES if relation_holds(r, a_cell, b_cell)]


#################################################################################
#                               Captions and prompts                            #
#################################################################################

TIME_PHRASES = {1: "just after the start", 2: "early on", 3: "a little later", 4: "midway through",
                5: "later", 6: "near the end", 7: "at the very end"}


def _scene_events(scene):
    """[(frame, object index, event)] sorted by time, for videos."""
    evs = []
    for i, o in enumerate(scene["objects"]):
        for e in EVENTS:
            f = event_frame(o, e)
            if f is not None:
                evs.append((f, i, e))
    return sorted(evs)


def _name(obj, scene):
    """'the red circle': the shortest colour-and-shape name that fits only this object."""
    for keys in (("colour", "shape"), ("size", "colour", "shape")):
        ref = {k: obj[k] for k in keys}
        if len(resolve(ref, scene)) == 1:
            return np_phrase(ref)
    return np_phrase({k: obj[k] for k in ("colour", "shape")}) + " from " + cell_phrase(obj["cell"])


def _object_clause(obj, size_words, style):
    """'a large red circle with the word "CAT" on it' (indefinite)."""
    text = article(f"{size_words[obj['size']]} {obj['colour']} {obj['shape']}")
    if obj.get("word"):
        text += (f' with the word "{obj["word"]}" written on it' if style == 0
                 else f' labelled "{obj["word"]}"')
    return text


def _motion_clause(obj, style):
    """How a video object moves, including stop / turn (but not entry or exit)."""
    if obj["direction"] == "none":
        return "stays still" if style == 0 else "does not move"
    if style == 0:
        text = f"moves {SPEED_WORDS[obj['speed']]} {DIR_PHRASES[obj['direction']]}"
    else:
        pace = {"slow": "at a slow pace", "fast": "at a fast pace"}[obj["speed"]]
        text = f"travels {DIR_PHRASES[obj['direction']]} {pace}"
    return text


def _caption_image(scene, rng, style):
    objs = scene["objects"]
    size_words = {"large": "large", "small": "small"} if style == 0 else {"large": "big", "small": "little"}
    n = NUMBER_WORDS[len(objs)]
    noun = "object" if len(objs) == 1 else "objects"
    if style == 0:
        order = sorted(objs, key=lambda o: o["cell"])
        head = rng.choice([f"A still image with a plain black background shows {n} {noun}.",
                           f"This picture contains {n} {noun} on a black background."])
        parts = [f"In {cell_phrase(o['cell'])} there is {_object_clause(o, size_words, 0)}." for o in order]
    else:
        order = sorted(objs, key=lambda o: (SHAPES.index(o["shape"]), o["cell"]))
        head = rng.choice([f"We see {n} flat {'shape' if len(objs) == 1 else 'shapes'} against a dark backdrop.",
                           f"Against an empty dark backdrop, {n} coloured {'shape is' if len(objs) == 1 else 'shapes are'} drawn."])
        parts = [capital(f"{_object_clause(o, size_words, 1)} is placed at {cell_phrase(o['cell'], 1)}.")
                 for o in order]
    tail = _count_sentence(objs, style)
    return " ".join([head] + parts + ([tail] if tail else []))


def _count_sentence(objs, style):
    """A summary of shape counts, so quantities are stated and not only implied."""
    counts = [(s, sum(o["shape"] == s for o in objs)) for s in SHAPES]
    counts = [(s, k) for s, k in counts if k]
    if len(objs) < 2:
        return "Nothing else is in view; the rest of the canvas is empty." if style == 0 else \
            "It is the only shape; everything around it is empty."
    items = [f"{NUMBER_WORDS[k]} {s}{'s' if k > 1 else ''}" for s, k in counts]
    return (f"In total there {'is' if counts[0][1] == 1 else 'are'} {join_and(items)}." if style == 0
            else f"Altogether the scene holds {join_and(items)}.")


def _caption_video(scene, rng, style):
    objs = scene["objects"]
    size_words = {"large": "large", "small": "small"} if style == 0 else {"large": "big", "small": "little"}
    n = NUMBER_WORDS[len(objs)]
    noun = "object" if len(objs) == 1 else "objects"
    events = _scene_events(scene)
    sentences = []
    if style == 0:
        # Chronological narration: the objects on screen at the start, then each event in time order.
        sentences.append(rng.choice([f"A short clip on a plain black background shows {n} {noun}.",
                                     f"This video features {n} {noun} moving on a black background."]))
        for o in sorted([o for o in objs if o["enter"] == 0], key=lambda o: o["cell"]):
            sentences.append(capital(f"{_object_clause(o, size_words, 0)} starts in "
                                     f"{cell_phrase(o['cell'])} and {_motion_clause(o, 0)}."))
        prev = None
        for f, i, e in events:
            o = objs[i]
            when = "at the same moment" if f == prev else TIME_PHRASES[f]
            if e == "appears":
                s = (f"{when}, {_object_clause(o, size_words, 0)} appears in {cell_phrase(o['cell'])} "
                     f"and {_motion_clause(o, 0)}.")
            elif e == "turns around":
                s = f"{when}, {_name(o, scene)} turns around and heads {DIR_PHRASES[OPPOSITE[o['direction']]]}."
            else:
                s = f"{when}, {_name(o, scene)} {EVENT_PHRASES[e]}."
            sentences.append(capital(s))
            prev = f
    else:
        # Object by object, then a chronological summary of the events.
        sentences.append(rng.choice([f"In this animation, {n} coloured {noun} drift over a dark backdrop.",
                                     f"The footage shows {n} {noun} against an empty dark backdrop."]))
        for o in sorted(objs, key=lambda o: (SHAPES.index(o["shape"]), o["cell"])):
            where = "begins at" if o["enter"] == 0 else "shows up later at"
            s = f"{_object_clause(o, size_words, 1)} {where} {cell_phrase(o['cell'], 1)} and {_motion_clause(o, 1)}"
            if o["event"] == "stops":
                s += ", then comes to a halt"
            elif o["event"] == "turns around":
                s += ", then reverses"
            elif o["event"] == "disappears":
                s += ", then vanishes"
            sentences.append(capital(s + "."))
        if len(events) >= 2:
            steps, prev = [], None
            for f, i, e in events:
                o = objs[i]
                step = f"{_name(o, scene)} {EVENT_PHRASES[e]}"
                if prev is not None:
                    step = ("simultaneously " if f == prev else "after that ") + step
                steps.append(step)
                prev = f
            sentences.append(capital("in order of time: " + "; ".join(steps) + "."))
    tail = _count_sentence(objs, style)
    return " ".join(sentences + ([tail] if tail else []))


def write_captions(scene, rng):
    """Two independently worded, detailed captions (templates, order and synonyms differ)."""
    write = _caption_image if scene["kind"] == "image" else _caption_video
    styles = [0, 1]
    rng.shuffle(styles)
    return [write(scene, rng, s) for s in styles]


def write_prompt(scene):
    """A short generation prompt: every object's look and place (and motion for videos)."""
    parts = []
    for o in sorted(scene["objects"], key=lambda o: o["cell"]):
        p = f"{o['size']} {o['colour']} {o['shape']} {ROW_NAMES[o['cell'][0]]} {COL_NAMES[o['cell'][1]]}"
        if scene["kind"] == "video":
            p += " still" if o["direction"] == "none" else f" moving {SPEED_WORDS[o['speed']]} {o['direction']}"
            if o["enter"]:
                p += ", enters late"
            if o["event"]:
                p += f", {o['event'].replace('disappears', 'vanishes')}"
        parts.append(p)
    return ("video: " if scene["kind"] == "video" else "") + "; ".join(parts)


#################################################################################
#                  Claims: structured statements, rendered and evaluated        #
#################################################################################
# A claim is a JSON dict {"type": <statement type>, "kind": image|video, "form": k, ...} holding
# references ({shape, colour?, size?}) and values. `evaluate_claim` decides it on a scene;
# `render_claim` writes it as text. A reference that fits no object (or several, where the claim
# needs one) makes the claim false.

def _one(ref, scene):
    found = resolve(ref, scene)
    return found[0] if len(found) == 1 else None


def _coref_pred_holds(pred, obj, kind):
    if "size" in pred:
        return obj["size"] == pred["size"]
    if "cell" in pred:
        return obj["cell"] == pred["cell"]
    if "word" in pred:
        return obj.get("word") == pred["word"]
    if "dir" in pred:
        return obj["direction"] == pred["dir"]
    if "event" in pred:
        return event_frame(obj, pred["event"]) is not None
    raise ValueError(pred)


def evaluate_claim(claim, scene):
    """True when the claim holds in the scene."""
    t = claim["type"]
    if t == "Adjective":
        for f in claim["facts"]:
            o = _one(f["ref"], scene)
            if o is None or any(o[k] != f[k] for k in ("colour", "size") if k in f):
                return False
        return True
    if t == "Quantity":
        return all(len(resolve(f["what"], scene)) == f["n"] for f in claim["facts"])
    if t == "Spatial Relationship":
        a = _one(claim["subject"], scene)
        if a is None:
            return False
        for rel, ref in claim["relations"]:
            b = _one(ref, scene)
            if b is None or b is a or not relation_holds(rel, a["cell"], b["cell"]):   # start cells
                return False
        return True
    if t == "Adverb" and claim["kind"] == "image":
        for f in claim["facts"]:
            a, b = _one(f["a"], scene), _one(f["b"], scene)
            if a is None or b is None or a is b or not relation_holds(f["rel"], a["cell"], b["cell"]):
                return False
            same_line = a["cell"][1] == b["cell"][1] if f["rel"] in ("above", "below") else a["cell"][0] == b["cell"][0]
            if same_line != (f["adv"] == "directly"):
                return False
        return True
    if t in ("Adverb", "Action Recognition"):
        for f in claim["facts"]:
            o = _one(f["ref"], scene)
            if o is None or o["direction"] != f["dir"] or ("speed" in f and o["speed"] != f["speed"]):
                return False
        return True
    if t == "Basic Event" and claim["kind"] == "image":
        return all(any(o["cell"] == f["cell"] for o in resolve(f["ref"], scene)) for f in claim["facts"])
    if t == "Basic Event":
        for f in claim["facts"]:
            o = _one(f["ref"], scene)
            if o is None or event_frame(o, f["event"]) is None:
                return False
        return True
    if t == "Temporal":
        frames = []
        for ref, ev in claim["events"]:
            o = _one(ref, scene)
            f = event_frame(o, ev) if o is not None else None
            if f is None:
                return False
            frames.append(f)
        return all(a < b for a, b in zip(frames, frames[1:]))
    if t == "Coreference":
        objs = [_one(r, scene) for r in claim["mentions"]]
        if any(o is None for o in objs) or len({id(o) for o in objs}) != len(objs):
            return False
        return _coref_pred_holds(claim["pred"], objs[claim["point"]], claim["kind"])
    if t == "OCR":
        o = _one(claim["ref"], scene)
        return o is not None and o.get("word") == claim["word"]
    raise ValueError(f"unknown claim type {t}")


def _coref_pred_text(pred, kind):
    if "size" in pred:
        return f"is {pred['size']}"
    if "cell" in pred:
        return ("starts in " if kind == "video" else "sits in ") + cell_phrase(pred["cell"])
    if "word" in pred:
        return f'carries the word "{pred["word"]}"'
    if "dir" in pred:
        return motion_phrase(pred["dir"])
    if "event" in pred:
        return EVENT_PHRASES[pred["event"]]
    raise ValueError(pred)


def render_claim(claim):
    """The claim as an English statement."""
    t, form, kind = claim["type"], claim.get("form", 0), claim["kind"]
    if t == "Adjective":
        parts = []
        for f in claim["facts"]:
            adjs = [f[k] for k in ("size", "colour") if k in f]
            if form == 1:
                adjs = adjs[::-1]
            parts.append(f"{np_phrase(f['ref'])} is {' and '.join(adjs)}")
        return capital(join_and(parts) if form == 0 else "; ".join(parts)) + "."
    if t == "Quantity":
        # The noun keeps one form whatever the number, so a changed count changes one word only.
        noun = "image" if kind == "image" else "video"
        items = [f"the number of {_bare_noun(f['what'], True)} is {NUMBER_WORDS[f['n']]}" for f in claim["facts"]]
        return (capital(f"in the {noun}, {join_and(items)}.") if form == 0
                else capital(join_and(items)) + f" in the {noun}.")
    if t == "Spatial Relationship":
        verb = "is" if kind == "image" else "starts out"
        rels = [f"{REL_PHRASES[rel]} {np_phrase(ref)}" for rel, ref in claim["relations"]]
        return f"{the(claim['subject'])} {verb} {join_and(rels)}."
    if t == "Adverb" and kind == "image":
        parts = [f"{np_phrase(f['a'])} is {f['adv']} {REL_PHRASES[f['rel']]} {np_phrase(f['b'])}"
                 for f in claim["facts"]]
        return capital(join_and(parts) if form == 0 else "; ".join(parts)) + "."
    if t in ("Adverb", "Action Recognition"):
        parts = [f"{np_phrase(f['ref'])} {motion_phrase(f['dir'], f.get('speed'))}" for f in claim["facts"]]
        return capital(", while ".join(parts) if form == 0 else join_and(parts)) + "."
    if t == "Basic Event" and kind == "image":
        parts = [f"{np_phrase(f['ref'], definite=False)} in {cell_phrase(f['cell'])}" for f in claim["facts"]]
        return f"There is {join_and(parts)}."
    if t == "Basic Event":
        parts = [f"{np_phrase(f['ref'])} {EVENT_PHRASES[f['event']]}" for f in claim["facts"]]
        return capital(join_and(parts)) + "."
    if t == "Temporal":
        evs = [f"{np_phrase(ref)} {EVENT_PHRASES[ev]}" for ref, ev in claim["events"]]
        if len(evs) == 2:
            return capital(f"{evs[0]} before {evs[1]}") + "."
        return capital(", then ".join(evs[:-1]) + ", and then " + evs[-1]) + "."
    if t == "Coreference":
        ms = [np_phrase(r, definite=False) for r in claim["mentions"]]
        if len(ms) == 2:
            pointer = ["the former", "the latter"][claim["point"]]
        else:
            pointer = f"the {['first', 'second', 'third', 'fourth'][claim['point']]} of them"
        verb = "There is" if form == 0 else "The " + ("image" if kind == "image" else "video") + " shows"
        return f"{verb} {join_and(ms)}; {pointer} {_coref_pred_text(claim['pred'], kind)}."
    if t == "OCR":
        return (f'The word "{claim["word"]}" is written on {np_phrase(claim["ref"])}.' if form == 0
                else f'{the(claim["ref"])} is labelled "{claim["word"]}".')
    raise ValueError(f"unknown claim type {t}")


#################################################################################
#                   Statement builders: a positive and minimal edits            #
#################################################################################
# Each builder returns (positive claim, same, other, absent) or None when the scene has nothing
# for that type: `same` re-bind the positive's exact words (swap which object gets which value),
# `other` are other minimal edits with values present in the scene, `absent` substitute a value no
# object has. `make_statement` keeps those that evaluate false: ABSENT_NEGATIVES substitutions, the
# rest re-bindings first (NEGATIVE_STYLE="permute").

QUESTIONS = {
    "Action Recognition": "What actions do the objects perform?",
    "Adjective": "What do the objects look like?",
    "Adverb": "How are the objects moving or placed?",
    "Basic Event": "What happens in the scene?",
    "Coreference": "What is said about the object referred to?",
    "OCR": "What text is written on the objects?",
    "Quantity": "How many objects of each kind are there?",
    "Spatial Relationship": "Where are the objects relative to each other?",
    "Temporal": "In what order do things happen?",
}


def _perm_variants(values):
    """Every non-identity reordering of a list (for swapping bindings)."""
    out, seen = [], {json.dumps(values)}
    for p in itertools.permutations(range(len(values))):
        v = [values[i] for i in p]
        key = json.dumps(v)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def _ref_perms(pos, facts):
    """The same values said of the objects in another order (words unchanged, bindings swapped)."""
    return [{**pos, "facts": [dict(f, ref=r) for f, r in zip(facts, refs)]}
            for refs in _perm_variants([f["ref"] for f in facts])]


def _pick(rng, objs, k):
    return rng.sample(objs, min(k, len(objs)))


def _claim(t, kind, rng, forms=1, **fields):
    return {"type": t, "kind": kind, "form": rng.randrange(forms), **fields}


def _absent_colours(scene):
    """Palette colours that no object in the scene has."""
    return [c for c in COLOURS if all(o["colour"] != c for o in scene["objects"])]


def _absent_directions(scene, with_none):
    """Directions (and "none" when asked) that no object in the scene moves in."""
    have = {o["direction"] for o in scene["objects"]}
    return [d for d in DIRECTIONS if d not in have and (with_none or d != "none")]


def _b_adjective(scene, rng):
    objs = [o for o in scene["objects"] if unique_ref(o, scene, ("shape",))]
    if len(objs) < 2:
        return None
    rng.shuffle(objs)
    # Distinct colours first, so that swapping colours is always a real edit.
    objs.sort(key=lambda o: sum(p["colour"] == o["colour"] for p in objs))
    chosen = objs[:rng.randint(min(2, MAX_FACTS), MAX_FACTS)]
    with_size = len({o["size"] for o in chosen}) > 1
    facts = []
    for o in chosen:
        f = {"ref": {"shape": o["shape"]}, "colour": o["colour"]}
        if with_size:
            f["size"] = o["size"]
        facts.append(f)
    pos = _claim("Adjective", scene["kind"], rng, 2, facts=facts)
    same, other = [], []
    for key in ("colour", "size"):
        if key in facts[0]:
            for vals in _perm_variants([f[key] for f in facts]):
                same.append({**pos, "facts": [{**f, key: v} for f, v in zip(facts, vals)]})
    if with_size:
        for cv in _perm_variants([f["colour"] for f in facts]):
            for sv in _perm_variants([f["size"] for f in facts]):
                same.append({**pos, "facts": [{**f, "colour": c, "size": s} for f, c, s in zip(facts, cv, sv)]})
    present = sorted({o["colour"] for o in scene["objects"]})
    for i, f in enumerate(facts):
        for c in present:
            if c != f["colour"]:
                other.append({**pos, "facts": [dict(g, colour=c) if j == i else g for j, g in enumerate(facts)]})
    absent = [{**pos, "facts": [dict(g, colour=c) if j == i else g for j, g in enumerate(facts)]}
              for i in range(len(facts)) for c in _absent_colours(scene)]
    return pos, same, other, absent


def _b_quantity(scene, rng):
    objs = scene["objects"]
    groups = []
    for key in ("shape", "colour"):
        for v in sorted({o[key] for o in objs}):
            groups.append({key: v})
    rng.shuffle(groups)
    # Prefer groups with different counts so swapping the numbers is a real edit.
    groups.sort(key=lambda g: -len(resolve(g, scene)))
    first = groups[0]
    rest = [g for g in groups[1:] if len(resolve(g, scene)) != len(resolve(first, scene))
            and set(g) != set(first)] or [g for g in groups[1:] if set(g) != set(first)]
    chosen = [first] + rest[:1] if rest else [first]
    facts = [{"what": g, "n": len(resolve(g, scene))} for g in chosen]
    pos = _claim("Quantity", scene["kind"], rng, 2, facts=facts)
    same = [{**pos, "facts": [dict(f, n=n) for f, n in zip(facts, ns)]}
            for ns in _perm_variants([f["n"] for f in facts])]
    mentioned = sorted({len(resolve({"shape": s}, scene)) for s in SHAPES} | {len(objs)} - {0})
    other = []
    for i, f in enumerate(facts):
        for n in mentioned + [f["n"] - 1, f["n"] + 1]:
            if 1 <= n <= 4 and n != f["n"]:
                other.append({**pos, "facts": [dict(g, n=n) if j == i else g for j, g in enumerate(facts)]})
    counts = {len(resolve({k: o[k]}, scene)) for o in objs for k in ("shape", "colour")} | {len(objs)}
    absent = [{**pos, "facts": [dict(g, n=n) if j == i else g for j, g in enumerate(facts)]}
              for i in range(len(facts)) for n in range(1, 7) if n not in counts]
    return pos, same, other, absent


def _b_spatial(scene, rng):
    objs = scene["objects"]
    if len(objs) < 2:
        return None
    refs = [unique_ref(o, scene) for o in objs]
    ids = [i for i, r in enumerate(refs) if r]
    if len(ids) < 2:
        return None
    # Two relations where there are three objects: more ways to re-bind the same words.
    chosen = _pick(rng, ids, 1 + min(2, MAX_FACTS, len(ids) - 1))
    a, others = chosen[0], chosen[1:]
    rels = []
    for b in others:
        options = true_relations(objs[a]["cell"], objs[b]["cell"])
        rels.append([rng.choice(options), refs[b]])
    pos = _claim("Spatial Relationship", scene["kind"], rng, 1, subject=refs[a], relations=rels)
    slots = [refs[a]] + [r for _, r in rels]
    same = []
    for perm in _perm_variants(slots):
        same.append({**pos, "subject": perm[0], "relations": [[rel, r] for (rel, _), r in zip(rels, perm[1:])]})
    if len(rels) > 1:   # swap which relation goes with which object
        for perm in _perm_variants([rel for rel, _ in rels]):
            same.append({**pos, "relations": [[rel, r] for rel, (_, r) in zip(perm, rels)]})
    other = []
    for i in range(len(rels)):
        for new in [INVERSE_REL[rels[i][0]]] + list(REL_PHRASES):
            if new != rels[i][0]:
                other.append({**pos, "relations": [[new, r] if j == i else [rel, r]
                                                   for j, (rel, r) in enumerate(rels)]})
        for k in ids:   # the relation to another object
            if refs[k] not in slots:
                other.append({**pos, "relations": [[rel, refs[k]] if j == i else [rel, r]
                                                   for j, (rel, r) in enumerate(rels)]})
    absent = [{**pos, "relations": [[rel, dict(r, colour=c)] if j == i else [rel, r]
                                    for j, (rel, r) in enumerate(rels)]}
              for i in range(len(rels)) for c in _absent_colours(scene)]
    return pos, same, other, absent


def _b_adverb_image(scene, rng):
    objs = scene["objects"]
    refs = [unique_ref(o, scene) for o in objs]
    pairs = []
    for i, j in itertools.permutations(range(len(objs)), 2):
        if refs[i] and refs[j] and i < j:
            a, b = objs[i]["cell"], objs[j]["cell"]
            for rel in true_relations(a, b):
                line = a[1] == b[1] if rel in ("above", "below") else a[0] == b[0]
                pairs.append({"a": refs[i], "rel": rel, "b": refs[j], "adv": "directly" if line else "diagonally"})
    if not pairs:
        return None
    rng.shuffle(pairs)
    # A second fact, about another pair and with the other adverb, makes the adverb swap a real edit.
    facts = [pairs[0]]
    pair0 = (pairs[0]["a"], pairs[0]["b"])
    for p in pairs[1:]:
        if MAX_FACTS >= 2 and p["adv"] != pairs[0]["adv"] and (p["a"], p["b"]) != pair0:
            facts.append(p)
            break
    pos = _claim("Adverb", "image", rng, 2, facts=facts)
    same = [{**pos, "facts": [dict(f, adv=v) for f, v in zip(facts, advs)]}
            for advs in _perm_variants([f["adv"] for f in facts])]
    for i, f in enumerate(facts):
        same.append({**pos, "facts": [dict(g, a=g["b"], b=g["a"]) if j == i else g for j, g in enumerate(facts)]})
    other = []
    for i, f in enumerate(facts):
        flip = "diagonally" if f["adv"] == "directly" else "directly"
        other.append({**pos, "facts": [dict(g, adv=flip) if j == i else g for j, g in enumerate(facts)]})
        other.append({**pos, "facts": [dict(g, rel=INVERSE_REL[g["rel"]]) if j == i else g for j, g in enumerate(facts)]})
    absent, other = other, []   # the adverb flipped / relation inverted: words no caption uses
    return pos, same, other, absent


def _b_motion(scene, rng, t, with_speed):
    objs = [o for o in scene["objects"] if o["event"] != "turns around" and unique_ref(o, scene)]
    if with_speed:
        objs = [o for o in objs if o["direction"] != "none"]
    if not objs:
        return None
    rng.shuffle(objs)
    # A second object that differs in what is asked (speed / direction), so swapping is a real edit.
    key = "speed" if with_speed else "direction"
    chosen = [objs[0]]
    for o in objs[1:]:
        if len(chosen) < min(2, MAX_FACTS) and o[key] != objs[0][key]:
            chosen.append(o)
    facts = []
    for o in chosen:
        f = {"ref": unique_ref(o, scene), "dir": o["direction"]}
        if with_speed:
            f["speed"] = o["speed"]
        facts.append(f)
    pos = _claim(t, "video", rng, 2, facts=facts)
    same = []
    keys = ["dir"] + (["speed"] if with_speed else [])
    for k in keys:
        for vals in _perm_variants([f[k] for f in facts]):
            same.append({**pos, "facts": [dict(f, **{k: v}) for f, v in zip(facts, vals)]})
    same += _ref_perms(pos, facts)
    other = []
    for i, f in enumerate(facts):
        alts = [OPPOSITE[f["dir"]]] if f["dir"] != "none" else []
        alts += [d for d in ("left", "right", "up", "down", "none") if d != f["dir"]]
        for d in alts:
            if d == "none" and with_speed:
                continue
            other.append({**pos, "facts": [dict(g, dir=d) if j == i else g for j, g in enumerate(facts)]})
        if with_speed:
            flip = "fast" if f["speed"] == "slow" else "slow"
            other.insert(0, {**pos, "facts": [dict(g, speed=flip) if j == i else g for j, g in enumerate(facts)]})
    absent = [{**pos, "facts": [dict(g, dir=d) if j == i else g for j, g in enumerate(facts)]}
              for i in range(len(facts)) for d in _absent_directions(scene, not with_speed)]
    if with_speed and len({o["speed"] for o in scene["objects"] if o["speed"]}) == 1:
        flip = "fast" if facts[0]["speed"] == "slow" else "slow"
        absent += [{**pos, "facts": [dict(g, speed=flip) if j == i else g for j, g in enumerate(facts)]}
                   for i in range(len(facts))]
    return pos, same, other, absent


def _b_basic_event_image(scene, rng):
    objs = _pick(rng, scene["objects"], rng.randint(1, MAX_FACTS))
    facts = [{"ref": full_ref(o), "cell": o["cell"]} for o in objs]
    pos = _claim("Basic Event", "image", rng, 1, facts=facts)
    same = [{**pos, "facts": [dict(f, cell=c) for f, c in zip(facts, cells)]}
            for cells in _perm_variants([f["cell"] for f in facts])]
    other = []
    for i, f in enumerate(facts):
        r, c = f["cell"]
        for cell in ([r, 2 - c], [2 - r, c], [r, (c + 1) % 3], [(r + 1) % 3, c]):
            if cell != f["cell"]:
                other.append({**pos, "facts": [dict(g, cell=cell) if j == i else g for j, g in enumerate(facts)]})
        # Another object's look at this place: a colour/shape binding edit.
        for o in scene["objects"]:
            if o["colour"] != f["ref"]["colour"]:
                other.append({**pos, "facts": [dict(g, ref=dict(g["ref"], colour=o["colour"])) if j == i else g
                                               for j, g in enumerate(facts)]})
    absent = [{**pos, "facts": [dict(g, ref=dict(g["ref"], colour=c)) if j == i else g for j, g in enumerate(facts)]}
              for i in range(len(facts)) for c in _absent_colours(scene)]
    return pos, same, other, absent


def _b_basic_event_video(scene, rng):
    objs = scene["objects"]
    evs = [(i, e) for f, i, e in _scene_events(scene) if unique_ref(objs[i], scene)]
    verbs = sorted({e for _, e in evs})
    if len(verbs) < 2:      # one verb only: every edit would need a word the caption never uses
        return None
    rng.shuffle(evs)
    chosen, used = [], set()
    for i, e in evs:
        if i not in used and (not chosen or e != chosen[0][1]) and len(chosen) < min(2, MAX_FACTS):
            chosen.append((i, e))
            used.add(i)
    facts = [{"ref": unique_ref(objs[i], scene), "event": e} for i, e in chosen]
    pos = _claim("Basic Event", "video", rng, 1, facts=facts)
    same = [{**pos, "facts": [dict(f, event=e) for f, e in zip(facts, es)]}
            for es in _perm_variants([f["event"] for f in facts])]
    same += _ref_perms(pos, facts)
    other = []
    for k, f in enumerate(facts):
        for e in verbs:
            if e != f["event"]:
                other.append({**pos, "facts": [dict(g, event=e) if j == k else g for j, g in enumerate(facts)]})
        for o in objs:
            r = unique_ref(o, scene)
            if r and r != f["ref"]:
                other.append({**pos, "facts": [dict(g, ref=r) if j == k else g for j, g in enumerate(facts)]})
    absent = [{**pos, "facts": [dict(g, event=e) if j == k else g for j, g in enumerate(facts)]}
              for k in range(len(facts)) for e in EVENTS if e not in verbs]
    return pos, same, other, absent


def _b_temporal(scene, rng):
    objs = scene["objects"]
    evs = [(f, i, e) for f, i, e in _scene_events(scene) if unique_ref(objs[i], scene)]
    frames = sorted({f for f, _, _ in evs})
    if len(frames) < 2:
        return None
    # One event per distinct frame, so the order is strict.
    by_frame = {}
    for f, i, e in evs:
        by_frame.setdefault(f, []).append((i, e))
    k = min(len(frames), rng.randint(2, max(2, MAX_FACTS)))
    picked = sorted(rng.sample(frames, k))
    seq = [rng.choice(by_frame[f]) for f in picked]
    events = [[unique_ref(objs[i], scene), e] for i, e in seq]
    pos = _claim("Temporal", "video", rng, 1, events=events)
    same = [{**pos, "events": perm} for perm in _perm_variants(events)]
    refs = [r for r, _ in events]
    for perm in _perm_variants(refs):   # the same verbs in the same order, done by other objects
        same.append({**pos, "events": [[r, e] for r, (_, e) in zip(perm, events)]})
    other = []
    for k2, (r, e) in enumerate(events):
        for e2 in EVENTS:
            if e2 != e:
                other.append({**pos, "events": [[rr, e2] if j == k2 else [rr, ee] for j, (rr, ee) in enumerate(events)]})
    absent = [{**pos, "events": [[rr, e2] if j == k2 else [rr, ee] for j, (rr, ee) in enumerate(events)]}
              for k2 in range(len(events)) for e2 in EVENTS if e2 not in {e for _, _, e in evs}]
    return pos, same, other, absent


def _b_coreference(scene, rng):
    objs = scene["objects"]
    kind = scene["kind"]
    refs = [unique_ref(o, scene, ("colour", "shape")) for o in objs]
    ids = [i for i, r in enumerate(refs) if r]
    if len(ids) < 2:
        return None
    preds_of = []
    for i in ids:
        o = objs[i]
        ps = [{"size": o["size"]}, {"cell": o["cell"]}]
        if o.get("word"):
            ps.append({"word": o["word"]})
        if kind == "video":
            ps.append({"dir": o["direction"]})
            ps += [{"event": e} for e in EVENTS if event_frame(o, e) is not None]
        preds_of.append((i, ps))
    # A predicate that holds for the target and for as few other mentioned objects as possible.
    for _ in range(20):
        chosen = _pick(rng, ids, rng.randint(2, min(3, MAX_FACTS + 1)))
        target = rng.randrange(len(chosen))
        pred = rng.choice(dict(preds_of)[chosen[target]])
        if not any(_coref_pred_holds(pred, objs[j], kind) for j in chosen if j != chosen[target]):
            break
    else:
        return None
    mentions = [refs[j] for j in chosen]
    pos = _claim("Coreference", kind, rng, 2, mentions=mentions, point=target, pred=pred)
    same = []
    for perm in itertools.permutations(range(len(mentions))):
        for p in range(len(mentions)):
            cand = {**pos, "mentions": [mentions[q] for q in perm], "point": p}
            if cand != pos:
                same.append(cand)
    other = []
    for j in chosen:
        for p2 in dict(preds_of)[j]:
            if list(p2) == list(pred) and p2 != pred:
                other.append({**pos, "pred": p2})
    if "size" in pred:
        other.append({**pos, "pred": {"size": "small" if pred["size"] == "large" else "large"}})
    if "dir" in pred and pred["dir"] != "none":
        other.append({**pos, "pred": {"dir": OPPOSITE[pred["dir"]]}})
    absent = [{**pos, "mentions": [dict(m, colour=c) if j == target else m for j, m in enumerate(mentions)]}
              for c in _absent_colours(scene)]
    return pos, same, other, absent


def _b_ocr(scene, rng):
    objs = scene["objects"]
    carriers = [o for o in objs if o.get("word") and unique_ref(o, scene)]
    if not carriers:
        return None
    o = rng.choice(carriers)
    pos = _claim("OCR", scene["kind"], rng, 2, ref=unique_ref(o, scene), word=o["word"])
    same = []
    for p in objs:
        r = unique_ref(p, scene)
        if p is not o and r:
            same.append({**pos, "ref": r})                      # the word put on another object
        if p is not o and p.get("word"):
            same.append({**pos, "word": p["word"]})             # another object's word put here
    seen = {p.get("word") for p in objs}
    absent = [w for w in (_mutate_word(o["word"], rng) for _ in range(12)) if w not in seen]
    absent = [{**pos, "word": w} for w in dict.fromkeys(absent)]   # an unseen misspelling
    other = []
    return pos, same, other, absent


BUILDERS = {
    "Action Recognition": lambda s, r: _b_motion(s, r, "Action Recognition", False) if s["kind"] == "video" else None,
    "Adjective": _b_adjective,
    "Adverb": lambda s, r: _b_adverb_image(s, r) if s["kind"] == "image" else _b_motion(s, r, "Adverb", True),
    "Basic Event": lambda s, r: _b_basic_event_image(s, r) if s["kind"] == "image" else _b_basic_event_video(s, r),
    "Coreference": _b_coreference,
    "OCR": _b_ocr,
    "Quantity": _b_quantity,
    "Spatial Relationship": _b_spatial,
    "Temporal": lambda s, r: _b_temporal(s, r) if s["kind"] == "video" else None,
}


def make_statement(scene, stype, rng, n_negatives=3, caption=None):
    """{"question", "correct": claim, "incorrect": [claims]} for one type, or None if impossible.

    The positive evaluates true, every negative false, all texts distinct. ABSENT_NEGATIVES (or
    ABSENT_NEGATIVES_BINDING) of the negatives substitute a value absent from the scene, the rest are
    re-bindings / minimal edits. With `caption`, the re-bindings are picked so that the caption's
    words do not systematically favour a negative (that would be a wording artefact, not a hard
    negative): bag-of-words ties first, then lower and higher matches in turn.
    """
    built = BUILDERS[stype](scene, rng)
    if built is None:
        return None
    pos, same, other, absent = built
    if not evaluate_claim(pos, scene):
        raise AssertionError(f"builder for {stype} made a false positive: {pos}")
    rng.shuffle(same)
    rng.shuffle(other)
    rng.shuffle(absent)
    rest = same + other if NEGATIVE_STYLE == "permute" else rng.sample(same + other, len(same + other))
    if caption is not None:
        # Re-bindings that tie with the positive on the caption's words first, then ones that match
        # them less and more in turn, so that wording favours neither the positive nor a negative;
        # substitutions (absent values) that match less first. Sorting is stable: the shuffled /
        # preferred order is kept within each class.
        top = bow_cosine(caption, render_claim(pos))
        lex = lambda c: (lambda d: 0 if abs(d) < 1e-9 else (1 if d < 0 else 2))(
            bow_cosine(caption, render_claim(c)) - top)
        absent = sorted(absent, key=lambda c: (1, 0, 2)[lex(c)])
        lower, higher = [c for c in rest if lex(c) == 1], [c for c in rest if lex(c) == 2]
        mixed = [c for pair in itertools.zip_longest(lower, higher) for c in pair if c is not None]
        rest = [c for c in rest if lex(c) == 0] + mixed
    n_absent = ABSENT_NEGATIVES if stype in ABSENT_TYPES else ABSENT_NEGATIVES_BINDING
    texts = {render_claim(pos)}
    negatives = []

    def take(pool, limit):
        for cand in pool:
            if len(negatives) >= limit:
                return
            text = render_claim(cand)
            if text in texts or evaluate_claim(cand, scene):
                continue
            texts.add(text)
            negatives.append(cand)

    take(absent, min(n_absent, n_negatives))
    take(rest, n_negatives)
    take(absent, n_negatives)       # too few re-bindings: more substitutions
    if len(negatives) == n_negatives:
        return {"question": QUESTIONS[stype], "correct": pos, "incorrect": negatives}
    return None


def make_statements(scene, rng, types=None, caption=None):
    """make_statement for each of `types` (default: all that apply); None if any of them fails."""
    types = types or [t for t in STATEMENT_TYPES if scene["kind"] == "video" or t not in VIDEO_ONLY_TYPES]
    out = {}
    for t in types:
        s = make_statement(scene, t, rng, caption=caption)
        if s is None:
            return None
        out[t] = s
    return out


#################################################################################
#                                    VQA                                        #
#################################################################################

def _qa_pairs(scene, rng):
    """Candidate (question, answer, perspective) triples over the TED perspectives."""
    objs, kind = scene["objects"], scene["kind"]
    noun = "image" if kind == "image" else "video"
    qa = []
    for o in objs:
        r = unique_ref(o, scene, ("shape", "size"))
        if r:
            qa.append((f"What colour is {np_phrase(r)}?", f"It is {o['colour']}.", "colour"))
        r = unique_ref(o, scene)
        if not r:
            continue
        if kind == "image":
            qa.append((f"Where is {np_phrase(r)}?", capital(f"in {cell_phrase(o['cell'])}."), "position"))
        else:
            qa.append((f"Where does {np_phrase(r)} start?", f"It starts in {cell_phrase(o['cell'])}.", "position"))
        qa.append((f"Is {np_phrase(r)} large or small?", f"It is {o['size']}.", "size"))
        if o.get("word"):
            qa.append((f"What word is written on {np_phrase(r)}?", f'The word "{o["word"]}".', "ocr"))
        if kind == "video":
            if o["direction"] == "none":
                qa.append((f"How does {np_phrase(r)} move?", "It stays still.", "motion"))
            else:
                qa.append((f"In which direction does {np_phrase(r)} move?", capital(DIR_PHRASES[o['direction']]) + ".", "motion"))
                qa.append((f"How fast does {np_phrase(r)} move, slowly or quickly?", capital(SPEED_WORDS[o['speed']]) + ".", "speed"))
            evs = [e for e in EVENTS if event_frame(o, e) is not None]
            answer = f"It {join_and([EVENT_PHRASES[e] for e in evs])}." if evs else \
                "Nothing special: it stays on screen the whole time."
            qa.append((f"What happens to {np_phrase(r)}?", answer, "event"))
    for s in SHAPES:
        k = len(resolve({"shape": s}, scene))
        qa.append((f"How many {s}s are there in the {noun}?", capital(f"{NUMBER_WORDS[k]}.") if k else "None.", "count"))
    qa.append((f"How many objects are there in the {noun}?", capital(f"{NUMBER_WORDS[len(objs)]}."), "count"))
    refs = [(o, unique_ref(o, scene)) for o in objs]
    refs = [(o, r) for o, r in refs if r]
    for (a, ra), (b, rb) in itertools.permutations(refs, 2):
        rel = rng.choice(list(REL_PHRASES))
        ok = relation_holds(rel, a["cell"], b["cell"])
        verb = "Is" if kind == "image" else "Does"
        tail = "" if kind == "image" else " start out"
        q = f"{verb} {np_phrase(ra)}{tail} {REL_PHRASES[rel]} {np_phrase(rb)}?"
        qa.append((q, "Yes." if ok else "No.", "spatial"))
    if kind == "video":
        evs = _scene_events(scene)
        for (f1, i1, e1), (f2, i2, e2) in itertools.combinations(evs, 2):
            r1, r2 = unique_ref(objs[i1], scene), unique_ref(objs[i2], scene)
            if r1 and r2 and f1 != f2 and i1 != i2:
                a, b = (f"{np_phrase(r1)} {EVENT_PHRASES[e1]}", f"{np_phrase(r2)} {EVENT_PHRASES[e2]}")
                qa.append((f"Which happens earlier: {a}, or {b}?", capital(a if f1 < f2 else b) + ".", "temporal"))
    return qa


def write_vqa(scene, rng, captions=None):
    """Chat messages about the scene: either a describe prompt or a few question/answer turns.

    Each assistant turn carries a "perspective" key: colour, position, size, ocr, motion, speed,
    event, count, spatial, temporal or describe.
    """
    noun = "image" if scene["kind"] == "image" else "video"
    if rng.random() < 0.3:
        caption = (captions or write_captions(scene, rng))[0]
        prompt = rng.choice([f"Describe this {noun} in detail.", f"Write a detailed caption for this {noun}.",
                             f"What is shown in this {noun}? Be thorough."])
        return [{"role": "user", "content": prompt},
                {"role": "assistant", "content": caption, "perspective": "describe"}]
    qa = _qa_pairs(scene, rng)
    turns = rng.sample(qa, min(len(qa), rng.randint(1, 3)))
    msgs = []
    for q, a, persp in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a, "perspective": persp}]
    return msgs


#################################################################################
#                                  The checker                                  #
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
    h, w = labels.shape
    seen = np.zeros((h, w), bool)
    comps = []
    ys_all, xs_all = np.nonzero(labels)
    for y0, x0 in zip(ys_all.tolist(), xs_all.tolist()):
        if seen[y0, x0]:
            continue
        lab = labels[y0, x0]
        stack, ys, xs = [(y0, x0)], [], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and labels[ny, nx] == lab:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append((int(lab), ys, xs))
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


def _match(expected, found):
    """Best assignment of expected objects [(colour, x, y)] to found ones (index or None)."""
    best, best_cost = None, float("inf")
    found = found[:6]
    options = list(range(len(found))) + [None] * len(expected)
    for combo in itertools.permutations(options, len(expected)):
        cost = 0.0
        for (colour, x, y), j in zip(expected, combo):
            if j is None:
                cost += 100.0
            else:
                f = found[j]
                cost += (0 if f["colour"] == colour else 60.0) + math.hypot(f["cx"] - x, f["cy"] - y)
        if cost < best_cost:
            best, best_cost = combo, cost
    return list(best) if best is not None else [None] * len(expected)


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
#                                 Text corpus                                   #
#################################################################################

def text_corpus(n, seed=0):
    """`n` strings of world text (captions, statements, prompts, VQA turns) for training tokenizers."""
    rng = random.Random(seed)
    out = []
    i = 0
    while len(out) < n:
        scene = sample_scene(rng, "video" if i % 2 else "image")
        i += 1
        caps = write_captions(scene, rng)
        out += caps
        out.append(write_prompt(scene))
        for m in write_vqa(scene, rng, caps):
            out.append(m["content"])
        for t in STATEMENT_TYPES:
            if scene["kind"] == "image" and t in VIDEO_ONLY_TYPES:
                continue
            s = make_statement(scene, t, rng)
            if s:
                out.append(render_claim(s["correct"]))
                out += [render_claim(c) for c in s["incorrect"]]
    return out[:n]


#################################################################################
#                           Bag-of-words baseline                               #
#################################################################################

def bow_tokens(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def bow_cosine(a, b):
    """Cosine between word-count vectors of two texts."""
    ca, cb = {}, {}
    for w in bow_tokens(a):
        ca[w] = ca.get(w, 0) + 1
    for w in bow_tokens(b):
        cb[w] = cb.get(w, 0) + 1
    dot = sum(v * cb.get(k, 0) for k, v in ca.items())
    na, nb = math.sqrt(sum(v * v for v in ca.values())), math.sqrt(sum(v * v for v in cb.values()))
    return dot / (na * nb) if na and nb else 0.0


def bow_score(caption, positive, negatives):
    """Expected accuracy of the bag-of-words scorer on one instance, ties broken at random."""
    scores = [bow_cosine(caption, s) for s in [positive] + list(negatives)]
    top = max(scores)
    tied = [i for i, s in enumerate(scores) if abs(s - top) < 1e-12]
    return (1.0 / len(tied)) if 0 in tied else 0.0
