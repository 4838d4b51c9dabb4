"""Make-A-Video: Text-to-Video Generation without Text-Video Data
Uriel Singer, Adam Polyak, Thomas Hayes, Xi Yin, Jie An, Songyang Zhang, Qiyuan Hu, Harry Yang, Oron Ashual, Oran Gafni,
Devi Parikh, Sonal Gupta, Yaniv Taigman, 2022. https://arxiv.org/abs/2209.14792v1
No official code; the reference implementation is lucidrains/make-a-video-pytorch (make_a_video.py).

The idea: text-to-video without any text-video pairs. A text-to-image diffusion model is trained on image-text pairs
(Sec. 3.1), then inflated into a video model (Sec. 3.2): every 2D convolution is followed by a 1D convolution over
time (pseudo-3D conv), initialised to the identity, and every spatial attention by a temporal attention across the
frames of each pixel (pseudo-3D attention) whose output projection is zero. Right after inflation the video model
is therefore exactly the image model run on every frame; the temporal layers are then fine-tuned on unlabelled video
with the frame rate (fps) as conditioning (Sec. 3.4). Text reaches videos only through the image layers. A frame
interpolation network (Sec. 3.3), the video model fine-tuned with two extra input channels (the known frames, zero
elsewhere, and a binary mask), fills in the frames between keyframes to raise the frame rate.

Time convention (as video/video_diffusion_models.py): t = 0 is data, t = 1 is noise, z_t = alpha_t x + sigma_t eps,
cosine log-SNR (alpha_t^2 + sigma_t^2 = 1), the network predicts v = alpha_t eps - sigma_t x.

Deviations from the paper:
- Stage A's images are single still frames of Moving MNIST clips (two digits) with their prompts ("3 and 5", "three
  and five", ...): no video is seen in stage A, no text in stage B (prompts all ""), as the paper; the paper's image
  and video data are different sets (LAION vs WebVid-10M, HD-VILA-10M).
- No DALL-E 2 prior P and no CLIP image embedding: the decoder sees the text directly (pooled, added to the time
  embedding, and by cross-attention, as image/imagen.py). The text encoder is imagen.py's byte-level transformer,
  fitted by a linear probe and frozen (stand-in for CLIP's text encoder); null text is "".
- No super-resolution stages (SR^t_l, SR_h: 64 -> 256 -> 768): one 32x32 decoder D^t, so there is no SR_h shared
  noise either. A small U-Net (edm.py's layout, attention at <= 8x8 on the CPU) instead of the 2B-parameter one.
- In stage B only the new layers are trained (temporal convs, temporal attention, fps embedding; --freeze none trains
  all): Sec. 3.4 "add ... the temporal layers and finetune them over unlabeled video data" is read this way. The
  interpolation network is fine-tuned whole from D^t's weights.
- Temporal attention has a learnt relative-position bias over frame offsets (video_diffusion_models.py's layer; the
  paper gives no position scheme). Our temporal conv has kernel 3 and mixes neighbouring frames (the reference's has
  kernel 1, [R :236], and mixes none). 1x1 skip convs of residual blocks stay 2D. fps is a frame skip s in 1..5
  (frames t0, t0 + s, ...) embedded (zero-initialised, so inflation stays exact) and added to the time embedding.
- The interpolation network is trained with skips 2..5 (skip 1 leaves no frame to fill) on 16-frame windows of
  stride-1 clips, loss on every frame, fps input 1 (the rate it outputs). Sampling runs D^t at skip S and fills
  windows of (16 - 1) // S + 1 keyframes: 16 frames become (16 - 1) S + 1 (S = 5: 76, as the paper). Its weights
  are initialised from D^t's when its phase starts (after stage B), then all trained.
- v-prediction (Salimans & Ho 2022) and the ancestral sampler of video_diffusion_models.py (eps on CPU gave grey
  backgrounds there); AdamW without weight decay, gradient clipping 1; bf16 autocast on CUDA. The paper's optimiser,
  step counts and sampler settings are not given.

Usage:
  python video/make_a_video.py --train --sample --data-dir ../shared/data   # stage A, inflation, stage B, then F
  python video/make_a_video.py --train --sample --image-steps 12000 --steps 12600 --out runs/mav_long  # 53 min on 2 cores: flips 0.57 (preset 0.74)
  python video/make_a_video.py --sample --prompt "3 and 5"                  # every clip from one prompt
  python video/make_a_video.py --sample --interp 5 --out runs/mav_interp --ckpt runs/make_a_video/ckpt.pt  # 76 frames
  python video/make_a_video.py --sample --skip 3                            # D^t asked for 3x faster motion (fps)
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

NAME = "make_a_video"

# --- config ---
@dataclass
class Config:
    ch: int = 64                 # U-Net base channels, also the text width (paper: a 2B-parameter U-Net)
    blocks: int = 2              # residual blocks per resolution
    attn_res: int = 16           # spatial, temporal and cross-attention at resolutions <= this, and in the middle
    frames: int = 16             # frames of D^t (paper: 16)
    max_skip: int = 5            # largest frame skip (fps conditioning and interpolation; paper: 1-5)
    clips: int = 10000           # Moving MNIST clips of (frames - 1) max_skip + 1 frames, generated for training
    text_steps: int = 1000       # fit of the text encoder before it is frozen (stand-in for CLIP's pretraining)
    p_uncond: float = 0.1        # stage A: prompt -> "" for classifier-free guidance
    image_steps: int = 8000      # stage A: text-to-image steps on still frames (Sec. 3.1)
    interp_steps: int = 2000     # the last steps train the interpolation network (Sec. 3.3); the rest: stage B
    steps: int = 20000           # training steps of all phases together
    image_batch: int = 128       # stage A images per step
    batch_size: int = 32         # stage B and interpolation clips per step
    freeze: str = "spatial"      # stage B trains the temporal layers only (spatial), or everything (none)
    lr: float = 2e-4             # AdamW
    ema: float = 0.9999          # EMA decay per step
    sample_steps: int = 256      # ancestral steps
    num_samples: int = 20        # clips sampled; clip k asks for digits k and k + 1 (mod 10)
    guidance: float = 3.0        # classifier-free guidance weight w on the text (1 = conditional)
    skip: int = 1                # frame skip D^t is asked for at sampling (fps conditioning)
    interp: int = 0              # > 1: D^t at skip S = this, then the interpolation network: (frames - 1) S + 1 frames
    log_every: int = 100
    ckpt_every: int = 1000

PRESETS = {
    "gpu": Config(),
    "cpu": Config(ch=16, blocks=1, attn_res=8, clips=2000, text_steps=1000, image_steps=3500, interp_steps=100,
                  steps=4100, image_batch=48, batch_size=4, lr=1e-3, ema=0.995, sample_steps=64, num_samples=10,
                  log_every=50),
    "tiny": Config(ch=8, blocks=1, attn_res=8, frames=4, max_skip=2, clips=16, text_steps=2, image_steps=1,
                   interp_steps=0, steps=2, image_batch=4, batch_size=2, sample_steps=2, num_samples=2,
                   log_every=1, ckpt_every=1),
}
ZERO_OK = ("p_uncond", "ema", "guidance", "interp", "image_steps", "interp_steps")  # others must be > 0
CHOICES, PHASES = {"freeze": ("spatial", "none")}, ("image", "video", "interp")     # flags with a choice; Sec. 3.4

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

class TextEncoder(nn.Module):  # same as image/imagen.py: a small stand-in for CLIP's text encoder
    def __init__(self, dim, depth=2, heads=4, length=48):
        super().__init__()
        self.tok, self.pos = nn.Embedding(258, dim), nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, 0.0, "gelu", batch_first=True, norm_first=True)
        self.layers, self.norm = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False), nn.LayerNorm(dim)
    def forward(self, ids):                                               # ids (B, L) from tokenize
        mask = ids > 0                                                    # (B, L) True on real tokens
        h = self.norm(self.layers(self.tok(ids) + self.pos, src_key_padding_mask=~mask))   # (B, L, dim)
        return h, mask, (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)   # pooled: mean over real tokens

def norm(c):  # norm, zero, Attention: same as image/edm.py, applied to frames folded into the batch
    return nn.GroupNorm(math.gcd(8, c), c)

def zero(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module

class PseudoConv3d(nn.Module):  # the paper's idea (Sec. 3.2): a 2D conv per frame, then a 1D conv over time
    def __init__(self, cin, cout, stride=1, zero_init=False, up=False):  # up: nearest x2 first (U-Net upsampling)
        super().__init__()
        self.up, self.spatial = up, nn.Conv2d(cin, cout, 3, stride, 1)
        self.temporal = nn.Conv1d(cout, cout, 3, padding=1)               # kernel 3: mixes neighbouring frames
        if zero_init:
            zero(self.spatial)
        self.reset_temporal()

    def reset_temporal(self):  # Dirac weights, zero bias: the identity, so the inflated net is the image net
        nn.init.dirac_(self.temporal.weight)
        nn.init.zeros_(self.temporal.bias)

    def forward(self, x, f=None):                                         # x (B F, C, H, W); f None: image
        h = self.spatial(F.interpolate(x, scale_factor=2) if self.up else x)
        if f is None:
            return h
        size = dict(x=h.shape[2], y=h.shape[3])
        h = self.temporal(rearrange(h, "(b f) c x y -> (b x y) c f", f=f))   # Conv_P3D = Conv1D(Conv2D(h) o T) o T
        return rearrange(h, "(b x y) c f -> (b f) c x y", **size)

class ResBlock(nn.Module):  # edm.py's ResBlock with pseudo-3D convs (dropout 0)
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.norm1, self.conv1, self.emb = norm(cin), PseudoConv3d(cin, cout), nn.Linear(emb, cout)
        self.norm2, self.conv2 = norm(cout), PseudoConv3d(cout, cout, zero_init=True)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e, f):                                           # x (B F, cin, H, W), e (B F, emb)
        h = self.conv1(F.silu(self.norm1(x)), f) + self.emb(e)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)), f)        # (B F, cout, H, W)

class Attention(nn.Module):
    def __init__(self, c, heads=4):
        super().__init__()
        self.heads, self.norm = heads, norm(c)
        self.qkv, self.out = nn.Conv2d(c, 3 * c, 1), zero(nn.Conv2d(c, c, 1))

    def forward(self, x, e=None):
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (n h d) x y -> n b h (x y) d", n=3, h=self.heads)
        h = nn.functional.scaled_dot_product_attention(q, k, v)                 # (B, heads, HW, d)
        return x + self.out(rearrange(h, "b h (x y) d -> b (h d) x y", x=x.shape[2]))

class TemporalAttention(nn.Module):  # same as video/video_diffusion_models.py; zero out-projection [R :203]
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

class Block(nn.Module):
    """A ResBlock, then (at <= attn_res) pseudo-3D attention: spatial attention per frame, temporal attention across
    frames (Attn_P3D, Sec. 3.2), then cross-attention to the text."""

    def __init__(self, cin, cout, emb, dim, attn):
        super().__init__()
        self.res = ResBlock(cin, cout, emb)
        self.attn = nn.ModuleDict(dict(spatial=Attention(cout), temporal=TemporalAttention(cout),
                                       cross=CrossAttention(cout, dim)) if attn else {})

    def forward(self, h, e, ctx, mask, f):                                # h (B F, C, H, W); f None: image
        h = self.res(h, e, f)
        if self.attn:
            h = self.attn["spatial"](h)
            h = self.attn["temporal"](h, f) if f is not None else h       # enable_time=False skips it [R]
            h = self.attn["cross"](h, ctx, mask)
        return h

class UNet(nn.Module):
    """v(z_t, t, text, fps) on (B, cin, F, 32, 32): edm.py's U-Net (32 -> 16 -> 8) with pseudo-3D convs and attention.
    enable_time=False is the text-to-image model: every frame an independent image, temporal layers skipped.
    cin = 3 for the interpolation network: z_t, the masked known frames and the mask (Sec. 3.3)."""

    def __init__(self, ch=64, blocks=2, attn_res=16, max_skip=5, cin=1, mult=(1, 2, 2)):
        super().__init__()
        self.ch, emb, res, dim = ch, 4 * ch, 32, ch
        self.time = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.text_norm, self.pool = nn.LayerNorm(dim), nn.Linear(dim, emb)   # pooled text + time (imagen.py)
        self.fps = nn.Embedding(max_skip + 1, emb)                        # the paper's fps conditioning, zero at init
        self.inp = PseudoConv3d(cin, ch)
        self.down, skips, c = nn.ModuleList(), [ch], ch
        for i, m in enumerate(mult):
            for _ in range(blocks):
                self.down.append(Block(c, ch * m, emb, dim, res <= attn_res))
                skips.append(c := ch * m)
            if i < len(mult) - 1:
                self.down.append(PseudoConv3d(c, c, stride=2))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([Block(c, c, emb, dim, True), Block(c, c, emb, dim, False)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(blocks + 1):
                self.up.append(Block(c + skips.pop(), ch * m, emb, dim, res <= attn_res))
                c = ch * m
            if i > 0:
                self.up.append(PseudoConv3d(c, c, up=True))
                res *= 2
        self.out_norm, self.out = norm(c), PseudoConv3d(c, 1, zero_init=True)
        inflate(self)

    def forward(self, x, t, text, fps=None, enable_time=True):            # x (B, cin, F, H, W), t (B,), fps (B,)
        b, f = x.shape[0], x.shape[2]
        ctx, mask = self.text_norm(text[0]), text[1]                      # (B, L, D), (B, L)
        pooled = (ctx * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        e = self.time(timestep_embedding(1000 * t, self.ch)) + self.pool(pooled)   # (B, emb)
        e = e + self.fps(fps) if enable_time else e                       # frame skip s, added (Sec. 3.4)
        e, ctx, mask = (a.repeat_interleave(f, 0) for a in (e, ctx, mask))   # one t, text, fps per clip
        tf = f if enable_time else None                                   # None: frames are independent images
        hs = [h := self.inp(rearrange(x, "b c f x y -> (b f) c x y"), tf)]   # (B F, ch, H, W)
        for layer in self.down:
            h = layer(h, e, ctx, mask, tf) if isinstance(layer, Block) else layer(h, tf)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, e, ctx, mask, tf)                                # (B F, 2ch, 8, 8)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), e, ctx, mask, tf) if isinstance(layer, Block) else layer(h, tf)
        return rearrange(self.out(F.silu(self.out_norm(h)), tf), "(b f) c x y -> b c f x y", b=b)   # v_hat

def trainable(name, now, freeze):  # which parameters each phase trains (Sec. 3.4)
    temporal = ".temporal." in f".{name}" or name.startswith("fps.")      # the layers inflation adds, and fps
    return {"image": not temporal, "video": temporal or freeze == "none", "interp": True}[now]

def inflate(net):  # the paper's idea: fresh temporal layers, identity at init (Sec. 3.2) => video == image per frame
    for m in net.modules():
        if isinstance(m, PseudoConv3d):
            m.reset_temporal()
        if isinstance(m, TemporalAttention):
            zero(m.out)
            nn.init.zeros_(m.rel)
    nn.init.zeros_(net.fps.weight)
    return net

@torch.no_grad()
def init_interp(interp, video):  # the interpolation network starts as D^t, blind to its two extra channels (Sec. 3.3)
    state = dict(video.state_dict())
    w = state["inp.spatial.weight"]
    state["inp.spatial.weight"] = torch.cat([w, torch.zeros_like(w).expand(-1, 2, -1, -1)], 1)
    interp.load_state_dict(state)

def interp_input(z, x, s):
    """(B, 3, F, H, W): z_t, the known frames 0, s, 2s, ... of x (zeros elsewhere) and the mask (Sec. 3.3)."""
    i = torch.arange(z.shape[2], device=z.device)
    mask = (i % torch.as_tensor(s, device=z.device).reshape(-1, 1) == 0).float()[:, None, :, None, None]   # (B,1,F,1,1)
    return torch.cat([z, x * mask, mask.expand_as(z)], 1)

# --- diffusion ---
# log_snr, posterior: same as video/video_diffusion_models.py
def log_snr(t, s=0.008):  # cosine lambda(t) = -log(cos((t + s)/(1 + s) pi/2)^-2 - 1) [R imagen_pytorch.py:217]
    return -torch.log((torch.cos((t + s) / (1 + s) * math.pi / 2) ** -2 - 1).clamp(min=1e-5))

def alpha_sigma(t):  # alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), as (B, 1, 1, 1, 1)
    return (lam := log_snr(t.float()).reshape(-1, 1, 1, 1, 1)).sigmoid().sqrt(), (-lam).sigmoid().sqrt()

def diffusion_loss(v_fn, x):
    """|| v_theta(z_t, t) - v ||^2, v = alpha_t eps - sigma_t x (Salimans & Ho 2022 Sec. 4), t ~ U[0, 1]."""
    t, eps = torch.rand(len(x), device=x.device), torch.randn_like(x)
    a, s = alpha_sigma(t)
    v = a * eps - s * x
    return ((v_fn(a * x + s * eps, t).float() - v) ** 2).mean((1, 2, 3, 4))   # (B,)

def guided(net, z, t, text, null, w=1.0, **cond):
    """Classifier-free guidance v~ = w v(z, c) + (1 - w) v(z, ""); w = 1 is conditional. Text enters only through
    the image layers, so guidance works on videos although stage B never saw a prompt."""
    v_c = net(z, t, text, **cond).float()
    return v_c if w == 1 else w * v_c + (1 - w) * net(z, t, null, **cond).float()

def posterior(z, x0, t, s):
    """q(z_s | z_t, x0) (DDPM Eqs. 6-7), s < t: c = -expm1(lambda_t - lambda_s), mean alpha_s (z_t (1-c)/alpha_t + c x0), var sigma_s^2 c."""
    (a_t, _), (a_s, s_s) = alpha_sigma(t), alpha_sigma(s)
    c = -torch.expm1(log_snr(t) - log_snr(s))
    return a_s * (z * (1 - c) / a_t + c * x0), s_s ** 2 * c

@torch.no_grad()
def ancestral(v_fn, noise, n, bar=False):
    """t = 1 -> 0 in n ancestral steps, x_hat = alpha_t z_t - sigma_t v_hat clipped to [-1, 1]. Returns z_0."""
    ts, z = torch.linspace(1, 0, n + 1, device=noise.device), noise
    for i in tqdm(range(n), desc="sample", leave=False, disable=not bar):
        a, s = alpha_sigma(ts[i])
        x0 = (a * z - s * v_fn(z, ts[i].expand(len(z)))).clamp(-1, 1)
        mean, var = posterior(z, x0, ts[i], ts[i + 1])
        z = mean + var.sqrt() * torch.randn_like(z) if i < n - 1 else mean   # no noise at the last step
    return z

def interpolate(sample_fn, keys, s, frames):
    """Frame interpolation (Sec. 3.3): keyframes (B, 1, K, H, W) -> (B, 1, (K - 1) s + 1, H, W). Windows of
    k = (frames - 1) // s + 1 keyframes, consecutive windows sharing one; sample_fn(x_known) -> the window."""
    k, out = (frames - 1) // s + 1, keys[:, :, :1]
    for i in range(0, keys.shape[2] - 1, k - 1):
        window = keys[:, :, i: i + k]                                     # (B, 1, k', H, W)
        known = torch.zeros(*keys.shape[:2], (window.shape[2] - 1) * s + 1, *keys.shape[3:], device=keys.device)
        known[:, :, ::s] = window
        filled = sample_fn(known)
        filled[:, :, ::s] = window                                        # keyframes are kept exactly
        out = torch.cat([out, filled[:, :, 1:]], 2)
    return out

