"""Invariants of image/consistency_models.py (PAPERS.md §6 sanity tests)."""
import math

import torch

from conftest import ROOT, load_script, run_here, tiny

cm = load_script(ROOT / "image" / "consistency_models.py")
edm = load_script(ROOT / "image" / "edm.py")


def random_unet(ch=8):
    torch.manual_seed(0)
    net = cm.UNet(ch=ch, blocks=1).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net


def test_boundary_condition_is_exact():
    """f(x, eps) = x for any network: c_skip(eps) = 1 and c_out(eps) = 0 (Eq. 5)."""
    net, x = random_unet(), torch.randn(4, 1, 32, 32) * 3
    y = torch.arange(4)
    assert torch.equal(cm.denoise(net, x, torch.tensor(cm.EPS), y), x)
    assert torch.equal(cm.denoise(net, x, torch.tensor(cm.EPS), y, w=3.0), x)
    assert not torch.allclose(cm.denoise(net, x, torch.tensor(1.0), y), x)
    c_skip, c_out, _, _ = cm.precond(torch.tensor([cm.EPS, 1e4], dtype=torch.float64))
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[1] < 1e-8 and abs(c_out[1] - cm.SIGMA_DATA) < 1e-4


def test_precond_with_eps_zero_is_the_teachers():
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    for a, b in zip(cm.precond(sigma, eps=0), edm.precond(sigma)):
        assert torch.allclose(a, b)
    net, x, y = random_unet(), torch.randn(3, 1, 32, 32), torch.tensor([1, 2, 3])
    sigma = torch.tensor([0.3, 2.0, 20.0])
    ours = cm.denoise(net, x, sigma, y, w=2.0, eps=0)
    assert torch.allclose(ours, edm.denoise(net, x, sigma, y, w=2.0), atol=1e-6)
    assert set(cm.UNet(8, 1).state_dict()) == set(edm.UNet(8, 1).state_dict())  # the teacher loads into it


def test_karras_discretisation():
    t = cm.karras(18)
    assert abs(t[0] - cm.EPS) < 1e-12 and abs(t[-1] - cm.T) < 1e-9 and (t.diff() > 0).all()


def test_ct_schedule_official():
    cfg = cm.Config(s0=2, s1=150, mu0=0.9, steps=1000)
    n0, mu0 = cm.schedule(0, cfg, distill=False)
    assert n0 == 2 and abs(mu0 - 0.81) < 1e-12  # official exponent N(k) - 1: mu(0) = 0.9^2
    nk, _ = cm.schedule(1000, cfg, distill=False)
    assert nk == 151
    ns, mus = zip(*(cm.schedule(k, cfg, False) for k in range(0, 1001, 50)))
    assert all(a <= b for a, b in zip(ns, ns[1:])) and all(a <= b for a, b in zip(mus, mus[1:])) and mus[-1] < 1
    assert cm.schedule(123, cfg, distill=True) == (18, 0.0)


def test_ict_curriculum_doubles():
    cfg = cm.Config(ict=1, steps=8000)
    ns = sorted({cm.schedule(k, cfg, False)[0] for k in range(8000)})
    assert ns == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert all(cm.schedule(k, cfg, False)[1] == 0 for k in (0, 4000, 7999))


def test_pseudo_huber_limits():
    d = 1024
    c = 0.00054 * math.sqrt(d)
    small, large = torch.full((1, d), 1e-6), torch.full((1, d), 1.0)
    assert torch.allclose(cm.distance(small, True), small.pow(2).sum(1) / (2 * c), rtol=1e-3)
    assert torch.allclose(cm.distance(large, True), large.norm(dim=1) - c, rtol=1e-6)
    assert torch.allclose(cm.distance(large, False), torch.ones(1))


class Recorder(torch.nn.Module):
    """Records the x it was asked about (undoing c_in) and returns F = 0."""
    def __init__(self):
        super().__init__()
        self.w, self.seen = torch.nn.Parameter(torch.zeros(())), []

    def forward(self, x_in, c_noise, y):
        t = (4 * c_noise).exp().view(-1, 1, 1, 1)
        self.seen.append((x_in * (cm.SIGMA_DATA ** 2 + t ** 2).sqrt(), t))
        return x_in * self.w


