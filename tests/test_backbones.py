"""The diffusers backbones (lumina2, wan) and VAE latents in 04/05/06, on the tiny world at CPU size:
each backbone learns on pixels and latents, resume is bit-identical, pretrained weights keep exactly
the pretrained weights outside the text embedder, the latent cache follows the VAE, 06 samples each."""
import importlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import models
from tests import diffusion_stubs as stubs
import plumbing
from plumbing import DataError
from tests.cli import assert_one_line, cli_error
from tests.diffusion_stubs import TINY, make_world

ROOT = Path(__file__).resolve().parents[1]
t2x = importlib.import_module("05_train_diffusion")
sample = importlib.import_module("06_sample")
LATENT = ["--vae", models.TINY_VAE, "--size", "16"]  # the tiny VAE is 4x smaller: 16 px -> 4x4 latents
SETUPS = {  # backbone -> its flags; lumina2 is an image model, so it trains on images only
    "dit": ["--backbone", "dit"],
    "lumina2": ["--backbone", "lumina2", "--interleave", "1:0"],
    "wan": ["--backbone", "wan"],
}


@pytest.fixture(autouse=True)
def one_thread_and_one_encoder_load(monkeypatch):
    yield from stubs.one_thread_and_one_encoder_load(monkeypatch)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), n_images=8, n_videos=4)


def flags(tmp, data, backbone, latent, *extra, out="out"):
    space = LATENT + (["--patch", "2x1"] if backbone == "dit" else []) if latent else []
    return ["--data", str(data), "--out", str(tmp / out), "--cache-dir", str(tmp.parent / "cache"), *TINY,
            *SETUPS[backbone], *space, *extra]


def ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("latent", [False, True], ids=["pixels", "latents"])
@pytest.mark.parametrize("backbone", list(SETUPS))
def test_each_backbone_learns_on_pixels_and_latents(tmp_path, world, backbone, latent):
    argv = flags(tmp_path, world, backbone, latent, "--lr", "3e-3", "--steps", "30", "--ckpt-every", "30")
    run = stubs.built(argv)
    assert isinstance(run.model, models.DiT if backbone == "dit" else models.DiffusersBackbone)
    kinds = ["image"] if backbone == "lumina2" else ["image", "video"]
    assert run.data["image"]["media"].dtype == (torch.float32 if latent else torch.uint8)
    t2x.main(argv)
    state = ckpt(tmp_path / "out/checkpoints/step_00000030.pt")
    assert set(state["streams"]) == set(kinds)
    trained = run.trained(tmp_path / "out/checkpoints/step_00000030.pt")
    before, after = ({k: stubs.fixed_loss(run, m, k) for k in kinds} for m in (run.model, trained))
    for k in kinds:
        assert after[k] < 0.8 * before[k], (k, before, after)


def test_lumina2_refuses_video_steps_in_one_line(tmp_path, world, capsys):
    argv = flags(tmp_path, world, "lumina2", False, "--steps", "2", "--interleave", "7:3")
    assert_one_line(*cli_error(t2x.main, argv, capsys), "lumina2 is an image model")
    model = models.DiffusersBackbone("lumina2", models.backbone_config("lumina2", "tiny", 3, 8))
    with pytest.raises(DataError, match="--interleave 1:0"):
        model(torch.zeros(1, 3, 4, 8, 8), torch.ones(1), torch.zeros(1, 2, 8), torch.ones(1, 2, dtype=torch.bool))


def test_library_conventions_t1_is_noise_and_velocity_is_noise_minus_x():
    """What each diffusers model is handed: Wan sigma*1000 and its output as is; Lumina2 1-sigma (its
    t=0 is noise) and its output negated, as their pipelines do."""
    seen = {}
    for backbone in ("wan", "lumina2"):
        model = models.DiffusersBackbone(backbone, models.backbone_config(backbone, "tiny", 3, 8))

        def fake(x, timestep, text, *rest, return_dict=True, _b=backbone):
            seen[_b] = timestep.clone()
            return (torch.ones_like(x),)
        model.net.forward = fake  # nn.Module.__call__ runs the instance's forward
        x = torch.zeros(2, 3, 1, 8, 8)
        v = model(x, torch.tensor([1.0, 0.25]), torch.zeros(2, 3, 8), torch.ones(2, 3, dtype=torch.bool))
        assert v.shape == x.shape
        assert float(v.mean()) == (1.0 if backbone == "wan" else -1.0)
    assert seen["wan"].tolist() == [1000.0, 250.0]
    assert seen["lumina2"].tolist() == [0.0, 0.75]


