"""shared/: data loading through the real code on fake IDX files, prompts, the writers, and stops between steps."""
import os
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import shared
from conftest import ROOT, tiny


def test_mnist_pads_and_scales(fake_data):
    x, y = shared.mnist(fake_data)
    raw, _ = shared.mnist_uint8(fake_data)
    assert x.shape == (64, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()  # 2 background pixels each side
    assert torch.equal(((x[:, 0, 2:30, 2:30] + 1) * 127.5).round().byte(), raw)
    assert y.tolist() == [i % 10 for i in range(64)]
    assert len(shared.mnist(fake_data, train=False)[0]) == 16


def test_data_dir_order(monkeypatch):
    monkeypatch.setenv("XDIFFUSION_DATA", "/env/data")
    assert str(shared.data_dir("/flag")) == "/flag" and str(shared.data_dir()) == "/env/data"
    monkeypatch.delenv("XDIFFUSION_DATA")
    assert str(shared.data_dir()) == "data"


def test_missing_mnist_is_a_user_error(tmp_path):
    with pytest.raises(shared.UserError, match="t10k-labels-idx1-ubyte"):
        shared.mnist(tmp_path)


def test_moving_mnist_shapes_determinism_and_cache(fake_data):
    v, y = shared.moving_mnist(fake_data, n=6, frames=16, seed=3)
    assert v.shape == (6, 16, 1, 32, 32) and y.shape == (6, 2) and y.dtype == torch.int64
    assert v.min() >= -1 and v.max() <= 1 and v.max() > -1
    assert (fake_data / "MovingMNIST" / "moving_mnist_n6_t16_seed3.npz").exists()
    v2, y2 = shared.moving_mnist(fake_data, n=6, frames=16, seed=3)  # from the cache
    assert torch.equal(v, v2) and torch.equal(y, y2)
    v3, _ = shared.moving_mnist(fake_data, n=6, frames=16, seed=4)
    assert not torch.equal(v, v3)
    assert (v[:, 1:] - v[:, :-1]).abs().mean() > 0  # digits move


def test_moving_mnist_read_only_folder_falls_back(fake_data, tmp_path, monkeypatch):
    """A data folder without write bits (as ../shared in CI): cache elsewhere, never fail."""
    ro = tmp_path / "ro"
    ro.mkdir()
    os.symlink(fake_data / "MNIST", ro / "MNIST")
    os.chmod(ro, 0o555)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    v, _ = shared.moving_mnist(ro, n=3, frames=4)
    assert v.shape == (3, 4, 1, 32, 32) and not (ro / "MovingMNIST").exists()
    assert (tmp_path / "cache" / "xdiffusion" / "moving_mnist_n3_t4_seed0.npz").exists()
    (tmp_path / "cache").chmod(0o555)  # nowhere to cache: still works
    assert shared.moving_mnist(ro, n=2, frames=4)[0].shape == (2, 4, 1, 32, 32)


def test_bounce_stays_on_canvas():
    digits = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    v, y = shared.data._bouncing(digits, torch.tensor([4]), 50, 40, torch.Generator().manual_seed(0))
    # two full squares of 14x14 after shrinking: never clipped by the edges
    assert ((v.float().sum((2, 3, 4)) / 255) >= 14 * 14 - 1e-3).all() and (y == 4).all()


def test_prompts():
    assert shared.prompts(torch.tensor([7]), "digit") == ["7"]
    assert shared.prompts(torch.tensor([7]), "word") == ["seven"]
    assert shared.prompts(torch.tensor([7, 0])) == ["a handwritten seven", "a handwritten zero"]
    assert shared.prompts(torch.tensor([[3, 5]]), "digit") == ["3 and 5"]
    r = shared.prompts(torch.tensor([1] * 30), "random", torch.Generator().manual_seed(0))
    assert set(r) == {"1", "one", "a handwritten one"}


def test_writers(tmp_path):
    x = torch.linspace(-1, 1, 12 * 32 * 32).view(12, 1, 32, 32)
    png = iio.imread(shared.save_png(tmp_path / "a.png", x, nrow=4))
    assert png.shape == (3 * 34 + 2, 4 * 34 + 2) and png.dtype == np.uint8
    gif = iio.imread(shared.save_gif(tmp_path / "a.gif", torch.stack([x, -x, x]), nrow=4), index=None)
    assert len(gif) == 3
    one = iio.imread(shared.save_gif(tmp_path / "one.gif", x[None], nrow=4), index=None)   # a one-frame video
    assert len(one) == 1
    shared.save_npz(tmp_path / "s.npz", images=x, labels=torch.arange(12), prompts=["a"] * 12)
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].dtype == np.uint8 and f["images"].min() == 0 and f["images"].max() == 255
        assert f["labels"].dtype == np.int64 and f["prompts"][0] == "a"
    assert shared.to_uint8(torch.tensor([-5.0, 0.0, 5.0])).tolist() == [0, 128, 255]
    assert not list(tmp_path.glob(".*tmp*"))  # written through temp files, all renamed


