"""Imagen Video: High Definition Video Generation with Diffusion Models
Jonathan Ho, William Chan, Chitwan Saharia, Jay Whang, Ruiqi Gao, Alexey Gritsenko, Diederik P. Kingma, Ben Poole,
Mohammad Norouzi, David J. Fleet, Tim Salimans, 2022. https://arxiv.org/abs/2210.02303v1
No official code; the reference implementation is lucidrains/imagen-pytorch (imagen_video.py).

The idea (Sec. 2): a cascade of video diffusion models on a frozen text encoder. A base model draws a short clip at a
low frame rate and resolution; temporal (TSR) and spatial (SSR) super-resolution models fill in frames and enlarge
them, each conditioned on the upsampled lower stage by channel concatenation, noised to a level it is told
(conditioning augmentation; fixed at sampling). The Video U-Net is VDM's factorised space-time U-Net: temporal
attention in the base, temporal convolutions in the SR stages, the largest SSR fully convolutional. Every model
predicts v, images train jointly as single-frame videos with temporal mixing masked, sampling uses classifier-free
guidance, and progressive distillation (Salimans & Ho 2022) halves the base sampler's steps round after round: a
student learns two DDIM steps of its teacher in one; the first teacher is the guided model (guidance distilled too).

Time convention (as the paper): t = 0 is data, t = 1 is noise, z_t = alpha_t x + sigma_t eps, cosine log-SNR
(alpha_t^2 + sigma_t^2 = 1), v = alpha_t eps - sigma_t x, x_hat = alpha_t z_t - sigma_t v_hat.

Deviations from the paper:
- Three stages, not seven: base 8 frames at 16x16 (every 2nd frame of a 16-frame Moving MNIST clip, 2x2 means), TSR
  8 -> 16 frames at 16x16, SSR 16 -> 32 pixels at 16 frames (PAPERS.md's MNIST scale); small widths. Text:
  imagen.py's byte-level transformer, fitted by a probe naming both digits and frozen (stand-in for T5-XXL), pooled into
  the time embedding and cross-attended at <= 8x8 in every stage; null text "" with p 0.1; guidance written
  w v_c + (1 - w) v_u, one weight for all stages (no oscillating guidance).
- Temporal attention at <= 8x8 only (as VDM's CPU preset), temporal convs (kernel 3) at every level; the SSR has no
  self- or temporal attention but keeps the text cross-attention at 8x8. TSR/SSR train on random --window-frame
  windows (only local temporal mixing, so they run on all 16 frames at sampling); TSR fills frames by repetition.
  Joint training in the base and SSR (images: frames of other clips with their own text), not in the TSR.
- Conditioning augmentation c_aug = cos(pi t_a / 2) c + sin(pi t_a / 2) eps (exactly clean at 0), t_a ~ U[0, 1] in
  training, --aug-level at sampling (the paper's values are not given; imagen.py's 0.2).
- DDIM (eta 0) for every stage, x_hat clipped to [-1, 1]. Distillation of the base only, at a fixed guidance weight
  (no w input: Meng et al.'s w-conditioned stage skipped), Alg. 2's target and max(SNR, 1) weight, each round from
  the last EMA student with a fresh Adam at --lr, no lr decay. Adam, gradient clipping 1; bf16 autocast on CUDA.

Usage:
  python video/imagen_video.py --train --sample --data-dir ../shared/data        # all stages, then distillation
  python video/imagen_video.py --sample --base teacher --sample-steps 64          # the undistilled base
  python video/imagen_video.py --sample --cascade base --out runs/iv_base         # base only, upsampled plainly
  python video/imagen_video.py --train --resume --stage distill --distill-rounds 4   # one more halving
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
from shared import UserError, between_steps, log, moving_mnist, prompts, save_gif, save_npz, save_png  # noqa: E402

NAME = "imagen_video"

# --- config ---
@dataclass
class Config:
    ch: int = 64                 # base U-Net channels, also the text width (paper: much larger; T5-XXL)
    sr_ch: int = 32              # TSR and SSR U-Net channels
    blocks: int = 2              # residual blocks per resolution, every stage
    text_steps: int = 1000       # fit of the text encoder before it is frozen (stand-in for T5 pretraining)
    frames: int = 16             # frames of the final clip (paper: 128)
    stride: int = 2              # the base model draws every stride-th frame; TSR fills the rest
    window: int = 16             # frames per TSR / SSR training clip (a multiple of stride)
    image_frames: int = 4        # independent images appended to base and SSR clips (joint training)
    clips: int = 10000           # Moving MNIST clips generated for training
    p_uncond: float = 0.1        # prompt -> "" for classifier-free guidance
    steps: int = 20000           # training steps of the base and the TSR
    ssr_steps: int = 0           # training steps of the SSR (0: --steps; the stage that needs most on the CPU)
    batch_size: int = 32         # clips per step
    lr: float = 2e-4             # Adam, also for distillation (paper: not given)
    ema: float = 0.9999          # EMA decay per step
    sample_steps: int = 128      # DDIM steps of the undistilled base, the TSR and the SSR
    num_samples: int = 20        # clips sampled; clip k asks for digits k and k + 1 (mod 10)
    guidance: float = 3.0        # classifier-free guidance weight w (1 = conditional)
    aug_level: float = 0.2       # conditioning augmentation level t_a at sampling (training: U[0, 1])
    distill_from: int = 128      # DDIM steps of the first teacher (the guided base)
    distill_rounds: int = 4      # halvings: 128 -> 64 -> 32 -> 16 -> 8 (paper: down to 8)
    distill_steps: int = 2000    # student training steps per round
    log_every: int = 100
    ckpt_every: int = 1000

PRESETS = {
    "gpu": Config(),
    "cpu": Config(ch=16, sr_ch=16, blocks=1, text_steps=1000, window=4, steps=1200, ssr_steps=3400, batch_size=8, lr=1e-3,
                  ema=0.995, sample_steps=64, num_samples=10, distill_from=64, distill_rounds=3, distill_steps=100),
    "tiny": Config(ch=8, sr_ch=8, blocks=1, text_steps=2, frames=4, window=2, image_frames=1, clips=16, steps=2, batch_size=2,
                   sample_steps=2, num_samples=2, distill_from=4, distill_rounds=1, distill_steps=2, log_every=1, ckpt_every=1),
}
ZERO_OK = ("ssr_steps", "image_frames", "p_uncond", "ema", "guidance", "aug_level", "distill_rounds")  # others must be > 0
CHOICES, STAGES = {}, ("base", "tsr", "ssr")  # flags with a choice; the cascade

# --- model ---
def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) times, as in DDPM / Transformer."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs                                     # (B, dim/2)
    return torch.cat([args.cos(), args.sin()], -1)                        # (B, dim)

def tokenize(texts, length=48):  # tokenize, TextEncoder: same as image/imagen.py
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

def norm(c):  # norm, zero, ResBlock, Attention: same as image/edm.py, applied to frames folded into the batch
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

class CrossAttention(nn.Module):  # same as image/imagen.py: pixels attend to the text tokens
    def __init__(self, c, dim, heads=4):
        super().__init__()
        self.heads, self.norm = heads, norm(c)
        self.q, self.kv, self.out = nn.Conv2d(c, c, 1), nn.Linear(dim, 2 * c), zero(nn.Conv2d(c, c, 1))   # kv: text

    def forward(self, x, ctx, mask):                                      # x (B, C, H, W), ctx (B, L, D), mask (B, L)
        q = rearrange(self.q(self.norm(x)), "b (h d) x y -> b h (x y) d", h=self.heads)
        k, v = rearrange(self.kv(ctx), "b l (n h d) -> n b h l d", n=2, h=self.heads)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None])  # (B, heads, HW, d), no padding
        return x + self.out(rearrange(h, "b h (x y) d -> b (h d) x y", x=x.shape[2]))

class TemporalAttention(nn.Module):  # same as video/video_diffusion_models.py: attention over the frames of a pixel
    def __init__(self, c, heads=4, max_offset=31):
        super().__init__()
        self.heads, self.norm, self.max_offset = heads, norm(c), max_offset
        self.qkv, self.out = nn.Linear(c, 3 * c), zero(nn.Linear(c, c))
        self.rel = nn.Parameter(torch.zeros(heads, 2 * max_offset + 1))  # relative position bias B_rel[j - i]

    def bias(self, f, images=0):
        """(heads, F, F): B_rel[j - i] where frame i may attend to j, else -inf. The last `images` frames are
        independent images: their mask is the identity (joint image-video training, Sec. 3)."""
        i = torch.arange(f, device=self.rel.device)
        offset = (i[None] - i[:, None]).clamp(-self.max_offset, self.max_offset) + self.max_offset   # j - i
        video = i < f - images
        allowed = (video[:, None] & video[None]) | (i[:, None] == i[None])
        return self.rel[:, offset].masked_fill(~allowed, -math.inf)

    def forward(self, x, f, images=0):                                    # x (B F, C, H, W)
        h = rearrange(self.norm(x), "(b f) c x y -> (b x y) f c", f=f)    # pixels into the batch, frames a sequence
        q, k, v = rearrange(self.qkv(h), "n f (k h d) -> k n h f d", k=3, h=self.heads)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias(f, images).to(q.dtype))   # (BHW, heads, F, d)
        h = self.out(rearrange(h, "n h f d -> n f (h d)"))
        return x + rearrange(h, "(b x y) f c -> (b f) c x y", x=x.shape[2], y=x.shape[3])

class TemporalConv(nn.Module):  # the paper's idea for TSR / SSR: a convolution over the frames of each pixel
    def __init__(self, c, k=3):
        super().__init__()
        self.norm, self.conv, self.mid = norm(c), zero(nn.Conv1d(c, c, k, padding=k // 2)), k // 2
    def forward(self, x, f, images=0):                                    # x (B F, C, H, W)
        h, n = rearrange(self.norm(x), "(b f) c x y -> (b x y) c f", f=f), f - images   # images: the centre tap only
        centre = lambda v: F.conv1d(v, self.conv.weight[..., self.mid:self.mid + 1], self.conv.bias)   # noqa: E731
        h = torch.cat(([self.conv(h[..., :n])] if n else []) + ([centre(h[..., n:])] if images else []), -1)
        return x + rearrange(h, "(b x y) c f -> (b f) c x y", x=x.shape[2], y=x.shape[3])

class Block(nn.Module):
    """A ResBlock; at <= 8x8 self-attention (not if fully convolutional) and cross-attention to the text; then the
    temporal layer: attention at <= 8x8 (base) or a convolution at every resolution (TSR, SSR)."""
    def __init__(self, cin, cout, emb, dim, attn, temporal, self_attn):
        super().__init__()
        self.res = ResBlock(cin, cout, emb, 0.0)
        spatial = [Attention(cout)] * self_attn + [CrossAttention(cout, dim)] if attn else []
        mix = [TemporalAttention(cout)] if attn else []                   # as VDM on the CPU: at <= 8x8 only
        self.layers = nn.ModuleList(spatial + (mix if temporal == "attn" else [TemporalConv(cout)]))

    def forward(self, h, e, ctx, mask, f, images):                        # h (B F, C, H, W), e (B F, emb)
        h = self.res(h, e)
        for layer in self.layers:
            h = (layer(h, ctx, mask) if isinstance(layer, CrossAttention) else layer(h) if isinstance(layer, Attention)
                 else layer(h, f, images))
        return h

class UNet(nn.Module):
    """Video U-Net v(z_t, t, text[, c_aug, t_a]) on (B, 1, F, S, S), S -> S/2 -> S/4, frames folded into the batch
    (its 3x3 convs are (1, 3, 3) ones); frames meet only in the temporal layers. An SR stage (cond=True) takes the
    augmented upsampled video as a second input channel and the augmentation level t_a as an embedding."""
    def __init__(self, ch, blocks, dim, size, temporal="attn", cond=False, self_attn=True, mult=(1, 2, 2)):
        super().__init__()
        self.ch, emb, res = ch, 4 * ch, size
        mlp = lambda: nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))   # noqa: E731
        self.time, self.aug = mlp(), mlp() if cond else None              # the aug level t_a embedded (Sec. 2)
        self.text_norm, self.pool = nn.LayerNorm(dim), nn.Linear(dim, emb)
        self.inp = nn.Conv2d(2 if cond else 1, ch, 3, padding=1)          # z_t and c_aug concatenated
        block = lambda cin, cout: Block(cin, cout, emb, dim, res <= 8, temporal, self_attn)   # noqa: E731
        self.down, skips, c = nn.ModuleList(), [ch], ch
        for i, m in enumerate(mult):
            for _ in range(blocks):
                self.down.append(block(c, ch * m))
                skips.append(c := ch * m)
            if i < len(mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([block(c, c), block(c, c)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(blocks + 1):
                self.up.append(block(c + skips.pop(), ch * m))
                c = ch * m
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), zero(nn.Conv2d(c, 1, 3, padding=1)))

    def forward(self, z, t, text, c_aug=None, t_aug=None, images=0):     # z (B, 1, F, S, S), t (B,)
        b, f = z.shape[0], z.shape[2]                                     # text per frame: (B F, L, D), (B F, L)
        ctx, mask = self.text_norm(text[0]), text[1]
        pooled = (ctx * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)   # (B F, D) masked mean
        e = self.time(timestep_embedding(1000 * t, self.ch)).repeat_interleave(f, 0) + self.pool(pooled)
        if self.aug is not None:                                          # condition on c_aug and on t_a
            z, e = torch.cat([z, c_aug], 1), e + self.aug(timestep_embedding(1000 * t_aug, self.ch)).repeat_interleave(f, 0)
        h = self.inp(rearrange(z, "b c f x y -> (b f) c x y"))            # (B F, ch, S, S): frames as a batch
        hs, run = [h], lambda layer, h: layer(h, e, ctx, mask, f, images) if isinstance(layer, Block) else layer(h)
        for layer in self.down:
            hs.append(h := run(layer, h))
        for layer in self.mid:
            h = run(layer, h)
        for layer in self.up:
            h = run(layer, torch.cat([h, hs.pop()], 1) if isinstance(layer, Block) else h)
        return rearrange(self.out(h), "(b f) c x y -> b c f x y", b=b)     # (B, 1, F, S, S) v_hat, zero at init

def cascade(cfg):  # frozen text encoder; base (temporal attention); TSR, SSR (temporal convs); distillation's pair
    base, sr = (lambda: UNet(cfg.ch, cfg.blocks, cfg.ch, 16)), lambda *a, **k: UNet(cfg.sr_ch, cfg.blocks, cfg.ch, *a, **k)
    return nn.ModuleDict(dict(text=TextEncoder(cfg.ch), base=base(), tsr=sr(16, "conv", True),
                              ssr=sr(32, "conv", True, self_attn=False), teacher=base(), student=base()))

# --- diffusion ---
# log_snr, alpha_sigma, x0_hat: same as video/video_diffusion_models.py (x0_hat without its Eq. 7)
def log_snr(t, s=0.008):  # cosine lambda(t) = -log(cos((t + s)/(1 + s) pi/2)^-2 - 1) [R imagen_pytorch.py:217]
    return -torch.log((torch.cos((t + s) / (1 + s) * math.pi / 2) ** -2 - 1).clamp(min=1e-5))

def alpha_sigma(t):  # alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), as (B, 1, 1, 1, 1)
    return (lam := log_snr(t.float()).reshape(-1, 1, 1, 1, 1)).sigmoid().sqrt(), (-lam).sigmoid().sqrt()

def x0_hat(v_fn, z, t):  # x_hat = alpha_t z_t - sigma_t v_hat (v-parameterisation), clipped to [-1, 1]
    a, s = alpha_sigma(t)
    return (a * z - s * v_fn(z, t.expand(len(z)))).clamp(-1, 1)

def augment(c, t_aug):  # the paper's idea (Sec. 2): conditioning augmentation, c_aug = alpha(t_a) c + sigma(t_a) eps
    t_aug = t_aug.reshape(-1, 1, 1, 1, 1) * math.pi / 2                   # alpha = cos(pi t_a / 2) (ours); t_a = 0: c
    return t_aug.cos() * c + t_aug.sin() * torch.randn_like(c)

def tsr_input(x, stride):  # (B, C, F, S, S) -> (B, C, stride F, S, S): each low-frame-rate frame repeated
    return x.repeat_interleave(stride, 2)

def ssr_input(x):  # (B, C, F, 16, 16) -> (B, C, F, 32, 32): each frame resized bilinearly
    return F.interpolate(rearrange(x, "b c f x y -> b (c f) x y"), scale_factor=2, mode="bilinear").unflatten(1, x.shape[1:3])

def diffusion_loss(net, x, text, c=None, images=0):
    """|| v_theta(z_t, t, text[, c_aug, t_a]) - v ||^2, v = alpha_t eps - sigma_t x, t ~ U[0, 1]; SR stages see their
    conditioning c augmented to a level t_a ~ U[0, 1] they are told (Sec. 2)."""
    t, t_aug, eps = torch.rand(len(x), device=x.device), torch.rand(len(x), device=x.device), torch.randn_like(x)
    (a, s), cond = alpha_sigma(t), {} if c is None else dict(c_aug=augment(c, t_aug), t_aug=t_aug)
    return ((net(a * x + s * eps, t, text, images=images, **cond).float() - (a * eps - s * x)) ** 2).mean((1, 2, 3, 4))

def guided(net, z, t, text, null, w=1.0, **cond):  # same as image/imagen.py, on v: guidance is linear
    """Classifier-free guidance v~ = w v(z, c) + (1 - w) v(z); null = the encoding of ""."""
    v_c = net(z, t, text, **cond).float()
    return v_c if w == 1 else w * v_c + (1 - w) * net(z, t, null, **cond).float()

def ddim_step(z, x0, t, s):  # DDIM Eq. 12 (eta 0): z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t
    (a_t, s_t), (a_s, s_s) = alpha_sigma(t), alpha_sigma(s)
    return a_s * x0 + s_s * (z - a_t * x0) / s_t

@torch.no_grad()
def ddim(v_fn, noise, n, bar=False):
    """t = 1 -> 0 in n DDIM steps on t = i / n; returns z_0."""
    ts, z = torch.linspace(1, 0, n + 1, device=noise.device), noise
    for i in tqdm(range(n), desc="sample", leave=False, disable=not bar):
        z = ddim_step(z, x0_hat(v_fn, z, ts[i]), ts[i], ts[i + 1])
    return z

@torch.no_grad()
def distill_target(teacher, z, t, n):
    """Salimans & Ho 2022 Alg. 2: two teacher DDIM steps t -> t' = t - 0.5/N -> t'' = t - 1/N (N: the student's
    steps), then the x~ whose single DDIM step t -> t'' lands on z_t'': x~ = (z'' - (s''/s) z_t) / (a'' - (s''/s) a)."""
    t1, t2 = t - 0.5 / n, t - 1 / n
    z1 = ddim_step(z, x0_hat(teacher, z, t), t, t1)
    z2 = ddim_step(z1, x0_hat(teacher, z1, t1), t1, t2)
    (a, s), (a2, s2) = alpha_sigma(t), alpha_sigma(t2)
    return (z2 - s2 / s * z) / (a2 - s2 / s * a)

def distill_loss(student, teacher, x, n):
    """max(SNR, 1) || x~ - x_hat_student(z_t) ||^2 ("truncated SNR" weight), t = i / N (Alg. 2)."""
    a, s = alpha_sigma(t := torch.randint(1, n + 1, (len(x),), device=x.device) / n)
    z = a * x + s * torch.randn_like(x)                                   # z_t ~ q(z_t | x)
    x_hat = a * z - s * student(z, t).float()
    return ((a / s) ** 2).clamp(min=1).flatten() * ((x_hat - distill_target(teacher, z, t, n)) ** 2).mean((1, 2, 3, 4))

# --- train ---
@torch.no_grad()
def encode(encoder, texts, device):  # the frozen encoder's tokens and mask (Sec. 2.1): no gradient reaches it
    return encoder(tokenize(texts).to(device))[:2]

def fit_text(encoder, steps, device):  # a stand-in for T5 pretraining: a linear probe on the pooled text names the digits
    probe = nn.Linear(encoder.tok.embedding_dim, 10).to(device)    # image/imagen.py's fit, for two-digit prompts: fitted on
    opt = torch.optim.Adam([*encoder.parameters(), *probe.parameters()], lr=1e-3)   # one digit, "3 and 5" pooled kept both
    for _ in range(steps):                                            # digits only 60% of the time at width 16 (100% here)
        logits = probe(encoder(tokenize(prompts(y := torch.randint(10, (64, 2)), "random")).to(device))[2])
        opt.zero_grad(set_to_none=True)                               # multi-hot target: both digits named
        nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits).scatter_(1, y.to(device), 1)).backward()
        opt.step()
    return (logits.topk(2, 1).indices.cpu()[:, :, None] == y[:, None]).any(1).all(1).float().mean().item()   # both in top 2

def per_frame(text, f, k=0):  # (B, 1 + K, ...) -> (B (f + k), ...): a clip's text on its f frames, its K images' own
    return [torch.cat([c[:, :1].expand(-1, f, *c.shape[2:]), c[:, 1:1 + k]], 1).flatten(0, 1) for c in text]

def batch(videos, labels, cfg, p_uncond):  # the paper's idea: images trained as extra frames of a video
    """Clips (B, 1, F, 32, 32), frames of other clips (B, 1, K, 32, 32), their prompts (B (1 + K)), p_uncond of them ""."""
    n, f, b, k = *videos.shape[:2], cfg.batch_size, cfg.image_frames
    idx, other, frame = torch.randint(n, (b,)), torch.randint(n, (b, k)), torch.randint(f, (b, k))
    clip, images = (rearrange(v, "b f c x y -> b c f x y") for v in (videos[idx], videos[other, frame]))
    texts = prompts(torch.cat([labels[idx, None], labels[other]], 1).flatten(0, 1), "random")
    return clip, images, [s if r >= p_uncond else "" for s, r in zip(texts, torch.rand(len(texts)).tolist())]

def stage_data(clip, images, stride, window):
    """Per stage: (x, conditioning, image frames). Base: every stride-th frame at 16x16 + images; TSR: a window of
    16x16 frames, from its every stride-th frame repeated; SSR: a 32x32 window (+ images), from its 16x16 frames."""
    start, k = stride * int(torch.randint((clip.shape[2] - window) // stride + 1, ())), images.shape[2]
    clip16, images16 = F.avg_pool3d(torch.cat([clip, images], 2), (1, 2, 2)).split([clip.shape[2], k], 2)  # 2x2 means; one pool: k may be 0
    win16, win = clip16[:, :, start:start + window], clip[:, :, start:start + window]
    return dict(base=(torch.cat([clip16[:, :, ::stride], images16], 2), None, k),
                tsr=(win16, tsr_input(win16[:, :, ::stride], stride), 0),
                ssr=(torch.cat([win, images], 2), ssr_input(torch.cat([win16, images16], 2)), k))

def train(args, device, out, ckpt_path):
    torch.manual_seed(args.seed)
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: continue it with --resume, or pass another --out")
    state = load_ckpt(ckpt_path) if args.resume else None
    cfg = make_config(args, state["config"] if state else asdict(PRESETS[args.preset or ("cpu" if device.type == "cpu" else "gpu")]), fixed=bool(state))
    videos, labels = (a.to(device) for a in moving_mnist(args.data_dir, cfg.clips, cfg.frames))   # (N, F, 1, 32, 32)
    net, stages = cascade(cfg).to(device, memory_format=torch.channels_last), STAGES if args.stage == "all" else () if args.stage == "distill" else (args.stage,)
    if not state:
        log(out / "log.txt", f"text encoder fitted: probe accuracy {fit_text(net['text'], cfg.text_steps, device):.2f}")
    net["text"].requires_grad_(False).eval().zero_grad()                  # frozen (Sec. 2), no grads of the fit
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam([p for s in STAGES for p in net[s].parameters()], lr=cfg.lr, fused=device.type == "cuda")
    dopt = torch.optim.Adam(net["student"].parameters(), lr=cfg.lr)      # distillation's
    count = state["stage_steps"] if state else dict.fromkeys(STAGES + ("distill",), 0)   # steps trained of each stage
    limit = dict(base=cfg.steps, tsr=cfg.steps, ssr=cfg.ssr_steps or cfg.steps)   # each stage's training steps
    step = min((count[s] for s in stages if count[s] < limit[s]), default=state["step"] if state else 0)
    end = max((limit[s] for s in stages if count[s] < limit[s]), default=step)
    if state:
        for obj, key in ((net, "model"), (ema, "ema"), (opt, "opt"), (dopt, "distill_opt")):
            obj.load_state_dict(state[key])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
    fwd = {s: torch.compile(net[s]) if args.compile else net[s] for s in STAGES + ("student",)}
    sizes = ", ".join(f"{k} {sum(p.numel() for p in v.parameters()) / 1e6:.2f}M" for k, v in net.items())
    log(out / "log.txt", f"{NAME}: {sizes} parameters, {len(videos)} clips, {device}, {args.stage} from {count}, {cfg}")

    def save(done, write=True):  # a NaN/inf loss stops training before it can reach a checkpoint
        if not torch.isfinite(running).all():
            raise UserError(f"loss became {running.sum().item()} before step {done}; stopped, the last good "
                            f"checkpoint is kept at {ckpt_path} (try a lower --lr)")
        if not write:
            return
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save({"script": NAME, "config": asdict(cfg), "model": net.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict(), "distill_opt": dopt.state_dict(), "step": done, "stage_steps": dict(count),
                    "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None}, tmp)
        os.replace(tmp, ckpt_path)                                        # atomic: never a half-written file

    def update(stage, k):  # EMA with a warm-up, k steps into the stage
        torch._foreach_lerp_(list(ema[stage].parameters()), list(net[stage].parameters()), 1 - min(cfg.ema, (1 + k) / (10 + k)))

    running, seen, clock, done = torch.zeros(3, device=device), 0, time.time(), step
    try:
        for done in between_steps(tqdm(range(step, end), initial=step, total=end, desc="train")):
            clip, images, texts = batch(videos, labels, cfg, cfg.p_uncond)
            todo = [s for s in stages if count[s] <= done < limit[s]]     # a stage ahead of the others waits
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                ctx, mask = (c.unflatten(0, (len(clip), -1)) for c in encode(net["text"], texts, device))
                data = stage_data(clip, images, cfg.stride, cfg.window)
                losses = [diffusion_loss(fwd[s], x, per_frame((ctx, mask), x.shape[2] - k, k), c, k).mean()
                          if s in todo else clip.new_zeros((), requires_grad=True) for s, (x, c, k) in data.items()]
            opt.zero_grad(set_to_none=True)
            sum(losses).backward()                                        # disjoint parameters: independent stages
            nn.utils.clip_grad_norm_([p for s in STAGES for p in net[s].parameters()], 1.0)
            opt.step()
            for s in todo:
                update(s, count[s])
                count[s] += 1
            running, seen, done = running + torch.stack(losses).detach(), seen + 1, done + 1
            if done % cfg.log_every == 0 or done == end:
                save(done, write=False)
                loss = " ".join(f"{s} {v / seen:.4f}" for s, v in zip(STAGES, running.tolist()) if s in todo)
                log(out / "log.txt", f"step {done} loss {loss} clips/s {seen * cfg.batch_size / (time.time() - clock):.1f}")
                running, seen, clock = torch.zeros(3, device=device), 0, time.time()
            if done % cfg.ckpt_every == 0 or done == end:
                save(done)
        total = cfg.distill_rounds * cfg.distill_steps                    # progressive distillation of the base
        if args.stage in ("all", "distill") and count["distill"] < total:
            if count["base"] == 0:
                raise UserError("the base stage is untrained: --train --stage base first")
            null, seen = encode(net["text"], [""], device), 0
            for k in between_steps(tqdm(range(count["distill"], total), initial=count["distill"], total=total, desc="distill")):
                r, i = divmod(k, cfg.distill_steps)
                n = cfg.distill_from // 2 ** (r + 1)                      # the student's steps this round
                if i == 0:  # a new round: the teacher is the last EMA student (round 0: the EMA base)
                    net["teacher"].load_state_dict(ema["base" if r == 0 else "student"].state_dict())
                    for m in (net["student"], ema["student"]):
                        m.load_state_dict(net["teacher"].state_dict())
                    dopt = torch.optim.Adam(net["student"].parameters(), lr=cfg.lr)
                clip, _, texts = batch(videos, labels, replace(cfg, image_frames=0), 0.0)
                x, text = F.avg_pool3d(clip[:, :, ::cfg.stride], (1, 2, 2)), per_frame(
                    [c[:, None] for c in encode(net["text"], texts, device)], cfg.frames // cfg.stride)
                nulls = [c.expand(len(text[0]), *c.shape[1:]) for c in null]
                teacher = ((lambda z, t: guided(net["teacher"], z, t, text, nulls, cfg.guidance)) if r == 0 else
                           (lambda z, t: net["teacher"](z, t, text).float()))   # round 0 distils the guidance too
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    loss = distill_loss(lambda z, t: fwd["student"](z, t, text), teacher, x, n).mean()
                dopt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(net["student"].parameters(), 1.0)
                dopt.step()
                update("student", i)
                running, seen, count["distill"] = running + loss.detach(), seen + 1, k + 1
                if (i + 1) % cfg.log_every == 0 or i + 1 == cfg.distill_steps:
                    save(done, write=False)
                    log(out / "log.txt", f"distill step {k + 1} round {r + 1} ({2 * n} -> {n} steps) loss {running[0].item() / seen:.4f}")
                    running, seen = torch.zeros(3, device=device), 0
                if (k + 1) % cfg.ckpt_every == 0 or i + 1 == cfg.distill_steps:
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
    cfg, count = make_config(args, state["config"]), state["stage_steps"]
    run = STAGES[:STAGES.index(args.cascade) + 1]                         # later stages: plain upsampling
    if untrained := [s for s in run if count[s] == 0]:
        raise UserError(f"the {untrained[0]} stage of {ckpt_path} is untrained: --train --resume --stage {untrained[0]}")
    rounds = -(-count["distill"] // cfg.distill_steps)                    # rounds begun; the student's steps:
    student = args.base == "student" or args.base == "auto" and rounds > 0
    if student and rounds == 0:
        raise UserError(f"{ckpt_path} has no distilled base: --train --resume --stage distill")
    net = cascade(cfg).to(device, memory_format=torch.channels_last).eval()
    net.load_state_dict(state["ema"])
    k = torch.arange(cfg.num_samples) % 10
    y = torch.stack([k, (k + 1) % 10], 1)                                 # clip k: digits k and k + 1
    texts, f0 = prompts(y, "digit"), cfg.frames // cfg.stride             # "3 and 4"
    text, null = ([c[:, None] for c in encode(net["text"], t, device)] for t in (texts, [""] * len(y)))
    g = torch.Generator().manual_seed(args.seed)
    noise = [torch.randn(len(y), 1, f, n, n, generator=g).to(device) for f, n in ((f0, 16), (cfg.frames, 16), (cfg.frames, 32))]
    torch.manual_seed(args.seed)                                          # the noise of the conditioning augmentation
    t_aug, clock = torch.full((len(y),), cfg.aug_level, device=device), time.time()   # fixed at sampling (Sec. 2)
    v = lambda s, f, **c: lambda z, t: guided(net[s], z, t, per_frame(text, f), per_frame(null, f), cfg.guidance, **c)   # noqa: E731
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        n_base = cfg.distill_from // 2 ** rounds if student else cfg.sample_steps   # distilled: guidance inside
        base = (lambda z, t: net["student"](z, t, per_frame(text, f0))) if student else v("base", f0)   # noqa: E731
        x = ddim(base, noise[0], n_base, bar=True)                        # (B, 1, F / stride, 16, 16)
        x = tsr_input(x.clamp(-1, 1), cfg.stride)                         # (B, 1, F, 16, 16)
        if "tsr" in run:
            x = ddim(v("tsr", cfg.frames, c_aug=augment(x, t_aug), t_aug=t_aug), noise[1], cfg.sample_steps, bar=True)
        x = ssr_input(x.clamp(-1, 1))                                     # (B, 1, F, 32, 32)
        if "ssr" in run:
            x = ddim(v("ssr", cfg.frames, c_aug=augment(x, t_aug), t_aug=t_aug), noise[2], cfg.sample_steps, bar=True)
    videos = rearrange(x.float().clamp(-1, 1), "b c f x y -> b f c x y")
    save_png(out / "samples.png", videos.flatten(0, 1), nrow=videos.shape[1])   # one clip per row
    save_gif(out / "samples.gif", videos.transpose(0, 1))                 # (F, N, 1, 32, 32): the clips play
    save_npz(out / "samples.npz", videos=videos, labels=y, prompts=texts)
    print(f"wrote {out}/samples.png, samples.gif, samples.npz: {len(y)} clips of {videos.shape[1]} frames {count}; "
          f"{f'distilled base ({rounds} rounds)' if student else 'base'} {n_base} steps, then {'+'.join(run[1:]) or 'no SR'} {cfg.sample_steps} steps; guidance "
          f"{cfg.guidance}, aug level {cfg.aug_level}; {time.time() - clock:.1f} s")

# --- cli ---
HELP = dict(re.findall(r"^    (\w+): \w+ = [^#\n]*# (.*)$", Path(__file__).read_text(), re.M))  # Config's comments

def make_config(args, base, fixed=True):
    """A checkpoint's (fixed=True) or preset's config, overridden by the flags on the command line."""
    if unknown := set(base) - {f.name for f in fields(Config)}:
        raise UserError(f"the checkpoint comes from another version of {NAME}.py: unknown config {sorted(unknown)}")
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    for key in ("ch", "sr_ch", "blocks", "frames", "stride"):
        if fixed and key in given and given[key] != base[key]:
            raise UserError(f"--{key.replace('_', '-')} {given[key]} does not match the checkpoint's {base[key]}")
    cfg = replace(Config(**base), **given)
    if cfg.frames % cfg.stride or cfg.window % cfg.stride or cfg.window > cfg.frames or cfg.aug_level > 1 \
            or cfg.distill_from % 2 ** cfg.distill_rounds or cfg.ch % 4 or cfg.sr_ch % 2:
        raise UserError("need --frames and --window multiples of --stride, --window at most --frames, --aug-level "
                        "at most 1, --distill-from divisible by 2^--distill-rounds, --ch divisible by 4, an even --sr-ch")
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
        kind = (dict(choices=CHOICES[f.name]) if f.name in CHOICES
                else dict(metavar="N", type=number(f.type, f.name in ZERO_OK)))
        p.add_argument(f"--{f.name.replace('_', '-')}", **kind,
                       help=f"{HELP.get(f.name, '')} [gpu {getattr(PRESETS['gpu'], f.name)}, cpu {getattr(PRESETS['cpu'], f.name)}]")
    p.add_argument("--stage", choices=("all", *STAGES, "distill"), default="all", help="what --train trains "
                   "(default all: the three stages on the same batches, then distillation)")
    p.add_argument("--base", choices=("auto", "teacher", "student"), default="auto", help="--sample's base model: "
                   "the distilled one or the teacher with --sample-steps (default auto: the student when distilled)")
    p.add_argument("--cascade", choices=STAGES, default="ssr", help="the last stage --sample runs; then frames are "
                   "repeated, resized bilinearly (default: ssr)")
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
