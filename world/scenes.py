"""The built-in world's scenes and everything derived from them that is not a TED claim.

A scene is a plain JSON-able dict: a few coloured shapes on a black 32x32 canvas (a still image) or
an 8-frame 32x32 clip in which objects move (left/right/up/down, slowly or quickly), enter late,
stop, turn around or disappear. From the dict alone: renders (`render_image` / `render_video`, and
`VIEW_SCALE`x larger ones where words are legible), PNG/GIF media, two independently worded
captions (`write_captions`), a short generation prompt (`write_prompt`) and VQA turns
(`write_vqa`). Used by 01 (training splits), 06 (renders) and, for its phrases, `world.claims`.

    import random
    from world import scenes
    rng = random.Random(0)
    scene = scenes.sample_scene(rng, "video")
    frames = scenes.render_video(scene)                # uint8 [8, 32, 32, 3]
    print(scenes.write_captions(scene, rng)[0])

Only numpy and pillow are needed.
"""
import io
import itertools
import json

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#################################################################################
#                              Constants and knobs                              #
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

# Knobs for the training scenes (the benchmark's are in world.claims).
OBJECT_COUNT_WEIGHTS = {1: 1, 2: 3, 3: 4, 4: 3}     # objects per training scene
WORD_PROB = 0.15         # chance that an object carries a word (training scenes)
EVENT_PROB = 0.6         # chance that a video object has an event (stops / turns around / disappears)
LATE_ENTRY_PROB = 0.35   # chance that a video object enters after the first frame

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
    """Inclusive pixel bounding box (x0, y0, x1, y1) of an object at frame t."""
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
                carriers[1]["word"] = mutate_word(carriers[0]["word"], rng)
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


def mutate_word(word, rng):
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
    """Pillow's default font at `size` (cached)."""
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


def capital(s):
    """The string with its first letter upper-cased."""
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


def relation_holds(rel, a_cell, b_cell):
    """Grid relation between two cells (rows grow downward)."""
    return {"left": a_cell[1] < b_cell[1], "right": a_cell[1] > b_cell[1],
            "above": a_cell[0] < b_cell[0], "below": a_cell[0] > b_cell[0]}[rel]


#################################################################################
#                               Captions and prompts                            #
#################################################################################

TIME_PHRASES = {1: "just after the start", 2: "early on", 3: "a little later", 4: "midway through",
                5: "later", 6: "near the end", 7: "at the very end"}


def scene_events(scene):
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
    """One caption of an image scene in style 0 (grid order) or 1 (shape order, other words)."""
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
    """One caption of a video scene in style 0 (chronological) or 1 (object by object)."""
    objs = scene["objects"]
    size_words = {"large": "large", "small": "small"} if style == 0 else {"large": "big", "small": "little"}
    n = NUMBER_WORDS[len(objs)]
    noun = "object" if len(objs) == 1 else "objects"
    events = scene_events(scene)
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


def write_caption(scene, style, rng):
    """One caption of the scene in a chosen style (0 or 1); the same rng state gives the same wording."""
    return (_caption_image if scene["kind"] == "image" else _caption_video)(scene, rng, style)


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
        evs = scene_events(scene)
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
