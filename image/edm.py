"""EDM: "Elucidating the Design Space of Diffusion-Based Generative Models"
Tero Karras, Miika Aittala, Timo Aila, Samuli Laine, 2022. https://arxiv.org/abs/2206.00364v2
Official code: github.com/NVlabs/edm (training/{networks,loss,training_loop}.py, generate.py).

The idea: pick each design choice of a diffusion model on its own. A denoiser D(x; sigma) returns
the data y from x = y + n, n ~ N(0, sigma^2 I) (Eq. 2), as D = c_skip x + c_out F(c_in x; c_noise)
(Eq. 7, Table 1) so that F's input and target have unit variance at every sigma; the loss weight
lambda = 1/c_out^2 weighs all sigma alike, and sigma is log-normal (Sec. 5). Sampling solves
dx/dsigma = (x - D(x; sigma))/sigma with Heun's method on steps spaced by rho = 7 (Eq. 5, Alg. 1),
optionally with fresh noise at each step ("churn", Alg. 2): 18 steps, 35 network calls.

Time convention (as the paper): time is the noise level t = sigma, from x_0 = 80 n at t_0 = 80 to
data at t_N = 0.

Deviations from the paper:
- Classifier-free guidance (arXiv 2207.12598v1) on top of the paper's class-conditional setting (a
  label embedding): label dropout, --guidance (1 = the paper's sampler; one batched call, NFE 2N-1).
- A small DDPM-style U-Net instead of DDPM++ (56M parameters), c_noise through a sinusoidal embedding
  as official; 1.3 Mimg at batch 128 (paper: 200 Mimg, 512), lr warm-up and EMA half-life scaled down.
- No augmentation pipe (paper: p = 0.12 on CIFAR-10): short runs do not overfit.
- bf16 autocast on CUDA (paper: fp32 on CIFAR-10); the sampler runs in float32 on MPS (no float64).
- samples.gif shows D(x_hat_i; t_hat_i) of each step, then x_N (x_i is noise far outside [-1, 1]).

Usage:
  python image/edm.py --train --sample --data-dir ../shared/data
  python image/edm.py --sample --sample-steps 40                           # sample again: 79 NFE
  python image/edm.py --sample --s-churn 30 --s-min 0.01 --s-max 1 --s-noise 1.007   # Alg. 2
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

import torch
import torch.nn as nn
from einops import rearrange
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared import UserError, between_steps, log, mnist, save_gif, save_npz, save_png  # noqa: E402

NAME = "edm"

# --- config ---
@dataclass
class Config:
    ch: int = 64                 # U-Net base channels (paper: DDPM++ with 128)
    blocks: int = 2              # residual blocks per resolution (paper: 4)
    dropout: float = 0.13        # paper: 0.13 (CIFAR-10)
    p_uncond: float = 0.1        # label dropout for classifier-free guidance (paper: no guidance)
    steps: int = 10000           # paper: 200 Mimg at batch 512, 390k steps (CIFAR-10)
    batch_size: int = 128        # paper: 512
    lr: float = 1e-3             # paper: 1e-3, for the loss summed over pixels (kept)
    lr_rampup: int = 100000      # linear lr warm-up, in images (paper: 10M)
    ema_halflife: int = 50000    # EMA half-life in images (paper: 500k)
    ema_rampup: float = 0.05     # the half-life is at most ema_rampup x images seen (paper: 0.05)
    sample_steps: int = 18       # Heun steps N, 2N - 1 network evaluations (paper: 18 for CIFAR-10)
    num_samples: int = 100
    guidance: float = 1.5        # classifier-free guidance scale w (1 = conditional, no guidance)
    s_churn: float = 0.0         # Alg. 2 churn (paper: 0, deterministic, for CIFAR-10; Table 5: 30)
    s_min: float = 0.0           # churn only where s_min <= t_i <= s_max (Table 5: 0.01)
    s_max: float = math.inf      # Table 5: 1
    s_noise: float = 1.0         # Table 5: 1.007
    log_every: int = 100
    ckpt_every: int = 1000

PRESETS = {
    "gpu": Config(),
    "cpu": Config(ch=16, blocks=1, dropout=0.0, batch_size=64, steps=2000, lr_rampup=10000, ema_halflife=10000, guidance=2.5),
    "tiny": Config(ch=8, blocks=1, batch_size=4, steps=2, sample_steps=2, num_samples=10, log_every=1, ckpt_every=1),
}
ZERO_OK = ("dropout", "p_uncond", "guidance", "lr_rampup", "s_churn", "s_min")  # others must be > 0

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
    """Class-conditional U-Net F(x, c_noise, y): 32 -> 16 -> 8 with attention at 8x8; y = 10 is 'no label'."""

    def __init__(self, ch=64, blocks=2, dropout=0.1, mult=(1, 2, 2), classes=10):
        super().__init__()
        self.ch, emb = ch, 4 * ch
        self.time = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(classes + 1, emb)
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

    def forward(self, x, t, y):                                           # x (B, 1, 32, 32), t (B,), y (B,)
        e = self.time(timestep_embedding(t, self.ch)) + self.label(y)     # t = c_noise = ln(sigma)/4, as official
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
NULL = 10  # the 'no label' class of classifier-free guidance
SIGMA_DATA, P_MEAN, P_STD = 0.5, -1.2, 1.2    # Table 1; kept for MNIST (its std is 0.57 in [-1, 1])
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # Table 1, Eq. 5

def precond(sigma):
    """c_skip, c_out, c_in, c_noise of Table 1: F's input and target have unit variance at every sigma (Sec. 5)."""
    c_skip = SIGMA_DATA ** 2 / (sigma ** 2 + SIGMA_DATA ** 2)
    c_out = sigma * SIGMA_DATA / (sigma ** 2 + SIGMA_DATA ** 2).sqrt()
    c_in = 1 / (SIGMA_DATA ** 2 + sigma ** 2).sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4

