"""The data side of GRAN-TED that the stages share: the TED-6K file, caption pairs, VQA records,
text-to-image/video records and media decoding, VAE latents and caption features cached on disk, the
interleaved image/video stream, and the pieces 04 and 05 build their DiT runs from (flags, run config,
batch, checkpoint contents). The networks are in `models.py`, the plumbing in `plumbing.py`.
"""
import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageSequence
from torch.utils.data.distributed import DistributedSampler

import models
import plumbing
from plumbing import DataError, atomic_torch_save, log

KINDS = ("image", "video")


#################################################################################
#                                 TED-6K file                                   #
#################################################################################

# The public TED-6k.json format, which 01 writes and 02 scores: {"image_N" | "video_N": {caption,
# caption_type, statements: {type: {question, correct_statement: {statement, status},
# incorrect_statements: [{statement, status}, ...]}}}}. An option whose status is not `success` or whose
# statement is null or empty is dropped; a type whose positive is dropped asks nothing.

TED_TYPES = ("Action Recognition", "Adjective", "Adverb", "Basic Event", "Coreference", "OCR", "Quantity",
             "Spatial Relationship", "Temporal")


def valid_option(opt):
    """A TED-6k option counts when its statement is a non-empty string and its status is `success`."""
    return isinstance(opt, dict) and opt.get("status") == "success" and isinstance(opt.get("statement"), str) \
        and opt["statement"].strip() != ""


def require_keys(rec, keys, where):
    """Refuse a record that lacks one of `keys`, naming it."""
    for k in keys:
        if k not in rec:
            raise DataError(f"{where}: missing key {k!r}")


