"""Imagen: "Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding"
Chitwan Saharia, William Chan, Saurabh Saxena et al., 2022. https://arxiv.org/abs/2205.11487v1
No official code; the reference implementation is lucidrains/imagen-pytorch (imagen_pytorch.py).

The idea: a cascade of diffusion models on a FROZEN text encoder (Sec. 2.1): a base model draws a small image and a
super-resolution (SR) model enlarges it, both seeing the text pooled (added to the time embedding) and through
cross-attention. The SR model's low-res input is noised to a random level that it is told (noise conditioning
augmentation, Sec. 2.4), so it forgives the base model's flaws. Large guidance weights push x0_hat out of [-1, 1];
dynamic thresholding (Sec. 2.3) clips x0_hat at every step to the p-th percentile s of |x0_hat| and divides by s.
The SR net is an Efficient U-Net (App. B): more blocks at low resolution, skips x 2^-0.5, resampling reordered.

Time convention (reference): t = 0 is data, t = 1 is noise, z_t = alpha_t x + sigma_t eps with a cosine log-SNR.

Deviations from the paper:
- Two stages, base 16x16 and SR 16 -> 32 (paper: 64x64, then 256 and 1024); small widths; bf16 autocast on CUDA.
  The base is edm.py's small U-Net, self-attention at 4x4 only (paper: a 2B-parameter U-Net after Nichol & Dhariwal).
- Text: sd3.py's byte-level transformer instead of T5-XXL, fitted alone first (stand-in for T5 pretraining: name the
  digit of a prompt by a linear probe on its pooled embedding), then frozen, under no_grad. Null text: "" encoded.
- Static thresholding by default: on MNIST dynamic greys the black background (-1 -> -1/s) and scores far worse
  (README: w 4, acc 0.70 vs 0.97; w 10, 0.56 vs 0.99). --stage both: the two stages on the same batches.
- Adam for both stages, no warm-up (paper: Adafactor for the base, Adam for SR, lr 1e-4 after 10k warm-up steps).
- Augmentation on the cosine log-SNR (reference: a linear one); one guidance weight for both stages; p = 0.995
  (diffusers; the paper gives none); low-res images by 2x2 means, enlarged by nearest neighbour.

Usage:
  python image/imagen.py --train --sample --data-dir ../shared/data     # samples.gif: base, then SR stage
  python image/imagen.py --sample --guidance 10 --threshold dynamic      # the comparison of Sec. 2.3
  python image/imagen.py --train --resume --stage sr --steps 4000         # train the SR stage further
  python image/imagen.py --sample --prompt "a handwritten three" --aug-level 0.4
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

NAME = "imagen"

# --- config ---
@dataclass
class Config:
    ch: int = 64                 # base U-Net channels at 16x16, also the text width (paper: 512; T5-XXL 4096)
    blocks: int = 2              # base residual blocks per resolution (paper: 3)
    sr_ch: int = 32              # SR Efficient U-Net channels (paper: 128 for 64 -> 256)
    sr_blocks: int = 2           # SR blocks at 16x16, doubled at 8x8 and 4x4 (paper: 2, 4, 8, 8)
    text_steps: int = 1000       # fit of the text encoder before it is frozen (stand-in for T5 pretraining)
    p_uncond: float = 0.1        # prompt -> "" for classifier-free guidance (paper: 0.1)
    steps: int = 20000           # training steps of each stage (paper: 2.5M)
    batch_size: int = 128        # paper: 2048
    lr: float = 3e-4             # Adam (paper: 1e-4 with 10k warm-up steps)
    ema: float = 0.9999          # EMA decay per step
    sample_steps: int = 256      # ancestral steps per stage (reference: 1000)
    num_samples: int = 100
    guidance: float = 5.0        # guidance weight w in both stages (1 = conditional; paper: up to 10+)
    threshold: str = "static"    # static: clip x0_hat to [-1, 1], or dynamic (Sec. 2.3; paper's choice)
    percentile: float = 0.995    # dynamic thresholding percentile p of |x0_hat| (diffusers 0.995, lucidrains 0.95)
    aug_level: float = 0.2       # noise-conditioning aug level at sampling (training: U[0, 1]; reference 0.2)
    log_every: int = 100
    ckpt_every: int = 1000

PRESETS = {
    "gpu": Config(),
    "cpu": Config(ch=32, blocks=1, sr_ch=16, sr_blocks=1, text_steps=300, steps=1800, batch_size=64,
                  lr=1e-3, ema=0.999, sample_steps=64, guidance=4.0),
    "tiny": Config(ch=8, blocks=1, sr_ch=8, sr_blocks=1, text_steps=2, batch_size=4, steps=2,
                   sample_steps=2, num_samples=10, log_every=1, ckpt_every=1),
}
ZERO_OK = ("p_uncond", "guidance", "ema", "aug_level")  # others must be > 0
CHOICES, STAGES = {"threshold": ("dynamic", "static")}, ("base", "sr")  # flags with a choice; the cascade

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

def norm(c):  # norm, zero, ResBlock, Attention: same as image/edm.py
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

class CrossAttention(nn.Module):  # the paper's text conditioning (Sec. 2.5): pixels attend to the text tokens
    def __init__(self, c, dim, heads=4):
        super().__init__()
        self.heads, self.norm = heads, norm(c)
        self.q, self.kv, self.out = nn.Conv2d(c, c, 1), nn.Linear(dim, 2 * c), zero(nn.Conv2d(c, c, 1))   # kv: text

    def forward(self, x, ctx, mask):                                      # x (B, C, H, W), ctx (B, L, D), mask (B, L)
        q = rearrange(self.q(self.norm(x)), "b (h d) x y -> b h (x y) d", h=self.heads)
        k, v = rearrange(self.kv(ctx), "b l (n h d) -> n b h l d", n=2, h=self.heads)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None])  # (B, heads, HW, d), no padding
        return x + self.out(rearrange(h, "b h (x y) d -> b (h d) x y", x=x.shape[2]))

def call(layer, h, e, ctx, mask):  # the arguments each kind of layer takes
    return layer(h, e) if isinstance(layer, ResBlock) else layer(h, ctx, mask) if isinstance(layer, CrossAttention) else layer(h)

class UNet(nn.Module):
    """eps(z_t, t, text[, z_lr, t_aug]), text = (tokens, mask); cross-attention at <= 8x8. sr=False: edm.py's layout
    (base). sr=True: App. B's Efficient U-Net, resampling moved past a level's convs, skips x 2^-0.5; z_lr, t_aug in."""

    def __init__(self, ch, blocks, dim, size, mult=(1, 2, 2), sr=False):
        super().__init__()
        self.ch, emb, self.skip_scale, res = ch, 4 * ch, 2 ** -0.5 if sr else 1.0, size   # App. B: skips / sqrt 2
        mlp = lambda: nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.time, self.aug = mlp(), mlp() if sr else None                # sr: the aug level embedded (Sec. 2.4)
        self.text_norm, self.pool = nn.LayerNorm(dim), nn.Linear(dim, emb)  # LayerNorm the frozen text embeddings
        self.inp = nn.Conv2d(2 if sr else 1, ch, 3, padding=1)            # sr: z_t and z_lr concatenated
        self.down, self.up, kept, c = nn.ModuleList(), nn.ModuleList(), {}, ch   # kept: layer -> channels of its skip
        block = lambda cin, cout: [ResBlock(cin, cout, emb, 0.0)] + [CrossAttention(cout, dim)] * (res <= 8)
        for i, (m, n) in enumerate(zip(mult, blocks)):
            if sr or i > 0:                                               # App. B: downsample at the start of each
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # level; edm.py: at the end of the one
                res //= 2                                                 # before, its output a skip
                kept.update({} if sr else {len(self.down) - 1: c})
            for _ in range(n):
                self.down.extend(block(c, ch * m))
                c = kept[len(self.down) - 1] = ch * m
        self.keep, skips = set(kept), [ch, *kept.values()]
        self.down.extend([*block(c, c), Attention(c), ResBlock(c, c, emb, 0.0)])   # the middle, with self-attention
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(blocks[i] + (not sr)):                         # edm.py: +1 for its downsample's skip
                self.up.extend(block(c + skips.pop(), c := ch * m))       # (c + skip channels) -> ch m
            if sr or i > 0:                                               # App. B: upsample after the level's convs
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c, c, 3, padding=1)))
                res *= 2
        self.up.extend([ResBlock(c + skips.pop(), c, emb, 0.0)] if sr else [])   # full size: the input's skip
        self.out = nn.Sequential(norm(c), nn.SiLU(), zero(nn.Conv2d(c, 1, 3, padding=1)))

    def forward(self, z, t, text, lowres=None, t_aug=None):               # z (B, 1, S, S), t (B,), text (tokens, mask)
        ctx, mask = self.text_norm(text[0]), text[1]                      # (B, L, D), (B, L)
        pooled = (ctx * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)   # (B, D) masked mean
        e = self.time(timestep_embedding(1000 * t, self.ch)) + self.pool(pooled)   # pooled text + time embedding
        if self.aug is not None:                                          # Sec. 2.4: condition on the aug level
            z, e = torch.cat([z, lowres], 1), e + self.aug(timestep_embedding(1000 * t_aug, self.ch))
        hs = [h := self.inp(z)]
        for i, layer in enumerate(self.down):
            h = call(layer, h, e, ctx, mask)
            hs.extend([h] if i in self.keep else [])
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, hs.pop() * self.skip_scale], 1)
            h = call(layer, h, e, ctx, mask)
        return self.out(h)                                                # (B, 1, S, S) eps_hat, zero at init

def cascade(cfg):  # the frozen text encoder, the base model at 16x16, the SR model 16 -> 32 (Sec. 2.4)
    return nn.ModuleDict(dict(text=TextEncoder(cfg.ch), base=UNet(cfg.ch, (cfg.blocks,) * 3, cfg.ch, 16),
                              sr=UNet(cfg.sr_ch, [cfg.sr_blocks * 2 ** i for i in range(3)], cfg.ch, 32, sr=True)))

# --- diffusion ---
def log_snr(t, s=0.008):  # cosine lambda(t) = -log(cos((t + s)/(1 + s) pi/2)^-2 - 1) [R imagen_pytorch.py:217]
    return -torch.log((torch.cos((t + s) / (1 + s) * math.pi / 2) ** -2 - 1).clamp(min=1e-5))

def alpha_sigma(t):  # alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), as (B, 1, 1, 1)
    return (lam := log_snr(t.float()).reshape(-1, 1, 1, 1)).sigmoid().sqrt(), (-lam).sigmoid().sqrt()

def augment(x_lr, t_aug):
    """Noise conditioning augmentation (Sec. 2.4): z_lr = alpha(t_aug) up(x_lr) + sigma(t_aug) eps [R :2556-2572]."""
    (a, s), x = alpha_sigma(t_aug), F.interpolate(x_lr, scale_factor=2)   # nearest: (B, 1, 32, 32)
    return a * x + s * torch.randn_like(x)

def diffusion_loss(net, text, x, x_lr=None):
    """|| eps_theta(z_t, t, c[, z_lr, t_aug]) - eps ||^2, t ~ U[0, 1] (Sec. 2.2); for SR, t_aug ~ U[0, 1] (Sec. 2.4)."""
    t, t_aug, eps = torch.rand(len(x), device=x.device), torch.rand(len(x), device=x.device), torch.randn_like(x)
    (a, s), cond = alpha_sigma(t), {} if x_lr is None else dict(lowres=augment(x_lr, t_aug), t_aug=t_aug)
    return ((net(a * x + s * eps, t, text, **cond).float() - eps) ** 2).mean((1, 2, 3))   # (B,)

def guided(net, z, t, text, null, w=1.0, **cond):
    """Classifier-free guidance eps~ = w eps(z, c) + (1 - w) eps(z) (Sec. 2.2); null = the encoding of ""."""
    eps_c = net(z, t, text, **cond).float()
    return eps_c if w == 1 else w * eps_c + (1 - w) * net(z, t, null, **cond).float()

def threshold(x0, kind="dynamic", p=0.995):
    """Sec. 2.3: static clips to [-1, 1]; dynamic clips to [-s, s] and divides by s = max(p-th percentile of |x0|, 1)."""
    a = x0.flatten(1).abs().float().sort(1).values                        # sorted: MPS's quantile skips it along a dim
    s = torch.quantile(a, p, dim=1).clamp(min=1).view(-1, 1, 1, 1) if kind == "dynamic" else 1   # per sample
    return x0.clamp(-s, s) / s

def posterior(z, x0, t, s):
    """q(z_s | z_t, x0) (DDPM Eqs. 6-7), s < t: c = -expm1(lambda_t - lambda_s), mean alpha_s (z_t (1-c)/alpha_t + c x0), var sigma_s^2 c."""
    (a_t, _), (a_s, s_s) = alpha_sigma(t), alpha_sigma(s)
    c = -torch.expm1(log_snr(t) - log_snr(s))
    return a_s * (z * (1 - c) / a_t + c * x0), s_s ** 2 * c

@torch.no_grad()
def ancestral(eps_fn, noise, n, kind="dynamic", p=0.995, frames=20, bar=False):
    """t = 1 -> 0 in n steps, x0_hat thresholded at EVERY step (Sec. 2.3). Returns ~frames x0_hat, then the sample."""
    ts, z, traj = torch.linspace(1, 0, n + 1, device=noise.device), noise, []
    for i in tqdm(range(n), desc="sample", leave=False, disable=not bar):
        a, s = alpha_sigma(ts[i])
        x0 = threshold((z - s * eps_fn(z, ts[i].expand(len(z)))) / a, kind, p)   # x0_hat = (z_t - sigma_t eps) / alpha_t
        if i % max(n // frames, 1) == 0:
            traj.append(x0)
        mean, var = posterior(z, x0, ts[i], ts[i + 1])                    # [R :255-271]
        z = mean + var.sqrt() * torch.randn_like(z) if i < n - 1 else mean   # no noise at the last step
    return torch.stack(traj + [z])

# --- train ---
@torch.no_grad()
def encode(encoder, texts, device):  # the frozen encoder's tokens and mask (Sec. 2.1): no gradient reaches it
    return encoder(tokenize(texts).to(device))[:2]

def fit_text(encoder, steps, device):  # a stand-in for T5 pretraining: a linear probe on the pooled text names the digit
    probe = nn.Linear(encoder.tok.embedding_dim, 10).to(device)
    opt = torch.optim.Adam([*encoder.parameters(), *probe.parameters()], lr=1e-3)   # not --lr: fixed, no diffusion
    for _ in range(steps):
        logits = probe(encoder(tokenize(prompts(y := torch.randint(10, (64,)), "random")).to(device))[2])
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(logits, y.to(device)).backward()
        opt.step()
    return (logits.argmax(1).cpu() == y).float().mean().item()

def train(args, device, out, ckpt_path):
    torch.manual_seed(args.seed)
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: continue it with --resume, or pass another --out")
    state = load_ckpt(ckpt_path) if args.resume else None
    preset = args.preset or ("cpu" if device.type == "cpu" else "gpu")
    cfg = make_config(args, state["config"] if state else asdict(PRESETS[preset]), fixed=bool(state))
    x, y = mnist(args.data_dir)
    x = x.to(device)                                                      # labels stay on the CPU for the prompts
    net, stages = cascade(cfg).to(device, memory_format=torch.channels_last), STAGES if args.stage == "both" else (args.stage,)
    if not state:
        log(out / "log.txt", f"text encoder fitted: probe accuracy {fit_text(net['text'], cfg.text_steps, device):.2f}")
    net["text"].requires_grad_(False).eval().zero_grad()                  # frozen (Sec. 2.1), no grads of the fit
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam([p for s in STAGES for p in net[s].parameters()], lr=cfg.lr, fused=device.type == "cuda")
    count = state["stage_steps"] if state else dict.fromkeys(STAGES, 0)   # steps trained of each stage
    step = min(count[s] for s in stages)
    if state:
        for obj, key in ((net, "model"), (ema, "ema"), (opt, "opt")):
            obj.load_state_dict(state[key])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
    fwd = {s: torch.compile(net[s]) if args.compile else net[s] for s in STAGES}
    sizes = ", ".join(f"{k} {sum(p.numel() for p in v.parameters()) / 1e6:.2f}M" for k, v in net.items())
    log(out / "log.txt", f"{NAME}: {sizes} parameters, {len(x)} images, {device}, {'+'.join(stages)} from {count}, {cfg}")

    def save(done, write=True):  # a NaN/inf loss stops training before it can reach a checkpoint
        if not torch.isfinite(running).all():
            raise UserError(f"loss became {running.sum().item()} before step {done}; stopped, the last good "
                            f"checkpoint is kept at {ckpt_path} (try a lower --lr)")
        if not write:
            return
        tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save({"script": NAME, "config": asdict(cfg), "model": net.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict(), "step": done, "stage_steps": dict(count), "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None}, tmp)
        os.replace(tmp, ckpt_path)                                        # atomic: never a half-written file

    running, seen, clock, done = torch.zeros(2, device=device), 0, time.time(), step
    try:
        for done in between_steps(tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc="train")):
            idx = torch.randint(len(x), (cfg.batch_size,))
            texts = [s if r >= cfg.p_uncond else "" for s, r in zip(prompts(y[idx], "random"), torch.rand(len(idx)).tolist())]
            x32 = x[idx.to(device)]
            data = {"base": (F.avg_pool2d(x32, 2),), "sr": (x32, F.avg_pool2d(x32, 2))}   # SR: real 16x16 inputs
            todo = [s for s in stages if count[s] <= done]                # a stage ahead of the other waits
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                text = encode(net["text"], texts, device)                 # one encoding for both stages
                losses = [diffusion_loss(fwd[s], text, *data[s]).mean() if s in todo else x.new_zeros(()) for s in STAGES]
            opt.zero_grad(set_to_none=True)
            sum(losses).backward()                                        # disjoint parameters: independent stages
            opt.step()
            for s in todo:
                decay = min(cfg.ema, (1 + count[s]) / (10 + count[s]))    # EMA with a warm-up
                torch._foreach_lerp_(list(ema[s].parameters()), list(net[s].parameters()), 1 - decay)
                count[s] += 1
            running, seen, done = running + torch.stack(losses).detach(), seen + 1, done + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                save(done, write=False)
                loss = " ".join(f"{s} {v / seen:.4f}" for s, v in zip(STAGES, running.tolist()) if s in stages)
                log(out / "log.txt", f"step {done} loss {loss} images/s {seen * cfg.batch_size / (time.time() - clock):.0f}")
                running, seen, clock = torch.zeros(2, device=device), 0, time.time()
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
    cfg, count = make_config(args, state["config"]), state["stage_steps"]
    if untrained := [s for s in STAGES if count[s] == 0]:
        raise UserError(f"the {untrained[0]} stage of {ckpt_path} is untrained: --train --resume --stage {untrained[0]}")
    net = cascade(cfg).to(device, memory_format=torch.channels_last).eval()
    net.load_state_dict(state["ema"])
    y = torch.arange(cfg.num_samples) % 10                               # column k of the grid is digit k
    texts = [args.prompt] * len(y) if args.prompt is not None else prompts(y, "sentence")
    text, null = encode(net["text"], texts, device), encode(net["text"], [""] * len(y), device)
    noise = [torch.randn(len(y), 1, n, n, generator=torch.Generator().manual_seed(args.seed + n)) for n in (16, 32)]
    torch.manual_seed(args.seed)                                          # the noise of each step and of z_lr
    t_aug = torch.full((len(y),), cfg.aug_level, device=device)           # fixed at inference (Sec. 2.4)
    opts = dict(n=cfg.sample_steps, kind=cfg.threshold, p=cfg.percentile, bar=True)
    eps = lambda stage, **cond: lambda z, t: guided(net[stage], z, t, text, null, cfg.guidance, **cond)   # eps~(z, t)
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        base = ancestral(eps("base"), noise[0].to(device), **opts)        # (~frames + 1, B, 1, 16, 16)
        z_lr = augment(base[-1], t_aug)                                   # (B, 1, 32, 32)
        sr = ancestral(eps("sr", lowres=z_lr, t_aug=t_aug), noise[1].to(device), **opts)
    save_png(out / "samples.png", sr[-1])
    save_gif(out / "samples.gif", torch.cat([base.repeat_interleave(2, -1).repeat_interleave(2, -2), sr]))
    save_npz(out / "samples.npz", images=sr[-1], labels=None if args.prompt is not None else y, prompts=texts)
    print(f"wrote {out}/samples.png, samples.gif, samples.npz: {len(y)} samples {count}, {cfg.sample_steps} steps a stage, "
          f"guidance {cfg.guidance}, {cfg.threshold} thresholding (p {cfg.percentile}), aug level {cfg.aug_level}")

# --- cli ---
HELP = dict(re.findall(r"^    (\w+): \w+ = [^#\n]*# (.*)$", Path(__file__).read_text(), re.M))  # Config's comments

def make_config(args, base, fixed=True):
    """A checkpoint's (fixed=True) or preset's config, overridden by the flags on the command line."""
    if unknown := set(base) - {f.name for f in fields(Config)}:
        raise UserError(f"the checkpoint comes from another version of {NAME}.py: unknown config {sorted(unknown)}")
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    for key in ("ch", "blocks", "sr_ch", "sr_blocks"):
        if fixed and key in given and given[key] != base[key]:
            raise UserError(f"--{key.replace('_', '-')} {given[key]} does not match the checkpoint's {base[key]}")
    cfg = replace(Config(**base), **given)
    if cfg.percentile > 1 or cfg.aug_level > 1 or cfg.ch % 4 or cfg.sr_ch % 2:
        raise UserError("need --percentile and --aug-level at most 1, --ch divisible by 4, an even --sr-ch")
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
    p.add_argument("--stage", choices=("base", "sr", "both"), default="both", help="what --train trains (default: both)")
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
