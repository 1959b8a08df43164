"""Why the tiny Qwen3-VL ladder's colour is hard to read: build a rung under a variant of its pretraining.

Builds the ladder's LLM twin (or, with --media, its MLLM base) into --out with encoders.pretrain_tiny_qwen3vl
and one change, then reports two numbers: how alike the colour words' input embeddings are (mean pairwise
cosine; 0 for random vectors) and how often the model answers "What colour is the X? It is ..." right
(chance 1/8). The readout of experiments/colour_readout.py then takes --encoder OUT.

    python experiments/ladder_variants.py --out runs/ladder/qa --material captions+qa
    python experiments/ladder_variants.py --out runs/ladder/init --steps 0     # the random init
    python experiments/colour_readout.py --encoder runs/ladder/qa
"""
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import encoders  # noqa: E402
import plumbing  # noqa: E402
from world import scenes  # noqa: E402


def captions_and_qa(step, batch_size, seed):
    """The ladder's generic material with up to three of the world's question/answer pairs after each caption."""
    rng = random.Random(f"pretrain:{seed}:{step}")
    items = []
    for i in range(batch_size):
        scene = scenes.sample_scene(rng, ("image", "video")[i % 2])
        caption = rng.choice(scenes.write_captions(scene, rng))
        qa = scenes._qa_pairs(scene, rng)
        items.append((scene, caption + " " + " ".join(f"{q} {a}" for q, a, _ in rng.sample(qa, min(len(qa), 3)))))
    return items


def paraphrases(step, batch_size, seed):
    """Each scene's two captions (the world's two styles, other order and words) one after the other, so the
    second can be predicted only from what the first said: colour now changes what comes later."""
    rng = random.Random(f"pretrain:{seed}:{step}")
    items = []
    for i in range(batch_size):
        scene = scenes.sample_scene(rng, ("image", "video")[i % 2])
        items.append((scene, " ".join(scenes.write_captions(scene, rng))))
    return items


GENERIC = encoders.pretrain_items


def repeats(step, batch_size, seed):
    """Each caption written twice: the plainest material in which a word decides a later one."""
    return [(scene, caption + " " + caption) for scene, caption in GENERIC(step, batch_size, seed)]


