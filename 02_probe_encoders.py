"""02: probe text encoders on TED-6K (the paper's Table 1 and Table 2).

For every encoder and layer-feature strategy: freeze the encoder, train a context aggregator on its
features with a symmetric InfoNCE over pairs of differently worded captions of one image or video, then
score TED-6K: caption and options are embedded separately, and an instance is right when the true
statement has the strictly highest cosine with the caption (ties lose). Each aggregator is trained
once from each of --seeds (mean +- sample std), beside bag of words and a zero-shot reference (the fused features
mean-pooled, no aggregator).

    python 02_probe_encoders.py                                   # the default zoo on 01's benchmark
    torchrun --nproc_per_node=2 02_probe_encoders.py              # DDP: the same results as one process
    torchrun --nnodes=2 --node_rank=$RANK --master_addr=$ADDR --master_port=29500 --nproc_per_node=8 \
        02_probe_encoders.py --encoders Qwen/Qwen3-VL-8B-Instruct --benchmark TED-6k.json \
        --caption-pairs pairs.jsonl --max-pairs 0 --width 0 --out-dim 1024 --lr 1e-5 --steps 0 --batch-size 1024

The last is the paper's setting (blocks at the encoder's width, one epoch, global batch 1024). Writes
OUT/results.json (every cell's mean, std and per-seed values), OUT/results.md (Tables 1 and 2),
OUT/aggregators/ and OUT/tb/, together once every encoder is done; an OUT holding results is replaced
only with --overwrite.
"""
import random
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import plumbing
from common import caption_text, length_batches, load_pairs, read_ted
from models import ContextAggregator, LayerFusion, info_nce, load_layer_weights
from encoders import BUILTIN, load_encoder
from plumbing import DataError, log
from world import claims

# Table 1 in miniature: three real encoders (encoder-only, LLM, LLM), then the ladder of one tiny
# Qwen3-VL size: random init -> its text-only twin (LLM) -> the pretrained MLLM base -> + stage 1 (03).
DEFAULT_ZOO = ("minilm", "smollm2", "gemma3", "tiny-qwen3vl", "tiny-qwen3vl-llm", "tiny-qwen3vl-base",
               "runs/stage1/model")
OPTION_SEED = 42  # the public code shuffles each question's options with seed 42
AGGREGATOR_KIND = "gran-ted/probe-aggregator"  # the tag plumbing.load_checkpoint checks

#################################################################################
#                                 Benchmark                                     #
#################################################################################

def subsample(questions, max_captions):
    """All questions of `max_captions` captions spread evenly over the file (keeps the type mix)."""
    keys = list(dict.fromkeys(q["key"] for q in questions))
    if not max_captions or max_captions >= len(keys):
        return questions
    keep = {keys[int(i * len(keys) / max_captions)] for i in range(max_captions)}
    return [q for q in questions if q["key"] in keep]


def answers(questions, embed):
    """Per question, whether `embed(text) -> 1-D tensor` answers it: options shuffled with seed 42 as in the
    public code, and right only when the true statement's cosine (fp32) with the caption is strictly above
    every other option's (a tie is not a win)."""
    rng = random.Random(OPTION_SEED)
    for q in questions:
        options = [(q["positive"], True)] + [(n, False) for n in q["negatives"]]
        rng.shuffle(options)
        c = torch.nn.functional.normalize(embed(caption_text(q["caption"], q["kind"])).float(), dim=0)
        sims = torch.stack([torch.nn.functional.normalize(embed(t).float(), dim=0) @ c for t, _ in options])
        best = int(sims.argmax())
        yield options[best][1] and int((sims == sims[best]).sum()) == 1


def score_questions(questions, embed):
    """Accuracy (%) overall / per type / per caption type, and on the questions marked "beyond_words" (those
    the bag-of-words reference gets wrong) apart."""
    return tally(questions, answers(questions, embed))


