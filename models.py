"""The networks of GRAN-TED and what trains them: the probe's context aggregator and InfoNCE loss, layer
fusion (last / penultimate / Norm-Avg / softmax-weighted layers, the freeze rule, layer-weight files), the
DiT (after facebookresearch/DiT) with its text adapter and feature standardisation, rectified flow (after
minRF), EMA, the paper's diffusers backbones (Lumina-Image-2.0, Wan2.1) behind the DiT's call signature,
VAE latents, one validation of a model config, and the model file 04/05 write and 06 reads.

    from models import LayerFusion, ContextAggregator, DiT, RectifiedFlow
    feats = LayerFusion("norm-avg", enc.num_layers)(hidden)          # [n_layers, B, L, D] -> [B, L, D]
    z = ContextAggregator(enc.width, 256, 256)(feats, mask)          # [B, 256], L2-normalised
    model = DiT(text_dim=enc.width, hidden=128, depth=6, heads=4)
    loss = RectifiedFlow().loss(model, x, (feats, mask), t, noise)   # x: [B, 3, T, H, W] in [-1, 1]
"""
import copy
import functools
import hashlib
import inspect
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import plumbing
from plumbing import DataError, atomic_torch_save, first_line

CKPT_KIND = "gran-ted/dit"


#################################################################################
#                              Context aggregator                               #
#################################################################################

def _rope(x, pos):
    """Rotary position embedding on the last dim of x [B, H, L, d] at integer positions pos [L]."""
    d = x.shape[-1] // 2
    freqs = 1.0 / (10000 ** (torch.arange(d, device=x.device, dtype=torch.float32) / d))
    ang = pos.float()[:, None] * freqs[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Block(nn.Module):
    """Pre-LN transformer block, bidirectional attention with padded keys masked out."""

    def __init__(self, width, heads, mlp_ratio=4, rope=True):
        super().__init__()
        self.heads, self.rope = heads, rope
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def attn(self, x, keep):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.rope:  # text tokens at positions 0..L-2; the context token (index 0) is not rotated
            pos = torch.arange(L - 1, device=x.device)
            q = torch.cat([q[:, :, :1], _rope(q[:, :, 1:], pos)], 2)
            k = torch.cat([k[:, :, :1], _rope(k[:, :, 1:], pos)], 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, L, C))

    def forward(self, x, keep):
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


class ContextAggregator(nn.Module):
    """Learnable context token + pre-LN blocks over the text features -> one L2-normalised vector."""

    def __init__(self, in_width, width=None, out_dim=1024, heads=8, depth=2, mlp_ratio=4, rope=True):
        super().__init__()
        width = width or in_width
        if width % heads or (width // heads) % 2:
            raise DataError(f"aggregator width {width} must split into {heads} heads of even size")
        # The paper runs the blocks at the encoder's width; a projection lets CPU runs use a narrower one.
        self.inp = nn.Identity() if width == in_width else nn.Linear(in_width, width)
        self.context = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, rope) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)

    def forward(self, feats, mask):
        B = feats.shape[0]
        x = torch.cat([self.context.expand(B, -1, -1).to(feats.dtype), self.inp(feats)], 1)
        keep = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=mask.device), mask.bool()], 1)
        for block in self.blocks:
            x = block(x, keep)
        return F.normalize(self.out(self.norm(x[:, 0])).float(), dim=-1)


#################################################################################
#                                   InfoNCE                                     #
#################################################################################