def check_caption(caption, kind, where):
    """Refuse a caption that is not a non-empty string, or a caption type other than image / video."""
    if not isinstance(caption, str):
        raise DataError(f"{where}: caption must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise DataError(f"{where}: empty caption")
    if kind not in KINDS:
        raise DataError(f"{where}: caption_type {kind!r} is not 'image' or 'video'")


def _ted_option(opt, where):
    """The statement of a usable option, None for one the file marks unusable; a malformed one is refused."""
    if opt is None:
        return None
    if not isinstance(opt, dict):
        raise DataError(f"{where} must be an object {{statement, status}}, got {type(opt).__name__}")
    s = opt.get("statement")
    if opt.get("status") == "success" and s is not None and not isinstance(s, str):
        raise DataError(f"{where}: statement must be a string, got {type(s).__name__}")
    return s if valid_option(opt) else None


def _ted_statement(info, where):
    """(positive, [usable negatives], how many negatives were identical to the positive) of one statement
    type, or None when its positive is unusable (the public file marks failed generations). A negative
    identical to the positive would tie it, and a tie is not a win: it is an unusable option (the public
    file has a few), left out like a failed one."""
    if not isinstance(info, dict):
        raise DataError(f"{where}: expected an object, got {type(info).__name__}")
    require_keys(info, ("question", "correct_statement", "incorrect_statements"), where)
    if not isinstance(info["incorrect_statements"], list):
        raise DataError(f"{where}: 'incorrect_statements' must be a list")
    pos = _ted_option(info["correct_statement"], f"{where}: correct_statement")
    negs = [_ted_option(o, f"{where}: incorrect_statements[{i}]") for i, o in enumerate(info["incorrect_statements"])]
    if pos is None:
        return None
    same = [n is not None and n.strip() == pos.strip() for n in negs]
    return pos, [n for n, dup in zip(negs, same) if n is not None and not dup], sum(same)


def normalise_ted(data, path):
    """Check a TED-6k-format object and keep only usable options (each then has status `success`).

    Refused with one line naming the file, record and statement type: a malformed record or option, a
    caption that is not a non-empty string, an unknown statement type, and a file with nothing left to
    score. Unusable options and statements are left out and counted in one warning."""
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty JSON object keyed image_N / video_N")
    out, dropped, identical = {}, 0, 0
    for key, rec in data.items():
        where = f"{path}: record {key!r}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
        require_keys(rec, ("caption", "caption_type", "statements"), where)
        check_caption(rec["caption"], rec["caption_type"], where)
        if not isinstance(rec["statements"], dict):
            raise DataError(f"{where}: 'statements' must be an object keyed by statement type")
        statements = {}
        for stype, info in rec["statements"].items():
            if stype not in TED_TYPES:
                raise DataError(f"{where}: unknown statement type {stype!r} (known: {list(TED_TYPES)})")
            pos, negs, same = _ted_statement(info, f"{where}, type {stype!r}") or (None, [], 0)
            identical += same
            dropped += pos is not None and not negs  # a lone positive would always win
            if pos is not None and negs:
                statements[stype] = {"question": info["question"],
                                     "correct_statement": {"statement": pos, "status": "success"},
                                     "incorrect_statements": [{"statement": n, "status": "success"} for n in negs]}
        out[key] = {"caption": rec["caption"], "caption_type": rec["caption_type"], "statements": statements}
    if not any(rec["statements"] for rec in out.values()):
        raise DataError(f"{path}: no scorable statement (each needs a successful positive and negative)")
    if dropped or identical:
        log(f"warning: {path}: {identical} negative(s) identical to their positive and {dropped} statement(s) "
            f"with a positive but no usable negative left out")
    return out


def ted_questions(bench):
    """A normalised TED-6k object as questions {key, caption, kind, type, positive, negatives}, file order."""
    return [{"key": key, "caption": rec["caption"], "kind": rec["caption_type"], "type": stype,
             "positive": q["correct_statement"]["statement"],
             "negatives": [o["statement"] for o in q["incorrect_statements"]]}
            for key, rec in bench.items() for stype, q in rec["statements"].items()]


def read_ted(path):
    """A TED-6k file, checked and normalised (`normalise_ted`), and its questions (`ted_questions`)."""
    bench = normalise_ted(plumbing.read_json(path), path)
    return bench, ted_questions(bench)


#################################################################################
#                                Caption pairs                                  #
#################################################################################

CAPTION_TEMPLATE = "Caption Type: {kind}\nCaption: {caption}"  # as in the public TED-6K evaluation code


def caption_text(caption, kind):
    """A caption as the probe embeds it, with its caption type (image / video) in front."""
    return CAPTION_TEMPLATE.format(kind=kind, caption=caption)


def load_pairs(path, limit=0):
    """Caption pairs {"a", "b", "kind"} (two wordings of one image or video) as (a, b) texts formatted like
    benchmark captions; the first `limit` (0 = all)."""
    pairs = []
    for i, r in enumerate(plumbing.read_jsonl(path, required=("a", "b", "kind")), 1):
        if r["kind"] not in KINDS or not all(isinstance(r[k], str) and r[k].strip() for k in "ab"):
            raise DataError(f"{path}: record {i}: a and b must be non-empty strings, kind image|video")
        pairs.append((caption_text(r["a"], r["kind"]), caption_text(r["b"], r["kind"])))
    return pairs[:limit] if limit else pairs


#################################################################################
#                                 VQA records                                   #
#################################################################################
# Stage 1's data: {"media", "kind", "messages": [{"role", "content"}, ...]}, the media belonging to the
# first user turn. Structure errors stop the run naming file:line; a missing or corrupt media file is
# skipped and counted (a large set always has a few), and more than MAX_BAD_MEDIA of them stops the run.

ROLES = ("system", "user", "assistant")
MAX_BAD_MEDIA = 0.01
DESCRIBE_PROMPT = {"image": "Describe this image in detail.", "video": "Describe this video in detail."}


def check_vqa_record(where, rec):
    """Refuse a VQA record whose structure is wrong (its media is checked by `scan_vqa_media`)."""
    if rec.get("kind") not in KINDS:
        raise DataError(f"{where}: unknown media kind {rec.get('kind')!r} (expected 'image' or 'video')")
    if not isinstance(rec.get("media"), str) or not rec["media"]:
        raise DataError(f"{where}: 'media' must be a non-empty path string")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{'role': system|user|assistant, 'content': str}}")
    roles = [m["role"] for m in msgs]
    if "assistant" not in roles or not any(m["content"].strip() for m in msgs if m["role"] == "assistant"):
        raise DataError(f"{where}: no assistant turn (nothing to train on)")
    if "user" not in roles or roles.index("user") > roles.index("assistant"):
        raise DataError(f"{where}: the first assistant turn must follow a user turn (which holds the media)")


