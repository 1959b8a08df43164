"""Stage 2: train the DiT on text-to-image and text-to-video, interleaved 7:3, under the frozen encoder.

The paper trains Lumina-Image-2.0 (T2I) and Wan2.1 (T2V, image and video steps interleaved 7:3, batch
512:128) on the text encoder's fused layer features. Here one pixel-space DiT (dit.py) learns both
from the built-in world, with the same schedule scaled down (8 images : 2 videos a step).

    python 05_train_diffusion.py                                   # built-in world, CPU: 9000 steps, ~18 min
    python 05_train_diffusion.py --threads 0                       # torch's thread count (many idle cores)
    python 05_train_diffusion.py --steps 20000 --encoder minilm --fusion last
    python 05_train_diffusion.py --resume                          # continue the latest checkpoint
    # stage 2 after 04_train_layer_weights.py (learned weights, frozen):
    python 05_train_diffusion.py --fusion frozen --layer-weights runs/layer_weights/layer_weights.pt \
        --init-from runs/layer_weights/checkpoints/step_XXXXXXXX.pt
    # one node, N processes (gloo on CPU, nccl on GPU); batch sizes are global:
    torchrun --nproc_per_node=2 05_train_diffusion.py
    # multi-node:
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        05_train_diffusion.py --data my_t2x.jsonl --encoder runs/stage1/model

Data: a jsonl of {"media": path, "caption": str, "kind": "image"|"video"} (runs/world/t2x.jsonl by
default); PNG/JPG images, GIF/MP4 videos, resized and centre-cropped to --size, videos sampled to
--frames frames. Media are decoded once into memory (fine for the world; a real corpus would stream).

Text features for every unique caption (and the empty caption, the CFG null condition) are computed
once and cached under --cache-dir, in a file whose name hashes encoder, layer choice, dtype, max
length and the texts, so a stale cache can never be read. Fixed fusions (last, penultimate, layer:K,
norm-avg, frozen) cache the fused features; `learned` caches the normalised per-layer features and
trains its softmax layer weights with the DiT in their own optimiser parameter group.

`train(args, hook=None)` is the loop; 04_train_layer_weights.py calls it with a `FusionHook`.
"""
import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageSequence
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import common
from common import DataError, log
from dit import DiT, EMA, RectifiedFlow

KINDS = ("image", "video")
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
VIDEO_EXT = {".gif", ".mp4", ".webm", ".avi", ".mov"}


#################################################################################
#                                   Media                                       #
#################################################################################

def _fit(frame, size):
    """PIL image -> RGB uint8 [size, size, 3]: shorter side resized to `size`, then centre-cropped."""
    frame = frame.convert("RGB")
    w, h = frame.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        frame = frame.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = frame.size
        left, top = (w - size) // 2, (h - size) // 2
        frame = frame.crop((left, top, left + size, top + size))
    return np.asarray(frame, dtype=np.uint8)


def read_media(path, kind, size, frames):
    """uint8 [3, T, size, size] (T=1 for an image, `frames` for a video, sampled evenly)."""
    path = Path(path)
    ext = path.suffix.lower()
    if kind == "image":
        with Image.open(path) as im:
            arr = _fit(im, size)[None]
    elif ext == ".gif":
        with Image.open(path) as im:
            arr = np.stack([_fit(f, size) for f in ImageSequence.Iterator(im)])
    else:
        import imageio.v3 as iio
        arr = np.stack([_fit(Image.fromarray(f), size) for f in iio.imread(path)])
    if kind == "video":
        if ext not in VIDEO_EXT:
            raise ValueError(f"not a video file ({ext})")
        arr = arr[np.linspace(0, len(arr) - 1, frames).round().astype(int)]
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(3, 0, 1, 2)