# --- train ---
@torch.no_grad()
def encode(encoder, texts, device):  # the frozen encoder's tokens and mask: no gradient reaches it
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

def phase(count, cfg):  # the training order (Sec. 3.4): images, then unlabelled video, then interpolation
    if count["image"] < cfg.image_steps:
        return "image"
    return "video" if count["video"] < cfg.steps - cfg.image_steps - cfg.interp_steps else "interp"

def clips(videos, b, frames, skip, device):
    """b random windows of `frames` frames at frame skip s ~ U{1..skip} (fps, Sec. 3.4): (B, 1, F, 32, 32), s, index."""
    n, long = videos.shape[:2]
    s, idx = torch.randint(1, skip + 1, (b,), device=device), torch.randint(n, (b,), device=device)
    start = (torch.rand(b, device=device) * (long - (frames - 1) * s)).long()
    x = videos[idx[:, None], start[:, None] + s[:, None] * torch.arange(frames, device=device)]   # (B, F, 1, 32, 32)
    return rearrange(x, "b f c x y -> b c f x y"), s, idx

def make_nets(cfg):  # the frozen text encoder, D^t (= the image model with enable_time=False), the interpolation net
    return nn.ModuleDict(dict(text=TextEncoder(cfg.ch), video=UNet(cfg.ch, cfg.blocks, cfg.attn_res, cfg.max_skip),
                              interp=UNet(cfg.ch, cfg.blocks, cfg.attn_res, cfg.max_skip, cin=3)))

