"""Test helpers: fake MNIST in a temp folder, the list of paper scripts, and ways to run them.

Every run is offline on purpose: proxies point at a closed local port, so a script that tried to
download would fail at once instead of reaching the network."""
import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shared import write_fake_mnist  # noqa: E402

SCRIPTS = sorted((ROOT / "image").glob("*.py")) + sorted((ROOT / "video").glob("*.py"))
OFFLINE = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}


def script_id(path):
    return f"{path.parent.name}/{path.stem}"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("XDIFFUSION_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory):
    """A data folder with small random MNIST IDX files (64 train, 16 test digits)."""
    return write_fake_mnist(tmp_path_factory.mktemp("data"))


def load_script(path):
    """Import a paper script as a module (tests may import scripts; scripts never import each other)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(script, *args, timeout=600):
    """Run a script as a user would, from the repository root, offline; returns CompletedProcess."""
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())


def tiny(data, out, *extra):
    """The smallest real run: tiny model, two training steps, two sampler steps, CPU, fake data."""
    return ["--preset", "tiny", "--steps", "2", "--sample-steps", "2", "--device", "cpu",
            "--data-dir", data, "--out", out, *extra]


def run_here(script, *args):
    """As `run`, but main(args) in this process: no interpreter start-up (seconds a run on 2 cores). For tests of
    what a run writes and prints; Ctrl-C and the start-up path itself are tested with `run`."""
    out, err, code, message = io.StringIO(), io.StringIO(), 0, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            load_script(script).main(list(map(str, args)))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) or e.code is None else 1
            if not isinstance(e.code, int) and e.code is not None:
                message = str(e.code)
                print(message, file=sys.stderr)                   # as the interpreter prints sys.exit("message")
    r = subprocess.CompletedProcess(args, code or 0, out.getvalue(), err.getvalue())
    r.message = message                                           # sys.exit's message, None if it gave none
    return r


def lr_decay_paths(script, data, out):
    """The lr a script's optimizer holds after two tiny steps, and after resuming to 6 steps with --decay-steps 3
    (constant, then linear to 0 at --steps): returns (the tiny preset's lr, the first run's, the second run's)."""
    args = [*map(str, tiny(data, out))]
    lr = lambda: torch.load(out / "ckpt.pt", weights_only=True)["opt"]["param_groups"][0]["lr"]   # noqa: E731
    script.main(["--train", *args])
    first = lr()
    script.main(["--train", *args, "--resume", "--steps", "6", "--decay-steps", "3"])
    return script.PRESETS["tiny"].lr, first, lr()


def precision_paths(script, monkeypatch, data, out):
    """A script's precision(): bf16 autocast on CUDA and on CPUs with native bf16, in NCHW there; float32 and NHWC
    elsewhere. Both CPU paths train and sample (tiny); returns their samples.npz arrays, float32 path first."""
    videos = []
    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
        assert script.precision(torch.device("cpu")) == (native, torch.contiguous_format if native else torch.channels_last)
        assert script.precision(torch.device("cuda")) == (True, torch.channels_last)
        assert script.precision(torch.device("mps")) == (False, torch.channels_last)
        script.main(["--train", "--sample", *map(str, tiny(data, out / str(native)))])
        with np.load(out / str(native) / "samples.npz") as f:
            videos.append(f["videos"] if "videos" in f else f["images"])
    return videos