def load_t2x(path, size, frames, max_bad=0.01):
    """Records and decoded media of a t2x jsonl, per kind. Unreadable media are skipped and
    counted; more than `max_bad` of them stops the run."""
    records = common.read_jsonl(path, required=("media", "caption", "kind"))
    data = {k: {"media": [], "captions": []} for k in KINDS}
    bad = []
    for i, rec in enumerate(records, 1):
        if rec["kind"] not in KINDS:
            raise DataError(f"{path}: record {i}: kind must be 'image' or 'video', got {rec['kind']!r}")
        if not isinstance(rec["caption"], str):
            raise DataError(f"{path}: record {i}: caption must be a string")
        media = common.resolve_media(path, rec["media"])
        try:
            x = read_media(media, rec["kind"], size, frames)
        except Exception as e:  # any decoder failure means the same thing: skip and count
            bad.append(f"record {i} ({media}): {type(e).__name__}: {e}")
            continue
        data[rec["kind"]]["media"].append(x)
        data[rec["kind"]]["captions"].append(rec["caption"])
    if len(bad) > max_bad * len(records):
        raise DataError(f"{path}: {len(bad)} of {len(records)} media unreadable (> {max_bad:.0%}); first: "
                        + "; ".join(bad[:3]))
    if bad:
        log(f"warning: skipped {len(bad)} unreadable media of {len(records)} in {path}: {bad[0]}")
    for k in KINDS:
        data[k]["media"] = torch.stack(data[k]["media"]) if data[k]["media"] else None
    return data, len(bad)


#################################################################################
#                        Text features, cached on disk                          #
#################################################################################

def fusion_spec(fusion):
    """What the cached features depend on besides the encoder: the layer choice (and the frozen
    weights); `learned` caches the per-layer features so the fusion can train on them."""
    if fusion.mode == "learned":
        return {"mode": "per-layer-normalised"}
    w = fusion.layer_weights() if fusion.mode == "frozen" else None
    return {"mode": fusion.mode, "weights": None if w is None else [round(float(v), 8) for v in w]}


def folder_fingerprint(name):
    """Names, sizes and mtimes of a local model folder's files: a retrained model at the same path
    (03 writing runs/stage1/model again) gets a new cache key."""
    path = Path(name)
    if not path.is_dir():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file())
    desc = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()


def cache_key(encoder, fusion, max_length, texts, store_dtype):
    text_hash = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
    meta = {"encoder": encoder.name, "layers": fusion_spec(fusion), "dtype": str(encoder.dtype),
            "store": str(store_dtype), "max_length": max_length, "num_layers": encoder.num_layers,
            "texts": text_hash}
    weights = folder_fingerprint(encoder.name)
    if weights is not None:
        meta["weights"] = weights
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20], meta


def normalise_layers(hidden):
    """Parameter-free LayerNorm of every layer (Norm-Avg's and the learned fusion's input)."""
    return F.layer_norm(hidden.float(), hidden.shape[-1:])


class FeatureBank:
    """Variable-length features of N texts, stored flat: feats [(n_layers,) tokens, D], offsets [N+1]."""

    def __init__(self, feats, offsets):
        self.feats, self.offsets = feats, offsets

    def batch(self, idx, device):
        """(feats [(n_layers,) B, L, D] float32, mask [B, L]) for text indices `idx`, right-padded."""
        lens = [int(self.offsets[i + 1] - self.offsets[i]) for i in idx]
        L = max(1, max(lens))
        per_layer = self.feats.dim() == 3
        shape = ((self.feats.shape[0],) if per_layer else ()) + (len(idx), L, self.feats.shape[-1])
        out = torch.zeros(shape, dtype=torch.float32)
        mask = torch.zeros(len(idx), L, dtype=torch.bool)
        for b, (i, n) in enumerate(zip(idx, lens)):
            s = int(self.offsets[i])
            if per_layer:
                out[:, b, :n] = self.feats[:, s:s + n].float()
            else:
                out[b, :n] = self.feats[s:s + n].float()
            mask[b, :n] = True
        return out.to(device), mask.to(device)


@torch.no_grad()
def encode_texts(encoder, fusion, texts, max_length, store_dtype=torch.float32, batch_size=64):
    """Fused (or, for `learned`, normalised per-layer) features of `texts`, flat, on CPU."""
    chunks, lengths = [], []
    for s in range(0, len(texts), batch_size):
        hidden, mask = encoder.encode(texts[s:s + batch_size], max_length=max_length)
        feats = normalise_layers(hidden) if fusion.mode == "learned" else fusion(hidden.float())
        feats, mask = feats.cpu(), mask.cpu()
        for b in range(mask.shape[0]):
            n = int(mask[b].sum())
            chunks.append(feats[..., b, :n, :] if fusion.mode == "learned" else feats[b, :n])
            lengths.append(n)
    dim = 1 if fusion.mode == "learned" else 0
    offsets = torch.tensor([0] + lengths).cumsum(0)
    return torch.cat(chunks, dim=dim).to(store_dtype).contiguous(), offsets


