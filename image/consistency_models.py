"""Consistency Models: "Consistency Models"
Yang Song, Prafulla Dhariwal, Mark Chen, Ilya Sutskever, 2023. https://arxiv.org/abs/2303.01469v2, with iCT:
"Improved Techniques for Training Consistency Models", Song & Dhariwal 2023, https://arxiv.org/abs/2310.14189v1.
Official code: github.com/openai/consistency_models (cm/karras_diffusion.py, cm/script_util.py, scripts/).

The idea: each trajectory of a diffusion model's probability-flow ODE (EDM's dx/dt = (x - D(x; t))/t) ends
on a data point; a consistency function f(x_t, t) returns that end from any point of it (Sec. 3), so one
network call turns noise into a sample. f = c_skip(t) x + c_out(t) F(x, t) with c_skip(eps) = 1 and
c_out(eps) = 0 makes f(x, eps) = x exact (Eq. 5). Training makes f agree on adjacent points t_n < t_{n+1}
of a discretised trajectory against a target network theta^- (an EMA of theta, decay mu): the earlier point
comes from one Heun step of a teacher (distillation, CD, Alg. 2) or, with no teacher, from the same data and
noise (training, CT, Alg. 3), with N growing and mu -> 1 during training (App. C).

Time convention (EDM's): time is the noise level t in [eps, T] = [0.002, 80], x_t = x + t z, from T z to data.

Deviations from the paper:
- d is squared L2 (in the paper too) or iCT's pseudo-Huber, not LPIPS (the paper's best): it needs VGG weights.
- Class-conditional (the paper's ImageNet setting) with classifier-free guidance (not in the paper): CD's teacher
  is guided (--teacher-guidance); CT drops labels (--p-uncond) and samples f_u + w (f_c - f_u) (--guidance).
- The U-Net of image/edm.py (paper: NCSN++/ADM) and its c_noise = ln(t)/4 (official: 250 ln t, its teacher's),
  so CD starts from the teacher's weights as official. K = 1.5-20k steps at batch 64-128 (paper: 800k, 512).
- iCT (--ict 1) from its paper (no official code): mu = 0, pseudo-Huber, lambda = 1/(t_{n+1} - t_n),
  log-normal index sampling, N doubling from 10 to 1280. The CPU preset sets K' = 1000 (--k-prime) and stops at
  2000 steps (N = 21): the paper's K' = K/8 sends a short run to N = 1281 before the model can follow (measured).

Usage:
  python image/consistency_models.py --train --sample --data-dir ../shared/data     # CT (--ict 1: iCT)
  python image/consistency_models.py --train --sample --distill runs/edm/ckpt.pt --out runs/cd   # CD
  python image/consistency_models.py --sample --sample-steps 2 --out runs/cd         # 2-step sampling
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

NAME = "consistency_models"

# --- config ---
@dataclass
class Config:
    ch: int = 64                 # U-Net base channels (paper: NCSN++ with 128)
    blocks: int = 2              # residual blocks per resolution (paper: 4)
    dropout: float = 0.0         # paper: 0 (CIFAR-10); iCT: 0.3
    steps: int = 20000           # K training steps (paper: 800k)
    batch_size: int = 128        # paper: 512
    lr: float = 4e-4             # RAdam (paper: 4e-4 CD, 2e-4 CT on CIFAR-10; iCT 1e-4)
    ema_decay: float = 0.999     # EMA for evaluation, not theta^- (paper: 0.9999)
    s0: int = 2                  # CT: N(0) (paper: 2)
    s1: int = 150                # CT: N(K) - 1 (paper: 150 on CIFAR-10)
    mu0: float = 0.9             # CT: target EMA decay mu at k = 0 (paper: 0.9)
    teacher_guidance: float = 2.0  # CD: classifier-free guidance scale of the teacher (paper: none)
    ict: int = 0                 # 1: iCT's loss, weighting, index sampling and curriculum
    k_prime: int = 0             # iCT: steps between doublings of N (0: the paper's K' = K / (log2(s1 / s0) + 1))
    p_uncond: float = 0.0        # CT: label dropout, to train the unconditional f_u for --guidance (paper: 0)
    guidance: float = 1.0        # sampling: f_u + w (f_c - f_u); 1: f_c alone (paper: 1)
    sample_steps: int = 1        # network calls at sampling (paper: 1 and 2)
    last_sigma: float = 0.821    # multistep: the smallest tau (iCT's 2-step choice on CIFAR-10)
    num_samples: int = 100
    log_every: int = 100
    ckpt_every: int = 1000

PRESETS = {
    "gpu": Config(),
    "cpu": Config(ch=16, blocks=1, batch_size=64, steps=2000, lr=1e-3, ema_decay=0.995, s1=60, ict=1, k_prime=1000,
                  p_uncond=0.1, guidance=2.0),
    "tiny": Config(ch=8, blocks=1, batch_size=4, steps=2, sample_steps=2, num_samples=10, log_every=1, ckpt_every=1),
}
ZERO_OK = ("dropout", "ict", "k_prime", "teacher_guidance", "p_uncond")  # others must be > 0

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

class UNet(nn.Module):  # same as image/edm.py: the CD teacher loads into it
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
NULL, SIGMA_DATA, EPS, T, RHO = 10, 0.5, 0.002, 80.0, 7.0   # 'no label' class (CFG); App. C (EDM's values)
CD_N, CD_MU = 18, 0.0                              # CD: N and mu (App. C, CIFAR-10: mu = 0, theta^- = theta)
ICT_S0, ICT_S1, ICT_P_MEAN, ICT_P_STD = 10, 1280, -1.1, 2.0   # iCT Sec. 3.3-3.5

def precond(t, eps=EPS):
    """c_skip, c_out, c_in, c_noise of App. C: c_skip(eps) = 1, c_out(eps) = 0, so f(x, eps) = x (Eq. 5).
    With eps = 0 they are EDM's (Table 1): the teacher's D(x; sigma) of image/edm.py."""
    c_skip = SIGMA_DATA ** 2 / ((t - eps) ** 2 + SIGMA_DATA ** 2)
    c_out = SIGMA_DATA * (t - eps) / (SIGMA_DATA ** 2 + t ** 2).sqrt()
    return c_skip, c_out, 1 / (SIGMA_DATA ** 2 + t ** 2).sqrt(), t.log() / 4

def denoise(net, x, t, y, w=1.0, eps=EPS):
    """f_theta(x, t) = c_skip x + c_out F(c_in x; c_noise) (Eq. 5), or the teacher's D with eps = 0 and guidance
    F_u + w (F_c - F_u) (w = 1: conditional only; y = NULL: unconditional)."""
    t = t.to(x.dtype).reshape(-1, 1, 1, 1).expand(len(x), 1, 1, 1)     # (B, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = precond(t, eps)
    if w == 1:
        return c_skip * x + c_out * net(c_in * x, c_noise.flatten(), y).to(x.dtype)
    f_c, f_u = net(torch.cat([c_in * x] * 2), torch.cat([c_noise.flatten()] * 2),
                   torch.cat([y, torch.full_like(y, NULL)])).to(x.dtype).chunk(2)
    return c_skip * x + c_out * (f_u + w * (f_c - f_u))

def karras(n, lo=EPS, hi=T):
    """t_i = (eps^(1/rho) + (i-1)/(N-1) (T^(1/rho) - eps^(1/rho)))^rho, i = 1..N: t_1 = eps, t_N = T (App. C)."""
    i = torch.arange(n, dtype=torch.float64)
    return (lo ** (1 / RHO) + i / max(n - 1, 1) * (hi ** (1 / RHO) - lo ** (1 / RHO))) ** RHO

def schedule(k, cfg, distill):
    """N(k) and the target decay mu(k) at step k (App. C, official create_ema_and_scales_fn)."""
    if distill:
        return CD_N, CD_MU
    if cfg.ict:  # iCT Sec. 3.4: N doubles every K' steps from s0 = 10 to s1 = 1280; Sec. 3.2: mu = 0
        k_prime = cfg.k_prime or math.floor(cfg.steps / (math.log2(ICT_S1 // ICT_S0) + 1))
        return min(ICT_S0 * 2 ** (k // max(k_prime, 1)), ICT_S1) + 1, 0.0
    n = max(math.ceil(math.sqrt(k / cfg.steps * ((cfg.s1 + 1) ** 2 - cfg.s0 ** 2) + cfg.s0 ** 2) - 1), 1)
    return n + 1, math.exp(cfg.s0 * math.log(cfg.mu0) / n)   # important: official N(k) - 1 in mu(k), not N(k)

def distance(diff, ict):  # d per image, diff (B, D): squared L2 (mean), or iCT's pseudo-Huber (Sec. 3.3)
    return ((diff.pow(2).sum(1) + (c := 0.00054 * diff.shape[1] ** 0.5) ** 2).sqrt() - c) if ict else diff.pow(2).mean(1)

def heun_step(D, x, t, t_next):
    """One Heun step of the teacher's PF ODE dx/dt = (x - D(x; t))/t from t to t_next (Alg. 2, EDM Alg. 1)."""
    d = (x - D(x, t)) / t
    x_euler = x + (t_next - t) * d
    return x + (t_next - t) * (d + (x_euler - D(x_euler, t_next)) / t_next) / 2

