"""Writing results: PNG grids, GIFs, samples.npz and the training log. Tensors are in [-1, 1]."""
import os
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from torchvision.utils import make_grid
from tqdm import tqdm


def to_uint8(x):
    """[-1, 1] floats -> uint8 0..255 (on the CPU)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _grid(images, nrow):
    """(N, 1, H, W) -> one (H', W') uint8 picture, nrow images per row."""
    return to_uint8(make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, pad_value=-0.6)[0]).numpy()


def _atomic(path, write):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path


def save_png(path, images, nrow=10):
    """A grid of images (N, 1, H, W) as one PNG."""
    return _atomic(path, lambda p: iio.imwrite(p, _grid(images, nrow)))


def save_gif(path, frames, nrow=10, fps=10, hold=1.5, max_frames=60):
    """A grid over time as a looping GIF. frames: (T, N, 1, H, W), e.g. a sampler's trajectory or
    videos transposed to time-first. Long trajectories are thinned to max_frames (the last kept);
    the last frame is held for `hold` seconds."""
    keep = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), max_frames)).round().astype(int))
    pictures = np.stack([_grid(frames[i], nrow) for i in keep])[..., None].repeat(3, -1)  # RGB: Pillow misreads some gray GIFs
    durations = [1000 / fps] * (len(keep) - 1) + [1000 * hold]
    if len(keep) == 1:  # Pillow takes a list of durations only for several frames
        durations = durations[0]
    return _atomic(path, lambda p: iio.imwrite(p, pictures, extension=".gif", duration=durations, loop=0))


def save_npz(path, images=None, videos=None, labels=None, prompts=None):
    """samples.npz: images uint8 (N,1,H,W) or videos uint8 (N,T,1,H,W); labels int64; prompts str."""
    arrays = {}
    if images is not None:
        arrays["images"] = to_uint8(images).numpy()
    if videos is not None:
        arrays["videos"] = to_uint8(videos).numpy()
    if labels is not None:
        arrays["labels"] = torch.as_tensor(labels).cpu().long().numpy()
    if prompts is not None:
        arrays["prompts"] = np.array(prompts, dtype=str)
    return _atomic(path, lambda p: np.savez(p, **arrays))


def log(path, message):
    """Print a line above the tqdm bars and append it to the log file."""
    tqdm.write(message)
    with open(path, "a") as f:
        f.write(message + "\n")
