"""Invariants of video/make_a_video.py (PAPERS.md §12 sanity tests)."""
import numpy as np
import pytest
import torch

from conftest import ROOT, load_script, tiny

mav = load_script(ROOT / "video" / "make_a_video.py")


def live(module, temporal=True):
    """Random weights everywhere (a 'trained' net), the temporal layers too unless temporal=False."""
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        w = torch.randn_like(p) * 0.3                                     # drawn always: same weights either way
        if temporal or mav.trainable(name, "image", "spatial"):
            p.data.copy_(w)
    return module.eval().requires_grad_(False)


def small(cin=1):  # attention at 8x8 and 4x4 for 16x16 inputs (every layer kind, fast)
    return mav.UNet(8, 1, attn_res=16, max_skip=3, cin=cin)


def setup(b=2, f=5, ch=8):
    torch.manual_seed(1)
    text = mav.encode(live(mav.TextEncoder(ch)), ["3 and 5", "one and seven"], "cpu")
    return torch.randn(b, 1, f, 16, 16), torch.rand(b), text, torch.tensor([1, 3])


def test_inflation_reproduces_the_image_model_frame_by_frame():
    net = mav.inflate(live(small()))   # a trained image model, then inflated
    x, t, text, s = setup()
    video = net(x, t, text, s)
    per_frame = torch.cat([net(x[:, :, k:k + 1], t, text, enable_time=False) for k in range(x.shape[2])], 2)
    assert video.abs().mean() > 0.05 and (video - per_frame).abs().max() < 1e-5   # the key test (PAPERS §12 e1)
    assert (net(x, t, text, torch.tensor([2, 2])) - video).abs().max() < 1e-6    # fps embedding zero at inflation


def test_pseudo_conv3d_is_the_identity_in_time_at_init_and_mixes_neighbours_after():
    torch.manual_seed(0)
    conv = mav.PseudoConv3d(4, 6)
    assert conv.temporal.kernel_size == (3,) and not conv.temporal.bias.any()
    h = torch.randn(2 * 7, 4, 8, 8)                                       # (B F, C, H, W)
    assert torch.allclose(conv(h, 7), conv.spatial(h), atol=1e-6)         # Conv1D = identity (Dirac)
    assert torch.equal(conv(h, None), conv.spatial(h))                    # image path: no temporal conv
    torch.nn.init.normal_(conv.temporal.weight)
    h2 = h.clone().unflatten(0, (2, 7))
    h2[:, 3] += 1
    diff = (conv(h2.flatten(0, 1), 7) - conv(h, 7)).unflatten(0, (2, 7)).abs().amax((0, 2, 3, 4))
    assert (diff[2:5] > 1e-3).all() and (diff[[0, 1, 5, 6]] < 1e-6).all()  # kernel 3: frames 2..4 only
    conv.reset_temporal()
    assert torch.allclose(conv(h, 7), conv.spatial(h), atol=1e-6)


def test_temporal_attention_adds_exactly_zero_at_init():
    net = mav.inflate(live(small()))
    layers = [m for m in net.modules() if isinstance(m, mav.TemporalAttention)]
    assert layers and all(not m.out.weight.any() and not m.out.bias.any() for m in layers)
    h = torch.randn(3 * 4, layers[0].out.in_features, 8, 8)
    assert torch.equal(layers[0](h, 4), h)


def test_enable_time_false_is_the_2d_model_whatever_the_temporal_weights():
    net, (x, t, text, s) = live(small()), setup()    # temporal layers trained (random)
    image = net(x, t, text, enable_time=False)
    other = live(small(), temporal=False)            # same spatial weights, fresh temporal
    assert torch.equal(other(x, t, text, enable_time=False), image)
    x2 = x.clone()
    x2[:, :, 0] += 1
    assert torch.equal(net(x2, t, text, enable_time=False)[:, :, 1:], image[:, :, 1:])   # frames independent
    assert not torch.allclose(net(x2, t, text, s)[:, :, 1:], net(x, t, text, s)[:, :, 1:], atol=1e-4)   # video mixes


def test_interpolation_input_masks_frames_and_starts_as_the_video_model():
    z, x = torch.randn(2, 1, 11, 4, 4), torch.randn(2, 1, 11, 4, 4)
    inp = mav.interp_input(z, x, torch.tensor([5, 3]))
    assert inp.shape == (2, 3, 11, 4, 4) and torch.equal(inp[:, 0], z[:, 0])
    for b, known in ((0, [0, 5, 10]), (1, [0, 3, 6, 9])):                 # PAPERS §12 e4: known at 0, s, 2s, ...
        mask = torch.zeros(11)
        mask[known] = 1
        assert torch.equal(inp[b, 2], mask[:, None, None].expand(11, 4, 4))
        assert torch.equal(inp[b, 1, known], x[b, 0, known]) and not inp[b, 1, mask == 0].any()
    video, interp = mav.inflate(live(small())), small(cin=3)
    mav.init_interp(interp, video)                                        # initialised from D^t (Sec. 3.3)
    x, t, text, s = setup(f=6)
    known = torch.randn_like(x)
    assert torch.allclose(interp(mav.interp_input(x, known, 2), t, text, s), video(x, t, text, s), atol=1e-5)


