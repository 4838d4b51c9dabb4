"""Stable Diffusion 3: "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"
Patrick Esser, Sumith Kulal, Andreas Blattmann et al., 2024. https://arxiv.org/abs/2403.03206v1
Official code: github.com/Stability-AI/sd3-ref and sd3.5 (mmdit.py / mmditx.py, sd3_impls.py, sd3_infer.py).

The idea: a rectified flow (straight paths data -> noise, the network predicts the velocity eps - x0) trained
at logit-normal times, which weight the middle of the path where v is hardest (Sec. 3.1), shifted to more noise
for more pixels (Sec. 5.3.2). Its MMDiT (Sec. 4, Fig. 2) gives text tokens and image patches SEPARATE weights
(own adaLN, QK-normed qkv, projection, MLP) but one attention over both, so information flows both ways.

Time convention (paper, official): t = 0 is data, t = 1 is noise, z_t = (1 - t) x0 + t eps, sampled t = 1 -> 0.

Deviations from the paper:
- Pixel space, no VAE: 32x32x1 MNIST (paper: 16-channel latents). Far fewer steps, EMA warm-up, bf16 on CUDA.
- Text: a tiny byte-level transformer trained jointly from scratch replaces the frozen CLIP-L, CLIP-G, T5-XXL;
  it gives the context tokens and the pooled vector (masked mean). Padding is masked in the joint attention.
- Guidance dropout: prompt -> "" with p = 0.1 (paper: each of 3 encoders dropped at 0.463, so all three at
  0.463^3 = 0.099, the same unconditional rate; our one encoder at 0.463 would waste half the batches).
- Sizes: SD3's hidden = 64 depth, heads = depth as head_dim x depth: gpu 64 x 6, p = 2; cpu 32 x 3 (shrunk), p = 4.
- One resolution: shift = 1, one fixed position grid (no crop from a larger grid); no mode / cosmap samplers.
- Init: the released code is inference-only, with none; we use DiT's adaLN-Zero (MMDiT is made of DiT blocks).

Usage:
  python image/sd3.py --train --sample --data-dir ../shared/data
  python image/sd3.py --sample --prompt "a handwritten three" --guidance 3   # one free-text prompt
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
from shared import UserError, between_steps, log, mnist, prompts, save_gif, save_npz, save_png  # noqa: E402

NAME = "sd3"

# --- config ---
@dataclass
class Config:
    depth: int = 6               # joint blocks; also the heads (paper: 24 for 2B, 38 for 8B)
    head_dim: int = 64           # width per head, hidden = head_dim x depth (paper: 64)
    patch: int = 2               # patch size p: (32/p)^2 image tokens (paper: 2)
    p_uncond: float = 0.1        # prompt -> "" for guidance (paper: 0.463 per each of 3 encoders, see docstring)
    shift: float = 1.0           # timestep shift alpha = sqrt(m/n), pixels m vs the base n (paper: 3.0 at 1024^2)
    steps: int = 30000           # training steps
    batch_size: int = 128
    lr: float = 3e-4             # AdamW, no weight decay, no warm-up
    ema: float = 0.9999          # EMA decay per step
    sample_steps: int = 50       # Euler steps (paper: 28 to 50)
    num_samples: int = 100
    guidance: float = 2.0        # classifier-free guidance scale on v (paper: 5.0 in sd3_infer)
    log_every: int = 100
    ckpt_every: int = 1000

PRESETS = {
    "gpu": Config(),
    "cpu": Config(depth=3, head_dim=32, patch=4, batch_size=64, steps=1800, lr=2e-3, ema=0.999, sample_steps=28,
                  guidance=3.0),
    "tiny": Config(depth=1, head_dim=16, patch=4, batch_size=4, steps=2, sample_steps=2, num_samples=10, lr=1e-2,
                   log_every=1, ckpt_every=1),  # lr: 2 steps move v off its zero init, so the GIF frames differ
}
ZERO_OK = ("p_uncond", "guidance", "ema")  # others must be > 0

# --- model ---
def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) times, as in DDPM / Transformer."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs                                     # (B, dim/2)
    return torch.cat([args.cos(), args.sin()], -1)                        # (B, dim)

def tokenize(texts, length=48):
    """Byte-level: BOS (1), each UTF-8 byte + 2, 0-padded to `length`. Any phrasing encodes; "" is BOS only."""
    ids = [torch.tensor([1] + [c + 2 for c in text.lower().encode()][: length - 1]) for text in texts]
    return torch.stack([nn.functional.pad(b, (0, length - len(b))) for b in ids])   # (B, L)

class TextEncoder(nn.Module):  # same in image/pixart_alpha.py, sd3.py, flux.py: a small stand-in for T5 / CLIP
    def __init__(self, dim, depth=2, heads=4, length=48):
        super().__init__()
        self.tok, self.pos = nn.Embedding(258, dim), nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, 0.0, "gelu", batch_first=True, norm_first=True)
        self.layers, self.norm = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False), nn.LayerNorm(dim)
    def forward(self, ids):                                               # ids (B, L) from tokenize
        mask = ids > 0                                                    # (B, L) True on real tokens
        h = self.norm(self.layers(self.tok(ids) + self.pos, src_key_padding_mask=~mask))   # (B, L, dim)
        return h, mask, (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)   # pooled: mean over real tokens

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

class Stream(nn.Module):  # one modality's half of a JointBlock (official DismantledBlock): its own weights throughout
    def __init__(self, dim, heads, pre_only=False, mlp_ratio=4):
        super().__init__()
        self.heads, self.pre_only = heads, pre_only
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # no parameters: shared by both branches
        self.qkv, self.ada = nn.Linear(dim, 3 * dim), nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))
        self.ln_q, self.ln_k = nn.RMSNorm(dim // heads, eps=1e-6), nn.RMSNorm(dim // heads, eps=1e-6)  # QK-norm (Sec. 5.3.2)
        if not pre_only:                                                  # pre_only: no post-attention update
            self.proj = nn.Linear(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim))

    def pre(self, x, c):                                                  # x (B, N, D), c (B, D)
        mods = self.ada(c)[:, None].chunk(2 if self.pre_only else 6, -1)  # shift1, scale1[, gate1, shift2, scale2, gate2]
        q, k, v = rearrange(self.qkv(modulate(self.norm(x), *mods[:2])), "b n (k h d) -> k b h n d", k=3, h=self.heads)
        return (self.ln_q(q), self.ln_k(k), v), (x, *mods[2:])           # q, k, v (B, H, N, D/H)

    def post(self, a, x, gate1, shift2, scale2, gate2):                  # a (B, N, D): this stream's attention output
        x = x + gate1 * self.proj(a)
        return x + gate2 * self.mlp(modulate(self.norm(x), shift2, scale2))

class JointBlock(nn.Module):  # the paper's idea (Sec. 4, Fig. 2b): two streams, one attention over [context; x]
    def __init__(self, dim, heads, pre_only=False):
        super().__init__()
        self.context, self.x = Stream(dim, heads, pre_only), Stream(dim, heads)

    def forward(self, ctx, x, c, mask):                                   # ctx (B, L, D), x (B, N, D), mask (B, L)
        (qkv_c, rest_c), (qkv_x, rest_x) = self.context.pre(ctx, c), self.x.pre(x, c)
        keep = torch.cat([mask, mask.new_ones(x.shape[:2])], 1)[:, None, None]   # (B, 1, 1, L+N): no padding keys
        a = F.scaled_dot_product_attention(*(torch.cat(pair, 2) for pair in zip(qkv_c, qkv_x)), attn_mask=keep)
        a_c, a_x = rearrange(a, "b h n d -> b n (h d)").split([ctx.shape[1], x.shape[1]], 1)
        return None if self.context.pre_only else self.context.post(a_c, *rest_c), self.x.post(a_x, *rest_x)

class FinalLayer(nn.Module):  # LayerNorm, adaLN shift and scale (no gate), a linear decoder to p*p*C_out per token
    def __init__(self, dim, p, c_out):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada, self.linear = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim)), nn.Linear(dim, p * p * c_out)

    def forward(self, x, c):                                              # x (B, N, D), c (B, D)
        shift, scale = self.ada(c)[:, None].chunk(2, -1)
        return self.linear(modulate(self.norm(x), shift, scale))          # (B, N, p*p*C_out)

class MMDiT(nn.Module):  # text-conditional MMDiT (Fig. 2a): (B, C, 32, 32), t in [0, 1], ids (B, L) -> v (B, C, 32, 32)
    def __init__(self, depth=6, head_dim=64, patch=2, size=32, channels=1):
        super().__init__()
        dim = head_dim * depth                                            # SD3: hidden 64 depth, heads = depth
        self.patch, self.grid = patch, size // patch
        self.x_embed, self.context_embed = nn.Linear(patch * patch * channels, dim), nn.Linear(dim, dim)  # no text positions
        self.register_buffer("pos", sincos_2d(dim, self.grid), persistent=False)   # fixed, not trained
        self.t_embed, self.y_embed = (nn.Sequential(nn.Linear(n, dim), nn.SiLU(), nn.Linear(dim, dim)) for n in (256, dim))
        self.blocks = nn.ModuleList(JointBlock(dim, depth, pre_only=i == depth - 1) for i in range(depth))
        self.final = FinalLayer(dim, patch, channels)
        zero = [s.ada[-1] for b in self.blocks for s in (b.context, b.x)] + [self.final.ada[-1], self.final.linear]
        for m in (m for m in self.modules() if isinstance(m, nn.Linear)):  # DiT's init, adaLN-Zero (see docstring)
            nn.init.zeros_(m.weight) if m in zero else nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embed[0].weight, std=0.02), nn.init.normal_(self.t_embed[2].weight, std=0.02)
        self.text = TextEncoder(dim)                                      # after the loop: keeps PyTorch's init

    def forward(self, x, t, ids):                                         # x (B, C, 32, 32), t (B,), ids (B, L)
        tokens, mask, pooled = self.text(ids)                             # (B, L, D), (B, L), (B, D)
        ctx = self.context_embed(tokens)                                  # (B, L, D)
        h = self.x_embed(patchify(x, self.patch)) + self.pos             # (B, N, D), N = (32/p)^2
        c = self.t_embed(timestep_embedding(1000 * t, 256)) + self.y_embed(pooled)   # (B, D): t_emb(1000 t) + MLP(pooled)
        for block in self.blocks:
            ctx, h = block(ctx, h, c, mask)                               # the last block returns ctx = None
        return unpatchify(self.final(h, c), self.patch, self.grid)       # (B, C, 32, 32), zero at init

# --- diffusion ---
def time_shift(t, alpha):
    """t_m = alpha t_n / (1 + (alpha - 1) t_n), alpha = sqrt(m / n) (Sec. 5.3.2): at m pixels, a time with the
    uncertainty that t_n has at the base n. On MNIST m = n = 32^2 gives alpha = 1, the identity; 2 would be 64^2."""
    return alpha * t / (1 + (alpha - 1) * t)

def rf_loss(net, x0, ids, alpha):
    """|| v(z_t, t) - (eps - x0) ||^2, z_t = (1 - t) x0 + t eps (Sec. 2), t = time_shift(sigmoid(u)), u ~ N(m, s)."""
    t = time_shift(torch.sigmoid(torch.randn(len(x0), device=x0.device)), alpha)   # logit-normal, m = 0, s = 1 (Sec. 3.1)
    eps, tt = torch.randn_like(x0), t.view(-1, 1, 1, 1)
    v = net((1 - tt) * x0 + tt * eps, t, ids)
    return ((v.float() - (eps - x0)) ** 2).mean((1, 2, 3))               # (B,)

def guided(net, x, t, ids, uncond, w=1.0):
    """Classifier-free guidance v_u + w (v_c - v_u), uncond = the "" prompt (sd3_impls.CFGDenoiser)."""
    if w == 1:
        return net(x, t, ids).float()
    v_c, v_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ids, uncond])).float().chunk(2)
    return v_u + w * (v_c - v_u)

@torch.no_grad()
def euler(v, noise, n, alpha, frames=20, bar=False):
    """x <- x + (sigma_{i+1} - sigma_i) v(x, sigma_i) from x = noise, sigmas = time_shift(linspace(1, 1/1000, n)) + [0]
    (sd3_impls.sample_euler, sd3_infer.get_sigmas; that shifts its 1/1000 twice, a quirk we skip). D = x - sigma v,
    so its d = (x - D) / sigma is v. Returns x0_hat = x - sigma v of ~frames steps, then x."""
    sig, x, traj = torch.cat([time_shift(torch.linspace(1, 1e-3, n, dtype=torch.float64), alpha), torch.zeros(1)]), noise, []
    for i in tqdm(range(n), desc="sample", leave=False, disable=not bar):
        vi = v(x, torch.full((len(x),), sig[i].item(), device=x.device)).to(x.dtype)
        if i % max(n // frames, 1) == 0:
            traj.append(x - sig[i].item() * vi)                           # x0_hat = z - sigma v
        x = x + (sig[i + 1] - sig[i]).item() * vi
    return torch.stack(traj + [x])                                        # (~frames + 1, B, C, 32, 32)

# --- train ---
def train(args, device, out, ckpt_path):
    torch.manual_seed(args.seed)
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: continue it with --resume, or pass another --out")
    state = load_ckpt(ckpt_path) if args.resume else None
    preset = args.preset or ("cpu" if device.type == "cpu" else "gpu")
    cfg = make_config(args, state["config"] if state else asdict(PRESETS[preset]), fixed=bool(state))
    x, y = mnist(args.data_dir)
    x = x.to(device)                                                      # labels stay on the CPU for the prompts
    net = MMDiT(cfg.depth, cfg.head_dim, cfg.patch).to(device)
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
            idx = torch.randint(len(x), (cfg.batch_size,))
            texts = [s if r >= cfg.p_uncond else "" for s, r in zip(prompts(y[idx], "random"), torch.rand(len(idx)).tolist())]
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = rf_loss(fwd, x[idx.to(device)], tokenize(texts).to(device), cfg.shift)   # (B,)
            opt.zero_grad(set_to_none=True)
            loss.mean().backward()                                        # mean over pixels and batch
            opt.step()
            decay = min(cfg.ema, (1 + done) / (10 + done))                # EMA with a warm-up
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
    net = MMDiT(cfg.depth, cfg.head_dim, cfg.patch).to(device).eval()
    net.load_state_dict(state["ema"])
    y = torch.arange(cfg.num_samples) % 10                               # column k of the grid is digit k
    texts = [args.prompt] * len(y) if args.prompt is not None else prompts(y, "sentence")
    ids, uncond = tokenize(texts).to(device), tokenize([""] * len(y)).to(device)
    noise = torch.randn(len(y), 1, 32, 32, generator=torch.Generator().manual_seed(args.seed)).to(device)
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        traj = euler(lambda x, t: guided(net, x, t, ids, uncond, cfg.guidance), noise, cfg.sample_steps, cfg.shift, bar=True)
    save_png(out / "samples.png", traj[-1])
    save_gif(out / "samples.gif", traj)                                   # x0_hat every ~n/20 steps, then x
    save_npz(out / "samples.npz", images=traj[-1], labels=None if args.prompt is not None else y, prompts=texts)
    print(f"wrote {out}/samples.png, samples.gif, samples.npz: {len(y)} samples (step {state['step']}), "
          f"{cfg.sample_steps} Euler steps ({cfg.sample_steps * (1 + (cfg.guidance != 1))} NFE), guidance {cfg.guidance}")

# --- cli ---
HELP = dict(re.findall(r"^    (\w+): \w+ = [^#\n]*# (.*)$", Path(__file__).read_text(), re.M))  # Config's comments

def make_config(args, base, fixed=True):
    """A checkpoint's (fixed=True) or preset's config, overridden by the flags on the command line."""
    if unknown := set(base) - {f.name for f in fields(Config)}:
        raise UserError(f"the checkpoint comes from another version of {NAME}.py: unknown config {sorted(unknown)}")
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    for key in ("depth", "head_dim", "patch"):
        if fixed and key in given and given[key] != base[key]:
            raise UserError(f"--{key.replace('_', '-')} {given[key]} does not match the checkpoint's {base[key]}")
    cfg = replace(Config(**base), **given)
    if 32 % cfg.patch or cfg.head_dim * cfg.depth % 4:
        raise UserError("need --patch dividing 32 and --head-dim x --depth divisible by 4")
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
    p.add_argument("--prompt", help='sample the whole grid from this text (default: "a handwritten k" in column k)')
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
