"""Invariants of image/rectified_flow.py (PAPERS.md §4 sanity tests)."""
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, load_script, run_here, tiny

rf = load_script(ROOT / "image" / "rectified_flow.py")


def test_interpolation_endpoints_and_velocity():
    x0, x1 = torch.randn(5, 1, 32, 32), torch.randn(5, 1, 32, 32)
    assert torch.equal(rf.interpolate(x0, x1, torch.zeros(5)), x0)   # t=0 is noise
    assert torch.equal(rf.interpolate(x0, x1, torch.ones(5)), x1)    # t=1 is data
    t, h = torch.rand(5, dtype=torch.float64), 1e-6
    d = (rf.interpolate(x0.double(), x1.double(), t + h) - rf.interpolate(x0.double(), x1.double(), t - h)) / (2 * h)
    assert torch.allclose(d, (x1 - x0).double(), atol=1e-6)         # dX_t/dt = X1 - X0


def test_euler_constant_flow_is_exact():
    z0, c = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    for n in (1, 2, 7):
        traj = rf.euler(lambda z, t: c, z0, n)
        assert traj.shape == (n + 1, 4, 1, 8, 8) and torch.allclose(traj[-1], z0 + c, atol=1e-5)
        assert rf.straightness(traj) < 1e-10


def test_euler_single_point_data_one_step():
    """Data = one point x*: v(x, t) = (x* - x)/(1 - t); one Euler step lands on x* (up to eps)."""
    x_star, z0 = torch.randn(1, 1, 8, 8), torch.randn(16, 1, 8, 8)
    for n in (1, 4):
        z1 = rf.euler(lambda z, t: (x_star - z) / (1 - t.view(-1, 1, 1, 1)), z0, n)[-1]
        assert (z1 - x_star).abs().max() < 3e-3 * (z0 - x_star).abs().max()


def test_euler_gaussian_flow_closed_form():
    """Data N(m, s^2): the optimal v of Eq. 1 is E[X1 - X0 | X_t = x] = m + sigma'/sigma (x - t m),
    sigma(t)^2 = t^2 s^2 + (1-t)^2, and the flow maps z0 to m + s z0 (up to eps)."""
    m, s, eps = 0.7, 0.3, 1e-3

    def v(x, t):
        t = t.double().view(-1, 1)
        sigma = (t ** 2 * s ** 2 + (1 - t) ** 2).sqrt()
        return m + (t * s ** 2 - (1 - t)) / sigma ** 2 * (x - t * m)

    z0 = torch.randn(20000, 1, dtype=torch.float64)
    err = {n: (rf.euler(v, z0, n, eps)[-1] - (m + s * z0)).abs().max().item() for n in (100, 500)}
    assert err[500] < 1e-2 and err[500] < err[100] / 3                 # first order: error ~ 1/N
    z1 = rf.euler(v, z0, 500, eps)[-1]
    assert abs(z1.std().item() / s - 1) < 0.02 and abs(z1.mean().item() - m) < 0.01


def test_loss_time_range_distill_and_label_dropout():
    seen = {}

    def net(xt, t, y):
        seen.update(t=t, y=y)
        return torch.zeros_like(xt)

    cfg = rf.Config(p_uncond=0.0, eps=1e-3)
    x0, x1, y = torch.randn(4096, 1, 2, 2), torch.randn(4096, 1, 2, 2), torch.randint(10, (4096,))
    loss = rf.rf_loss(net, x0, x1, y, cfg)
    assert torch.allclose(loss, (x1 - x0).pow(2).mean())           # target X1 - X0, mean reduction
    assert seen["t"].min() >= 1e-3 and seen["t"].max() <= 1 and torch.equal(seen["y"], y)
    rf.rf_loss(net, x0, x1, y, cfg, distill=True)
    assert (seen["t"] == 1e-3).all()                               # k=1 distillation: t = eps
    rf.rf_loss(net, x0, x1, y, rf.Config(p_uncond=1.0))
    assert (seen["y"] == rf.NULL).all()
    rf.rf_loss(net, x0, x1, y, rf.Config(p_uncond=0.1))
    assert 0.07 < (seen["y"] == rf.NULL).float().mean() < 0.13


def test_guidance():
    net = rf.UNet(ch=8, blocks=1).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(3, 1, 32, 32), torch.rand(3), torch.tensor([1, 2, 3])
    with torch.no_grad():
        v_c, v_u = net(x, t, y), net(x, t, torch.full_like(y, rf.NULL))
        assert torch.allclose(rf.velocity(net, x, t, y, 1.0), v_c)
        assert torch.allclose(rf.velocity(net, x, t, y, 0.0), v_u, atol=1e-5)
        assert torch.allclose(rf.velocity(net, x, t, y, 3.0), v_u + 3 * (v_c - v_u), atol=1e-5)


def test_unet_starts_at_zero_velocity_and_keeps_shape():
    net = rf.UNet(ch=8, blocks=2)
    v = net(torch.randn(2, 1, 32, 32), torch.rand(2), torch.tensor([0, rf.NULL]))
    assert v.shape == (2, 1, 32, 32) and (v == 0).all()            # zero-initialised output conv


def test_sampling_is_deterministic(fake_data, tmp_path):
    assert run_here(ROOT / "image" / "rectified_flow.py", "--train", "--sample", *tiny(fake_data, tmp_path)).returncode == 0
    a = (tmp_path / "samples.npz").read_bytes()
    assert run_here(ROOT / "image" / "rectified_flow.py", "--sample", *tiny(fake_data, tmp_path)).returncode == 0
    assert (tmp_path / "samples.npz").read_bytes() == a             # same seed, same z0: same samples


def test_reflow_and_distill(fake_data, tmp_path):
    script = ROOT / "image" / "rectified_flow.py"
    assert run_here(script, "--train", *tiny(fake_data, tmp_path / "rf1")).returncode == 0
    r = run_here(script, "--reflow", tmp_path / "rf1" / "ckpt.pt", "--train", "--sample", *tiny(fake_data, tmp_path / "rf2"))
    assert r.returncode == 0, r.stderr[-3000:]
    student = torch.load(tmp_path / "rf2" / "ckpt.pt", weights_only=True)
    pairs = torch.load(tmp_path / "rf2" / "pairs.pt", weights_only=True)
    assert student["k"] == 2 and student["config"]["p_uncond"] == 0 and student["config"]["guidance"] == 1
    assert pairs["z0"].shape == pairs["z1"].shape == (8, 1, 32, 32) and pairs["y"].shape == (8,)
    assert pairs["key"].startswith(str(tmp_path / "rf1" / "ckpt.pt"))  # pairs are tied to their teacher
    assert (tmp_path / "rf2" / "reflow.png").exists() and "straightness" in r.stdout
    r = run_here(script, "--reflow", tmp_path / "rf2" / "ckpt.pt", "--distill", "--train", *tiny(fake_data, tmp_path / "d"))
    d = torch.load(tmp_path / "d" / "ckpt.pt", weights_only=True)
    assert r.returncode == 0 and d["k"] == 2 and d["distill"] and "distilled" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["--distill"], "--reflow"),
    (["--ch", "16"], "does not match"),
])
def test_user_errors(fake_data, tmp_path, args, needle):
    assert run_here(ROOT / "image" / "rectified_flow.py", "--train", *tiny(fake_data, tmp_path)).returncode == 0
    with pytest.raises(SystemExit) as e:
        rf.main(["--sample", "--out", str(tmp_path), "--device", "cpu", *args])
    assert needle in str(e.value.code)
