"""DiT: "Scalable Diffusion Models with Transformers"
William Peebles, Saining Xie, 2022. https://arxiv.org/abs/2212.09748v2
Official code: github.com/facebookresearch/DiT (models.py, diffusion/{gaussian_diffusion,respace}.py, sample.py).

The idea: a plain Vision Transformer replaces the U-Net of a latent diffusion model. The autoencoder's latent is
cut into p x p patches, one token each, with fixed 2-D sin-cos positions; the timestep and class embeddings, summed
into c, enter each block through adaptive LayerNorm whose shift, scale and residual gate are regressed from c and
start at zero (adaLN-Zero, Sec. 3.2, Fig. 3), so every block starts as the identity. Quality follows Gflops (Sec.
5.1): deeper, wider, or smaller patches. Diffusion as ADM: eps, learned Sigma, 250 respaced steps, guidance.

Time convention (DDPM, official): discrete t = 0..999, x_t ~ N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),
alpha_bar_t = prod_{s<=t} (1 - beta_s): t = 0 is one small step from the data, t = 999 nearly pure noise.

Deviations from the paper:
- Our own autoencoder, trained first (ae_steps) and then frozen: 1x32x32 MNIST -> 4x8x8 (x4 in space), MSE plus
  a small latent L2, as video/sora.py's compression network in 2-D (paper: the pretrained SD KL-f8 VAE, 256x256x3 ImageNet
  -> 4x32x32, not a dependency here); latents divided by their std (paper: x 0.18215). bf16 autocast on CUDA (paper: fp32).
- Guidance on all z_ch eps channels, v from the conditional half (official: channels [:3] of 8, a quirk that leaves
  the 4th latent channel unguided).
- Sizes: gpu 256 wide x 8 blocks, p=1 (64 tokens; DiT-S/2: 384 x 12, 256 tokens); cpu 96 x 4, p=2 (16 tokens).
  Far fewer steps (paper: 400k at batch 256), higher lr (paper: 1e-4), EMA warm-up min(decay, (1+n)/(10+n)).
  Measured on CPU: in pixel space (p=4, 64 tokens) this DiT needed 12k steps and 26 min for clean digits; on the
  latent the steps are ~2.4x cheaper and learn as much each: 1.5k + 8k steps, 9 min (README).

Usage:
  python image/dit.py --train --sample --data-dir ../shared/data
  python image/dit.py --sample --sample-steps 50 --guidance 4      # sample again: 50 respaced steps
"""
import argparse
import copy
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared import UserError, between_steps, log, mnist, save_gif, save_npz, save_png  # noqa: E402

NAME = "dit"

# --- config ---
@dataclass
class Config:
    ae_ch: int = 32              # autoencoder width (paper: the pretrained SD VAE)
    z_ch: int = 4                # latent channels: 1 x 32 x 32 -> z_ch x 8 x 8 (paper: 4, x8 in space)
    ae_steps: int = 3000         # autoencoder steps of batch_size images, before the DiT trains
    ae_lr: float = 3e-3          # the autoencoder's AdamW learning rate
    hidden: int = 256            # transformer width D (paper: DiT-S 384, DiT-XL 1152)
    depth: int = 8               # DiT blocks (paper: DiT-S 12, DiT-XL 28)
    heads: int = 4               # attention heads (paper: DiT-S 6, DiT-XL 16)
    patch: int = 1               # patch size p of the 8 x 8 latent: (8/p)^2 tokens (paper: 2, 4 or 8 of 32 x 32)
    p_uncond: float = 0.1        # label dropout for classifier-free guidance (paper: 0.1)
    steps: int = 30000           # paper: 400k at batch 256 (7M for DiT-XL/2)
    batch_size: int = 128        # paper: 256
    lr: float = 3e-4             # AdamW, no weight decay, no warm-up (paper: 1e-4)
    ema: float = 0.9999          # EMA decay per step (paper: 0.9999)
    sample_steps: int = 250      # respaced ancestral steps of the 1000 (paper: 250)
    num_samples: int = 100
    guidance: float = 2.0        # classifier-free guidance scale on eps (paper: 1.5 for FID, 4.0 in sample.py)
    log_every: int = 100
    ckpt_every: int = 1000

