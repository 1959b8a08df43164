"""The DiT-side instruments: text-feature standardisation at the denoiser's input, the diffusion classifier
and the mismatched-prompt control of 06 --eval, and the colour readout of an encoder's features, each on a
case whose answer is known."""
import collections
import importlib
import importlib.util
import os
import random
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import common
import models
from tests import diffusion_stubs as stubs
from tests.diffusion_stubs import TINY, make_world
from world import checker, scenes

t2x = importlib.import_module("05_train_diffusion")
sample = importlib.import_module("06_sample")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


def test_standardisation_is_fitted_on_the_training_captions_and_travels_with_the_model(tmp_path, world):
    argv = ["--data", str(world), "--cache-dir", str(tmp_path / "cache"), *TINY, "--steps", "2", "--ckpt-every", "2"]
    run = stubs.built(argv + ["--out", str(tmp_path / "a")])
    tokens = torch.cat(list(run.bank.fused_chunks(run.fusion, "cpu")))
    z = run.model.text_standardiser(tokens)
    assert z.mean(0).abs().max() < 1e-4 and (z.std(0, unbiased=False) - 1).abs().max() < 1e-3
    # what 05 writes is what 06 reads: the same statistics in model.safetensors, the same output
    t2x.main(argv + ["--out", str(tmp_path / "a")])
    model, config, _, _ = models.load_dit(tmp_path / "a")
    assert config["text_norm"] == "standardise"
    assert torch.equal(model.text_standardiser.mean, run.model.text_standardiser.mean)
    assert torch.equal(model.text_standardiser.std, run.model.text_standardiser.std)
    # off: no statistics, the features go in as they are
    t2x.main(argv + ["--out", str(tmp_path / "b"), "--text-norm", "none"])
    plain, config, _, _ = models.load_dit(tmp_path / "b")
    assert config["text_norm"] == "none" and not any("standardiser" in k for k in plain.state_dict())
    # every backbone carries it
    wan = models.make_model({"backbone": "wan", "text_norm": "standardise", "text_dim": 8, "channels": 3,
                             "backbone_kwargs": models.backbone_config("wan", "tiny", 3, 8)})
    assert {"text_standardiser.mean", "text_standardiser.std"} <= set(wan.state_dict())


class Oracle(nn.Module):
    """Knows each caption's image: predicts the exact velocity for the true caption, a wrong one otherwise."""

    def __init__(self, images, blind=False):
        super().__init__()
        self.images, self.blind, self.p = images, blind, nn.Parameter(torch.zeros(1))

    def forward(self, z, t, text, mask):
        if self.blind:
            return 0.3 * z
        x = torch.stack([self.images.get(int(i), torch.zeros_like(z[0])) for i in text[:, 0, 0].tolist()])
        return (z - x) / t.view(-1, 1, 1, 1, 1)  # z = (1-t) x + t n  ->  n - x = (z - x) / t


def test_classifier_ranks_an_oracle_right_and_a_caption_blind_model_at_chance():
    rng = random.Random(0)
    recs = [{"kind": k, "scene": scenes.sample_scene(rng, k)} for k in ("image", "image", "video")]
    ids, images = {}, {}
    for r in recs:  # the oracle's table: each record's true caption (06 words the i-th of a kind by i) -> its render
        i = [q for q in recs if q["kind"] == r["kind"]].index(r)
        true, _ = checker.hard_negatives(r["scene"], "colour", seed=i, style=i % 2)
        render = scenes.render_image if r["kind"] == "image" else scenes.render_video
        px = torch.from_numpy(render(r["scene"]).reshape(-1, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3))
        images[ids.setdefault(true, len(ids) + 1)] = px.permute(3, 0, 1, 2).float() / 127.5 - 1

    def cond_fn(texts):
        f = torch.tensor([[[float(ids.get(t, 0))]] for t in texts])
        return f, torch.ones(len(texts), 1, dtype=torch.bool)
    config = {"vae": None, "dtype": "fp32", "frames": scenes.FRAMES, "size": scenes.IMAGE_SIZE, "backbone": "dit"}
    by_kind = {k: [r for r in recs if r["kind"] == k] for k in ("image", "video")}
    right = sample.classify(Oracle(images), cond_fn, config, by_kind, n_times=3, batch=7)["results"]
    assert right["image"]["all"]["n"] == 8 and right["video"]["all"]["n"] == 6  # 4 image, 6 video aspects
    assert all(r["mean"] == 1.0 for kind in right.values() for a, r in kind.items() if a != "questions")
    blind = sample.classify(Oracle(images, blind=True), cond_fn, config, by_kind, n_times=3, batch=7)["results"]
    for kind in blind.values():
        for a, r in kind.items():
            if a != "questions":
                assert r["mean"] == pytest.approx(r["chance"]) and r["chance"] <= 0.5


def test_mismatched_control_on_a_known_case():
    a = {"kind": "image", "objects": [{"shape": "circle", "colour": "red", "size": "large", "cell": [0, 0], "word": None}]}
    b = {"kind": "image", "objects": [{"shape": "square", "colour": "blue", "size": "large", "cell": [2, 2], "word": None}]}
    gen = torch.stack([torch.from_numpy(scenes.render_image(s)) for s in (a, b)]).numpy()[:, None, None]  # perfect
    gain = sample.paired_gain(sample.score(gen, [a, b]), sample.score(gen, [b, a]))
    # scored against the other scene: colour, shape and place are wrong, the count (one object) is right
    assert {k: gain[k]["mean"] for k in ("colour", "shape", "position", "count")} == \
        {"colour": 1.0, "shape": 1.0, "position": 1.0, "count": 0.0}
    assert gain["all"] == {"mean": 0.75, "se": 0.0, "n": 2}


