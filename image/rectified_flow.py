"""Rectified Flow: "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow"
Xingchao Liu, Chengyue Gong, Qiang Liu, 2022. https://arxiv.org/abs/2209.03003v1
Official code: github.com/gnobitab/RectifiedFlow (ImageGeneration/).

The idea: learn an ODE dZ_t = v(Z_t, t) dt that carries noise X0 to data X1 by regressing v on the
velocity X1 - X0 of the straight line between independently drawn pairs (Eq. 1). Where straight
lines cross, v averages them, so the learned paths bend and an Euler solver needs many steps.
Reflow (Sec. 2, Alg. 1) re-pairs every noise Z0 with the sample Z1 the flow sends it to and trains a new
flow on those pairs: lines between such pairs no longer cross, the 2-rectified flow is nearly
straight, and one or two Euler steps give good samples.

Time convention (as the official code): t=0 is noise X0 ~ N(0, I), t=1 is data X1,
X_t = t X1 + (1 - t) X0, and the sampler integrates from t=eps to t=1.

Deviations from the paper:
- Class-conditional with classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598v1); the
  paper's image flows are unconditional. Reflow pairs are drawn with guidance, so the 2-rectified
  flow learns the guided flow: it is trained without label dropout and samples with guidance 1.
- A small DDPM-style U-Net instead of DDPM++ (NCSN++, 62M parameters); EMA decay 0.999 with a
  warm-up instead of 0.999999; no learning-rate warm-up; AdamW with zero weight decay (= Adam).
- Euler only (the paper also uses scipy's RK45, not a dependency here).
- Reflow uses 10k-50k pairs from the Euler solver (paper: 4M pairs for CIFAR-10, from RK45).
- Distillation (--distill, k=1) uses L2 instead of LPIPS, which needs pretrained VGG weights.

Usage:
  python image/rectified_flow.py --train --sample --data-dir ../shared/data     # 1-rectified flow
  python image/rectified_flow.py --sample --sample-steps 2                       # sample it again
  python image/rectified_flow.py --reflow runs/rectified_flow/ckpt.pt --train --sample   # 2-RF
  python image/rectified_flow.py --reflow runs/rectified_flow_reflow/ckpt.pt --distill \\
      --out runs/rectified_flow_distill --train --sample --sample-steps 1       # one-step model
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
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared import UserError, between_steps, log, mnist, save_gif, save_npz, save_png  # noqa: E402

NAME = "rectified_flow"

# --- config ---
@dataclass
class Config:
    ch: int = 64                 # U-Net base channels (paper: DDPM++ with 128)
    blocks: int = 2              # residual blocks per resolution (paper: 4)
    dropout: float = 0.1         # paper: 0.15
    p_uncond: float = 0.1        # label dropout for classifier-free guidance (paper: unconditional)
    steps: int = 10000           # paper: 800k (CIFAR-10)
    batch_size: int = 128        # paper: 128
    lr: float = 2e-4             # paper: 2e-4
    ema: float = 0.999           # paper: 0.999999 for 1-RF, 0.9999 for reflow
    grad_clip: float = 1.0       # paper: 1.0
    eps: float = 1e-3            # smallest t: t ~ U(eps, 1) (paper: 1e-3)
    sample_steps: int = 16       # Euler steps N (NFE N; one batched call with guidance)
    num_samples: int = 100
    guidance: float = 1.5        # classifier-free guidance scale w (1 = conditional, no guidance)
    reflow_pairs: int = 50000    # (noise, sample) pairs for --reflow (paper: 4M for CIFAR-10)
    pair_steps: int = 32         # teacher Euler steps per reflow pair (paper: RK45)
    log_every: int = 100
    ckpt_every: int = 1000

PRESETS = {
    "gpu": Config(),
    "cpu": Config(ch=16, blocks=1, dropout=0.0, batch_size=64, steps=2000, lr=1e-3, reflow_pairs=10000, pair_steps=8),
    "tiny": Config(ch=8, blocks=1, batch_size=4, steps=2, sample_steps=2, num_samples=10,
                   reflow_pairs=8, pair_steps=2, log_every=1, ckpt_every=1),
}
ZERO_OK = ("dropout", "p_uncond", "guidance")  # flags that may be 0; all others must be > 0

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
        h = self.conv1(x) + self.emb(e)[:, :, None, None]
        return self.skip(x) + self.conv2(h)                               # (B, cout, H, W)

class Attention(nn.Module):
    def __init__(self, c, heads=4):
        super().__init__()
        self.heads, self.norm = heads, norm(c)
        self.qkv, self.out = nn.Conv2d(c, 3 * c, 1), zero(nn.Conv2d(c, c, 1))

    def forward(self, x, e=None):
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (n h d) x y -> n b h (x y) d", n=3, h=self.heads)
        h = F.scaled_dot_product_attention(q, k, v)                       # (B, heads, HW, d)
        return x + self.out(rearrange(h, "b h (x y) d -> b (h d) x y", x=x.shape[2]))

class UNet(nn.Module):
    """Class-conditional U-Net v(x, t, y): 32 -> 16 -> 8 with attention at 8x8; y = 10 is 'no label'."""

    def __init__(self, ch=64, blocks=2, dropout=0.1, mult=(1, 2, 2), classes=10):
        super().__init__()
        emb = 4 * ch
        self.ch = ch
        self.time = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(classes + 1, emb)
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [ch], ch
        for i, m in enumerate(mult):
            for _ in range(blocks):
                self.down.append(ResBlock(c, ch * m, emb, dropout))
                c = ch * m
                skips.append(c)
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
        e = self.time(timestep_embedding(999 * t, self.ch)) + self.label(y)   # time input 999 t, as official
        h = self.inp(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, e) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, e)                                               # (B, 2ch, 8, 8)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), e) if isinstance(layer, ResBlock) else layer(h)
        return self.out(h)                                                # (B, 1, 32, 32) velocity

# --- diffusion ---
NULL = 10  # the 'no label' class of classifier-free guidance

def interpolate(x0, x1, t):
    """X_t = t X1 + (1 - t) X0, the straight line from noise (t=0) to data (t=1). Eq. 1."""
    t = t.view(-1, 1, 1, 1)
    return t * x1 + (1 - t) * x0

def rf_loss(net, x0, x1, y, cfg, distill=False):
    """E || (X1 - X0) - v(X_t, t) ||^2 with t ~ U(eps, 1) (Eq. 1); distillation (k=1) fixes t = eps."""
    t = torch.rand(len(x1), device=x1.device) * (1 - cfg.eps) + cfg.eps
    if distill:
        t = torch.full_like(t, cfg.eps)                                   # z1 ~ z0 + v(z0, eps), Alg. 1
    y = torch.where(torch.rand(len(y), device=y.device) < cfg.p_uncond, NULL, y)   # CFG label dropout
    v = net(interpolate(x0, x1, t), t, y)
    return F.mse_loss(v.float(), x1 - x0)                                 # mean over pixels, as official

def velocity(net, x, t, y, w):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6 with their w + 1 as our w):
    v_uncond + w (v_cond - v_uncond); w = 1 is the plain conditional v."""
    if w == 1:
        return net(x, t, y)
    v_c, v_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)])).chunk(2)
    return v_u + w * (v_c - v_u)

