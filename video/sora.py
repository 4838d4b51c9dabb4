"""Sora: "Video generation models as world simulators"
OpenAI (Tim Brooks, Bill Peebles, Connor Holmes et al.), 2024, technical report (no paper, no code):
https://openai.com/index/video-generation-models-as-world-simulators/ ; review: https://arxiv.org/abs/2402.17177v1
(Liu et al. 2024). Unofficial reference for the undisclosed parts: hpcaitech/Open-Sora (opensora/models/stdit/stdit3.py).

The idea: a video compression network, trained first, maps a clip to a latent that is smaller in time AND space;
the latent is cut into spacetime patches, which are the tokens of a diffusion transformer conditioned on text. As
tokens are just a sequence, one model trains on clips of any duration (images are one-frame videos) and samples any
(T, H, W): the output size is the grid of noise patches it starts from. Known frames (an image to animate, a video to
extend) are given as clean latent tokens, marked as t = 0 in their modulation (Open-Sora's x_mask).

Time convention (rectified flow as image/sd3.py; Sora's objective is not disclosed, this is our assumption):
t = 0 is data, t = 1 is noise, z_t = (1 - t) x0 + t eps, the network predicts v = eps - x0, sampled t = 1 -> 0.

Deviations from the paper (most of Sora is undisclosed; every choice below is an assumption):
- Compression network: a small 3D-conv autoencoder, 1 x T x 32 x 32 -> z_ch x T/2 x 8 x 8 (x2 in time, x4 in space),
  MSE plus a small latent L2 penalty (not a KL-VAE), stage 1 of one run, then frozen; latents divided by their std.
  Each latent frame codes its 2 frames on their own (chunks folded into the batch), so any T encodes as trained (a
  version with context across chunks, trained on 8 frames, reconstructed 16-frame clips twice as badly in the middle).
  8 latent channels (PAPERS' 4 x 4 x 8 x 8 has 4: 1000 CPU steps of that reconstructed held-out clips at MSE 0.097).
  x2 in time, not PAPERS' x4: trained alike (3600 steps x 16 windows, lr 3e-3), x4 reconstructed 50 held-out clips at
  MSE 0.018 (digit_score of the reconstructions: acc 0.58) and x2 at 0.011 (acc 0.69; the real clips: 0.78), and the
  same DiT trained 2800 steps on each latent drew samples at fd 323 (x4) and 239 (x2).
  An image is encoded as a still 2-frame clip (one latent frame) and decoded to its first frame (later video VAEs
  encode the first frame causally instead). Image prompting (--animate) therefore makes the first latent frame the
  image's still, known: the video holds the image for 2 frames, then moves; training replaces a known first latent
  frame by the still of the clip's first frame half the time so that this is in distribution.
- Diffusion: rectified flow, logit-normal t, v = eps - x0, Euler sampler, classifier-free guidance (all assumed).
- Transformer: our DiT blocks over [text tokens; spacetime tokens] in one sequence (in-context text, as Flux's single
  stream blocks) plus the pooled text in the adaLN-Zero vector; QK-RMSNorm; 3D RoPE (axes time, row, col, as Flux's
  multi-axis RoPE) so any (T, H, W) works; spacetime patch 1 x p x p of the latent (Open-Sora: 1 x 2 x 2).
- Text: a byte-level encoder fitted by a linear probe naming both digits, then frozen (as image/imagen.py; Sora: not
  disclosed). No re-captioning (DALL-E 3 style) and no prompt expansion: shared/ gives only the two digit labels, not
  the generator's directions, speeds and bounces, so captions are "3 and 5" / "three and five" / "a handwritten ...".
- Variable durations by bucketing, not NaViT packing: one duration per batch, images (1/5 of batches), 2, 8 or 16
  frames (1/5, 1/5, 2/5; latent 1, 1, 4, 8 frames), batch sizes scaled so every batch has the same number of tokens.
  The 2- and 8-frame clips are windows of the 16-frame latents (crops in time, where Sora trains on native lengths).
  One resolution and aspect ratio: shared/'s Moving MNIST is 32 x 32 only, so other sizes (--height, --width) sample
  with the same weights through RoPE but were never trained on.
- The report's transformer "predicts the original clean patches"; ours predicts v = eps - x0 (x0 = z_t - t v).
  Text tokens take the sample's t in their modulation; only known video tokens take t = 0.
- Prompting with videos: --extend (forward extension from the last --cond-frames frames, autoregressive windows);
  training masks a random prefix or suffix of latent frames, so backward extension also works through the sampler's
  `known` mask, but has no flag. No interpolation/connection of two videos and no SDEdit video-to-video.
- Small sizes, few steps, AdamW without weight decay, EMA warm-up, bf16 autocast on CUDA.

Usage:
  python video/sora.py --train --sample --data-dir ../shared/data
  python video/sora.py --sample --frames 8                        # another duration, same weights
  python video/sora.py --sample --frames 1                        # images: one-frame videos
  python video/sora.py --sample --extend 16 --cond-frames 8       # 32 frames, each window knows the last 8
  python video/sora.py --sample --animate 1                       # image prompting: new clips' first frames move
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

NAME = "sora"

# --- config ---
@dataclass
class Config:
    ae_ch: int = 32              # compression network width (not disclosed)
    z_ch: int = 8                # latent channels: 1 x 16 x 32 x 32 -> z_ch x 8 x 8 x 8
    hidden: int = 256            # transformer width D, also the text encoder's
    depth: int = 8               # DiT blocks
    heads: int = 4               # attention heads
    patch: int = 2               # spacetime patch 1 x p x p of the latent (Open-Sora: 1 x 2 x 2)
    clip_frames: int = 16        # longest training clip; buckets: images, 2, clip/2 and clip frames
    frames: int = 16             # sampled duration: 1 (an image) or a multiple of 2
    height: int = 32             # sampled height, a multiple of 4p (trained at 32 only)
    width: int = 32              # sampled width, a multiple of 4p (trained at 32 only)
    clips: int = 10000           # Moving MNIST clips generated for training (1/20 held out from stage 1)
    vae_steps: int = 3000        # stage 1: the first vae_steps of --steps train the compression network
    vae_batch: int = 64          # stage 1: 4-frame windows per step (2 latent frames), a quarter of them stills
    vae_lr: float = 3e-4         # stage 1: AdamW learning rate (not disclosed)
    text_steps: int = 1000       # fit of the text encoder before it is frozen (stand-in for T5 pretraining)
    p_uncond: float = 0.1        # prompt -> "" for classifier-free guidance
    p_known: float = 0.25        # clips trained with a known prefix or suffix of latent frames (x_mask)
    steps: int = 23000           # training steps of both stages together
    batch_size: int = 32         # clips per DiT step at the longest duration; shorter ones get more (same tokens)
    lr: float = 3e-4             # AdamW
    ema: float = 0.9999          # EMA decay per step
    sample_steps: int = 50       # Euler steps
    num_samples: int = 20        # clips sampled; clip k asks for digits k and k + 1 (mod 10)
    guidance: float = 2.0        # classifier-free guidance scale on v (1 = conditional only)
    extend: int = 0              # frames appended after the first clip through known frames, a multiple of 2
    cond_frames: int = 8         # known frames of each extension window (the last ones so far), a multiple of 2
    animate: int = 0             # 1: image prompting, clip k starts from the first frame of a new Moving MNIST clip k
    log_every: int = 100
    ckpt_every: int = 1000

PRESETS = {
    "gpu": Config(),
    "cpu": Config(hidden=96, depth=4, heads=3, vae_steps=3600, vae_batch=16, vae_lr=3e-3, text_steps=1000, steps=6400,
                  batch_size=16, lr=1e-3, ema=0.999, sample_steps=30, num_samples=10, ckpt_every=500),
    "tiny": Config(ae_ch=8, hidden=32, depth=1, heads=2, clip_frames=8, frames=8, clips=20, vae_steps=1, vae_batch=2,
                   text_steps=2, steps=2, batch_size=2, lr=1e-2, sample_steps=2, num_samples=2, log_every=1,
                   ckpt_every=1),
}
ZERO_OK = ("p_uncond", "p_known", "ema", "guidance", "extend", "animate")  # others must be > 0
ARCH = ("ae_ch", "z_ch", "hidden", "depth", "heads", "patch", "clip_frames")  # fixed by a checkpoint

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

FPL = 2  # frames per latent frame: the compression network is x2 in time (and x4 in space)

class VideoAE(nn.Module):  # the paper's idea (1/3): "video compression network", x2 in time, x4 in space, trained first
    def __init__(self, ch=32, z_ch=4):
        super().__init__()
        conv, act = (lambda a, b, s=1: nn.Conv3d(a, b, 3, s, 1)), nn.SiLU
        up = lambda a, b, s=2: nn.ConvTranspose3d(a, b, (2 + s, 4, 4), (s, 2, 2), 1)   # noqa: E731, x s in time, x2 in space
        self.enc = nn.Sequential(conv(1, ch // 2), act(), conv(ch // 2, ch, 2), act(), conv(ch, ch), act(),
                                 conv(ch, 2 * ch, (1, 2, 2)), act(), conv(2 * ch, 2 * ch), act(), nn.Conv3d(2 * ch, z_ch, 1))
        self.dec = nn.Sequential(conv(z_ch, 2 * ch), act(), conv(2 * ch, 2 * ch), act(), up(2 * ch, ch, 1), act(),
                                 conv(ch, ch), act(), up(ch, ch // 2), act(), conv(ch // 2, 1))
        self.register_buffer("scale", torch.ones(()))                    # 1 / std of the latents, set after stage 1

    def encode(self, x):                                                  # x (B, 1, T, H, W), T = 1 or 2k
        x = x.expand(-1, -1, FPL, -1, -1) if x.shape[2] == 1 else x       # an image: a still 2-frame clip
        z = self.enc(rearrange(x, "b c (n f) h w -> (b n) c f h w", f=FPL))  # important: each 2 frames on their own,
        return rearrange(z, "(b n) c 1 h w -> b c n h w", b=len(x)) * self.scale   # as trained, for any T

    def decode(self, z, frames=None):                                     # z (B, z_ch, T', h, w) -> (B, 1, 2T', 4h, 4w)
        x = self.dec(rearrange(z / self.scale, "b c n h w -> (b n) c 1 h w"))
        return rearrange(x, "(b n) c f h w -> b c (n f) h w", b=len(z))[:, :, :frames]   # frames=1: an image

def patchify(z, p):  # the paper's idea (2/3): spacetime patches of the latent are the tokens, 1 x p x p (any T, H, W)
    return rearrange(z, "b c t (h p) (w q) -> b (t h w) (p q c)", p=p, q=p)   # (B, T h w / p^2, p*p*C)

def unpatchify(x, p, t, h):
    return rearrange(x, "b (t h w) (p q c) -> b c t (h p) (w q)", t=t, h=h, p=p, q=p)

def modulate(x, shift, scale):
    return x * (1 + scale) + shift

def rope(ids, dims, theta=10000):
    """Multi-axis RoPE (image/flux.py's rope with chosen axis widths): cos, sin (2, L, sum(dims)/2) of pos_i theta^(-2j/n_i)."""
    angles = torch.cat([ids[:, i, None] * theta ** (-torch.arange(0, n, 2, dtype=torch.float64, device=ids.device) / n)
                        for i, n in enumerate(dims)], -1)
    return torch.stack([angles.cos(), angles.sin()]).float()

def apply_rope(x, pe):  # same as image/flux.py (apply_rope, attention, QKNorm)
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

def select(mod, c, known):  # [R stdit3.py t_mask_select]: tokens of known frames take the t = 0 modulation
    m = mod(c)                                                            # (B, 2, kD): for t and for t = 0
    return torch.where(known, m[:, 1:], m[:, :1])                         # (B, N, kD)

class Block(nn.Module):  # a DiT block (adaLN-Zero, Peebles & Xie) with image/flux.py's QK-norm and RoPE attention
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.mod, self.norm = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)), nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.qk_norm, self.proj = nn.Linear(dim, 3 * dim), QKNorm(dim, heads), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, c, known, pe, keep):                             # x (B, N, D), c (B, 2, D), known (B, N, 1)
        m = select(self.mod, c, known).chunk(6, -1)                       # shift, scale, gate (attention, then MLP)
        x = x + m[2] * self.proj(attention(*self.qk_norm(self.qkv(modulate(self.norm(x), m[0], m[1]))), pe, keep))
        return x + m[5] * self.mlp(modulate(self.norm(x), m[3], m[4]))

