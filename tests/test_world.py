"""The built-in world: statements are true/false on their scenes, negatives do not leak through word
choice, the checker reads the world's own renders back, renders and media are exact, all deterministic."""
import collections
import importlib
import json
import random

import numpy as np
import pytest

from world import checker, claims, scenes

build = importlib.import_module("01_build_ted6k")


@pytest.fixture
def ted(world_benchmark):
    return world_benchmark


#################################################################################
#                       Statements: truth and hardness                          #
#################################################################################

def _walk_truth(bench, side):
    """Re-evaluate every stored claim on its scene; return the number of instances."""
    n = 0
    for key, rec in bench.items():
        scene = side[key]["scene"]
        for stype, info in rec["statements"].items():
            if info["correct_statement"]["status"] != "success":
                assert stype not in side[key]["claims"]
                continue
            stored = side[key]["claims"][stype]
            # The stored text is exactly the rendering of the stored claim ...
            assert claims.render_claim(stored["correct"]) == info["correct_statement"]["statement"]
            assert [claims.render_claim(c) for c in stored["incorrect"]] == \
                [o["statement"] for o in info["incorrect_statements"]]
            # ... and the claim, evaluated on the scene, is true for the positive, false for each negative.
            assert claims.evaluate_claim(stored["correct"], scene), (key, stype)
            for c in stored["incorrect"]:
                assert not claims.evaluate_claim(c, scene), (key, stype, claims.render_claim(c))
            texts = [info["correct_statement"]["statement"]] + [o["statement"] for o in info["incorrect_statements"]]
            assert len(set(texts)) == 4
            n += 1
    return n


def test_every_statement_evaluates_right_on_its_scene(ted):
    assert _walk_truth(*ted) == 6641


def test_difficulty_knobs(monkeypatch, ted):
    """One fact per statement and negatives drawn from any minimal edit: still exact and true/false."""
    monkeypatch.setattr(claims, "MAX_FACTS", 1)
    monkeypatch.setattr(claims, "NEGATIVE_STYLE", "any")
    bench, side = build.build_world_benchmark(seed=3, fraction=0.1)
    counts = build.count_cells(bench)
    assert counts[("Adjective", "video")] == 76 and counts[("Temporal", "image")] == 0
    assert _walk_truth(bench, side) == sum(counts.values())

    def words(b):
        return np.mean([len(i["correct_statement"]["statement"].split()) for r in b.values()
                        for i in r["statements"].values() if i["correct_statement"]["status"] == "success"])
    assert words(bench) < words(ted[0]) - 1


def test_evaluation_reads_the_scene_not_the_words():
    """Change the scene under a fixed claim and its truth changes with it."""
    scene = {"kind": "image", "objects": [
        {"shape": "circle", "colour": "red", "size": "large", "cell": [0, 0], "word": "CAT"},
        {"shape": "square", "colour": "blue", "size": "small", "cell": [2, 2], "word": None}]}
    left = {"type": "Spatial Relationship", "kind": "image", "form": 0,
            "subject": {"shape": "circle"}, "relations": [["left", {"shape": "square"}]]}
    adj = {"type": "Adjective", "kind": "image", "form": 0,
           "facts": [{"ref": {"shape": "circle"}, "colour": "red"}, {"ref": {"shape": "square"}, "colour": "blue"}]}
    ocr = {"type": "OCR", "kind": "image", "form": 0, "ref": {"shape": "circle"}, "word": "CAT"}
    qty = {"type": "Quantity", "kind": "image", "form": 0, "facts": [{"what": {"shape": "circle"}, "n": 1}]}
    for claim in (left, adj, ocr, qty):
        assert claims.evaluate_claim(claim, scene)
    swapped = json.loads(json.dumps(scene))
    swapped["objects"][0]["cell"], swapped["objects"][1]["cell"] = [2, 2], [0, 0]
    swapped["objects"][0]["colour"], swapped["objects"][1]["colour"] = "blue", "red"
    swapped["objects"][0]["word"] = "CAR"
    swapped["objects"][1]["shape"] = "circle"
    for claim in (left, adj, ocr, qty):
        assert not claims.evaluate_claim(claim, swapped), claims.render_claim(claim)