def feature_bank(encoder, fusion, texts, max_length, cache_dir, d, store_dtype=torch.float32):
    """Load the cache for exactly these texts/encoder/layers/dtype/length, or build it on rank 0."""
    key, meta = cache_key(encoder, fusion, max_length, texts, store_dtype)
    path = Path(cache_dir) / f"feats_{key}.pt"
    if d.is_main and not path.exists():
        log(f"encoding {len(texts)} captions with {encoder.name} ({meta['layers']['mode']}) -> {path}")
        feats, offsets = encode_texts(encoder, fusion, texts, max_length, store_dtype)
        common.atomic_torch_save({"meta": meta, "texts": texts, "feats": feats, "offsets": offsets}, path)
    elif d.is_main:
        log(f"text features from cache {path}")
    if d.enabled:
        dist.barrier()
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if blob["meta"] != meta or blob["texts"] != texts:
        raise DataError(f"{path}: feature cache does not match its key (corrupt or hand-edited); delete it")
    return FeatureBank(blob["feats"], blob["offsets"]), path


#################################################################################
#                      Interleaving, data streams, the hook                     #
#################################################################################

def step_kind(step, ratio=(7, 3)):
    """'image' or 'video' for optimiser step `step`: exactly ratio[0] image steps in every
    ratio[0]+ratio[1] consecutive steps, the video steps spread evenly (Bresenham)."""
    n_img, n_vid = ratio
    period = n_img + n_vid
    return "video" if ((step % period) + 1) * n_vid // period > (step % period) * n_vid // period else "image"


class Stream:
    """An endless, resumable sequence of per-rank batches over one kind's records
    (DistributedSampler order, set_epoch per epoch, drop_last): position = (epoch, batches taken)."""

    def __init__(self, n, batch, d, seed):
        self.sampler = DistributedSampler(range(n), num_replicas=d.world_size, rank=d.rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.batch, self.epoch, self.pos, self._order = batch, 0, 0, None
        if len(self.sampler) < batch:
            raise DataError(f"{n} records are fewer than one global batch ({batch * d.world_size})")

    def next(self):
        if self._order is None or (self.pos + 1) * self.batch > len(self._order):
            if self._order is not None:
                self.epoch, self.pos = self.epoch + 1, 0
            self.sampler.set_epoch(self.epoch)
            self._order = list(self.sampler)
        idx = self._order[self.pos * self.batch:(self.pos + 1) * self.batch]
        self.pos += 1
        return idx

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, sd):
        self.epoch, self.pos = sd["epoch"], sd["pos"]
        self.sampler.set_epoch(self.epoch)
        self._order = list(self.sampler)


class FusionHook:
    """How 04 steers a `learned` LayerFusion inside `train`. The loop puts `fusion.logits` in their
    own AdamW group at `lr`, calls `after_step` after every optimiser step, and freezes the logits
    for good (no grad, no optimiser update) the first time `should_freeze` returns True."""

    lr = 1e-2
    stop_on_freeze = False  # True: write a checkpoint at the freeze step and return (04 does; 05 continues)

    def should_freeze(self, step, fusion):
        """Called on every rank with identical weights, so every rank decides the same."""
        return False

    def after_step(self, step, fusion, writer):
        """Per-step side effects on rank 0's tensorboard `writer` (None on other ranks)."""

    def on_freeze(self, step, fusion):
        """Called once, on every rank, when the weights freeze (04 saves them here)."""

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass


#################################################################################
#                                  Training                                     #
#################################################################################

def resolve_encoder(name):
    """`auto`: the stage-1 encoder of 03 when it exists (the paper's choice), else MiniLM (a real,
    small pretrained encoder, so the CPU default learns from meaningful text features)."""
    if name != "auto":
        return name
    return "runs/stage1/model" if Path("runs/stage1/model").is_dir() else "minilm"


def build_fusion(args, encoder):
    from encoders import LayerFusion, load_layer_weights
    weights = None
    if args.fusion == "frozen":
        if not args.layer_weights:
            raise DataError("--fusion frozen needs --layer-weights FILE (written by 04_train_layer_weights.py)")
        weights = load_layer_weights(args.layer_weights, encoder.name, encoder.num_layers)
    return LayerFusion(args.fusion, encoder.num_layers, weights=weights)


def lr_factor(step, steps, warmup, decay="constant"):
    """Linear warm-up, then constant (the paper's) or a cosine to 0 at `steps` (short runs end
    sharper: the last steps average out the gradient noise that a constant lr keeps)."""
    f = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if decay == "cosine" and step >= warmup:
        f *= 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return f


