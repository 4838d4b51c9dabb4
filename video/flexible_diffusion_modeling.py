"""Flexible Diffusion Modeling of Long Videos
William Harvey, Saeid Naderiparizi, Vaden Masrani, Christian Weilbach, Frank Wood, 2022.
https://arxiv.org/abs/2205.11495v3 -- official code: plai-group/flexible-video-diffusion-modeling (improved_diffusion/).

The idea: a network that sees at most K frames can still model a video of any length N > K if it learns every
conditional p(x^X | x^Y) for arbitrary small sets of latent frames X and observed frames Y, placed anywhere in the video
(Sec. 4). Training draws such (X, Y) from long videos; observed frames enter the network clean, marked by an indicator
channel, the loss covers the latent frames only, and the network knows where the frames are only through relative
position encodings of their frame indices in the temporal attention, so the same weights serve frames 0-15 and frames
1000-1015. A sampling scheme (Sec. 3) is then a list of stages (Y_s, X_s), each sampling X_s given frames generated
earlier: Autoregressive (the next frames given the latest ones), Long-range (half of the observed frames reach back to
the start) and Hierarchy-2 (keyframes spread over the whole video first, then the gaps filled given frames on both
sides), which keeps digits the same across a video far longer than K.

Time convention: t = 0 is data, t = 1 is noise, z_t = alpha_t x + sigma_t eps, cosine log-SNR, as
video/video_diffusion_models.py (the code: DDPM, 1000 discrete steps, step 999 is noise). The network predicts
v = alpha_t eps - sigma_t x, so x_hat = alpha_t z_t - sigma_t v_hat.

Deviations from the paper:
- Moving MNIST (two bouncing digits, 32x32) with 64-frame training videos and K = 16 (paper: CARLA 1000, MineRL 500,
  GQN-Mazes 300 frames at 64-128 px, K = 20). Unconditional, as the paper: the digits' labels are not used.
- Sampling starts unconditionally, as the code does without observed frames; `--given N` starts from the first N
  frames of new clips instead, as the paper's evaluation (36 given frames of test videos), and samples.npz then holds
  the clips' digit labels. No adaptive or optimised schemes, no Hierarchy-N for N > 2.
- The training tasks follow the code (train_util.py sample_some_indices, sample_all_masks, prepare_training_batch,
  pad_with_random_frames = True): frames left over up to K are random frames of another clip, which attend only among
  themselves and are trained as latent frames. `--continuation F` (0 in the presets) makes a share F of the tasks
  K consecutive frames with the first 1..K-1 observed instead (at K = 8 about a quarter of the code's tasks observe
  any frame); `--decay-steps N` (0 in the presets) lowers the lr linearly to 0 over the last N steps (the code:
  constant). With both, over 12000 steps, the network begins to carry observed digits' shapes into new frames (README).
- One RPE net per temporal attention outputs R^q, R^k and R^v together (the code: three nets with the same inputs).
  ResBlocks add the time embedding (the code: scale-shift norm). Temporal attention before spatial attention, as the
  code. The frames of a task are ordered observed first (the code: by frame index); nothing depends on the order.
- Diffusion as video_diffusion_models.py: continuous cosine log-SNR, ancestral sampling with the posterior variance
  and x_hat clipped to [-1, 1], 256 steps (the code: linear beta, 1000 steps, variance beta_t); v-prediction
  (Salimans & Ho 2022; the code: eps): with eps, video_diffusion_models.py's CPU model sampled grey backgrounds.
- Small widths, attention at <= 16x16 only (<= 8x8 on the CPU); gradient clipping 1; bf16 autocast on CUDA and on
  CPUs with native bf16 (precision()); lr 2e-4 (the code: 1e-4, no clipping, fp16 optional).

Usage:
  python video/flexible_diffusion_modeling.py --train --sample --data-dir ../shared/data
  python video/flexible_diffusion_modeling.py --train --sample --steps 12000 --decay-steps 3000 --continuation 0.5 \\
         --out runs/fdm_long --data-dir ../shared/data   # 45 min of training on 2 CPU cores: flips 0.84 (preset 0.92)
  python video/flexible_diffusion_modeling.py --train --sample --resume --steps 24000 --out runs/fdm_long \\
         --data-dir ../shared/data   # on to 24000 steps, 50 min more: flips 0.73
  python video/flexible_diffusion_modeling.py --sample --scheme autoregressive --step 1 --length 64   # one new frame a stage
  python video/flexible_diffusion_modeling.py --sample --scheme autoregressive --step 1 --given 8 --length 32 \\
         --data-dir ../shared/data   # complete new clips from their first 8 frames, as the paper's evaluation
  python video/flexible_diffusion_modeling.py --sample --scheme long-range --length 128 --out runs/fdm_long_range \\
         --ckpt runs/flexible_diffusion_modeling/ckpt.pt
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
from shared import UserError, between_steps, log, moving_mnist, save_gif, save_npz, save_png  # noqa: E402

NAME = "flexible_diffusion_modeling"

# --- config ---
@dataclass
class Config:
    ch: int = 64                 # U-Net base channels (code: 128)
    blocks: int = 2              # residual blocks per resolution
    attn_res: int = 16           # temporal + spatial attention at resolutions <= this, and in the middle
    max_frames: int = 16         # K: frames the network sees at once, observed + latent (paper: 20)
    train_length: int = 64       # frames of each training video (paper: 300 to 1000)
    clips: int = 5000            # Moving MNIST videos generated for training
    steps: int = 20000           # training steps
    batch_size: int = 32         # training tasks per step
    lr: float = 2e-4             # AdamW (code: 1e-4)
    decay_steps: int = 0         # the last N steps lower the lr linearly to 0 (0: a constant lr)
    continuation: float = 0.0    # share of tasks that are K consecutive frames, a random prefix observed (0: none)
    ema: float = 0.9999          # EMA decay per step
    sample_steps: int = 256      # ancestral steps per stage (code: 1000)
    num_samples: int = 10        # videos sampled
    scheme: str = "hierarchy-2"  # sampling scheme (Sec. 3)
    length: int = 64             # frames of each sampled video
    step: int = 8                # latent frames per stage after the first (code: max_frames // 2)
    given: int = 0               # frames taken from new Moving MNIST clips before sampling (paper's evaluation: 36)
    log_every: int = 100
    ckpt_every: int = 1000

PRESETS = {
    "gpu": Config(),
    "cpu": Config(ch=16, blocks=1, attn_res=8, max_frames=8, step=4, clips=2000, steps=4800, batch_size=8, lr=1e-3,
                  ema=0.995, sample_steps=128),
    "tiny": Config(ch=8, blocks=1, attn_res=8, max_frames=4, train_length=8, clips=16, steps=2, batch_size=2,
                   sample_steps=2, num_samples=2, length=8, step=2, log_every=1, ckpt_every=1),
}
ZERO_OK = ("decay_steps", "continuation", "ema", "given")  # others must be > 0
CHOICES = {"scheme": ("autoregressive", "long-range", "hierarchy-2")}  # flags with a choice

# --- model ---
def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) times, as in DDPM / Transformer."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs                                     # (B, dim/2)
    return torch.cat([args.cos(), args.sin()], -1)                        # (B, dim)

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

class TemporalAttention(nn.Module):  # the paper's idea (Sec. 4): frames placed only by their relative frame indices
    def __init__(self, c, emb, heads=4):
        super().__init__()
        self.heads, self.norm = heads, norm(c)
        self.qkv, self.out = nn.Linear(c, 3 * c), zero(nn.Linear(c, c))
        self.dist, self.time, self.rpe = nn.Linear(3, c), nn.Linear(emb, c), zero(nn.Linear(c, 3 * c))   # RPE net

    def rel(self, idx, e):
        """R^q, R^k, R^v, each (B, heads, F, F, d), from the offsets d_ij = idx_i - idx_j through
        (log(1 + d+), log(1 + d-), 1[d = 0]) and the time embedding e (B, emb) [code rpe.py RPENet]."""
        d = (idx[:, :, None] - idx[:, None, :]).float()                   # (B, F, F)
        feats = torch.stack([d.clamp(min=0).log1p(), (-d).clamp(min=0).log1p(), (d == 0).float()], -1)
        r = self.rpe(F.silu(self.dist(feats) + self.time(e)[:, None, None]))   # (B, F, F, 3C), zero at init
        return rearrange(r, "b i j (k h d) -> k b h i j d", k=3, h=self.heads)

    def forward(self, x, e, f, idx, pad=None):                            # x (B F, C, H, W), idx, pad (B, F)
        h = rearrange(self.norm(x), "(b f) c x y -> b (x y) f c", f=f)    # frames a sequence at every pixel
        q, k, v = rearrange(self.qkv(h), "b n f (k h d) -> k b n h f d", k=3, h=self.heads)   # (B, HW, heads, F, d)
        rq, rk, rv = self.rel(idx, e[::f])
        a = q @ k.transpose(-1, -2) + torch.einsum("bnhid,bhijd->bnhij", q, rk)   # q_i.k_j + q_i.R^k_ij
        a = a + torch.einsum("bnhjd,bhijd->bnhij", k, rq)                 # + k_j.R^q_ij [code rpe.py]
        if pad is not None:  # padding frames (another clip) and the task's frames attend only within their own group
            a = a.masked_fill((pad[:, :, None] != pad[:, None, :])[:, None, None], -math.inf)
        a = (a * q.shape[-1] ** -0.5).softmax(-1)                         # (B, HW, heads, F, F)
        h = a @ v + torch.einsum("bnhij,bhijd->bnhid", a, rv)             # RPE on values too [code rpe.py]
        h = self.out(rearrange(h, "b n h f d -> b n f (h d)"))
        return x + rearrange(h, "b (x y) f c -> (b f) c x y", x=x.shape[2])

class Block(nn.Module):
    """A ResBlock, then (at <= attn_res) temporal attention with relative positions and spatial attention per frame
    (the code's FactorizedAttentionBlock)."""

    def __init__(self, cin, cout, emb, attn):
        super().__init__()
        self.res = ResBlock(cin, cout, emb, 0.0)
        self.attn = nn.ModuleList([TemporalAttention(cout, emb), Attention(cout)] if attn else [])

    def forward(self, h, e, f, idx, pad):                                 # h (B F, C, H, W), e (B F, emb)
        h = self.res(h, e)
        for layer in self.attn:
            h = layer(h, e, f, idx, pad) if isinstance(layer, TemporalAttention) else layer(h)
        return h

def fdm_input(z, x0, obs):  # the paper's idea (Sec. 4): observed frames enter clean, marked by an indicator channel
    """(B, 2, F, H, W): z_t on latent frames and x0 on observed ones, then the observed mask as a channel."""
    m = obs[:, None, :, None, None]                                       # (B, 1, F, 1, 1)
    return torch.cat([torch.where(m, x0, z), m.expand_as(z).to(z.dtype)], 1)

class UNet(nn.Module):
    """v(z_t, x0, t, frame indices, observed mask) on (B, 1, F, 32, 32): edm.py's U-Net run on every frame (frames
    folded into the batch), 32 -> 16 -> 8; frames meet only in the temporal attention."""

    def __init__(self, ch=64, blocks=2, attn_res=16, mult=(1, 2, 2)):
        super().__init__()
        self.ch, emb, res = ch, 4 * ch, 32
        self.time = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(2, ch, 3, padding=1)                         # frame + indicator channel
        self.down, skips, c = nn.ModuleList(), [ch], ch
        for i, m in enumerate(mult):
            for _ in range(blocks):
                self.down.append(Block(c, ch * m, emb, res <= attn_res))
                skips.append(c := ch * m)
            if i < len(mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
                res //= 2
        self.mid = nn.ModuleList([Block(c, c, emb, True), Block(c, c, emb, False)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(blocks + 1):
                self.up.append(Block(c + skips.pop(), ch * m, emb, res <= attn_res))
                c = ch * m
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), zero(nn.Conv2d(c, 1, 3, padding=1)))

    def forward(self, z, x0, t, idx, obs, pad=None):                      # z, x0 (B, 1, F, H, W), t (B,), idx (B, F)
        b, f = z.shape[0], z.shape[2]
        e = self.time(timestep_embedding(1000 * t, self.ch)).repeat_interleave(f, 0)   # (B F, emb): one t per task
        h = self.inp(rearrange(fdm_input(z, x0, obs), "b c f x y -> (b f) c x y"))     # (B F, ch, H, W)
        hs = [h]
        for layer in self.down:
            h = layer(h, e, f, idx, pad) if isinstance(layer, Block) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, e, f, idx, pad)                                  # (B F, 2ch, 8, 8)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), e, f, idx, pad) if isinstance(layer, Block) else layer(h)
        return rearrange(self.out(h), "(b f) c x y -> b c f x y", b=b)     # (B, 1, F, H, W) v_hat, zero at init

# --- diffusion ---
# log_snr, alpha_sigma, posterior: same as video/video_diffusion_models.py
def log_snr(t, s=0.008):  # cosine lambda(t) = -log(cos((t + s)/(1 + s) pi/2)^-2 - 1) [R imagen_pytorch.py:217]
    return -torch.log((torch.cos((t + s) / (1 + s) * math.pi / 2) ** -2 - 1).clamp(min=1e-5))

def alpha_sigma(t):  # alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), as (B, 1, 1, 1, 1)
    return (lam := log_snr(t.float()).reshape(-1, 1, 1, 1, 1)).sigmoid().sqrt(), (-lam).sigmoid().sqrt()

def diffusion_loss(net, x, idx, obs, pad=None):
    """|| v_theta(z_t, x0, t, idx, obs) - v ||^2, v = alpha_t eps - sigma_t x (Salimans & Ho 2022 Sec. 4), over the
    latent frames only (Sec. 4): observed frames are inputs, not targets; padding frames count as latent, as the code.
    t ~ U[0, 1], one t per task."""
    t, eps = torch.rand(len(x), device=x.device), torch.randn_like(x)
    a, s = alpha_sigma(t)
    v = a * eps - s * x
    err = ((net(a * x + s * eps, x, t, idx, obs, pad).float() - v) ** 2).mean((1, 3, 4))   # (B, F)
    latent = (~obs).float()
    return (err * latent).sum(1) / latent.sum(1)                          # (B,)

def posterior(z, x0, t, s):
    """q(z_s | z_t, x0), s < t: c = -expm1(lambda_t - lambda_s), mean alpha_s (z_t (1-c)/alpha_t + c x0), var sigma_s^2 c."""
    (a_t, _), (a_s, s_s) = alpha_sigma(t), alpha_sigma(s)
    c = -torch.expm1(log_snr(t) - log_snr(s))
    return a_s * (z * (1 - c) / a_t + c * x0), s_s ** 2 * c

def x0_hat(v_fn, z, t):
    """x_hat = alpha_t z_t - sigma_t v_hat, clipped to [-1, 1] (video_diffusion_models.py's, without guidance)."""
    a, s = alpha_sigma(t)
    return (a * z - s * v_fn(z, t.expand(len(z))).float()).clamp(-1, 1)

@torch.no_grad()
def ancestral(v_fn, noise, n):
    """t = 1 -> 0 in n ancestral steps (the posterior variance), x_hat = alpha_t z_t - sigma_t v_hat clipped."""
    ts, z = torch.linspace(1, 0, n + 1, device=noise.device), noise
    for i in range(n):
        x0 = x0_hat(v_fn, z, ts[i])
        mean, var = posterior(z, x0, ts[i], ts[i + 1])
        z = mean + var.sqrt() * torch.randn_like(z) if i < n - 1 else mean   # no noise at the last step
    return z

# Sampling schemes (Sec. 3): lists of stages (observed frame indices Y_s, latent frame indices X_s) for a video of
# `length` frames, at most k frames a stage, `step` new frames a stage after the first; frames 0..given-1, if any, are
# real frames given before the first stage [code sampling_schemes.py, num_obs]
def spread(start, end, n):
    """n distinct frame indices from start to end (inclusive), evenly spread: int(linspace(start, end, n))."""
    return [start + i * (end - start) // max(n - 1, 1) for i in range(n)]

def autoregressive(length, k, step, given=0):
    """The first k frames (none when frames are given), then repeatedly the next `step` frames given the k - step
    latest ones."""
    done = given or min(k, length)
    stages = [] if given else [([], list(range(done)))]
    while done < length:
        stages.append((list(range(max(done - (k - step), 0), done)), list(range(done, min(done + step, length)))))
        done = stages[-1][1][-1] + 1
    return stages

def long_range(length, k, step, given=0):
    """As autoregressive, but only half of the k - step observed frames are the latest ones; the others reach back to
    the given frames, else the first stage's, latest first (the code's LongRangeAutoregressive)."""
    stages, c = autoregressive(length, k, step, given), k - step
    first = list(range(given)) or stages[0][1]
    for i in range(0 if given else 1, len(stages)):
        new = stages[i][1]
        recent = list(range(max(new[0] - c // 2, 0), new[0]))
        far = [j for j in reversed(first) if j not in recent][:c - len(recent)]
        stages[i] = (sorted(far + recent), new)
    return stages

def hierarchy_2(length, k, step, given=0):
    """Level 1: k keyframes spread over the whole video (given frames: `step` keyframes spread over the rest, given
    k - step given frames spread over them, as the code's HierarchyNLevel at level 1). Level 2: the gaps, `step`
    frames at a time in order, given the generated frames between them and up to half of the other observed slots
    after them, the rest before them."""
    if given:
        keys = spread(given, length - 1, min(step, length - given))
        stages = [(spread(0, given - 1, min(k - step, given)), keys)]
    else:
        keys = spread(0, length - 1, min(k, length))
        stages = [([], keys)]
    done = set(keys) | set(range(given))
    while len(done) < length:
        s = step
        while True:
            new = [i for i in range(length) if i not in done][:s]
            inside = [i for i in range(new[0], new[-1]) if i in done]
            room = k - len(new) - len(inside)
            if room >= 2 or s == 1:
                break
            s -= 1                                                        # no room for both sides: fewer new frames
        after = [i for i in range(new[-1] + 1, length) if i in done][:room // 2]
        before = [i for i in range(new[0] - 1, -1, -1) if i in done][:room - len(after)]
        stages.append((sorted(before + inside + after), new))
        done.update(new)
    return stages

SCHEMES = {"autoregressive": autoregressive, "long-range": long_range, "hierarchy-2": hierarchy_2}

@torch.no_grad()
def generate(v_fn, stages, n, length, steps, device, given=None):
    """Run a scheme's stages in turn: each samples its latent frames given the frames generated before (Sec. 3).
    v_fn(z, x0, t, idx, obs) is the network; given (n, 1, G, 32, 32): the videos' first frames, if any; returns
    (n, 1, length, 32, 32)."""
    video = torch.zeros(n, 1, length, 32, 32, device=device)
    if given is not None:
        video[:, :, :given.shape[2]] = given
    for obs, latent in tqdm(stages, desc="stages", leave=False):
        idx = torch.tensor(obs + latent, device=device).expand(n, -1)    # (B, F): observed first
        is_obs = (torch.arange(idx.shape[1], device=device) < len(obs)).expand(n, -1)
        x0 = video[:, :, idx[0]]                                          # the latent frames' zeros are never read
        z = ancestral(lambda z, t: v_fn(z, x0, t, idx, is_obs), torch.randn_like(x0), steps)
        video[:, :, latent] = z[:, :, len(obs):]
    return video

# --- train ---
def some_indices(k, T):
    """A group of s ~ U{1..k} frame indices in [0, T), spaced by a log-uniform scale in [1, T / (s - 0.999)] from a
    uniform start (the code's sample_some_indices)."""
    s = int(torch.randint(1, k + 1, ()))
    scale = math.exp(float(torch.rand(())) * math.log(T / (s - 0.999)))
    pos = float(torch.rand(())) * (T - scale * (s - 1))
    return [int(pos + i * scale) for i in range(s)]

def frame_masks(k, T):  # the paper's idea (Sec. 4): random latent and observed frame subsets of a long video
    """A latent group, then groups added to the latent or the observed frames at random (indices already taken dropped)
    until one would take more than k frames in all (the code's sample_all_masks). Returns (latent, observed)."""
    latent, obs = set(some_indices(k, T)), set()
    while True:
        new = set(some_indices(k, T)) - latent - obs
        if len(new) > k - len(latent) - len(obs):
            return sorted(latent), sorted(obs)
        (obs if torch.rand(()) < 0.5 else latent).update(new)

def batch(videos, b, k, cont=0.0):
    """b training tasks of k frames: x (B, 1, K, 32, 32), frame indices (B, K), observed and padding masks (B, K).
    Each task's observed and latent frames come first, then random frames of another clip (pad_with_random_frames).
    A share `cont` of the tasks are continuations instead (not in the paper): k consecutive frames, the first 1..k-1
    observed."""
    n, T = videos.shape[:2]
    clip, idx = torch.randint(n, (b, 1)).repeat(1, k), torch.randint(T, (b, k))
    obs, pad = torch.zeros(b, k, dtype=torch.bool), torch.ones(b, k, dtype=torch.bool)
    for i in range(b):
        if cont and torch.rand(()) < cont:
            start, j = int(torch.randint(T - k + 1, ())), int(torch.randint(1, k, ()))
            seen, latent = list(range(start, start + j)), list(range(start + j, start + k))
        else:
            latent, seen = frame_masks(k, T)
        idx[i, :len(seen + latent)] = torch.tensor(seen + latent)
        obs[i, :len(seen)], pad[i, :len(seen + latent)] = True, False
    clip = torch.where(pad, torch.randint(n, (b, 1)), clip)
    x = videos[clip.to(videos.device), idx.to(videos.device)]            # (B, K, 1, 32, 32)
    return (rearrange(x, "b f c x y -> b c f x y"), *(a.to(videos.device) for a in (idx, obs, pad)))

def train(args, device, out, ckpt_path):
    torch.manual_seed(args.seed)
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: continue it with --resume, or pass another --out")
    state = load_ckpt(ckpt_path) if args.resume else None
    preset = args.preset or ("cpu" if device.type == "cpu" else "gpu")
    cfg = make_config(args, state["config"] if state else asdict(PRESETS[preset]), fixed=bool(state))
    videos = moving_mnist(args.data_dir, cfg.clips, cfg.train_length)[0].to(device)   # (N, T, 1, 32, 32): long clips
    amp, layout = precision(device)
    net = UNet(cfg.ch, cfg.blocks, cfg.attn_res).to(device, memory_format=layout)
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
                         f"{len(videos)} training clips, {device}, step {step}/{cfg.steps}, {cfg}")

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
            x, idx, obs, pad = batch(videos, cfg.batch_size, cfg.max_frames, cfg.continuation)
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                loss = diffusion_loss(fwd, x, idx, obs, pad).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            for group in opt.param_groups:                                # constant, then linear to 0 at cfg.steps
                group["lr"] = cfg.lr * min(1.0, (cfg.steps - done) / max(cfg.decay_steps, 1e-9))
            opt.step()
            decay = min(cfg.ema, (1 + done) / (10 + done))                # EMA with a warm-up
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)
            running, seen, done = running + loss.detach(), seen + 1, done + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                save(done, write=False)
                n = seen * cfg.batch_size / (time.time() - clock)
                log(out / "log.txt", f"step {done} loss {running.item() / seen:.4f} tasks/s {n:.1f} "
                                     f"frames/s {n * cfg.max_frames:.0f}")
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
    amp, layout = precision(device)
    net = UNet(cfg.ch, cfg.blocks, cfg.attn_res).to(device, memory_format=layout).eval().requires_grad_(False)
    net.load_state_dict(state["ema"])
    stages = SCHEMES[cfg.scheme](cfg.length, cfg.max_frames, cfg.step, cfg.given)
    given, labels = None, None
    if cfg.given:  # new clips (seed 1; training: seed 0), their first frames given as the paper's evaluation
        clips, labels = moving_mnist(args.data_dir, cfg.num_samples, cfg.length, seed=1)   # (N, L, 1, 32, 32)
        given = rearrange(clips[:, :cfg.given], "b f c x y -> b c f x y").to(device)
    torch.manual_seed(args.seed)                                          # the noise of each step and stage
    with torch.autocast(device.type, torch.bfloat16, enabled=amp):
        video = generate(net, stages, cfg.num_samples, cfg.length, cfg.sample_steps, device, given)   # (B, 1, L, H, W)
    videos = rearrange(video.float(), "b c f x y -> b f c x y")
    save_png(out / "samples.png", videos.flatten(0, 1), nrow=videos.shape[1])   # one video per row
    save_gif(out / "samples.gif", videos.transpose(0, 1), max_frames=cfg.length)   # (L, N, 1, 32, 32): every frame
    save_npz(out / "samples.npz", videos=videos, labels=labels)
    print(f"wrote {out}/samples.png, samples.gif, samples.npz: {len(videos)} videos of {cfg.length} frames "
          f"(step {state['step']}), {cfg.scheme} in {len(stages)} stages of <= {cfg.max_frames} frames, "
          f"{cfg.sample_steps} steps each" + (f", after {cfg.given} given frames" if cfg.given else ""))

# --- cli ---
HELP = dict(re.findall(r"^    (\w+): \w+ = [^#\n]*# (.*)$", Path(__file__).read_text(), re.M))  # Config's comments

def make_config(args, base, fixed=True):
    """A checkpoint's (fixed=True) or preset's config, overridden by the flags on the command line."""
    if unknown := set(base) - {f.name for f in fields(Config)}:
        raise UserError(f"the checkpoint comes from another version of {NAME}.py: unknown config {sorted(unknown)}")
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    for key in ("ch", "blocks", "attn_res"):
        if fixed and key in given and given[key] != base[key]:
            raise UserError(f"--{key.replace('_', '-')} {given[key]} does not match the checkpoint's {base[key]}")
    cfg = replace(Config(**base), **given)
    if cfg.step >= cfg.max_frames or cfg.max_frames > cfg.train_length or cfg.ch % 2 or cfg.continuation > 1 \
            or cfg.given >= cfg.length:
        raise UserError("need --step below --max-frames (a stage observes max-frames - step frames), --max-frames "
                        "at most --train-length, an even --ch, --continuation at most 1, --given below --length")
    return cfg

def pick_device(name):
    ok = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = name or next(d for d in ok if ok[d])
    if not ok.get(name.split(":")[0]):
        raise UserError(f"--device {name}: not available here (cuda, mps or cpu)")
    return torch.device(name)

def precision(device):
    """bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16), where the CPU preset trains 1.3 times as fast
    as in float32; channels_last (NHWC) convolutions, except in bf16 on a CPU, where oneDNN's NCHW ones are faster
    (video_diffusion_models.py's step: 0.49-0.57 s, against 0.78-0.87 s in bf16 NHWC, 0.75-0.78 s in float32 NHWC)."""
    bf16 = device.type == "cuda" or device.type == "cpu" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bf16, torch.contiguous_format if bf16 and device.type == "cpu" else torch.channels_last

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