PRESETS = {
    "gpu": Config(),
    "cpu": Config(ae_steps=1500, hidden=96, depth=4, heads=4, patch=2, batch_size=64, steps=8000, lr=1e-3, ema=0.999,
                  sample_steps=100, guidance=3.0),
    "tiny": Config(ae_ch=8, ae_steps=2, hidden=16, depth=1, heads=2, patch=2, batch_size=4, steps=2, sample_steps=2,
                   num_samples=10, log_every=1, ckpt_every=1),
}
ZERO_OK = ("p_uncond", "guidance", "ema")  # others must be > 0

# --- model ---
def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) times, as in DDPM / Transformer."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs                                     # (B, dim/2)
    return torch.cat([args.cos(), args.sin()], -1)                        # (B, dim)

def sincos_2d(dim, n):
    """Fixed 2-D sin-cos positions of an n x n grid, (n*n, dim): sin, cos of the column, then of the row (MAE)."""
    omega = 1 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    row, col = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return torch.cat([f(pos.flatten()[:, None] * omega) for pos in (col, row) for f in (torch.sin, torch.cos)], 1).float()

def patchify(x, p):
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)  # (B, C, H, W) -> (B, HW/p^2, p*p*C)

def unpatchify(x, p, h):
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, p=p, q=p)  # official 'nhwpqc->nchpwq'

def modulate(x, shift, scale):
    return x * (1 + scale) + shift

class DiTBlock(nn.Module):  # the paper's idea, adaLN-Zero (Sec. 3.2, Fig. 3): c regresses shift, scale and gate
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # no parameters: shared by both branches
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)  # qkv bias and init as official (timm)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):                                              # x (B, N, D), c (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, -1)   # each (B, 1, D)
        h = modulate(self.norm(x), shift1, scale1)
        x = x + gate1 * self.attn(h, h, h, need_weights=False)[0]
        return x + gate2 * self.mlp(modulate(self.norm(x), shift2, scale2))

class FinalLayer(nn.Module):  # LayerNorm, adaLN shift and scale (no gate), a linear decoder to p*p*C_out per token
    def __init__(self, dim, p, c_out):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada, self.linear = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim)), nn.Linear(dim, p * p * c_out)

    def forward(self, x, c):                                              # x (B, N, D), c (B, D)
        shift, scale = self.ada(c)[:, None].chunk(2, -1)
        return self.linear(modulate(self.norm(x), shift, scale))          # (B, N, p*p*C_out)

class DiT(nn.Module):  # class-conditional DiT (Fig. 3): latent (B, C, 8, 8) -> eps and v, (B, 2C, 8, 8); y = 10: no label
    def __init__(self, hidden=256, depth=8, heads=4, patch=1, p_uncond=0.1, size=8, channels=4, classes=10):
        super().__init__()
        self.patch, self.grid, self.p_uncond = patch, size // patch, p_uncond
        self.x_embed = nn.Linear(patch * patch * channels, hidden)       # = official PatchEmbed, Conv2d(kernel=stride=p)
        self.register_buffer("pos", sincos_2d(hidden, self.grid), persistent=False)   # fixed, not trained
        self.t_embed = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embed = nn.Embedding(classes + 1, hidden)                 # the extra row is the null label
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads) for _ in range(depth))
        self.final = FinalLayer(hidden, patch, 2 * channels)              # learned Sigma: eps and v per channel
        zero = [b.ada[-1] for b in self.blocks] + [self.final.ada[-1], self.final.linear]   # important: adaLN-Zero
        for m in (m for m in self.modules() if isinstance(m, nn.Linear)):  # official initialize_weights
            nn.init.zeros_(m.weight) if m in zero else nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        for w in (self.y_embed.weight, self.t_embed[0].weight, self.t_embed[2].weight):
            nn.init.normal_(w, std=0.02)

    def forward(self, x, t, y, force_drop=None):                          # x (B, C, 8, 8), t (B,), y (B,)
        if self.training or force_drop is not None:                       # label dropout (official LabelEmbedder)
            drop = torch.rand(len(y), device=y.device) < self.p_uncond if force_drop is None else force_drop == 1
            y = torch.where(drop, NULL, y)
        h = self.x_embed(patchify(x, self.patch)) + self.pos             # (B, N, D), N = (8/p)^2
        c = self.t_embed(timestep_embedding(t, 256)) + self.y_embed(y)    # (B, D)
        for block in self.blocks:
            h = block(h, c)                                               # (B, N, D)
        return unpatchify(self.final(h, c), self.patch, self.grid)       # (B, 2C, 8, 8), zero at init

