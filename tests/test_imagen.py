"""Invariants of image/imagen.py (PAPERS.md §2 sanity tests)."""
import math

import numpy as np
import pytest
import torch

from conftest import ROOT, load_script, tiny

im = load_script(ROOT / "image" / "imagen.py")


def live(net):
    """Leave the zero init of output and attention convs, so every path of the network carries signal."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.1)
    return net.eval()


def unets():
    base = live(im.UNet(8, (1, 1, 1), 8, 16))
    sr = live(im.UNet(8, (1, 2, 4), 8, 32, sr=True))
    return base, sr


def texts(n):
    torch.manual_seed(1)
    enc = im.TextEncoder(8).eval()
    words = ["7", "seven", "a handwritten seven", "3", "nine"]
    return im.encode(enc, words[:n], "cpu"), im.encode(enc, [""] * n, "cpu")


def test_dynamic_threshold_keeps_in_range_images_and_bounds_others():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16) * 2 - 1                                  # in [-1, 1]: s clamps to 1
    for p in (0.9, 0.995, 1.0):
        assert torch.equal(im.threshold(x, "dynamic", p), x)
    assert torch.equal(im.threshold(x, "static"), x)
    u = torch.rand(4, 1, 16, 16) * 2 - 1
    u[:, 0, 0, 0] = 1.0                                                   # max |u| = 1
    assert torch.allclose(im.threshold(3 * u, "dynamic", 1.0), u, atol=1e-6)   # p = 1: s = max |x0| = 3
    assert (im.threshold(3 * u, "static").abs() == 1).float().mean() > 0.5    # static saturates instead
    big = torch.randn(4, 1, 16, 16) * 5
    for p in (0.5, 0.9, 0.995):
        out = im.threshold(big, "dynamic", p)
        s = torch.quantile(big.flatten(1).abs(), p, dim=1).clamp(min=1).view(-1, 1, 1, 1)
        assert out.abs().max() <= 1 and torch.allclose(out, big.clamp(-s, s) / s)
        assert torch.equal(out.sign(), big.sign())
    mixed = torch.cat([x[:1], big[:1]])                                   # per sample: the in-range one is kept
    assert torch.equal(im.threshold(mixed, "dynamic", 0.995)[0], x[0])


def test_guidance_w1_is_conditional_and_w0_unconditional():
    (base, sr), (text, null) = unets(), texts(3)
    z, t = torch.randn(3, 1, 16, 16), torch.rand(3)
    with torch.no_grad():
        cond, uncond = base(z, t, text), base(z, t, null)
        assert not torch.allclose(cond, uncond, atol=1e-4)                # the text matters
        assert torch.equal(im.guided(base, z, t, text, null, 1.0), cond)
        assert torch.equal(im.guided(base, z, t, text, null, 0.0), uncond)
        assert torch.allclose(im.guided(base, z, t, text, null, 4.0), uncond + 4 * (cond - uncond), atol=1e-5)
        lr, t_aug = torch.randn(3, 1, 32, 32), torch.full((3,), 0.2)      # the SR stage: low-res input passed on
        z = torch.randn(3, 1, 32, 32)
        cond, uncond = sr(z, t, text, lr, t_aug), sr(z, t, null, lr, t_aug)
        assert torch.equal(im.guided(sr, z, t, text, null, 0.0, lowres=lr, t_aug=t_aug), uncond)
        assert torch.allclose(im.guided(sr, z, t, text, null, 3.0, lowres=lr, t_aug=t_aug), 3 * cond - 2 * uncond, atol=1e-5)


def test_log_snr_schedule():
    t = torch.linspace(0, 1, 101)
    lam = im.log_snr(t)
    a, s = im.alpha_sigma(t)
    assert torch.allclose(a ** 2 + s ** 2, torch.ones(()), atol=1e-6) and (lam.diff() < 0).all()
    assert abs(lam[0] + 2 * math.log(math.tan(0.008 / 1.008 * math.pi / 2))) < 1e-3   # lambda(0) = -log tan^2
    assert a[0] > 0.9999 and a[-1] < 1e-6 and s[-1] > 0.999999
    assert abs(a[50].item() ** 2 - 0.5) < 0.02                            # cosine: half the signal mid-way


def test_augmentation_level_zero_keeps_the_input_and_one_is_noise():
    torch.manual_seed(0)
    x = torch.rand(256, 1, 16, 16) * 2 - 1
    up = x.repeat_interleave(2, -1).repeat_interleave(2, -2)
    z0, z1 = im.augment(x, torch.zeros(256)), im.augment(x, torch.ones(256))
    assert z0.shape == (256, 1, 32, 32) and (z0 - up).abs().mean() < 0.015   # alpha(0) ~ 1, sigma(0) ~ 0.0125
    corr = torch.corrcoef(torch.stack([z1.flatten(), up.flatten()]))[0, 1]
    assert abs(corr) < 0.01 and abs(z1.std() - 1) < 0.01                  # pure noise


def test_sr_stage_accepts_the_augmentation_level():
    (base, sr), (text, _) = unets(), texts(2)
    assert base.aug is None and base.inp.in_channels == 1
    assert sr.aug is not None and sr.inp.in_channels == 2                 # z_t and z_lr, channel-wise
    z, t, lr, seen = torch.randn(2, 1, 32, 32), torch.rand(2), torch.randn(2, 1, 32, 32), []
    sr.aug[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        a, b = sr(z, t, text, lr, torch.zeros(2)), sr(z, t, text, lr, torch.ones(2))
    assert a.shape == (2, 1, 32, 32) and not torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(seen[1], im.timestep_embedding(torch.ones(2) * 1000, 8))


def test_text_encoder_is_frozen_while_training(fake_data, tmp_path, monkeypatch):
    encoders, encode = [], im.encode
    monkeypatch.setattr(im, "encode", lambda enc, t, d: encoders.append(enc) or encode(enc, t, d))
    args = [*map(str, tiny(fake_data, tmp_path))]
    im.main(["--train", *args])
    enc = encoders[0]
    assert all(not p.requires_grad and p.grad is None for p in enc.parameters()) and not enc.training
    first = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    fresh = im.TextEncoder(8).state_dict()                                # fitted before the diffusion training
    assert any(not torch.equal(first[f"text.{k}"], v) for k, v in fresh.items())
    im.main(["--train", "--resume", *args, "--steps", "4"])               # two more optimiser steps
    second = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(second[k], v) for k, v in first.items() if k.startswith("text."))
    for stage in ("base", "sr"):
        assert any(not torch.equal(second[k], v) for k, v in first.items() if k.startswith(stage))
    assert all(p.grad is None for p in enc.parameters())


def test_fit_text_learns_the_digit():
    torch.manual_seed(0)
    assert im.fit_text(im.TextEncoder(16), 120, "cpu") > 0.8


def test_posterior_matches_the_analytic_q():
    torch.manual_seed(0)
    x, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    for t, s in ((0.7, 0.4), (0.3, 0.29), (1.0, 0.5), (0.2, 0.0)):
        t, s = torch.tensor(t), torch.tensor(s)
        (a_t, s_t), (a_s, s_s) = im.alpha_sigma(t), im.alpha_sigma(s)
        z = a_t * x + s_t * eps
        mean, var = im.posterior(z, x, t, s)
        a_ts, var_ts = a_t / a_s, s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2   # q(z_t | z_s)
        assert torch.allclose(mean, a_ts * s_s ** 2 / s_t ** 2 * z + a_s * var_ts / s_t ** 2 * x, atol=1e-5)
        assert torch.allclose(var, var_ts * s_s ** 2 / s_t ** 2, atol=1e-6)


def test_ancestral_sampler_with_the_exact_eps_lands_on_the_data():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 4, 4) * 1.8 - 0.9                                # one data point per sample, in range

    def eps(z, t):
        a, s = im.alpha_sigma(t)
        return (z - a * x) / s

    for kind in ("dynamic", "static"):
        traj = im.ancestral(eps, torch.randn(2, 1, 4, 4), 50, kind, frames=10)
        assert traj.shape == (11, 2, 1, 4, 4) and torch.allclose(traj[-1], x, atol=0.01)


def test_loss_is_eps_mse_and_sr_gets_augmented_low_res():
    torch.manual_seed(0)
    x, x_lr, seen = torch.rand(64, 1, 32, 32) * 2 - 1, torch.rand(64, 1, 16, 16) * 2 - 1, {}

    def oracle(z, t, text, lowres=None, t_aug=None):                       # knows x: returns the exact eps
        seen.update(lowres=lowres, t_aug=t_aug, t=t)
        a, s = im.alpha_sigma(t)
        return (z - a * x) / s

    loss = im.diffusion_loss(oracle, None, x, x_lr)
    assert loss.shape == (64,) and loss.max() < 1e-4
    assert seen["lowres"].shape == (64, 1, 32, 32) and 0 <= seen["t_aug"].min() and seen["t_aug"].max() <= 1
    assert seen["t_aug"].std() > 0.2                                      # t_aug ~ U[0, 1] in training
    assert abs(im.diffusion_loss(lambda z, t, text: torch.zeros_like(z), None, x).mean() - 1) < 0.05


def test_efficient_unet_scales_skips_and_resamples_around_the_convs():
    (base, sr), (text, _) = unets(), texts(2)
    for net, size, scale in ((sr, 32, 2 ** -0.5), (base, 16, 1.0)):
        skips, into_up, sizes = {}, [], {"down": [], "up": []}
        last = max(net.keep)
        net.down[last].register_forward_hook(lambda m, a, out: skips.update(last=out))
        first_up = next(layer for layer in net.up if isinstance(layer, im.ResBlock))
        first_up.register_forward_pre_hook(lambda m, a: into_up.append(a[0]))
        for part in ("down", "up"):
            for layer in getattr(net, part):
                if isinstance(layer, im.ResBlock):
                    layer.register_forward_pre_hook(lambda m, a, part=part: sizes[part].append(a[0].shape[-1]))
        cond = dict(lowres=torch.randn(2, 1, 32, 32), t_aug=torch.rand(2)) if net is sr else {}
        with torch.no_grad():
            out = net(torch.randn(2, 1, size, size), torch.rand(2), text, **cond)
        assert out.shape == (2, 1, size, size)
        c = skips["last"].shape[1]                                         # the skip is the last channels of the cat
        assert skips["last"].abs().max() > 0.01
        assert torch.allclose(into_up[0][:, -c:], skips["last"] * scale, atol=1e-6)
        if net is sr:                                                      # App. B: no conv block at 32x32 but the
            assert isinstance(net.down[0], torch.nn.Conv2d) and net.down[0].stride == (2, 2)   # last; more blocks
            assert max(sizes["down"]) == 16 and sizes["up"].count(32) == 1 and sizes["up"][-1] == 32   # lower down
            assert [sizes["down"].count(r) for r in (16, 8, 4)] == [1, 2, 4 + 2]   # + the two middle blocks
        else:                                                              # edm.py's layout: blocks at full size
            assert isinstance(net.down[0], im.ResBlock) and sizes["down"][0] == 16 and sizes["up"][-1] == 16


def test_cascade_shapes_and_text_conditioning_paths():
    cfg = im.PRESETS["tiny"]
    net = im.cascade(cfg).eval()
    assert set(net) == {"text", "base", "sr"}
    text, null = im.encode(net["text"], ["7", "seven"], "cpu"), im.encode(net["text"], ["", ""], "cpu")
    assert text[0].shape == (2, 48, cfg.ch) and null[1].sum().item() == 2   # "" = BOS only
    for unet in (net["base"], net["sr"]):                                 # pooled text + cross-attention at <= 8x8
        assert isinstance(unet.text_norm, torch.nn.LayerNorm) and unet.pool.in_features == cfg.ch
        assert any(isinstance(m, im.CrossAttention) for m in unet.modules())
    torch.manual_seed(0)
    base = im.ancestral(lambda z, t: im.guided(net["base"], z, t, text, null, 5.0), torch.randn(2, 1, 16, 16), 3)
    assert base.shape == (4, 2, 1, 16, 16)
    z_lr, t_aug = im.augment(base[-1], torch.full((2,), 0.2)), torch.full((2,), 0.2)
    eps = lambda z, t: im.guided(net["sr"], z, t, text, null, 5.0, lowres=z_lr, t_aug=t_aug)   # noqa: E731
    sr = im.ancestral(eps, torch.randn(2, 1, 32, 32), 3)
    assert z_lr.shape == (2, 1, 32, 32) and sr.shape == (4, 2, 1, 32, 32) and sr[:-1].abs().max() <= 1   # x0_hat


def test_prompt_dropout_and_styles(fake_data, tmp_path, monkeypatch):
    seen, encode = [], im.encode
    monkeypatch.setattr(im, "encode", lambda enc, t, d: seen.append(t) or encode(enc, t, d))
    monkeypatch.setattr(im, "diffusion_loss", lambda net, text, x, *lr: x.mean((1, 2, 3)) + 0 * net.pool.bias.sum())
    im.main(["--train", *map(str, tiny(fake_data, tmp_path, "--steps", "1", "--batch-size", "2000"))])
    assert 0.08 < seen[0].count("") / len(seen[0]) < 0.12                # p_uncond = 0.1
    assert len(set(seen[0])) == 31                                        # 3 styles x 10 digits and ""


def test_stages_cli_sampling_and_user_errors(fake_data, tmp_path):
    args = [*map(str, tiny(fake_data, tmp_path))]
    im.main(["--train", "--stage", "base", *args])
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["stage_steps"] == {"base": 2, "sr": 0} and state["step"] == 2
    with pytest.raises(SystemExit) as e:                                  # sampling needs both stages
        im.main(["--sample", *args])
    assert "sr stage" in str(e.value.code) and "--stage sr" in str(e.value.code)
    im.main(["--train", "--resume", "--stage", "sr", *args])
    after = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert after["stage_steps"] == {"base": 2, "sr": 2}
    assert all(torch.equal(after["model"][k], v) for k, v in state["model"].items() if not k.startswith("sr."))
    assert any(not torch.equal(after["model"][k], v) for k, v in state["model"].items() if k.startswith("sr."))
    im.main(["--sample", *args])
    with np.load(tmp_path / "samples.npz") as f:
        a = f["images"]
        assert a.shape == (10, 1, 32, 32) and f["labels"].tolist() == list(range(10))
    im.main(["--sample", *args])
    with np.load(tmp_path / "samples.npz") as f:
        assert np.array_equal(f["images"], a)                             # same seed, same samples
    im.main(["--sample", "--threshold", "static", "--prompt", "a handwritten three", "--aug-level", "0", *args])
    with np.load(tmp_path / "samples.npz") as f:
        assert "labels" not in f and set(f["prompts"]) == {"a handwritten three"}
    for flags, needle in ((["--percentile", "1.5"], "--percentile"), (["--aug-level", "2"], "--aug-level"),
                          (["--threshold", "soft"], "--threshold"), (["--ch", "16"], "does not match"),
                          (["--stage", "all"], "--stage")):
        with pytest.raises(SystemExit) as e:
            im.main(["--sample", *args, *flags])
        assert needle in str(e.value.code) and "\n" not in str(e.value.code)
