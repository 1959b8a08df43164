"""TED claims for the built-in world: statements that are true of a scene, and hard negatives.

A claim is a small JSON dict (type, kind, form, references and values); `render_claim` writes it as
an English statement and `evaluate_claim` decides it against the scene, so truth is never decided
by looking at strings. `make_statement` builds, for one of the nine statement types, a true claim
and three minimal edits of it that are false (re-bound words, or a value the scene lacks). Used by
01 (the TED-6K benchmark), by 02 (`bow_tokens`, for its bag-of-words reference) and, through
`text_corpus`, by encoders.py (the world tokenizer).

    import random
    from world import scenes, claims
    rng = random.Random(0)
    scene = scenes.sample_scene(rng, "video")
    s = claims.make_statement(scene, "Temporal", rng)      # None when the scene has no such claim
    if s:
        print(claims.render_claim(s["correct"]), [claims.render_claim(c) for c in s["incorrect"]])
"""
import collections
import functools
import itertools
import json
import math
import random
import re

from .scenes import (COLOURS, DIR_PHRASES, DIRECTIONS, EVENT_PHRASES, EVENTS, NUMBER_WORDS, OPPOSITE,
                     REL_PHRASES, SHAPES, SPEED_WORDS, capital, cell_phrase, event_frame, join_and,
                     mutate_word, np_phrase, relation_holds, resolve, sample_scene, scene_events,
                     unique_ref, write_captions, write_prompt, write_vqa)

#################################################################################
#                         TED types and difficulty knobs                        #
#################################################################################

STATEMENT_TYPES = ["Action Recognition", "Adjective", "Adverb", "Basic Event", "Coreference", "OCR",
                   "Quantity", "Spatial Relationship", "Temporal"]
VIDEO_ONLY_TYPES = ("Action Recognition", "Temporal")

# Difficulty knobs (the probe team may turn these to make TED-6K harder or easier).
# Two objects per benchmark scene: with 2-4 (and the knobs below at 2 / 0) every encoder in 02's zoo,
# and a random aggregator, scored 17-25%, below chance; the 9 types still all apply with two objects.
BENCH_OBJECT_COUNT_WEIGHTS = {2: 1}                 # objects per benchmark scene
MAX_FACTS = 3            # facts joined in one statement (more = more binding to get right)
NEGATIVE_STYLE = "permute"   # "permute": negatives that reuse the positive's words (a swap of bindings;
#                              invisible to bag-of-words), drawn at random from same-word variants of which
#                              exactly one is true (see make_statement); "any": any minimal edit
# How many of the 3 negatives substitute a value ABSENT from the scene (a colour no object has, a count
# no group has, a direction / speed / event no object has, a one-letter misspelling): like the real
# TED negatives, which bring in a contradicting value, these let lexical encoders earn partial credit.
ABSENT_NEGATIVES = 3          # for ABSENT_TYPES (Quantity, Adverb, OCR, Basic Event, Action Recognition)
ABSENT_NEGATIVES_BINDING = 1  # for the binding types (Adjective, Spatial, Temporal, Coreference): the other
#                               two re-bind the caption's own words (bag-of-words ties them with the positive)
ABSENT_TYPES = ("Action Recognition", "Adverb", "Basic Event", "OCR", "Quantity")


#################################################################################
#                              Bag-of-words helpers                             #
#################################################################################
# The negative builders use these to keep caption wording from favouring a negative; 02's
# bag-of-words reference scorer reuses `bow_tokens`.

def bow_tokens(text):
    """Lower-case words and numbers of a text."""
    return re.findall(r"[a-z0-9]+", text.lower())


@functools.lru_cache(maxsize=1 << 16)
def _word_counts(text):
    """(word -> count, the vector's norm) of a text; cached, since one caption meets many claims."""
    counts = collections.Counter(bow_tokens(text))
    return counts, math.sqrt(sum(v * v for v in counts.values()))


def bow_cosine(a, b):
    """Cosine between word-count vectors of two texts."""
    (ca, na), (cb, nb) = sorted((_word_counts(a), _word_counts(b)), key=lambda c: len(c[0]))
    dot = sum(v * cb.get(k, 0) for k, v in ca.items())  # integers: the order of the sum changes nothing
    return dot / (na * nb) if na and nb else 0.0


#################################################################################
#                                 Claim phrases                                 #
#################################################################################
# Phrases only claims use; the ones captions and VQA share with them are in world.scenes.

def _bare_noun(ref, plural):
    """'red circles' / 'large object' (no article)."""
    return np_phrase(ref, plural=True)[:-1] if not plural else np_phrase(ref, plural=True)