def gather_with_grad(z):
    """All ranks' rows in rank order; gradients flow only into this rank's own rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, z.detach().contiguous())
    parts[dist.get_rank()] = z
    return torch.cat(parts)


def info_nce(za, zb, temperature=0.07):
    """Symmetric InfoNCE over the global batch: row i of za matches row i of zb, all others are negatives.

    Under DDP each rank computes the same global loss but its gradient reaches only its own rows, and
    DDP averages over ranks: multiply the loss by the world size before backward to get the exact
    single-process gradient (02 does).
    """
    za, zb = gather_with_grad(za.float()), gather_with_grad(zb.float())
    logits = za @ zb.T / temperature
    labels = torch.arange(len(za), device=za.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


#################################################################################
#                                 Layer fusion                                  #
#################################################################################

def norm_layers(hidden):
    """Parameter-free LayerNorm of every layer, in fp32."""
    h = hidden.float()
    return F.layer_norm(h, h.shape[-1:])


class LayerFusion(nn.Module):
    """Turn [n_layers, B, L, D] hidden states into one [B, L, D] feature sequence."""

    MODES = ("last", "penultimate", "avg", "norm-avg", "learned", "frozen")

    def __init__(self, mode, num_layers, weights=None):
        super().__init__()
        self.mode, self.num_layers, self.index = mode, num_layers, None
        if mode.startswith("layer:"):
            try:
                k = int(mode.split(":", 1)[1])
            except ValueError:
                raise DataError(f"fusion {mode!r}: layer:K needs an integer K") from None
            if not -num_layers <= k < num_layers:
                raise DataError(f"fusion {mode!r}: K must be in [{-num_layers}, {num_layers - 1}]")
            self.index = k
        elif mode == "last":
            self.index = -1
        elif mode == "penultimate":
            if num_layers < 2:
                raise DataError("fusion penultimate needs at least 2 layers")
            self.index = -2
        elif mode not in self.MODES:
            raise DataError(f"unknown fusion {mode!r}: one of {', '.join(self.MODES)}, layer:K")
        if mode == "learned":
            # zeros -> softmax = 1/N: starts exactly at norm-avg
            self.logits = nn.Parameter(torch.zeros(num_layers))
        if mode == "frozen":
            if weights is None:
                raise DataError("fusion frozen needs layer weights (load_layer_weights)")
            weights = torch.as_tensor(weights, dtype=torch.float32)
            if weights.shape != (num_layers,):
                raise DataError(f"fusion frozen: {tuple(weights.shape)} weights for {num_layers} layers")
            self.register_buffer("weights", weights)

    def layer_weights(self):
        """Softmax layer weights (learned / frozen), else None."""
        if self.mode == "learned":
            return torch.softmax(self.logits, 0)
        if self.mode == "frozen":
            return self.weights
        return None

    def forward(self, hidden):
        if hidden.shape[0] != self.num_layers:
            raise DataError(f"fusion {self.mode}: got {hidden.shape[0]} layers, built for {self.num_layers}")
        if self.index is not None:
            return hidden[self.index].float()
        if self.mode == "avg":
            return hidden.float().mean(0)
        normed = norm_layers(hidden)
        if self.mode == "norm-avg":
            return normed.mean(0)
        return torch.einsum("n,nbld->bld", self.layer_weights().to(normed.dtype), normed)


def save_layer_weights(path, fusion, encoder_name, num_layers):
    """Write the softmax layer weights with the encoder they belong to (atomic)."""
    w = fusion.layer_weights()
    if w is None:
        raise DataError(f"fusion {fusion.mode} has no layer weights to save")
    atomic_torch_save({"encoder": encoder_name, "num_layers": int(num_layers), "weights": w.detach().float().cpu(),
                       "logits": fusion.logits.detach().cpu() if fusion.mode == "learned" else None}, path)


def load_layer_weights(path, encoder_name, num_layers):
    """Softmax layer weights from `save_layer_weights`; refuses another encoder or layer count."""
    blob = plumbing.load_torch(path, "layer-weights file")
    if not {"encoder", "num_layers", "weights"} <= set(blob):
        raise DataError(f"{path}: not a layer-weights file (needs encoder, num_layers, weights)")
    if blob["encoder"] != encoder_name or blob["num_layers"] != num_layers:
        raise DataError(f"{path}: layer weights are for encoder {blob['encoder']!r} with {blob['num_layers']} "
                        f"layers, not {encoder_name!r} with {num_layers}")
    w = blob["weights"].float()
    if w.shape != (num_layers,) or not torch.isfinite(w).all():
        raise DataError(f"{path}: weights of shape {tuple(w.shape)} or not finite")
    return w


class FreezeCriterion:
    """Converged when no softmax weight moved more than `tol` over the last `window` steps."""

    def __init__(self, window=200, tol=2e-3):
        self.window, self.tol = window, tol
        self.history = []  # softmax weights, one entry per step, the last window+1 kept

    def update(self, weights):
        """Record this step's weights; True once the window shows convergence."""
        self.history = (self.history + [weights.detach().float().cpu()])[-(self.window + 1):]
        if len(self.history) <= self.window:
            return False
        # Every step of the window, not just its two ends: an oscillation can return to where it was.
        return (torch.stack(self.history) - self.history[-1]).abs().max().item() < self.tol

    def state_dict(self):
        return {"history": self.history}

    def load_state_dict(self, sd):
        self.history = list(sd["history"])


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#        Embedding layers for timesteps, text (the DiT's adapter), positions    #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Scalar t in [0, 1] -> vector, through sinusoids and an MLP (DiT's, with t scaled by 1000)."""

    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class TextEmbedder(nn.Module):
    """Encoder features [B, L, D_text] -> [B, L+1, hidden] tokens plus a pooled vector [B, hidden].

    RMSNorm before the projection as in Lumina-Image-2.0's caption embedder, because raw LLM
    layers (`last`) have a very different scale from Norm-Avg features. One learned register token
    is appended to every caption so cross-attention always has a valid key, even for a caption
    that tokenises to nothing (the empty caption of a decoder-only encoder)."""

    def __init__(self, text_dim, hidden):
        super().__init__()
        self.norm = nn.RMSNorm(text_dim, eps=1e-6)
        self.proj = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(approximate="tanh"),
                                  nn.Linear(hidden, hidden))
        self.register = nn.Parameter(torch.randn(hidden) * 0.02)

    def forward(self, feats, mask):
        tokens = self.proj(self.norm(feats))
        m = mask.to(tokens.dtype).unsqueeze(-1)
        pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1)
        tokens = torch.cat([tokens, self.register.view(1, 1, -1).expand(len(tokens), 1, -1).to(tokens.dtype)], dim=1)
        mask = torch.cat([mask.bool(), mask.new_ones(len(mask), 1, dtype=torch.bool)], dim=1)
        return tokens, mask, pooled