def test_interpolate_fills_windows_and_keeps_the_keyframes():
    keys, calls = torch.arange(16.0).reshape(1, 1, 16, 1, 1) * 10, []

    def sample_fn(known):                                                 # linear interpolation of the known frames
        calls.append(known.shape[2])
        i = torch.arange(known.shape[2], dtype=torch.float)
        return torch.from_numpy(np.interp(i, i[::5], known[0, 0, ::5, 0, 0])).float().reshape(1, 1, -1, 1, 1) + 0.5
    out = mav.interpolate(sample_fn, keys, 5, 16)                        # 16 frames at skip 5 -> 76 (the paper's)
    assert out.shape[2] == 76 and calls == [16] * 5                       # windows of 4 keyframes, one shared
    assert torch.equal(out[:, :, ::5], keys)
    assert torch.allclose(out[0, 0, :, 0, 0], torch.arange(76.0) * 2 + 0.5 * (torch.arange(76) % 5 != 0))


def test_training_clips_follow_the_frame_skip_and_phases_their_order():
    torch.manual_seed(0)
    videos = torch.arange(3 * 13.0).reshape(3, 13, 1, 1, 1).expand(3, 13, 1, 2, 2)
    x, s, idx = mav.clips(videos, 64, 4, 4, "cpu")
    assert x.shape == (64, 1, 4, 2, 2) and set(s.tolist()) == {1, 2, 3, 4}
    first = x[:, 0, 0, 0, 0] - 13 * idx
    assert torch.equal(x[:, 0, :, 0, 0] - 13 * idx[:, None], first[:, None] + s[:, None] * torch.arange(4))
    assert (first >= 0).all() and (first + 3 * s <= 12).all()
    cfg = mav.PRESETS["cpu"]
    seen = {}
    count = dict.fromkeys(mav.PHASES, 0)
    for _ in range(cfg.steps):
        now = mav.phase(count, cfg)
        count[now] += 1
        seen.setdefault(now, len(seen))
    assert list(seen) == ["image", "video", "interp"] and count["image"] == cfg.image_steps
    assert count["interp"] == cfg.interp_steps and sum(count.values()) == cfg.steps
    names = [n for n, _ in small().named_parameters()]
    new = {n for n in names if mav.trainable(n, "video", "spatial")}     # stage B trains the inflated layers only
    assert new and all(".temporal." in n or n.startswith("fps") for n in new)
    assert not new & {n for n in names if mav.trainable(n, "image", "spatial")}


def test_v_prediction_round_trip():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 4, 8, 8) * 2 - 1

    def oracle(z, t):                                                     # knows x: the exact v
        a, s = mav.alpha_sigma(t)
        return (a * z - x) / s
    assert mav.diffusion_loss(oracle, x).max() < 1e-4


def test_cli_interpolation_path_and_user_errors(fake_data, tmp_path):
    args = [*map(str, tiny(fake_data, tmp_path))]
    mav.main(["--train", *args, "--steps", "4", "--interp-steps", "1"])  # image, video, video, interp
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["stage_steps"] == {"image": 1, "video": 2, "interp": 1}
    mav.main(["--sample", *args, "--interp", "2", "--num-samples", "3"])  # tiny: 4 frames at skip 2 -> 7
    with np.load(tmp_path / "samples.npz") as f:
        assert f["videos"].shape == (3, 7, 1, 32, 32) and list(f["prompts"]) == ["0 and 1", "1 and 2", "2 and 3"]
    for flags, needle in ((["--skip", "3"], "--max-skip"), (["--interp", "1"], "--interp"),
                          (["--max-skip", "3"], "does not match")):
        with pytest.raises(SystemExit) as e:
            mav.main(["--sample", *args, *flags])
        assert needle in str(e.value.code) and "\n" not in str(e.value.code)


def test_fit_text_names_both_digits_of_a_prompt():
    torch.manual_seed(0)   # "3 and 5": both digits must survive the frozen encoder's pooling (a one-digit fit kept 60%)
    assert mav.fit_text(mav.TextEncoder(16), 300, "cpu") > 0.8
