"""Invariants of image/score_sde.py (PAPERS.md §1 sanity tests)."""
import math

import numpy as np
import pytest
import torch

from conftest import ROOT, load_script, precision_paths, tiny

ssde = load_script(ROOT / "image" / "score_sde.py")
KINDS = ("vp", "subvp", "ve")
F64 = torch.float64


def ts(*values):
    return torch.tensor(values, dtype=F64)


def coefficients(sde, t):
    """Mean coefficient, std, drift coefficient f(x, t) / x and g(t) at times t (B,), as (B,) tensors."""
    one = torch.ones(len(t), 1, 1, 1, dtype=F64)
    (mean, std), (f, g) = sde.marginal_prob(one, t), sde.sde(one, t)
    return mean.flatten(), std.flatten(), f.flatten(), g.flatten()


def gaussian_score(sde, s):
    """The exact score of p_t for data N(0, s^2 I): -x / (mean_t^2 s^2 + std_t^2)."""
    def score(x, t):
        a, std = sde.marginal_prob(torch.ones(len(x), 1, 1, 1, dtype=x.dtype), t)
        return -x / (a ** 2 * s ** 2 + std ** 2)
    return score


def variance(sde, t, s):
    a, std, _, _ = coefficients(sde, ts(t))
    return (a ** 2 * s ** 2 + std ** 2).item()


def test_vp_prior_and_discrete_betas():
    sde = ssde.SDE("vp")
    a, std, _, _ = coefficients(sde, ts(1.0))
    assert math.isclose(a.item(), math.exp(-5.025), rel_tol=1e-12) and abs(a.item() - 6.6e-3) < 1e-4
    assert math.isclose(std.item(), math.sqrt(1 - math.exp(-10.05)), rel_tol=1e-12) and abs(1 - std.item() - 2.2e-5) < 1e-6
    assert torch.equal(sde.discrete_betas, torch.linspace(0.1 / 1000, 20 / 1000, 1000, dtype=F64))
    assert math.isclose(sde.discrete_betas[0].item(), 1e-4) and math.isclose(sde.discrete_betas[-1].item(), 0.02)
    assert torch.allclose(ssde.SDE("vp", 500).discrete_betas, torch.linspace(0.1 / 500, 20 / 500, 500, dtype=F64))


def test_subvp_std_is_the_vp_variance_no_sqrt():
    t = torch.linspace(1e-5, 1, 101, dtype=F64)
    a_vp, std_vp, f_vp, g_vp = coefficients(ssde.SDE("vp"), t)
    a_sub, std_sub, f_sub, g_sub = coefficients(ssde.SDE("subvp"), t)
    assert torch.equal(a_sub, a_vp) and torch.equal(f_sub, f_vp)
    assert torch.allclose(std_sub, 1 - a_vp ** 2, rtol=1e-12) and torch.allclose(std_sub, std_vp ** 2, rtol=1e-12)
    assert (std_sub < std_vp).all() and (g_sub < g_vp).all()             # sub-VP: variance below VP's at every t


@pytest.mark.parametrize("kind", KINDS)
def test_marginals_solve_the_forward_sde(kind):
    """Moments of dx = f dt + g dw with f = a(t) x: d mean/dt = a mean, d var/dt = 2 a var + g^2 (App. B)."""
    sde, h = ssde.SDE(kind), 1e-6
    t = torch.linspace(0.02, 0.98, 25, dtype=F64)
    m, std, a, g = coefficients(sde, t)
    (m_hi, std_hi, _, _), (m_lo, std_lo, _, _) = coefficients(sde, t + h), coefficients(sde, t - h)
    assert torch.allclose((m_hi - m_lo) / (2 * h), a * m, rtol=1e-6, atol=1e-8)
    assert torch.allclose((std_hi ** 2 - std_lo ** 2) / (2 * h), 2 * a * std ** 2 + g ** 2, rtol=1e-6, atol=1e-6)


def test_ve_marginal_and_priors():
    sde = ssde.SDE("ve")
    a, std, f, g = coefficients(sde, ts(0.0, 0.5, 1.0))
    assert torch.equal(a, torch.ones(3, dtype=F64)) and torch.equal(f, torch.zeros(3, dtype=F64))
    assert torch.allclose(std, ts(0.01, math.sqrt(0.01 * 50), 50.0), rtol=1e-12)
    assert torch.allclose(g, std * math.sqrt(2 * math.log(5000)), rtol=1e-12)
    z = sde.prior_sampling((64, 1, 32, 32), torch.Generator().manual_seed(0))
    assert z.dtype == F64 and abs(z.std().item() / 50 - 1) < 0.01
    for kind, s in (("ve", 50.0), ("vp", 1.0), ("subvp", 1.0)):
        z = torch.randn(3, 1, 4, 4, dtype=F64) * s
        expected = torch.distributions.Normal(0.0, torch.tensor(s, dtype=F64)).log_prob(z).flatten(1).sum(1)
        assert torch.allclose(ssde.SDE(kind).prior_logp(z), expected, rtol=1e-12)