class FeatureStandardiser(nn.Module):
    """(x - mean) / std per text-feature dimension, with the statistics of the training captions' tokens
    fixed before training (buffers: saved with the model, applied alike at train and sample time).

    Decoder LLM features reach the DiT dominated by a few huge dimensions (after RMSNorm, 5 of SmolLM2's
    576 hold most of the energy), so a small DiT reads little else; the paper's long training lets its
    caption embedder learn this scaling, a miniature run does not have the steps to."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, chunks):
        """Set mean and std from an iterable of [tokens, dim] feature chunks (float64 sums)."""
        n, s, sq = 0, 0.0, 0.0
        for x in chunks:
            x = x.reshape(-1, x.shape[-1]).double()
            n, s, sq = n + len(x), s + x.sum(0), sq + (x * x).sum(0)
        mean = s / max(n, 1)
        std = (sq / max(n, 1) - mean * mean).clamp(min=0).sqrt()
        # A (near-)constant dimension would turn float noise into signal: floor its std.
        std = std.clamp(min=1e-2 * float(std.mean()) + 1e-12)
        self.mean.copy_(mean.float())
        self.std.copy_(std.float())

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def sincos_1d(dim, pos):
    """Fixed sin-cos embedding [len(pos), dim] of positions `pos` (float array)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", np.asarray(pos, dtype=np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=16)
def sincos_3d(dim, t, h, w):
    """[t*h*w, dim] positions: a quarter of the channels for time, three eighths each for y and x."""
    dt = dim // 4 // 2 * 2
    ds = (dim - dt) // 2 // 2 * 2
    dt = dim - 2 * ds
    gt, gy, gx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.concatenate([sincos_1d(dt, gt), sincos_1d(ds, gy), sincos_1d(ds, gx)], axis=1)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head attention; self-attention when `ctx` is None, else cross-attention to `ctx`."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x, ctx=None, ctx_mask=None):
        B, N, C = x.shape
        ctx = x if ctx is None else ctx
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if ctx_mask is None else ctx_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, N, C))