def _bow_by_type(bench, ties_lose=False):
    """Bag-of-words accuracy per type: ties broken at random, or (ties_lose) counted as losses."""
    acc = collections.defaultdict(list)
    for rec in bench.values():
        for stype, info in rec["statements"].items():
            if info["correct_statement"]["status"] == "success":
                pos, negs = info["correct_statement"]["statement"], [o["statement"] for o in info["incorrect_statements"]]
                if ties_lose:
                    top = max(claims.bow_cosine(rec["caption"], n) for n in negs)
                    acc[stype].append(claims.bow_cosine(rec["caption"], pos) > top + 1e-9)
                else:   # the expected accuracy when ties are broken at random
                    scores = [claims.bow_cosine(rec["caption"], s) for s in [pos] + negs]
                    tied = [i for i, s in enumerate(scores) if abs(s - max(scores)) < 1e-12]
                    acc[stype].append(1.0 / len(tied) if 0 in tied else 0.0)
    return {t: float(np.mean(v)) for t, v in acc.items()}


BINDING_TYPES = ("Adjective", "Spatial Relationship", "Temporal", "Coreference")


def test_bag_of_words_ties_on_binding_types_and_wins_elsewhere(ted):
    """Binding types: two negatives re-bind the caption's own words (a word-count scorer ties them with
    the positive, so it never wins outright) and ABSENT_NEGATIVES_BINDING=1 brings in an absent value.
    The other types' negatives all bring in a value the scene lacks, like the real TED negatives: there
    reading the words is enough, which is what separates the encoders of 02's zoo (issue 3)."""
    acc, strict = _bow_by_type(ted[0]), _bow_by_type(ted[0], ties_lose=True)
    print({t: (round(100 * a, 1), round(100 * strict[t], 1)) for t, a in acc.items()})
    for t in BINDING_TYPES:
        assert acc[t] <= 0.5 and strict[t] <= 0.1, (t, acc[t], strict[t])
    for t in claims.ABSENT_TYPES:
        assert acc[t] >= 0.6, (t, acc[t])


def test_caption_words_never_systematically_favour_a_negative(ted):
    """A negative that matches the caption's words better than the positive is a wording artefact;
    on no type may that happen in many questions while the positive rarely wins."""
    diffs = collections.defaultdict(list)
    for rec in ted[0].values():
        for stype, info in rec["statements"].items():
            if info["correct_statement"]["status"] == "success":
                p = claims.bow_cosine(rec["caption"], info["correct_statement"]["statement"])
                n = max(claims.bow_cosine(rec["caption"], o["statement"]) for o in info["incorrect_statements"])
                diffs[stype].append(0 if abs(p - n) < 1e-9 else (1 if p > n else -1))
    for t, d in diffs.items():
        assert np.mean([x < 0 for x in d]) <= 0.25, t
        if t in claims.ABSENT_TYPES:
            assert np.mean([x < 0 for x in d]) < np.mean([x > 0 for x in d]), t


def _bigram_preference(rng):
    """A random preference over word bigrams (sentence ends included): blind to binding by construction."""
    weights = {}

    def score(text):
        ws = ["<s>"] + claims.bow_tokens(text) + ["</s>"]
        return sum(weights.setdefault(b, rng.gauss(0, 1)) for b in zip(ws, ws[1:]))
    return score


def _levenshtein(a, b):
    """Word edit distance."""
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def _binding_blind_scores(bench, types, draws=20):
    """Per type: accuracy of (a) bag of words with ties broken by a random bigram preference (fresh per
    question, averaged over `draws`), (b) its chance: the same with ties broken uniformly, (c) a scorer
    that never reads the caption and picks the medoid option (least word edits to the others); and n."""
    out = collections.defaultdict(lambda: [[], [], []])
    for key, rec in bench.items():
        for stype in types:
            info = rec["statements"][stype]
            if info["correct_statement"]["status"] != "success":
                continue
            opts = [info["correct_statement"]["statement"]] + [o["statement"] for o in info["incorrect_statements"]]
            bow = [claims.bow_cosine(rec["caption"], o) for o in opts]
            tied = [i for i, s in enumerate(bow) if abs(s - max(bow)) < 1e-9]
            wins = 0.0
            if 0 in tied:
                for r in range(draws):
                    pref = _bigram_preference(random.Random(f"{key}-{stype}-{r}"))
                    s = [pref(opts[i]) for i in tied]
                    wins += (s[0] == max(s)) / s.count(max(s)) / draws
            words = [claims.bow_tokens(o) for o in opts]
            spread = [sum(_levenshtein(w, v) for v in words) for w in words]
            central = [i for i, s in enumerate(spread) if s == min(spread)]
            acc = out[stype]
            acc[0].append(wins)
            acc[1].append(1 / len(tied) if 0 in tied else 0.0)
            acc[2].append(1 / len(central) if 0 in central else 0.0)
    return {t: (*(float(np.mean(v)) for v in vs), len(vs[0])) for t, vs in out.items()}


