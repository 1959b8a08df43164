"""dit.py: the DiT's shapes and masking, rectified flow's loss and sampler, CFG, EMA."""
import pytest
import torch

from models import DiT, EMA, RectifiedFlow


def tiny(text_dim=16, **kw):
    torch.manual_seed(0)
    return DiT(text_dim=text_dim, hidden=32, depth=2, heads=2, patch=4, tpatch=2, **kw)


def perturbed(model, std=0.05):
    """Move the zero-initialised layers off zero so the output depends on everything."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def cond(B, L=5, D=16, valid=3):
    torch.manual_seed(2)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, :valid] = True
    return torch.randn(B, L, D), mask


def test_shapes_images_and_videos_and_zero_init():
    m = tiny()
    feats, mask = cond(2)
    for T in (1, 4):
        x = torch.randn(2, 3, T, 8, 8)
        v = m(x, torch.rand(2), feats, mask)
        assert v.shape == x.shape
        assert torch.equal(v, torch.zeros_like(v))  # adaLN-zero: the untrained model predicts 0
    with pytest.raises(ValueError, match="multiple of the temporal patch"):
        m(torch.randn(2, 3, 3, 8, 8), torch.rand(2), feats, mask)


def test_padding_is_masked_and_empty_caption_is_finite():
    m = perturbed(tiny()).eval()
    feats, mask = cond(2)
    x, t = torch.randn(2, 3, 4, 8, 8), torch.rand(2)
    v = m(x, t, feats, mask)
    feats2 = feats.clone()
    feats2[:, 3:] = 100.0  # only padding changes
    torch.testing.assert_close(m(x, t, feats2, mask), v)
    feats3 = feats.clone()
    feats3[:, 0] += 1.0  # a real token changes
    assert not torch.allclose(m(x, t, feats3, mask), v)
    empty = m(x, t, feats, torch.zeros_like(mask))  # no valid token at all
    assert torch.isfinite(empty).all()


def test_text_and_time_change_the_output():
    m = perturbed(tiny()).eval()
    feats, mask = cond(1)
    x = torch.randn(1, 3, 1, 8, 8)
    a = m(x, torch.tensor([0.5]), feats, mask)
    assert not torch.allclose(a, m(x, torch.tensor([0.9]), feats, mask))
    assert not torch.allclose(a, m(x, torch.tensor([0.5]), feats.flip(1), mask))


def test_loss_is_mse_to_the_velocity():
    class Const(torch.nn.Module):
        def forward(self, z, t, f, m):
            return torch.full_like(z, 0.25)
    x, noise = torch.randn(3, 3, 1, 4, 4), torch.randn(3, 3, 1, 4, 4)
    loss = RectifiedFlow().loss(Const(), x, (None, None), t=torch.rand(3), noise=noise)
    torch.testing.assert_close(loss, ((noise - x - 0.25) ** 2).mean(dim=(1, 2, 3, 4)))


def test_euler_sampler_follows_straight_paths_to_the_data():
    x0 = torch.randn(2, 3, 1, 4, 4)

    class Oracle(torch.nn.Module):
        def forward(self, z, t, f, m):  # exact velocity of the straight path through z ending at x0
            return (z - x0.repeat(len(z) // len(x0), 1, 1, 1, 1)) / t.view(-1, 1, 1, 1, 1)
    out = RectifiedFlow().sample(Oracle(), torch.randn(2, 3, 1, 4, 4), (None, None), steps=7)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-5)


def guidance_setup(frames):
    """A perturbed tiny DiT, two conditions, a null condition and noise of `frames` frames."""
    feats, mask = cond(2)
    null = (torch.randn(1, 2, 16), torch.ones(1, 2, dtype=torch.bool))
    return perturbed(tiny()).eval(), feats, mask, null, torch.randn(2, 3, frames, 8, 8), RectifiedFlow()


def test_cfg_one_equals_the_conditional_sampler():
    m, feats, mask, null, noise, rf = guidance_setup(4)
    plain = rf.sample(m, noise, (feats, mask), steps=5)
    guided1 = rf.sample(m, noise, (feats, mask), null, steps=5, cfg=1.0)
    torch.testing.assert_close(guided1, plain, rtol=1e-4, atol=1e-5)
    guided4 = rf.sample(m, noise, (feats, mask), null, steps=5, cfg=4.0)
    assert (guided4 - plain).abs().max() > 1e-3
    uncond = rf.sample(m, noise, (null[0].expand(2, -1, -1), null[1].expand(2, -1)), steps=5)
    guided0 = rf.sample(m, noise, (feats, mask), null, steps=5, cfg=0.0)  # cfg 0 = the null condition alone
    torch.testing.assert_close(guided0, uncond, rtol=1e-4, atol=1e-5)


def test_ema_warmup_and_decay():
    m = tiny()
    ema = EMA(m, decay=0.9)
    p0 = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m)  # step 1: decay min(0.9, 2/11)
    d = 2 / 11
    for e, a, b in zip(ema.model.parameters(), p0, m.parameters()):
        torch.testing.assert_close(e, d * a + (1 - d) * b)
    assert not any(p.requires_grad for p in ema.model.parameters())
    for _ in range(200):
        ema.update(m)
    torch.testing.assert_close(next(ema.model.parameters()), next(m.parameters()))