def read_vqa_records(path, captions=False):
    """The checked records of a VQA jsonl, each with `_file`, `_line` and the resolved media `_path`.
    With `captions`, {media, caption, kind} records become one "describe" question and its answer."""
    path = Path(path)
    recs = plumbing.read_jsonl(path, required=("media", "kind", "caption") if captions else ("media", "kind", "messages"))
    linenos = [i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    out = []
    for lineno, rec in zip(linenos, recs):
        if captions:
            if rec["kind"] not in KINDS:
                raise DataError(f"{path}:{lineno}: unknown media kind {rec['kind']!r} (expected 'image' or 'video')")
            rec = {"media": rec["media"], "kind": rec["kind"], "perspective": "describe",
                   "messages": [{"role": "user", "content": DESCRIBE_PROMPT[rec["kind"]]},
                                {"role": "assistant", "content": rec["caption"]}]}
        check_vqa_record(f"{path}:{lineno}", rec)
        out.append(dict(rec, _file=str(path), _line=lineno, _path=str(plumbing.resolve_media(path, rec["media"]))))
    return out


def read_vqa_media(rec, frames):
    """A record's pixels and, for a video, the metadata Qwen3-VL's processor takes. A video keeps at most
    `frames` frames, spread evenly, and an even number of them (Qwen3-VL groups frames in pairs)."""
    path = rec["_path"]
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file {path}")
    if rec["kind"] == "image":
        return read_image(path).copy(), None  # writable: the processor makes a tensor of it
    video, fps = read_video(path)
    if len(video) < 2:
        raise ValueError(f"a video needs at least 2 frames, got {len(video)}")
    n = min(frames, len(video))
    idx = sample_frames(len(video), n - n % 2)
    return video[idx], {"total_num_frames": len(video), "fps": float(fps or 2.0), "frames_indices": idx}


def scan_vqa_media(records, frames, d):
    """(records whose media decode, how many were dropped); the scan is shared over torchrun ranks."""
    bad = []
    for i in range(d.rank, len(records), d.world_size):
        try:
            read_vqa_media(records[i], frames)
        except Exception as e:  # any decode failure means the file is unusable
            bad.append((i, f"{type(e).__name__}: {e}"))
    if d.enabled:
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, bad)
        bad = sorted(b for part in gathered for b in part)
    if bad:
        examples = "; ".join(f"{records[i]['_file']}:{records[i]['_line']} ({records[i]['media']}: {why})"
                             for i, why in bad[:3])
        if len(bad) > MAX_BAD_MEDIA * len(records):
            raise DataError(f"{len(bad)} of {len(records)} records have missing or corrupt media "
                            f"(> {MAX_BAD_MEDIA:.0%}); first: {examples}")
        log(f"skipped {len(bad)} of {len(records)} records with missing or corrupt media; first: {examples}")
    drop = {i for i, _ in bad}
    return [r for i, r in enumerate(records) if i not in drop], len(bad)


#################################################################################
#                                    Media                                      #
#################################################################################

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
VIDEO_EXT = {".gif", ".mp4", ".webm", ".avi", ".mov"}


def _rgb(im):
    """PIL image -> uint8 [H, W, 3]. 16-bit and 32-bit greys are scaled to 8 bits first (PIL's own
    convert('RGB') clips them, so a 16-bit PNG would read as almost all white)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode != "F" and arr.max() > 255 else max(1.0, float(arr.max())) if im.mode == "F" else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=-1)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_image(path):
    """An image as RGB uint8 [H, W, 3]."""
    with Image.open(path) as im:
        return _rgb(im)


def read_video(path):
    """Every frame of a GIF/animated PNG/WebP (PIL) or MP4/WebM/... (imageio) as RGB uint8 [T, H, W, 3],
    and its frame rate (None when the file does not say)."""
    if Path(path).suffix.lower() in (".gif", ".png", ".webp"):
        with Image.open(path) as im:
            frames = np.stack([_rgb(f) for f in ImageSequence.Iterator(im)])
            duration = im.info.get("duration")
        return frames, (1000.0 / duration if duration else None)
    import imageio.v3 as iio  # mp4 etc. need imageio's pyav or ffmpeg plugin
    return np.stack(list(iio.imread(path))), iio.immeta(path).get("fps")


def sample_frames(total, n):
    """`n` frame indices spread evenly over `total` frames (repeats when n > total)."""
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def fit_square(frame, size):
    """uint8 [H, W, 3] -> [size, size, 3]: shorter side resized to `size`, then centre-cropped."""
    h, w = frame.shape[:2]
    if (w, h) == (size, size):
        return frame
    s = size / min(w, h)
    im = Image.fromarray(frame).resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def read_clip(path, kind, size, frames):
    """The DiT's input: uint8 [3, T, size, size], T=1 for an image, `frames` sampled evenly for a video."""
    if kind == "image":
        arr = fit_square(read_image(path), size)[None]
    else:
        if Path(path).suffix.lower() not in VIDEO_EXT:
            raise ValueError(f"not a video file ({Path(path).suffix})")
        video, _ = read_video(path)
        arr = np.stack([fit_square(video[i], size) for i in sample_frames(len(video), frames)])
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(3, 0, 1, 2)


#################################################################################
#                      Text-to-image / text-to-video records                    #
#################################################################################