class DiTBlock(nn.Module):
    """Self-attention and MLP under adaLN-zero; cross-attention to the text between them (PixArt-alpha)."""

    def __init__(self, hidden, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.cross = Attention(hidden, heads)
        self.norm3 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c, text, text_mask):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross(self.norm2(x), text, text_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer over [B, C, T, H, W] (T=1: an image) conditioned on text features.

    Patches are pt x p x p; an image (T=1 < pt) is repeated to pt frames on the way in and its pt
    output frames averaged on the way out, so images and videos share one patch embedding."""

    def __init__(self, text_dim, in_channels=3, hidden=192, depth=3, heads=6, patch=4, tpatch=2,
                 mlp_ratio=4.0, standardise=False):
        super().__init__()
        self.config = dict(text_dim=text_dim, in_channels=in_channels, hidden=hidden, depth=depth,
                           heads=heads, patch=patch, tpatch=tpatch, mlp_ratio=mlp_ratio, standardise=standardise)
        self.in_channels, self.patch, self.tpatch = in_channels, patch, tpatch
        self.text_standardiser = FeatureStandardiser(text_dim) if standardise else nn.Identity()
        self.x_embedder = nn.Conv3d(in_channels, hidden, (tpatch, patch, patch), stride=(tpatch, patch, patch))
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = TextEmbedder(text_dim, hidden)
        # Images and videos share positions at t=0; tell the model which one it is denoising.
        self.kind_embed = nn.Embedding(2, hidden)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, tpatch * patch * patch * in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.bias, 0)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.kind_embed.weight, std=0.02)
        # adaLN-zero: every block's gates and the output layer start at zero, so the untrained
        # network is the identity on its residual stream and predicts v = 0; DiT found this
        # initialisation trains faster and more stably than any other conditioning variant.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x, t, h, w):
        """[B, t*h*w, pt*p*p*C] -> [B, C, t*pt, h*p, w*p]."""
        B, p, pt, C = x.shape[0], self.patch, self.tpatch, self.in_channels
        x = x.view(B, t, h, w, pt, p, p, C)
        return torch.einsum("bthwipqc->bctihpwq", x).reshape(B, C, t * pt, h * p, w * p)

    def forward(self, x, t, text, text_mask):
        """x [B,C,T,H,W], t [B] in [0,1], text [B,L,D_text], text_mask [B,L] bool -> velocity like x."""
        T = x.shape[2]
        if T % self.tpatch and T != 1:
            raise ValueError(f"frames ({T}) must be 1 or a multiple of the temporal patch ({self.tpatch})")
        if T == 1:
            x = x.expand(-1, -1, self.tpatch, -1, -1)
        x = self.x_embedder(x.to(self.x_embedder.weight.dtype))  # [B, hidden, t, h, w]
        _, hidden, tt, hh, ww = x.shape
        pos = torch.from_numpy(sincos_3d(hidden, tt, hh, ww)).to(x.device, x.dtype)
        x = x.flatten(2).transpose(1, 2) + pos
        text = self.text_standardiser(text.to(self.y_embedder.norm.weight.dtype))
        tokens, mask, pooled = self.y_embedder(text, text_mask)
        kind = torch.full((len(x),), int(T > 1), device=x.device, dtype=torch.long)
        c = self.t_embedder(t) + pooled + self.kind_embed(kind)
        for block in self.blocks:
            x = block(x, c, tokens, mask)
        x = self.unpatchify(self.final_layer(x, c), tt, hh, ww)
        return x.mean(2, keepdim=True) if T == 1 else x


#################################################################################
#                        Rectified flow (after minRF)                           #
#################################################################################

def pad_cat(conds):
    """Concatenate (feats [B,L,D], mask [B,L]) pairs along the batch, right-padding L to the longest."""
    L = max(f.shape[1] for f, _ in conds)
    feats = torch.cat([F.pad(f, (0, 0, 0, L - f.shape[1])) for f, _ in conds])
    mask = torch.cat([F.pad(m.bool(), (0, L - m.shape[1])) for _, m in conds])
    return feats, mask


class RectifiedFlow:
    """x_t = (1 - t) x + t noise, t=1 is noise; the model predicts the velocity noise - x."""

    @staticmethod
    def draw_t(b, generator=None):
        """Logit-normal t (SD3's choice): more training signal at mid noise levels than uniform t."""
        return torch.sigmoid(torch.randn(b, generator=generator))

    def loss(self, model, x, cond, t, noise):
        """Per-sample MSE [B] to the velocity target at times `t` [B] with `noise` shaped like x."""
        b = x.size(0)
        texp = t.view(b, *([1] * (x.dim() - 1))).to(x.dtype)
        zt = (1 - texp) * x + texp * noise
        vtheta = model(zt, t, *cond)
        return ((noise - x - vtheta.float()) ** 2).mean(dim=list(range(1, x.dim())))

    @torch.no_grad()
    def sample(self, model, noise, cond, null_cond=None, steps=50, cfg=4.0):
        """Euler from t=1 (noise) to t=0. With `null_cond`, classifier-free guidance:
        v = v_null + cfg * (v_cond - v_null), both halves in one batch."""
        z, b = noise, noise.size(0)
        if null_cond is not None:
            nf, nm = null_cond
            null_cond = (nf.expand(b, -1, -1), nm.expand(b, -1))
            cond = pad_cat([cond, null_cond])
        dt = 1.0 / steps
        for i in range(steps, 0, -1):
            t = torch.full((b,), i / steps, device=z.device)
            if null_cond is None:
                v = model(z, t, *cond).float()
            else:
                vc, vu = model(torch.cat([z, z]), torch.cat([t, t]), *cond).float().chunk(2)
                v = vu + cfg * (vc - vu)
            z = z - dt * v
        return z


#################################################################################
#        Diffusers backbones (Lumina-Image-2.0, Wan2.1) and VAE latents          #
#################################################################################

# The paper's models are diffusers classes; these wrap them in DiT's call signature so RectifiedFlow,
# CFG sampling, EMA, resume, DDP and 04's layer weights drive them unchanged. Tiny configs for the CPU
# miniature; `--backbone-config paper` gives the paper's sizes (Lumina-Image-2.0 2B; Wan2.1-T2V-1.3B).
BACKBONES = ("dit", "lumina2", "wan")
BACKBONE_CONFIGS = {
    "lumina2": {"tiny": dict(patch_size=2, hidden_size=32, num_layers=2, num_refiner_layers=1, num_attention_heads=2,
                             num_kv_heads=1, multiple_of=16, axes_dim_rope=[4, 6, 6], axes_lens=[300, 512, 512]),
                "paper": dict(patch_size=2, hidden_size=2304, num_layers=26, num_refiner_layers=2,
                              num_attention_heads=24, num_kv_heads=8, multiple_of=256, norm_eps=1e-5,
                              axes_dim_rope=[32, 32, 32], axes_lens=[300, 512, 512])},
    "wan": {"tiny": dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2,
                         freq_dim=32, rope_max_seq_len=1024),
            "paper": dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                          num_layers=30, freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                          eps=1e-6, rope_max_seq_len=1024)},
}
# (The rotary tables stay at full length in the tiny configs: they bound the caption length and the
# latent size, and cost next to nothing.)
# The layers that read the text encoder's features: re-initialised for a new encoder (the paper does
# this for Wan2.1-1.3B), everything else kept from the pretrained weights.
TEXT_EMBEDDER = {"lumina2": "time_caption_embed.caption_embedder.", "wan": "condition_embedder.text_embedder."}


