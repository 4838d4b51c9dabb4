"""Score-SDE: "Score-Based Generative Modeling through Stochastic Differential Equations"
Yang Song, Jascha Sohl-Dickstein, Diederik P. Kingma, Abhishek Kumar, Stefano Ermon, Ben Poole, 2020.
https://arxiv.org/abs/2011.13456v2  Official code: github.com/yang-song/score_sde_pytorch (sde_lib.py, losses.py,
sampling.py, likelihood.py).

The idea: turn data into noise with an SDE dx = f(x, t) dt + g(t) dw (Eq. 5): VE for SMLD's noise scales, VP for
DDPM's, or the new sub-VP. Denoising score matching (Eq. 7) learns the score grad_x log p_t(x) of every marginal,
all that the reverse-time SDE (Eq. 6) needs. Sample by solving it (the predictor), each step followed by Langevin
MCMC (the corrector), or solve the probability flow ODE (Eq. 13): deterministic, same marginals, exact likelihoods.

Time convention (as the paper): t=0 is data, t=1 is noise (the prior); samplers run from t=1 down to t=eps.

Deviations from the paper:
- A small DDPM-style U-Net (image/edm.py's, unconditional like the paper) instead of DDPM++/NCSN++; its sinusoidal
  time embedding takes 999 t for vp and subvp (official), ln sigma for ve (NCSN++: random Fourier features, scale 16).
- Data in [-1, 1] for every SDE (official ve: [0, 1]). Short runs: 10k steps, lr 1e-3, warm-up 500, EMA 0.999
  (paper: 1.3M, 2e-4, 5000, 0.9999 for vp and subvp).
- RK45 is our own Dormand-Prince in torch (no scipy), one step size for the whole batch as official; the first step
  is 1% of the interval (scipy estimates one) and a step after a rejection may grow (scipy: not).
- Langevin on sub-VP uses VP's alpha_i (the official code has none for sub-VP and fails).
- The CPU preset trains VP for 4000 steps and samples with the Langevin corrector (PC sampling, Sec. 4.2), N = 500:
  the paper's sub-VP with Euler-Maruyama alone drew many malformed digits after 2000 steps (README).
- bf16 autocast for training on CUDA and on CPUs with native bf16 (precision()); samplers and likelihoods keep x in
  float64 (float32 on MPS), the net float32.

Usage:
  python image/score_sde.py --train --sample --data-dir ../shared/data        # sub-VP, Euler-Maruyama (CPU: VP + Langevin)
  python image/score_sde.py --sample --sampler ode                             # probability flow ODE, RK45
  python image/score_sde.py --bpd --data-dir ../shared/data                    # bits/dim of test digits
  python image/score_sde.py --train --sample --sde ve --out runs/score_sde_ve  # reverse diffusion + Langevin
"""
import argparse
import copy
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
from einops import rearrange
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared import UserError, between_steps, log, mnist, save_gif, save_npz, save_png  # noqa: E402

NAME = "score_sde"

# --- config ---
@dataclass
class Config:
    ch: int = 64                 # U-Net base channels (paper: DDPM++ with 128)
    blocks: int = 2              # residual blocks per resolution (paper: 2 DDPM++, 4 NCSN++)
    dropout: float = 0.1         # paper: 0.1
    sde: str = "subvp"           # vp, subvp or ve (Sec. 3.4); subvp gave the paper's best likelihoods
    weighting: str = "sigma2"    # lambda(t) = sigma_t^2 (paper) or likelihood: g(t)^2 (arXiv 2101.09258)
    steps: int = 10000           # paper: 1.3M (CIFAR-10)
    batch_size: int = 128        # paper: 128
    lr: float = 1e-3             # paper: 2e-4
    warmup: int = 500            # linear lr warm-up, in steps (paper: 5000)
    grad_clip: float = 1.0       # paper: 1.0
    ema: float = 0.999           # EMA decay (paper: 0.9999 vp and subvp, 0.999 ve)
    sampler: str = "pc"          # pc: predictor-corrector (Sec. 4.2); ode: probability flow (Sec. 4.3)
    predictor: str = "auto"      # auto: the paper's for the SDE (reverse_diffusion for ve, else euler_maruyama)
    corrector: str = "auto"      # auto: the paper's for the SDE (langevin for ve, else none)
    snr: float = 0.16            # Langevin signal-to-noise ratio r (paper: 0.16 on CIFAR-10)
    sample_steps: int = 1000     # PC steps N (paper: 1000)
    ode_tol: float = 1e-5        # RK45 rtol = atol, sampling and --bpd (paper: 1e-5)
    num_samples: int = 100
    bpd_digits: int = 100        # test digits for --bpd (paper: the CIFAR-10 test set, 5 times)
    log_every: int = 100
    ckpt_every: int = 1000