@pytest.mark.parametrize("backbone,latent", [("wan", True), ("lumina2", False)], ids=["wan-latents", "lumina2-pixels"])
def test_stopped_and_resumed_run_is_bit_identical(tmp_path, world, backbone, latent):
    t2x.main(flags(tmp_path, world, backbone, latent, "--steps", "6", "--ckpt-every", "3", out="a"))
    t2x.main(flags(tmp_path, world, backbone, latent, "--steps", "6", "--ckpt-every", "3", "--stop-at", "3", out="b"))
    t2x.main(["--out", str(tmp_path / "b"), "--resume", "--cache-dir", str(tmp_path.parent / "cache")])  # no flags
    sa, sb = ckpt(tmp_path / "a/checkpoints/step_00000006.pt"), ckpt(tmp_path / "b/checkpoints/step_00000006.pt")
    assert sa["config"]["backbone"] == backbone and sa["config"]["vae"] == (models.TINY_VAE if latent else None)
    assert sa["streams"] == sb["streams"]
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    for k in sa["ema"]["model"]:
        assert torch.equal(sa["ema"]["model"][k], sb["ema"]["model"][k]), k
    with pytest.raises(DataError, match="--backbone dit contradicts"):
        t2x.main(flags(tmp_path, world, backbone, latent, "--steps", "8", "--resume", "--backbone", "dit", out="b"))


def save_tiny_pretrained(path, backbone, text_dim=24, channels=3):
    """A tiny random diffusers transformer written by save_pretrained (a stand-in for a hub model),
    with a text width other than the encoder's."""
    torch.manual_seed(7)
    net = models.diffusers_class(backbone)(**models.backbone_config(backbone, "tiny", channels, text_dim))
    net.save_pretrained(path)
    return net.state_dict()


@pytest.mark.parametrize("backbone", ["wan", "lumina2"])
def test_pretrained_weights_keep_all_but_the_text_embedder(tmp_path, world, backbone):
    saved = save_tiny_pretrained(tmp_path / "pretrained", backbone)
    setup = flags(tmp_path, world, backbone, False, "--steps", "2", "--backbone-config", str(tmp_path / "pretrained"))
    run = stubs.built(setup)
    text = models.TEXT_EMBEDDER[backbone]
    now = run.model.net.state_dict()
    assert set(now) == set(saved)
    reinit = [k for k in now if k.startswith(text)]
    assert reinit and all(k.startswith(text) for k in reinit)
    torch.manual_seed(run.config["seed"])
    fresh = models.make_model(run.config).net.state_dict()  # what a run without pretrained weights starts from
    for k, v in now.items():
        assert torch.equal(v, fresh[k] if k.startswith(text) else saved[k]), k
    width = run.config["text_dim"]
    widths = lambda sd: {v.shape[-1] for k, v in sd.items() if k.startswith(text)}  # noqa: E731
    assert width == 64 and 24 in widths(saved) and 64 in widths(now) and 24 not in widths(now)
    assert run.config["backbone_kwargs"]["num_layers"] == 2  # the pretrained model's own config
    t2x.main(setup + ["--ckpt-every", "1", "--stop-at", "1"])
    (tmp_path / "pretrained/config.json").unlink()  # a checkpoint holds its weights: resume needs no source
    t2x.main(["--out", str(tmp_path / "out"), "--resume", "--cache-dir", str(tmp_path.parent / "cache")])
    assert ckpt(tmp_path / "out/checkpoints/step_00000002.pt")["step"] == 2
    save_tiny_pretrained(tmp_path / "wrong", backbone, channels=4)  # a latent model, pixel data
    with pytest.raises(DataError, match="does not fit"):
        stubs.built(setup[:-1] + [str(tmp_path / "wrong")])