def full_ref(obj):
    """A reference naming all three attributes of an object."""
    return {"size": obj["size"], "colour": obj["colour"], "shape": obj["shape"]}


def the(ref):
    """'The red circle' with a capital."""
    s = np_phrase(ref)
    return s[0].upper() + s[1:]


INVERSE_REL = {"left": "right", "right": "left", "above": "below", "below": "above"}


def motion_phrase(direction, speed=None):
    """'moves quickly leftward' / 'stays still'."""
    if direction == "none":
        return "stays still"
    return "moves " + (SPEED_WORDS[speed] + " " if speed else "") + DIR_PHRASES[direction]


def true_relations(a_cell, b_cell):
    """Every grid relation that holds from cell a to cell b."""
    return [r for r in REL_PHRASES if relation_holds(r, a_cell, b_cell)]


#################################################################################
#                  Claims: structured statements, rendered and evaluated        #
#################################################################################
# A claim is a JSON dict {"type": <statement type>, "kind": image|video, "form": k, ...} holding
# references ({shape, colour?, size?}) and values. `evaluate_claim` decides it on a scene;
# `render_claim` writes it as text. A reference that fits no object (or several, where the claim
# needs one) makes the claim false.

def _one(ref, scene):
    """The one object matching `ref`, or None when none or several do."""
    found = resolve(ref, scene)
    return found[0] if len(found) == 1 else None


def _coref_pred_holds(pred, obj, kind):
    """Whether a coreference predicate (size, cell, word, direction or event) holds for `obj`."""
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
        return all(_coref_pred_holds(p, objs[claim["point"]], claim["kind"]) for p in _coref_preds(claim))
    if t == "OCR":
        o = _one(claim["ref"], scene)
        return o is not None and o.get("word") == claim["word"]
    raise ValueError(f"unknown claim type {t}")


def _coref_preds(claim):
    """A coreference claim's predicates (older claims hold one, under "pred")."""
    return claim["preds"] if "preds" in claim else [claim["pred"]]


def _coref_pred_text(pred, kind):
    """A coreference predicate in words ('is large', 'starts in the centre', ...)."""
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
        groups = []     # consecutive relations to one object name it once
        for rel, ref in claim["relations"]:
            if groups and groups[-1][1] == ref:
                groups[-1][0].append(rel)
            else:
                groups.append([[rel], ref])
        rels = [f"{' and '.join(REL_PHRASES[r] for r in rs)} {np_phrase(ref)}" for rs, ref in groups]
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
        preds = " and ".join(_coref_pred_text(p, kind) for p in _coref_preds(claim))
        return f"{verb} {join_and(ms)}; {pointer} {preds}."
    if t == "OCR":
        return (f'The word "{claim["word"]}" is written on {np_phrase(claim["ref"])}.' if form == 0
                else f'{the(claim["ref"])} is labelled "{claim["word"]}".')
    raise ValueError(f"unknown claim type {t}")


#################################################################################
#                   Statement builders: a positive and minimal edits            #
#################################################################################
# Each builder returns (positive claim, same, other, absent) or None when the scene has nothing
# for that type: `same` re-bind the positive's words (swap which object gets which value),
# `other` are other minimal edits with values present in the scene, `absent` substitute a value no
# object has: a list of edits of the positive, or (binding types) a function claim -> such edits of
# any claim. `make_statement` keeps those that evaluate false: ABSENT_NEGATIVES substitutions, the
# rest re-bindings first (NEGATIVE_STYLE="permute").
#
# The binding types' `same` is an orbit: every variant of the positive made by independent swaps
# (which object fills which slot x which value goes with it), all but the positive false. Two swaps
# are needed: with one (two objects, one relation), every swap flips the truth, so among any three
# same-word options the true one is the one an odd number of swaps from both others; a scorer blind
# to binding then finds the positive in the middle of its negatives and below chance (issue 13).

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
    """Up to k of `objs`, drawn at random."""
    return rng.sample(objs, min(k, len(objs)))


def _claim(t, kind, rng, forms=1, **fields):
    """A claim dict of type t with a random surface form out of `forms`."""
    return {"type": t, "kind": kind, "form": rng.randrange(forms), **fields}


def _absent_colours(scene):
    """Palette colours that no object in the scene has."""
    return [c for c in COLOURS if all(o["colour"] != c for o in scene["objects"])]


def _absent_directions(scene, with_none):
    """Directions (and "none" when asked) that no object in the scene moves in."""
    have = {o["direction"] for o in scene["objects"]}
    return [d for d in DIRECTIONS if d not in have and (with_none or d != "none")]


