"""Invariants of image/dit.py (PAPERS.md §5 sanity tests)."""
import math

import numpy as np
import pytest
import torch

from conftest import ROOT, load_script, run_here, tiny

dit = load_script(ROOT / "image" / "dit.py")
S = dit.schedule(dit.BETAS)                                               # (T, 1, 1, 1) float32 each
A = torch.cumprod(1 - dit.BETAS, 0)                                       # alpha_bar in float64


def small_dit(**kw):
    torch.manual_seed(0)
    return dit.DiT(**{"hidden": 32, "depth": 2, "heads": 2, "patch": 2, **kw})


def test_adaln_zero_output_is_zero_and_blocks_are_identity():
    net, x = small_dit(), torch.randn(3, 4, 8, 8)                       # a latent: 4 x 8 x 8, 16 tokens
    t, y = torch.tensor([0, 500, 999]), torch.tensor([1, 7, dit.NULL])
    for mode in (net.train, net.eval):
        mode()
        out = net(x, t, y)
        assert out.shape == (3, 8, 8, 8) and (out == 0).all()            # zero final layer: eps = 0, v = 0
    h, c = torch.randn(3, 16, 32), torch.randn(3, 32)
    for block in net.blocks:
        assert torch.equal(block(h, c), h)                                # gates 0: the identity
        torch.nn.init.normal_(block.ada[-1].weight, std=0.1)
        assert not torch.allclose(block(h, c), h)                         # ... and not trivially so
    assert net.pos.requires_grad is False and "pos" not in dict(net.named_parameters())
    assert "pos" not in net.state_dict()                                  # fixed, rebuilt from the sizes


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_patchify_round_trip_and_patch_embed_is_a_strided_conv(p):
    x = torch.randn(2, 3, 32, 32)
    tokens = dit.patchify(x, p)
    assert tokens.shape == (2, (32 // p) ** 2, p * p * 3)
    assert torch.equal(dit.unpatchify(tokens, p, 32 // p), x)
    ref = tokens.reshape(2, 32 // p, 32 // p, p, p, 3)                    # official unpatchify: einsum
    assert torch.equal(torch.einsum("nhwpqc->nchpwq", ref).reshape(2, 3, 32, 32), x)
    lin = torch.nn.Linear(p * p * 3, 8)
    conv = torch.nn.Conv2d(3, 8, p, stride=p)
    conv.weight.data = lin.weight.data.view(8, p, p, 3).permute(0, 3, 1, 2)
    conv.bias.data = lin.bias.data
    assert torch.allclose(lin(tokens), conv(x).flatten(2).transpose(1, 2), atol=1e-5)


def test_sincos_matches_official_numpy():
    def emb_1d(d, pos):                                                   # official get_1d_sincos_pos_embed_from_grid
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)
    dim, n = 32, 8
    grid = np.stack(np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32)))  # w first
    ref = np.concatenate([emb_1d(dim // 2, grid[0]), emb_1d(dim // 2, grid[1])], 1)
    assert np.allclose(dit.sincos_2d(dim, n).numpy(), ref, atol=1e-6)


def test_betas_and_alpha_bar():
    b = dit.BETAS
    assert b.shape == (1000,) and b.dtype == torch.float64
    assert b[0] == 1e-4 and abs(b[-1] - 0.02) < 1e-15 and torch.allclose(b.diff(), b.diff()[:1].expand(999))
    assert S["alpha_bar"].shape == (1000, 1, 1, 1) and torch.equal(S["alpha_bar"].flatten(), A.float())
    assert abs(A[0] - 0.9999) < 1e-15 and abs(A[-1] - 4.0358e-5) < 1e-9 and abs(A[499] - 0.078587) < 1e-6


def test_respacing_keeps_alpha_bar_and_matches_official_spacing():
    def official(n, T=1000):                                               # space_timesteps(T, str(n))
        stride, cur, out = (T - 1) / (n - 1), 0.0, []
        for _ in range(n):
            out.append(round(cur))
            cur += stride
        return out
    for n in range(2, 1001):
        kept, _ = dit.respace(dit.BETAS, n)
        assert kept.tolist() == official(n), n
    for n in (2, 50, 250, 1000):
        kept, betas = dit.respace(dit.BETAS, n)
        assert kept[0] == 0 and kept[-1] == 999 and (kept.diff() > 0).all()
        assert torch.allclose(torch.cumprod(1 - betas, 0), A[kept], rtol=1e-12)
        assert torch.equal(dit.schedule(betas)["alpha_bar"], S["alpha_bar"][kept])
    assert torch.allclose(dit.respace(dit.BETAS, 1000)[1], dit.BETAS, rtol=1e-9)


@pytest.mark.parametrize("n", [1000, 50])
def test_learned_variance_interpolation_endpoints(n):
    """v = +1 gives log beta_t, v = -1 the clipped log beta_tilde_t (official LEARNED_RANGE), on any chain."""
    _, betas = dit.respace(dit.BETAS, n)
    s, t = dit.schedule(betas), torch.arange(n)
    ab = torch.cumprod(1 - betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    beta_tilde = betas * (1 - ab_prev) / (1 - ab)
    x = torch.randn(n, 1, 2, 2)
    for v, expected in ((1.0, betas.log()), (-1.0, beta_tilde.log()), (0.0, (betas.log() + beta_tilde.log()) / 2)):
        out = torch.cat([torch.randn(n, 1, 2, 2), torch.full((n, 1, 2, 2), v)], 1)
        log_var = dit.p_mean_var(s, out, x, t)[1][:, 0, 0, 0]
        assert torch.allclose(log_var[1:], expected[1:].float(), rtol=1e-5)
    assert beta_tilde[0] == 0 and math.isclose(s["log_beta_tilde"][0].item(), math.log(beta_tilde[1]), rel_tol=1e-6)


def test_posterior_mean_recovers_x0_and_vb_terms():
    """With the true eps the posterior mean is exact, so the KL term is 0 for v = -1 (Sigma = beta_tilde);
    at t = 0 the term is the discretized Gaussian NLL of x_0 (exact normal cdf as the reference)."""
    torch.manual_seed(0)
    x0 = torch.randint(0, 256, (6, 1, 4, 4)).float() / 127.5 - 1
    x0[:, :, 0, 0], x0[:, :, 0, 1] = -1, 1                                  # the open edge bins
    eps, t = torch.randn_like(x0), torch.tensor([0, 0, 1, 10, 500, 999])
    xt = dit.q_sample(S, x0, t, eps)
    out = torch.cat([eps, -torch.ones_like(x0)], 1)
    mean, log_var, x0_hat = dit.p_mean_var(S, out, xt, t)
    assert torch.allclose(x0_hat, x0, atol=1e-3)
    vb = dit.vb_term(S, out, x0, xt, t)
    assert vb[2:].abs().max() < 1e-4
    normal = torch.distributions.Normal(mean[:2].double(), (0.5 * log_var[:2].double()).exp())
    x = x0[:2].double()
    hi, lo = normal.cdf(x + 1 / 255), normal.cdf(x - 1 / 255)
    p = torch.where(x < -0.999, hi, torch.where(x > 0.999, 1 - lo, hi - lo))
    ref = -p.clamp(min=1e-12).log().mean((1, 2, 3)) / math.log(2)
    assert torch.allclose(vb[:2].double(), ref, rtol=1e-4)
    out_big = torch.cat([eps + 0.3, torch.ones_like(x0)], 1)              # wrong mean, Sigma = beta
    mean, log_var, _ = dit.p_mean_var(S, out_big, xt, t)
    q_mean = S["coef_x0"][t] * x0 + S["coef_xt"][t] * xt
    q = torch.distributions.Normal(q_mean.double(), (0.5 * S["log_beta_tilde"][t].double()).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(mean.double(), (0.5 * log_var.double()).exp()))
    assert torch.allclose(dit.vb_term(S, out_big, x0, xt, t)[2:].double(), kl.mean((1, 2, 3))[2:] / math.log(2), rtol=1e-3)


def test_hybrid_loss_stop_gradient_on_the_mean():
    """d loss / d eps_hat is the L_simple gradient alone; the v channel learns from L_vlb (lambda T = 1)."""
    assert dit.LAMBDA * dit.T == 1
    x0, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.arange(4)
    out = torch.randn(4, 2, 8, 8, requires_grad=True)
    torch.manual_seed(1)
    loss = dit.dit_loss(lambda xt, t, y: out * 1, S, x0, y)
    loss.sum().backward()
    torch.manual_seed(1)
    t = torch.randint(0, dit.T, (4,))
    eps = torch.randn_like(x0)
    assert torch.allclose(out.grad[:, :1], 2 * (out[:, :1] - eps) / 64, atol=1e-6)   # no vb gradient here
    assert out.grad[:, 1:].abs().sum() > 0
    mse = ((eps - out[:, :1]) ** 2).mean((1, 2, 3))
    vb = dit.vb_term(S, out.detach(), x0, dit.q_sample(S, x0, t, eps), t)
    assert torch.allclose(loss, mse + vb, atol=1e-5)


def test_label_dropout():
    net, seen = small_dit(depth=0, p_uncond=0.1), []
    net.y_embed.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x, t, y = torch.zeros(8000, 4, 8, 8), torch.zeros(8000, dtype=torch.long), torch.arange(8000) % 10
    with torch.no_grad():
        net.train()(x, t, y)
        assert 0.087 < (seen[-1] == dit.NULL).float().mean() < 0.113
        assert torch.equal(seen[-1][seen[-1] != dit.NULL], y[seen[-1] != dit.NULL])
        net.eval()(x, t, y)
        assert torch.equal(seen[-1], y)                                   # eval: no dropout
        net(x, t, y, force_drop=torch.ones_like(y))
        assert (seen[-1] == dit.NULL).all()                               # forced: the null class, index 10
        net.train()(x, t, y, force_drop=torch.zeros_like(y))
        assert torch.equal(seen[-1], y)


def test_guidance_acts_on_eps_only():
    def net(x, t, y):                                                     # eps = y, v = -y / 10
        y = y.float().view(-1, 1, 1, 1).expand(len(x), 1, 2, 2)
        return torch.cat([y, -y / 10], 1)
    x, t, y = torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3])
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, dit.NULL))
    assert torch.equal(dit.guided(net, x, t, y, 1.0), cond)
    for w in (0.0, 2.5, 4.0):
        out = dit.guided(net, x, t, y, w)
        assert torch.allclose(out[:, :1], uncond[:, :1] + w * (cond[:, :1] - uncond[:, :1]))
        assert torch.equal(out[:, 1:], cond[:, 1:])                       # the variance channel: conditional


def test_q_sample_statistics():
    torch.manual_seed(0)
    x0 = torch.full((200000, 1, 1, 1), 0.5)
    for step in (0, 250, 999):
        t = torch.full((len(x0),), step)
        xt = dit.q_sample(S, x0, t, torch.randn_like(x0))
        ab = A[step].item()
        assert abs(xt.mean() - 0.5 * math.sqrt(ab)) < 0.01 and abs(xt.std() / math.sqrt(1 - ab) - 1) < 0.01


def test_sampler_gaussian_oracle():
    """Data N(0, s^2): the exact eps is E[eps | x_t] = sqrt(1 - ab) x_t / (ab s^2 + 1 - ab), and the exact
    Var(x_{t-1} | x_t) = beta_tilde + coef_x0^2 Var(x_0 | x_t) lies inside the learned range [beta_tilde, beta]:
    with that v the respaced ancestral sampler draws std s; the ends of the range miss (IDDPM Sec. 3.1)."""
    s, n, calls = 0.3, 100, []
    kept, betas = dit.respace(dit.BETAS, n)
    r = dit.schedule(betas)

    def model(x, t, v=None):
        calls.append(t[0].item())
        i = kept.tolist().index(t[0].item())                               # the step on the respaced chain
        ab = A[t[0]].item()
        lo, hi, coef = (r[k][i].item() for k in ("log_beta_tilde", "log_beta", "coef_x0"))
        var = math.exp(lo) + coef ** 2 * s ** 2 * (1 - ab) / (ab * s ** 2 + 1 - ab)
        v_opt = 2 * (math.log(var) - lo) / (hi - lo) - 1
        assert i == 0 or -1 < v_opt < 1
        return torch.cat([math.sqrt(1 - ab) * x / (ab * s ** 2 + 1 - ab), torch.full_like(x, v_opt if v is None else v)], 1)
    std = {}
    for v in (None, -1.0, 1.0):
        torch.manual_seed(0)
        calls.clear()
        traj = dit.ddpm_sample(lambda x, t: model(x, t, v), torch.randn(20000, 1, 2, 2), n)
        assert calls == kept.flip(0).tolist()                              # the original indices, 999 first
        assert traj.shape == (21, 20000, 1, 2, 2) and abs(traj[-1].mean().item()) < 0.01
        std[v] = traj[-1].std().item() / s
    assert abs(std[None] - 1) < 0.01 and std[-1.0] < 0.95 and std[1.0] > 1.02, std


def test_sampling_determinism_and_user_errors(fake_data, tmp_path):
    script = ROOT / "image" / "dit.py"
    r = run_here(script, "--train", "--sample", *tiny(fake_data, tmp_path))
    assert r.returncode == 0 and "guidance 2.0" in r.stdout, r.stderr[-3000:]
    a = (tmp_path / "samples.npz").read_bytes()
    dit.main(["--sample", *map(str, tiny(fake_data, tmp_path))])
    assert (tmp_path / "samples.npz").read_bytes() == a                   # same seed, same samples
    for flags, needle in ((["--hidden", "32"], "does not match"), (["--sample-steps", "1"], "--sample-steps"),
                          (["--sample-steps", "1001"], "--sample-steps"), (["--guidance", "-1"], "--guidance")):
        with pytest.raises(SystemExit) as e:
            dit.main(["--sample", "--out", str(tmp_path), "--device", "cpu", *flags])
        assert needle in str(e.value.code)


def test_autoencoder_shapes_and_latent_scale():
    """x4 in space, z_ch channels; the scale (paper: 0.18215) multiplies the latent and is undone by decode."""
    torch.manual_seed(0)
    ae, x = dit.Autoencoder(8, 4).eval(), torch.rand(3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        z, rec = ae.encode(x), ae.decode(ae.encode(x))
        assert z.shape == (3, 4, 8, 8) and rec.shape == x.shape
        ae.scale.fill_(0.25)
        assert torch.allclose(ae.encode(x), 0.25 * z) and torch.allclose(ae.decode(ae.encode(x)), rec, atol=1e-6)
    assert "scale" in ae.state_dict() and "scale" not in dict(ae.named_parameters())   # saved, not trained


def test_autoencoder_trains_first_and_travels_in_the_checkpoint(fake_data, tmp_path):
    r = run_here(ROOT / "image" / "dit.py", "--train", *tiny(fake_data, tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(state["ae"]) == set(dit.Autoencoder(8, 4).state_dict()) and state["ae"]["scale"] != 1
    assert "autoencoder: held-out reconstruction MSE" in (tmp_path / "log.txt").read_text()
    old = {**state, "config": {k: v for k, v in state["config"].items() if k not in ("ae_ch", "z_ch", "ae_steps", "ae_lr")}}
    torch.save(old, tmp_path / "pixel.pt")                                # a checkpoint of the pixel-space dit.py
    with pytest.raises(SystemExit) as e:
        dit.main(["--sample", "--ckpt", str(tmp_path / "pixel.pt"), "--out", str(tmp_path), "--device", "cpu"])
    assert "pixel-space" in str(e.value.code)