def loss_weight(sigma):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2 (Table 1)."""
    return (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2

def denoise(net, x, sigma, y, w=1.0):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Eq. 7), in float32 as official EDMPrecond.
    Classifier-free guidance D_u + w (D_c - D_u) = c_skip x + c_out (F_u + w (F_c - F_u)); w = 1 is D_c."""
    x, sigma = x.float(), sigma.float().reshape(-1, 1, 1, 1).expand(len(x), 1, 1, 1)   # sigma (B, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = precond(sigma)
    if w == 1:
        return c_skip * x + c_out * net(c_in * x, c_noise.flatten(), y).float()
    f_c, f_u = net(torch.cat([c_in * x] * 2), torch.cat([c_noise.flatten()] * 2),
                   torch.cat([y, torch.full_like(y, NULL)])).float().chunk(2)
    return c_skip * x + c_out * (f_u + w * (f_c - f_u))

def edm_loss(net, y, labels, cfg):
    """lambda(sigma) (D(y + n; sigma) - y)^2 per pixel, ln sigma ~ N(P_mean, P_std^2) (Eq. 8, Table 1, EDMLoss)."""
    sigma = (torch.randn(len(y), 1, 1, 1, device=y.device) * P_STD + P_MEAN).exp()     # ln sigma ~ N(P_mean, P_std^2)
    labels = torch.where(torch.rand(len(labels), device=y.device) < cfg.p_uncond, NULL, labels)  # CFG dropout
    n = torch.randn_like(y) * sigma
    return loss_weight(sigma) * (denoise(net, y + n, sigma, labels) - y) ** 2          # (B, 1, 32, 32)

def edm_sigmas(n):
    """t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < N; t_N = 0 (Eq. 5)."""
    i = torch.arange(n, dtype=torch.float64)
    t = (SIGMA_MAX ** (1 / RHO) + i / max(n - 1, 1) * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])                         # (N + 1,)