def run_signature(args, encoder_name):
    """What a resumed run must share with the run it continues."""
    return {"encoder": encoder_name, "fusion": args.fusion, "max_length": args.max_length, "cache_dtype": args.cache_dtype,
            "image_batch": args.image_batch, "video_batch": args.video_batch,
            "interleave": args.interleave, "size": args.size, "frames": args.frames, "seed": args.seed}


def train(args, hook=None, encoder=None):
    """The training loop (05's main, 04's engine). Returns a dict: model, ema, fusion, step,
    losses (per step, rank 0), checkpoint path."""
    if args.threads:
        torch.set_num_threads(args.threads)
    d = common.init_distributed(args.device)
    common.seed_everything(args.seed)  # same init on every rank; the batches differ by rank
    dtype = common.pick_dtype(d.device, args.dtype)
    out = Path(args.out)
    ratio = tuple(int(v) for v in args.interleave.split(":"))

    # ---- data ----
    data, n_bad = load_t2x(args.data, args.size, args.frames)
    kinds = [k for k in KINDS if data[k]["media"] is not None]
    if not kinds:
        raise DataError(f"{args.data}: no readable media")
    if len(kinds) == 1:
        log(f"only {kinds[0]} records in {args.data}: every step is a {kinds[0]} step")
    texts = sorted(set(data["image"]["captions"] + data["video"]["captions"]) - {""})
    texts = [""] + texts  # index 0: the empty caption, the CFG null condition
    text_index = {t: i for i, t in enumerate(texts)}
    for k in kinds:
        data[k]["text_idx"] = [text_index[c] for c in data[k]["captions"]]

    # ---- text features (encoder frozen, run once, cached) ----
    if encoder is None:
        import encoders
        encoder_name = resolve_encoder(args.encoder)
        previous = common.latest_checkpoint(out) if args.resume else None
        if previous is not None and args.encoder == "auto":  # a resumed run keeps its encoder
            encoder_name = torch.load(previous, map_location="cpu", weights_only=False)["signature"]["encoder"]
        log(f"text encoder: {encoder_name}" + (" (--encoder auto)" if args.encoder == "auto" else ""))
        encoder = encoders.load_encoder(encoder_name, device=d.device, dtype=common.pick_dtype(d.device, args.encoder_dtype))
    fusion = build_fusion(args, encoder).to(d.device)
    store = common.pick_dtype(d.device, args.cache_dtype)
    bank, cache_path = feature_bank(encoder, fusion, texts, args.max_length, args.cache_dir, d, store)
    encoder_name, text_dim, num_layers = encoder.name, encoder.width, encoder.num_layers
    del encoder
    learned = args.fusion == "learned"
    if hook is not None and not learned:
        raise DataError(f"a fusion hook steers learned layer weights; --fusion is {args.fusion!r}, not 'learned'")
    if learned:
        hook = hook or FusionHook()
        fusion.logits.requires_grad_(True)
    else:
        fusion.requires_grad_(False)

    # ---- model, EMA, optimiser ----
    torch.manual_seed(args.seed)  # the DiT's init does not depend on what loading the encoder drew
    model = DiT(text_dim=text_dim, hidden=args.hidden, depth=args.depth, heads=args.heads,
                patch=args.patch, tpatch=args.tpatch).to(d.device)
    if args.init_from:
        ck = torch.load(args.init_from, map_location="cpu", weights_only=False)
        common.load_state_dict_strict(model, ck["model"], f"--init-from {args.init_from}")
        log(f"initialised the DiT from {args.init_from} (step {ck['step']}); fresh optimiser")
    ema = EMA(model, args.ema_decay)
    groups = [{"params": list(model.parameters()), "lr": args.lr, "weight_decay": args.weight_decay}]
    if learned:
        groups.append({"params": [fusion.logits], "lr": hook.lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    base_lrs = [g["lr"] for g in opt.param_groups]
    log(f"DiT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {dict(model.config)}")

    per_rank = {"image": args.image_batch, "video": args.video_batch}
    for k, b in per_rank.items():
        if b % d.world_size:
            raise DataError(f"--{k}-batch {b} is not divisible by the {d.world_size} processes")
        per_rank[k] = b // d.world_size
    streams = {k: Stream(len(data[k]["media"]), per_rank[k], d, args.seed + i) for i, k in enumerate(KINDS) if k in kinds}

    step, frozen_at = 0, None
    signature = run_signature(args, encoder_name)
    ckpt = common.latest_checkpoint(out) if args.resume else None
    if args.resume and ckpt is None:
        log(f"--resume: no checkpoint under {out}/checkpoints, starting from scratch")
    old = common.latest_checkpoint(out)
    if not args.resume and old is not None:
        if not args.overwrite:
            raise DataError(f"{out} already holds checkpoints ({old.name}): pass --resume to continue them, "
                            f"--overwrite to delete them and start again, or another --out")
        if d.enabled:
            dist.barrier()  # every rank has seen them before rank 0 deletes them
        if d.is_main:
            for f in (out / "checkpoints").glob("step_*.pt"):
                f.unlink()
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        diff = {k: (state["signature"].get(k), v) for k, v in signature.items() if state["signature"].get(k) != v}
        if diff:
            raise DataError(f"{ckpt}: cannot resume, the run differs in {diff} (checkpoint vs now)")
        common.load_state_dict_strict(model, state["model"], str(ckpt))
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        for k, s in state["streams"].items():
            streams[k].load_state_dict(s)
        if learned:
            fusion.load_state_dict(state["fusion"])
            hook.load_state_dict(state["hook"])
        step, frozen_at = state["step"], state["frozen_at"]
        common.set_rng_state(state["rng"])
        log(f"resumed from {ckpt} at step {step}")
    if frozen_at is not None:
        fusion.logits.requires_grad_(False)
    ddp = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.enabled else model

    # ---- loop ----
    writer = None
    if d.is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"))
        common.atomic_write_json(out / "args.json", {**vars(args), "encoder_resolved": encoder_name,
                                                     "cache": str(cache_path)})
    rf = RectifiedFlow()
    losses, t_last, s_last = [], time.time(), step
    acc = {k: [0.0, 0] for k in KINDS}
    pbar = tqdm(total=args.steps, initial=step, disable=not d.is_main or args.quiet, desc="train", dynamic_ncols=True)
    while step < args.steps:
        kind = step_kind(step, ratio) if len(kinds) == 2 else kinds[0]
        idx = streams[kind].next()
        x = data[kind]["media"][idx].to(d.device).float() / 127.5 - 1
        tidx = [data[kind]["text_idx"][i] for i in idx]
        # Noise, t and caption dropout for the *global* batch come from a generator seeded by the
        # step; each rank takes its slice. So N processes see exactly what 1 process sees, and a
        # resumed run draws exactly what the uninterrupted one would have.
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        B = per_rank[kind] * d.world_size
        t = torch.sigmoid(torch.randn(B, generator=g))[d.rank::d.world_size]
        noise = torch.randn((B,) + tuple(x.shape[1:]), generator=g)[d.rank::d.world_size]
        drop = (torch.rand(B, generator=g) < args.caption_dropout)[d.rank::d.world_size]
        tidx = [0 if dr else i for i, dr in zip(tidx, drop.tolist())]
        feats, mask = bank.batch(tidx, d.device)
        lr_scale = lr_factor(step, args.steps, args.warmup, args.decay)
        for gr, base in zip(opt.param_groups, base_lrs):
            gr["lr"] = base * lr_scale
        with common.autocast(d.device, dtype):
            cond = (fusion(feats) if learned else feats, mask)
            loss = rf.loss(ddp, x, cond, t=t.to(d.device), noise=noise.to(d.device)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if learned and frozen_at is None and d.enabled:
            dist.all_reduce(fusion.logits.grad)  # fusion sits outside DDP so it can freeze mid-run
            fusion.logits.grad /= d.world_size
        params = list(model.parameters()) + ([fusion.logits] if learned and frozen_at is None else [])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        ema.update(model)
        step += 1
        if learned and frozen_at is None:
            if hook.should_freeze(step, fusion):
                frozen_at = step
                fusion.logits.requires_grad_(False)
                fusion.logits.grad = None
                hook.on_freeze(step, fusion)
                log(f"layer weights frozen at step {step}")
            hook.after_step(step, fusion, writer)

        # ---- logging ----
        lv = loss.item()
        losses.append(lv)
        acc[kind][0] += lv
        acc[kind][1] += 1
        pbar.update(1)
        if writer is not None and (step % args.log_every == 0 or step == args.steps):
            now = time.time()
            sps = (step - s_last) / max(now - t_last, 1e-9)
            t_last, s_last = now, step
            n = sum(a[1] for a in acc.values())
            writer.add_scalar("loss/all", sum(a[0] for a in acc.values()) / max(n, 1), step)
            for k, (s, c) in acc.items():
                if c:
                    writer.add_scalar(f"loss/{k}", s / c, step)
            writer.add_scalar("lr", opt.param_groups[0]["lr"], step)
            writer.add_scalar("grad_norm", float(grad_norm), step)
            writer.add_scalar("steps_per_s", sps, step)
            pbar.set_postfix(loss=f"{sum(a[0] for a in acc.values()) / max(n, 1):.4f}", sps=f"{sps:.2f}")
            acc = {k: [0.0, 0] for k in KINDS}

        # ---- checkpoint ----
        stop = learned and frozen_at == step and hook.stop_on_freeze
        if d.is_main and (step % args.ckpt_every == 0 or step == args.steps or stop):
            ckpt = common.checkpoint_path(out, step)
            common.atomic_torch_save({
                "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "step": step, "rng": common.rng_state(), "streams": {k: s.state_dict() for k, s in streams.items()},
                "interleave": {"ratio": ratio, "next_kind": step_kind(step, ratio)},
                "fusion": fusion.state_dict(), "frozen_at": frozen_at, "hook": hook.state_dict() if learned else None,
                "config": model.config, "signature": signature, "args": vars(args),
                "encoder": encoder_name, "num_layers": num_layers}, ckpt)
            for old in sorted((out / "checkpoints").glob("step_*.pt"))[:-args.keep]:
                old.unlink()
        if stop:
            break
        if args.stop_after and step >= args.stop_after:
            break  # simulate a kill (tests): leave without a final checkpoint
    pbar.close()
    if writer is not None:
        writer.close()
    result = {"model": model, "ema": ema, "fusion": fusion, "step": step, "losses": losses,
              "checkpoint": common.latest_checkpoint(out), "frozen_at": frozen_at, "unreadable": n_bad}
    common.cleanup_distributed()
    return result


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/world/t2x.jsonl", help="jsonl of {media, caption, kind}")
    p.add_argument("--out", default="runs/diffusion")
    p.add_argument("--encoder", default="minilm",
                   help="a built-in name, hub id or dir; auto: runs/stage1/model if present, else minilm. Default "
                        "minilm: with the CPU-sized stage-1 model the DiT ignored colour (measured; README)")
    p.add_argument("--encoder-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--fusion", default="norm-avg", help="last, penultimate, layer:K, norm-avg, learned, frozen")
    p.add_argument("--layer-weights", default=None, help="with --fusion frozen: file written by 04")
    p.add_argument("--max-length", type=int, default=160, help="caption tokens kept (world captions: ~75 on average)")
    p.add_argument("--cache-dir", default="cache/features")
    p.add_argument("--cache-dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                   help="how cached features are stored (bf16 halves the cache; the DiT computes in fp32/autocast)")
    p.add_argument("--size", type=int, default=32, help="image/video side in pixels")
    p.add_argument("--frames", type=int, default=8)
    # Wide and shallow: a 2x4x4 video patch is 96 numbers that each token must carry through, which
    # crowds a 128-wide token; width 192 x depth 3 runs at the same speed as 128 x 6 and reached a lower
    # loss on both kinds (video 0.094 vs 0.111, image 0.050 vs 0.061 after 10000 steps).
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--tpatch", type=int, default=2)
    # CPU default sized for under 20 min on 2 cores (10000 steps took 19.9 with the other core busy, so
    # 9000): small batches at more steps learned more per second here (batch 8:2 runs ~9 steps/s on one
    # thread, 32:8 ~2) and 10000 steps beat 5000 at 16:4.
    p.add_argument("--steps", type=int, default=9000)
    p.add_argument("--image-batch", type=int, default=8, help="global; the paper's 512")
    p.add_argument("--video-batch", type=int, default=2, help="global; the paper's 128 (the same 4:1 ratio)")
    p.add_argument("--interleave", default="7:3", help="image:video steps")
    p.add_argument("--lr", type=float, default=1e-3, help="the paper's 1e-4 is for batch 512 and 2B parameters")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--decay", default="cosine", choices=["constant", "cosine"],
                   help="lr after the warm-up (constant: as the paper's long runs)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="delete the checkpoints already in --out and start again")
    p.add_argument("--init-from", default=None, help="DiT checkpoint whose weights start this run (fresh optimiser)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default). 1: the default batches are too small to gain "
                        "much from more, and 2 threads on a 2-core machine with one busy core ran 3-10x slower")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="DiT autocast dtype")
    p.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    t0 = time.time()
    res = train(args)
    log(f"done: {res['step']} steps in {time.time() - t0:.0f} s; last checkpoint {res['checkpoint']}")


if __name__ == "__main__":
    main()