def test_discretizations():
    n, x = 1000, torch.randn(3, 1, 2, 2, dtype=F64)
    i = torch.arange(n, dtype=F64)
    t = (i + 0.5) / (n - 1)                                                 # step i = t (N - 1), rounded down
    ve = ssde.SDE("ve", n)
    f, G = ve.discretize(torch.zeros(n, 1, 1, 1, dtype=F64), t)
    assert (f == 0).all() and math.isclose((G ** 2).sum().item(), 50.0 ** 2, rel_tol=1e-9)   # telescopes to s_max^2
    assert math.isclose(G[0].item(), 0.01, rel_tol=1e-12)                  # sigma_{-1} = 0
    vp, tt = ssde.SDE("vp", n), ts(0.3, 0.3, 0.3)
    beta = vp.discrete_betas[int(0.3 * (n - 1))]
    f, G = vp.discretize(x, tt)
    assert torch.allclose(f, (1 - beta).sqrt() * x - x) and torch.allclose(G, beta.sqrt().expand_as(G))
    sub = ssde.SDE("subvp", n)
    (f, G), (drift, g) = sub.discretize(x, tt), sub.sde(x, tt)
    assert torch.allclose(f, drift / n) and torch.allclose(G, g / math.sqrt(n))


@pytest.mark.parametrize("kind", KINDS)
def test_reverse_drift_identities(kind):
    """Reverse SDE: f - g^2 s and g (Eq. 6); probability flow: f - g^2 s / 2 and 0 (Eq. 13), the mean of the two."""
    sde, x, t = ssde.SDE(kind, 100), torch.randn(4, 1, 3, 3, dtype=F64), ts(0.1, 0.4, 0.7, 1.0)
    s = torch.randn_like(x)
    score = lambda y, tt: s                                                 # noqa: E731
    f, g = sde.sde(x, t)
    for fn, (f, g) in ((lambda r: r.sde, (f, g)), (lambda r: r.discretize, sde.discretize(x, t))):
        (rf, rg), (pf, pg) = fn(sde.reverse(score))(x, t), fn(sde.reverse(score, probability_flow=True))(x, t)
        assert torch.allclose(rf, f - g ** 2 * s) and torch.equal(rg, g)
        assert torch.allclose(pf, f - 0.5 * g ** 2 * s) and (pg == 0).all()
        assert torch.allclose(pf, (f + rf) / 2)


@pytest.mark.parametrize("kind", KINDS)
def test_score_parameterisation(kind):
    """vp, subvp: -F(x, 999 t) / std(t); ve: F(x, ln sigma(t)) / sigma(t) (scale_by_sigma); F = 0 at init."""
    seen, sde = {}, ssde.SDE(kind)

    def net(x, c_noise):
        seen.update(x=x, c=c_noise)
        return torch.ones_like(x)

    x, t = torch.randn(3, 1, 32, 32, dtype=F64), ts(1e-5, 0.5, 1.0)
    s = ssde.score_fn(net, sde)(x, t)
    std = coefficients(sde, t)[1]
    assert seen["x"].dtype == torch.float32 and s.dtype == F64
    assert torch.allclose(seen["c"].double(), std.log() if kind == "ve" else 999 * t, rtol=1e-6)
    assert torch.allclose(s, (1 if kind == "ve" else -1) / std.view(-1, 1, 1, 1).expand_as(s))
    unet = ssde.UNet(ch=8, blocks=1)
    assert (ssde.score_fn(unet, sde)(x, t) == 0).all()                    # zero-initialised output conv