def test_binding_blind_scorers_sit_at_chance(ted):
    """Issue 13: on the binding types an encoder blind to binding scored below chance, because each
    question's two same-word negatives were the two paraphrases of one false re-binding ("the square
    is to the right of the triangle" / "the triangle is to the left of the square"): every swap flips
    the truth, so the positive was always one swap from each negative and they two swaps apart, with
    the substitution one more edit of the positive. Any preference about the words' order that knows
    nothing of the scene then favours a negative, and a scorer that never reads the caption found the
    positive as the option in the middle (100% on Coreference and Spatial Relationship).

    Two scorers blind to binding: bag of words whose ties go to a random bigram preference must score
    what uniform tie-breaking scores (its chance: ~1/3, the substitution matches the caption less),
    and the caption-free medoid must not beat that chance. Tolerance: 2 binomial standard errors of
    the n questions, sqrt(p (1 - p) / n) with p the chance (1.7-2.0 points for n = 608-1021); that
    bounds the noise from above, as each question's win rate is averaged over 20 preference draws.
    The old construction: 5.0 (Spatial Relationship), 5.3 (Temporal) and 8.2 (Coreference) points
    below with the bigram preference; 26-67 points above with the medoid.
    """
    scores = _binding_blind_scores(ted[0], BINDING_TYPES)
    print({t: tuple(round(100 * x, 1) for x in v[:3]) + (v[3],) for t, v in scores.items()})
    for t, (blind, chance, medoid, n) in scores.items():
        se = np.sqrt(chance * (1 - chance) / n)
        assert 0.25 <= chance <= 0.5, (t, chance)
        assert abs(blind - chance) <= 2 * se, (t, blind, chance, se)
        assert medoid <= chance + 2 * se, (t, medoid, chance, se)


def test_absent_negative_knobs(monkeypatch):
    """ABSENT_NEGATIVES=0 brings the lexical cue back down; ABSENT_NEGATIVES_BINDING>0 raises it on
    the binding types. Every statement stays true / false on its scene."""
    base, _ = build.build_world_benchmark(seed=4, fraction=0.1)
    monkeypatch.setattr(claims, "ABSENT_NEGATIVES", 0)
    monkeypatch.setattr(claims, "ABSENT_NEGATIVES_BINDING", 3)
    bench, side = build.build_world_benchmark(seed=4, fraction=0.1)
    assert _walk_truth(bench, side) == sum(build.count_cells(bench).values())
    a, b = _bow_by_type(base), _bow_by_type(bench)
    for t in ("Quantity", "OCR", "Action Recognition"):
        assert b[t] < a[t] - 0.1, (t, a[t], b[t])
    for t in ("Adjective", "Spatial Relationship", "Coreference"):
        assert b[t] > a[t] + 0.1, (t, a[t], b[t])


def test_bag_of_words_cosine_itself_works():
    """The word-count cosine is not broken: it prefers the text whose words are in the caption, and
    is blind to word order (a re-binding ties with the positive)."""
    cap = "A red circle sits in the top left corner."
    top = claims.bow_cosine(cap, "The red circle is top left.")
    assert top > max(claims.bow_cosine(cap, n) for n in ["A green star.", "Blue boxes.", "Purple."])
    assert claims.bow_cosine(cap, "green star") < claims.bow_cosine(cap, "red circle")
    assert claims.bow_cosine(cap, "red circle") == claims.bow_cosine(cap, "circle red") > 0
    assert claims.bow_cosine(cap, "") == 0.0


def test_negatives_are_minimal_edits(ted):
    """Each negative is the positive with bindings swapped or one detail changed: their word
    multisets differ by at most a phrase (e.g. "in the top-right corner" for "in the centre")."""
    bench, _ = ted
    same_words = 0
    for rec in bench.values():
        for info in rec["statements"].values():
            if info["correct_statement"]["status"] != "success":
                continue
            pos = collections.Counter(claims.bow_tokens(info["correct_statement"]["statement"]))
            for o in info["incorrect_statements"]:
                neg = collections.Counter(claims.bow_tokens(o["statement"]))
                diff = sum(((pos - neg) + (neg - pos)).values())
                assert diff <= 8, (info["correct_statement"]["statement"], o["statement"])
                same_words += diff == 0
    # Most binding-type negatives that are not the substitution re-bind exactly the same words.
    n_binding = sum(build.count_cells(bench)[(t, k)] for t in BINDING_TYPES for k in ("image", "video"))
    assert same_words >= n_binding * (3 - claims.ABSENT_NEGATIVES_BINDING) * 0.6