def load_t2x(path, size, frames, max_bad=0.01):
    """Decoded media and captions of a {media, caption, kind} jsonl, per kind. Unreadable media are
    skipped and counted; more than `max_bad` of them stops the run."""
    records = plumbing.read_jsonl(path, required=("media", "caption", "kind"))
    data = {k: {"media": [], "captions": []} for k in KINDS}
    bad = []
    for i, rec in enumerate(records, 1):
        if rec["kind"] not in KINDS:
            raise DataError(f"{path}: record {i}: kind must be 'image' or 'video', got {rec['kind']!r}")
        if not isinstance(rec["caption"], str) or not rec["caption"].strip():
            # an empty caption is the CFG null condition: training on one would be silent caption dropout
            raise DataError(f"{path}: record {i}: caption must be a non-empty string")
        media = plumbing.resolve_media(path, rec["media"])
        try:
            x = read_clip(media, rec["kind"], size, frames)
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
    if all(data[k]["media"] is None for k in KINDS):
        raise DataError(f"{path}: no readable media")
    return data


def caption_index(data):
    """Unique captions with the empty caption (the CFG null condition) at index 0; each record's index."""
    texts = [""] + sorted({c for k in KINDS for c in data[k]["captions"]})
    where = {t: i for i, t in enumerate(texts)}
    for k in KINDS:
        data[k]["text_idx"] = [where[c] for c in data[k]["captions"]]
    return texts


def latent_media(vae, vae_id, data, size, frames, cache_dir, d, batch=8):
    """Replace each kind's uint8 media by their VAE latents (float32), read from the cache or encoded
    once on rank 0; keyed by the VAE's weights and the preprocessing (size, frames, the media bytes)."""
    if size % models.vae_spatial_factor(vae):
        raise DataError(f"--size {size} is not divisible by the VAE's spatial factor {models.vae_spatial_factor(vae)} ({vae_id})")
    for k in KINDS:
        media = data[k]["media"]
        if media is None:
            continue
        meta = {"vae": vae_id, "size": size, "frames": frames, "kind": k, "shape": list(media.shape),
                "media": hashlib.sha256(media.numpy().tobytes()).hexdigest()}
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"latents_{key}.pt"
        if d.is_main and not path.exists():
            log(f"encoding {len(media)} {k}s with the VAE -> {path}")
            dev = next(vae.parameters()).device
            z = torch.cat([models.vae_encode(vae, media[s:s + batch].to(dev).float() / 127.5 - 1).float().cpu()
                           for s in range(0, len(media), batch)])
            atomic_torch_save({"meta": meta, "latents": z}, path)
        d.barrier()
        blob = plumbing.load_torch(path, "latent cache (delete it)")
        z, channels = blob.get("latents"), getattr(vae.config, "z_dim", None) or vae.config.latent_channels
        if blob.get("meta") != meta or not isinstance(z, torch.Tensor) or z.shape[:2] != (len(media), channels):
            raise DataError(f"{path}: latent cache does not match its key (corrupt or hand-edited); delete it")
        data[k]["media"] = z
    return data


#################################################################################
#                       Text features, cached on disk                           #
#################################################################################