def as_fresh_python(signum, handler):
    """signum as a fresh `python` has it (handler, not blocked), whatever the test process inherited; restored after."""
    old, mask = signal.getsignal(signum), signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    signal.signal(signum, handler)
    yield
    signal.signal(signum, old)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@pytest.fixture
def python_ctrl_c():
    """SIGINT with Python's own handler."""
    yield from as_fresh_python(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def python_sigterm():
    """SIGTERM with the default action: end the process."""
    yield from as_fresh_python(signal.SIGTERM, signal.SIG_DFL)


def test_ctrl_c_lands_between_steps(python_ctrl_c):
    finished = []
    with pytest.raises(KeyboardInterrupt):
        for step in shared.between_steps(range(10)):
            if step == 3:
                signal.raise_signal(signal.SIGINT)                      # Ctrl-C in the middle of step 3
            finished.append(step)                                       # ... which still finishes
    assert finished == [0, 1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_a_finalizer_is_not_lost(python_ctrl_c):
    class Dropped:  # Python prints and drops an exception raised in __del__: with its own handler training went on
        def __del__(self):
            signal.raise_signal(signal.SIGINT)

    finished = []
    with pytest.raises(KeyboardInterrupt):
        for step in shared.between_steps(range(10)):
            if step == 2:
                Dropped()
            finished.append(step)
    assert finished == [0, 1, 2]


def test_second_ctrl_c_stops_at_once_and_last_step_counts(python_ctrl_c):
    finished = []
    with pytest.raises(KeyboardInterrupt):
        for step in shared.between_steps(range(10)):
            signal.raise_signal(signal.SIGINT)
            finished.append(step)
            signal.raise_signal(signal.SIGINT)                          # a second Ctrl-C raises here, at once
            finished.append("not reached")
    assert finished == [0]
    with pytest.raises(KeyboardInterrupt):                              # during the last step: raised after it
        for step in shared.between_steps(range(2)):
            if step == 1:
                signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ignored_ctrl_c_stays_ignored(python_ctrl_c):
    signal.signal(signal.SIGINT, signal.SIG_IGN)                        # e.g. a background job of a script
    for step in shared.between_steps(range(3)):
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_sigterm_lands_between_steps(python_ctrl_c, python_sigterm):
    signal.signal(signal.SIGINT, signal.SIG_IGN)                        # an ignored Ctrl-C does not stop the catch
    finished = []
    with pytest.raises(KeyboardInterrupt):
        for step in shared.between_steps(range(10)):
            if step == 3:
                assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL   # caught: it cannot end pytest
                signal.raise_signal(signal.SIGTERM)                     # `kill` in the middle of step 3
            finished.append(step)                                       # ... which still finishes
    assert finished == [0, 1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_sigterm_saves_checkpoint(fake_data, tmp_path):
    """A script killed with SIGTERM (`kill`, `timeout`, a cluster's time limit) saves its step, as on Ctrl-C; one
    script stands for all, since they share between_steps and the Ctrl-C handler (test_scripts.py tests each)."""
    fresh = "import runpy, signal, sys; signal.signal(signal.SIGTERM, signal.SIG_DFL); sys.argv = sys.argv[1:]; " \
            "runpy.run_path(sys.argv[0], run_name='__main__')"
    ckpt = tmp_path / "ckpt.pt"
    p = subprocess.Popen([sys.executable, "-c", fresh, str(ROOT / "image" / "rectified_flow.py"), "--train",
                          *map(str, tiny(fake_data, tmp_path, "--steps", "100000"))],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 1) and time.time() < deadline \
            and p.poll() is None:
        time.sleep(0.2)
    p.terminate()                                                       # SIGTERM
    try:
        _, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError("still running 120 s after SIGTERM") from None
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert 1 <= torch.load(ckpt, weights_only=True)["step"] < 100000 and "--resume" in err
