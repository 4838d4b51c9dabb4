"""Invariants of image/edm.py (PAPERS.md §3 sanity tests)."""
import math

import pytest
import torch

from conftest import ROOT, load_script, run_here, tiny

edm = load_script(ROOT / "image" / "edm.py")
S = edm.SIGMA_DATA


def random_unet():
    torch.manual_seed(0)
    net = edm.UNet(ch=8, blocks=1).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net


def gaussian_denoiser(s=S, calls=None):
    """The exact denoiser of data N(0, s^2): E[y | y + n = x] = x s^2 / (s^2 + sigma^2)."""
    def D(x, sigma):
        if calls is not None:
            calls.append(sigma.item())
        assert x.dtype == torch.float64                               # the sampler runs in float64
        return x * s ** 2 / (s ** 2 + sigma ** 2)
    return D


def test_preconditioning_values_and_limits():
    sigma = torch.tensor([1e-8, S, 1e4], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.precond(sigma)
    assert abs(c_skip[0] - 1) < 1e-12 and c_out[0] < 1e-7              # sigma -> 0: D(x) -> x
    assert torch.allclose(c_skip[1], torch.tensor(0.5, dtype=torch.float64))
    assert torch.allclose(c_out[1], torch.tensor(S / math.sqrt(2), dtype=torch.float64))
    assert torch.allclose(c_in[1], torch.tensor(1 / (S * math.sqrt(2)), dtype=torch.float64))
    assert torch.allclose(c_noise, sigma.log() / 4)
    assert c_skip[2] < 1e-8 and abs(c_out[2] - S) < 1e-8                # sigma -> inf: D -> sigma_data F


def test_loss_weight_times_c_out_squared_is_one():
    sigma = torch.logspace(-4, 3, 200, dtype=torch.float64)
    lam, c_out = edm.loss_weight(sigma), edm.precond(sigma)[1]
    assert torch.allclose(lam * c_out ** 2, torch.ones_like(sigma), rtol=1e-12)   # unit weight on F


def test_denoiser_is_identity_at_tiny_sigma():
    net, x, y = random_unet(), torch.randn(3, 1, 32, 32), torch.tensor([0, 5, edm.NULL])
    sigma = torch.tensor(1e-6)
    with torch.no_grad():
        c_skip, c_out, c_in, c_noise = edm.precond(sigma.view(1, 1, 1, 1))
        f = net(c_in * x, c_noise.flatten().expand(3), y)
        d = edm.denoise(net, x, sigma, y)
    assert f.abs().max() > 0.1
    assert (d - x).abs().max() <= 1e-5 * f.abs().max()


def test_network_starts_at_zero_so_denoiser_starts_at_c_skip_x():
    net, x = edm.UNet(ch=8, blocks=2), torch.randn(2, 1, 32, 32)
    sigma = torch.tensor([0.1, 10.0])
    f = net(x, sigma.log() / 4, torch.tensor([0, edm.NULL]))
    assert f.shape == (2, 1, 32, 32) and (f == 0).all()                # zero-initialised output conv
    d = edm.denoise(net, x, sigma, torch.tensor([0, edm.NULL]))
    assert torch.allclose(d, edm.precond(sigma.view(-1, 1, 1, 1))[0] * x)


def test_loss_of_a_zero_network_has_unit_scale_and_lognormal_sigma():
    """F = 0 and data of std sigma_data: F's input c_in (y + n) and its target both have unit variance,
    so the weighted loss is 1 on average for every sigma (Sec. 5); ln sigma ~ N(-1.2, 1.2^2)."""
    seen = {}

    def net(x, c_noise, y):
        seen.update(x=x, c_noise=c_noise, y=y)
        return torch.zeros_like(x)

    torch.manual_seed(0)
    y, labels = torch.randn(100000, 1, 1, 2) * S, torch.randint(10, (100000,))
    loss = edm.edm_loss(net, y, labels, edm.Config(p_uncond=0.0))
    assert loss.shape == y.shape and abs(loss.mean().item() - 1) < 0.02
    assert abs(seen["x"].std().item() - 1) < 0.01 and torch.equal(seen["y"], labels)
    ln_sigma = 4 * seen["c_noise"].double()                                 # c_noise = ln(sigma) / 4
    assert abs(ln_sigma.mean().item() - edm.P_MEAN) < 0.02 and abs(ln_sigma.std().item() - edm.P_STD) < 0.02
    big = 4 * seen["c_noise"] > 1.0                                          # sigma > e: the loss is 1 there too
    assert abs(loss[big].mean().item() - 1) < 0.1
    edm.edm_loss(net, y[:4096], labels[:4096], edm.Config(p_uncond=1.0))
    assert (seen["y"] == edm.NULL).all()
    edm.edm_loss(net, y[:4096], labels[:4096], edm.Config(p_uncond=0.1))
    assert 0.07 < (seen["y"] == edm.NULL).float().mean() < 0.13


def test_schedule_endpoints_and_monotone():
    for n in (2, 18, 256):
        t = edm.edm_sigmas(n)
        assert t.shape == (n + 1,) and t.dtype == torch.float64
        assert math.isclose(t[0].item(), 80, rel_tol=1e-12) and math.isclose(t[n - 1].item(), 0.002, rel_tol=1e-12)
        assert t[n] == 0 and (t[1:] < t[:-1]).all()


@pytest.mark.parametrize("n", [1, 2, 18])
def test_heun_calls_the_denoiser_2n_minus_1_times(n):
    for churn in (0.0, 40.0):
        calls = []
        traj = edm.heun(gaussian_denoiser(calls=calls), torch.randn(2, 1, 4, 4, dtype=torch.float64), n, s_churn=churn)
        assert len(calls) == 2 * n - 1 and traj.shape == (n + 1, 2, 1, 4, 4)   # N=18: 35 NFE
        assert torch.allclose(traj[-1], traj[-2], atol=1e-12)                # the last step lands on D(x_hat)


def test_heun_gaussian_oracle():
    """Exact denoiser of N(0, s^2), x_0 = 80 n: the regression numbers of PAPERS.md §3(e).4. The sampler is
    linear here, so the output is a n for one number a = output-std / n-std."""
    noise = torch.randn(1000, 1, 2, 2, dtype=torch.float64)
    ratio = {}
    for n, expected in ((18, 1.0552), (100, 1.0014)):
        out = edm.heun(gaussian_denoiser(), noise, n)[-1]
        a = out / noise
        assert out.dtype == torch.float64 and torch.allclose(a, a.flatten()[0].expand_as(a), atol=1e-12)
        ratio[n] = a.flatten()[0].item() / S
        assert abs(ratio[n] - expected) < 2e-4, (n, ratio[n])
    assert (ratio[18] - 1) / (ratio[100] - 1) > 20                          # 2nd order: error ~ N^-2


def test_churn_raises_only_inside_the_window():
    """Alg. 2: t_hat = t_i (1 + gamma), gamma = min(S_churn/N, sqrt2 - 1) where S_min <= t_i <= S_max, else 0."""
    n, calls = 18, []
    torch.manual_seed(0)
    edm.heun(gaussian_denoiser(calls=calls), torch.randn(4, 1, 2, 2, dtype=torch.float64), n,
             s_churn=30, s_min=0.01, s_max=1, s_noise=1.007)
    t = edm.edm_sigmas(n).tolist()
    first = calls[0::2]                                                      # the Euler call of each step: t_hat_i
    gamma = min(30 / n, math.sqrt(2) - 1)
    for t_i, t_hat in zip(t[:n], first):
        assert math.isclose(t_hat, t_i * (1 + gamma) if 0.01 <= t_i <= 1 else t_i, rel_tol=1e-12)
    assert len(first) == n and calls[1::2] == t[1:n]                         # corrections run at t_{i+1}


def test_stochastic_sampler_gaussian_oracle():
    """With churn the sampler still draws N(0, s^2) from the exact denoiser (up to discretisation)."""
    torch.manual_seed(0)
    noise = torch.randn(20000, 1, 2, 2, dtype=torch.float64)
    out = edm.heun(gaussian_denoiser(), noise, 256, s_churn=40, s_min=0.05, s_max=50)[-1]   # ImageNet-64 settings
    assert abs(out.std().item() / S - 1) < 0.015 and abs(out.mean().item()) < 0.01


def test_ema_beta_half_life_and_ramp_up():
    cfg = edm.Config(batch_size=512, ema_halflife=500000, ema_rampup=0.05)
    assert math.isclose(edm.ema_beta(cfg, 10 ** 8), 0.5 ** (512 / 5e5)) and abs(edm.ema_beta(cfg, 10 ** 8) - 0.99929) < 1e-5
    assert math.isclose(edm.ema_beta(cfg, 10 ** 6), 0.5 ** (512 / 5e4))     # ramp-up: half-life = 5% of images seen
    assert edm.ema_beta(cfg, 0) == 0                                         # first step: the EMA copies the net


def test_guidance():
    net, x = random_unet(), torch.randn(3, 1, 32, 32)
    sigma, y = torch.tensor([0.05, 1.0, 30.0]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        d_c, d_u = edm.denoise(net, x, sigma, y), edm.denoise(net, x, sigma, torch.full_like(y, edm.NULL))
        assert torch.equal(edm.denoise(net, x, sigma, y, 1.0), d_c)
        assert torch.allclose(edm.denoise(net, x, sigma, y, 0.0), d_u, atol=1e-5)
        assert torch.allclose(edm.denoise(net, x, sigma, y, 3.0), d_u + 3 * (d_c - d_u), atol=1e-4)


def test_lr_warm_up_sampling_determinism_and_churn(fake_data, tmp_path):
    script = ROOT / "image" / "edm.py"
    r = run_here(script, "--train", "--sample", *tiny(fake_data, tmp_path, "--lr-rampup", "8"))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert math.isclose(ckpt["opt"]["param_groups"][0]["lr"], 1e-3 * 4 / 8)   # step 2 saw 4 of 8 warm-up images
    a = (tmp_path / "samples.npz").read_bytes()
    assert run_here(script, "--sample", *tiny(fake_data, tmp_path)).returncode == 0
    assert (tmp_path / "samples.npz").read_bytes() == a                         # same seed, same samples
    r = run_here(script, "--sample", *tiny(fake_data, tmp_path, "--s-churn", "10"))
    assert r.returncode == 0 and "S_churn 10.0" in r.stdout, r.stderr[-3000:]
    assert (tmp_path / "samples.npz").read_bytes() != a


def test_user_errors(fake_data, tmp_path):
    assert run_here(ROOT / "image" / "edm.py", "--train", *tiny(fake_data, tmp_path)).returncode == 0
    with pytest.raises(SystemExit) as e:
        edm.main(["--sample", "--out", str(tmp_path), "--device", "cpu", "--ch", "16"])
    assert "does not match" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        edm.main(["--sample", "--out", str(tmp_path), "--device", "cpu", "--s-noise", "0"])
    assert "--s-noise" in str(e.value.code)