def test_langevin_step_size_is_2_alpha_snr2():
    """With ||score|| = ||z||, eps = 2 alpha_i r^2 (Alg. 4/5): alpha_i = 1 - beta_i for vp and subvp, 1 for ve."""
    x, t, snr = torch.randn(5, 1, 8, 8, dtype=F64), ts(*[0.6] * 5), 0.16
    torch.manual_seed(1)
    z = torch.randn_like(x)
    s = z.flip(-1)                                                          # same norms as z, another direction
    for kind in KINDS:
        sde = ssde.SDE(kind)
        alpha = 1.0 if kind == "ve" else 1 - sde.discrete_betas[int(0.6 * 999)].item()
        torch.manual_seed(1)                                                # the corrector draws the same z
        x_new, x_mean = ssde.langevin(sde, lambda y, tt: s, x, t, snr)
        eps = 2 * alpha * snr ** 2
        assert torch.allclose(x_mean, x + eps * s) and torch.allclose(x_new, x_mean + math.sqrt(2 * eps) * z)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_at_the_oracle(kind):
    """Data N(0, s^2): the exact score gives E ||std s* + z||^2 = D E_t[a^2 s^2 / (a^2 s^2 + std^2)] (the
    irreducible part); a random network does worse, in both weightings."""
    s, sde = 0.5, ssde.SDE(kind)
    torch.manual_seed(0)
    x = torch.randn(20000, 1, 4, 4, dtype=F64) * s
    loss = ssde.sde_loss(gaussian_score(sde, s), sde, x)
    t = torch.linspace(1e-5, 1, 20001, dtype=F64)
    a, std, _, _ = coefficients(sde, t)
    per_dim = (a ** 2 * s ** 2 / (a ** 2 * s ** 2 + std ** 2)).mean().item()
    assert loss.shape == (20000,)
    assert abs(loss.mean().item() / (per_dim * (8 if kind == "ve" else 1)) - 1) < 0.03   # ve: 0.5 x sum of 16 pixels
    net = ssde.UNet(ch=8, blocks=1).double()
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    y = torch.randn(64, 1, 32, 32, dtype=F64) * s
    for weighting in ("sigma2", "likelihood"):
        torch.manual_seed(1)
        oracle = ssde.sde_loss(gaussian_score(sde, s), sde, y, weighting).mean()
        torch.manual_seed(1)
        with torch.no_grad():
            random = ssde.sde_loss(ssde.score_fn(net.float(), sde), sde, y, weighting).mean()
        assert oracle < 0.8 * random, (weighting, oracle, random)


@pytest.mark.parametrize("kind,predictor,corrector", [
    ("ve", "reverse_diffusion", "langevin"), ("ve", "reverse_diffusion", "none"), ("ve", "ancestral", "none"),
    ("vp", "euler_maruyama", "none"), ("vp", "ancestral", "langevin"), ("subvp", "euler_maruyama", "none"),
    ("subvp", "reverse_diffusion", "langevin")])
def test_pc_sampler_with_the_exact_score(kind, predictor, corrector):
    """PAPERS.md §1(e).3: x ~ N(0, s^2 I), N = 1000; the samples have std s within 2%."""
    s, sde = 0.5, ssde.SDE(kind, 1000)
    torch.manual_seed(0)
    x = sde.prior_sampling((64, 1, 16, 16))
    traj, nfe = ssde.pc_sampler(sde, gaussian_score(sde, s), x, ssde.SAMPLE_EPS[kind], predictor, corrector, 0.16)
    assert nfe == 1000 * (2 if corrector == "langevin" else 1) and 20 < len(traj) < 40
    assert torch.equal(traj[0], x) and abs(traj[-1].std().item() / s - 1) < 0.02, traj[-1].std().item()


def test_ancestral_is_undefined_for_subvp():
    sde = ssde.SDE("subvp")
    with pytest.raises(ssde.UserError, match="ancestral"):
        ssde.predict("ancestral", sde, gaussian_score(sde, 1.0), torch.zeros(2, 1, 2, 2, dtype=F64), ts(0.5, 0.5))


@pytest.mark.parametrize("kind", KINDS)
def test_ode_sampler_is_the_exact_flow(kind):
    """For Gaussian data the probability flow is x(t) = x(1) sqrt(var_t / var_1): RK45 must follow it closely."""
    s, sde = 0.5, ssde.SDE(kind)
    x = sde.prior_sampling((32, 1, 16, 16), torch.Generator().manual_seed(0))
    eps = ssde.SAMPLE_EPS[kind]
    traj, nfe = ssde.ode_sampler(sde, gaussian_score(sde, s), x, eps, tol=1e-5)
    ratio = math.sqrt(variance(sde, eps, s) / variance(sde, 1.0, s))
    assert torch.allclose(traj[-2], x * ratio, rtol=1e-4, atol=1e-6)     # the ODE end, before noise removal
    assert abs(traj[-1].std().item() / s - 1) < 0.02 and 10 < nfe < 400, nfe


@pytest.mark.parametrize("kind", KINDS)
def test_likelihood_matches_the_gaussian_log_density(kind):
    """ODE log-likelihood with the exact score = log N(x; 0, var_eps I) (PAPERS.md §1(e).3: +-0.02 nats/dim)."""
    s, sde, d = 0.5, ssde.SDE(kind), 256
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16, dtype=F64) * s
    logp, nfe = ssde.likelihood(sde, gaussian_score(sde, s), x)
    sd = torch.tensor(variance(sde, ssde.EPS, s), dtype=F64).sqrt()
    expected = torch.distributions.Normal(0.0, sd).log_prob(x).flatten(1).sum(1)
    assert ((logp - expected).abs() / d).max() < 1e-3, (logp - expected) / d   # far inside the 0.02 of the notes
    assert nfe > 10


