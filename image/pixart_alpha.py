"""PixArt-α: "Fast Training of Diffusion Transformer for Photorealistic Text-to-Image Synthesis"
Junsong Chen et al., 2023. https://arxiv.org/abs/2310.00426v3. Code: github.com/PixArt-alpha/PixArt-alpha (PixArt.py)

The idea: cheap text-to-image training. Decompose it (Sec. 2.2): pixels first (class-conditional), then text-image
alignment, then aesthetics. Adapt DiT to text (Sec. 2.3): a cross-attention to the text tokens in every block, and
adaLN-single: one MLP gives t0 = t_block(t_emb) for all blocks, block i adds its table E(i). Re-parameterisation: E(i)
such that S(i) = t0 + E(i) at t = 500 equals DiT block i's adaLN output for the null class, so a class-conditional
DiT (stage 1: an image/dit.py checkpoint, --init-from) starts the text model. --stage 2 trains on prompts of random
style ("7", "seven", "a handwritten seven"); --stage 1, without a DiT, on prompts "7" only.
Time convention (DDPM, official): discrete t = 0..999, t = 0 is one small step from the data, t = 999 nearly noise.

Deviations from the paper:
- Text: a byte-level encoder (paper: T5-XXL), fitted first by a linear probe naming the prompt's digit (as imagen.py),
  then frozen as T5 is; null caption "" (official: a buffer). y_proj Xavier-initialised (official: std 0.02, with which
  a jointly trained encoder had taught the cross-attention no prompt after 2000 CPU steps: eps("zero") ~ eps("seven")).
- No stage 3 (high resolution, aesthetics): MNIST has one size. dit.py's autoencoder (1x32x32 -> 4x8x8, taken from the
  --init-from checkpoint, else trained first; paper: the pretrained SD VAE). Guidance on eps only (official: [:3]).
  gpu 256 x 8 blocks, p=1; cpu 96 x 4, p=2 (paper: 1152 x 28, p=2 of 32x32 latents). Fewer steps, higher lr (paper:
  2e-5), no lr warm-up, no grad clipping of the transformer (paper: 0.01-1), EMA warm-up, bf16 on CUDA (paper: fp16).

Usage:
  python image/pixart_alpha.py --train --sample --init-from runs/dit/ckpt.pt --data-dir ../shared/data   # from DiT
  python image/pixart_alpha.py --train --stage 1 --out runs/pixart_s1   # or stage 1, then --init-from runs/pixart_s1/ckpt.pt
  python image/pixart_alpha.py --sample --prompt "a handwritten three" --guidance 4
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
from shared import UserError, between_steps, log, mnist, prompts, save_gif, save_npz, save_png  # noqa: E402

NAME = "pixart_alpha"

# --- config ---
@dataclass
class Config:
    ae_ch: int = 32              # autoencoder width, as dit.py's (paper: the pretrained SD VAE)
    z_ch: int = 4                # latent channels: 1 x 32 x 32 -> z_ch x 8 x 8 (paper: 4, x8 in space)
    ae_steps: int = 3000         # autoencoder steps of batch_size images first, if not --init-from
    ae_lr: float = 3e-3          # its AdamW learning rate
    hidden: int = 256            # transformer width D, also of the text encoder (paper: PixArt-XL 1152)
    depth: int = 8               # PixArt blocks (paper: 28)
    heads: int = 4               # attention heads (paper: 16)
    patch: int = 1               # patch size p of the 8 x 8 latent: (8/p)^2 tokens (paper: 2 of 32 x 32)
    text_steps: int = 1000       # fit of the text encoder before it is frozen (stand-in for T5 pretraining)
    p_uncond: float = 0.1        # caption dropout to "", for classifier-free guidance (paper: 0.1, to y_embedding)
    stage: int = 2               # 1: class prompts "7"; 2: text-image alignment, prompts of random style (paper: 3 stages)
    steps: int = 30000           # training steps (official 256 px config: 200 epochs)
    batch_size: int = 128        # official 256 px config: 176 per GPU, 32 in the base config
    lr: float = 3e-4             # AdamW, weight decay 0.03, eps 1e-10 as official; no warm-up (official: 2e-5, 1000 warm-up)
    ema: float = 0.9999          # EMA decay per step (paper: 0.9999)
    sample_steps: int = 250      # respaced ancestral steps of the 1000 (official eval_sampling_steps: 250)
    num_samples: int = 100
    guidance: float = 4.0        # classifier-free guidance scale on eps (official config: cfg_scale 4)
    log_every: int = 100
    ckpt_every: int = 1000

PRESETS = {
    "gpu": Config(),
    "cpu": Config(ae_steps=1500, hidden=96, depth=4, patch=2, text_steps=300, batch_size=64, steps=6000, lr=1e-3, ema=0.999,
                  sample_steps=100, guidance=2.0),
    "tiny": Config(ae_ch=8, ae_steps=2, hidden=16, depth=1, patch=2, text_steps=2, batch_size=4, steps=2, sample_steps=2,
                   num_samples=10, log_every=1, ckpt_every=1),
}
ZERO_OK, ARCH = ("p_uncond", "guidance", "ema"), ("ae_ch", "z_ch", "hidden", "depth", "heads", "patch")  # fixed by a checkpoint

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

class PixArtBlock(nn.Module):  # the paper's idea (Sec. 2.3, Fig. 4): a DiT block, cross-attention, adaLN-single
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # no parameters: shared by both branches
        self.attn, self.cross = (nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(2))  # cross: kv = text
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)   # E(i), official init
    def forward(self, x, y, mask, t0):                                    # x (B, N, D), y (B, L, D), mask (B, L), t0 (B, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table + t0.view(len(x), 6, -1)).chunk(6, 1)
        h = modulate(self.norm(x), shift1, scale1)                        # S(i) = t0 + E(i): each (B, 1, D)
        x = x + gate1 * self.attn(h, h, h, need_weights=False)[0]
        x = x + self.cross(x, y, y, key_padding_mask=~mask, need_weights=False)[0]   # no norm, no gate (official)
        return x + gate2 * self.mlp(modulate(self.norm(x), shift2, scale2))

class PixArt(nn.Module):  # latent (B, C, 8, 8), t, caption ids -> eps and v, (B, 2C, 8, 8); no class branch
    def __init__(self, hidden=256, depth=8, heads=4, patch=1, size=8, channels=4):
        super().__init__()
        self.patch, self.grid = patch, size // patch
        self.x_embed = nn.Linear(patch * patch * channels, hidden)       # = official PatchEmbed, Conv2d(kernel=stride=p)
        self.register_buffer("pos", sincos_2d(hidden, self.grid), persistent=False)   # fixed, not trained
        self.t_embed = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))   # adaLN-single: one for all blocks
        self.text = TextEncoder(hidden)                                   # fitted, then frozen (see the docstring)
        self.y_proj = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(PixArtBlock(hidden, heads) for _ in range(depth))
        self.final = nn.Linear(hidden, patch * patch * 2 * channels)     # T2IFinalLayer; learned Sigma: eps and v
        self.final_table = nn.Parameter(torch.randn(2, hidden) / hidden ** 0.5)   # its shift and scale, official init
        zero = [b.cross.out_proj for b in self.blocks] + [self.final]     # important: zero cross-attn output
        for m in (m for n, m in self.named_modules() if isinstance(m, nn.Linear) and not n.startswith("text.")):
            nn.init.zeros_(m.weight) if m in zero else nn.init.xavier_uniform_(m.weight)   # official initialize_weights
            nn.init.zeros_(m.bias)
        for m in (*self.t_embed[::2], self.t_block[1]): nn.init.normal_(m.weight, std=0.02)   # noqa: E701
    def forward(self, x, t, y):                                           # x (B, C, 8, 8), t (B,), y (B, L) token ids
        y, mask = self.y_proj(self.text(y)[0]), y > 0                     # caption embedder on the tokens (no pooled text)
        h = self.x_embed(patchify(x, self.patch)) + self.pos             # (B, N, D), N = (8/p)^2
        t = self.t_embed(timestep_embedding(t, 256))                      # (B, D)
        t0 = self.t_block(t)                                              # (B, 6D), computed once, shared by every block
        for block in self.blocks:
            h = block(h, y, mask, t0)                                     # (B, N, D)
        shift, scale = (self.final_table + t[:, None]).chunk(2, 1)       # final layer: its table + t (not t0), (B, 1, D)
        h = self.final(modulate(nn.functional.layer_norm(h, h.shape[-1:], eps=1e-6), shift, scale))   # (B, N, p*p*2C)
        return unpatchify(h, self.patch, self.grid)                       # (B, 2C, 8, 8), zero at init

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

@torch.no_grad()
def from_dit(net, dit, t=500):  # re-parameterisation (Sec. 2.3) from a dit.py state dict; t_block, cross-attn keep init
    copied = r"(x_embed|t_embed|final\.linear|blocks\.\d+\.(attn|mlp))\."  # patch embed, t embedder, attention, MLP, out
    net.load_state_dict({k.replace("final.linear", "final"): v for k, v in dit.items() if re.match(copied, k)}, strict=False)
    t_emb = net.t_embed(timestep_embedding(torch.tensor([t]), 256))[0]   # (D,), DiT's own embedder now
    c, t0 = nn.functional.silu(t_emb + dit["y_embed.weight"][-1]), net.t_block(t_emb).view(6, -1)  # last row: null class
    ada = lambda k, n: (dit[f"{k}.ada.1.weight"] @ c + dit[f"{k}.ada.1.bias"]).view(n, -1)  # noqa: E731, DiT's adaLN(c)
    for i, block in enumerate(net.blocks):
        block.scale_shift_table.copy_(ada(f"blocks.{i}", 6) - t0)         # S(i) = t0 + E(i) = DiT block i's (6, D)
    net.final_table.copy_(ada("final", 2) - t_emb)                        # the final layer adds t_emb itself, not t0

# --- diffusion ---
NULL, T, LAMBDA = tokenize([""]), 1000, 1e-3   # the empty prompt (BOS only); diffusion steps; weight of L_vlb (IDDPM Eq. 16)
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
    """Posterior mean at x0_hat (DDPM Eqs. 7, 15), learned-range log variance f log beta + (1 - f) log beta_tilde (IDDPM Eq. 15)."""
    eps, v = out.chunk(2, 1)
    log_var = (v + 1) / 2 * s["log_beta"][t] + (1 - v) / 2 * s["log_beta_tilde"][t]
    x0 = (xt - (1 - s["alpha_bar"][t]).sqrt() * eps) / s["alpha_bar"][t].sqrt()   # DDPM Eq. 15; unclipped on latents (sample.py)
    return s["coef_x0"][t] * x0 + s["coef_xt"][t] * xt, log_var, x0

def vb_term(s, out, x0, xt, t):
    """L_t in bits/dim (IDDPM Sec. 2.1): KL(q(x_t-1 | x_t, x_0) || p(x_t-1 | x_t)); at t = 0 the discretized NLL (DDPM 3.3)."""
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
    eps_hat, v = net(xt, t, y).float().chunk(2, 1)                        # captions dropped before (train loop)
    frozen = torch.cat([eps_hat.detach(), v], 1)                          # important: stop-gradient on the mean
    return ((eps - eps_hat) ** 2).mean((1, 2, 3)) + LAMBDA * T * vb_term(s, frozen, x0, xt, t)   # (B,)

def guided(net, x, t, y, w=1.0):
    """Classifier-free guidance eps_u + w (eps_c - eps_u) on eps only, v from the conditional half (see the docstring)."""
    if w == 1:
        return net(x, t, y).float()
    out_c, out_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, NULL.to(y).expand_as(y)])).float().chunk(2)
    c = x.shape[1]                                                        # image channels: eps is out[:, :c]
    return torch.cat([out_u[:, :c] + w * (out_c[:, :c] - out_u[:, :c]), out_c[:, c:]], 1)

@torch.no_grad()
def ddpm_sample(model, noise, n, frames=20, bar=False):
    """Ancestral sampling (DDPM Alg. 2) on n respaced steps, the model at the original t; x0_hat of ~frames steps, x_0."""
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
def fit_text(encoder, steps, device):  # a stand-in for T5 pretraining: a linear probe on the pooled text names the digit
    probe = nn.Linear(encoder.tok.embedding_dim, 10).to(device)
    opt = torch.optim.Adam([*encoder.parameters(), *probe.parameters()], lr=1e-3)   # not --lr: fixed, no diffusion
    for _ in range(steps):
        logits = probe(encoder(tokenize(prompts(y := torch.randint(10, (64,)), "random")).to(device))[2])
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(logits, y.to(device)).backward()
        opt.step()
    return (logits.argmax(1).cpu() == y).float().mean().item()

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
    src = load_ckpt(args.init_from, ("dit", NAME)) if args.init_from and not state else None   # stage 1 or a DiT
    base = state["config"] if state else asdict(PRESETS[args.preset or ("cpu" if device.type == "cpu" else "gpu")])
    cfg = make_config(args, {**base, **{k: src["config"][k] for k in ARCH}} if src else base, fixed=bool(state or src))
    x, y = mnist(args.data_dir)                                           # labels and prompts stay on the CPU
    net, x = PixArt(cfg.hidden, cfg.depth, cfg.heads, cfg.patch, channels=cfg.z_ch), x.to(device)
    ae = Autoencoder(cfg.ae_ch, cfg.z_ch).to(device)
    if src:                                                               # sizes from src; its EMA weights
        from_dit(net, src["ema"]) if src["script"] == "dit" else net.load_state_dict(src["ema"])
    if state or src:                                                      # the autoencoder of the run, or of src
        ae.load_state_dict((state or src)["ae"])
    else:                                                                 # none to start from: train one first
        train_autoencoder(ae, x, cfg, device, out)
    with torch.no_grad():
        z = torch.cat([ae.encode(b) for b in x.split(1000)])             # (N, z_ch, 8, 8), the data from here on
    if not state and not (src and src["script"] == NAME):                # a stage-1 PixArt brings its fitted encoder
        log(out / "log.txt", f"text encoder fitted: probe accuracy {fit_text(net.text.to(device), cfg.text_steps, device):.2f}")
    net.text.requires_grad_(False).zero_grad(set_to_none=True)            # frozen, as T5 is; no grads of the fit
    ema = copy.deepcopy(net.to(device)).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.03, eps=1e-10, fused=device.type == "cuda")
    sched, step = schedule(BETAS, device), state["step"] if state else 0
    if state:
        for obj, key in ((net, "model"), (ema, "ema"), (opt, "opt")):
            obj.load_state_dict(state[key])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
    fwd = torch.compile(net) if args.compile else net
    log(out / "log.txt", f"{NAME}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {len(x)} images, "
                         f"{device}, step {step}/{cfg.steps}, {cfg}" + (f", from {args.init_from}" if src else ""))
    def save(done, write=True):  # a NaN/inf loss stops training before it can reach a checkpoint
        if not torch.isfinite(running):
            raise UserError(f"loss became {running.item()} before step {done}; stopped, the last good "
                            f"checkpoint is kept at {ckpt_path} (try a lower --lr)")
        if write:
            tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
            torch.save({"script": NAME, "config": asdict(cfg), "model": net.state_dict(), "ema": ema.state_dict(),
                        "opt": opt.state_dict(), "ae": ae.state_dict(), "step": done, "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None}, tmp)
            os.replace(tmp, ckpt_path)                                    # atomic: never a half-written file

    running, seen, clock, done = torch.zeros((), device=device), 0, time.time(), step
    try:
        for done in between_steps(tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train")):
            idx = torch.randint(len(x), (cfg.batch_size,))                # on the CPU, where the prompts are made
            texts = prompts(y[idx], "digit" if cfg.stage == 1 else "random")   # stage 1: class prompts "7" only
            ids = tokenize(["" if drop else s for s, drop in zip(texts, torch.rand(len(idx)) < cfg.p_uncond)]).to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = dit_loss(fwd, sched, z[idx.to(device)], ids)      # (B,)
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
def load_ckpt(path, scripts=(NAME,)):
    if not (path := Path(path)).is_file():
        raise UserError(f"no checkpoint at {path}: train one first with --train (or pass --ckpt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): it may be truncated") from None
    if (who := state.get("script") if isinstance(state, dict) else None) not in scripts:
        raise UserError(f"{path} is a checkpoint of {who or 'another program'}, not of {' or '.join(s + '.py' for s in scripts)}")
    if "z_ch" not in state.get("config", {}):                             # before 2026-12-07 both ran in pixel space
        raise UserError(f"{path} comes from an older, pixel-space {who}.py: train a new one")
    return state

def sample(args, device, out, ckpt_path):
    cfg = make_config(args, (state := load_ckpt(ckpt_path))["config"])
    net = PixArt(cfg.hidden, cfg.depth, cfg.heads, cfg.patch, channels=cfg.z_ch).to(device).eval()
    ae = Autoencoder(cfg.ae_ch, cfg.z_ch).to(device).eval()
    for module, key in ((net, "ema"), (ae, "ae")):
        module.load_state_dict(state[key])
    y = torch.arange(cfg.num_samples) % 10                                # column k of the grid is digit k
    texts = [args.prompt] * len(y) if args.prompt is not None else prompts(y, "digit" if cfg.stage == 1 else "sentence")
    ids = tokenize(texts).to(device)                                      # stage 1 knows only "7"-style prompts
    noise = torch.randn(len(y), cfg.z_ch, 8, 8, generator=torch.Generator().manual_seed(args.seed)).to(device)
    torch.manual_seed(args.seed)                                          # the noise of each step
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        z = ddpm_sample(lambda x, t: guided(net, x, t, ids, cfg.guidance), noise, cfg.sample_steps, bar=True)
        with torch.no_grad():
            traj = ae.decode(z.flatten(0, 1)).float().clamp(-1, 1).unflatten(0, z.shape[:2])   # (K, B, 1, 32, 32)
    save_png(out / "samples.png", traj[-1])
    save_gif(out / "samples.gif", traj)                                   # x0_hat every ~n/20 steps, then x_0
    save_npz(out / "samples.npz", images=traj[-1], prompts=texts, labels=None if args.prompt is not None else y)
    print(f"wrote {out}/samples.png, .gif, .npz: {len(y)} samples (step {state['step']}) of prompts like {texts[-1]!r}, "
          f"{cfg.sample_steps} respaced steps ({cfg.sample_steps * (1 + (cfg.guidance != 1))} NFE), guidance {cfg.guidance}")

# --- cli ---
HELP = dict(re.findall(r"^    (\w+): \w+ = [^#\n]*# (.*)$", Path(__file__).read_text(), re.M))  # Config's comments

def make_config(args, base, fixed=True):
    """A checkpoint's (fixed=True) or preset's config, overridden by the flags on the command line."""
    if unknown := set(base) - {f.name for f in fields(Config)}:
        raise UserError(f"the checkpoint comes from another version of {NAME}.py: unknown config {sorted(unknown)}")
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    if fixed and (bad := [k for k in ARCH if k in given and given[k] != base[k]]):
        raise UserError(f"--{bad[0]} {given[bad[0]]} does not match the checkpoint's {base[bad[0]]}")
    cfg = replace(Config(**base), **given)
    if 8 % cfg.patch or cfg.hidden % 4 or cfg.hidden % cfg.heads or not 2 <= cfg.sample_steps <= T or cfg.stage > 2 or cfg.ae_ch % 2:
        raise UserError(f"need --patch dividing 8, --hidden divisible by 4 and --heads, 2 <= --sample-steps <= {T}, --stage 1 or 2, "
                        "an even --ae-ch")
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
    p.add_argument("--init-from", metavar="CKPT", help="train from the EMA of a dit.py (re-parameterised) or stage-1 checkpoint")
    p.add_argument("--prompt", help='sample the whole grid from this text (default: "a handwritten k", stage 1 "k", in column k)')
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
        (out := Path(args.out or f"runs/{NAME}")).mkdir(parents=True, exist_ok=True)
        ckpt_path = Path(args.ckpt) if args.ckpt else out / "ckpt.pt"
        if args.train:
            train(args, device, out, ckpt_path)
        if args.sample:
            sample(args, device, out, ckpt_path)
    except (UserError, OSError, KeyboardInterrupt) as e:                  # OSError: e.g. --out is a file, the disk full
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else f"error: {e}")   # Ctrl-C outside the training steps: 130

if __name__ == "__main__":
    main()