class Autoencoder(nn.Module):  # stand-in for SD's VAE: (B, 1, 32, 32) <-> (B, z_ch, 8, 8); same as video/sora.py's, in 2-D
    def __init__(self, ch=32, z_ch=4):
        super().__init__()
        conv, act, up = (lambda a, b, s=1: nn.Conv2d(a, b, 3, s, 1)), nn.SiLU, (lambda a, b: nn.ConvTranspose2d(a, b, 4, 2, 1))
        self.enc = nn.Sequential(conv(1, ch // 2), act(), conv(ch // 2, ch, 2), act(), conv(ch, ch), act(),
                                 conv(ch, 2 * ch, 2), act(), conv(2 * ch, 2 * ch), act(), nn.Conv2d(2 * ch, z_ch, 1))
        self.dec = nn.Sequential(conv(z_ch, 2 * ch), act(), conv(2 * ch, 2 * ch), act(), up(2 * ch, ch), act(),
                                 conv(ch, ch), act(), up(ch, ch // 2), act(), conv(ch // 2, 1))
        self.register_buffer("scale", torch.ones(()))   # 1 / latent std: LDM's scale_by_std (arXiv 2112.10752v2); SD: 0.18215

    def encode(self, x):
        return self.enc(x) * self.scale

    def decode(self, z):
        return self.dec(z / self.scale)

# --- diffusion ---
NULL, T, LAMBDA = 10, 1000, 1e-3   # the 'no label' class; diffusion steps; weight of L_vlb (IDDPM Eq. 16)
BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)             # DDPM's linear schedule (paper)

def respace(betas, n):
    """n steps spaced as official space_timesteps; betas 1 - alpha_bar_k / alpha_bar_(previous kept) (respace.py)."""
    kept = torch.tensor([round(i) for i in accumulate([0.0] + [(len(betas) - 1) / (n - 1)] * (n - 1))])
    alpha_bar = torch.cumprod(1 - betas, 0)[kept]
    return kept, 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])

def schedule(betas, device=None):
    """What a chain of betas needs (DDPM Eqs. 4, 6, 7): computed in float64 as official, kept as (T, 1, 1, 1) float32."""
    alpha_bar = torch.cumprod(1 - betas, 0)
    alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    beta_tilde = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)            # posterior variance, DDPM Eq. 7
    s = dict(alpha_bar=alpha_bar, log_beta=betas.log(),
             log_beta_tilde=torch.cat([beta_tilde[1:2], beta_tilde[1:]]).log(),  # important: beta_tilde_0 = 0, clipped
             coef_x0=betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
             coef_xt=(1 - alpha_bar_prev) * (1 - betas).sqrt() / (1 - alpha_bar))
    return {k: v.float().view(-1, 1, 1, 1).to(device) for k, v in s.items()}

def q_sample(s, x0, t, eps):
    return s["alpha_bar"][t].sqrt() * x0 + (1 - s["alpha_bar"][t]).sqrt() * eps   # DDPM Eq. 4

def p_mean_var(s, out, xt, t):
    """p(x_{t-1} | x_t) from the output (eps, v): the posterior mean at x0_hat (DDPM Eqs. 7, 15) and the
    learned-range log variance f log beta_t + (1 - f) log beta_tilde_t, f = (v + 1)/2 (IDDPM Eq. 15, official)."""
    eps, v = out.chunk(2, 1)
    log_var = (v + 1) / 2 * s["log_beta"][t] + (1 - v) / 2 * s["log_beta_tilde"][t]
    x0 = (xt - (1 - s["alpha_bar"][t]).sqrt() * eps) / s["alpha_bar"][t].sqrt()   # DDPM Eq. 15; unclipped on latents (sample.py)
    return s["coef_x0"][t] * x0 + s["coef_xt"][t] * xt, log_var, x0