def cm_loss(net, target, x, labels, n, cfg, teacher=None):
    """lambda(t_n) d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta^-(x_hat_{t_n}, t_n)) per image, N steps (Alg. 2, 3)."""
    t, ict = karras(n).to(x.device, x.dtype), cfg.ict and teacher is None   # (N,) t_1 = eps ... t_N = T; iCT: CT only
    cdf = torch.erf((t.log() - ICT_P_MEAN) / (math.sqrt(2) * ICT_P_STD))   # iCT Sec. 3.5: p(i) ~ cdf_{i+1} - cdf_i
    p = cdf[1:] - cdf[:-1] if ict else torch.ones_like(t[1:])   # CT, CD: n ~ U{1..N-1}
    idx = torch.multinomial(p, len(x), replacement=True)                 # (B,) pairs (t_n, t_{n+1})
    t_n, t_n1 = t[idx].view(-1, 1, 1, 1), t[idx + 1].view(-1, 1, 1, 1)
    z = torch.randn_like(x)
    x_n1 = x + t_n1 * z                                                   # x_{t_{n+1}}
    with torch.no_grad():
        if teacher is None:
            x_n = x + t_n * z                                             # CT: the same z (Alg. 3)
        else:                                                             # CD: one teacher Heun step (Alg. 2)
            x_n = heun_step(lambda v, s: denoise(teacher, v, s, labels, cfg.teacher_guidance, 0), x_n1, t_n1, t_n)
        with torch.random.fork_rng([] if x.is_cpu else None, device_type=x.device.type):  # the same dropout
            f_target = denoise(target, x_n, t_n, labels)
    d = distance((denoise(net, x_n1, t_n1, labels) - f_target).flatten(1), ict)   # (B,)
    return d / (t_n1 - t_n).flatten() if ict else d                  # lambda = 1/(t_{n+1} - t_n) (iCT), or 1