def load_experiment(name="colour_readout"):
    """experiments/NAME.py as a module."""
    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_norm_on_off_pairs_the_arms_by_seed_on_known_reports(tmp_path, capsys):
    """experiments/text_norm_on_off.py --analyse-only on eval.json files whose numbers are known."""
    import json
    values = {(0, "none"): 0.2, (0, "standardise"): 0.5, (1, "none"): 0.4, (1, "standardise"): 0.3}
    for (seed, arm), x in values.items():
        def cell(v):
            return {"all": {"mean": v, "se": 0.01}, "colour": {"mean": v, "se": 0.02}}
        report = {"settings": {"image": {}, "video": {}},
                  "classifier": {"results": {k: cell(x) for k in ("image", "video")}},
                  "gain over mismatched": {k: cell(x / 2) for k in ("image", "video")},
                  "gain over floor": {k: cell(x / 4) for k in ("image", "video")}}
        path = tmp_path / "enc-norm-avg" / f"seed_{seed}" / arm / "eval" / "eval.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(report))
    load_experiment("text_norm_on_off").analyse(tmp_path)
    table = json.loads((tmp_path / "table.json").read_text())
    image, video = table["rows"]
    assert image["kind"] == "image" and video["kind"] == "video" and image["seeds"] == ["seed_0", "seed_1"]
    for measure, scale in (("classifier", 1), ("mismatched", 0.5), ("floor", 0.25)):
        assert image[f"{measure}:none"] == pytest.approx(0.3 * scale)
        assert image[f"{measure}:standardise"] == pytest.approx(0.4 * scale)
        assert image[f"{measure}:diff"] == pytest.approx([0.3 * scale, -0.1 * scale])
        assert image[f"{measure}:none:eval_se"] == pytest.approx(0.01)
    assert [c["image"] for c in table["colour"]] == [[[0.2, 0.02], [0.1, 0.02]], [[0.5, 0.02], [0.25, 0.02]],
                                                    [[0.4, 0.02], [0.2, 0.02]], [[0.3, 0.02], [0.15, 0.02]]]
    assert "| enc-norm-avg | image | prompt - floor | +0.075 ± 0.010 | +0.100 ± 0.010 | +0.075, -0.025 |" \
        in capsys.readouterr().out


def test_the_colour_readout_names_colours_from_their_words_and_nothing_without_them():
    """experiments/colour_readout.py on features whose answer is known: a one-hot vector per word reads every
    held-out colour set; the same captions with every colour word made one shared word leave it no better
    than the commonest held-out set (the best guess that sees no colour)."""
    readout = load_experiment()
    data = readout.colour_captions(400, seed=0)
    sets = [colours for _, colours in data]

    def one_hot_words(blind):
        words = [re.findall(r"[a-z]+", caption.lower()) for caption, _ in data]
        if blind:
            words = [["colour" if w in scenes.COLOURS else w for w in ws] for ws in words]
        vocab = {w: i for i, w in enumerate(sorted({w for ws in words for w in ws}))}
        feats = nn.functional.one_hot(torch.tensor([vocab[w] for ws in words for w in ws]), len(vocab)).float()
        return common.FeatureBank(feats, torch.tensor([0] + [len(ws) for ws in words]).cumsum(0))

    torch.set_num_threads(1)
    sees = readout.readout_curve(one_hot_words(blind=False), sets, n_train=300, steps=300)
    blind = readout.readout_curve(one_hot_words(blind=True), sets, n_train=300, steps=300)
    assert [step for step, _, _ in sees] == [100, 200, 300] and sees[-1][2] == 1.0
    commonest = collections.Counter(frozenset(c) for c in sets[300:]).most_common(1)[0][1] / 100
    assert max(exact for _, _, exact in blind) <= commonest


@pytest.mark.skipif(not os.environ.get("GRANTED_FULL_LADDER"), reason="full-size ladder: set GRANTED_FULL_LADDER=1 "
                    "(builds both rungs once, about 50 minutes of one core, then cached)")
@pytest.mark.parametrize("rung", ["tiny-qwen3vl-llm", "tiny-qwen3vl-base"])
def test_a_dit_shaped_readout_names_the_colours_of_world_captions_from_each_ladder_rung(rung):
    """Issue 20's check of the ladder: the readout of experiments/colour_readout.py, Norm-Avg features as
    they are, 600 training captions, exact match on 200 held out after 400 steps. Today's rungs read 0.985
    (twin) and 0.825 (base); four builds of the recipe read 0.555-0.985 (the readout is still rising at step
    400), the ladder pretrained on next-token loss alone 0.000 (docs/results.md)."""
    import encoders
    readout = load_experiment()
    torch.set_num_threads(1)
    data = readout.colour_captions(800, seed=0)
    enc = encoders.load_encoder(rung)
    feats, offsets = common.encode_texts(enc, models.LayerFusion("norm-avg", enc.num_layers), [c for c, _ in data], 160)
    curve = readout.readout_curve(common.FeatureBank(feats, offsets), [cs for _, cs in data], 600)
    assert curve[-1][2] >= 0.5, curve
