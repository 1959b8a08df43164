"""Can a small DiT-style readout name the colours of a world caption from an encoder's features?

A readout shaped like the DiT's text path (RMSNorm -> MLP -> attention pooling by 4 learned queries ->
linear) learns the set of colours in N world image captions from frozen features; reported: exact-match
accuracy on 200 held-out captions every 100 steps. A diagnostic of whether a DiT could read an encoder.

    python experiments/colour_readout.py --encoder minilm
    python experiments/colour_readout.py --encoder tiny-qwen3vl-base --fusion layer:0 --standardise
"""
import random
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import models  # noqa: E402
import encoders  # noqa: E402
import plumbing  # noqa: E402
from world import scenes  # noqa: E402


class Whitener(nn.Module):
    """(x - mean) @ C^-1/2: every direction of the training tokens' features at unit variance (ZCA)."""

    def __init__(self, chunks, eps=1e-3):
        super().__init__()
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).double()
        self.mean = x.mean(0)
        vals, vecs = torch.linalg.eigh(torch.cov((x - self.mean).T))
        inv_sqrt = (vals.clamp(min=0) + eps * vals.mean()).rsqrt()
        self.mean, self.w = self.mean.float(), (vecs * inv_sqrt @ vecs.T).float()

    def forward(self, x):
        return (x - self.mean) @ self.w


class Readout(nn.Module):
    def __init__(self, dim, hidden=128, queries=4, classes=len(scenes.COLOURS), standardiser=None):
        super().__init__()
        self.standardiser = standardiser or nn.Identity()
        self.norm = nn.RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.q = nn.Parameter(torch.randn(queries, hidden) * 0.02)
        self.out = nn.Linear(queries * hidden, classes)

    def forward(self, f, m):
        x = self.mlp(self.norm(self.standardiser(f)))
        a = torch.einsum("qh,blh->bql", self.q, x).div(x.shape[-1] ** 0.5).masked_fill(~m[:, None], -1e9).softmax(-1)
        return self.out(torch.einsum("bql,blh->bqh", a, x).flatten(1))


def colour_captions(n, seed):
    """n world image captions (first style) and, for each, the set of its objects' colours."""
    rng = random.Random(seed)
    data = []
    for _ in range(n):
        scene = scenes.sample_scene(rng, "image")
        data.append((scenes.write_captions(scene, rng)[0], {o["colour"] for o in scene["objects"]}))
    return data


def readout_curve(bank, colour_sets, n_train, steps=400, lr=5e-4, seed=0, standardiser=None, every=100):
    """Train a Readout on the first n_train texts of `bank` to name their colour sets; (step, loss, held-out
    exact match on the rest) every `every` steps."""
    y = torch.tensor([[c in cs for c in scenes.COLOURS] for cs in colour_sets], dtype=torch.float32)
    torch.manual_seed(seed)
    model = Readout(bank.feats.shape[-1], standardiser=standardiser)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    held_out = bank.batch(list(range(n_train, len(colour_sets))), "cpu")
    curve = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (32,), generator=g).tolist()
        loss = nn.functional.binary_cross_entropy_with_logits(model(*bank.batch(idx, "cpu")), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            with torch.no_grad():
                exact = ((model(*held_out) > 0).float() == y[n_train:]).all(1).float().mean().item()
            curve.append((step, loss.item(), exact))
    return curve


def main():
    p = plumbing.ArgumentParser(__doc__)
    p.add_argument("--encoder", default="minilm")
    p.add_argument("--fusion", default="norm-avg")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--standardise", action="store_true", help="standardise features with the training tokens' stats")
    how.add_argument("--whiten", action="store_true", help="ZCA-whiten features with the training tokens' covariance")
    p.add_argument("--captions", type=int, default=600, help="training captions (200 more are held out)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    n = args.captions
    data = colour_captions(n + 200, args.seed)
    enc = encoders.load_encoder(args.encoder, cache_dir=args.cache_dir)
    feats, offsets = common.encode_texts(enc, models.LayerFusion(args.fusion, enc.num_layers), [c for c, _ in data], 160)
    standardiser = None
    if args.standardise:  # the DiT's own: statistics of the training captions' tokens
        standardiser = models.FeatureStandardiser(enc.width)
        standardiser.fit([feats[:int(offsets[n])]])
    if args.whiten:
        standardiser = Whitener([feats[:int(offsets[n])]])
    how = " standardised" if args.standardise else " whitened" if args.whiten else ""
    for step, loss, exact in readout_curve(common.FeatureBank(feats, offsets), [cs for _, cs in data], n, args.steps,
                                           args.lr, args.seed, standardiser):
        print(f"{args.encoder} {args.fusion}{how}: step {step}, loss {loss:.3f}, held-out exact match {exact:.3f}",
              flush=True)


if __name__ == "__main__":
    plumbing.run_cli(main)