def tally(questions, rights):
    """score_questions' accuracies from each question's right / wrong."""
    hits = defaultdict(lambda: [0, 0])
    for q, right in zip(questions, rights):
        groups = ["overall", f"type/{q['type']}", f"caption/{q['kind']}", f"both/{q['kind']}/{q['type']}"]
        for group in groups + (["beyond_words"] if q.get("beyond_words") else []):
            hits[group][0] += right
            hits[group][1] += 1
    acc = {g: 100.0 * h / n for g, (h, n) in hits.items()}
    out = {"overall": acc["overall"], "n": hits["overall"][1], "by_type": {}, "by_caption_type": {}, "by_both": {}}
    if "beyond_words" in acc:
        out["beyond_words"] = acc["beyond_words"]
    for g in sorted(acc):
        if g.startswith("type/"):
            out["by_type"][g[5:]] = acc[g]
        elif g.startswith("caption/"):
            out["by_caption_type"][g[8:]] = acc[g]
        elif g.startswith("both/"):
            out["by_both"][g[5:]] = acc[g]
    return out


def bag_of_words_reference(questions):
    """The same scoring with word-count vectors instead of an encoder: how far wording alone gets. Marks
    each question it gets wrong "beyond_words": there an encoder must read more than the words.

    On the world's benchmark the re-binding negatives use exactly the positive's words, so this
    reference is near 0 on those types.
    """
    texts = benchmark_texts(questions)
    words = {t: claims.bow_tokens(t) for t in texts}
    vocab = {w: i for i, w in enumerate(dict.fromkeys(w for ws in words.values() for w in ws))}
    counts = {}
    for t, ws in words.items():  # each unique text once, as the encoders are
        counts[t] = torch.zeros(len(vocab))
        for w in ws:
            counts[t][vocab[w]] += 1
    rights = list(answers(questions, counts.__getitem__))
    for q, right in zip(questions, rights):
        q["beyond_words"] = not right
    return tally(questions, rights)


def benchmark_texts(questions):
    """Unique texts to embed: formatted captions (they repeat across statement types) and options."""
    seen = dict.fromkeys(caption_text(q["caption"], q["kind"]) for q in questions)
    for q in questions:
        seen.update(dict.fromkeys([q["positive"], *q["negatives"]]))
    return list(seen)


def pairs_mismatch(args):
    """One line when the aggregator would learn the world's captions but be scored on another benchmark. 01
    writes a world benchmark's folder whole with scenes.json beside it; a file it imports has none."""
    pairs = Path(args.caption_pairs)
    world_pairs = pairs.name == "caption_pairs.jsonl" and (pairs.parent / "scenes.jsonl").is_file()
    if world_pairs and not Path(args.benchmark).with_name("scenes.json").is_file():
        return (f"note: the caption pairs {args.caption_pairs} describe the built-in world's coloured shapes, not "
                f"the captions of {args.benchmark}: give pairs from the benchmark's domain with --caption-pairs, "
                f"and read each encoder's zero-shot reference (no aggregator) in results.md beside the trained "
                f"numbers")
    return None


#################################################################################
#                          Feature extraction (batched)                         #
#################################################################################


def make_fusions(strategies, encoder):
    """One LayerFusion per strategy name; `frozen:PATH` reads 04's layer weights for this encoder."""
    fusions = {}
    for s in strategies:
        if s.startswith("frozen:"):
            w = load_layer_weights(s.split(":", 1)[1], encoder.name, encoder.num_layers)
            fusions[s] = LayerFusion("frozen", encoder.num_layers, weights=w)
        else:
            fusions[s] = LayerFusion(s, encoder.num_layers)
    return fusions


def extract(encoder, fusions, texts, token_budget, feature_dtype):
    """{strategy: [per-text feature tensor [L_i, D]]} for `texts`, each text encoded once."""
    feats = {s: [None] * len(texts) for s in fusions}
    for idx in length_batches(encoder, texts, token_budget):
        hidden, mask = encoder.encode([texts[i] for i in idx])
        lengths = mask.sum(1).tolist()
        for s, fusion in fusions.items():
            fused = fusion(hidden).to(feature_dtype).cpu()
            for j, i in enumerate(idx):
                feats[s][i] = fused[j, :lengths[j]].clone()
    return feats