def diffusers_class(backbone):
    import diffusers
    return {"lumina2": diffusers.Lumina2Transformer2DModel, "wan": diffusers.WanTransformer3DModel}[backbone]


def _transformer_folder(path):
    """from_pretrained kwargs for pretrained weights: a whole pipeline folder keeps it in transformer/."""
    return {"subfolder": "transformer"} if (Path(path) / "transformer" / "config.json").is_file() else {}


def pretrained_transformer(backbone, spec):
    """--backbone-config names pretrained weights (a diffusers folder or hub id) unless it is tiny, paper, a
    JSON file or a JSON object; then that, else None."""
    if backbone == "dit" or spec in BACKBONE_CONFIGS[backbone] or spec.lstrip().startswith("{") or Path(spec).is_file():
        return None
    return spec


def read_backbone_config(backbone, spec):
    """--backbone-config 'tiny', 'paper', a JSON file or a JSON string -> constructor kwargs."""
    if spec in BACKBONE_CONFIGS[backbone]:
        return dict(BACKBONE_CONFIGS[backbone][spec])
    try:
        cfg = json.loads(Path(spec).read_text() if Path(spec).is_file() else spec)
    except (ValueError, OSError):
        cfg = None
    if not isinstance(cfg, dict):
        raise DataError(f"--backbone-config {spec!r}: expected tiny, paper, a JSON file or object, or a diffusers "
                        f"folder or hub id")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}  # a diffusers config.json works as is


