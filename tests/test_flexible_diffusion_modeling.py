"""Invariants of video/flexible_diffusion_modeling.py (PAPERS.md §11 sanity tests)."""
import numpy as np
import pytest
import torch

from conftest import ROOT, load_script, lr_decay_paths, precision_paths, tiny
from shared import moving_mnist, to_uint8

fdm = load_script(ROOT / "video" / "flexible_diffusion_modeling.py")


def live(net):
    """Leave the zero init of output projections and the RPE nets, so every path of the network carries signal."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.3)
            torch.nn.init.normal_(m.bias, std=0.1)
    return net.eval().requires_grad_(False)


def small_net():
    return live(fdm.UNet(8, 1, attn_res=32))                             # attention at every level: most coupling


def task(b=2, f=5, size=16):
    torch.manual_seed(1)
    idx = torch.stack([torch.randperm(40)[:f] for _ in range(b)])        # frames from anywhere in a long video
    obs = torch.tensor([[True, True, False, False, False], [False, True, False, True, False]])[:b, :f]
    return torch.randn(b, 1, f, size, size), torch.randn(b, 1, f, size, size), torch.rand(b), idx, obs


def test_relative_position_encoding_depends_only_on_frame_offsets():
    att = fdm.TemporalAttention(8, emb=16)
    e, idx = torch.randn(2, 16), torch.tensor([[0, 3, 5, 6, 12, 40], [7, 7, 2, 30, 31, 100]])
    assert not fdm.TemporalAttention(8, 16).rel(idx, e).any()            # zero-initialised output: R = 0 at init
    att = live(att)
    R = att.rel(idx, e)                                                   # (3, B, heads, F, F, d)
    assert R.shape == (3, 2, 4, 6, 6, 2) and torch.equal(att.rel(idx + 17, e), R)   # no absolute position
    d = idx[:, :, None] - idx[:, None, :]
    for b in range(2):
        for i in range(6):
            for j in range(6):                                            # every pair with the same offset, same R
                for k, l in zip(*torch.nonzero(d[b] == d[b, i, j], as_tuple=True)):
                    assert torch.allclose(R[:, b, :, i, j], R[:, b, :, k, l])
    assert not torch.allclose(R[:, 0, :, 0, 1], R[:, 0, :, 1, 0])         # direction matters: idx_i - idx_j
    assert not torch.allclose(R[:, 0, :, 0, 1], R[:, 0, :, 0, 2])         # and distance
    same_offsets = torch.tensor([[0, 3, 5, 6, 12, 40], [0, 3, 5, 6, 12, 40]])
    R2 = att.rel(same_offsets, e)
    assert not torch.allclose(R2[:, 0], R2[:, 1])                         # and the diffusion time (the code's RPENet)


def test_network_sees_only_relative_frame_positions():
    net, (z, x0, t, idx, obs) = small_net(), task()
    out = net(z, x0, t, idx, obs)
    assert torch.allclose(net(z, x0, t, idx + 1000, obs), out, atol=1e-5)   # frames 1000+ are like frames 0+
    assert not torch.allclose(net(z, x0, t, idx * 2, obs), out, atol=1e-3)  # spacing matters
    perm = torch.tensor([3, 0, 4, 2, 1])                                   # the order of the frames does not
    assert torch.allclose(net(z[:, :, perm], x0[:, :, perm], t, idx[:, perm], obs[:, perm]), out[:, :, perm], atol=1e-5)


def test_observed_frames_enter_clean_with_an_indicator_channel():
    net, (z, x0, t, idx, obs) = small_net(), task()
    seen = []
    net.inp.register_forward_pre_hook(lambda m, a: seen.append(a[0].unflatten(0, (2, 5)).transpose(1, 2)))
    net(z, x0, t, idx, obs)
    net(torch.randn_like(z), x0, 1 - t, idx, obs)                          # other noise and time
    for inp, zz in zip(seen, (z, None)):
        assert inp.shape == (2, 2, 5, 16, 16)
        m = obs[:, None, :, None, None].expand(-1, 1, -1, 16, 16)
        assert torch.equal(inp[:, :1][m], x0[m])                         # observed: x0, whatever z_t and t
        assert torch.equal(inp[:, 1:], m.float())                        # indicator = the observed mask
        if zz is not None:
            assert torch.equal(inp[:, :1][~m], zz[~m])                    # latent: z_t
    assert torch.equal(fdm.fdm_input(z, x0, obs), torch.cat([torch.where(obs[:, None, :, None, None], x0, z),
                                                             obs[:, None, :, None, None].expand_as(z).float()], 1))


def test_loss_ignores_the_observed_frames():
    _, (z, x0, t, idx, obs) = small_net(), task()
    out = torch.randn_like(x0, requires_grad=True)

    def net(z_t, x, t, idx, obs_, pad=None, shift=0.0):                    # any prediction; shift only observed ones
        return out + shift * obs_[:, None, :, None, None]
    torch.manual_seed(3)
    loss = fdm.diffusion_loss(net, x0, idx, obs)
    torch.manual_seed(3)
    moved = fdm.diffusion_loss(lambda *a: net(*a, shift=5.0), x0, idx, obs)
    assert loss.shape == (2,) and torch.equal(loss, moved)
    loss.sum().backward()
    g = out.grad.abs().sum((1, 3, 4))                                     # (B, F)
    assert (g[obs] == 0).all() and (g[~obs] > 0).all()

    def oracle(z_t, x, t, idx, obs_, pad=None):
        a, s = fdm.alpha_sigma(t)
        return torch.where(obs_[:, None, :, None, None], torch.randn_like(x), (a * z_t - x) / s)   # junk on observed
    assert fdm.diffusion_loss(oracle, x0.clamp(-1, 1), idx, obs).max() < 1e-4


def test_v_prediction_round_trip():
    """v = alpha_t eps - sigma_t x (Salimans & Ho 2022): the exact v gives back x, and is what the loss regresses to
    on the latent frames."""
    _, (_, x, _, idx, obs) = small_net(), task()
    x, eps = x.clamp(-1, 1), torch.randn_like(x)
    for t in torch.tensor([0.0, 0.01, 0.3, 0.5, 0.8, 0.99, 1.0]):
        a, s = fdm.alpha_sigma(t)
        z, v = a * x + s * eps, a * eps - s * x
        assert torch.allclose(fdm.x0_hat(lambda z_, t_: v, z, t), x, atol=1e-5)
        assert torch.allclose(s * z + a * v, eps, atol=1e-5)              # eps_hat = sigma z + alpha v

    def oracle(z_t, x_, t, idx, obs_, pad=None, target="v"):             # knows x, so eps, so the exact v
        a, s = fdm.alpha_sigma(t)
        e = (z_t - a * x) / s
        return a * e - s * x if target == "v" else e
    assert fdm.diffusion_loss(oracle, x, idx, obs).max() < 1e-4
    assert fdm.diffusion_loss(lambda *a: oracle(*a, target="eps"), x, idx, obs).mean() > 0.05   # the target is not eps


def test_padding_frames_form_their_own_group():
    net, (z, x0, t, idx, obs) = small_net(), task()
    pad = torch.tensor([[False, False, False, True, True], [False, False, False, False, True]])
    obs = obs & ~pad
    out = net(z, x0, t, idx, obs, pad)
    z2 = z.clone()
    z2[0, :, 3] += 1.0                                                    # a padding frame of task 0
    out2 = net(z2, x0, t, idx, obs, pad)
    assert torch.equal(out2[0, :, :3], out[0, :, :3]) and torch.equal(out2[1], out[1])
    assert not torch.allclose(out2[0, :, 4], out[0, :, 4], atol=1e-3)     # padding frames see each other
    alone = net(z[:1, :, :3], x0[:1, :, :3], t[:1], idx[:1, :3], obs[:1, :3])
    assert torch.allclose(out[:1, :, :3], alone, atol=1e-5)               # as if the padding were not there


@pytest.mark.parametrize("name", list(fdm.SCHEMES))
def test_each_scheme_generates_every_frame_exactly_once(name):
    for length, k, step in ((64, 16, 8), (64, 8, 4), (64, 8, 1), (64, 8, 7), (37, 6, 3), (8, 4, 2), (5, 8, 4),
                            (1, 2, 1)):
        for given in sorted({0, 1, 3, 8, 36, length - 1} & set(range(length))):   # frames given before stage one
            stages, done = fdm.SCHEMES[name](length, k, step, given), set(range(given))
            if not given:
                assert stages[0][0] == [] and len(stages[0][1]) == min(k, length)   # an unconditional first stage of K
            for obs, latent in stages:
                assert latent and len(obs) + len(latent) <= k
                assert len(set(latent)) == len(latent) and len(set(obs)) == len(obs)
                assert set(obs) <= done and not set(latent) & done       # observed: generated or given; latent: new
                assert all(0 <= i < length for i in latent) and (obs or not given)
                done |= set(latent)
                if obs and name != "hierarchy-2":
                    assert len(obs) <= k - step and len(latent) <= step
                    assert len(obs) == k - step or given                 # fewer only when few frames are given
            assert done == set(range(length)), (name, length, k, step, given)
    stages = fdm.SCHEMES[name](64, 8, 4)
    if name == "autoregressive":
        assert all(obs == list(range(latent[0] - 4, latent[0])) for obs, latent in stages[1:])
    if name == "long-range":                                              # half latest, half from the first stage
        assert all(obs[-2:] == [latent[0] - 2, latent[0] - 1] for obs, latent in stages[1:])
        assert stages[-1][0][:2] == [6, 7] and stages[-1][1][0] == 60
    if name == "hierarchy-2":                                             # keyframes over the whole video, then gaps
        assert stages[0][1][0] == 0 and stages[0][1][-1] == 63 and len(stages) == 1 + 56 // 4
        for obs, latent in stages[1:]:
            assert min(obs) < min(latent) and max(obs) > max(latent)       # frames before and after the gap
    given = {"autoregressive": ([4, 5, 6, 7], [8, 9, 10, 11]), "long-range": ([4, 5, 6, 7], [8, 9, 10, 11]),
             "hierarchy-2": ([0, 2, 4, 7], [8, 26, 44, 63])}              # 8 given: `step` keyframes over the rest
    assert fdm.SCHEMES[name](64, 8, 4, 8)[0] == given[name]
    if name == "long-range":
        assert fdm.long_range(64, 8, 4, 8)[-1] == ([6, 7, 58, 59], [60, 61, 62, 63])   # reaches back to given frames


def test_training_tasks():
    torch.manual_seed(0)
    for _ in range(200):
        s = fdm.some_indices(8, 20)
        assert 1 <= len(s) <= 8 and all(0 <= i < 20 for i in s) and s == sorted(set(s))
        gaps = np.diff(s)
        assert len(s) < 3 or gaps.max() - gaps.min() <= 1                 # evenly spaced (up to rounding)
        latent, obs = fdm.frame_masks(8, 20)
        assert latent and not set(latent) & set(obs) and len(latent) + len(obs) <= 8
    videos = torch.randn(6, 20, 1, 8, 8)
    x, idx, obs, pad = fdm.batch(videos, 4, 8)
    assert x.shape == (4, 1, 8, 8, 8) and idx.shape == obs.shape == pad.shape == (4, 8)
    for b in range(4):
        n = int((~pad[b]).sum())
        assert n >= 1 and not (obs[b] & pad[b]).any() and not pad[b, :n].any()   # task frames first, observed first
        src = [c for c in range(6) if all(torch.equal(videos[c, idx[b, j]], x[b, :, j]) for j in range(n))]
        assert src and len(set(idx[b, :n].tolist())) == n                 # distinct frames of one clip
        assert obs[b].tolist() == sorted(obs[b].tolist(), reverse=True)
        for j in range(n, 8):                                             # padding: frames of some clip at idx
            assert any(torch.equal(videos[c, idx[b, j]], x[b, :, j]) for c in range(6))


def test_continuation_tasks_observe_a_prefix_of_consecutive_frames():
    torch.manual_seed(0)
    videos = torch.arange(6 * 20, dtype=torch.float).reshape(6, 20, 1, 1, 1).expand(-1, -1, -1, 8, 8)  # frame ids
    x, idx, obs, pad = fdm.batch(videos, 64, 8, cont=1.0)
    assert not pad.any() and obs[:, 0].all() and not obs[:, -1].any()    # no padding, 1..7 observed
    assert (idx.diff(dim=1) == 1).all() and (obs.int().diff(dim=1) <= 0).all()   # consecutive, prefix
    assert len(set(obs.sum(1).tolist())) > 3                              # the prefix's length varies
    assert torch.equal(x[:, 0, :, 0, 0] % 20, idx.float()) and not (x[:, 0, :, 0, 0] // 20).diff(dim=1).any()  # one clip
    _, idx, obs, pad = fdm.batch(videos, 64, 8, cont=0.5)
    continuations = (idx.diff(dim=1) == 1).all(1) & ~pad.any(1) & obs[:, 0] & ~obs[:, -1]
    assert 16 < continuations.sum() < 48                                  # about half; the others the code's tasks


def test_lr_is_constant_then_falls_linearly_to_zero(fake_data, tmp_path):
    lr, first, decayed = lr_decay_paths(fdm, fake_data, tmp_path)
    assert first == lr and fdm.PRESETS["tiny"].decay_steps == 0           # no decay: constant
    assert decayed == pytest.approx(lr / 3)                               # steps 3, 4, 5 at 3/3, 2/3, 1/3 of it


def test_generate_runs_the_stages_in_order():
    calls = []

    def v_fn(z, x0, t, idx, obs):                                         # x_hat = frame index / 100 on latent frames
        calls.append((idx[0].tolist(), obs[0].tolist(), x0[0, 0, :, 0, 0][obs[0]].tolist()))
        a, s = fdm.alpha_sigma(t)
        target = (idx[:, None, :, None, None] / 100.0).expand_as(z)
        return (a * z - target) / s
    stages = fdm.hierarchy_2(12, 4, 2)
    video = fdm.generate(v_fn, stages, 2, 12, 3, "cpu")
    assert torch.allclose(video[:, 0, :, 5, 7], torch.arange(12) / 100.0, atol=1e-3)
    for (obs, latent), (idx, is_obs, x0) in zip(stages, calls[::3]):      # 3 denoising steps a stage
        assert idx == obs + latent and is_obs == [True] * len(obs) + [False] * len(latent)
        assert np.allclose(x0, [i / 100 for i in obs], atol=1e-3)        # observed: the frames generated before


def test_cli_schemes_lengths_and_user_errors(fake_data, tmp_path):
    args = [*map(str, tiny(fake_data, tmp_path))]
    fdm.main(["--train", *args, "--lr", "0.02"])                          # weights off their zero init
    for scheme in fdm.SCHEMES:
        fdm.main(["--sample", *args, "--scheme", scheme, "--length", "11", "--num-samples", "3"])
        with np.load(tmp_path / "samples.npz") as f:
            assert f["videos"].shape == (3, 11, 1, 32, 32) and f["videos"].dtype == np.uint8 and "labels" not in f
    for scheme in fdm.SCHEMES:                                            # the paper's evaluation: complete new clips
        fdm.main(["--sample", *args, "--scheme", scheme, "--length", "11", "--num-samples", "3", "--given", "3"])
        clips, labels = moving_mnist(fake_data, 3, 11, seed=1)
        with np.load(tmp_path / "samples.npz") as f:
            assert f["videos"].shape == (3, 11, 1, 32, 32) and np.array_equal(f["labels"], labels.numpy())
            assert np.array_equal(f["videos"][:, :3], to_uint8(clips[:, :3]).numpy())   # given frames kept
            assert not np.array_equal(f["videos"][:, 3:], to_uint8(clips[:, 3:]).numpy())
    for flags, needle in ((["--step", "4"], "--step"), (["--scheme", "all"], "--scheme"),
                          (["--ch", "16"], "does not match"), (["--length", "0"], "--length"),
                          (["--length", "11", "--given", "11"], "--given")):
        with pytest.raises(SystemExit) as e:
            fdm.main(["--sample", *args, *flags])
        assert needle in str(e.value.code) and "\n" not in str(e.value.code)


def test_precision_uses_bf16_only_where_it_is_native(monkeypatch, fake_data, tmp_path):
    for videos in precision_paths(fdm, monkeypatch, fake_data, tmp_path):
        assert videos.shape == (2, 8, 1, 32, 32)                          # tiny: 2 videos of --length 8