@torch.no_grad()
def euler(v, z0, n, eps=1e-3, bar=False):
    """Euler ODE solver from t=eps to 1: z <- z + v(z, t_i) / N, t_i = i/N (1-eps) + eps (official
    sde_lib.euler_ode). Returns the trajectory (N+1, B, ...)."""
    z, traj = z0, [z0]
    for i in tqdm(range(n), desc="sample", leave=False, disable=not bar):
        t = torch.full((len(z),), i / n * (1 - eps) + eps, device=z.device)
        z = z + v(z, t).to(z.dtype) / n
        traj.append(z)
    return torch.stack(traj)

def straightness(traj):
    """S = int_0^1 E ||(Z1 - Z0) - v(Z_t, t)||^2 dt on an Euler trajectory (Sec. 2; 0 = straight)."""
    n = len(traj) - 1
    v = (traj[1:] - traj[:-1]) * n
    return ((traj[-1] - traj[0]) - v).pow(2).flatten(2).mean(2).mean().item()

# --- train ---
def make_pairs(teacher, source, n, device, out):
    """Reflow data (Alg. 1): noise Z0, label y, Z1 = ODE_teacher(Z0); cached per teacher and count."""
    path, bs, key = out / "pairs.pt", 250 if device.type == "cpu" else 2000, f"{source}@{teacher['step']}:{n}"
    if path.exists() and (p := torch.load(path, weights_only=True)).get("key") == key:
        return p["z1"].float(), p["y"], p["z0"].float()
    net, tc = load_ema(teacher, device), Config(**teacher["config"])
    z0, y = torch.randn(n, 1, 32, 32), torch.randint(10, (n,))
    z1 = torch.cat([euler(lambda z, t: velocity(net, z, t, yb, tc.guidance), zb, tc.pair_steps, tc.eps)[-1].cpu()
                    for zb, yb in tqdm(zip(z0.to(device).split(bs), y.to(device).split(bs)),
                                       total=-(-n // bs), desc="reflow pairs")])
    torch.save({"z0": z0.half(), "z1": z1.half(), "y": y, "key": key}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return z1, y, z0

def train(args, device, out, ckpt_path):
    torch.manual_seed(args.seed)
    teacher = load_ckpt(args.reflow) if args.reflow else None
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: continue it with --resume, or pass another --out")
    state = load_ckpt(ckpt_path) if args.resume else None
    if state:
        base, meta = state["config"], {key: state[key] for key in ("k", "teacher", "distill")}
    elif teacher:  # the student starts as its teacher; the pairs carry the guidance (see docstring)
        base = {**teacher["config"], "p_uncond": 0.0, "guidance": 1.0, "ema": 0.9999}
        meta = {"k": teacher["k"] + (not args.distill), "teacher": str(args.reflow), "distill": args.distill}
    else:
        base = asdict(PRESETS[args.preset or ("cpu" if device.type == "cpu" else "gpu")])
        meta = {"k": 1, "teacher": None, "distill": False}
    cfg = make_config(args, base, fixed=bool(state or teacher))
    if teacher:
        x1, y, x0 = (a.to(device) for a in make_pairs(teacher, meta["teacher"], cfg.reflow_pairs, device, out))
    else:
        (x1, y), x0 = (a.to(device) for a in mnist(args.data_dir)), None

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
    elif teacher:  # the (k+1)-rectified flow starts from the k-rectified flow
        net.load_state_dict(teacher["ema"])
        ema.load_state_dict(teacher["ema"])
    fwd = torch.compile(net) if args.compile else net
    log(out / "log.txt", f"{NAME}, {title(meta)}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
                         f"{len(x1)} training {'pairs' if teacher else 'images'}, {device}, step {step}/{cfg.steps}, {cfg}")

    def save(done, write=True):  # a NaN/inf loss stops training before it can reach a checkpoint
        if not torch.isfinite(running):
            raise UserError(f"loss became {running.item()} before step {done}; stopped, the last good "
                            f"checkpoint is kept at {ckpt_path} (try a lower --lr)")
        if not write:
            return
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save({"script": NAME, "config": asdict(cfg), "model": net.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict(), "step": done, "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None, **meta}, tmp)
        os.replace(tmp, ckpt_path)                                        # atomic: never a half-written file

    net.train()
    running, seen, clock, done = torch.zeros((), device=device), 0, time.time(), step
    try:
        for done in between_steps(tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train")):
            idx = torch.randint(len(x1), (cfg.batch_size,), device=device)
            z0 = x0[idx] if x0 is not None else torch.randn_like(x1[idx])  # reflow: the fixed pairs
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = rf_loss(fwd, z0, x1[idx], y[idx], cfg, meta["distill"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            decay = min(cfg.ema, (1 + done) / (10 + done))                # EMA with a warm-up
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)
            running, seen, done = running + loss.detach(), seen + 1, done + 1
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

def load_ema(state, device):
    cfg = Config(**state["config"])
    net = UNet(cfg.ch, cfg.blocks).to(device, memory_format=torch.channels_last).eval()
    net.load_state_dict(state["ema"])
    return net

def title(state):
    return f"{state['k']}-rectified flow{' (distilled)' if state['distill'] else ''}"

def sample(args, device, out, ckpt_path):
    state = load_ckpt(ckpt_path)
    cfg, net = make_config(args, state["config"]), load_ema(state, device)
    y = torch.arange(cfg.num_samples, device=device) % 10                # column k of the grid is digit k
    z0 = torch.randn(len(y), 1, 32, 32, generator=torch.Generator().manual_seed(args.seed)).to(device)
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        traj = euler(lambda z, t: velocity(net, z, t, y, cfg.guidance), z0, cfg.sample_steps, cfg.eps, bar=True)
    save_png(out / "samples.png", traj[-1])
    save_gif(out / "samples.gif", traj)
    save_npz(out / "samples.npz", images=traj[-1], labels=y)
    print(f"wrote {out}/samples.png, samples.gif, samples.npz: {len(y)} samples of the {title(state)} "
          f"(step {state['step']}), {cfg.sample_steps} Euler steps, guidance {cfg.guidance}")
    if state["teacher"] and Path(state["teacher"]).is_file():           # reflow: show what it bought
        teacher, rows = load_ckpt(state["teacher"]), []
        for st, model in ((teacher, load_ema(teacher, device)), (state, net)):
            for n in (1, 2, cfg.pair_steps):
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    tr = euler(lambda z, t: velocity(model, z, t, y[:20], st["config"]["guidance"]), z0[:20], n, cfg.eps)
                rows.append(tr[-1])
            print(f"{title(st)}: straightness S = {straightness(tr):.4f} over {n} Euler steps")
        save_png(out / "reflow.png", torch.cat(rows))
        print(f"wrote {out}/reflow.png: pairs of rows = the {title(teacher)} at 1, 2, {n} Euler steps, "
              f"then the {title(state)} at 1, 2, {n}, from the same noise")

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
    p.add_argument("--out", help=f"output folder (default: runs/{NAME}, or runs/{NAME}_reflow with --reflow)")
    p.add_argument("--data-dir", help="folder holding MNIST/raw/ (default: $XDIFFUSION_DATA, else ./data)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue training from the checkpoint")
    p.add_argument("--ckpt", help="checkpoint to write, resume and sample (default: OUT/ckpt.pt)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--reflow", metavar="CKPT", help="train the next rectified flow on (noise, sample) pairs "
                   "of this checkpoint, drawn with its guidance and --pair-steps (Alg. 1)")
    p.add_argument("--distill", action="store_true", help="with --reflow: train at t=eps only, for one step (Alg. 1)")
    args = p.parse_args(argv)
    if not (args.train or args.sample):
        return p.print_help()
    try:
        if args.distill and not args.reflow:
            raise UserError("--distill needs --reflow CKPT: it distils a trained flow")
        device = pick_device(args.device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        out = Path(args.out or f"runs/{NAME}{'_reflow' if args.reflow else ''}")
        ckpt_path = Path(args.ckpt) if args.ckpt else out / "ckpt.pt"
        if args.reflow and Path(args.reflow).resolve() == ckpt_path.resolve():
            raise UserError(f"--reflow {args.reflow} would be overwritten: pass another --out")
        out.mkdir(parents=True, exist_ok=True)
        if args.train:
            train(args, device, out, ckpt_path)
        if args.sample:
            sample(args, device, out, ckpt_path)
    except (UserError, OSError, KeyboardInterrupt) as e:                  # OSError: e.g. --out is a file, the disk full
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else f"error: {e}")   # Ctrl-C outside the training steps: 130

if __name__ == "__main__":
    main()