def backbone_config(backbone, spec, channels, text_dim):
    """The diffusers constructor kwargs of a run: --backbone-config (a pretrained model's own config, when it
    names one) with its channels set to the data's and its text width to the encoder's."""
    pretrained = pretrained_transformer(backbone, spec)
    if pretrained:
        try:
            cfg = diffusers_class(backbone).load_config(pretrained, **_transformer_folder(pretrained))
        except (OSError, ValueError) as e:
            raise DataError(f"--backbone-config {pretrained}: no {backbone} transformer config "
                            f"({first_line(e)})") from None
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    else:
        cfg = read_backbone_config(backbone, spec)
    known = set(inspect.signature(diffusers_class(backbone).__init__).parameters) - {"self"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise DataError(f"--backbone-config: {backbone} has no option {unknown[0]!r}")
    cfg.update(in_channels=channels, out_channels=channels)
    cfg["text_dim" if backbone == "wan" else "cap_feat_dim"] = text_dim
    return cfg


class DiffusersBackbone(nn.Module):
    """A diffusers Lumina2Transformer2DModel or WanTransformer3DModel behind DiT's forward(x, t, text,
    text_mask) -> velocity, with t=1 noise and velocity = noise - x (RectifiedFlow's convention).

    Each library's own convention is kept, so pretrained weights predict what they were trained to:
    Wan's flow-matching timestep is sigma * 1000 and it predicts noise - x; Lumina-Image-2.0 reads
    t = 1 - sigma (t=0 noise) and predicts x - noise, so its output is negated (as its pipeline does).
    Lumina2 is an image model: a video batch is refused (train it with --interleave 1:0, or use wan)."""

    def __init__(self, backbone, config, standardise=False):
        super().__init__()
        self.backbone, self.config = backbone, dict(config)
        self.net = diffusers_class(backbone)(**config)
        text_dim = config["text_dim" if backbone == "wan" else "cap_feat_dim"]
        self.text_standardiser = FeatureStandardiser(text_dim) if standardise else nn.Identity()

    def forward(self, x, t, text, text_mask):
        mask = text_mask.bool().clone()
        # The empty caption (CFG's null condition) may tokenise to nothing; give it one zero token so
        # attention always has a key. Padding is zero, as both pipelines pad.
        mask[:, 0] |= ~mask.any(1)
        text = self.text_standardiser(text) * mask.unsqueeze(-1).to(text.dtype)
        if self.backbone == "wan":
            return self.net(x, t * 1000, text, return_dict=False)[0]
        if x.shape[2] != 1:
            raise DataError(f"lumina2 is an image model and got a {x.shape[2]}-frame video: "
                            "train it with --interleave 1:0 (images only), or use --backbone wan")
        if text.shape[1] >= self.config["axes_lens"][0]:  # caption tokens take rotary positions 0..L-1
            raise DataError(f"lumina2: a caption of {text.shape[1]} tokens needs axes_lens[0] > {text.shape[1]} "
                            f"(it is {self.config['axes_lens'][0]}); lower --max-length or raise it")
        return -self.net(x[:, :, 0], 1 - t, text, mask, return_dict=False)[0].unsqueeze(2)


def load_pretrained_transformer(model, path):
    """Copy the pretrained weights at `path` into `model` (a DiffusersBackbone) except the text embedder,
    which keeps its fresh init at the encoder's width. Returns the names of the parameters kept."""
    try:
        src = diffusers_class(model.backbone).from_pretrained(path, **_transformer_folder(path)).state_dict()
    except (OSError, ValueError, EnvironmentError) as e:
        raise DataError(f"--backbone-config {path}: cannot load a {model.backbone} transformer "
                        f"({first_line(e)})") from None
    skip = TEXT_EMBEDDER[model.backbone]
    own = model.net.state_dict()
    kept = {k: v for k, v in src.items() if not k.startswith(skip)}
    bad = [k for k, v in kept.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if not k.startswith(skip) and k not in kept]
    if bad or missing:
        raise DataError(f"--backbone-config {path}: does not fit the {model.backbone} being built "
                        f"({(bad + missing)[0]!r}; e.g. its in_channels differ from the data's)")
    with torch.no_grad():
        for k, v in kept.items():
            own[k].copy_(v)
    return sorted(kept)


MAX_PARAMS = 20e9  # a config that asks for more is a typo, refused before anything is allocated


def check_model_config(config, where):
    """One check of a run config, from flags or from a model file, before anything is built: the keys,
    types and ranges the denoiser needs, the media's divisibility by its patch, and its size (counted on
    the meta device, so a huge config fails fast instead of allocating)."""
    def need(key, ok, what, within=config):
        if not ok(within.get(key)):
            raise DataError(f"{where}: {key} must be {what}, got {within.get(key)!r}")
        return within[key]
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65536  # noqa: E731
    backbone = need("backbone", lambda v: v in BACKBONES, f"one of {', '.join(BACKBONES)}")
    need("text_norm", lambda v: v in ("standardise", "none"), "standardise or none")
    for key in ("text_dim", "channels"):
        need(key, count, "an integer in [1, 65536]")
    if backbone == "dit":
        pair = lambda v: isinstance(v, list) and len(v) == 2 and all(map(count, v))  # noqa: E731
        hidden, depth = need("dit", pair, "[width, depth], integers in [1, 65536]")
        patch = need("patch", pair, "[side, frames], integers in [1, 65536]")[0]
        if hidden % HEAD_DIM:
            raise DataError(f"{where}: DiT width {hidden} is not a multiple of the head width {HEAD_DIM}")
        if 12 * depth * hidden ** 2 > MAX_PARAMS:  # the blocks' weights, before building any
            raise DataError(f"{where}: depth {depth} x width {hidden} is over {MAX_PARAMS / 1e9:.0f}B parameters")
    else:
        kwargs = need("backbone_kwargs", lambda v: isinstance(v, dict), "the backbone's constructor options")
        defaults = inspect.signature(diffusers_class(backbone).__init__).parameters
        for key in kwargs:
            if key in defaults and isinstance(defaults[key].default, int) and not isinstance(defaults[key].default, bool):
                need(key, count, "an integer in [1, 65536]", within=kwargs)
        patch = kwargs.get("patch_size", 2)
        patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
    latent = next(iter((config.get("latent_shape") or {}).values()), None)
    side = latent[-1] if latent else need("size", count, "an integer in [1, 65536]") if "size" in config else patch
    if side % patch:
        raise DataError(f"{where}: the {side}-pixel side{' (latent)' if config.get('latent_shape') else ''} is not "
                        f"divisible by the patch {patch}")
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in _build_model(config).parameters())
    except Exception as e:  # a backbone's own check of its options (heads vs width, ...)
        raise DataError(f"{where}: {backbone} cannot be built from this config ({first_line(e)})") from None
    if n > MAX_PARAMS:
        raise DataError(f"{where}: this config has {n / 1e9:.0f}B parameters (more than {MAX_PARAMS / 1e9:.0f}B)")