def length_batches(encoder, texts, token_budget, max_batch=256):
    """Index batches of similar token length (sorted), each within `token_budget` padded tokens."""
    lengths = [len(ids) for ids in encoder.tokenizer(list(texts), truncation=True,
                                                     max_length=encoder.max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    batches, cur = [], []
    for i in order:  # ascending length: the newest text is the longest, so it sets the padded size
        if cur and (len(cur) + 1) * lengths[i] > token_budget or len(cur) == max_batch:
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + [cur] if cur else batches


def feature_mode(fusion):
    """What the cached features are: the fused sequence, or (for a learned fusion, which trains on
    them) every layer after the parameter-free LayerNorm."""
    return "per-layer-normalised" if fusion.mode == "learned" else fusion.mode


@torch.no_grad()
def encode_texts(encoder, fusion, texts, max_length, store_dtype=torch.float32, batch_size=64):
    """Features of `texts`, flat on CPU: ([(n_layers,) tokens, D], offsets [N+1])."""
    chunks, lengths = [], []
    per_layer = fusion.mode == "learned"
    for s in range(0, len(texts), batch_size):
        hidden, mask = encoder.encode(texts[s:s + batch_size], max_length=max_length)
        feats = (models.norm_layers(hidden) if per_layer else fusion(hidden.float())).cpu()
        for b, n in enumerate(mask.sum(1).tolist()):
            # a copy in the stored dtype: a slice is a view that would keep the whole batch alive, and every
            # layer of every caption in float32 would hold twice the memory until the end
            chunks.append((feats[..., b, :n, :] if per_layer else feats[b, :n]).to(store_dtype, copy=True))
            lengths.append(n)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    return torch.cat(chunks, dim=1 if per_layer else 0), offsets


class FeatureBank:
    """Variable-length features of N texts, stored flat: feats [(n_layers,) tokens, D], offsets [N+1]."""

    def __init__(self, feats, offsets):
        self.feats, self.offsets = feats, offsets

    @torch.no_grad()
    def fused_chunks(self, fusion, device, tokens=65536):
        """Every stored token's feature as `fusion` makes it (a learned fusion: at its current weights)."""
        for s in range(0, self.feats.shape[-2], tokens):
            x = self.feats[..., s:s + tokens, :].to(device).float()
            yield fusion(x.unsqueeze(-3))[0] if x.dim() == 3 else x

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
            out[..., b, :n, :] = self.feats[..., s:s + n, :].float()
            mask[b, :n] = True
        return out.to(device), mask.to(device)


CACHE_DTYPE = "bf16"  # the stored caption features of a DiT run (06 rounds its prompts' features the same way)


def feature_bank(encoder, fusion, texts, max_length, cache_dir, d, store_dtype=torch.float32):
    """Features of exactly these texts under this encoder (its weights' fingerprint), layer choice,
    dtype and length: read from the cache, or computed once on rank 0 and cached."""
    w = fusion.layer_weights() if fusion.mode == "frozen" else None
    meta = {"encoder": encoder.name, "encoder_id": getattr(encoder, "fingerprint", None),
            "layers": {"mode": feature_mode(fusion), "weights": None if w is None else [round(float(v), 8) for v in w]},
            "dtype": str(encoder.dtype), "store": str(store_dtype), "max_length": max_length,
            "num_layers": encoder.num_layers,
            "texts": hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"feats_{key}.pt"
    if d.is_main and not path.exists():
        log(f"encoding {len(texts)} captions with {encoder.name} ({meta['layers']['mode']}) -> {path}")
        feats, offsets = encode_texts(encoder, fusion, texts, max_length, store_dtype)
        atomic_torch_save({"meta": meta, "texts": texts, "feats": feats, "offsets": offsets}, path)
    elif d.is_main:
        log(f"text features from cache {path}")
    d.barrier()
    blob = plumbing.load_torch(path, "feature cache (delete it)")
    if blob.get("meta") != meta or blob.get("texts") != texts:
        raise DataError(f"{path}: feature cache does not match its key (corrupt or hand-edited); delete it")
    return FeatureBank(blob["feats"], blob["offsets"]), path


#################################################################################
#                      Interleaved image / video stream                         #
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


#################################################################################
#               A DiT run's parts (04 and 05 each hold their own loop)          #
#################################################################################


# The flags that say how to run now rather than what is trained; a continued run takes every other flag
# from its checkpoint, and refuses a given one that contradicts it (--steps may grow).
NOW_ONLY = ("out", "resume", "overwrite", "init_from", "layer_weights", "stop_at", "ckpt_every", "log_every",
            "device", "threads")


def add_run_args(p, out, encoder, steps):
    """The flags of a DiT run, the same in 04 and 05 with the same defaults (the measured 600-step recipe's
    DiT, batch and optimiser, docs/results.md); 05 --init-from and --resume take them from the checkpoint."""
    pos, nonneg = plumbing.positive_int, plumbing.nonneg_int
    p.add_argument("--data", default="runs/world/t2x.jsonl", help="jsonl of {media, caption, kind}")
    p.add_argument("--out", default=out)
    p.add_argument("--encoder", default=encoder, help="built-in name, hub id or folder (e.g. runs/stage1/model)")
    p.add_argument("--max-length", type=pos, default=160, help="caption tokens kept")
    p.add_argument("--cache-dir", default="cache", help="built models, tokenizers; features and latents under features/")
    p.add_argument("--size", type=pos, default=32, help="image/video side in pixels")
    p.add_argument("--frames", type=plumbing.bounded(int, 2, what="an integer >= 2"), default=8)
    p.add_argument("--dit", type=int_pair("x", "WIDTHxDEPTH, e.g. 128x6"), default="128x6",
                   help="our DiT's width x depth (one attention head per 32 channels)")
    p.add_argument("--patch", type=int_pair("x", "SIDExFRAMES, e.g. 4x2"), default="4x2",
                   help="our DiT's patch: pixels (or latents) per side x frames")
    p.add_argument("--text-norm", default="standardise", choices=["standardise", "none"],
                   help="standardise each text-feature dimension at the denoiser's input (training captions' "
                        "statistics, stored with the model), or feed the features as they are")
    p.add_argument("--backbone", default="dit", choices=models.BACKBONES,
                   help="dit (ours, pixel or latent), lumina2 (Lumina-Image-2.0, images only) or wan (Wan2.1)")
    p.add_argument("--backbone-config", default="tiny",
                   help="lumina2/wan: tiny, paper (2B / 1.3B), a JSON file or string, or a diffusers folder or hub id "
                        "whose weights it starts from (text embedder re-initialised)")
    p.add_argument("--vae", default=None,
                   help=f"train on latents of this VAE ({models.TINY_VAE}, or a diffusers AutoencoderKLWan/AutoencoderKL "
                        "folder or hub id); default: pixels")
    p.add_argument("--steps", type=pos, default=steps, help="planned total optimiser steps")
    p.add_argument("--batch", type=int_pair(":", "IMAGES:VIDEOS, e.g. 32:8", low=0), default="32:8",
                   help="global image:video batch (the paper's 512:128)")
    p.add_argument("--interleave", type=int_pair(":", "IMAGE:VIDEO steps, e.g. 7:3", low=0), default="7:3",
                   help="image:video steps")
    p.add_argument("--lr", type=plumbing.positive_float, default=5e-4, help="the paper's 1e-4 is for batch 512")
    p.add_argument("--warmup", type=nonneg, default=100, help="linear warm-up steps, then a constant lr")
    p.add_argument("--ckpt-every", type=pos, default=500)
    p.add_argument("--log-every", type=pos, default=25)
    p.add_argument("--stop-at", type=pos, default=None, help="stop after this step, with a checkpoint; --resume later")
    p.add_argument("--resume", action="store_true", help="continue the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (once the new one has a checkpoint)")
    p.add_argument("--seed", type=nonneg, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="DiT autocast dtype")
    # Batches this small do not gain from more threads, and a busy second core slows two.
    p.add_argument("--threads", type=nonneg, default=1, help="torch CPU threads (0: torch's default)")


def int_pair(sep, what, low=1):
    """An argparse type: 'A<sep>B' -> [A, B], integers >= low with a positive sum (a checkpoint's list passes)."""
    def parse(text):
        if isinstance(text, list):
            return text
        try:
            pair = [int(v) for v in str(text).split(sep)]
        except ValueError:
            pair = []
        if len(pair) != 2 or min(pair) < low or sum(pair) == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}")
        return pair
    return parse


def checkpoint_args(parser, argv, saved, source):
    """Flags for continuing a run: the checkpoint's as defaults, the command line over them; a given flag
    that contradicts the checkpoint is refused, except --steps (a continued run may be planned longer)."""
    names = vars(parser.parse_args([]))
    parser.set_defaults(**{k: v for k, v in saved.items() if k in names and k not in NOW_ONLY})
    args = parser.parse_args(argv)
    for k in names:
        if k in saved and k not in NOW_ONLY + ("steps",) and getattr(args, k) != saved[k]:
            raise DataError(f"--{k.replace('_', '-')} {getattr(args, k)} contradicts {source}, which was "
                            f"trained with {saved[k]!r}; drop the flag (or start a new run)")
    return args


def check_same_run(saved, now, source, ignore=("steps",)):
    """Refuse to continue a checkpoint whose data file, encoder weights or settings differ from now."""
    diff = [f"{k}: {saved.get(k)!r} then, {now[k]!r} now" for k in now if k not in ignore and saved.get(k) != now[k]]
    if diff:
        raise DataError(f"{source}: cannot continue, the run differs in " + "; ".join(diff[:4]))


def text_encoder(name, device, cache_dir):
    """The frozen text encoder of a DiT run, loaded alike by 04/05 and by 06 (bf16 on a GPU that has it)."""
    import encoders
    return encoders.load_encoder(name, device=device, cache_dir=cache_dir, dtype=plumbing.pick_dtype(device, "auto"))


def t2x_data(args, d, make_fusion):
    """(media per kind, encoder, fusion, cached caption features, VAE id) of a DiT run: the jsonl decoded
    into memory, the captions encoded once (the cache), the media replaced by latents under --vae."""
    data = load_t2x(args.data, args.size, args.frames)
    texts = caption_index(data)
    log("data: " + ", ".join(f"{len(data[k]['captions'])} {k}s" for k in KINDS))
    encoder = text_encoder(args.encoder, d.device, args.cache_dir)
    log(f"text encoder: {encoder}")
    fusion = make_fusion(encoder).to(d.device)
    cache = Path(args.cache_dir) / "features"
    bank, _ = feature_bank(encoder, fusion, texts, args.max_length, cache, d, plumbing.DTYPES[CACHE_DTYPE])
    for k, share in zip(KINDS, args.interleave):  # a kind never drawn is not encoded (lumina2: images only)
        if share == 0 and all(data[j]["media"] is not None for j in KINDS):
            log(f"--interleave {args.interleave[0]}:{args.interleave[1]}: the {k}s are not used")
            data[k]["media"] = None
    if args.backbone == "lumina2" and data["video"]["media"] is not None:
        raise DataError("--backbone lumina2 is an image model: train it with --interleave 1:0 (images only), "
                        "or use --backbone wan for video")
    vae_id = None
    if args.vae:
        vae, vae_id = models.load_vae(args.vae, d.device)
        data = latent_media(vae, vae_id, data, args.size, args.frames, cache, d)
    return data, encoder, fusion, bank, vae_id


def run_config(args, encoder, data, vae_id, saved=None):
    """What a checkpoint and model.safetensors carry: every flag that says what is trained, plus what the
    data file, encoder, VAE and denoiser input are (06 rebuilds the model and its text condition from it)."""
    config = {k: v for k, v in vars(args).items() if k not in NOW_ONLY}
    config.update(data_sha256=plumbing.file_digest(args.data), encoder=encoder.name, cache_dtype=CACHE_DTYPE,
                  encoder_id=getattr(encoder, "fingerprint", None), encoder_cache=str(args.cache_dir),
                  text_dim=encoder.width, num_layers=encoder.num_layers, vae_id=vae_id, channels=3,
                  latent_shape=None, backbone_kwargs=None)
    if args.vae:
        config["latent_shape"] = {k: list(data[k]["media"].shape[1:]) for k in KINDS if data[k]["media"] is not None}
        config["channels"] = next(iter(config["latent_shape"].values()))[0]
    pretrained = models.pretrained_transformer(args.backbone, args.backbone_config)
    if pretrained and saved and saved.get("backbone_kwargs"):
        config["backbone_kwargs"] = saved["backbone_kwargs"]  # the weights are in the checkpoint now
    elif args.backbone != "dit":
        config["backbone_kwargs"] = models.backbone_config(args.backbone, args.backbone_config, config["channels"],
                                                           encoder.width)
    elif args.backbone_config != "tiny":
        raise DataError("--backbone-config is for --backbone lumina2 or wan")
    return config


def new_model(config, bank, fusion, device, fresh=True):
    """The denoiser of a run: seeded init, its text standardiser fitted on the training captions' features;
    a fresh run keeps the pretrained weights --backbone-config names (text embedder re-initialised)."""
    torch.manual_seed(config["seed"])  # the init does not depend on what loading the encoder drew
    model = models.make_model(config)
    if config["text_norm"] == "standardise":
        model.text_standardiser.fit(bank.fused_chunks(fusion, device))
    pretrained = fresh and models.pretrained_transformer(config["backbone"], config["backbone_config"])
    if pretrained:
        kept = models.load_pretrained_transformer(model, pretrained)
        log(f"--backbone-config {pretrained}: {len(kept)} tensors kept, the text embedder re-initialised")
    shape = models.dit_shape(config) if config["backbone"] == "dit" else config["backbone_kwargs"]
    log(f"{config['backbone']}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {shape}")
    return model.to(device)


def streams(data, args, d):
    """One resumable batch stream per kind in use, this rank's share of the global batch."""
    out = {}
    for i, (k, batch) in enumerate(zip(KINDS, args.batch)):
        if data[k]["media"] is None:
            continue
        if batch == 0 or batch % d.world_size:
            raise DataError(f"--batch {args.batch[0]}:{args.batch[1]}: the {k} batch must be a positive multiple of "
                            f"the {d.world_size} processes")
        out[k] = Stream(len(data[k]["media"]), batch // d.world_size, d, args.seed + i)
    return out


def optimiser(model, fusion, args, d, weights_lr=None):
    """AdamW over the DiT and, for a learned fusion, its layer-weight logits in a group of their own (at
    `weights_lr`); the lr warms up linearly, then stays constant, as the paper's."""
    groups = [{"params": list(model.parameters()), "lr": args.lr, "weight_decay": 0.0}]
    if fusion.mode == "learned":
        groups.append({"params": [fusion.logits], "lr": weights_lr or args.lr, "weight_decay": 0.0})
    # fused: one kernel for all parameters (CPU and CUDA) instead of a loop over them
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=d.device.type in ("cpu", "cuda"))
    return opt, plumbing.lr_scheduler(opt, args.steps, args.warmup)


CAPTION_DROPOUT = 0.1  # captions replaced by the empty one in training: what classifier-free guidance needs
GRAD_CLIP = 1.0


def t2x_batch(data, bank, streams, step, args, d, rf):
    """Step `step`'s kind and this rank's slice of its global batch: (kind, x, (feats, mask), t, noise).
    Noise, t and caption dropout for the *global* batch come from a generator seeded by the step; each
    rank takes its slice. So N processes see what 1 process sees, and a resumed run draws what the
    uninterrupted one would have."""
    kind = step_kind(step, args.interleave) if len(streams) == 2 else next(iter(streams))
    idx = streams[kind].next()
    x = data[kind]["media"][idx].to(d.device).float()
    if data[kind]["media"].dtype == torch.uint8:  # pixels; VAE latents are stored as they train
        x = x / 127.5 - 1
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    B, mine = streams[kind].batch * d.world_size, slice(d.rank, None, d.world_size)
    t = rf.draw_t(B, g)[mine]
    noise = torch.randn((B,) + tuple(x.shape[1:]), generator=g)[mine]
    drop = (torch.rand(B, generator=g) < CAPTION_DROPOUT)[mine]
    text_idx = [0 if dr else data[kind]["text_idx"][i] for i, dr in zip(idx, drop.tolist())]
    return kind, x, bank.batch(text_idx, d.device), t.to(d.device), noise.to(d.device)


def save_run(out, stage, args, config, step, frozen_at, parts, batches, replaces=(), **extra):
    """Rank 0 at a checkpoint step: checkpoints/step_N.pt with everything a resume needs to continue the same
    curve (`parts`: model, ema, opt, sched, fusion; tagged with the stage that wrote it), then
    model.safetensors (the EMA weights, for 06) and args.json beside it."""
    state = {"kind": models.CKPT_KIND, "stage": stage, "config": config, "step": step, "frozen_at": frozen_at,
             **{k: p.state_dict() for k, p in parts.items()}, "fusion_mode": parts["fusion"].mode,
             "streams": {k: s.state_dict() for k, s in batches.items()}, "rng": plumbing.rng_state(), **extra}
    plumbing.save_checkpoint(out, step, state, replaces=replaces)
    models.save_model(out, parts["ema"], parts["fusion"], config, step)
    plumbing.atomic_write_json(Path(out) / "args.json", vars(args))


def restore(state, source, parts, batches):
    """Load a checkpoint back into a run's parts and streams; (step, frozen_at)."""
    plumbing.load_state_dict(parts["model"], state["model"], f"{source} (DiT)")
    for k in ("ema", "fusion", "opt", "sched"):
        parts[k].load_state_dict(state[k])
    for k, s in state["streams"].items():
        batches[k].load_state_dict(s)
    plumbing.set_rng_state(state["rng"])
    log(f"continuing {source} at step {state['step']}")
    return state["step"], state["frozen_at"]


def log_losses(writer, step, steps, losses, grad_norm, lr, seconds):
    """A log line and tensorboard scalars: the mean loss per kind over the steps since the last line."""
    mean = {k: sum(v) / len(v) for k, v in losses.items()}
    log(f"step {step}/{steps}: loss " + ", ".join(f"{k} {v:.4f}" for k, v in mean.items())
        + f", grad norm {grad_norm:.3f}, {sum(map(len, losses.values())) / seconds:.2f} steps/s")
    if writer is not None:
        for k, v in mean.items():
            writer.add_scalar(f"loss/{k}", v, step)
        writer.add_scalar("lr", lr, step)
        writer.add_scalar("grad_norm", grad_norm, step)


def own_checkpoint(out, stage):
    """(path, state) of the newest checkpoint under `out`, or (None, None); one that another stage wrote
    (04 and 05 write the same kind) is refused before anything is touched."""
    path, state = plumbing.load_latest_checkpoint(out, models.CKPT_KIND)
    if state is not None and state.get("stage") != stage:
        raise DataError(f"--resume: {path} was written by {state.get('stage') or 'another script'}, not {stage}; "
                        f"nothing was changed (05 continues a 04 run with --init-from, into another --out)")
    return path, state


def claim_run_dir(out, args):
    """Clear a killed run's temp files from `out` and refuse a run already there unless --resume or
    --overwrite; returns the checkpoints that --overwrite replaces once the new run has one."""
    plumbing.remove_stale_temps(Path(out) / "checkpoints")
    old = plumbing.list_checkpoints(out)
    if old and not (args.resume or args.overwrite):
        raise DataError(f"{out} already holds a run ({old[-1].name}): --resume to continue it, --overwrite "
                        f"to replace it, or another --out")
    return old if args.overwrite and not args.resume else []


def tensorboard(out, d):
    """Rank 0's tensorboard writer under OUT/tb (others: None), opened once a first step is done."""
    if not d.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(Path(out) / "tb"))
