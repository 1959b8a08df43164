"""The diffusion side of GRAN-TED: a DiT for images and videos, rectified flow, EMA.

One model takes images (T=1) and videos (T frames) through the same 3D patch embedding, as the
paper's T2V model trains on both, interleaved. Text enters twice: cross-attention to the projected
per-token features (the paper's DiTs, Lumina-Image-2.0 and Wan2.1, both cross-attend to the text
encoder's features) and a masked mean of them added to the timestep embedding.

Built after DiT's models.py (adaLN-zero, sin-cos positions) and minRF (rectified flow in ~30 lines).
Pixel space: the built-in world is 32x32 RGB, so no VAE is needed.
"""
import copy
import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                 Embedding layers for timesteps, text and positions            #
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
                 mlp_ratio=4.0):
        super().__init__()
        self.config = dict(text_dim=text_dim, in_channels=in_channels, hidden=hidden, depth=depth,
                           heads=heads, patch=patch, tpatch=tpatch, mlp_ratio=mlp_ratio)
        self.in_channels, self.patch, self.tpatch = in_channels, patch, tpatch
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
        tokens, mask, pooled = self.y_embedder(text.to(self.y_embedder.norm.weight.dtype), text_mask)
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

    def __init__(self, ln=True):
        self.ln = ln  # logit-normal t (SD3): more training signal at mid noise levels than uniform t

    def loss(self, model, x, cond, t=None, noise=None):
        """Per-sample MSE [B] to the velocity target; `t`/`noise` may be given for reproducibility."""
        b = x.size(0)
        if t is None:
            t = torch.sigmoid(torch.randn(b, device=x.device)) if self.ln else torch.rand(b, device=x.device)
        noise = torch.randn_like(x) if noise is None else noise
        texp = t.view(b, *([1] * (x.dim() - 1))).to(x.dtype)
        zt = (1 - texp) * x + texp * noise
        vtheta = model(zt, t, *cond)
        return ((noise - x - vtheta.float()) ** 2).mean(dim=list(range(1, x.dim())))

    @torch.no_grad()
    def sample(self, model, noise, cond, null_cond=None, steps=50, cfg=4.0, renorm=0.0, trunc=1.0):
        """Euler from t=1 (noise) to t=0. With `null_cond`, classifier-free guidance:
        v = v_null + cfg * (v_cond - v_null), both halves in one batch. Lumina-Image-2.0's two
        guidance options: `renorm` > 0 caps each sample's |v| at renorm * |v_cond| (CFG-Renorm),
        and guidance runs only over the first `trunc` of the path from noise (CFG-Trunc; the
        conditional alone after that). renorm=0, trunc=1 is plain CFG."""
        z, b = noise, noise.size(0)
        cond_only = cond
        if null_cond is not None:
            nf, nm = null_cond
            null_cond = (nf.expand(b, -1, -1), nm.expand(b, -1))
            cond = pad_cat([cond, null_cond])
        dt = 1.0 / steps
        for i in range(steps, 0, -1):
            t = torch.full((b,), i / steps, device=z.device)
            if null_cond is None or (steps - i) >= trunc * steps:
                v = model(z, t, *cond_only).float()
            else:
                vc, vu = model(torch.cat([z, z]), torch.cat([t, t]), *cond).float().chunk(2)
                v = vu + cfg * (vc - vu)
                if renorm > 0:
                    dims = tuple(range(1, v.dim()))
                    cap = renorm * torch.linalg.vector_norm(vc, dim=dims, keepdim=True)
                    v = v * (cap / torch.linalg.vector_norm(v, dim=dims, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
            z = z - dt * v
        return z


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
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self):
        return {"decay": self.decay, "step": self.step, "model": self.model.state_dict()}

    def load_state_dict(self, sd):
        from common import load_state_dict_strict
        load_state_dict_strict(self.model, sd["model"], "EMA checkpoint")
        self.decay, self.step = sd["decay"], sd["step"]