def test_bits_per_dim_is_the_discrete_probability_of_the_pixels():
    """Quantized N(0, s^2) digits: bits/dim = -log2 P(the pixel bins) / D, bins 2/256 wide in [-1, 1] (offset 7)."""
    s, sde = 0.5, ssde.SDE("vp")
    torch.manual_seed(0)
    k = ((torch.randn(4, 1, 16, 16, dtype=F64) * s + 1) * 128).floor().clamp(0, 255)    # pixel values 0..255
    x = k / 127.5 - 1                                                                    # as shared.mnist
    bpd, _ = ssde.bits_per_dim(sde, gaussian_score(sde, s), x)
    sd = math.sqrt(variance(sde, ssde.EPS, s))
    p = torch.special.ndtr(((k + 1) / 128 - 1) / sd) - torch.special.ndtr((k / 128 - 1) / sd)
    expected = -p.log2().flatten(1).mean(1)
    assert (bpd - expected).abs().max() < 0.02, (bpd, expected)


def test_rk45_accuracy_both_directions():
    """y' = cos(t) y, y = exp(sin t): adaptive Dormand-Prince, forwards and backwards; NFE = 1 + 6 x attempts."""
    f = lambda t, y: math.cos(t) * y                                        # noqa: E731
    y0 = torch.ones(2, 3, dtype=F64)
    ys, nfe = ssde.rk45(f, y0, 0.0, 3.0, 1e-8, 1e-8)
    assert torch.allclose(ys[-1], y0 * math.exp(math.sin(3.0)), rtol=1e-6) and (nfe - 1) % 6 == 0
    loose = ssde.rk45(f, y0, 0.0, 3.0, 1e-3, 1e-3)
    assert loose[1] < nfe and torch.allclose(loose[0][-1], ys[-1], rtol=1e-2)
    back, _ = ssde.rk45(f, ys[-1], 3.0, 0.0, 1e-8, 1e-8)
    assert torch.allclose(back[-1], y0, rtol=1e-6)


def test_cli_ve_ode_bpd_and_errors(fake_data, tmp_path, capsys):
    args = tiny(fake_data, tmp_path, "--sde", "ve")
    ssde.main(["--train", "--sample", *map(str, args)])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["sde"] == "ve" and ckpt["step"] == 2
    assert math.isclose(ckpt["opt"]["param_groups"][0]["lr"], 1e-3 * 1 / 500)   # warm-up: step 1 of 500
    assert "reverse_diffusion + langevin" in capsys.readouterr().out           # the paper's VE sampler
    with np.load(tmp_path / "samples.npz") as f:
        assert set(f) == {"images"}                                              # unconditional
    ssde.main(["--sample", "--bpd", "--sampler", "ode", "--ode-tol", "1e-3", *map(str, args)])   # loose: a CLI test
    out = capsys.readouterr().out
    assert "probability flow ODE" in out and "NFE" in out and "bits/dim " in (tmp_path / "log.txt").read_text()
    for flags, needle in ((["--sample", "--sde", "vp"], "does not match"), (["--sample", "--sde", "xx"], "--sde"),
                          (["--sample", "--ode-tol", "0"], "--ode-tol"), (["--bpd", "--data-dir", str(tmp_path)], "t10k")):
        with pytest.raises(SystemExit) as e:
            ssde.main([*flags, "--out", str(tmp_path), "--device", "cpu"])
        assert needle in str(e.value.code) and "\n" not in str(e.value.code), str(e.value.code)


def test_precision_uses_bf16_only_where_it_is_native(monkeypatch, fake_data, tmp_path):
    for images in precision_paths(ssde, monkeypatch, fake_data, tmp_path):
        assert images.shape == (10, 1, 32, 32)                            # tiny: 10 samples, sampled in float32
    torch.manual_seed(0)
    net, sde, x = ssde.UNet(8, 1, 0.0), ssde.SDE("vp"), torch.rand(8, 1, 32, 32) * 2 - 1
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)                    # off its zero init
    score = ssde.score_fn(net, sde)
    torch.manual_seed(1)
    full = ssde.sde_loss(score, sde, x).mean()
    torch.manual_seed(1)                                                  # the same t and z
    with torch.autocast("cpu", torch.bfloat16):                           # bf16 training keeps the loss
        low = ssde.sde_loss(score, sde, x).mean()
    assert abs(low.item() - full.item()) < 0.02 * full.item()