def make_model(config, where="the run config"):
    """The denoiser a run config describes, once check_model_config accepts it."""
    check_model_config(config, where)
    return _build_model(config)


def _build_model(config):
    if config["backbone"] == "dit":
        return DiT(**dit_shape(config))
    return DiffusersBackbone(config["backbone"], config["backbone_kwargs"], config["text_norm"] == "standardise")


# --vae: media are encoded once into latents, which the denoiser trains on and 06 decodes. An image is
# a 1-frame video. Wan's VAE takes 1 + f*k frames (f = its temporal factor, 4 for Wan2.1) and gives
# 1 + k latent frames, so a video of T frames is padded by repeating its last frame up to the next
# 1 + f*k (the world's 8 -> 9 -> 3 latent frames) and the decoded video is cut back to T.
TINY_VAE = "tiny-wan-vae"


def load_vae(name, device="cpu"):
    """(VAE in eval mode, its identity for the latent cache) from `tiny-wan-vae` (random, built
    deterministically: for tests and the CPU miniature), a local folder or a hub id."""
    import diffusers
    if name == TINY_VAE:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                                             temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                             latents_std=[1.0] * 4)
    else:
        path = Path(name)
        sub = {"subfolder": "vae"} if (path / "vae").is_dir() else {}
        cls_name = None
        cfg_file = path / sub.get("subfolder", "") / "config.json"
        if cfg_file.is_file():
            cls_name = json.loads(cfg_file.read_text()).get("_class_name")
        cls = diffusers.AutoencoderKLWan if cls_name in (None, "AutoencoderKLWan") else diffusers.AutoencoderKL
        try:
            vae = cls.from_pretrained(name, **sub)
        except (OSError, ValueError, EnvironmentError) as e:
            raise DataError(f"VAE {name}: cannot be loaded ({first_line(e)})") from None
    vae = vae.to(device).eval().requires_grad_(False)
    h = hashlib.sha256()
    for k, v in sorted(vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return vae, f"{type(vae).__name__}:{h.hexdigest()[:20]}"


def vae_temporal_factor(vae):
    """Input frames per latent frame (after the first): 2 ** (temporal downsamplings); 1 for an image VAE."""
    return 2 ** sum(vae.config.get("temperal_downsample") or [])


def vae_spatial_factor(vae):
    """Pixels per latent pixel along a side: 2 ** (spatial downsamplings)."""
    cfg = vae.config
    return 2 ** (len(cfg["temperal_downsample"]) if "temperal_downsample" in cfg else len(cfg["block_out_channels"]) - 1)


def _latent_norm(vae, like):
    """(shift, scale) with latent = (z - shift) * scale, as the VAE's own pipelines normalise."""
    cfg = vae.config
    if cfg.get("latents_mean") is not None:  # Wan: per-channel statistics; AutoencoderKL: shift and scale
        view = (1, -1) + (1,) * (like.dim() - 2)
        mean = torch.tensor(cfg["latents_mean"], dtype=like.dtype, device=like.device).view(view)
        std = torch.tensor(cfg["latents_std"], dtype=like.dtype, device=like.device).view(view)
        return mean, 1 / std
    return cfg.get("shift_factor") or 0.0, cfg.get("scaling_factor", 1.0)


@torch.no_grad()
def vae_encode(vae, x):
    """Pixels [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, C, T', h, w] (the posterior mean)."""
    if isinstance(vae, _image_vae_types()):
        z = vae.encode(x.permute(0, 2, 1, 3, 4).flatten(0, 1)).latent_dist.mean  # frames as images
        z = z.view(x.shape[0], x.shape[2], *z.shape[1:]).permute(0, 2, 1, 3, 4)
    else:
        T, f = x.shape[2], vae_temporal_factor(vae)
        if T > 1 and (T - 1) % f:
            x = torch.cat([x, x[:, :, -1:].expand(-1, -1, f - (T - 1) % f, -1, -1)], dim=2)
        z = vae.encode(x).latent_dist.mean
    shift, scale = _latent_norm(vae, z)
    return (z - shift) * scale


@torch.no_grad()
def vae_decode(vae, z, frames):
    """Normalised latents -> pixels [B, 3, frames, H, W] in about [-1, 1]."""
    shift, scale = _latent_norm(vae, z)
    z = z / scale + shift
    if isinstance(vae, _image_vae_types()):
        x = vae.decode(z.permute(0, 2, 1, 3, 4).flatten(0, 1)).sample
        return x.view(z.shape[0], z.shape[2], *x.shape[1:]).permute(0, 2, 1, 3, 4)[:, :, :frames]
    return vae.decode(z).sample[:, :, :frames]


def _image_vae_types():
    import diffusers
    return (diffusers.AutoencoderKL,)


#################################################################################
#                                      EMA                                      #
#################################################################################

class EMA:
    """Exponential moving average of a model's weights, with DiT's/timm's warm-up of the decay so
    that short runs are not averaged towards their random initialisation."""

    def __init__(self, model, decay=0.999):
        self.decay = decay
        self.step = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        # One fused call over all tensors: a per-tensor loop costs more than the arithmetic at this size.
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self):
        return {"decay": self.decay, "step": self.step, "model": self.model.state_dict()}

    def load_state_dict(self, sd):
        plumbing.load_state_dict(self.model, sd["model"], "EMA checkpoint")
        self.decay, self.step = sd["decay"], sd["step"]