def vb_term(s, out, x0, xt, t):
    """L_t in bits per dim (IDDPM Sec. 2.1): KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the
    discretized Gaussian decoder NLL -log p(x_0 | x_1) on 8-bit bins of width 2/255 at t = 0 (DDPM Sec. 3.3)."""
    mean, log_var, _ = p_mean_var(s, out, xt, t)
    true_mean, true_log_var = s["coef_x0"][t] * x0 + s["coef_xt"][t] * xt, s["log_beta_tilde"][t]
    kl = 0.5 * (-1 + log_var - true_log_var + (true_log_var - log_var).exp() + (true_mean - mean) ** 2 * (-log_var).exp())
    hi, lo = (torch.special.ndtr((x0 - mean + d) * (-0.5 * log_var).exp()) for d in (1 / 255, -1 / 255))  # Gaussian cdf
    nll = -torch.where(x0 < -0.999, hi, torch.where(x0 > 0.999, 1 - lo, hi - lo)).clamp(min=1e-12).log()  # edge bins open
    return torch.where(t == 0, nll.mean((1, 2, 3)), kl.mean((1, 2, 3))) / math.log(2)   # (B,)

def dit_loss(net, s, x0, y):
    """Hybrid loss L_simple + lambda L_vlb (IDDPM Eq. 16) at one t: L_vlb = T E_t[L_t], lambda T = 1 (official MSE)."""
    t, eps = torch.randint(0, T, (len(x0),), device=x0.device), torch.randn_like(x0)
    xt = q_sample(s, x0, t, eps)
    eps_hat, v = net(xt, t, y).float().chunk(2, 1)                        # labels dropped inside (train mode)
    frozen = torch.cat([eps_hat.detach(), v], 1)                          # important: stop-gradient on the mean
    return ((eps - eps_hat) ** 2).mean((1, 2, 3)) + LAMBDA * T * vb_term(s, frozen, x0, xt, t)   # (B,)

def guided(net, x, t, y, w=1.0):
    """Classifier-free guidance eps_u + w (eps_c - eps_u) on eps only, v from the conditional half (see the docstring)."""
    if w == 1:
        return net(x, t, y).float()
    out_c, out_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)])).float().chunk(2)
    c = x.shape[1]                                                        # latent channels: eps is out[:, :c]
    return torch.cat([out_u[:, :c] + w * (out_c[:, :c] - out_u[:, :c]), out_c[:, c:]], 1)