def test_ct_pair_shares_its_noise():
    torch.manual_seed(0)
    online, target, x = Recorder(), Recorder(), torch.randn(64, 1, 32, 32)
    n = cm.schedule(10, cm.Config(steps=100), False)[0]
    cm.cm_loss(online, target, x, torch.zeros(64, dtype=torch.long), n, cm.Config(steps=100))
    (x_n1, t_n1), (x_n, t_n) = online.seen[0], target.seen[0]
    assert (t_n < t_n1).all()
    assert torch.allclose((x_n - x) / t_n, (x_n1 - x) / t_n1, atol=1e-3)    # the same z (Alg. 3), float32
    grid = cm.karras(n).float()
    idx = (t_n1.flatten()[:, None] - grid).abs().argmin(1)                 # adjacent points of the grid
    assert torch.allclose(grid[idx - 1], t_n.flatten(), rtol=1e-4)


def gaussian_teacher(s):
    return lambda x, sigma: x * s ** 2 / (s ** 2 + sigma ** 2)            # exact D for data N(0, s^2)


def test_heun_step_follows_the_exact_ode():
    """With the exact Gaussian denoiser the ODE solution is x(t) = x(t') sqrt(s^2+t^2)/sqrt(s^2+t'^2), and the
    exact consistency function f*(x, t) = x s / sqrt(s^2 + t^2) is constant along it (PAPERS.md §6(e)7)."""
    s, x = 0.5, torch.randn(1000, dtype=torch.float64)
    t = cm.karras(40)
    for i in (0, 10, 38):
        x_n = cm.heun_step(gaussian_teacher(s), x, t[i + 1], t[i])
        exact = x * math.sqrt(s ** 2 + t[i] ** 2) / math.sqrt(s ** 2 + t[i + 1] ** 2)
        assert torch.allclose(x_n, exact, rtol=2e-3)


def test_multistep_sampler_levels_and_calls():
    calls = []
    s = 0.5

    def f(x, t):  # the exact consistency function of N(0, s^2) data
        calls.append(float(t))
        return x * s / math.sqrt(s ** 2 + float(t) ** 2)
    torch.manual_seed(0)
    z = torch.randn(20000)
    xs = cm.multistep(f, z, torch.tensor([cm.T]))
    assert len(xs) == 2 and calls == [cm.T] and abs(xs[-1].std() / s - 1) < 0.02
    calls.clear()
    taus = cm.karras(3, 0.821, cm.T).flip(0).float()
    xs = cm.multistep(f, z, taus)
    assert len(xs) == 4 and torch.allclose(torch.tensor(calls), taus) and abs(xs[-1].std() / s - 1) < 0.02


def test_ict_target_is_online_after_update_and_ct_is_not(fake_data, tmp_path):
    for flags, same in ((("--ict", "1"), True), ((), False)):
        out = tmp_path / str(same)
        assert run_here(ROOT / "image" / "consistency_models.py", "--train",
                   *tiny(fake_data, out, *flags)).returncode == 0
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        equal = all(torch.equal(ckpt["model"][k], ckpt["target"][k]) for k in ckpt["model"])
        assert equal == same


def test_distill_from_edm_checkpoint(fake_data, tmp_path):
    script = ROOT / "image" / "consistency_models.py"
    assert run_here(ROOT / "image" / "edm.py", "--train", *tiny(fake_data, tmp_path / "edm")).returncode == 0
    r = run_here(script, "--train", "--sample", *tiny(fake_data, tmp_path / "cd", "--distill", tmp_path / "edm" / "ckpt.pt",
                                                  "--lr", "1e-30"))
    assert r.returncode == 0, r.stderr[-2000:]
    teacher = torch.load(tmp_path / "edm" / "ckpt.pt", weights_only=True)["ema"]
    student = torch.load(tmp_path / "cd" / "ckpt.pt", weights_only=True)
    assert student["teacher"] == str(tmp_path / "edm" / "ckpt.pt")
    assert all(torch.allclose(student["model"][k], teacher[k]) for k in teacher)   # starts from the teacher
    r = run_here(script, "--train", *tiny(fake_data, tmp_path / "x", "--distill", tmp_path / "cd" / "ckpt.pt"))
    assert r.returncode != 0 and "not of edm.py" in r.stderr and "Traceback" not in r.stderr