def pad_features(seqs, device):
    """List of [L_i, D] -> padded fp32 [B, L, D] and mask [B, L]."""
    feats = pad_sequence([x.float() for x in seqs], batch_first=True)
    mask = pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in seqs], batch_first=True)
    return feats.to(device), mask.to(device)


#################################################################################
#                               Aggregator training                             #
#################################################################################


def schedule(n_pairs, steps, global_batch, seed):
    """Global batches of pair indices: a fresh permutation each epoch, the remainder dropped."""
    if n_pairs < global_batch:
        raise DataError(f"{n_pairs} caption pairs is fewer than one global batch of {global_batch}")
    per_epoch = n_pairs // global_batch
    steps = steps or per_epoch  # 0 = one epoch, as in the paper
    out, epoch = [], 0
    while len(out) < steps:
        perm = list(range(n_pairs))
        random.Random(seed + epoch).shuffle(perm)
        out += [perm[k * global_batch:(k + 1) * global_batch] for k in range(per_epoch)]
        epoch += 1
    return out[:steps]


def pair_feature_cache(args, encoder, fusions, pairs, mine):
    """{strategy: {pair index: (a, b) features}} for every pair this rank's batches hold, encoded once."""
    needed = sorted({i for b in mine for i in b})
    feats = extract(encoder, fusions, [t for i in needed for t in pairs[i]], args.token_budget, args.feature_dtype)
    return {s: {i: (f[2 * k], f[2 * k + 1]) for k, i in enumerate(needed)} for s, f in feats.items()}