def test_make_statements_covers_all_types_and_is_deterministic():
    def run(seed):
        rng = random.Random(seed)
        out = []
        for kind in ("image", "video"):
            for _ in range(30):
                scene = scenes.sample_scene(rng, kind)
                for t in claims.STATEMENT_TYPES:
                    s = claims.make_statement(scene, t, rng)
                    if s is not None:
                        out.append((t, kind, claims.render_claim(s["correct"])))
        return out
    a, b = run(5), run(5)
    assert a == b and a != run(6)
    made = {(t, k) for t, k, _ in a}
    for t in claims.STATEMENT_TYPES:
        assert (t, "video") in made, t
        if t not in claims.VIDEO_ONLY_TYPES:
            assert (t, "image") in made, t
    assert not any(k == "image" and t in claims.VIDEO_ONLY_TYPES for t, k, _ in a)


#################################################################################
#                         Scenes, captions, prompts, VQA                        #
#################################################################################

def test_scenes_are_plain_json_and_valid():
    rng = random.Random(0)
    for i in range(200):
        kind = "video" if i % 2 else "image"
        scene = scenes.sample_scene(rng, kind)
        assert json.loads(json.dumps(scene)) == scene
        objs = scene["objects"]
        assert 1 <= len(objs) <= 4
        assert len({tuple(o["cell"]) for o in objs}) == len(objs)
        for o in objs:
            assert o["colour"] in scenes.PALETTE and o["shape"] in scenes.SHAPES and o["size"] in scenes.SIZES
            if kind == "video":
                assert o["direction"] in scenes.DIRECTIONS
                assert (o["speed"] is None) == (o["direction"] == "none")
                t0, t1 = scenes.first_segment(o)
                assert t1 - t0 >= 3      # direction and speed are readable from pixels


def test_captions_are_two_detailed_independent_phrasings():
    rng = random.Random(1)
    for i in range(100):
        scene = scenes.sample_scene(rng, "video" if i % 2 else "image")
        caps = scenes.write_captions(scene, rng)
        assert len(caps) >= 2 and caps[0] != caps[1]
        for c in caps:
            assert (15 if len(scene["objects"]) == 1 else 30) <= len(c.split()) <= 170, c
            for o in scene["objects"]:
                assert o["colour"] in c and o["shape"] in c
                if o["word"]:
                    assert f'"{o["word"]}"' in c
        # Different templates, not the same sentence with one word changed.
        a, b = (set(claims.bow_tokens(c)) for c in caps)
        assert len(a ^ b) >= 5
        prompt = scenes.write_prompt(scene)
        assert len(prompt.split()) < len(caps[0].split())


PERSPECTIVES = ("colour", "position", "size", "ocr", "motion", "speed", "event", "count", "spatial",
                "temporal", "describe")


def test_vqa_messages():
    rng = random.Random(2)
    kinds, persps = collections.Counter(), collections.Counter()
    for i in range(100):
        scene = scenes.sample_scene(rng, "video" if i % 2 else "image")
        msgs = scenes.write_vqa(scene, rng)
        assert len(msgs) >= 2 and len(msgs) % 2 == 0
        for j, m in enumerate(msgs):
            assert m["role"] == ("user" if j % 2 == 0 else "assistant")
            assert isinstance(m["content"], str) and m["content"]
            if m["role"] == "assistant":
                assert m["perspective"] in PERSPECTIVES, m
                persps[m["perspective"]] += 1
        kinds["describe" if "detail" in msgs[0]["content"] or "thorough" in msgs[0]["content"] else "qa"] += 1
    assert kinds["describe"] > 10 and kinds["qa"] > 40
    assert set(persps) >= set(PERSPECTIVES) - {"ocr", "temporal"}