def test_ict_k_prime_sets_the_doubling_period():
    """--k-prime fixes K' (steps per doubling) whatever K is; 0 keeps the paper's K / (log2(1280 / 10) + 1)."""
    short = cm.Config(ict=1, steps=2000, k_prime=750)
    assert [cm.schedule(k, short, False)[0] for k in (0, 749, 750, 1500, 1999)] == [11, 11, 21, 41, 41]
    assert [cm.schedule(k, cm.Config(ict=1, steps=6000), False)[0] for k in (0, 750, 1500)] == [11, 21, 41]


def test_ct_label_dropout_trains_the_no_label_row_for_guidance(fake_data, tmp_path):
    """--p-uncond 1 trains only the 'no label' embedding (the unconditional f_u of --guidance); 0 never trains it.
    Read from RAdam's first moment of the label table: a row that never had a gradient keeps it at zero."""
    index = [name for name, _ in cm.UNet(8, 1).named_parameters()].index("label.weight")
    for p in ("0", "1"):
        out = tmp_path / p
        r = run_here(ROOT / "image" / "consistency_models.py", "--train", "--sample",
                     *tiny(fake_data, out, "--ict", "1", "--p-uncond", p, "--guidance", "2",
                          "--steps", "3"))   # zero-init outputs: the label table gets gradients from step 3
        assert r.returncode == 0, r.stderr[-2000:]
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        moved = ckpt["opt"]["state"][index]["exp_avg"].abs().sum(1) > 0   # (11,) rows that had a gradient
        assert moved[cm.NULL] == (p == "1") and moved[:cm.NULL].any() == (p == "0")
        assert ckpt["config"]["guidance"] == 2.0 and (out / "samples.npz").exists()


def test_guided_f_is_conditional_at_w_1_and_extrapolates():
    """f_u + w (f_c - f_u) in one batched call: w = 1 is f_c, w = 0 is f_u, w = 2 extrapolates past f_c.
    (f(x, eps) = x for any w: test_boundary_condition_is_exact.)"""
    net, x, y, t = random_unet(), torch.randn(4, 1, 32, 32), torch.arange(4), torch.tensor(3.0)
    f_c, f_u = cm.denoise(net, x, t, y), cm.denoise(net, x, t, torch.full_like(y, cm.NULL))
    assert torch.allclose(cm.denoise(net, x, t, y, w=1.0 + 1e-7), f_c, atol=1e-5)   # the guided path, at w ~ 1
    assert torch.allclose(cm.denoise(net, x, t, y, w=0.0), f_u, atol=1e-5)
    assert torch.allclose(cm.denoise(net, x, t, y, w=2.0), 2 * f_c - f_u, atol=1e-5)


def test_distilled_student_samples_unguided_whatever_the_preset(fake_data, tmp_path):
    """The CPU preset's CT guidance (2) is not applied again to a CD student: its teacher's guidance is distilled."""
    script = ROOT / "image" / "consistency_models.py"
    assert run_here(ROOT / "image" / "edm.py", "--train", *tiny(fake_data, tmp_path / "edm")).returncode == 0
    r = run_here(script, "--train", "--preset", "cpu", "--steps", "1", "--batch-size", "2", "--data-dir", fake_data,
                 "--out", tmp_path / "cd", "--distill", tmp_path / "edm" / "ckpt.pt")
    assert r.returncode == 0, r.stderr[-2000:]
    config = torch.load(tmp_path / "cd" / "ckpt.pt", weights_only=True)["config"]
    assert config["guidance"] == 1.0 and config["p_uncond"] == 0.0 and config["ch"] == 8