def test_latent_cache_is_rebuilt_when_the_vae_changes(tmp_path, world, monkeypatch):
    d = plumbing.Dist()
    calls = []
    real = models.vae_encode
    monkeypatch.setattr(models, "vae_encode", lambda vae, x: calls.append(len(x)) or real(vae, x))

    def latents(vae_name):
        vae, vid = models.load_vae(vae_name)
        data = common.load_t2x(world, 16, 4)
        return common.latent_media(vae, vid, data, 16, 4, tmp_path, d), vid
    a, id_a = latents(models.TINY_VAE)
    assert sum(calls) == 12 and a["video"]["media"].shape == (4, 4, 3, 4, 4)  # 4 frames -> 5 -> 3 latent frames
    b, _ = latents(models.TINY_VAE)
    assert sum(calls) == 12 and torch.equal(a["image"]["media"], b["image"]["media"])  # served from the cache
    vae, _ = models.load_vae(models.TINY_VAE)
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)  # the same architecture, other weights
    vae.save_pretrained(tmp_path / "vae")
    c, id_c = latents(str(tmp_path / "vae"))
    assert id_c != id_a and sum(calls) == 24 and not torch.equal(a["image"]["media"], c["image"]["media"])
    assert len(list(tmp_path.glob("latents_*.pt"))) == 4  # 2 VAEs x 2 kinds


def test_vae_round_trip_shapes():
    vae, _ = models.load_vae(models.TINY_VAE)
    x = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    z = models.vae_encode(vae, x)
    assert z.shape == (2, 4, 5, 4, 4)  # 8 frames, padded to 9 = 1 + 2*4 for this VAE's factor 2
    assert models.vae_decode(vae, z, 8).shape == x.shape
    assert models.vae_decode(vae, models.vae_encode(vae, x[:, :, :1]), 1).shape == (2, 3, 1, 16, 16)


@pytest.mark.parametrize("backbone", list(SETUPS))
def test_06_samples_and_scores_each_backbone_on_latents(tmp_path, backbone):
    from world import scenes
    data = make_world(tmp_path / "w", n_images=8, n_videos=4, frames=scenes.FRAMES)
    t2x.main(flags(tmp_path, data, backbone, True, "--steps", "2", "--frames", str(scenes.FRAMES)))
    rng = random.Random(0)
    recs = []
    for kind in ("image", "video"):
        scene = scenes.sample_scene(rng, kind)
        recs.append({"caption": scenes.write_captions(scene, rng)[0], "kind": kind, "scene": scene})
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    sample.main(["--ckpt", str(tmp_path / "out"), "--eval", "--eval-data", str(tmp_path / "eval.jsonl"), "--sample-steps", "2",
                 "--eval-seeds", "2", "--out", str(tmp_path / "samples")])
    res = json.loads((tmp_path / "samples/eval.json").read_text())["results"]["DiT + prompt"]
    assert res["image"]["colour"]["n"] == 2
    assert ("video" in res) == (backbone != "lumina2")  # lumina2 makes images only
    sample.main(["--ckpt", str(tmp_path / "out"), "--out", str(tmp_path / "s"), "--prompts", "a red square",
                 "--sample-seeds", "0", "--sample-steps", "2"])
    assert (tmp_path / "s/images.png").is_file()


def test_two_processes_match_one_for_wan_on_latents(tmp_path, world):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = flags(tmp_path, world, "wan", True, "--steps", "4", "--ckpt-every", "4")
    i = args.index("--out")
    args = args[:i] + args[i + 2:]  # --out per run
    script = str(ROOT / "05_train_diffusion.py")
    subprocess.run([sys.executable, script, "--out", str(tmp_path / "one"), *args],
                   check=True, env=env, cwd=ROOT, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                    "--out", str(tmp_path / "two"), *args], check=True, env=env, cwd=ROOT, timeout=300)
    one, two = ckpt(tmp_path / "one/checkpoints/step_00000004.pt"), ckpt(tmp_path / "two/checkpoints/step_00000004.pt")
    assert one["config"]["vae"] == models.TINY_VAE and one["streams"] == two["streams"]
    for k, v in one["model"].items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-4, atol=2e-5, msg=k)
    torch.manual_seed(0)
    init = models.make_model(one["config"]).state_dict()
    assert sum(float((one["model"][k] - v).abs().sum()) for k, v in init.items()) > 0, "it trained"


