"""Invariants of video/video_diffusion_models.py (PAPERS.md §10 sanity tests)."""
import numpy as np
import pytest
import torch

from conftest import ROOT, load_script, lr_decay_paths, precision_paths, tiny

vdm = load_script(ROOT / "video" / "video_diffusion_models.py")


def live(net):
    """Leave the zero init of output projections and relative biases, so every path of the network carries signal."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.3)
        if isinstance(m, vdm.TemporalAttention):
            torch.nn.init.normal_(m.rel)
    return net.eval().requires_grad_(False)


def small_net():
    return live(vdm.UNet(8, 1, attn_res=32))                             # attention at every level: most coupling


def clip(b=2, f=6, size=16):
    torch.manual_seed(1)
    return torch.randn(b, 1, f, size, size), torch.rand(b), torch.randint(11, (b, f, 2))


def test_relative_bias_depends_only_on_frame_offset():
    att = live(vdm.TemporalAttention(8, heads=4, max_offset=5))
    b = att.bias(9)
    assert b.shape == (4, 9, 9) and torch.isfinite(b).all()
    for i in range(9):
        for j in range(9):
            assert torch.equal(b[:, i, j], att.rel[:, max(-5, min(5, j - i)) + 5])   # Toeplitz, offsets clipped
    assert torch.equal(att.bias(4), b[:, 2:6, 2:6])                       # no absolute position
    assert not torch.equal(b[:, 0, 1], b[:, 1, 0])                        # direction matters: j - i, not |j - i|
    masked = att.bias(9, images=3)                                        # frames 6, 7, 8 are images
    assert torch.equal(masked[:, :6, :6], b[:, :6, :6])
    allowed = torch.isfinite(masked[0])
    assert torch.equal(allowed[6:], torch.eye(9, dtype=torch.bool)[6:]) and not allowed[:6, 6:].any()


def test_image_frames_are_independent_under_the_identity_mask():
    net, (x, t, y) = small_net(), clip()
    out = net(x, t, y, images=2)                                          # frames 4, 5: independent images
    x2 = x.clone()
    x2[:, :, 4] += torch.randn_like(x2[:, :, 4])                          # change one image frame
    out2 = net(x2, t, y, images=2)
    assert torch.equal(out2[:, :, [0, 1, 2, 3, 5]], out[:, :, [0, 1, 2, 3, 5]])
    assert not torch.allclose(out2[:, :, 4], out[:, :, 4], atol=1e-3)
    x3 = x.clone()
    x3[:, :, 0] += torch.randn_like(x3[:, :, 0])                          # a video frame: the other video frames
    out3 = net(x3, t, y, images=2)                                        # see it, the images do not
    assert not torch.allclose(out3[:, :, 1:4], out[:, :, 1:4], atol=1e-3)
    assert torch.equal(out3[:, :, 4:], out[:, :, 4:])
    alone = net(x, t, y, images=6)                                        # image mode: every frame on its own
    assert torch.allclose(alone[:, :, 2:3], net(x[:, :, 2:3], t, y[:, 2:3], images=1), atol=1e-5)


def test_no_cross_frame_mixing_before_temporal_attention():
    net, (x, t, y) = small_net(), clip()
    first = next(m for m in net.modules() if isinstance(m, vdm.TemporalAttention))
    seen = []
    first.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(2, 6, *a[0].shape[1:])))
    net(x, t, y)
    x2 = x.clone()
    x2[:, :, 3] = torch.randn_like(x2[:, :, 3])
    net(x2, t, y)
    assert torch.equal(seen[0][:, [0, 1, 2, 4, 5]], seen[1][:, [0, 1, 2, 4, 5]])   # convs, norms, spatial attention
    assert not torch.allclose(seen[0][:, 3], seen[1][:, 3])
    conv = net.inp                                                        # a 2D conv on frames folded into the
    conv3d = torch.nn.Conv3d(1, 8, (1, 3, 3), padding=(0, 1, 1))          # batch is the paper's (1, 3, 3) conv
    conv3d.weight.data, conv3d.bias.data = conv.weight[:, :, None].clone(), conv.bias.clone()
    h = torch.randn(2, 1, 6, 16, 16)
    folded = conv(h.transpose(1, 2).flatten(0, 1)).unflatten(0, (2, 6)).transpose(1, 2)
    assert torch.allclose(folded, conv3d(h), atol=1e-5)


def test_v_prediction_round_trip():
    """v = alpha_t eps - sigma_t x (Salimans & Ho 2022): the exact v gives back x, and is what the loss regresses to."""
    torch.manual_seed(0)
    x, eps = torch.rand(3, 1, 4, 8, 8) * 2 - 1, torch.randn(3, 1, 4, 8, 8)
    for t in torch.tensor([0.0, 0.01, 0.3, 0.5, 0.8, 0.99, 1.0]):
        a, s = vdm.alpha_sigma(t)
        z, v = a * x + s * eps, a * eps - s * x
        assert torch.allclose(vdm.x0_hat(lambda z_, t_: v, z, t), x, atol=1e-5)
        assert torch.allclose(s * z + a * v, eps, atol=1e-5)              # eps_hat = sigma z + alpha v

    def oracle(z, t, y, images, target="v"):                              # knows x, so eps, so the exact v
        a, s = vdm.alpha_sigma(t)
        e = (z - a * x) / s
        return a * e - s * x if target == "v" else e
    assert vdm.diffusion_loss(oracle, x, None).max() < 1e-4
    assert vdm.diffusion_loss(lambda *a: oracle(*a, target="eps"), x, None).mean() > 0.05   # the target is not eps


def test_reconstruction_guidance_is_eq7_on_a_linear_model():
    torch.manual_seed(0)
    f, k, t, w_r = 5, 2, torch.tensor(0.4), 1.7
    M = torch.randn(f, f, dtype=torch.float64) * 0.2                      # x_hat(z) = M z over frames
    a, s = (v.flatten()[0].double() for v in vdm.alpha_sigma(t))

    def v_fn(z, t):                                                       # v = (alpha z - x_hat) / sigma
        return (a * z - torch.einsum("ij,bcjxy->bcixy", M, z)) / s

    z, x_a = (torch.randn(3, 1, n, 2, 2, dtype=torch.float64) * 0.3 for n in (f, k))
    x0 = torch.einsum("ij,bcjxy->bcixy", M, z)
    resid = x_a - x0[:, :, :k]                                            # grad_{z^b} ||x^a - M_a z||^2 = -2 M_ab^T r
    want_b = x0[:, :, k:] + w_r * a * torch.einsum("ij,bcixy->bcjxy", M[:k, k:], resid)
    got = vdm.x0_hat(v_fn, z, t, x_a, w_r)
    assert got.abs().max() < 1                                            # no clipping in play
    assert torch.allclose(got[:, :, :k], x0[:, :, :k]) and torch.allclose(got[:, :, k:], want_b)
    assert torch.allclose(vdm.x0_hat(v_fn, z, t, x_a, 0.0), x0)           # w_r = 0: the plain x_hat


def test_guidance_gradient_flows_only_through_temporal_coupling():
    net, (x, _, y) = small_net(), clip(f=4)
    t, x_a = torch.tensor(0.5), x[:, :, :2].clamp(-1, 1)
    for images, coupled in ((0, True), (4, False)):                       # identity mask: frames cannot see x^a
        v_fn = lambda z, t: net(z, t, y, images)                         # noqa: E731
        plain, guided = vdm.x0_hat(v_fn, x, t), vdm.x0_hat(v_fn, x, t, x_a, 3.0)
        assert torch.equal(guided[:, :, :2], plain[:, :, :2])            # x^a frames themselves are not adjusted
        assert torch.allclose(guided[:, :, 2:], plain[:, :, 2:], atol=1e-6) != coupled


def gaussian_ar1(f=6, rho=0.9, std=0.3):
    """x ~ N(0, S) over frames, S_ij = std^2 rho^|i-j|, and its exact v(z_t, t) (1 pixel a frame)."""
    i = torch.arange(f)
    S = std ** 2 * rho ** (i[:, None] - i[None]).abs().double()

    def v_fn(z, t):
        a, s = (v.flatten()[0].double() for v in vdm.alpha_sigma(t[:1]))
        A = a * S @ torch.linalg.inv(a ** 2 * S + s ** 2 * torch.eye(f, dtype=torch.float64))   # E[x | z_t] = A z_t
        return ((a * z.double() - torch.einsum("ij,bcjxy->bcixy", A, z.double())) / s).float()   # E[v | z_t]
    return S, v_fn


def test_reconstruction_guidance_beats_replacement_on_a_gaussian_ar1_video():
    S, v_fn = gaussian_ar1()
    k, n = 3, 3000
    x_a = torch.full((n, 1, k, 1, 1), 0.4)
    true = S[k:, :k] @ torch.linalg.inv(S[:k, :k]) @ torch.full((k,), 0.4, dtype=torch.float64)   # E[x^b | x^a]
    err, recon = {}, {}
    for w_r in (0.0, 2.0):                                                # w_r = 0 is the replacement method
        seen = []

        def probe(z, t):
            v = v_fn(z, t)
            a, s = vdm.alpha_sigma(t[:1])
            if t[0] < 0.9:                                                # ||x^a - x_hat^a(z_t)||, alpha_t not ~0
                seen.append((a * z[:, :, :k] - s * v[:, :, :k] - x_a).detach().pow(2).mean())
            return v
        torch.manual_seed(1)
        out = vdm.ancestral(probe, torch.randn(n, 1, 6, 1, 1), 60, x_a, w_r)
        assert torch.equal(out[:, :, :k], x_a)
        err[w_r] = (out[:, 0, k:, 0, 0].double().mean(0) - true).norm().item()
        recon[w_r] = torch.stack(seen).mean().item()
    assert err[2.0] < 0.5 * err[0.0] and err[2.0] < 0.08                  # replacement: x^b forgets x^a
    assert recon[2.0] < recon[0.0]


def test_extension_appends_exactly_n_frames_conditioned_on_the_last_k():
    video, calls = torch.arange(6.0).reshape(1, 1, 6, 1, 1), []

    def sample_fn(noise, x_a):                                            # new frames: last + 1, last + 2, ...
        calls.append((noise.shape, x_a.flatten().tolist()))
        new = x_a[:, :, -1:] + torch.arange(1.0, 1 + noise.shape[2] - x_a.shape[2]).reshape(1, 1, -1, 1, 1)
        return torch.cat([x_a, new], 2)

    for n, blocks in ((0, 0), (4, 1), (5, 2), (11, 3)):
        calls.clear()
        out = vdm.extend(sample_fn, video, n, k=2)
        assert out.shape == (1, 1, 6 + n, 1, 1) and out.flatten().tolist() == list(range(6 + n))
        assert len(calls) == blocks and all(shape == (1, 1, 6, 1, 1) for shape, _ in calls)
    assert [c[1] for c in calls] == [[4, 5], [8, 9], [12, 13]]             # x^a: the last 2 frames so far


def test_joint_batch_loss_and_classifier_free_guidance():
    torch.manual_seed(0)
    videos, labels = torch.randn(5, 4, 1, 8, 8), torch.randint(10, (5, 2))
    x, y = vdm.batch(videos, labels, 3, 2)
    assert x.shape == (3, 1, 6, 8, 8) and y.shape == (3, 6, 2)
    for b in range(3):
        c = next(i for i in range(5) if torch.equal(videos[i].transpose(0, 1), x[b, :, :4]))   # a whole clip
        assert (y[b, :4] == labels[c]).all()
        for j in (4, 5):                                                  # an image: some frame of some clip, with
            src = [i for i in range(5) for f in range(4) if torch.equal(videos[i, f], x[b, :, j])]   # its digits
            assert src and any((y[b, j] == labels[i]).all() for i in src)
    target = torch.rand(4, 1, 3, 8, 8) * 2 - 1

    def oracle(z, t, y, images):                                          # knows x: the exact v
        a, s = vdm.alpha_sigma(t)
        return (a * z - target) / s
    assert vdm.diffusion_loss(oracle, target, None).max() < 1e-4
    net, (z, t, y) = small_net(), clip(f=3)
    cond, uncond = net(z, t, y), net(z, t, torch.full_like(y, vdm.NULL))
    assert not torch.allclose(cond, uncond, atol=1e-4)
    assert torch.equal(vdm.guided(net, z, t, y, 1.0), cond)
    assert torch.allclose(vdm.guided(net, z, t, y, 0.0), uncond, atol=1e-5)
    assert torch.allclose(vdm.guided(net, z, t, y, 3.0), 3 * cond - 2 * uncond, atol=1e-4)


def test_precision_uses_bf16_only_where_it_is_native(monkeypatch, fake_data, tmp_path):
    for videos in precision_paths(vdm, monkeypatch, fake_data, tmp_path):
        assert videos.shape == (2, 6, 1, 32, 32)                          # tiny: 4 frames + --extend 2
    net, (z, t, y) = small_net(), clip(f=3)
    with torch.autocast("cpu", torch.bfloat16):                           # bf16 keeps the network's output
        low = net(z, t, y).float()
    full = net(z, t, y)
    assert ((low - full).norm() / full.norm()).item() < 0.05


def test_lr_is_constant_then_falls_linearly_to_zero(fake_data, tmp_path):
    lr, first, decayed = lr_decay_paths(vdm, fake_data, tmp_path)
    assert first == lr and vdm.PRESETS["tiny"].decay_steps == 0           # no decay: constant
    assert decayed == pytest.approx(lr / 3)                               # steps 3, 4, 5 at 3/3, 2/3, 1/3 of it


def test_cli_extension_methods_and_user_errors(fake_data, tmp_path):
    args = [*map(str, tiny(fake_data, tmp_path))]
    vdm.main(["--train", *args, "--lr", "0.02"])                          # weights off their zero init

    def videos(*flags):
        vdm.main(["--sample", *args, *flags])
        with np.load(tmp_path / "samples.npz") as f:
            return f["videos"], f["labels"]
    v, labels = videos("--extend", "3", "--num-samples", "3")           # tiny: 4 frames, x^a = the last 2
    assert v.shape == (3, 7, 1, 32, 32) and labels.tolist() == [[0, 1], [1, 2], [2, 3]]
    first, _ = videos("--extend", "0", "--num-samples", "3")
    assert np.array_equal(v[:, :4], first)                                # extension keeps the first clip
    replacement, _ = videos("--cond-method", "replacement")
    assert np.array_equal(replacement, videos("--w-r", "0")[0])           # w_r = 0 is the replacement method
    assert not np.array_equal(replacement, videos("--w-r", "50")[0])
    for flags, needle in ((["--cond-frames", "4"], "--cond-frames"), (["--cond-method", "both"], "--cond-method"),
                          (["--ch", "16"], "does not match"), (["--attn-res", "16"], "does not match"),
                          (["--w-r", "-1"], "--w-r")):
        with pytest.raises(SystemExit) as e:
            vdm.main(["--sample", *args, *flags])
        assert needle in str(e.value.code) and "\n" not in str(e.value.code)