PRESETS = {
    "gpu": Config(),
    "cpu": Config(ch=16, blocks=1, dropout=0.0, sde="vp", batch_size=64, steps=4000, warmup=100, corrector="langevin",
                  sample_steps=500),
    "tiny": Config(ch=8, blocks=1, batch_size=4, steps=2, sample_steps=2, num_samples=10, bpd_digits=2, log_every=1, ckpt_every=1),
}
ZERO_OK = ("dropout", "warmup")  # others must be > 0; CHOICES: flags with a choice instead of a number
CHOICES = {"sde": ("vp", "subvp", "ve"), "weighting": ("sigma2", "likelihood"), "sampler": ("pc", "ode"),
           "predictor": ("auto", "euler_maruyama", "reverse_diffusion", "ancestral"), "corrector": ("auto", "langevin", "none")}

# --- model ---
def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) times, as in DDPM / Transformer."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs                                     # (B, dim/2)
    return torch.cat([args.cos(), args.sin()], -1)                        # (B, dim)

def norm(c):
    return nn.GroupNorm(math.gcd(8, c), c)

def zero(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module

class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb, dropout):
        super().__init__()
        self.conv1 = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Linear(emb, cout)
        self.conv2 = nn.Sequential(norm(cout), nn.SiLU(), nn.Dropout(dropout), zero(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):                                              # x (B, cin, H, W), e (B, emb)
        return self.skip(x) + self.conv2(self.conv1(x) + self.emb(e)[:, :, None, None])   # (B, cout, H, W)

class Attention(nn.Module):
    def __init__(self, c, heads=4):
        super().__init__()
        self.heads, self.norm = heads, norm(c)
        self.qkv, self.out = nn.Conv2d(c, 3 * c, 1), zero(nn.Conv2d(c, c, 1))

    def forward(self, x, e=None):
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (n h d) x y -> n b h (x y) d", n=3, h=self.heads)
        h = nn.functional.scaled_dot_product_attention(q, k, v)                 # (B, heads, HW, d)
        return x + self.out(rearrange(h, "b h (x y) d -> b (h d) x y", x=x.shape[2]))

class UNet(nn.Module):
    """Unconditional U-Net F(x, c_noise): 32 -> 16 -> 8 with attention at 8x8 (image/edm.py's, without labels)."""

    def __init__(self, ch=64, blocks=2, dropout=0.1, mult=(1, 2, 2)):
        super().__init__()
        self.ch, emb = ch, 4 * ch
        self.time = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [ch], ch
        for i, m in enumerate(mult):
            for _ in range(blocks):
                self.down.append(ResBlock(c, ch * m, emb, dropout))
                skips.append(c := ch * m)
            if i < len(mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb, dropout), Attention(c), ResBlock(c, c, emb, dropout)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), ch * m, emb, dropout))
                c = ch * m
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1)))
        self.out = nn.Sequential(norm(c), nn.SiLU(), zero(nn.Conv2d(c, 1, 3, padding=1)))

    def forward(self, x, t):                                              # x (B, 1, 32, 32), t (B,)
        e = self.time(timestep_embedding(t, self.ch))                     # t = 999 t (vp, subvp) or ln sigma (ve)
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, e) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, e)                                               # (B, 2ch, 8, 8)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), e) if isinstance(layer, ResBlock) else layer(h)
        return self.out(h)                                                # (B, 1, 32, 32) F, zero at init