def test_04_learns_layer_weights_with_wan_on_latents_and_05_continues_it(tmp_path, world):
    lw = importlib.import_module("04_train_layer_weights")
    lw.main(flags(tmp_path, world, "wan", True, "--steps", "6", "--freeze", "0.5", "--weights-lr", "0.05",
                  out="lw"))
    state = ckpt(tmp_path / "lw/checkpoints/step_00000003.pt")
    assert state["frozen_at"] == 3 and state["config"]["backbone"] == "wan"
    assert state["config"]["vae"] == models.TINY_VAE
    assert not torch.equal(state["fusion"]["logits"], torch.zeros_like(state["fusion"]["logits"]))  # they moved
    t2x.main(["--init-from", str(tmp_path / "lw"), "--out", str(tmp_path / "s2"),
              "--cache-dir", str(tmp_path.parent / "cache")])
    end = ckpt(tmp_path / "s2/checkpoints/step_00000006.pt")
    assert torch.equal(end["fusion"]["logits"], state["fusion"]["logits"])  # frozen where 04 froze them
    assert isinstance(models.load_dit(tmp_path / "s2")[0], models.DiffusersBackbone)


BAD = [(["--backbone", "wan", "--backbone-config", "{oops"], "--backbone-config '{oops': expected tiny, paper"),
       (["--backbone", "wan", "--backbone-config", '{"nope": 1}'], "wan has no option 'nope'"),
       (["--backbone-config", "paper"], "--backbone-config is for --backbone lumina2 or wan"),
       (["--backbone", "wan", "--backbone-config", "/no/such/model"], "--backbone-config /no/such/model: no wan"),
       (["--vae", "/no/such/vae"], "VAE /no/such/vae: cannot be loaded")]


@pytest.mark.parametrize("extra,message", BAD, ids=[m[:28] for _, m in BAD])
def test_bad_backbone_or_vae_flags_are_one_line(tmp_path, world, extra, message, capsys):
    argv = flags(tmp_path, world, "dit", False, "--steps", "2") + extra
    assert_one_line(*cli_error(t2x.main, argv, capsys), message)


def test_lumina2_takes_the_default_caption_length_and_refuses_too_long_ones():
    model = models.DiffusersBackbone("lumina2", models.backbone_config("lumina2", "tiny", 3, 8))
    x, t = torch.zeros(1, 3, 1, 8, 8), torch.ones(1)
    for L in (160, 299):  # 05's default --max-length, and the longest its rotary table has room for
        assert model(x, t, torch.randn(1, L, 8), torch.ones(1, L, dtype=torch.bool)).shape == x.shape
    with pytest.raises(DataError, match="lower --max-length"):
        model(x, t, torch.randn(1, 300, 8), torch.ones(1, 300, dtype=torch.bool))


def test_an_image_vae_from_a_pipeline_folder_encodes_frame_by_frame(tmp_path, world):
    """AutoencoderKL (Lumina-Image-2.0's kind): found in a pipeline's vae/ by its config's class name,
    each frame encoded as an image, scaled and shifted as its config says; a DiT trains on it."""
    import diffusers
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            scaling_factor=0.5, shift_factor=0.1).save_pretrained(tmp_path / "pipe/vae")
    vae, vid = models.load_vae(str(tmp_path / "pipe"))
    assert isinstance(vae, diffusers.AutoencoderKL) and vid.startswith("AutoencoderKL:")
    x = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    z = models.vae_encode(vae, x)
    raw = vae.encode(x[:, :, 1]).latent_dist.mean
    torch.testing.assert_close(z[:, :, 1], (raw - 0.1) * 0.5)  # frame 1, as an image
    assert z.shape == (2, 4, 3, 4, 4) and models.vae_decode(vae, z, 3).shape == x.shape
    argv = flags(tmp_path, world, "dit", False, "--vae", str(tmp_path / "pipe"), "--patch", "2x2", "--steps", "2")
    assert stubs.built(argv).config["latent_shape"] == {"image": [4, 1, 4, 4], "video": [4, 4, 4, 4]}
    t2x.main(argv)
    assert ckpt(tmp_path / "out/checkpoints/step_00000002.pt")["step"] == 2


@pytest.mark.parametrize("backbone,text_dim,low,high", [("wan", 4096, 1.3e9, 1.5e9), ("lumina2", 2304, 2.5e9, 2.7e9)],
                         ids=["wan", "lumina2"])
def test_paper_configs_are_the_papers_model_sizes(backbone, text_dim, low, high):
    """`--backbone-config paper` with the original text encoders' widths (umT5-XXL 4096, Gemma-2-2B 2304):
    Wan2.1-T2V-1.3B has 1.42B parameters, Lumina-Image-2.0 2.6B. Built on the meta device (no memory)."""
    with torch.device("meta"):
        net = models.diffusers_class(backbone)(**models.backbone_config(backbone, "paper", 16, text_dim))
    assert low < sum(p.numel() for p in net.parameters()) < high