@torch.no_grad()
def heun(D, noise, n, s_churn=0.0, s_min=0.0, s_max=math.inf, s_noise=1.0, bar=False):
    """Alg. 2 (Alg. 1 if s_churn = 0) for any denoiser D(x, sigma), as official edm_sampler: N steps, 2N - 1
    calls of D, in noise's dtype. Returns D(x_hat_i; t_hat_i) of steps i < N, then x_N: (N + 1, B, ...)."""
    t = edm_sigmas(n).to(noise.device, noise.dtype)
    x, frames = noise * t[0], []                                          # x_0 = n t_0
    for i in tqdm(range(n), desc="sample", leave=False, disable=not bar):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= t[i] <= s_max else 0.0
        t_hat = t[i] * (1 + gamma)                                        # churn: raise the noise level
        x_hat = x + (t_hat ** 2 - t[i] ** 2).sqrt() * s_noise * torch.randn_like(x) if gamma > 0 else x
        denoised = D(x_hat, t_hat).to(x.dtype)
        frames.append(denoised)
        d = (x_hat - denoised) / t_hat                                    # dx/dt = (x - D(x; t)) / t
        x = x_hat + (t[i + 1] - t_hat) * d                                # Euler step
        if i < n - 1:                                                     # important: no correction to t_N = 0
            d_prime = (x - D(x, t[i + 1]).to(x.dtype)) / t[i + 1]
            x = x_hat + (t[i + 1] - t_hat) * (d + d_prime) / 2            # Heun: the trapezoidal rule
    return torch.stack(frames + [x])

# --- train ---
def ema_beta(cfg, nimg):
    """EMA decay per step from a half-life in images, at most ema_rampup x nimg early on (official)."""
    return 0.5 ** (cfg.batch_size / max(min(cfg.ema_halflife, nimg * cfg.ema_rampup), 1e-8))

def train(args, device, out, ckpt_path):
    torch.manual_seed(args.seed)
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: continue it with --resume, or pass another --out")
    state = load_ckpt(ckpt_path) if args.resume else None
    preset = args.preset or ("cpu" if device.type == "cpu" else "gpu")
    cfg = make_config(args, state["config"] if state else asdict(PRESETS[preset]), fixed=bool(state))
    x, y = (a.to(device) for a in mnist(args.data_dir))
    net = UNet(cfg.ch, cfg.blocks, cfg.dropout).to(device, memory_format=torch.channels_last)  # NHWC: faster convolutions
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
            nimg = done * cfg.batch_size                                  # images seen before this step
            idx = torch.randint(len(x), (cfg.batch_size,), device=device)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = edm_loss(fwd, x[idx], y[idx], cfg)                 # (B, 1, 32, 32)
            opt.zero_grad(set_to_none=True)
            (loss.sum() / cfg.batch_size).backward()                      # important: sum over pixels, as official
            for g in opt.param_groups:                                    # linear lr warm-up in images (official)
                g["lr"] = cfg.lr * min(nimg / max(cfg.lr_rampup, 1e-8), 1)
            for p in net.parameters():                                    # official: no clipping, finite grads
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            opt.step()
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - ema_beta(cfg, nimg))
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
    net = UNet(cfg.ch, cfg.blocks).to(device, memory_format=torch.channels_last).eval()
    net.load_state_dict(state["ema"])
    y = torch.arange(cfg.num_samples, device=device) % 10                # column k of the grid is digit k
    noise = torch.randn(len(y), 1, 32, 32, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    noise = noise.to(torch.float32 if device.type == "mps" else torch.float64).to(device)   # MPS has no float64
    torch.manual_seed(args.seed)                                          # the churn noise, if any
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        traj = heun(lambda x, sigma: denoise(net, x, sigma, y, cfg.guidance), noise, cfg.sample_steps,
                    cfg.s_churn, cfg.s_min, cfg.s_max, cfg.s_noise, bar=True)
    save_png(out / "samples.png", traj[-1])
    save_gif(out / "samples.gif", traj)                                   # D(x_hat_i; t_hat_i), then x_N
    save_npz(out / "samples.npz", images=traj[-1], labels=y)
    print(f"wrote {out}/samples.png, samples.gif, samples.npz: {len(y)} samples (step {state['step']}), "
          f"{cfg.sample_steps} Heun steps ({2 * cfg.sample_steps - 1} NFE), guidance {cfg.guidance}, S_churn {cfg.s_churn}")

# --- cli ---
HELP = dict(re.findall(r"^    (\w+): \w+ = [^#\n]*# (.*)$", Path(__file__).read_text(), re.M))  # Config's comments

def make_config(args, base, fixed=True):
    """A checkpoint's (fixed=True) or preset's config, overridden by the flags on the command line."""
    if unknown := set(base) - {f.name for f in fields(Config)}:
        raise UserError(f"the checkpoint comes from another version of {NAME}.py: unknown config {sorted(unknown)}")
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    for key in ("ch", "blocks"):
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