def _absent_refs(ref, scene):
    """References like `ref` with one word substituted so that they fit no object (a shape, else a colour)."""
    shapes = [sh for sh in SHAPES if not resolve({"shape": sh}, scene)]
    out = [dict(ref, shape=sh) for sh in shapes]
    if not out:   # every shape is there: a colour no object has (added when the reference has none)
        out = [dict(ref, colour=c) for c in _absent_colours(scene)]
    return out


def _orbit(pos, swaps):
    """Every claim made from `pos` by one choice per swap (a list of functions claim -> variants
    including the claim itself), deduplicated, the positive left out."""
    out, seen = [], {json.dumps(pos, sort_keys=True)}
    level = [pos]
    for swap in swaps:
        level = [v for c in level for v in swap(c)]
    for c in level:
        key = json.dumps(c, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _b_adjective(scene, rng):
    """Adjective: the colours (and sizes) of objects named by shape."""
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
    def absent(c):
        """A colour no object has, for one fact of `c`."""
        return [{**c, "facts": [dict(g, colour=col) if j == i else g for j, g in enumerate(c["facts"])]}
                for i in range(len(c["facts"])) for col in _absent_colours(scene)]
    return pos, same, other, absent


def _b_quantity(scene, rng):
    """Quantity: how many objects of a shape or colour there are."""
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
    """Spatial Relationship: where one object is (starts) relative to others.

    Two bindings (see above): a diagonal pair is given both its relations ("to the left of and
    above"), whose same-word variants swap the subject and turn above into below ("above" and "below"
    are words no caption uses); without one, the subject is related to two other objects. A level
    pair alone allows one binding only, so it gets no statement (MAX_FACTS >= 2).
    """
    objs = scene["objects"]
    refs = [unique_ref(o, scene) for o in objs]
    ids = [i for i, r in enumerate(refs) if r]
    if len(ids) < 2:
        return None
    cells = {i: objs[i]["cell"] for i in ids}
    diagonal = [(a, b) for a in ids for b in ids if a != b and len(true_relations(cells[a], cells[b])) == 2]
    if MAX_FACTS >= 2 and diagonal:
        a, b = rng.choice(diagonal)
        rels = [[r, refs[b]] for r in true_relations(cells[a], cells[b])]
        rng.shuffle(rels)
    elif MAX_FACTS >= 2 and len(ids) >= 3:
        a, *others = _pick(rng, ids, 3)
        rels = [[rng.choice(true_relations(cells[a], cells[b])), refs[b]] for b in others]
    elif MAX_FACTS >= 2:
        return None
    else:
        a, b = _pick(rng, ids, 2)
        rels = [[rng.choice(true_relations(cells[a], cells[b])), refs[b]]]
    pos = _claim("Spatial Relationship", scene["kind"], rng, 1, subject=refs[a], relations=rels)

    pair = len(rels) > 1 and len({json.dumps(r) for _, r in rels}) == 1     # both relations of a diagonal pair

    def slots(c):
        """Which object fills which slot (subject, each relation's object)."""
        if pair:
            return [c, {**c, "subject": c["relations"][0][1], "relations": [[rel, c["subject"]] for rel, _ in c["relations"]]}]
        names = [c["subject"]] + [r for _, r in c["relations"]]
        return [{**c, "subject": p[0], "relations": [[rel, r] for (rel, _), r in zip(c["relations"], p[1:])]}
                for p in [names] + _perm_variants(names)]

    def words(c):
        """Which relation goes with which object; for a diagonal pair, above or below."""
        if pair:
            flip = {"above": "below", "below": "above"}
            return [c, {**c, "relations": [[flip.get(rel, rel), r] for rel, r in c["relations"]]}]
        return [{**c, "relations": [[rel, r] for rel, (_, r) in zip(p, c["relations"])]}
                for p in [[rel for rel, _ in c["relations"]]] + _perm_variants([rel for rel, _ in c["relations"]])]
    same = _orbit(pos, [slots, words])
    other = []
    for i in range(len(rels)):
        for new in [INVERSE_REL[rels[i][0]]] + list(REL_PHRASES):
            if new != rels[i][0]:
                other.append({**pos, "relations": [[new, r] if j == i else [rel, r]
                                                   for j, (rel, r) in enumerate(rels)]})

    def absent(c):
        """One of the objects named by a shape (or colour) that no object has."""
        names = [c["subject"]] + [r for _, r in c["relations"]]
        out = []
        for name in {json.dumps(n, sort_keys=True): n for n in names}.values():
            for new in _absent_refs(name, scene):
                out.append({**c, "subject": new if c["subject"] == name else c["subject"],
                            "relations": [[rel, new if r == name else r] for rel, r in c["relations"]]})
        return out
    return pos, same, other, absent


def _b_adverb_image(scene, rng):
    """Adverb, images: 'directly' / 'diagonally' above, below, left or right of another object."""
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
    """Action Recognition (direction) or Adverb on videos (direction and speed) of moving objects."""
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
    """Basic Event, images: which object is in which cell."""
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
    """Basic Event, videos: which object appears, stops, turns around or disappears."""
    objs = scene["objects"]
    evs = [(i, e) for f, i, e in scene_events(scene) if unique_ref(objs[i], scene)]
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
    """Temporal: the order of two or more events.

    Two bindings: which object does which event x which event comes first; events by one object only
    (one binding) are drawn again.
    """
    objs = scene["objects"]
    evs = [(f, i, e) for f, i, e in scene_events(scene) if unique_ref(objs[i], scene)]
    # One event per distinct frame, so the order is strict.
    by_frame = {}
    for f, i, e in evs:
        by_frame.setdefault(f, []).append((i, e))
    frames = sorted(by_frame)
    if len(frames) < 2:
        return None

    def refs_(c):
        """Which object is named in each slot."""
        rs = [r for r, _ in c["events"]]
        return [{**c, "events": [[r, e] for r, (_, e) in zip(p, c["events"])]} for p in [rs] + _perm_variants(rs)]

    def verbs(c):
        """Which event is in each slot."""
        es = [e for _, e in c["events"]]
        return [{**c, "events": [[r, e] for (r, _), e in zip(c["events"], p)]} for p in [es] + _perm_variants(es)]
    for _ in range(20):
        k = min(len(frames), rng.randint(2, max(2, MAX_FACTS)))
        picked = sorted(rng.sample(frames, k))
        seq = [rng.choice(by_frame[f]) for f in picked]
        events = [[unique_ref(objs[i], scene), e] for i, e in seq]
        pos = _claim("Temporal", "video", rng, 1, events=events)
        same = _orbit(pos, [refs_, verbs])
        if len({json.dumps(r) for r, _ in events}) > 1 and len({e for _, e in events}) > 1:
            break
    else:
        return None
    present = {e for _, _, e in evs}
    other = [{**pos, "events": [[rr, e2] if j == k2 else [rr, ee] for j, (rr, ee) in enumerate(events)]}
             for k2, (r, e) in enumerate(events) for e2 in EVENTS if e2 != e and e2 in present]

    def absent(c):
        """One event swapped for one that no object undergoes."""
        return [{**c, "events": [[rr, e2] if j == k2 else [rr, ee] for j, (rr, ee) in enumerate(c["events"])]}
                for k2 in range(len(c["events"])) for e2 in EVENTS if e2 not in present]
    return pos, same, other, absent


# Predicates whose value, given another object's, changes one word for one the caption also uses.
SWAPPABLE_PREDS = ("size", "dir", "word")


def _b_coreference(scene, rng):
    """Coreference: 'the former' / 'the latter' pointing at the object two predicates hold for.

    Two bindings: which object is named where x whose value the first predicate has (swapped with
    another mentioned object's: 'is large' for 'is small'); the second predicate holds for the
    target only, so that swapping both is still false. With MAX_FACTS = 1, one predicate.
    """
    objs = scene["objects"]
    kind = scene["kind"]
    refs = [unique_ref(o, scene, ("colour", "shape")) for o in objs]
    ids = [i for i, r in enumerate(refs) if r]
    if len(ids) < 2:
        return None

    def preds_of(o):
        """Every predicate the object satisfies."""
        ps = [{"size": o["size"]}, {"cell": o["cell"]}]
        if o.get("word"):
            ps.append({"word": o["word"]})
        if kind == "video":
            ps.append({"dir": o["direction"]})
            ps += [{"event": e} for e in EVENTS if event_frame(o, e) is not None]
        return ps
    for _ in range(20):
        chosen = _pick(rng, ids, rng.randint(2, min(3, MAX_FACTS + 1)))
        target = rng.randrange(len(chosen))
        t, rest = objs[chosen[target]], [objs[j] for j in chosen if j != chosen[target]]
        own = [p for p in preds_of(t) if not any(_coref_pred_holds(p, o, kind) for o in rest)]
        swaps = [(p, q) for p in own if list(p)[0] in SWAPPABLE_PREDS and p.get("dir") != "none"
                 for o in rest for q in preds_of(o) if list(q) == list(p) and q != p and q.get("dir") != "none"]
        if MAX_FACTS < 2 and own:
            preds, swap = [rng.choice(own)], None
            break
        if swaps:
            swap = rng.choice(swaps)
            fixed = [p for p in own if list(p) != list(swap[0])]
            if fixed:
                preds = [swap[0], rng.choice(fixed)]
                rng.shuffle(preds)
                break
    else:
        return None
    mentions = [refs[j] for j in chosen]
    pos = _claim("Coreference", kind, rng, 2, mentions=mentions, point=target, preds=preds)

    def order(c):
        """Which object is named where (the pointer word stays)."""
        return [{**c, "mentions": p} for p in [c["mentions"]] + _perm_variants(c["mentions"])]

    def value(c):
        """The first predicate's value, or the other object's."""
        return [c] + ([{**c, "preds": [swap[1] if p == swap[0] else p for p in c["preds"]]}] if swap else [])
    same = _orbit(pos, [order, value])
    other = []
    for i, p in enumerate(preds):
        for j in chosen:
            for q in preds_of(objs[j]):
                if list(q) == list(p) and q != p:
                    other.append({**pos, "preds": [q if k == i else r for k, r in enumerate(preds)]})

    def absent(c):
        """One mentioned object named by a shape (or colour) that no object has."""
        return [{**c, "mentions": [new if k == i else m for k, m in enumerate(c["mentions"])]}
                for i, m in enumerate(c["mentions"]) for new in _absent_refs(m, scene)]
    return pos, same, other, absent


def _b_ocr(scene, rng):
    """OCR: the word written on an object."""
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
    absent = [w for w in (mutate_word(o["word"], rng) for _ in range(12)) if w not in seen]
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

    Re-bindings are a random subset of the builder's orbit, and each substitution edits a random one
    of the options taken so far, not always the positive: then no option's place among the others
    (which is one swap or edit from which) tells which is true, and a scorer blind to binding is at
    chance instead of below it.
    """
    built = BUILDERS[stype](scene, rng)
    if built is None:
        return None
    pos, same, other, absent = built
    if not evaluate_claim(pos, scene):
        raise AssertionError(f"builder for {stype} made a false positive: {pos}")
    absent_of = absent if callable(absent) else (lambda c: list(absent) if c is pos else [])
    rng.shuffle(same)
    rng.shuffle(other)
    rest = same + other if NEGATIVE_STYLE == "permute" else rng.sample(same + other, len(same + other))
    lex = None      # caption given: claim -> 0 (ties with the positive on its words), 1 (less), 2 (more)
    if caption is not None:
        # Re-bindings that tie with the positive on the caption's words first, then ones that match
        # them less and more in turn, so that wording favours neither the positive nor a negative;
        # substitutions (absent values) that match less first. Sorting is stable: the shuffled /
        # preferred order is kept within each class.
        top, cache = bow_cosine(caption, render_claim(pos)), {}

        def lex_of(c):
            """How `c` matches the caption's words against the positive (see `lex`)."""
            text = render_claim(c)
            if text not in cache:
                d = bow_cosine(caption, text) - top
                cache[text] = 0 if abs(d) < 1e-9 else (1 if d < 0 else 2)
            return cache[text]
        lex = lex_of
        classes = [lex(c) for c in rest]
        lower, higher = ([c for c, k in zip(rest, classes) if k == want] for want in (1, 2))
        mixed = [c for pair in itertools.zip_longest(lower, higher) for c in pair if c is not None]
        rest = [c for c, k in zip(rest, classes) if k == 0] + mixed
    n_absent = min(ABSENT_NEGATIVES if stype in ABSENT_TYPES else ABSENT_NEGATIVES_BINDING, n_negatives)
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

    def substitutions(base):
        """Absent-value edits of `base`, shuffled, those matching the caption less first."""
        pool = absent_of(base)
        rng.shuffle(pool)
        return sorted(pool, key=lambda c: (1, 0, 2)[lex(c)]) if lex else pool

    take(rest, n_negatives - n_absent)
    bases, goal = [pos] + negatives, len(negatives) + n_absent
    for _ in range(n_absent):
        take(substitutions(rng.choice(bases)), len(negatives) + 1)
    take(substitutions(pos), goal)              # a base with no such edit left: the positive's
    take(rest, n_negatives)
    take(substitutions(pos), n_negatives)       # too few re-bindings: more substitutions
    if len(negatives) == n_negatives:
        rng.shuffle(negatives)
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
#                                 Text corpus                                   #
#################################################################################
# Here and not in world.scenes because the corpus includes statements (scenes imports no claims).

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