def make_aggregators(args, encoder, fusions, ddp, seed):
    """One aggregator (DDP-wrapped under torchrun) and AdamW per strategy, all from the same weights."""
    aggs, opts = {}, {}
    for s in fusions:
        torch.manual_seed(seed)  # every strategy's aggregator starts from the same weights
        agg = ContextAggregator(encoder.width, args.width or encoder.width, args.out_dim, args.heads,
                                args.depth, rope=not args.no_rope).to(ddp.device)
        aggs[s] = DDP(agg) if ddp.enabled else agg
        opts[s] = torch.optim.AdamW(agg.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return aggs, opts


def train_all_seeds(args, encoder, fusions, pairs, ddp, writer=None):
    """[({strategy: module}, loss curves)] per seed; each seed its own initial weights and batch order."""
    if args.batch_size % ddp.world_size:
        raise DataError(f"--batch-size {args.batch_size} must divide by the {ddp.world_size} processes")
    local = args.batch_size // ddp.world_size
    plans = []
    for seed in args.seeds:
        plan = schedule(len(pairs), args.steps, args.batch_size, seed)
        plans.append([b[ddp.rank * local:(ddp.rank + 1) * local] for b in plan])  # this rank's slice of each batch
    # When a schedule revisits pairs, encode every pair any seed reads once up front, shared by all seeds;
    # one epoch or less streams batch by batch (each seed re-encodes its own: a paper-sized pair set's
    # features would not fit in memory).
    cache = pair_feature_cache(args, encoder, fusions, pairs, [b for plan in plans for b in plan]) \
        if len(plans[0]) * args.batch_size > len(pairs) else None
    return [train_aggregators(args, encoder, fusions, pairs, ddp, seed, mine, cache, writer)
            for seed, mine in zip(args.seeds, plans)]


def train_aggregators(args, encoder, fusions, pairs, ddp, seed, mine, cache, writer=None):
    """Train one aggregator per strategy from `seed` on this rank's batches `mine` (features from `cache`, or
    encoded per batch when it is None); returns ({strategy: module}, loss curves)."""
    aggs, opts = make_aggregators(args, encoder, fusions, ddp, seed)
    curves = {s: [] for s in fusions}
    for step, idx in enumerate(mine):
        if cache is None:
            batch = extract(encoder, fusions, [t for i in idx for t in pairs[i]], args.token_budget,
                            args.feature_dtype)
        for s in fusions:
            seqs = [x for i in idx for x in cache[s][i]] if cache is not None else batch[s]
            feats, mask = pad_features(seqs, ddp.device)
            z = aggs[s](feats, mask)  # one forward over [a0, b0, a1, b1, ...] (DDP wants one per backward)
            loss = info_nce(z[0::2], z[1::2], args.temperature)
            opts[s].zero_grad(set_to_none=True)
            # DDP averages gradients over ranks, but each rank's gradient covers only its own rows of the
            # global loss: scaling by the world size gives exactly the single-process gradient.
            (loss * ddp.world_size).backward()
            torch.nn.utils.clip_grad_norm_(aggs[s].parameters(), args.grad_clip)
            opts[s].step()
            curves[s].append(loss.item())
            if writer is not None:
                writer.add_scalar(f"loss/{s}/seed{seed}", loss.item(), step)
        if step % max(1, len(mine) // 10) == 0 or step == len(mine) - 1:
            log(f"  seed {seed} step {step + 1}/{len(mine)} "
                + " ".join(f"{s}={curves[s][-1]:.3f}" for s in fusions))
    return {s: (a.module if ddp.enabled else a).eval() for s, a in aggs.items()}, curves


#################################################################################
#                                     Scoring                                   #
#################################################################################


ZERO_SHOT = "zero-shot"  # the key of the no-aggregator embeddings in embed_texts' output


def mean_pool(feats, mask):
    """The zero-shot text vector: fused features averaged over the text's tokens (padding excluded), L2-normalised."""
    m = mask.to(feats.dtype).unsqueeze(-1)
    return torch.nn.functional.normalize((feats * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


@torch.no_grad()
def embed_texts(encoder, fusions, aggs, texts, args, device, progress=None):
    """{(strategy, k): [n, out_dim]} embeddings of `texts` by the k-th seed's aggregators `aggs[k]`, and
    {(strategy, ZERO_SHOT): [n, width]} by mean pooling; each text encoded once, in length-sorted batches."""
    out = {}

    def put(key, idx, emb):
        out.setdefault(key, torch.zeros(len(texts), emb.shape[1]))[idx] = emb.float().cpu()
    for idx in length_batches(encoder, texts, args.token_budget):
        hidden, mask = encoder.encode([texts[i] for i in idx])
        mask = mask.to(device)
        for s, fusion in fusions.items():
            # the same rounding as training features, so train and test see the same inputs
            feats = fusion(hidden).to(args.feature_dtype).to(device, torch.float32)
            for k, seed_aggs in enumerate(aggs):
                put((s, k), idx, seed_aggs[s](feats, mask))
            put((s, ZERO_SHOT), idx, mean_pool(feats, mask))
        if progress is not None:
            progress.update(len(idx))
    if progress is not None:
        progress.close()
    return out


def gather_embeddings(local, my_index, n, ddp):
    """Put every rank's rows back in text order (all_gather_object: fine for these small tensors)."""
    if not ddp.enabled:
        return local
    parts = [None] * ddp.world_size
    dist.all_gather_object(parts, (my_index, local))
    full = {}
    for index, emb in parts:
        for key, v in emb.items():
            full.setdefault(key, torch.zeros(n, v.shape[1]))[index] = v
    return full


#################################################################################
#                                  Reporting                                    #
#################################################################################

def seed_summary(runs, seeds):
    """One strategy's score_questions outputs (plus losses) over seeds: every cell's mean where one run has
    its number, the cells' sample std (ddof=1; None with one seed) under "std", per-seed values under "values"."""
    def over(cells, f):
        return {k: over([c[k] for c in cells], f) if isinstance(cells[0][k], dict) else f([c[k] for c in cells])
                for k in cells[0] if k != "n"}
    out = over(runs, statistics.fmean)  # fmean of one value is that value: --seeds 1 reports the run itself
    out.update(n=runs[0]["n"], std=over(runs, lambda v: statistics.stdev(v) if len(v) > 1 else None),
               values=over(runs, list), seeds=seeds)
    return out


def _pct(x):
    return "-" if x is None else f"{x:.2f}"


def _mean_std(r, cell, key=None):
    """`mean ± std` of one cell of a seed_summary (the mean alone with one seed); "-" when absent."""
    mean, std = r.get(cell), r.get("std", {}).get(cell)
    if key is not None:
        mean, std = (mean or {}).get(key), (std or {}).get(key)
    return _pct(mean) if std is None or mean is None else f"{mean:.2f} ± {std:.2f}"


def markdown(results):
    """Table 1 (encoders x strategies) and Table 2 (per statement type) as markdown."""
    encs = results["encoders"]
    strategies = results["config"]["strategies"]
    seeds = results["config"]["seeds"]
    lines = ["# TED probe results", "",
             f"Benchmark `{results['config']['benchmark']}`: {results['benchmark']['questions']} questions "
             f"({results['benchmark']['instances']} captions); chance ~{results['benchmark']['chance']:.1f}%.", "",
             (f"Each aggregator trained from {len(seeds)} seeds {seeds}: trained cells are mean ± sample std over "
              "the seeds." if len(seeds) > 1 else f"Each aggregator trained from 1 seed ({seeds[0]}): no spread "
                                                  "(two --seeds or more give mean ± std)."),
             "Zero-shot: the same scoring on the fused features mean-pooled over each text's tokens, no "
             "aggregator.", "",
             "## Table 1: accuracy (%) by encoder and feature strategy", "",
             "| type | encoder | layers | " + " | ".join(strategies) + " | seconds |",
             "|---|---|---|" + "---|" * len(strategies) + "---|"]
    for name, r in encs.items():
        cells = [_mean_std(r["strategies"].get(s, {}), "overall") for s in strategies]
        zero = [_pct(r["strategies"].get(s, {}).get("zero_shot", {}).get("overall")) for s in strategies]
        lines.append(f"| {r['family']} | {name} | {r['num_layers']} | " + " | ".join(cells)
                     + f" | {r['timings']['total_s']:.0f} |")
        lines.append(f"| reference | {name} zero-shot (mean pool, no aggregator) | {r['num_layers']} | "
                     + " | ".join(zero) + " | - |")
    if "bag_of_words" in results:
        lines.append("| reference | bag of words (no encoder) | - | "
                     + " | ".join([_pct(results["bag_of_words"]["overall"])] * len(strategies)) + " | 0 |")
    n = results["benchmark"].get("beyond_words")
    if n:
        lines += ["", f"## Beyond words: accuracy (%) on the {n} questions the bag of words gets wrong", "",
                  "| encoder | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]
        for name, r in encs.items():
            got = [r["strategies"].get(s, {}) for s in strategies]
            lines.append(f"| {name} | " + " | ".join(_mean_std(g, "beyond_words") for g in got) + " |")
            lines.append(f"| {name} zero-shot | " + " | ".join(_pct(g.get("zero_shot", {}).get("beyond_words"))
                                                               for g in got) + " |")
    main = "norm-avg" if "norm-avg" in strategies else strategies[-1]
    types = sorted({t for r in encs.values() for t in r["strategies"][main]["by_type"]})
    kinds = sorted({k for r in encs.values() for k in r["strategies"][main]["by_caption_type"]})
    bow = results.get("bag_of_words")
    columns = [c for name in encs for c in (name, f"{name} zero-shot")] + (["bag of words"] if bow else [])
    lines += ["", f"## Table 2: accuracy (%) per statement type ({main})", "",
              "| type | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for cell, keys in (("by_type", types), ("by_caption_type", kinds)):
        for key in keys:
            row = [c for r in encs.values() for c in (_mean_std(r["strategies"][main], cell, key),
                                                      _pct(r["strategies"][main]["zero_shot"][cell].get(key)))]
            row += [_pct(bow[cell].get(key))] if bow else []
            lines.append(f"| {key if cell == 'by_type' else f'({key} captions)'} | " + " | ".join(row) + " |")
    lines += ["", "Seconds are wall-clock per encoder (load + every seed's aggregator training + scoring).", ""]
    return "\n".join(lines)


#################################################################################
#                                     Main                                      #
#################################################################################

def probe_encoder(args, name, questions, pairs, ddp, out_dir):
    """Load, train the aggregators, score: one encoder's row of Table 1 and its aggregators' weights."""
    t0 = time.time()
    encoder = load_encoder(name, device=ddp.device, dtype=plumbing.pick_dtype(ddp.device, args.encoder_dtype),
                           cache_dir=args.cache_dir, max_length=args.max_length)
    fusions = make_fusions(args.strategies, encoder)
    t_load = time.time() - t0
    log(f"{encoder}: {len(fusions)} strategies, {len(pairs)} caption pairs")
    writer = None
    if ddp.is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(out_dir / "tb" / safe_name(name))
    runs = train_all_seeds(args, encoder, fusions, pairs, ddp, writer)
    if writer is not None:
        writer.close()
    t_train = time.time() - t0 - t_load

    texts = benchmark_texts(questions)
    my_index = list(range(ddp.rank, len(texts), ddp.world_size))
    bar = plumbing.progress(total=len(my_index), desc=f"embed {name}")
    local = embed_texts(encoder, fusions, [aggs for aggs, _ in runs], [texts[i] for i in my_index], args,
                        ddp.device, bar)
    emb = gather_embeddings(local, my_index, len(texts), ddp)
    row = {t: i for i, t in enumerate(texts)}
    result = {"family": encoder.family, "num_layers": encoder.num_layers, "width": encoder.width,
              "strategies": {}, "texts_embedded": len(texts)}
    weights = {}
    for s in fusions:
        per_seed = []
        for k, (seed, (aggs, curves)) in enumerate(zip(args.seeds, runs)):
            per_seed.append(dict(score_questions(questions, lambda t: emb[s, k][row[t]]), loss_first=curves[s][0],
                                 loss_last=sum(curves[s][-10:]) / len(curves[s][-10:])))
            file = f"{safe_name(name)}__{safe_name(s)}" + (f"__seed{seed}" if k else "") + ".pt"
            weights[file] = {"kind": AGGREGATOR_KIND, "encoder": name, "strategy": s, "seed": seed, "args": vars(args),
                             "state_dict": {n: v.detach().cpu().clone() for n, v in aggs[s].state_dict().items()}}
        r = result["strategies"][s] = seed_summary(per_seed, args.seeds)
        r["zero_shot"] = score_questions(questions, lambda t: emb[s, ZERO_SHOT][row[t]])
    t_total = time.time() - t0
    result["timings"] = {"load_s": t_load, "train_s": t_train, "score_s": t_total - t_load - t_train,
                         "total_s": t_total}
    log(f"  {name}: " + ", ".join(f"{s} {_mean_std(r, 'overall')}% (zero-shot {r['zero_shot']['overall']:.2f}%)"
                                  for s, r in result["strategies"].items()) + f" ({t_total:.0f} s)")
    del encoder
    return result, weights


def safe_name(s):
    """A file name for an encoder or strategy name (hub ids and paths hold slashes)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")


def write_results(out_dir, results, weights):
    """Every encoder's aggregators, results.md and results.json, written together once all are done: a
    run that fails part-way replaces nothing. results.json goes last: it marks a complete set."""
    def build(tmp):
        for file, blob in weights.items():
            torch.save(blob, tmp / file)
    plumbing.atomic_dir(out_dir / "aggregators", build)
    plumbing.atomic_write_text(out_dir / "results.md", markdown(results))
    plumbing.atomic_write_json(out_dir / "results.json", results)


def comma_list(text):
    return [x for x in text.split(",") if x]


def get_parser():
    p = plumbing.ArgumentParser(__doc__)
    pos, nonneg = plumbing.positive_int, plumbing.nonneg_int
    p.add_argument("--encoders", type=comma_list, default=None,
                   help=f"comma list: built-in names ({', '.join(BUILTIN)}), local folders (e.g. runs/stage1/model), "
                        f".gguf files, hub ids (default: {','.join(DEFAULT_ZOO)}; the last once 03 has run)")
    p.add_argument("--strategies", type=comma_list, default="last,penultimate,norm-avg",
                   help="comma list of last, penultimate, avg, norm-avg, layer:K, frozen (with --layer-weights), "
                        "frozen:PATH")
    p.add_argument("--layer-weights", default=None, help="04's layer_weights.pt, for the strategy `frozen`")
    p.add_argument("--benchmark", default="runs/ted6k/ted6k.json", help="a TED-6k.json-format file")
    p.add_argument("--caption-pairs", default="runs/world/caption_pairs.jsonl", help='jsonl of {"a", "b", "kind"}')
    p.add_argument("--out", default="runs/probe")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out (at the end)")
    p.add_argument("--max-captions", type=nonneg, default=0, help="score N benchmark captions, spread evenly (0 = all)")
    p.add_argument("--max-pairs", type=nonneg, default=640, help="use the first N caption pairs (0 = all)")
    p.add_argument("--steps", type=nonneg, default=150, help="optimiser steps (0 = one epoch over the pairs)")
    p.add_argument("--batch-size", type=pos, default=32, help="global batch of caption pairs")
    p.add_argument("--lr", type=plumbing.positive_float, default=1e-4, help="paper: 1e-5 (with 500k pairs)")
    p.add_argument("--weight-decay", type=plumbing.nonneg_float, default=1e-5)
    p.add_argument("--grad-clip", type=plumbing.positive_float, default=0.5, help="gradient-norm clip")
    p.add_argument("--temperature", type=plumbing.positive_float, default=0.07, help="InfoNCE temperature")
    p.add_argument("--width", type=nonneg, default=128, help="aggregator width (0 = the encoder's, as in the paper)")
    p.add_argument("--out-dim", type=pos, default=128, help="embedding size (paper: 1024)")
    p.add_argument("--heads", type=pos, default=8)
    p.add_argument("--depth", type=pos, default=2)
    p.add_argument("--no-rope", action="store_true", help="no RoPE on the text tokens in the aggregator")
    p.add_argument("--max-length", type=pos, default=512, help="token limit per text")
    p.add_argument("--token-budget", type=pos, default=16384, help="padded tokens per encoder batch")
    p.add_argument("--feature-dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="precision of stored encoder features (bf16 = what a GPU encoder produces)")
    p.add_argument("--device", default=None)
    p.add_argument("--encoder-dtype", default="bf16", choices=["bf16", "fp32", "fp16", "auto"],
                   help="encoder dtype (bf16 on CPU too: the features are stored in bf16 anyway; auto = bf16 "
                        "on a GPU that has it, else fp32)")
    p.add_argument("--cache-dir", default="cache", help="tiny models, tokenizer, converted GGUF")
    p.add_argument("--threads", type=nonneg, default=0, help="torch CPU threads per process (0: torch's default)")
    p.add_argument("--seeds", type=nonneg, nargs="+", default=[0, 1, 2],
                   help="train each aggregator once from each of these seeds; results give mean and std")
    return p


def check_strategies(args):
    """Expand `frozen` to frozen:--layer-weights and refuse a strategy no encoder could run, before any runs."""
    if "frozen" in args.strategies and not args.layer_weights:
        raise DataError("--strategies frozen needs --layer-weights FILE (written by 04_train_layer_weights.py)")
    if args.layer_weights and "frozen" not in args.strategies:
        raise DataError("--layer-weights is for the strategy frozen, which --strategies does not list")
    args.strategies = [f"frozen:{args.layer_weights}" if s == "frozen" else s for s in args.strategies]
    for s in args.strategies:
        if s == "learned":
            raise DataError("--strategies learned: layer weights are learned with the DiT (04); probe them with "
                            "frozen:PATH")
        if s.startswith("frozen:") and not Path(s[7:]).is_file():
            raise DataError(f"--strategies {s}: no such layer-weights file")
        if not (s in LayerFusion.MODES or s.startswith(("frozen:", "layer:"))):
            raise DataError(f"--strategies: unknown strategy {s!r} (one of {', '.join(LayerFusion.MODES)}, "
                            f"layer:K, frozen:PATH)")


def check_encoder_names(names):
    """Refuse, before the first encoder runs, a name that is not built in, not a local model and not a
    hub id that the hub (or its local cache) has; `load_encoder` reads the rest."""
    for name in names:
        path = Path(name.rstrip("/"))
        if name in BUILTIN or (path.is_file() and path.suffix == ".gguf") or (path / "config.json").is_file():
            continue
        if path.exists() or "/" not in name:
            raise DataError(f"--encoders: {name!r} is not one of {', '.join(BUILTIN)}, a save_pretrained folder "
                            f"or a .gguf file")
        from transformers import AutoConfig
        try:
            AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:  # ValueError: not even a valid repo id
            raise DataError(f"--encoders: {name!r} is not a local path and the hub could not provide it "
                            f"({plumbing.first_line(e)})") from None


def main(argv=None):
    args = get_parser().parse_args(argv)
    check_strategies(args)
    if len(set(args.seeds)) < len(args.seeds):
        raise DataError(f"--seeds {' '.join(map(str, args.seeds))}: a seed given twice would count one run twice")
    if args.encoders is None:
        args.encoders = [n for n in DEFAULT_ZOO if n in BUILTIN or Path(n).is_dir()]
        for name in sorted(set(DEFAULT_ZOO) - set(args.encoders)):
            log(f"{name} does not exist yet (03 writes it): the zoo runs without the stage-1 rung")
    check_encoder_names(args.encoders)
    out_dir = Path(args.out)
    if (out_dir / "results.json").exists() and not args.overwrite:
        raise DataError(f"{out_dir} already holds probe results: --overwrite to replace them when this run ends, "
                        f"or another --out")
    plumbing.set_threads(args.threads)
    ddp = plumbing.init_distributed(args.device)
    plumbing.seed_everything(args.seeds[0])  # same seed on every rank: the aggregators must start identical
    if ddp.is_main:
        plumbing.remove_stale_temps(out_dir)
    _, questions = read_ted(args.benchmark)
    questions = subsample(questions, args.max_captions)
    pairs = load_pairs(args.caption_pairs, args.max_pairs)
    notice = pairs_mismatch(args)
    if notice:
        log(notice)
    args.feature_dtype = plumbing.DTYPES[args.feature_dtype]
    n_inst = len({q["key"] for q in questions})
    chance = 100.0 * sum(1 / (1 + len(q["negatives"])) for q in questions) / len(questions)
    log(f"benchmark {args.benchmark}: {len(questions)} questions over {n_inst} captions; "
        f"{len(pairs)} caption pairs; {ddp.world_size} process(es) on {ddp.device}, "
        f"{torch.get_num_threads()} thread(s) each")
    t0 = time.time()
    results = {"config": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(args).items()},
               "benchmark": {"questions": len(questions), "instances": n_inst, "chance": chance},
               "bag_of_words": bag_of_words_reference(questions), "encoders": {}}
    results["benchmark"]["beyond_words"] = sum(q["beyond_words"] for q in questions)
    results["config"]["world_size"] = ddp.world_size
    weights = {}
    for name in args.encoders:
        results["encoders"][name], w = probe_encoder(args, name, questions, pairs, ddp, out_dir)
        weights.update(w)
    results["total_s"] = time.time() - t0
    if ddp.is_main:
        write_results(out_dir, results, weights)
        log(markdown(results))
        log(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'} and {out_dir / 'aggregators'} "
            f"in {results['total_s']:.0f} s")
    plumbing.cleanup_distributed()
    return results


if __name__ == "__main__":
    plumbing.run_cli(main)