@torch.no_grad()
def multistep(f, z, taus):
    """Alg. 1: x = f(T z, T), then x = f(x + sqrt(tau^2 - eps^2) z', tau) for each tau. Returns z and each x."""
    xs = [z, f(z * taus[0], taus[0])]
    for tau in taus[1:]:
        xs.append(f(xs[-1] + (tau ** 2 - EPS ** 2).sqrt() * torch.randn_like(z), tau))
    return torch.stack(xs)

# --- train ---
def train(args, device, out, ckpt_path):
    torch.manual_seed(args.seed)
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: continue it with --resume, or pass another --out")
    state = load_ckpt(ckpt_path) if args.resume else None
    base = state["config"] if state else asdict(PRESETS[args.preset or ("cpu" if device.type == "cpu" else "gpu")])
    teacher = teacher_path = args.distill or (state or {}).get("teacher")
    if teacher:  # CD: the EMA network of an image/edm.py checkpoint (its file, not its code), frozen
        t_state = load_ckpt(teacher_path, "edm")
        teacher = UNet(t_state["config"]["ch"], t_state["config"]["blocks"]).to(device, memory_format=torch.channels_last)
        teacher.eval().requires_grad_(False).load_state_dict(t_state["ema"])
        base = {**base, **{k: t_state["config"][k] for k in ("ch", "blocks")}, "p_uncond": 0.0, "guidance": 1.0}  # guided already
    cfg = make_config(args, base, fixed=bool(state or teacher))
    x, y = (a.to(device) for a in mnist(args.data_dir))
    net = UNet(cfg.ch, cfg.blocks, cfg.dropout).to(device, memory_format=torch.channels_last)  # NHWC: faster convolutions
    if teacher:
        net.load_state_dict(teacher.state_dict())                         # CD starts from the teacher (official)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    target = copy.deepcopy(net).requires_grad_(False)                     # theta^-, in train mode as official
    opt = torch.optim.RAdam(net.parameters(), lr=cfg.lr)
    step = state["step"] if state else 0
    if state:
        for obj, key in ((net, "model"), (ema, "ema"), (target, "target"), (opt, "opt")):
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
                    "opt": opt.state_dict(), "target": target.state_dict(), "teacher": teacher_path and str(teacher_path),
                    "step": done, "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None}, tmp)
        os.replace(tmp, ckpt_path)                                        # atomic: never a half-written file

    net.train()
    running, seen, clock, done = torch.zeros((), device=device), 0, time.time(), step
    try:
        for done in between_steps(tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train")):
            idx = torch.randint(len(x), (cfg.batch_size,), device=device)
            n, mu = schedule(done, cfg, teacher is not None)
            labels = torch.where(torch.rand(len(idx), device=device) < cfg.p_uncond, NULL, y[idx])   # CFG dropout
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = cm_loss(fwd, target, x[idx], labels, n, cfg, teacher)   # (B,)
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()
            opt.step()
            torch._foreach_lerp_(list(target.parameters()), list(net.parameters()), 1 - mu)   # theta^- (Alg. 3)
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - cfg.ema_decay)
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
def load_ckpt(path, script=NAME):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train one first with --train (or pass --ckpt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): it may be truncated") from None
    if (who := state.get("script") if isinstance(state, dict) else None) != script:
        raise UserError(f"{path} is a checkpoint of {who or 'another program'}, not of {script}.py")
    return state

