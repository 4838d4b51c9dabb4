"""FLUX.1: Black Forest Labs, 2024. No paper; reference code github.com/black-forest-labs/flux @802fb47
(src/flux/model.py, modules/layers.py, math.py, sampling.py).

The idea: double-stream blocks give text and image tokens their own weights (modulation, qkv, QK-RMSNorm, proj,
MLP), joined by one attention over [txt, img]; single-stream blocks then run attention and MLP in parallel on the
concatenation, one fused linear in, one out. Positions: only multi-axis RoPE on q, k after the QK-norm, ids (0, row,
col) for image tokens, (0, 0, 0) for text. vec = MLP(t) + MLP(guidance) + MLP(pooled text) modulates every block.
Euler on a schedule shifted to noise by mu(image tokens). FLUX.1-dev is guidance-distilled: w is an input, 1 pass/step.

Time convention (reference, as SD3): t = 0 is data, t = 1 is noise, z_t = (1 - t) x0 + t eps, the model predicts
v = eps - x0, and the sampler runs from t = 1 to 0: x += (t_prev - t_cur) v.

Our choices, as BFL published no training recipe:
- Training t = time_shift(mu, 1, sigmoid(u)) = sigmoid(u + mu), u ~ N(0, 1): SD3's logit-normal with the sampling
  schedule's shift, so training effort goes where the sampler takes its steps (mu 0.5 at 256 tokens, 0.47 at 64).
- Guidance distillation (--distill-guidance TEACHER; Meng et al. 2023, arXiv 2210.03142, stage 1): the teacher
  trains with prompts dropped to "" (p = 0.1) and guidance input g = 1 ("no guidance"). The student starts as the
  teacher's EMA and, given g = w ~ U[1, 4], regresses in one pass the teacher's CFG v_u + w (v_c - v_u).
- Init: the reference (inference only) has none; we zero every modulation and the final layer (DiT's adaLN-Zero).

Deviations from the reference:
- Pixel space, no VAE: 1x32x32 MNIST in p x p patches (FLUX.1: 2x2 patches of 16-channel latents). bf16 on CUDA.
- Text: a tiny byte-level encoder trained jointly from scratch, tokens to txt_in, masked mean to vector_in (FLUX.1:
  frozen T5-XXL tokens, pooled CLIP-L). Text padding is masked out of every attention.
- Sizes: gpu 256 wide, 2 double + 4 single, head dim 64, p = 2; cpu 64, 2 + 3, 32, p = 4 (FLUX.1: 3072, 19 + 38, 128).

Usage:
  python image/flux.py --train --sample --data-dir ../shared/data
  python image/flux.py --sample --prompt "a handwritten three" --guidance 4     # the whole grid from one prompt
  python image/flux.py --distill-guidance runs/flux/ckpt.pt --train --sample --steps 3000   # -> runs/flux_distilled
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

NAME = "flux"

# --- config ---
@dataclass
class Config:
    hidden: int = 256            # transformer width (FLUX.1: 3072)
    depth: int = 2               # double-stream blocks (FLUX.1: 19)
    depth_single: int = 4        # single-stream blocks (FLUX.1: 38)
    heads: int = 4               # attention heads (FLUX.1: 24 of dim 128)
    patch: int = 2               # patch size p: (32/p)^2 image tokens (FLUX.1: 2x2 latent patches)
    p_uncond: float = 0.1        # prompt dropout to "" for classifier-free guidance
    steps: int = 30000           # FLUX.1's training recipe is not published
    batch_size: int = 128
    lr: float = 3e-4             # AdamW, no weight decay
    ema: float = 0.9999          # EMA decay per step
    sample_steps: int = 50       # Euler steps on the shifted schedule (FLUX.1-dev: 50)
    num_samples: int = 100
    guidance: float = 2.5        # CFG scale, or the distilled model's guidance input (FLUX.1 cli: 2.5)
    log_every: int = 100
    ckpt_every: int = 1000

PRESETS = {
    "gpu": Config(),
    "cpu": Config(hidden=64, depth=2, depth_single=3, heads=2, patch=4, batch_size=64, steps=1500, lr=2e-3, ema=0.999),
    "tiny": Config(hidden=16, depth=1, depth_single=1, heads=2, patch=4, batch_size=4, steps=2, sample_steps=2,
                   num_samples=10, log_every=1, ckpt_every=1),
}
ZERO_OK = ("p_uncond", "guidance", "ema")  # others must be > 0
ARCH = ("hidden", "depth", "depth_single", "heads", "patch")  # fixed by a checkpoint

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

def patchify(x, p):
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)  # (B, C, H, W) -> (B, HW/p^2, p*p*C)

def unpatchify(x, p, h):
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, p=p, q=p)  # official 'nhwpqc->nchpwq'

def modulate(x, shift, scale):
    return x * (1 + scale) + shift

def rope(ids, head_dim, theta=10000):
    """N-axis RoPE (math.rope, EmbedND): cos, sin (2, L, head_dim/2) of pos_i theta^(-2j/n_i), n_i as (16, 56, 56) of 128."""
    d = (head_dim - head_dim // 8) // 4 * 2
    angles = torch.cat([ids[:, i, None] * theta ** (-torch.arange(0, n, 2, dtype=torch.float64) / n)
                        for i, n in enumerate((head_dim - 2 * d, d, d))], -1)
    return torch.stack([angles.cos(), angles.sin()]).float()

def apply_rope(x, pe):  # math.apply_rope: turn the channel pairs (x_2j, x_2j+1) of (B, H, L, D) by pe's angles, in fp32
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)                  # (B, H, L, D/2) each
    return torch.stack([pe[0] * x1 - pe[1] * x2, pe[1] * x1 + pe[0] * x2], -1).flatten(-2).type_as(x)

def attention(q, k, v, pe, keep):  # math.attention: RoPE on q, k (after the QK-norm); keep (B, 1, 1, L) hides text padding
    x = F.scaled_dot_product_attention(apply_rope(q, pe).to(v), apply_rope(k, pe).to(v), v, attn_mask=keep)
    return rearrange(x, "b h l d -> b l (h d)")                          # (B, L, D)

class QKNorm(nn.Module):  # layers.QKNorm: RMSNorm with a learnable scale on each head's q and k; splits the heads
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.q, self.k = heads, nn.RMSNorm(dim // heads, eps=1e-6), nn.RMSNorm(dim // heads, eps=1e-6)
    def forward(self, qkv):                                               # (B, L, 3D) -> q, k, v (B, H, L, D/H)
        q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=self.heads)
        return self.q(q), self.k(k), v

class Stream(nn.Module):  # one stream of a DoubleStreamBlock: Modulation(6), LayerNorm, qkv, QK-norm, proj, MLP
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.mod, self.norm = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)), nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.qk_norm, self.proj = nn.Linear(dim, 3 * dim), QKNorm(dim, heads), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim))
    def pre(self, x, vec):                                                # -> (q, k, v), the 6 modulations (B, 1, D)
        m = self.mod(vec)[:, None].chunk(6, -1)
        return self.qk_norm(self.qkv(modulate(self.norm(x), m[0], m[1]))), m
    def post(self, x, attn, m):                                           # gated residuals: attention, then MLP
        x = x + m[2] * self.proj(attn)
        return x + m[5] * self.mlp(modulate(self.norm(x), m[3], m[4]))

class DoubleStreamBlock(nn.Module):  # the idea (1/2): text and image keep their own weights, one joint attention
    def __init__(self, dim, heads):
        super().__init__()
        self.txt, self.img = Stream(dim, heads), Stream(dim, heads)
    def forward(self, img, txt, vec, pe, keep):                           # img (B, N, D), txt (B, L, D), vec (B, D)
        (txt_qkv, txt_m), (img_qkv, img_m) = self.txt.pre(txt, vec), self.img.pre(img, vec)
        txt_a, img_a = attention(*(torch.cat(z, 2) for z in zip(txt_qkv, img_qkv)), pe, keep).split([txt.shape[1], img.shape[1]], 1)
        return self.img.post(img, img_a, img_m), self.txt.post(txt, txt_a, txt_m)

class SingleStreamBlock(nn.Module):  # the idea (2/2): attention and MLP in parallel on [txt, img] (ViT-22B)
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.mod, self.norm = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim)), nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear1, self.linear2 = nn.Linear(dim, (3 + mlp_ratio) * dim), nn.Linear((1 + mlp_ratio) * dim, dim)   # fused
        self.qk_norm, self.act, self.split = QKNorm(dim, heads), nn.GELU(approximate="tanh"), (3 * dim, mlp_ratio * dim)
    def forward(self, x, vec, pe, keep):                                  # x (B, L + N, D), vec (B, D)
        shift, scale, gate = self.mod(vec)[:, None].chunk(3, -1)
        qkv, mlp = self.linear1(modulate(self.norm(x), shift, scale)).split(self.split, -1)
        return x + gate * self.linear2(torch.cat([attention(*self.qk_norm(qkv), pe, keep), self.act(mlp)], -1))

class FinalLayer(nn.Module):  # LayerNorm, adaLN shift and scale (no gate), a linear decoder to p*p*C_out per token
    def __init__(self, dim, p, c_out):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada, self.linear = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim)), nn.Linear(dim, p * p * c_out)
    def forward(self, x, c):                                              # x (B, N, D), c (B, D)
        shift, scale = self.ada(c)[:, None].chunk(2, -1)
        return self.linear(modulate(self.norm(x), shift, scale))          # (B, N, p*p*C_out)

class Flux(nn.Module):  # model.Flux on pixels: x (B, C, 32, 32), t (B,) in [0, 1], ids (B, L), guidance g (B,) -> v
    def __init__(self, hidden=256, depth=2, depth_single=4, heads=4, patch=2, size=32, channels=1):
        super().__init__()
        self.patch, self.grid, self.text = patch, size // patch, TextEncoder(hidden)   # for T5 (tokens), CLIP (pooled)
        self.img_in, self.txt_in = nn.Linear(patch * patch * channels, hidden), nn.Linear(hidden, hidden)
        self.time_in, self.guidance_in, self.vector_in = (nn.Sequential(nn.Linear(d, hidden), nn.SiLU(),
                                                          nn.Linear(hidden, hidden)) for d in (256, 256, hidden))  # MLPEmbedder
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden, heads) for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden, heads) for _ in range(depth_single))
        self.final = FinalLayer(hidden, patch, channels)                  # = layers.LastLayer
        rows = torch.arange(self.grid, dtype=torch.float64)               # ids as sampling.prepare: text (0, 0, 0) ...
        self.ids = torch.cat([rows.new_zeros(len(self.text.pos), 3), torch.cartesian_prod(rows[:1] * 0, rows, rows)])
        self.register_buffer("pe", rope(self.ids, hidden // heads), persistent=False)   # ... image (0, row, col)
        zero = [s.mod[-1] for b in self.double_blocks for s in (b.txt, b.img)] + [b.mod[-1] for b in self.single_blocks]
        for w in (w for m in zero + [self.final.ada[-1], self.final.linear] for w in (m.weight, m.bias)):
            nn.init.zeros_(w)                                             # our choice: adaLN-Zero (see the docstring)
    def forward(self, x, t, ids, g):                                      # g = 1: no guidance
        txt, mask, pooled = self.text(ids)                                # (B, L, D), (B, L), (B, D)
        vec = self.time_in(timestep_embedding(1000 * t, 256)) + self.guidance_in(timestep_embedding(1000 * g, 256))
        vec = vec + self.vector_in(pooled)                                # (B, D); t and g enter as 1000 t, 1000 g
        img, txt = self.img_in(patchify(x, self.patch)), self.txt_in(txt)  # (B, N, D), (B, L, D)
        keep = torch.cat([mask, mask.new_ones(img.shape[:2])], 1)[:, None, None]   # (B, 1, 1, L + N): no padding keys
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, self.pe, keep)
        h = torch.cat([txt, img], 1)                                      # (B, L + N, D)
        for block in self.single_blocks:
            h = block(h, vec, self.pe, keep)
        return unpatchify(self.final(h[:, txt.shape[1]:], vec), self.patch, self.grid)   # drop txt; 0 at init

# --- diffusion ---
def time_shift(mu, sigma, t):  # sampling.time_shift; sigma = 1: SD3's alpha t / (1 + (alpha - 1) t) at alpha = e^mu
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)

def lin_mu(seq_len, x1=256, y1=0.5, x2=4096, y2=1.15):  # sampling.get_lin_function: mu linear in the image tokens
    return y1 + (y2 - y1) / (x2 - x1) * (seq_len - x1)

def get_schedule(n, seq_len):  # sampling.get_schedule: linspace(1, 0, n + 1), shifted towards t = 1 (noise)
    return time_shift(lin_mu(seq_len), 1.0, torch.linspace(1, 0, n + 1, dtype=torch.float64))

@torch.no_grad()
def velocity(net, x, t, ids, w, distilled):
    """v at guidance w: one pass with g = w if distilled, else CFG v_u + w (v_c - v_u) from two passes at g = 1."""
    g = torch.ones(len(x), device=x.device)
    if distilled or isinstance(w, float) and w == 1:
        return net(x, t, ids, g * w if distilled else g).float()
    uncond = tokenize([""]).to(ids.device).expand_as(ids)
    v_c, v_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ids, uncond]), torch.cat([g, g])).float().chunk(2)
    return v_u + torch.as_tensor(w, device=x.device).view(-1, 1, 1, 1) * (v_c - v_u)

def flux_loss(net, x0, ids, mu, teacher=None):
    """|v(z_t, t, g=1) - (eps - x0)|^2, t = time_shift(mu, 1, sigmoid(N(0, 1))); distilling: |v(z_t, t, g=w) - CFG_w|^2."""
    t = time_shift(mu, 1.0, torch.sigmoid(torch.randn(len(x0), device=x0.device)))
    eps, w = torch.randn_like(x0), torch.empty_like(t).uniform_(1.0, 4.0) if teacher else torch.ones_like(t)
    zt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    target = velocity(teacher, zt, t, ids, w, distilled=False) if teacher else eps - x0
    return F.mse_loss(net(zt, t, ids, w).float(), target)                # mean over pixels and batch

@torch.no_grad()
def denoise(v, noise, timesteps, bar=False):
    """sampling.denoise: Euler from t = 1 (noise) to 0, x += (t_prev - t_cur) v(x, t_cur). Returns (n + 1, B, ...)."""
    x, traj, ts = noise, [noise], timesteps.tolist()
    for t_cur, t_prev in tqdm(list(zip(ts[:-1], ts[1:])), desc="sample", leave=False, disable=not bar):
        x = x + (t_prev - t_cur) * v(x, torch.full((len(x),), t_cur, device=x.device)).to(x.dtype)
        traj.append(x)
    return torch.stack(traj)

# --- train ---
def train(args, device, out, ckpt_path):
    torch.manual_seed(args.seed)
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: continue it with --resume, or pass another --out")
    state = load_ckpt(ckpt_path) if args.resume else None
    teacher = load_ckpt(source) if (source := state["teacher"] if state else args.distill_guidance) else None
    base = state or teacher or {"config": asdict(PRESETS[args.preset or ("cpu" if device.type == "cpu" else "gpu")])}
    cfg = make_config(args, base["config"], fixed=bool(state or teacher))
    x, y = mnist(args.data_dir)                                           # labels and prompts stay on the CPU
    net, x = Flux(*(getattr(cfg, k) for k in ARCH)).to(device), x.to(device)
    net.load_state_dict(teacher["ema"]) if teacher else None             # the student starts as its teacher
    ema, tnet = copy.deepcopy(net).eval().requires_grad_(False), copy.deepcopy(net).eval() if teacher else None
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    step, mu = state["step"] if state else 0, lin_mu(net.grid ** 2)
    if state:
        for obj, key in ((net, "model"), (ema, "ema"), (opt, "opt")):
            obj.load_state_dict(state[key])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
    fwd = torch.compile(net) if args.compile else net
    log(out / "log.txt", f"{NAME}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {len(x)} training "
                         f"images, {device}, step {step}/{cfg.steps}, mu {mu:.3f}, {cfg}" + (f", teacher {source}" if source else ""))
    def save(done, write=True):  # a NaN/inf loss stops training before it can reach a checkpoint
        if not torch.isfinite(running):
            raise UserError(f"loss became {running.item()} before step {done}; stopped, the last good "
                            f"checkpoint is kept at {ckpt_path} (try a lower --lr)")
        if write:
            tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
            torch.save({"script": NAME, "config": asdict(cfg), "model": net.state_dict(), "ema": ema.state_dict(),
                        "opt": opt.state_dict(), "step": done, "rng": torch.get_rng_state(), "teacher": source,
                        "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None}, tmp)
            os.replace(tmp, ckpt_path)                                    # atomic: never a half-written file
    running, seen, clock, done = torch.zeros((), device=device), 0, time.time(), step
    try:
        for done in between_steps(tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train")):
            idx = torch.randint(len(x), (cfg.batch_size,))                # on the CPU, where the prompts are made
            texts = ["" if drop else s for s, drop in zip(prompts(y[idx], "random"), torch.rand(len(idx)) < cfg.p_uncond)]
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = flux_loss(fwd, x[idx.to(device)], tokenize(texts).to(device), mu, tnet)
            opt.zero_grad(set_to_none=True)
            loss.backward()
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
    if not (path := Path(path)).is_file():
        raise UserError(f"no checkpoint at {path}: train one first with --train (or pass --ckpt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): it may be truncated") from None
    if (who := state.get("script") if isinstance(state, dict) else None) != NAME:
        raise UserError(f"{path} is a checkpoint of {who or 'another program'}, not of {NAME}.py")
    return state

def sample(args, device, out, ckpt_path):
    cfg = make_config(args, (state := load_ckpt(ckpt_path))["config"])
    net, distilled = Flux(*(getattr(cfg, k) for k in ARCH)).to(device).eval(), bool(state["teacher"])
    net.load_state_dict(state["ema"])
    y = torch.arange(cfg.num_samples) % 10                                # column k of the grid is digit k
    ids = tokenize(texts := [args.prompt] * len(y) if args.prompt is not None else prompts(y, "sentence")).to(device)
    noise = torch.randn(len(y), 1, 32, 32, generator=torch.Generator().manual_seed(args.seed)).to(device)
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        traj = denoise(lambda x, t: velocity(net, x, t, ids, cfg.guidance, distilled), noise,
                       get_schedule(cfg.sample_steps, net.grid ** 2), bar=True)
    save_png(out / "samples.png", traj[-1])
    save_gif(out / "samples.gif", traj)
    save_npz(out / "samples.npz", images=traj[-1], prompts=texts, labels=None if args.prompt is not None else y)
    print(f"wrote {out}/samples.png, .gif, .npz: {len(y)} samples (step {state['step']}) of prompts like {texts[-1]!r}, "
          f"guidance {cfg.guidance}{' (distilled)' * distilled}, {(2 - (distilled or cfg.guidance == 1)) * cfg.sample_steps} NFE")

# --- cli ---
HELP = dict(re.findall(r"^    (\w+): \w+ = [^#\n]*# (.*)$", Path(__file__).read_text(), re.M))  # Config's comments

def make_config(args, base, fixed=True):
    """A checkpoint's (fixed=True) or preset's config, overridden by the flags on the command line."""
    if unknown := set(base) - {f.name for f in fields(Config)}:
        raise UserError(f"the checkpoint comes from another version of {NAME}.py: unknown config {sorted(unknown)}")
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    if fixed and (bad := [k for k in ARCH if k in given and given[k] != base[k]]):
        raise UserError(f"--{bad[0].replace('_', '-')} {given[bad[0]]} does not match the checkpoint's {base[bad[0]]}")
    cfg = replace(Config(**base), **given)
    if 32 % cfg.patch or cfg.hidden % 4 or cfg.hidden % cfg.heads or cfg.hidden // cfg.heads % 2:
        raise UserError("need --patch dividing 32, --hidden divisible by 4 and by --heads, and an even head dim")
    return cfg

def pick_device(name):
    ok = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if not ok.get((name := name or next(d for d in ok if ok[d])).split(":")[0]):
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
    p.add_argument("--distill-guidance", metavar="CKPT", help="train a guidance-distilled student of this teacher checkpoint")
    p.add_argument("--prompt", help='sample the whole grid from this text (default: "a handwritten k" for column k)')
    p.add_argument("--device", help="cuda, mps or cpu (default: cuda, else mps, else cpu)")
    p.add_argument("--out", help=f"output folder (default: runs/{NAME}, or runs/{NAME}_distilled with --distill-guidance)")
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
        out = Path(args.out or f"runs/{NAME}{'_distilled' if args.distill_guidance else ''}")
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