def scene_pairs(step, batch_size, seed):
    """Each scene's two captions (the world's two styles) as neighbouring items: 0 and 1, 2 and 3, ..."""
    rng = random.Random(f"pretrain:{seed}:{step}")
    items = []
    for i in range(batch_size // 2):
        scene = scenes.sample_scene(rng, ("image", "video")[i % 2])
        items += [(scene, caption) for caption in scenes.write_captions(scene, rng)]
    return items


def hard_negative_triples(step, batch_size, seed):
    """Per scene: one caption, then the scene and a one-aspect edit of it (world.checker.hard_negatives) in the
    other style with one wording, so that the two differ only where the edit shows: 0, 1, 2 and 3, 4, 5, ..."""
    from world import checker
    rng = random.Random(f"pretrain:{seed}:{step}")
    items = []
    while len(items) + 3 <= batch_size:
        scene = scenes.sample_scene(rng, ("image", "video")[len(items) // 3 % 2])
        style = rng.randrange(2)
        aspects = [a for a in checker.ASPECTS if checker.hard_negatives(scene, a, 1, 0, 1 - style)[1]]
        true, negatives = checker.hard_negatives(scene, rng.choice(aspects), 1, rng.randrange(10**6), 1 - style)
        items += [(scene, scenes.write_caption(scene, style, rng)), (scene, true), (scene, negatives[0])]
    return items


def with_contrastive(load, weight, group=2, temperature=0.05):
    """load_qwen3vl whose model adds, to its next-token loss, InfoNCE between the mean-pooled last hidden
    states of neighbouring items (one scene's two captions) against the other scenes of the batch; with
    group=3 each scene's third item (its hard negative) is among the candidates too."""
    def contrastive(path):
        model, processor = load(path)
        lm_forward = model.forward

        def forward(**batch):
            out = lm_forward(**batch, output_hidden_states=True)
            if out.loss is None:  # a forward without labels (colour_report's questions): no pretraining loss
                return out
            m = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).unsqueeze(-1).float()
            e = torch.nn.functional.normalize((out.hidden_states[-1] * m).sum(1) / m.sum(1), dim=-1)
            logits = e[0::group] @ torch.cat([e[i::group] for i in range(1, group)]).T / temperature
            target = torch.arange(len(logits))
            ce = torch.nn.functional.cross_entropy
            both = (ce(logits, target) + ce(logits.T, target)) / 2 if group == 2 else ce(logits, target)
            out.loss = out.loss + weight * both
            return out
        model.forward = forward
        return model, processor
    return contrastive


def colour_report(path, n=150):
    """(mean pairwise cosine of the colour words' input embeddings, colour-question accuracy)."""
    model, processor = encoders.load_qwen3vl(path)
    tok, emb = processor.tokenizer, model.get_input_embeddings().weight.detach()
    ids = [tok.encode(" " + c, add_special_tokens=False)[0] for c in scenes.COLOURS]
    e = torch.nn.functional.normalize(emb[ids].float(), dim=-1)
    cos = (e @ e.T)[~torch.eye(len(ids), dtype=torch.bool)].mean().item()
    rng, hits, asked = random.Random(123), 0, 0
    for _ in range(n):
        scene = scenes.sample_scene(rng, "image")
        caption = scenes.write_captions(scene, rng)[0]
        qa = [(q, a) for q, a, kind in scenes._qa_pairs(scene, rng) if kind == "colour"]
        if qa:
            with torch.no_grad():
                logits = model(input_ids=tok(f"{caption} {qa[0][0]} It is", return_tensors="pt").input_ids).logits
            hits += scenes.COLOURS[int(logits[0, -1, ids].argmax())] in qa[0][1].lower()
            asked += 1
    return cos, hits / max(1, asked)


def main():
    p = plumbing.ArgumentParser(__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--material", default="captions", choices=["captions", "captions+qa", "paraphrases", "repeats"])
    p.add_argument("--steps", type=int, default=encoders.PRETRAIN["steps"], help="0: the random init")
    p.add_argument("--lr", type=float, default=encoders.PRETRAIN["lr"])
    p.add_argument("--contrastive", type=float, default=0.0,
                   help="weight of a scene-level InfoNCE between a scene's two captions (scene-pair material)")
    p.add_argument("--hard-negatives", action="store_true",
                   help="--contrastive also against a one-aspect edit of the scene, worded as the positive")
    p.add_argument("--media", action="store_true", help="the MLLM base (half its captions answer a render)")
    p.add_argument("--freeze-embeddings", action="store_true", help="keep the input embeddings at their init")
    p.add_argument("--tie-embeddings", action="store_true", help="share the input and output embeddings")
    p.add_argument("--cache-dir", default="cache")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.contrastive and args.material != "captions":
        raise plumbing.DataError("--contrastive trains on scene pairs: it takes no --material")
    if args.material == "captions+qa":
        encoders.pretrain_items = captions_and_qa
    elif args.material != "captions":
        encoders.pretrain_items = {"paraphrases": paraphrases, "repeats": repeats}[args.material]
    if args.tie_embeddings:
        make_config = encoders.tiny_qwen3vl_config

        def tied(*a, **k):
            config = make_config(*a, **k)
            config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
            return config
        encoders.tiny_qwen3vl_config = tied
    if args.hard_negatives and not args.contrastive:
        raise plumbing.DataError("--hard-negatives is a kind of --contrastive: give its weight")
    if args.contrastive:
        encoders.pretrain_items = hard_negative_triples if args.hard_negatives else scene_pairs
        encoders.load_qwen3vl = with_contrastive(encoders.load_qwen3vl, args.contrastive,
                                                 3 if args.hard_negatives else 2)
    if args.freeze_embeddings:
        load = encoders.load_qwen3vl

        def frozen(path):
            model, processor = load(path)
            model.get_input_embeddings().weight.requires_grad_(False)  # AdamW skips a parameter with no grad
            return model, processor
        encoders.load_qwen3vl = frozen
    if args.steps:
        encoders.pretrain_tiny_qwen3vl(args.out, args.media, cache_dir=args.cache_dir,
                                       recipe=dict(steps=args.steps, lr=args.lr))
    else:
        encoders.build_tiny_qwen3vl(args.out, cache_dir=args.cache_dir, **encoders.LADDER_SIZE)
    cos, acc = colour_report(args.out)
    print(f"{args.out}: colour embeddings' mean cosine {cos:.3f}; colour questions answered {acc:.3f} (chance 0.125)")


if __name__ == "__main__":
    plumbing.run_cli(main)