class DiT(nn.Module):  # the paper's idea (3/3): a diffusion transformer on spacetime latent patches, conditioned on text
    def __init__(self, z_ch=4, hidden=256, depth=8, heads=4, patch=2):
        super().__init__()
        self.patch, hd = patch, hidden // heads
        self.dims = (hd - 2 * (3 * hd // 16 * 2), 3 * hd // 16 * 2, 3 * hd // 16 * 2)   # RoPE widths: time, row, col
        self.x_in, self.txt_in = nn.Linear(patch * patch * z_ch, hidden), nn.Linear(hidden, hidden)
        self.time_in, self.vector_in = (nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for d in (256, hidden))
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(depth))
        self.norm, self.ada = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6), nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final = nn.Linear(hidden, patch * patch * z_ch)
        for w in (w for m in [b.mod[-1] for b in self.blocks] + [self.ada[-1], self.final] for w in (m.weight, m.bias)):
            nn.init.zeros_(w)                                             # adaLN-Zero: every block the identity, v = 0

    def forward(self, z, t, txt, mask, pooled, known=None):              # z (B, C, T, H, W), t (B,), known (B, T)
        (b, _, f, h, w), p, n = z.shape, self.patch, txt.shape[1]
        x = self.x_in(patchify(z, p))                                     # (B, N, D), N = T H W / p^2
        grid = torch.cartesian_prod(*(torch.arange(k, device=z.device, dtype=torch.float64) for k in (f, h // p, w // p)))
        pe = rope(torch.cat([grid.new_zeros(n, 3), grid.view(-1, 3)]), self.dims)   # text at (0, 0, 0), as Flux
        c = self.time_in(timestep_embedding(1000 * torch.stack([t, 0 * t], 1).flatten(), 256)).view(b, 2, -1)
        c = c + self.vector_in(pooled)[:, None]                           # (B, 2, D): t and t = 0, + pooled text
        known = torch.zeros(b, f, dtype=torch.bool, device=z.device) if known is None else known
        known = torch.cat([known.new_zeros(b, n), known.repeat_interleave(x.shape[1] // f, 1)], 1)[..., None]   # (B, L+N, 1)
        keep = torch.cat([mask, mask.new_ones(x.shape[:2])], 1)[:, None, None]   # (B, 1, 1, L + N): no padding keys
        x = torch.cat([self.txt_in(txt), x], 1)                           # (B, L + N, D): text in the sequence, at t
        for block in self.blocks:
            x = block(x, c, known, pe, keep)
        shift, scale = select(self.ada, c, known)[:, n:].chunk(2, -1)
        return unpatchify(self.final(modulate(self.norm(x[:, n:]), shift, scale)), p, f, h // p)   # v, 0 at init

class Sora(nn.Module):  # stage 1 trains vae; text is fitted then frozen; stage 2 trains dit
    def __init__(self, cfg):
        super().__init__()
        self.vae, self.text = VideoAE(cfg.ae_ch, cfg.z_ch), TextEncoder(cfg.hidden)
        self.dit = DiT(cfg.z_ch, cfg.hidden, cfg.depth, cfg.heads, cfg.patch)

# --- diffusion ---
def rf_loss(dit, x0, cond, known):
    """|| v(z_t, t) - (eps - x0) ||^2 on the unknown latent frames (as image/sd3.py: z_t = (1 - t) x0 + t eps, SD3 Sec. 2;
    logit-normal t); known frames stay clean x0 and are modulated with t = 0 (Open-Sora x_mask)."""
    t = torch.sigmoid(torch.randn(len(x0), device=x0.device))          # logit-normal, m = 0, s = 1 (SD3 Sec. 3.1)
    eps, tt, k = torch.randn_like(x0), t.view(-1, 1, 1, 1, 1), known[:, None, :, None, None]
    v = dit(torch.where(k, x0, (1 - tt) * x0 + tt * eps), t, *cond, known)
    err = ((v.float() - (eps - x0)) ** 2).masked_fill(k, 0).sum((1, 2, 3, 4))
    return err / ((~known).sum(1) * x0[:, :, 0].numel() / len(x0))          # (B,): mean over unknown elements

def guided(dit, z, t, cond, uncond, known, w=1.0):
    """Classifier-free guidance v_u + w (v_c - v_u), uncond = the "" prompt, one batched call; w = 1: conditional."""
    if w == 1:
        return dit(z, t, *cond, known).float()
    both = (torch.cat(pair) for pair in zip(cond, uncond))               # encoded together: the same length
    v_c, v_u = dit(torch.cat([z, z]), torch.cat([t, t]), *both, None if known is None else torch.cat([known, known])).float().chunk(2)
    return v_u + w * (v_c - v_u)

@torch.no_grad()
def euler(v_fn, noise, n, x_known=None, known=None, bar=False):
    """x <- x + (t_{i+1} - t_i) v(x, t_i), t = linspace(1, 0, n + 1). Latent frames marked known (B, T) are x_known
    throughout and returned unchanged (image and video prompting). Returns x0 (B, C, T, H, W)."""
    ts = torch.linspace(1, 0, n + 1).tolist()
    k = None if known is None else known[:, None, :, None, None]
    x = noise if known is None else torch.where(k, x_known, noise)
    for i in tqdm(range(n), desc="sample", leave=False, disable=not bar):
        x = x + (ts[i + 1] - ts[i]) * v_fn(x, torch.full((len(x),), ts[i], device=x.device), known).to(x.dtype)
        x = x if known is None else torch.where(k, x_known, x)
    return x

def extend(sample_fn, z, n, k):
    """Video extension through known frames: sample windows of z's length whose first k latent frames are the last k
    so far (known), keep the new ones, until n latent frames are appended. sample_fn(x_known, known) -> window."""
    total, window = z.shape[2] + n, z.shape[2]
    known = (torch.arange(window, device=z.device) < k).expand(len(z), -1)
    while z.shape[2] < total:
        x_known = torch.cat([z[:, :, -k:], z.new_zeros(*z.shape[:2], window - k, *z.shape[3:])], 2)
        z = torch.cat([z, sample_fn(x_known, known)[:, :, k:]], 2)
    return z[:, :, :total]                                                # (B, C, T' + n, h, w)

# --- train ---
def fit_text(encoder, steps, device):  # a stand-in for T5 pretraining: a linear probe on the pooled text names the digits
    probe = nn.Linear(encoder.tok.embedding_dim, 10).to(device)    # image/imagen.py's fit, for two-digit prompts: fitted on
    opt = torch.optim.Adam([*encoder.parameters(), *probe.parameters()], lr=1e-3)   # one digit, "3 and 5" pooled kept both
    for _ in range(steps):                                            # digits only 60% of the time at width 16 (100% here)
        logits = probe(encoder(tokenize(prompts(y := torch.randint(10, (64, 2)), "random")).to(device))[2])
        opt.zero_grad(set_to_none=True)                               # multi-hot target: both digits named
        nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits).scatter_(1, y.to(device), 1)).backward()
        opt.step()
    return (logits.topk(2, 1).indices.cpu()[:, :, None] == y[:, None]).any(1).all(1).float().mean().item()   # both in top 2

@torch.no_grad()
def encode_text(text, texts, cache, device):
    """The frozen encoder's tokens, mask and pooled vector, computed once per distinct prompt; cut to the longest."""
    for s in set(texts) - cache.keys():
        cache[s] = [a[0] for a in text(tokenize([s]).to(device))]
    tok, mask, pooled = (torch.stack([cache[s][i] for s in texts]) for i in range(3))
    n = int(mask.sum(1).max())
    return tok[:, :n], mask[:, :n], pooled

def vae_batch(videos, b, f=4):  # stage 1: random 4-frame windows, a quarter made stills (how images are encoded)
    idx, s = torch.randint(len(videos), (b,)), torch.randint(videos.shape[1] - f + 1, ()).item()
    x = rearrange(videos[idx.to(videos.device), s:s + f], "b f c h w -> b c f h w")
    still = (torch.rand(b) < 0.25).to(videos.device)[:, None, None, None, None]
    return torch.where(still, x[:, :, :1], x)                             # (B, 1, f, 32, 32)

@torch.no_grad()
def encode_clips(vae, videos, chunk=64):
    """Stage 2's data, encoded once by the frozen compression network: latents of the clips and of their first frame
    as an image (a still; Moving MNIST's first frames are as random as any)."""
    enc = lambda x: torch.cat([vae.encode(rearrange(c, "b f c h w -> b c f h w")) for c in x.split(chunk)])   # noqa: E731
    return enc(videos), enc(videos[:, :1])

def bucket(lat, still, labels, cfg):  # variable durations: one bucket per batch, the same number of tokens in each
    full = lat.shape[2]
    f = [1, 1, full // 2, full, full][torch.randint(5, ()).item()]       # latent frames: 1 (an image or 2 frames),
    n, image = cfg.batch_size * full // f, f == 1 and torch.rand(()) < 0.5   # half the clip, the clip
    idx = torch.randint(len(lat), (n,))
    s = torch.randint(full - f + 1, ()).item()
    x = still[idx.to(lat.device)] if image else lat[idx.to(lat.device), :, s:s + f]   # (n, C, f, 8, 8)
    k, prefix = torch.randint(1, max(f, 2), (n, 1)), torch.rand(n, 1) < 0.5   # x_mask: a known prefix or suffix
    i = torch.arange(f)
    known = (torch.rand(n, 1) < cfg.p_known) & (f > 1) & torch.where(prefix, i < k, i >= f - k)
    image = known[:, :1] & (known.sum(1, keepdim=True) == 1) & (s == 0) & (torch.rand(n, 1) < 0.5) & (i == 0)
    x = torch.where(image.to(lat.device)[:, None, :, None, None], still[idx.to(lat.device)], x)   # image prompting:
    return x, labels[idx], known.to(lat.device)                           # a known first latent frame is a still

def train(args, device, out, ckpt_path):
    torch.manual_seed(args.seed)
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: continue it with --resume, or pass another --out")
    state = load_ckpt(ckpt_path) if args.resume else None
    preset = args.preset or ("cpu" if device.type == "cpu" else "gpu")
    cfg = make_config(args, state["config"] if state else asdict(PRESETS[preset]), fixed=bool(state))
    videos, labels = moving_mnist(args.data_dir, cfg.clips, cfg.clip_frames)   # (N, F, 1, 32, 32), (N, 2)
    videos, held = videos.to(device), max(1, len(videos) // 20)          # the last 5% are held out from stage 1
    net = Sora(cfg).to(device)
    if not state:
        log(out / "log.txt", f"text encoder fitted: probe accuracy {fit_text(net.text, cfg.text_steps, device):.2f}")
    net.text.requires_grad_(False).eval().zero_grad()                     # frozen, as T5 is
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    stage = lambda s: net.vae if s < cfg.vae_steps else net.dit           # noqa: E731, the part trained at step s
    new_opt = lambda s: torch.optim.AdamW(stage(s).parameters(), lr=cfg.vae_lr if s < cfg.vae_steps else cfg.lr,   # noqa: E731
                                          weight_decay=0.0, fused=device.type == "cuda")
    step = state["step"] if state else 0
    opt = new_opt(max(step - 1, 0))                                        # the optimizer of the last step trained
    if state:
        for obj, key in ((net, "model"), (ema, "ema"), (opt, "opt")):
            load_weights(obj, state[key], ckpt_path)
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
    fwd = torch.compile(net.dit) if args.compile else net.dit
    sizes = ", ".join(f"{k} {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M" for k, m in net.named_children())
    log(out / "log.txt", f"{NAME}: {sizes} parameters, {len(videos)} training clips, {device}, step {step}/{cfg.steps}, {cfg}")

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

    def stage2_data():  # the compression network is frozen from here on (its EMA): scale, held-out MSE, encode once
        net.vae.load_state_dict(ema.vae.state_dict())
        net.vae.requires_grad_(False).eval()
        with torch.no_grad():
            if step <= cfg.vae_steps:                                     # not on a resume within stage 2
                net.vae.scale.fill_(1 / net.vae.encode(rearrange(videos[:256], "b f c h w -> b c f h w")).std())
            x = rearrange(videos[-held:][:64], "b f c h w -> b c f h w")
            mse = F.mse_loss(net.vae.decode(net.vae.encode(x)), x).item()
            ema.vae.load_state_dict(net.vae.state_dict())
        log(out / "log.txt", f"compression network: held-out reconstruction MSE {mse:.4f} ([-1, 1] pixels), "
                             f"latent std 1/{net.vae.scale.item():.3f}, latent of a clip {tuple(net.vae.encode(x[:1]).shape[1:])}")
        return encode_clips(net.vae, videos)

    net.train()
    running, seen, clock, done, n, data, cache = torch.zeros((), device=device), 0, time.time(), step, 0, None, {}
    try:
        for done in between_steps(tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train")):
            if done < cfg.vae_steps:                                      # stage 1: the compression network
                x = vae_batch(videos[:-held], cfg.vae_batch)
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    z = net.vae.encode(x)
                    loss = F.mse_loss(net.vae.decode(z).float(), x) + 1e-4 * z.float().pow(2).mean()   # small latent L2
            else:                                                         # stage 2: the diffusion transformer
                if data is None:
                    data = stage2_data()
                    opt = new_opt(done) if done == cfg.vae_steps else opt   # a fresh AdamW for the DiT
                x0, y, known = bucket(*data, labels, cfg)
                texts = [s if r >= cfg.p_uncond else "" for s, r in zip(prompts(y, "random"), torch.rand(len(y)).tolist())]
                with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                    loss = rf_loss(fwd, x0, encode_text(net.text, texts, cache, device), known).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(stage(done).parameters(), 1.0)
            opt.step()
            start = 0 if done < cfg.vae_steps else cfg.vae_steps
            decay = min(cfg.ema, (1 + done - start) / (10 + done - start))  # EMA with a warm-up, per stage
            part = "vae" if done < cfg.vae_steps else "dit"
            torch._foreach_lerp_(list(getattr(ema, part).parameters()), list(stage(done).parameters()), 1 - decay)
            running, seen, done, n = running + loss.detach(), seen + 1, done + 1, n + len(x if part == "vae" else x0)
            if done % cfg.log_every == 0 or done == cfg.steps or done == cfg.vae_steps:
                save(done, write=False)
                log(out / "log.txt", f"step {done} {part} loss {running.item() / seen:.4f} "
                                     f"samples/s {n / (time.time() - clock):.1f}")
                running, seen, clock, n = torch.zeros((), device=device), 0, time.time(), 0
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

def load_weights(module, weights, path):  # the compression network was x4 in time before 2026-11-27: other shapes
    try:
        module.load_state_dict(weights)
    except (RuntimeError, ValueError):
        raise UserError(f"{path} comes from another version of {NAME}.py (its weights do not fit): train it again") from None

def sample(args, device, out, ckpt_path):
    state = load_ckpt(ckpt_path)
    cfg = make_config(args, state["config"])
    net = Sora(cfg).to(device).eval().requires_grad_(False)
    load_weights(net, state["ema"], ckpt_path)
    k = torch.arange(cfg.num_samples) % 10
    y = torch.stack([k, (k + 1) % 10], 1)                                 # clip k: digits k and k + 1
    f, x_known, known = 1 if cfg.frames == 1 else cfg.frames // FPL, None, None   # latent frames
    if cfg.animate:                                                       # image prompting: a known still latent frame
        clips, y = moving_mnist(args.data_dir, cfg.num_samples, 1, seed=1)   # (B, 1, 1, 32, 32): not in training
        x_known = F.pad(net.vae.encode(clips.transpose(1, 2).to(device)), (0, 0, 0, 0, 0, f - 1))
        known = (torch.arange(f, device=device) < 1).expand(len(y), -1)
    texts = prompts(y, "digit")                                           # "3 and 4"
    enc = encode_text(net.text, texts + [""] * len(y), {}, device)
    cond, uncond = tuple(a[:len(y)] for a in enc), tuple(a[len(y):] for a in enc)
    noise = torch.randn(len(y), cfg.z_ch, f, cfg.height // 4, cfg.width // 4,   # the output size is the grid of noise
                        generator=torch.Generator().manual_seed(args.seed)).to(device)
    torch.manual_seed(args.seed)                                          # the noise of each extension window
    v_fn = lambda z, t, known: guided(net.dit, z, t, cond, uncond, known, cfg.guidance)   # noqa: E731
    start = time.time()
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        z = euler(v_fn, noise, cfg.sample_steps, x_known, known, bar=True)   # (B, C, T', h, w)
        z = extend(lambda x_known, known: euler(v_fn, torch.randn_like(x_known), cfg.sample_steps, x_known, known,
                                                bar=True), z, cfg.extend // FPL, cfg.cond_frames // FPL)
        video = net.vae.decode(z.float(), cfg.frames if cfg.frames == 1 else None)   # (B, 1, F + extend, H, W)
    videos = rearrange(video.float(), "b c f x y -> b f c x y")
    save_png(out / "samples.png", videos.flatten(0, 1), nrow=videos.shape[1])   # one clip per row
    save_gif(out / "samples.gif", videos.transpose(0, 1))                 # (F, N, 1, H, W): the clips play
    save_npz(out / "samples.npz", videos=videos, labels=y, prompts=texts)
    more = f", extended by {cfg.extend} frames (known: the last {cfg.cond_frames})" if cfg.extend else ""
    more += ", animating the first frames of new clips" if cfg.animate else ""
    print(f"wrote {out}/samples.png, samples.gif, samples.npz: {len(y)} clips of {videos.shape[1]} frames at "
          f"{videos.shape[3]}x{videos.shape[4]} (step {state['step']}), {cfg.sample_steps} Euler steps, guidance "
          f"{cfg.guidance}{more}, {time.time() - start:.1f} s")

# --- cli ---
HELP = dict(re.findall(r"^    (\w+): \w+ = [^#\n]*# (.*)$", Path(__file__).read_text(), re.M))  # Config's comments

def make_config(args, base, fixed=True):
    """A checkpoint's (fixed=True) or preset's config, overridden by the flags on the command line."""
    if unknown := set(base) - {f.name for f in fields(Config)}:
        raise UserError(f"the checkpoint comes from another version of {NAME}.py: unknown config {sorted(unknown)}")
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    for key in ARCH:
        if fixed and key in given and given[key] != base[key]:
            raise UserError(f"--{key.replace('_', '-')} {given[key]} does not match the checkpoint's {base[key]}")
    cfg = replace(Config(**base), **given)
    if cfg.frames % FPL and cfg.frames != 1 or cfg.clip_frames % (2 * FPL) or cfg.extend % FPL or cfg.cond_frames % FPL:
        raise UserError(f"need --frames 1 or a multiple of {FPL}, --clip-frames a multiple of {2 * FPL}, --extend and "
                        f"--cond-frames multiples of {FPL}")
    if cfg.extend and cfg.cond_frames >= cfg.frames or cfg.height % (4 * cfg.patch) or cfg.width % (4 * cfg.patch):
        raise UserError(f"need --cond-frames below --frames with --extend, --height and --width multiples of {4 * cfg.patch}")
    if cfg.animate and (cfg.frames == 1 or cfg.height != 32 or cfg.width != 32):
        raise UserError("--animate needs --frames above 1 at 32 x 32")
    if cfg.hidden % cfg.heads or cfg.hidden // cfg.heads % 16 or cfg.hidden % 4:
        raise UserError("need --hidden a multiple of --heads x 16 (RoPE over 3 axes) and of 4")
    if cfg.ae_ch % 2 or cfg.clips < 2:
        raise UserError("need an even --ae-ch and --clips at least 2 (stage 1 holds the last of them out)")
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