def test_vqa_answers_follow_the_scene():
    scene = {"kind": "video", "objects": [
        {"shape": "circle", "colour": "red", "size": "large", "cell": [1, 1], "word": None,
         "direction": "left", "speed": "fast", "enter": 0, "event": "stops", "event_frame": 4},
        {"shape": "square", "colour": "blue", "size": "small", "cell": [0, 2], "word": "GO",
         "direction": "none", "speed": None, "enter": 2, "event": None, "event_frame": None}]}
    triples = scenes._qa_pairs(scene, random.Random(0))
    qa = {q: a for q, a, _ in triples}
    persp = {q: p for q, _, p in triples}
    assert qa["What colour is the circle?"] == "It is red." and persp["What colour is the circle?"] == "colour"
    assert qa["In which direction does the circle move?"] == "Leftward."
    assert persp["How fast does the circle move, slowly or quickly?"] == "speed"
    assert persp["Which happens earlier: the square appears, or the circle stops?"] == "temporal"
    assert persp["How many objects are there in the video?"] == "count"
    assert qa["How fast does the circle move, slowly or quickly?"] == "Quickly."
    assert qa['What word is written on the square?'] == 'The word "GO".'
    assert qa["How many objects are there in the video?"] == "Two."
    assert qa["Which happens earlier: the square appears, or the circle stops?"] == "The square appears."


def test_text_corpus():
    # ~40 strings a scene: 600 holds about seven clips, enough for a two-event Temporal statement
    a = claims.text_corpus(600, seed=0)
    assert len(a) == 600 and all(isinstance(s, str) and s for s in a)
    assert a == claims.text_corpus(600, seed=0) and a != claims.text_corpus(600, seed=1)
    joined = " ".join(a)
    for w in ("circle", "left", "quickly", "before", "word", "How", "detail"):
        assert w in joined, w


#################################################################################
#                                 Rendering                                     #
#################################################################################

def test_render_shapes_and_sizes():
    for shape, lo, hi in (("square", 0.99, 1.0), ("circle", 0.75, 0.9), ("triangle", 0.45, 0.6)):
        for size, side in scenes.SIZES.items():
            scene = {"kind": "image", "objects": [{"shape": shape, "colour": "green", "size": size,
                                                    "cell": [1, 1], "word": None}]}
            img = scenes.render_image(scene)
            assert img.shape == (32, 32, 3) and img.dtype == np.uint8
            ys, xs = np.nonzero(img.any(-1))
            assert ys.max() - ys.min() + 1 == side and xs.max() - xs.min() + 1 == side
            fill = len(ys) / side ** 2
            assert lo <= fill <= hi, (shape, size, fill)
            assert (img[ys, xs] == scenes.PALETTE["green"]).all()


def test_render_video_motion_in_pixels():
    scene = {"kind": "video", "objects": [
        {"shape": "square", "colour": "red", "size": "small", "cell": [1, 0], "word": None,
         "direction": "right", "speed": "fast", "enter": 0, "event": "stops", "event_frame": 5},
        {"shape": "circle", "colour": "cyan", "size": "small", "cell": [2, 2], "word": None,
         "direction": "up", "speed": "slow", "enter": 2, "event": "disappears", "event_frame": 7}]}
    vid = scenes.render_video(scene)
    assert vid.shape == (8, 32, 32, 3)
    xs = [np.nonzero((f == scenes.PALETTE["red"]).all(-1))[1].mean() for f in vid]
    assert np.allclose(np.diff(xs), [2, 2, 2, 2, 2, 0, 0])        # fast = 2 px/frame, then stops
    cyan = [(f == scenes.PALETTE["cyan"]).all(-1) for f in vid]
    assert [m.any() for m in cyan] == [False, False, True, True, True, True, True, False]
    ys = [np.nonzero(m)[0].mean() for m in cyan if m.any()]
    assert np.allclose(np.diff(ys), -1)                            # slow = 1 px/frame upward


def test_words_only_drawn_at_viewing_size():
    obj = {"shape": "square", "colour": "yellow", "size": "large", "cell": [1, 1], "word": None}
    plain = {"kind": "image", "objects": [obj]}
    worded = {"kind": "image", "objects": [dict(obj, word="SALE")]}
    assert (scenes.render_image(plain) == scenes.render_image(worded)).all()
    big_plain, big_worded = scenes.render_image(plain, scenes.VIEW_SCALE), scenes.render_image(worded, scenes.VIEW_SCALE)
    assert big_plain.shape == (256, 256, 3)
    diff = (big_plain != big_worded).any(-1)
    assert diff.sum() > 100                                         # the text is there ...
    ys, xs = np.nonzero(diff)
    assert 88 <= xs.min() and xs.max() < 168 and 88 <= ys.min() and ys.max() < 168   # ... inside the square


