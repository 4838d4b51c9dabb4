"""Video Diffusion Models
Jonathan Ho, Tim Salimans, Alexey Gritsenko, William Chan, Mohammad Norouzi, David J. Fleet, 2022.
https://arxiv.org/abs/2204.03458v2 -- no official code; the reference implementation is
lucidrains/video-diffusion-pytorch (video_diffusion_pytorch.py).

The idea: a plain Gaussian diffusion model on whole clips, with the image U-Net made into a factorised space-time
3D U-Net (Sec. 3): every 3x3 convolution becomes a space-only (1, 3, 3) one, spatial attention runs on each frame,
and after each spatial attention block a temporal attention block mixes the frames at every pixel, with a learnt
bias over the frame offset j - i. Masking that temporal attention to the identity turns frames into independent
images, so images can be trained jointly with videos (K images appended to each clip as extra frames). Longer
videos come from the same model: generate 16 frames, then repeatedly sample the next frames x^b conditioned on the
last frames x^a; the replacement method (z^a_t <- a fresh sample of q(z_t | x^a) each step) gives x^b that look
good alone but do not follow x^a, which reconstruction guidance (Eq. 7) fixes by moving x_hat^b along
-grad_{z^b} ||x^a - x_hat^a(z_t)||^2.

Time convention (as the paper): t = 0 is data, t = 1 is noise, z_t = alpha_t x + sigma_t eps, cosine log-SNR
(alpha_t^2 + sigma_t^2 = 1). The network predicts v = alpha_t eps - sigma_t x, so x_hat = alpha_t z_t - sigma_t v_hat.

Deviations from the paper:
- Conditioning on the two digits of a clip: the sum of two label embeddings (order-free: "3 and 5" = "5 and 3")
  added to the time embedding (paper: BERT-large text embeddings); null label 10 with p 0.1 for classifier-free
  guidance, written w v_c + (1 - w) v_u (the paper's 1 + w; guidance is linear, so on v it equals that on eps).
- v-prediction (Salimans & Ho 2022, as Imagen Video) instead of eps: with eps our small CPU model sampled grey
  backgrounds (25-45% of pixels near black, real clips 92%; with v: 92% after 1200 steps).
- A (1, 3, 3) 3D convolution is written as a 2D convolution on frames folded into the batch (the same operation and
  weights), so that image/edm.py's blocks are reused unchanged; GroupNorm is therefore per frame (a 3D GroupNorm
  shares statistics over frames and would leak between the independent image frames).
- Relative position embeddings: one learnt bias per head per offset j - i, clipped to |j - i| <= 31 (reference:
  T5 buckets). The joint-training images are single frames of other random clips, each with its own digits.
- Replacement draws z^a_t from q(z_t | x^a), as does reconstruction guidance, which is "a variant of the
  replacement method" (Sec. 3.1): w_r = 0 is the replacement baseline, not unconditional sampling. Sec. 2's
  ancestral sampler with the posterior variance (its gamma = 0), no predictor-corrector Langevin steps;
  x_hat clipped to [-1, 1]. No spatial super-resolution variant of Eq. 7, no frame-skip conditioning.
- Small widths, attention at <= 16x16 only (<= 8x8 on the CPU); AdamW without weight decay, gradient clipping 1;
  bf16 autocast on CUDA and on CPUs with native bf16 (precision()). The paper's exact schedule and step counts are
  not given; 256 sampling steps. A constant lr; --decay-steps N lowers it linearly to 0 over the last N steps, which
  does nothing for the CPU preset's 3000 steps but took a 12000-step CPU run from flips 0.26 to 0.20 in 3000 steps.
- The CPU preset samples at guidance 6 (gpu: 2): its small model keeps the asked digits better with it (its 3000-step
  model, mean of two seeds of 40 clips: flips 0.54, acc 0.47 at 6, 0.64 and 0.44 at 4; fd 148 against 137). It appends 28
  images to each of 4 clips (paper: 0, 4 or 8, finding that images "speed up optimization"): on 2 cores drawing the
  frames is the bottleneck, and 3000 such steps (acc 0.48, flips 0.60) match 5000 of 8 clips + 4 images (0.45, 0.60).

Usage:
  python video/video_diffusion_models.py --train --sample --data-dir ../shared/data
  python video/video_diffusion_models.py --sample --extend 32          # 48 frames, reconstruction guidance (Eq. 7)
  python video/video_diffusion_models.py --sample --extend 32 --cond-method replacement \\
         --ckpt runs/video_diffusion_models/ckpt.pt --out runs/vdm_replacement              # the baseline
  python video/video_diffusion_models.py --train --image-frames 0 --out runs/vdm_no_images  # no joint training
  python video/video_diffusion_models.py --train --sample --steps 15000 --decay-steps 3000 \\
         --out runs/vdm_long      # ~2.5 h on 2 CPU cores; measured resumed at 12000 steps: flips 0.20 (preset 0.54)
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

NAME = "video_diffusion_models"

# --- config ---
@dataclass
class Config:
    ch: int = 64                 # U-Net base channels (paper: a larger 3D U-Net, widths not all given)
    blocks: int = 2              # residual blocks per resolution
    attn_res: int = 16           # spatial + temporal attention at resolutions <= this, and in the middle
    frames: int = 16             # frames per clip (paper: 16)
    image_frames: int = 8        # independent images appended to each clip, joint training (paper: 0, 4 or 8)
    clips: int = 10000           # Moving MNIST clips generated for training
    p_uncond: float = 0.1        # digits -> null label for classifier-free guidance
    steps: int = 20000           # training steps
    batch_size: int = 32         # clips per step
    lr: float = 2e-4             # AdamW (reference: 1e-4)
    decay_steps: int = 0         # the last N steps lower the lr linearly to 0 (0: a constant lr)
    ema: float = 0.9999          # EMA decay per step
    sample_steps: int = 256      # ancestral steps (reference: 1000)
    num_samples: int = 20        # clips sampled; clip k asks for digits k and k + 1 (mod 10)
    guidance: float = 2.0        # classifier-free guidance weight w (1 = conditional; paper's w + 1)
    extend: int = 0              # frames appended autoregressively after the first clip (Sec. 3.1)
    cond_frames: int = 8         # the last frames x^a each extension block is conditioned on
    cond_method: str = "reconstruction"   # reconstruction (guidance, Eq. 7) or replacement (the baseline)
    w_r: float = 2.0             # reconstruction guidance weight (paper: w_r > 1 works better)
    log_every: int = 100
    ckpt_every: int = 1000

PRESETS = {
    "gpu": Config(),
    "cpu": Config(ch=16, blocks=1, attn_res=8, image_frames=28, steps=3000, batch_size=4, lr=1e-3, ema=0.995,
                  sample_steps=128, num_samples=20, guidance=6.0),
    "tiny": Config(ch=8, blocks=1, attn_res=8, frames=4, image_frames=2, clips=16, steps=2, batch_size=2,
                   sample_steps=2, num_samples=2, extend=2, cond_frames=2, log_every=1, ckpt_every=1),
}
ZERO_OK = ("image_frames", "p_uncond", "decay_steps", "ema", "guidance", "extend", "w_r")  # others must be > 0
CHOICES = {"cond_method": ("reconstruction", "replacement")}  # flags with a choice

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

class TemporalAttention(nn.Module):  # the paper's idea (Sec. 3): attention over the frames of each pixel
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

class Block(nn.Module):
    """A ResBlock, then (at <= attn_res) spatial attention per frame and temporal attention after it (Sec. 3)."""

    def __init__(self, cin, cout, emb, attn):
        super().__init__()
        self.res = ResBlock(cin, cout, emb, 0.0)
        self.attn = nn.ModuleList([Attention(cout), TemporalAttention(cout)] if attn else [])

    def forward(self, h, e, f, images):                                   # h (B F, C, H, W), e (B F, emb)
        h = self.res(h, e)
        for layer in self.attn:
            h = layer(h, f, images) if isinstance(layer, TemporalAttention) else layer(h)
        return h

class UNet(nn.Module):
    """Factorised space-time U-Net v(z_t, t, y) on (B, 1, F, 32, 32): edm.py's U-Net run on every frame (frames
    folded into the batch: its 3x3 convs are the paper's (1, 3, 3) ones), 32 -> 16 -> 8; frames meet only in the
    temporal attention. y (B, F, 2): the two digits of each frame, 10 = null."""

    def __init__(self, ch=64, blocks=2, attn_res=16, mult=(1, 2, 2), classes=10):
        super().__init__()
        self.ch, emb, res = ch, 4 * ch, 32
        self.time = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(classes + 1, emb)
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
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

    def forward(self, x, t, y, images=0):                                 # x (B, 1, F, H, W), t (B,), y (B, F, 2)
        b, f = x.shape[0], x.shape[2]
        e = self.time(timestep_embedding(1000 * t, self.ch)).repeat_interleave(f, 0)   # (B F, emb): one t per clip
        e = e + self.label(y).sum(2).flatten(0, 1)                        # + the sum of the two digits' embeddings
        h = self.inp(rearrange(x, "b c f x y -> (b f) c x y"))            # (B F, ch, H, W): frames as a batch
        hs = [h]
        for layer in self.down:
            h = layer(h, e, f, images) if isinstance(layer, Block) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, e, f, images)                                    # (B F, 2ch, 8, 8)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), e, f, images) if isinstance(layer, Block) else layer(h)
        return rearrange(self.out(h), "(b f) c x y -> b c f x y", b=b)     # (B, 1, F, H, W) v_hat, zero at init

# --- diffusion ---
NULL = 10  # the 'no digit' label of classifier-free guidance

# log_snr, posterior: same as image/imagen.py; alpha_sigma: its version for (B, C, F, H, W)
def log_snr(t, s=0.008):  # cosine lambda(t) = -log(cos((t + s)/(1 + s) pi/2)^-2 - 1) [R imagen_pytorch.py:217]
    return -torch.log((torch.cos((t + s) / (1 + s) * math.pi / 2) ** -2 - 1).clamp(min=1e-5))

def alpha_sigma(t):  # alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), as (B, 1, 1, 1, 1)
    return (lam := log_snr(t.float()).reshape(-1, 1, 1, 1, 1)).sigmoid().sqrt(), (-lam).sigmoid().sqrt()

def diffusion_loss(net, x, y, images=0):
    """|| v_theta(z_t, t, y) - v ||^2, v = alpha_t eps - sigma_t x (Salimans & Ho 2022 Sec. 4), over every frame,
    video and image alike, t ~ U[0, 1] (Sec. 2)."""
    t, eps = torch.rand(len(x), device=x.device), torch.randn_like(x)
    a, s = alpha_sigma(t)
    v = a * eps - s * x
    return ((net(a * x + s * eps, t, y, images).float() - v) ** 2).mean((1, 2, 3, 4))   # (B,)

def guided(net, z, t, y, w=1.0):
    """Classifier-free guidance v~ = w v(z, y) + (1 - w) v(z, null), one batched call; w = 1 is conditional."""
    if w == 1:
        return net(z, t, y).float()
    v_c, v_u = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)])).float().chunk(2)
    return v_u + w * (v_c - v_u)

def x0_hat(v_fn, z, t, x_a=None, w_r=0.0):
    """x_hat = alpha_t z_t - sigma_t v_hat, clipped to [-1, 1]. With w_r > 0, the frames after x^a's get
    reconstruction guidance (Eq. 7): x~^b = x_hat^b - (w_r alpha_t / 2) grad_{z_t^b} ||x^a - x_hat^a(z_t)||^2."""
    a, s = alpha_sigma(t)
    with torch.enable_grad():                                             # the sampler runs under no_grad
        z = z.detach().requires_grad_(w_r > 0)
        x0 = a * z - s * v_fn(z, t.expand(len(z)))
        if w_r > 0:
            k = x_a.shape[2]                                              # x^a: the first k frames
            grad, = torch.autograd.grad(((x_a - x0[:, :, :k]) ** 2).sum(), z)   # samples are independent: sum
            x0 = torch.cat([x0[:, :, :k], x0[:, :, k:] - w_r * a / 2 * grad[:, :, k:]], 2)
    return x0.detach().clamp(-1, 1)

def posterior(z, x0, t, s):
    """q(z_s | z_t, x0) (DDPM Eqs. 6-7), s < t: c = -expm1(lambda_t - lambda_s), mean alpha_s (z_t (1-c)/alpha_t + c x0), var sigma_s^2 c."""
    (a_t, _), (a_s, s_s) = alpha_sigma(t), alpha_sigma(s)
    c = -torch.expm1(log_snr(t) - log_snr(s))
    return a_s * (z * (1 - c) / a_t + c * x0), s_s ** 2 * c

@torch.no_grad()
def ancestral(v_fn, noise, n, x_a=None, w_r=0.0, bar=False):
    """t = 1 -> 0 in n ancestral steps (Sec. 2, gamma = 0). With x_a (B, C, k, H, W) the first k frames
    are conditioned on: z^a_t is replaced by a fresh sample of q(z_t | x^a) at every step (the replacement method,
    Sec. 3.1), and w_r > 0 adds reconstruction guidance (Eq. 7). Returns z_0 (B, C, F, H, W), x^a in front."""
    ts, z, k = torch.linspace(1, 0, n + 1, device=noise.device), noise, 0 if x_a is None else x_a.shape[2]
    for i in tqdm(range(n), desc="sample", leave=False, disable=not bar):
        if k:
            a, s = alpha_sigma(ts[i])
            z = torch.cat([a * x_a + s * torch.randn_like(x_a), z[:, :, k:]], 2)
        x0 = x0_hat(v_fn, z, ts[i], x_a, w_r)
        mean, var = posterior(z, x0, ts[i], ts[i + 1])
        z = mean + var.sqrt() * torch.randn_like(z) if i < n - 1 else mean   # no noise at the last step
    return z if x_a is None else torch.cat([x_a, z[:, :, k:]], 2)

def extend(sample_fn, video, n, k):
    """Autoregressive extension (Sec. 3.1): sample a window of the clip's length whose first k frames are the last k
    frames so far (x^a), keep the new ones (x^b), until n frames are appended. sample_fn(noise, x_a) -> window."""
    total, window = video.shape[2] + n, video.shape[2]
    while video.shape[2] < total:
        noise = torch.randn(*video.shape[:2], window, *video.shape[3:], device=video.device)
        video = torch.cat([video, sample_fn(noise, video[:, :, -k:])[:, :, k:]], 2)
    return video[:, :, :total]                                            # (B, C, F + n, H, W)

# --- train ---
def batch(videos, labels, b, k):  # the paper's idea: images trained as extra frames of a video
    """b random clips with k independent frames of other random clips appended (joint image-video training, Sec. 3):
    x (B, 1, F + K, 32, 32) and the two digits of every frame (B, F + K, 2)."""
    n, f = videos.shape[:2]
    idx = torch.randint(n, (b,), device=videos.device)
    other, frame = torch.randint(n, (b, k), device=videos.device), torch.randint(f, (b, k), device=videos.device)
    x = torch.cat([videos[idx], videos[other, frame]], 1)                 # (B, F + K, 1, 32, 32)
    y = torch.cat([labels[idx, None].expand(b, f, 2), labels[other]], 1)  # (B, F + K, 2)
    return rearrange(x, "b f c x y -> b c f x y"), y

def train(args, device, out, ckpt_path):
    torch.manual_seed(args.seed)
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: continue it with --resume, or pass another --out")
    state = load_ckpt(ckpt_path) if args.resume else None
    preset = args.preset or ("cpu" if device.type == "cpu" else "gpu")
    cfg = make_config(args, state["config"] if state else asdict(PRESETS[preset]), fixed=bool(state))
    videos, labels = (a.to(device) for a in moving_mnist(args.data_dir, cfg.clips, cfg.frames))   # (N, F, 1, 32, 32)
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
            x, y = batch(videos, labels, cfg.batch_size, cfg.image_frames)
            y = torch.where(torch.rand(len(y), 1, 1, device=device) < cfg.p_uncond, NULL, y)   # CFG: a clip's digits
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                loss = diffusion_loss(fwd, x, y, cfg.image_frames).mean()
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
                log(out / "log.txt", f"step {done} loss {running.item() / seen:.4f} clips/s {n:.1f} "
                                     f"frames/s {n * (cfg.frames + cfg.image_frames):.0f}")
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
    net = UNet(cfg.ch, cfg.blocks, cfg.attn_res).to(device, memory_format=layout).eval().requires_grad_(False)   # grads: z only (Eq. 7)
    net.load_state_dict(state["ema"])
    k = torch.arange(cfg.num_samples, device=device) % 10
    y = torch.stack([k, (k + 1) % 10], 1)                                 # GIF column k: digits k and k + 1
    noise = torch.randn(len(y), 1, cfg.frames, 32, 32, generator=torch.Generator().manual_seed(args.seed)).to(device)
    torch.manual_seed(args.seed)                                          # the noise of each step and block
    v_fn = lambda z, t: guided(net, z, t, y[:, None].expand(-1, z.shape[2], -1), cfg.guidance)   # noqa: E731
    w_r = cfg.w_r if cfg.cond_method == "reconstruction" else 0.0         # w_r = 0: the replacement method
    with torch.autocast(device.type, torch.bfloat16, enabled=amp):
        video = ancestral(v_fn, noise, cfg.sample_steps, bar=True)        # (B, 1, F, 32, 32)
        video = extend(lambda z, x_a: ancestral(v_fn, z, cfg.sample_steps, x_a, w_r, bar=True), video,
                       cfg.extend, cfg.cond_frames)                       # (B, 1, F + extend, 32, 32)
    videos = rearrange(video.float(), "b c f x y -> b f c x y")
    save_png(out / "samples.png", videos.flatten(0, 1), nrow=videos.shape[1])   # one clip per row
    save_gif(out / "samples.gif", videos.transpose(0, 1))                 # (F, N, 1, 32, 32): the clips play
    save_npz(out / "samples.npz", videos=videos, labels=y)
    more = f", extended by {cfg.extend} frames ({cfg.cond_method}, w_r {w_r}, on the last {cfg.cond_frames})"
    print(f"wrote {out}/samples.png, samples.gif, samples.npz: {len(y)} clips of {videos.shape[1]} frames "
          f"(step {state['step']}), {cfg.sample_steps} steps, guidance {cfg.guidance}{more if cfg.extend else ''}")

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
    if cfg.extend and cfg.cond_frames >= cfg.frames or cfg.ch % 2:
        raise UserError("need --cond-frames below --frames (each extension block adds frames - cond-frames), "
                        "an even --ch")
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