@torch.no_grad()
def ddpm_sample(model, noise, n, frames=20, bar=False):
    """Ancestral sampling x_{t-1} = mu + exp(log_var / 2) z (DDPM Alg. 2) on n respaced steps; important: the model
    sees the original step indices (respace.py). Returns x0_hat of ~frames steps, then x_0."""
    kept, betas = respace(BETAS, n)
    s, x, traj = schedule(betas, noise.device), noise, []
    for i in tqdm(reversed(range(n)), total=n, desc="sample", leave=False, disable=not bar):
        t = torch.full((len(x),), i, device=x.device)
        mean, log_var, x0 = p_mean_var(s, model(x, kept.to(x.device)[t]), x, t)
        x = mean + (0.5 * log_var).exp() * torch.randn_like(x) if i > 0 else mean   # no noise at the last step
        if i % max(n // frames, 1) == 0:
            traj.append(x0)
    return torch.stack(traj + [x])                                        # (~frames + 1, B, C, 8, 8)

# --- train ---
def train_autoencoder(ae, x, cfg, device, out):
    """Trained before the diffusion model (paper: SD's VAE, trained elsewhere): MSE plus a small latent L2 on all but
    the last 5% of the images, then frozen, its latents scaled to unit std; the held-out MSE goes to the log."""
    opt, held = torch.optim.AdamW(ae.parameters(), lr=cfg.ae_lr, weight_decay=0.0), max(1, len(x) // 20)
    try:
        for _ in between_steps(tqdm(range(cfg.ae_steps), desc="autoencoder")):
            xb = x[torch.randint(len(x) - held, (cfg.batch_size,), device=device)]
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                z = ae.enc(xb)
                loss = F.mse_loss(ae.dec(z).float(), xb) + 1e-4 * z.float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(ae.parameters(), 1.0)                # important: without it some seeds stall early
            opt.step()
    except KeyboardInterrupt:                                             # before any checkpoint: nothing to resume
        print("interrupted while training the autoencoder: nothing saved yet", file=sys.stderr)
        sys.exit(130)
    ae.eval().requires_grad_(False)
    with torch.no_grad():
        ae.scale.fill_(1 / ae.enc(x[:2000]).std())
        mse = F.mse_loss(ae.decode(ae.encode(x[-held:][:1000])), x[-held:][:1000]).item()
    if not math.isfinite(mse):
        raise UserError(f"the autoencoder's loss became {mse}: try a lower --ae-lr")
    log(out / "log.txt", f"autoencoder: held-out reconstruction MSE {mse:.4f}, latent std 1/{ae.scale.item():.3f}")

def train(args, device, out, ckpt_path):
    torch.manual_seed(args.seed)
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: continue it with --resume, or pass another --out")
    state = load_ckpt(ckpt_path) if args.resume else None
    preset = args.preset or ("cpu" if device.type == "cpu" else "gpu")
    cfg = make_config(args, state["config"] if state else asdict(PRESETS[preset]), fixed=bool(state))
    x, y = (a.to(device) for a in mnist(args.data_dir))
    ae = Autoencoder(cfg.ae_ch, cfg.z_ch).to(device)
    net = DiT(cfg.hidden, cfg.depth, cfg.heads, cfg.patch, cfg.p_uncond, channels=cfg.z_ch).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    sched = schedule(BETAS, device)
    step = state["step"] if state else 0
    if state:
        for obj, key in ((net, "model"), (ema, "ema"), (opt, "opt"), (ae, "ae")):
            obj.load_state_dict(state[key])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
    fwd = torch.compile(net) if args.compile else net
    log(out / "log.txt", f"{NAME}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters (autoencoder "
                         f"{sum(p.numel() for p in ae.parameters()) / 1e6:.2f}M), {len(x)} training images, {device}, "
                         f"step {step}/{cfg.steps}, {cfg}")

    def save(done, write=True):  # a NaN/inf loss stops training before it can reach a checkpoint
        if not torch.isfinite(running):
            raise UserError(f"loss became {running.item()} before step {done}; stopped, the last good "
                            f"checkpoint is kept at {ckpt_path} (try a lower --lr)")
        if not write:
            return
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save({"script": NAME, "config": asdict(cfg), "model": net.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict(), "ae": ae.state_dict(), "step": done, "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None}, tmp)
        os.replace(tmp, ckpt_path)                                        # atomic: never a half-written file

    running, seen, clock, done = torch.zeros((), device=device), 0, time.time(), step
    if not state:                                                         # the autoencoder first, then in every checkpoint
        train_autoencoder(ae, x, cfg, device, out)
        save(0)
    with torch.no_grad():
        z = torch.cat([ae.encode(b) for b in x.split(1000)])             # (N, z_ch, 8, 8), the DiT's data
    net.train()
    clock = time.time()                                                   # images/s of the DiT alone
    try:
        for done in between_steps(tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train")):
            idx = torch.randint(len(x), (cfg.batch_size,), device=device)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = dit_loss(fwd, sched, z[idx], y[idx])               # (B,)
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()                                        # mean over pixels and batch, as official
            opt.step()
            decay = min(cfg.ema, (1 + done) / (10 + done))                # EMA with a warm-up (paper: 0.9999)
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
    state = load_ckpt(ckpt_path)
    cfg = make_config(args, state["config"])
    net = DiT(cfg.hidden, cfg.depth, cfg.heads, cfg.patch, channels=cfg.z_ch).to(device).eval()
    ae = Autoencoder(cfg.ae_ch, cfg.z_ch).to(device).eval()
    for module, key in ((net, "ema"), (ae, "ae")):
        module.load_state_dict(state[key])
    y = torch.arange(cfg.num_samples, device=device) % 10                # column k of the grid is digit k
    noise = torch.randn(len(y), cfg.z_ch, 8, 8, generator=torch.Generator().manual_seed(args.seed)).to(device)
    torch.manual_seed(args.seed)                                          # the noise of each step
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        z = ddpm_sample(lambda x, t: guided(net, x, t, y, cfg.guidance), noise, cfg.sample_steps, bar=True)
        with torch.no_grad():
            traj = ae.decode(z.flatten(0, 1)).float().clamp(-1, 1).unflatten(0, z.shape[:2])   # (K, B, 1, 32, 32)
    save_png(out / "samples.png", traj[-1])
    save_gif(out / "samples.gif", traj)                                   # x0_hat every ~n/20 steps, then x_0
    save_npz(out / "samples.npz", images=traj[-1], labels=y)
    print(f"wrote {out}/samples.png, samples.gif, samples.npz: {len(y)} samples (step {state['step']}), "
          f"{cfg.sample_steps} respaced steps ({cfg.sample_steps * (1 + (cfg.guidance != 1))} NFE), guidance {cfg.guidance}")

# --- cli ---
HELP = dict(re.findall(r"^    (\w+): \w+ = [^#\n]*# (.*)$", Path(__file__).read_text(), re.M))  # Config's comments

def make_config(args, base, fixed=True):
    """A checkpoint's (fixed=True) or preset's config, overridden by the flags on the command line."""
    if unknown := set(base) - {f.name for f in fields(Config)}:
        raise UserError(f"the checkpoint comes from another version of {NAME}.py: unknown config {sorted(unknown)}")
    if fixed and "z_ch" not in base:                                      # before 2026-12-07 dit.py ran in pixel space
        raise UserError(f"the checkpoint comes from an older, pixel-space {NAME}.py: train a new one")
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    for key in ("ae_ch", "z_ch", "hidden", "depth", "heads", "patch"):
        if fixed and key in given and given[key] != base[key]:
            raise UserError(f"--{key} {given[key]} does not match the checkpoint's {base[key]}")
    cfg = replace(Config(**base), **given)
    if 8 % cfg.patch or cfg.hidden % 4 or cfg.hidden % cfg.heads or not 2 <= cfg.sample_steps <= T or cfg.ae_ch % 2:
        raise UserError(f"need --patch dividing 8, --hidden divisible by 4 and --heads, 2 <= --sample-steps <= {T}, "
                        "an even --ae-ch")
    return cfg

def pick_device(name):
    ok = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = name or next(d for d in ok if ok[d])
    if not ok.get(name.split(":")[0]):
        raise UserError(f"--device {name}: not available here (cuda, mps or cpu)")
    return torch.device(name)

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
    p.add_argument("--preset", choices=PRESETS, help="sizes for a GPU, a CPU or tests (default: cpu on a CPU, else gpu)")
    for f in fields(Config):
        p.add_argument(f"--{f.name.replace('_', '-')}", metavar="N", type=number(f.type, f.name in ZERO_OK),
                       help=f"{HELP.get(f.name, '')} [gpu {getattr(PRESETS['gpu'], f.name)}, cpu {getattr(PRESETS['cpu'], f.name)}]")
    p.add_argument("--device", help="cuda, mps or cpu (default: cuda, else mps, else cpu)")
    p.add_argument("--out", help=f"output folder (default: runs/{NAME})")
    p.add_argument("--data-dir", help="folder holding MNIST/raw/ (default: $XDIFFUSION_DATA, else ./data)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue training from the checkpoint")
    p.add_argument("--ckpt", help="checkpoint to write, resume and sample (default: OUT/ckpt.pt)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    args = p.parse_args(argv)
    if not (args.train or args.sample):
        return p.print_help()
    try:
        device = pick_device(args.device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        out = Path(args.out or f"runs/{NAME}")
        ckpt_path = Path(args.ckpt) if args.ckpt else out / "ckpt.pt"
        out.mkdir(parents=True, exist_ok=True)
        if args.train:
            train(args, device, out, ckpt_path)
        if args.sample:
            sample(args, device, out, ckpt_path)
    except (UserError, OSError, KeyboardInterrupt) as e:                  # OSError: e.g. --out is a file, the disk full
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else f"error: {e}")   # Ctrl-C outside the training steps: 130

if __name__ == "__main__":
    main()