#################################################################################
#                            The model file (04/05 -> 06)                       #
#################################################################################

HEAD_DIM = 32  # our DiT's attention heads: width / HEAD_DIM of them


def dit_shape(config):
    """DiT constructor arguments from a run config (--dit WIDTHxDEPTH, --patch SIDExFRAMES)."""
    (hidden, depth), (patch, tpatch) = config["dit"], config["patch"]
    return dict(text_dim=config["text_dim"], hidden=hidden, depth=depth, heads=hidden // HEAD_DIM, patch=patch,
                tpatch=tpatch, in_channels=config["channels"], standardise=config["text_norm"] == "standardise")


def save_model(out, ema, fusion, config, step):
    """OUT/model.safetensors: the EMA weights, the layer fusion and the run config (what 06 loads)."""
    tensors = {f"dit.{k}": v for k, v in ema.model.state_dict().items()}
    tensors.update({f"fusion.{k}": v for k, v in fusion.state_dict().items()})  # logits or weights
    meta = {"kind": CKPT_KIND, "step": str(step), "config": json.dumps(config)}
    plumbing.atomic_save_safetensors(tensors, Path(out) / "model.safetensors", metadata=meta)


def load_dit(path, device="cpu"):
    """(DiT with the EMA weights in eval mode, run config, LayerFusion as trained, step) from a
    model.safetensors written by DiffusionRun.save, or a run folder holding one."""
    from safetensors import safe_open
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise DataError(f"{path}: no such file (train with 05_train_diffusion.py first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise DataError(f"{path}: not a safetensors file ({type(e).__name__})") from None
    if meta.get("kind") != CKPT_KIND:
        raise DataError(f"{path}: not a DiT written by 04/05 (no {CKPT_KIND!r} tag)")
    try:
        config = json.loads(meta["config"])
    except (KeyError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise DataError(f"{path}: its metadata holds no run config (a JSON object under 'config')")
    model = make_model(config, str(path))
    plumbing.load_state_dict(model, {k[4:]: v for k, v in tensors.items() if k.startswith("dit.")}, str(path))
    fusion_state = {k[7:]: v for k, v in tensors.items() if k.startswith("fusion.")}
    try:
        fusion = LayerFusion(config["fusion"], config["num_layers"], weights=fusion_state.get("weights"))
        step = int(meta["step"])
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path}: its run config has no usable layer fusion or step ({first_line(e)})") from None
    plumbing.load_state_dict(fusion, fusion_state, f"{path} (layer fusion)")
    return model.to(device).eval(), config, fusion.to(device), step