def train(args, device, out, ckpt_path):
    torch.manual_seed(args.seed)
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: continue it with --resume, or pass another --out")
    state = load_ckpt(ckpt_path) if args.resume else None
    preset = args.preset or ("cpu" if device.type == "cpu" else "gpu")
    cfg = make_config(args, state["config"] if state else asdict(PRESETS[preset]), fixed=bool(state))
    videos, labels = moving_mnist(args.data_dir, cfg.clips, (cfg.frames - 1) * cfg.max_skip + 1)   # (N, T, 1, 32, 32)
    videos = videos.to(device)                                            # labels stay on the CPU for the prompts
    net = make_nets(cfg).to(device, memory_format=torch.channels_last)  # NHWC: faster convolutions
    if not state:
        log(out / "log.txt", f"text encoder fitted: probe accuracy {fit_text(net['text'], cfg.text_steps, device):.2f}")
    net["text"].requires_grad_(False).eval().zero_grad()                  # frozen, no grads of the fit
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    params = [p for k in ("video", "interp") for p in net[k].parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=device.type == "cuda")
    count = state["stage_steps"] if state else dict.fromkeys(PHASES, 0)  # steps trained in each phase
    step = state["step"] if state else 0
    if state:
        for obj, key in ((net, "model"), (ema, "ema"), (opt, "opt")):
            obj.load_state_dict(state[key])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
    fwd = {k: torch.compile(net[k]) if args.compile else net[k] for k in ("video", "interp")}
    null = encode(net["text"], [""] * cfg.batch_size, device)             # stage B and F: unlabelled video
    sizes = ", ".join(f"{k} {sum(p.numel() for p in v.parameters()) / 1e6:.2f}M" for k, v in net.items())
    log(out / "log.txt", f"{NAME}: {sizes} parameters, {len(videos)} clips of {videos.shape[1]} frames, {device}, "
                         f"step {step}/{cfg.steps}, phases {count}, {cfg}")

    def save(done, write=True):  # a NaN/inf loss stops training before it can reach a checkpoint
        if not torch.isfinite(running):
            raise UserError(f"loss became {running.item()} before step {done}; stopped, the last good "
                            f"checkpoint is kept at {ckpt_path} (try a lower --lr)")
        if not write:
            return
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save({"script": NAME, "config": asdict(cfg), "model": net.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict(), "step": done, "stage_steps": dict(count), "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None}, tmp)
        os.replace(tmp, ckpt_path)                                        # atomic: never a half-written file

    running, seen, clock, done = torch.zeros((), device=device), 0, time.time(), step
    try:
        for done in between_steps(tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train")):
            now = phase(count, cfg)
            if count[now] == 0 and now == "video":                        # Sec. 3.2: inflate the trained image model
                inflate(net["video"]), inflate(ema["video"])
            if count[now] == 0 and now == "interp":                       # Sec. 3.3: initialised from D^t
                init_interp(net["interp"], net["video"]), init_interp(ema["interp"], ema["video"])
            key = "interp" if now == "interp" else "video"
            for name, p in net[key].named_parameters():                   # stage B: the new layers only
                p.requires_grad_(trainable(name, now, cfg.freeze))
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                if now == "image":                                        # stage A: still frames and their prompts
                    idx = torch.randint(len(videos), (cfg.image_batch,))
                    x = videos[idx.to(device), torch.randint(videos.shape[1], (cfg.image_batch,), device=device)]
                    texts = [p if r >= cfg.p_uncond else "" for p, r in
                             zip(prompts(labels[idx], "random"), torch.rand(len(idx)).tolist())]
                    text = encode(net["text"], texts, device)
                    loss = diffusion_loss(lambda z, t: fwd["video"](z, t, text, enable_time=False), x[:, :, None])
                elif now == "video":                                      # stage B: clips at skip s, no text
                    x, s, _ = clips(videos, cfg.batch_size, cfg.frames, cfg.max_skip, device)
                    loss = diffusion_loss(lambda z, t: fwd["video"](z, t, null, s), x)
                else:                                                     # F: stride-1 clips, known frames every s
                    x, _, _ = clips(videos, cfg.batch_size, cfg.frames, 1, device)
                    s = torch.randint(2, max(cfg.max_skip, 2) + 1, (len(x),), device=device)   # output at fps 1
                    loss = diffusion_loss(lambda z, t: fwd["interp"](interp_input(z, x, s), t, null, s ** 0), x)
                loss = loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(cfg.ema, (1 + count[now]) / (10 + count[now]))    # EMA with a warm-up per phase
            torch._foreach_lerp_(list(ema[key].parameters()), list(net[key].parameters()), 1 - decay)
            count[now] += 1
            running, seen, done = running + loss.detach(), seen + 1, done + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                save(done, write=False)
                n = seen * (cfg.image_batch if now == "image" else cfg.batch_size * cfg.frames) / (time.time() - clock)
                log(out / "log.txt", f"step {done} loss {running.item() / seen:.4f} phase {now} frames/s {n:.0f}")
                running, seen, clock = torch.zeros((), device=device), 0, time.time()
            if done % cfg.ckpt_every == 0 or done == cfg.steps or phase(count, cfg) != now:
                save(done)                                                # and at the end of each phase
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
    if cfg.interp and not count["interp"]:
        raise UserError(f"the interpolation network of {ckpt_path} is untrained: --train --resume with --interp-steps")
    net = make_nets(cfg).to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    net.load_state_dict(state["ema"])
    k = torch.arange(cfg.num_samples) % 10
    y = torch.stack([k, (k + 1) % 10], 1)                                 # clip k: digits k and k + 1
    texts = [args.prompt] * len(y) if args.prompt is not None else prompts(y, "digit")   # "3 and 4"
    text, null = encode(net["text"], texts, device), encode(net["text"], [""] * len(y), device)
    noise = torch.randn(len(y), 1, cfg.frames, 32, 32, generator=torch.Generator().manual_seed(args.seed)).to(device)
    torch.manual_seed(args.seed)                                          # the noise of each step
    skip = torch.full((len(y),), cfg.interp or cfg.skip, device=device)

    def v_fn(name, fps, known=None):  # guided v of D^t, or of the interpolation network given the known frames
        inp = (lambda z: z) if known is None else (lambda z: interp_input(z, known, cfg.interp))   # noqa: E731
        return lambda z, t: guided(net[name], inp(z), t, text, null, cfg.guidance, fps=fps)

    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        video = ancestral(v_fn("video", skip), noise, cfg.sample_steps, bar=True)   # (B, 1, F, 32, 32) from D^t
        if cfg.interp:                                                    # Sec. 3.3: fill in the frames in between
            fill = lambda known: ancestral(v_fn("interp", skip ** 0, known), torch.randn_like(known),   # noqa: E731
                                           cfg.sample_steps, bar=True)
            video = interpolate(fill, video, cfg.interp, cfg.frames)     # (B, 1, (F - 1) S + 1, 32, 32)
    videos = rearrange(video.float(), "b c f x y -> b f c x y")
    save_png(out / "samples.png", videos.flatten(0, 1), nrow=videos.shape[1])   # one clip per row
    save_gif(out / "samples.gif", videos.transpose(0, 1))                 # (F, N, 1, 32, 32): the clips play
    save_npz(out / "samples.npz", videos=videos, labels=None if args.prompt is not None else y, prompts=texts)
    print(f"wrote {out}/samples.png, samples.gif, samples.npz: {len(y)} clips of {videos.shape[1]} frames {count}, "
          f"{cfg.sample_steps} steps, guidance {cfg.guidance}, skip {cfg.interp or cfg.skip}"
          f"{', interpolated' if cfg.interp else ''}")

# --- cli ---
HELP = dict(re.findall(r"^    (\w+): \w+ = [^#\n]*# (.*)$", Path(__file__).read_text(), re.M))  # Config's comments

def make_config(args, base, fixed=True):
    """A checkpoint's (fixed=True) or preset's config, overridden by the flags on the command line."""
    if unknown := set(base) - {f.name for f in fields(Config)}:
        raise UserError(f"the checkpoint comes from another version of {NAME}.py: unknown config {sorted(unknown)}")
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    for key in ("ch", "blocks", "attn_res", "max_skip"):
        if fixed and key in given and given[key] != base[key]:
            raise UserError(f"--{key.replace('_', '-')} {given[key]} does not match the checkpoint's {base[key]}")
    cfg = replace(Config(**base), **given)
    if cfg.skip > cfg.max_skip or cfg.interp > cfg.max_skip or cfg.interp == 1 or cfg.ch % 4:
        raise UserError("need --skip and --interp at most --max-skip, --interp 0 or above 1, --ch divisible by 4")
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
    p.add_argument("--prompt", help='sample every clip from this text (default: "k and k+1" for clip k)')
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
