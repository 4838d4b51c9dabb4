"""Invariants of video/imagen_video.py (PAPERS.md §13 sanity tests)."""
import math

import numpy as np
import pytest
import torch

from conftest import ROOT, load_script, tiny

iv = load_script(ROOT / "video" / "imagen_video.py")


def live(net):
    """Leave the zero init of output projections and relative biases, so every path of the network carries signal."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.3)
        if isinstance(m, iv.TemporalAttention):
            torch.nn.init.normal_(m.rel)
    return net.eval().requires_grad_(False)


def text(b, f, dim=8, length=5):
    g = torch.Generator().manual_seed(2)
    return torch.randn(b, f, length, dim, generator=g), torch.ones(b, f, length, dtype=torch.bool)


def flat(text, frames=slice(None)):  # (B, F, ...) -> the per-frame text the U-Net takes, (B F', ...)
    return [c[:, frames].flatten(0, 1) for c in text]


def test_v_parameterisation_round_trip():
    torch.manual_seed(0)
    x, eps = torch.rand(3, 1, 4, 8, 8) * 2 - 1, torch.randn(3, 1, 4, 8, 8)
    for t in torch.tensor([0.0, 0.01, 0.3, 0.5, 0.8, 0.99, 1.0]):
        a, s = iv.alpha_sigma(t)
        assert torch.allclose(a ** 2 + s ** 2, torch.ones(()), atol=1e-6)
        z, v = a * x + s * eps, a * eps - s * x
        assert torch.allclose(iv.x0_hat(lambda z_, t_: v, z, t), x, atol=1e-5)   # x_hat = alpha z - sigma v
        assert torch.allclose(s * z + a * v, eps, atol=1e-5)              # eps_hat = sigma z + alpha v

    def oracle(z, t, text, images=0, c_aug=None, t_aug=None, target="v"):   # knows x: the exact v (or eps)
        a, s = iv.alpha_sigma(t)
        e = (z - a * x) / s
        return a * e - s * x if target == "v" else e
    assert iv.diffusion_loss(oracle, x, None).max() < 1e-4
    assert iv.diffusion_loss(lambda *a, **k: oracle(*a, **k, target="eps"), x, None).mean() > 0.05


def test_conditioning_augmentation_level_is_passed_through_and_zero_is_clean():
    torch.manual_seed(0)
    c = torch.rand(4, 1, 6, 16, 16) * 2 - 1
    assert torch.equal(iv.augment(c, torch.zeros(4)), c)                  # level 0: the clean conditioning
    level = torch.tensor([0.1, 0.3, 0.6, 0.9])
    noise = iv.augment(c, level) - torch.cos(level * math.pi / 2).view(-1, 1, 1, 1, 1) * c
    assert torch.allclose(noise.flatten(1).std(1), torch.sin(level * math.pi / 2), rtol=0.05)
    seen = []

    def net(z, t, text, images=0, c_aug=None, t_aug=None):                # records what the SR stage is told
        seen.append((c_aug, t_aug))
        return torch.zeros_like(z)
    iv.diffusion_loss(net, torch.zeros_like(c), None, c)
    c_aug, t_aug = seen[0]
    assert t_aug.shape == (4,) and 0 <= t_aug.min() and t_aug.max() <= 1
    noise = c_aug - torch.cos(t_aug * math.pi / 2).view(-1, 1, 1, 1, 1) * c   # c_aug is c at the level it is told
    assert torch.allclose(noise.flatten(1).std(1), torch.sin(t_aug * math.pi / 2), rtol=0.05)
    sr = live(iv.UNet(8, 1, 8, 16, "conv", cond=True))
    z, t, txt = torch.randn(2, 1, 4, 16, 16), torch.rand(2), flat(text(2, 4))
    a, b = (sr(z, t, txt, c[:2, :, :4], torch.full((2,), level)) for level in (0.1, 0.7))
    assert not torch.allclose(a, b, atol=1e-4)                            # the level is an input of the SR net
    assert iv.UNet(8, 1, 8, 16).aug is None and iv.UNet(8, 1, 8, 16).inp.in_channels == 1   # the base has none


def test_tsr_input_frames_are_the_low_frame_rate_frames():
    low = torch.randn(2, 1, 4, 3, 3)
    for stride in (2, 3):
        up = iv.tsr_input(low, stride)
        assert up.shape == (2, 1, 4 * stride, 3, 3)
        for j in range(stride):
            assert torch.equal(up[:, :, j::stride], low)                  # duplicated indices hold frame i
    torch.manual_seed(0)
    clip, images = torch.rand(3, 1, 16, 32, 32), torch.rand(3, 1, 2, 32, 32)
    data = iv.stage_data(clip, images, 2, 8)
    small = torch.nn.functional.avg_pool3d(clip, (1, 2, 2))
    assert torch.equal(data["base"][0][:, :, :8], small[:, :, ::2]) and data["base"][2] == 2
    x, c, k = data["tsr"]
    assert x.shape == c.shape == (3, 1, 8, 16, 16) and k == 0
    assert torch.equal(c[:, :, ::2], x[:, :, ::2]) and torch.equal(c[:, :, 1::2], x[:, :, ::2])
    start = next(s for s in range(0, 9, 2) if torch.equal(x, small[:, :, s:s + 8]))   # an even-aligned window
    x, c, k = data["ssr"]
    assert x.shape == c.shape == (3, 1, 10, 32, 32) and k == 2 and torch.equal(x[:, :, :8], clip[:, :, start:start + 8])
    assert torch.allclose(c[:, :, :8], iv.ssr_input(small[:, :, start:start + 8]))
    assert torch.allclose(iv.ssr_input(torch.full((1, 1, 2, 16, 16), 0.3)), torch.full((1, 1, 2, 32, 32), 0.3))
    base, _, k = iv.stage_data(clip, images[:, :, :0], 2, 8)["base"]       # --image-frames 0: clips alone
    assert torch.equal(base, small[:, :, ::2]) and k == 0


@pytest.mark.parametrize("kind", ["base", "ssr"])
def test_image_mode_masks_temporal_mixing(kind):
    net = live(iv.UNet(8, 1, 8, 16) if kind == "base" else iv.UNet(8, 1, 8, 16, "conv", cond=True, self_attn=False))
    torch.manual_seed(1)
    x, t, c, txt = torch.randn(2, 1, 6, 16, 16), torch.rand(2), torch.randn(2, 1, 6, 16, 16), text(2, 6)
    cond = lambda c: {} if kind == "base" else dict(c_aug=c, t_aug=torch.full((2,), 0.3))   # noqa: E731
    out = net(x, t, flat(txt), images=2, **cond(c))                       # frames 4, 5: independent images
    x2 = x.clone()
    x2[:, :, 4] += torch.randn_like(x2[:, :, 4])
    out2 = net(x2, t, flat(txt), images=2, **cond(c))
    assert torch.equal(out2[:, :, [0, 1, 2, 3, 5]], out[:, :, [0, 1, 2, 3, 5]])
    assert not torch.allclose(out2[:, :, 4], out[:, :, 4], atol=1e-3)
    x3 = x.clone()
    x3[:, :, 0] += torch.randn_like(x3[:, :, 0])                          # a video frame: other video frames see it
    out3 = net(x3, t, flat(txt), images=2, **cond(c))
    assert not torch.allclose(out3[:, :, 1:4], out[:, :, 1:4], atol=1e-3) and torch.equal(out3[:, :, 4:], out[:, :, 4:])
    alone = net(x, t, flat(txt), images=6, **cond(c))                     # image mode: every frame on its own
    one = net(x[:, :, 2:3], t, flat(txt, slice(2, 3)), images=1, **cond(c[:, :, 2:3]))
    assert torch.allclose(alone[:, :, 2:3], one, atol=1e-5)


def test_distillation_target_is_two_teacher_steps_in_one():
    torch.manual_seed(0)
    W = torch.randn(4, 4) * 0.5

    def teacher(z, t):                                                    # any v_hat: nonlinear, time-dependent
        return torch.tanh(torch.einsum("ij,bcjxy->bcixy", W, z)) * (1 + t.view(-1, 1, 1, 1, 1))
    z, N = torch.randn(5, 1, 4, 3, 3), 8
    t = torch.randint(1, N + 1, (5,)) / N
    x_t = iv.distill_target(teacher, z, t, N)
    z1 = iv.ddim_step(z, iv.x0_hat(teacher, z, t), t, t - 0.5 / N)        # the teacher: two DDIM steps
    z2 = iv.ddim_step(z1, iv.x0_hat(teacher, z1, t - 0.5 / N), t - 0.5 / N, t - 1 / N)
    assert torch.allclose(iv.ddim_step(z, x_t, t, t - 1 / N), z2, atol=1e-5)   # one student step lands on z_t''

    std = 0.2                                                             # x ~ N(0, std^2): the exact v as teacher
    def gauss(z, t):
        a, s = iv.alpha_sigma(t)
        return (a * z - a * std ** 2 * z / (a ** 2 * std ** 2 + s ** 2)) / s

    def student(z, t):                                                    # a perfect student: x_hat = x~
        a, s = iv.alpha_sigma(t)
        return (a * z - iv.distill_target(gauss, z, t.expand(len(z)), N // 2)) / s
    noise = torch.randn(4000, 1, 1, 1, 1)
    full, half = iv.ddim(gauss, noise, N), iv.ddim(student, noise, N // 2)
    assert torch.allclose(full, half, atol=1e-4)                          # N/2 student steps = N teacher steps
    plain = iv.ddim(gauss, noise, N // 2)                                 # DDIM's own N/2 steps shrink the std more
    assert abs(half.std() - full.std()) < 1e-3 and full.std() - plain.std() > 0.02
    x = torch.randn(64, 1, 1, 1, 1) * std
    assert iv.distill_loss(student, gauss, x, N // 2).max() < 1e-6        # its loss is zero
    assert iv.distill_loss(gauss, gauss, x, N // 2).mean() > 1e-6         # the teacher itself does not do it


def test_cli_base_choice_cascade_and_user_errors(fake_data, tmp_path, capsys):
    args = [*map(str, tiny(fake_data, tmp_path))]
    for flags, needle in ((["--window", "3"], "--window"), (["--cascade", "tsr2"], "--cascade")):
        with pytest.raises(SystemExit) as e:
            iv.main(["--train", *args, *flags])
        assert needle in str(e.value.code) and "\n" not in str(e.value.code)
    iv.main(["--train", *args, "--lr", "0.02", "--ssr-steps", "3"])      # tiny: one distillation round, 4 -> 2
    capsys.readouterr()

    def videos(*flags):
        iv.main(["--sample", *args, *flags])
        with np.load(tmp_path / "samples.npz") as f:
            return f["videos"], f["labels"], capsys.readouterr().out
    v, labels, said = videos()
    assert v.shape == (2, 4, 1, 32, 32) and labels.tolist() == [[0, 1], [1, 2]] and "distilled base (1 rounds) 2" in said
    assert "{'base': 2, 'tsr': 2, 'ssr': 3, 'distill': 2}" in said      # --steps 2 (tiny) for base and TSR, the SSR its own
    teacher, _, said = videos("--base", "teacher", "--sample-steps", "4")
    assert "distilled" not in said and "base 4 steps" in said and not np.array_equal(teacher, v)
    base, _, said = videos("--cascade", "base")
    assert "no SR" in said and np.array_equal(base[:, 0], base[:, 1])     # no TSR stage: frames repeated


def test_fit_text_names_both_digits_of_a_prompt():
    torch.manual_seed(0)   # "3 and 5": both digits must survive the frozen encoder's pooling (a one-digit fit kept 60%)
    assert iv.fit_text(iv.TextEncoder(16), 300, "cpu") > 0.8