# --- diffusion ---
BETA_MIN, BETA_MAX = 0.1, 20.0     # vp and subvp (App. C); kept
SIGMA_MIN, SIGMA_MAX = 0.01, 50.0  # ve, CIFAR-10's; MNIST's largest pairwise distance is 33 (Song & Ermon 2020)
SAMPLE_EPS, EPS = {"vp": 1e-3, "subvp": 1e-3, "ve": 1e-5}, 1e-5   # samplers stop at SAMPLE_EPS; loss, likelihood: EPS
PAPER_PC = {"vp": ("euler_maruyama", "none"), "subvp": ("euler_maruyama", "none"), "ve": ("reverse_diffusion", "langevin")}

class SDE:
    """dx = f(x, t) dt + g(t) dw, t in [0, T=1] (Eq. 5): ve (Eq. 9), vp (Eq. 11) or subvp (Eq. 12), N steps when
    discretized. Times t are (B,), coefficients (B, 1, 1, 1)."""
    T = 1.0

    def __init__(self, kind, N=1000):
        self.kind, self.N, self.prior_std = kind, N, SIGMA_MAX if kind == "ve" else 1.0   # p_T = N(0, prior_std^2 I)
        self.discrete_betas = torch.linspace(BETA_MIN / N, BETA_MAX / N, N, dtype=torch.float64)   # DDPM's beta_i
        self.discrete_sigmas = torch.linspace(math.log(SIGMA_MIN), math.log(SIGMA_MAX), N, dtype=torch.float64).exp()

    def sde(self, x, t):                                                  # drift f(x, t), diffusion g(t)
        t = t.view(-1, 1, 1, 1)
        if self.kind == "ve":                                             # g = sqrt(d sigma(t)^2 / dt)
            return torch.zeros_like(x), self.marginal_prob(x, t)[1] * math.sqrt(2 * math.log(SIGMA_MAX / SIGMA_MIN))
        beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
        discount = 1 if self.kind == "vp" else 1 - torch.exp(-2 * BETA_MIN * t - (BETA_MAX - BETA_MIN) * t ** 2)
        return -0.5 * beta * x, (beta * discount).sqrt()

    def marginal_prob(self, x, t):                                        # mean, std of p_0t(x(t) | x(0) = x) (App. B)
        t = t.view(-1, 1, 1, 1)
        if self.kind == "ve":
            return x, SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** t
        log_mean = -0.25 * t ** 2 * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN   # -1/2 int_0^t beta(s) ds
        var = 1 - torch.exp(2 * log_mean)
        return log_mean.exp() * x, var.sqrt() if self.kind == "vp" else var     # important: sub-VP std has no sqrt

    def prior_sampling(self, shape, generator=None):
        return torch.randn(shape, generator=generator, dtype=torch.float64) * self.prior_std

    def prior_logp(self, z):
        var = self.prior_std ** 2
        return -z[0].numel() / 2 * math.log(2 * math.pi * var) - z.pow(2).flatten(1).sum(1) / (2 * var)

    def discrete(self, t):                                                # beta_i (Eq. 10), sigma_i and sigma_i-1 (Eq. 8)
        i, sigmas = (t * (self.N - 1) / self.T).long(), nn.functional.pad(self.discrete_sigmas.to(t), (1, 0))  # s_-1 = 0
        return [v.view(-1, 1, 1, 1) for v in (self.discrete_betas.to(t)[i], sigmas[i + 1], sigmas[i])]

    def discretize(self, x, t):                                           # x_{i+1} = x_i + f_i(x_i) + G_i z_i
        beta, sigma, prev = self.discrete(t)
        if self.kind == "vp":                                             # DDPM, Eq. 10
            return (1 - beta).sqrt() * x - x, beta.sqrt()
        if self.kind == "ve":                                             # SMLD, Eq. 8
            return torch.zeros_like(x), (sigma ** 2 - prev ** 2).sqrt()
        f, g = self.sde(x, t)                                             # subvp: Euler-Maruyama
        return f / self.N, g / math.sqrt(self.N)

    def reverse(self, score, probability_flow=False):
        """Reverse-time SDE (Eq. 6): drift f - g^2 score, diffusion g; probability flow ODE (Eq. 13): f - g^2 score / 2,
        0. The same on discretize (reverse diffusion, App. E). score(x, t) ~ grad_x log p_t(x)."""
        def rev(fn, x, t):
            f, g = fn(x, t)
            return f - (0.5 if probability_flow else 1.0) * g ** 2 * score(x, t), g * (not probability_flow)
        return SimpleNamespace(sde=lambda x, t: rev(self.sde, x, t), discretize=lambda x, t: rev(self.discretize, x, t))

