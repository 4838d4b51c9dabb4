"""Datasets: MNIST, bouncing (Moving) MNIST, prompts, and fake MNIST files for tests.

Images are padded from 28x28 to 32x32 (2 background pixels each side; digits keep their shape)
and scaled to [-1, 1]. Everything is returned as whole tensors, to be moved to the device once
and indexed there: no per-sample transforms in a training loop.
"""
import contextlib
import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class UserError(Exception):
    """A mistake the user can fix (missing data, bad checkpoint, bad flag): scripts print it as one line."""


def data_dir(flag=None):
    """The data folder: --data-dir, else $XDIFFUSION_DATA, else ./data."""
    return Path(flag or os.environ.get("XDIFFUSION_DATA") or "data")


def mnist_uint8(root=None, train=True):
    """Raw MNIST digits (N, 28, 28) uint8 and labels (N,) int64, downloaded into root if absent."""
    from torchvision.datasets import MNIST
    root = data_dir(root)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints each failed mirror
            d = MNIST(str(root), train=train, download=True)
    except Exception as e:  # offline, read-only folder, truncated file, ...
        raise UserError(
            f"MNIST not found in {root / 'MNIST' / 'raw'} and could not be downloaded ({type(e).__name__}); "
            f"put the four files {', '.join(FILES)} there, or point --data-dir / XDIFFUSION_DATA "
            f"at a folder holding MNIST/raw/") from None
    return d.data, d.targets.long()


def mnist(root=None, train=True):
    """MNIST as (N, 1, 32, 32) float in [-1, 1] (28->32 by padding) and labels (N,) int64."""
    x, y = mnist_uint8(root, train)
    x = F.pad(x, (2, 2, 2, 2))[:, None].float() / 127.5 - 1
    return x, y


def moving_mnist(root=None, n=10000, frames=16, seed=0):
    """Bouncing MNIST (Srivastava et al. 2015, arXiv 1502.04681v3): two digits move on a 64x64
    canvas with random direction and speed, bounce off the edges, overlap by max; each frame is
    then shrunk to 32x32 by 2x2 averaging. Returns videos (N, T, 1, 32, 32) float in [-1, 1] and
    the two digit labels (N, 2) int64. Deterministic for a seed; generated once and cached in
    <root>/MovingMNIST/, else in ~/.cache/xdiffusion/ when root is read-only, else not at all."""
    root = data_dir(root)
    name = f"moving_mnist_n{n}_t{frames}_seed{seed}.npz"
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folders = [root / "MovingMNIST", cache_home / "xdiffusion"]
    for folder in folders:
        try:
            with np.load(folder / name) as f:
                return torch.from_numpy(f["videos"]).float() / 127.5 - 1, torch.from_numpy(f["labels"])
        except Exception:  # absent or unreadable: (re)generate below
            pass
    digits, digit_labels = mnist_uint8(root, train=True)
    videos, labels = _bouncing(digits, digit_labels, n, frames, torch.Generator().manual_seed(seed))
    for folder in folders:
        try:
            if not _writable(folder):
                continue
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{name}.{os.getpid()}.tmp.npz"
            np.savez(tmp, videos=videos.numpy(), labels=labels.numpy())
            os.replace(tmp, folder / name)
            break
        except OSError:  # read-only data folder: try the next one, else keep it in memory only
            continue
    return videos.float() / 127.5 - 1, labels


def _writable(folder):
    """Whether the nearest existing folder above has write bits (root ignores them, we do not)."""
    while not folder.exists():
        folder = folder.parent
    return folder.stat().st_mode & 0o222 and os.access(folder, os.W_OK)


def _bouncing(digits, digit_labels, n, frames, g, canvas=64, chunk=1000):
    size = digits.shape[-1]
    lim = canvas - size
    which = torch.randint(len(digits), (n, 2), generator=g)
    pos = torch.rand(n, 2, 2, generator=g) * lim  # (video, digit, yx): top-left corner
    angle = torch.rand(n, 2, generator=g) * 2 * torch.pi
    speed = 2 + 3 * torch.rand(n, 2, generator=g)  # pixels per frame on the 64x64 canvas
    vel = torch.stack([angle.sin(), angle.cos()], -1) * speed[..., None]
    out = torch.empty(n, frames, 1, canvas // 2, canvas // 2, dtype=torch.uint8)
    ar = torch.arange(size)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        m = sl.stop - sl.start
        p, v = pos[sl].clone(), vel[sl].clone()
        video = torch.zeros(m, frames, canvas, canvas, dtype=torch.uint8)
        vi = torch.arange(m)[:, None, None]
        for t in range(frames):
            for d in range(2):
                yx = p[:, d].round().long()
                rows, cols = (yx[:, 0, None] + ar)[:, :, None], (yx[:, 1, None] + ar)[:, None, :]
                video[vi, t, rows, cols] = torch.maximum(video[vi, t, rows, cols], digits[which[sl, d]])
            p += v
            low, high = p < 0, p > lim  # bounce: reflect the position and the velocity
            p = torch.where(low, -p, torch.where(high, 2 * lim - p, p))
            v = torch.where(low | high, -v, v)
        small = F.avg_pool2d(video.float().flatten(0, 1)[:, None], 2)
        out[sl] = small.round().to(torch.uint8).view(m, frames, 1, canvas // 2, canvas // 2)
    return out, digit_labels[which]


def prompts(labels, style="sentence", generator=None):
    """Text for labels: (N,) digits -> "7" / "seven" / "a handwritten seven"; (N, 2) videos ->
    "3 and 5" (or the other styles joined by "and"). style="random" picks a style per sample."""
    styles = ["digit", "word", "sentence"]

    def one(k, s):
        return {"digit": str(k), "word": WORDS[k], "sentence": f"a handwritten {WORDS[k]}"}[s]

    out = []
    for row in torch.as_tensor(labels).reshape(len(labels), -1).tolist():
        s = styles[int(torch.randint(3, (1,), generator=generator))] if style == "random" else style
        out.append(" and ".join(one(k, s) for k in row))
    return out


def write_fake_mnist(root, n_train=64, n_test=16, seed=0):
    """Small random MNIST IDX files in <root>/MNIST/raw, so tests run the real loading code offline."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = (rng.random((n, 28, 28)) > 0.8).astype(np.uint8) * 255
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            np.array([2051, n, 28, 28], ">i4").tobytes() + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(np.array([2049, n], ">i4").tobytes() + labels.tobytes())
    return Path(root)