def test_media_roundtrip_exact(tmp_path):
    rng = random.Random(4)
    for kind in ("image", "video"):
        scene = scenes.sample_scene(rng, kind, n_objects=4)
        data, ext = scenes.encode_media(scene)
        p = tmp_path / f"m.{ext}"
        p.write_bytes(data)
        assert (scenes.load_media(p) == scenes.render(scene)).all()
        assert scenes.encode_media(scene)[0] == data       # byte-identical
    # A clip where nothing moves keeps all its frames (GIF writers merge identical frames).
    still = {"kind": "video", "objects": [{"shape": "circle", "colour": "white", "size": "small", "cell": [0, 0],
                                           "word": None, "direction": "none", "speed": None, "enter": 0,
                                           "event": None, "event_frame": None}]}
    (tmp_path / "still.gif").write_bytes(scenes.encode_media(still)[0])
    frames = scenes.load_media(tmp_path / "still.gif")
    assert frames.shape == (8, 32, 32, 3) and (frames == scenes.render_video(still)).all()


#################################################################################
#                                  The checker                                  #
#################################################################################

def test_checker_recovers_own_renders():
    """>= 99% of objects: colour, shape, size, cell; counts exact; motion and speed on videos."""
    rng = random.Random(10)
    per_obj = collections.Counter()
    n_obj = 0
    for i in range(300):
        kind = "video" if i % 2 else "image"
        scene = scenes.sample_scene(rng, kind)
        px = scenes.render(scene)
        scores = checker.check_sample(px, scene)
        assert scores["count"] == 1.0, scene
        for k in ("colour", "position", "shape") + (("motion",) if kind == "video" else ()):
            per_obj[k] += scores[k] * len(scene["objects"])
        if kind == "image":
            assert scores["motion"] is None and scores["speed"] is None
            read = checker.read_objects(px)
            for o in scene["objects"]:
                match = [r for r in read if r["cell"] == o["cell"]]
                per_obj["size"] += len(match) == 1 and match[0]["size"] == o["size"]
        n_obj += len(scene["objects"])
    for k in ("colour", "position", "shape"):
        assert per_obj[k] / n_obj >= 0.99, (k, per_obj[k] / n_obj)
    assert per_obj["motion"] > 0


def test_checker_motion_and_speed_on_videos():
    rng = random.Random(11)
    motion, speed = [], []
    for _ in range(150):
        scene = scenes.sample_scene(rng, "video")
        s = checker.check_sample(scenes.render_video(scene), scene)
        motion.append(s["motion"])
        if s["speed"] is not None:
            speed.append(s["speed"])
    assert np.mean(motion) >= 0.99 and np.mean(speed) >= 0.99


def test_checker_is_robust_to_noise():
    rng, nrng = random.Random(12), np.random.default_rng(0)
    scores = collections.defaultdict(list)
    for i in range(100):
        scene = scenes.sample_scene(rng, "video" if i % 2 else "image")
        px = scenes.render(scene).astype(float)
        px = np.clip(px + nrng.normal(0, 25, px.shape), 0, 255).astype(np.uint8)
        for k, v in checker.check_sample(px, scene).items():
            if v is not None:
                scores[k].append(v)
    for k, v in scores.items():
        assert np.mean(v) >= 0.97, (k, np.mean(v))


def test_checker_catches_each_kind_of_mistake():
    scene = {"kind": "video", "objects": [
        {"shape": "circle", "colour": "red", "size": "large", "cell": [1, 1], "word": None,
         "direction": "left", "speed": "slow", "enter": 0, "event": None, "event_frame": None},
        {"shape": "triangle", "colour": "green", "size": "large", "cell": [2, 2], "word": None,
         "direction": "up", "speed": "fast", "enter": 0, "event": None, "event_frame": None}]}
    ok = checker.check_sample(scenes.render_video(scene), scene)
    assert all(v == 1.0 for v in ok.values()), ok

    def wrong(i=0, **change):
        other = json.loads(json.dumps(scene))
        other["objects"][i].update(change)
        return checker.check_sample(scenes.render_video(other), scene)
    assert wrong(colour="blue")["colour"] == 0.5
    assert wrong(shape="square")["shape"] == 0.5
    assert wrong(cell=[0, 1])["position"] == 0.5
    assert wrong(direction="right")["motion"] == 0.5
    assert wrong(1, speed="slow")["speed"] == 0.5
    missing = checker.check_sample(scenes.render_video({"kind": "video", "objects": scene["objects"][1:]}), scene)
    assert missing["count"] == 0.0 and missing["colour"] == 0.5
    blank = checker.check_sample(np.zeros((8, 32, 32, 3), np.uint8), scene)
    assert all(v == 0.0 for v in blank.values()), blank