def sample(args, device, out, ckpt_path):
    state = load_ckpt(ckpt_path)
    cfg = make_config(args, state["config"])
    net = UNet(cfg.ch, cfg.blocks).to(device, memory_format=torch.channels_last).eval()
    net.load_state_dict(state["ema"])
    y = torch.arange(cfg.num_samples, device=device) % 10                # column k of the grid is digit k
    z = torch.randn(len(y), 1, 32, 32, generator=torch.Generator().manual_seed(args.seed)).to(device)
    taus = karras(n := cfg.sample_steps, cfg.last_sigma if n > 1 else T, T).flip(0).to(device, torch.float32)  # T > ... > last
    torch.manual_seed(args.seed)                                          # the multistep noise
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        xs = multistep(lambda x, t: denoise(net, x, t, y, cfg.guidance), z, taus)
    save_png(out / "samples.png", xs[-1])
    save_gif(out / "samples.gif", xs)                                     # z, then f(.) after each call
    save_npz(out / "samples.npz", images=xs[-1], labels=y)
    print(f"wrote {out}/samples.png, samples.gif, samples.npz: {len(y)} samples (step {state['step']}, "
          f"{'CD' if state.get('teacher') else 'CT'}), network calls at t = {[round(t, 3) for t in taus.tolist()]}")

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
    p.add_argument("--distill", metavar="EDM_CKPT", help="consistency distillation of an image/edm.py checkpoint")
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