def score_fn(net, sde):
    """s_theta(x, t): -F(x, 999 t) / std(t) for vp and subvp; F(x, ln sigma(t)) / sigma(t) for ve (scale_by_sigma)."""
    def score(x, t):
        std = sde.marginal_prob(x, t)[1]
        out = net(x.float(), (std.log().flatten() if sde.kind == "ve" else 999 * t).float()).to(x.dtype)
        return (out if sde.kind == "ve" else -out) / std
    return score

def sde_loss(score, sde, x, weighting="sigma2"):
    """Eq. 7 with the Gaussian kernel, t ~ U(eps, 1), x_t = mean_t + std_t z: lambda(t) ||s(x_t, t) + z / std_t||^2 with
    lambda = std^2, or g^2 (likelihood weighting, bounds the NLL: arXiv 2101.09258). Per image the mean over pixels for
    vp and subvp, 0.5 x the sum for ve (as official)."""
    t, z = torch.rand(len(x), device=x.device) * (sde.T - EPS) + EPS, torch.randn_like(x)
    mean, std = sde.marginal_prob(x, t)
    s = score(mean + std * z, t)
    loss = (s + z / std) ** 2 * sde.sde(x, t)[1] ** 2 if weighting == "likelihood" else (std * s + z) ** 2
    return loss.flatten(1).mean(1) if sde.kind != "ve" else 0.5 * loss.flatten(1).sum(1)   # (B,)

def predict(name, sde, score, x, t):
    """One predictor step down from t; returns x and x_mean (x without the new noise)."""
    if name == "euler_maruyama":                                          # Eq. 6 with dt = -1/N, as official
        f, g = sde.reverse(score).sde(x, t)
        x_mean, std = x - f / sde.N, g / math.sqrt(sde.N)
    elif name == "reverse_diffusion":                                     # x - f_i + G_i^2 s + G_i z (App. E)
        f, std = sde.reverse(score).discretize(x, t)
        x_mean = x - f
    elif sde.kind == "subvp":
        raise UserError("--predictor ancestral: defined for --sde vp and ve only (as official)")
    else:                                                                 # ancestral: DDPM's Eq. 4 (vp), SMLD's App. F (ve)
        (beta, sigma, prev), s = sde.discrete(t), score(x, t)
        x_mean = (x + beta * s) / (1 - beta).sqrt() if sde.kind == "vp" else x + (sigma ** 2 - prev ** 2) * s
        std = beta.sqrt() if sde.kind == "vp" else (prev ** 2 * (sigma ** 2 - prev ** 2) / sigma ** 2).sqrt()
    return x_mean + std * torch.randn_like(x), x_mean

def langevin(sde, score, x, t, snr):
    """Corrector (Alg. 4 for ve, 5 for vp): eps = 2 alpha_i (r ||z|| / ||s||)^2, norms averaged over the batch
    (official); alpha_i = 1 - beta_i for vp and subvp, 1 for ve. Returns x and x_mean."""
    alpha, s, z = 1.0 if sde.kind == "ve" else 1 - sde.discrete(t)[0], score(x, t), torch.randn_like(x)
    eps = 2 * alpha * (snr * z.flatten(1).norm(dim=1).mean() / s.flatten(1).norm(dim=1).mean()) ** 2
    return x + eps * s + (2 * eps).sqrt() * z, x + eps * s

@torch.no_grad()
def pc_sampler(sde, score, x, eps, predictor="euler_maruyama", corrector="none", snr=0.16, bar=False):
    """PC sampling (Alg. 1) as official: t_i = linspace(1, eps, N), each the corrector then the predictor; the sample
    is the last x_mean, without the last noise. Returns about 30 frames of x_mean, then the NFE."""
    frames = [x]
    for i, t in enumerate(tqdm(torch.linspace(sde.T, eps, sde.N).tolist(), desc="sample", leave=False, disable=not bar)):
        t = x.new_full((len(x),), t)                                     # (B,)
        x = langevin(sde, score, x, t, snr)[0] if corrector == "langevin" else x
        x, x_mean = predict(predictor, sde, score, x, t)
        if (i + 1) % -(-sde.N // 30) == 0 or i == sde.N - 1:
            frames.append(x_mean)
    return torch.stack(frames), sde.N * (1 + (corrector == "langevin"))

DOPRI = [(1 / 5, [1 / 5]), (3 / 10, [3 / 40, 9 / 40]), (4 / 5, [44 / 45, -56 / 15, 32 / 9]),
         (8 / 9, [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729]),
         (1, [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]),
         (1, [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84])]    # Dormand-Prince 5(4): c_i, a_ij; b last
DOPRI_ERR = [71 / 57600, 0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40]   # b - b*: 5th - 4th order

def rk45(f, y, t0, t1, rtol=1e-5, atol=1e-5):
    """dy/dt = f(t, y(t) (B, ...)) from t0 to t1, adaptive Dormand-Prince as scipy's RK45 in the official code: RMS
    error over the whole batch, step x 0.9 err^(-1/5) within [0.2, 10]. Returns the accepted states and the NFE."""
    t, h, k, ys, nfe = t0, (t1 - t0) / 100, [f(t0, y)], [y], 1
    while abs(t1 - t) > 1e-12:
        h = math.copysign(min(abs(h), abs(t1 - t)), t1 - t0)
        for c, a in DOPRI:                                                # the last stage, f(t + h, y_new), is reused
            y_new = y + h * sum(a_j * k_j for a_j, k_j in zip(a, k))
            k.append(f(t + c * h, y_new))
        err = h * sum(e * k_j for e, k_j in zip(DOPRI_ERR, k))
        norm = (err / (atol + rtol * torch.maximum(y.abs(), y_new.abs()))).pow(2).mean().sqrt().item()
        t, y, k, ys = (t + h, y_new, k[-1:], ys + [y_new]) if norm < 1 else (t, y, k[:1], ys)
        h, nfe = h * (min(10.0, max(0.2, 0.9 * norm ** -0.2)) if norm > 0 else 10.0), nfe + 6
    return ys, nfe

@torch.no_grad()
def ode_sampler(sde, score, x, eps, tol=1e-5):
    """The probability flow ODE (Eq. 13) from t=1 to eps by RK45, then one reverse-diffusion step without noise
    (official noise_removal). Returns about 30 of the RK45 states, then the sample; and the NFE."""
    flow = sde.reverse(score, probability_flow=True).sde
    ys, nfe = rk45(lambda t, y: flow(y, y.new_full((len(y),), t))[0], x, sde.T, eps, tol, tol)
    x_mean = predict("reverse_diffusion", sde, score, ys[-1], x.new_full((len(x),), eps))[1]
    return torch.stack(ys[::-(-len(ys) // 30)] + [x_mean]), nfe + 1

def likelihood(sde, score, x, tol=1e-5):
    """log p_0(x) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt along the probability flow (App. D.2); div f~ by
    Hutchinson-Skilling: n^T (df~/dx) n, one Rademacher n per image fixed along the path. Returns nats (B,), NFE."""
    flow, n = sde.reverse(score, probability_flow=True).sde, torch.randint_like(x, 2) * 2 - 1

    def f(t, y):                                                          # y = [x(t), int div f~ dt] (B, D + 1)
        with torch.enable_grad():
            xt = y[:, :-1].reshape(x.shape).detach().requires_grad_()
            drift = flow(xt, x.new_full((len(x),), t))[0]
            jn = torch.autograd.grad((drift * n).sum(), xt)[0]            # n^T df~/dx: one backward pass
        return torch.cat([drift.detach().flatten(1), (jn * n).flatten(1).sum(1, keepdim=True)], 1)
    ys, nfe = rk45(f, torch.cat([x.flatten(1), x.new_zeros(len(x), 1)], 1), EPS, sde.T, tol, tol)
    return sde.prior_logp(ys[-1][:, :-1].reshape(x.shape)) + ys[-1][:, -1], nfe

def bits_per_dim(sde, score, x, tol=1e-5):
    """Digits x in [-1, 1], dequantized as official: (k + u) / 256 in [0, 1], scaled to [-1, 1]. A pixel's bin is
    then 2/256 wide: -log2 P(k) = -log2 p(x) - D log2(2/256), +7 bits/dim (official: 7 - inverse_scaler(-1))."""
    logp, nfe = likelihood(sde, score, (((x + 1) * 127.5).round() + torch.rand_like(x)) / 128 - 1, tol)
    return -logp / (x[0].numel() * math.log(2)) + 7, nfe

# --- train ---
def train(args, device, out, ckpt_path):
    torch.manual_seed(args.seed)
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: continue it with --resume, or pass another --out")
    state = load_ckpt(ckpt_path) if args.resume else None
    preset = args.preset or ("cpu" if device.type == "cpu" else "gpu")
    cfg = make_config(args, state["config"] if state else asdict(PRESETS[preset]), fixed=bool(state))
    x, sde = mnist(args.data_dir)[0].to(device), SDE(cfg.sde)
    amp, layout = precision(device)
    net = UNet(cfg.ch, cfg.blocks, cfg.dropout).to(device, memory_format=layout)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    step = state["step"] if state else 0
    if state:
        for obj, key in ((net, "model"), (ema, "ema"), (opt, "opt")):
            obj.load_state_dict(state[key])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
    fwd = torch.compile(net) if args.compile else net
    log(out / "log.txt", f"{NAME}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
                         f"{len(x)} training images, {device}, step {step}/{cfg.steps}, {cfg}")

    def save(done, write=True):  # a NaN/inf loss stops training before it can reach a checkpoint
        if not torch.isfinite(running):
            raise UserError(f"loss became {running.item()} before step {done}; stopped, the last good "
                            f"checkpoint is kept at {ckpt_path} (try a lower --lr)")
        if not write:
            return
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save({"script": NAME, "config": asdict(cfg), "model": net.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict(), "step": done, "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None}, tmp)
        os.replace(tmp, ckpt_path)                                        # atomic: never a half-written file

    net.train()
    running, seen, clock, done = torch.zeros((), device=device), 0, time.time(), step
    try:
        for done in between_steps(tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train")):
            idx = torch.randint(len(x), (cfg.batch_size,), device=device)
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                loss = sde_loss(score_fn(fwd, sde), sde, x[idx], cfg.weighting)   # (B,)
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()                                        # the mean of per-image losses, as official
            for g in opt.param_groups:                                    # linear lr warm-up in steps (official)
                g["lr"] = cfg.lr * min(done / max(cfg.warmup, 1e-8), 1)
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            decay = min(cfg.ema, (2 + done) / (11 + done))                # official ema.py: (1 + n) / (10 + n), n updates
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)
            running, seen, done = running + loss.detach().mean(), seen + 1, done + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                save(done, write=False)
                log(out / "log.txt", f"step {done} loss {running.item() / seen:.4f} "
                                     f"images/s {seen * cfg.batch_size / (time.time() - clock):.0f}")
                running, seen, clock = torch.zeros((), device=device), 0, time.time()
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                save(done)
    except KeyboardInterrupt:                                             # Ctrl-C, raised only between steps
        save(done)
        print(f"interrupted: step {done} saved to {ckpt_path}; continue with --resume", file=sys.stderr)
        sys.exit(130)

# --- sample ---
def load_ckpt(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train one first with --train (or pass --ckpt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): it may be truncated") from None
    if (who := state.get("script") if isinstance(state, dict) else None) != NAME:
        raise UserError(f"{path} is a checkpoint of {who or 'another program'}, not of {NAME}.py")
    return state

def sample(args, device, out, ckpt_path):
    """--sample: samples.png, .gif, .npz; --bpd: bits/dim of test digits, both with the EMA weights."""
    state = load_ckpt(ckpt_path)
    cfg = make_config(args, state["config"])
    net = UNet(cfg.ch, cfg.blocks).to(device, memory_format=torch.channels_last).eval()
    net.load_state_dict(state["ema"])
    sde, dtype = SDE(cfg.sde, cfg.sample_steps), torch.float32 if device.type == "mps" else torch.float64  # MPS: no float64
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # important: RK45 needs float32 nets
    score, eps = score_fn(net, sde), SAMPLE_EPS[cfg.sde]
    if args.sample:
        noise = sde.prior_sampling((cfg.num_samples, 1, 32, 32), torch.Generator().manual_seed(args.seed)).to(device, dtype)
        torch.manual_seed(args.seed)                                      # the sampler's noise
        pc = [c if c != "auto" else paper for c, paper in zip((cfg.predictor, cfg.corrector), PAPER_PC[cfg.sde])]
        traj, nfe = (ode_sampler(sde, score, noise, eps, cfg.ode_tol) if cfg.sampler == "ode"
                     else pc_sampler(sde, score, noise, eps, *pc, cfg.snr, bar=True))
        how = (f"probability flow ODE, RK45 tol {cfg.ode_tol}" if cfg.sampler == "ode"
               else f"{cfg.sample_steps} PC steps, {pc[0]} + {pc[1]} corrector (snr {cfg.snr})")
        save_png(out / "samples.png", traj[-1])
        save_gif(out / "samples.gif", traj)                               # x_mean along the sampler's path
        save_npz(out / "samples.npz", images=traj[-1])
        print(f"wrote {out}/samples.png, samples.gif, samples.npz: {len(traj[-1])} samples (step {state['step']}), "
              f"{cfg.sde} SDE, {how}: {nfe} NFE")
    if args.bpd:
        x = mnist(args.data_dir, train=False)[0][:cfg.bpd_digits].to(device, dtype)
        torch.manual_seed(args.seed)                                      # dequantization and Hutchinson noise
        bpd, nfe = zip(*[bits_per_dim(sde, score, xb, cfg.ode_tol) for xb in tqdm(x.split(cfg.batch_size), desc="bpd")])
        bpd = torch.cat(bpd)
        sem = bpd.std() / len(bpd) ** 0.5 if len(bpd) > 1 else 0          # standard error of the mean
        log(out / "log.txt", f"bits/dim {bpd.mean():.4f} +- {sem:.4f} on {len(bpd)} test digits"
                             f" (step {state['step']}, {cfg.sde} SDE, RK45 tol {cfg.ode_tol}, {sum(nfe)} NFE)")

# --- cli ---
HELP = dict(re.findall(r"^    (\w+): \w+ = [^#\n]*# (.*)$", Path(__file__).read_text(), re.M))  # Config's comments

def make_config(args, base, fixed=True):
    """A checkpoint's (fixed=True) or preset's config, overridden by the flags on the command line."""
    if unknown := set(base) - {f.name for f in fields(Config)}:
        raise UserError(f"the checkpoint comes from another version of {NAME}.py: unknown config {sorted(unknown)}")
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    for key in ("ch", "blocks", "sde"):
        if fixed and key in given and given[key] != base[key]:
            raise UserError(f"--{key} {given[key]} does not match the checkpoint's {base[key]}")
    if (cfg := replace(Config(**base), **given)).ch % 2:
        raise UserError("need an even --ch (the time embedding and the attention heads split it)")
    return cfg

def pick_device(name):
    ok = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = name or next(d for d in ok if ok[d])
    if not ok.get(name.split(":")[0]):
        raise UserError(f"--device {name}: not available here (cuda, mps or cpu)")
    return torch.device(name)

def precision(device):
    """bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16), where the CPU preset trains 1.3 times as fast
    as in float32; channels_last (NHWC) convolutions, except in bf16 on a CPU, where oneDNN's NCHW ones are faster
    (video_diffusion_models.py's step: 0.49-0.57 s, against 0.78-0.87 s in bf16 NHWC, 0.75-0.78 s in float32 NHWC)."""
    bf16 = device.type == "cuda" or device.type == "cpu" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bf16, torch.contiguous_format if bf16 and device.type == "cpu" else torch.channels_last

def number(kind, zero_ok):
    def parse(s):
        if not ((x := kind(s)) > 0 or zero_ok and x == 0):
            raise ValueError
        return x
    parse.__name__ = f"{'non-negative' if zero_ok else 'positive'} {kind.__name__}"
    return parse

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda msg: sys.exit(f"error: {msg} (see --help)")          # one line, no usage dump
    p.add_argument("--train", action="store_true", help="train (then sample too with --sample)")
    p.add_argument("--sample", action="store_true", help="sample from the checkpoint's EMA weights")
    p.add_argument("--bpd", action="store_true", help="bits/dim of --bpd-digits test digits (EMA weights)")
    p.add_argument("--preset", choices=PRESETS, help="sizes for a GPU, a CPU or tests (default: cpu on a CPU, else gpu)")
    for f in fields(Config):
        kind = (dict(choices=CHOICES[f.name]) if f.name in CHOICES
                else dict(metavar="N", type=number(f.type, f.name in ZERO_OK)))
        p.add_argument(f"--{f.name.replace('_', '-')}", **kind,
                       help=f"{HELP.get(f.name, '')} [gpu {getattr(PRESETS['gpu'], f.name)}, cpu {getattr(PRESETS['cpu'], f.name)}]")
    p.add_argument("--device", help="cuda, mps or cpu (default: cuda, else mps, else cpu)")
    p.add_argument("--out", help=f"output folder (default: runs/{NAME})")
    p.add_argument("--data-dir", help="folder holding MNIST/raw/ (default: $XDIFFUSION_DATA, else ./data)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue training from the checkpoint")
    p.add_argument("--ckpt", help="checkpoint to write, resume and sample (default: OUT/ckpt.pt)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    args = p.parse_args(argv)
    if not (args.train or args.sample or args.bpd):
        return p.print_help()
    try:
        device = pick_device(args.device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        out = Path(args.out or f"runs/{NAME}")
        ckpt_path = Path(args.ckpt) if args.ckpt else out / "ckpt.pt"
        out.mkdir(parents=True, exist_ok=True)
        if args.train:
            train(args, device, out, ckpt_path)
        if args.sample or args.bpd:
            sample(args, device, out, ckpt_path)
    except (UserError, OSError, KeyboardInterrupt) as e:                  # OSError: e.g. --out is a file, the disk full
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else f"error: {e}")   # Ctrl-C outside the training steps: 130

if __name__ == "__main__":
    main()
