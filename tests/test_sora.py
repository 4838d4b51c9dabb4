"""Invariants of video/sora.py (PAPERS.md §14 sanity tests)."""
import numpy as np
import pytest
import torch

from conftest import ROOT, load_script, tiny

sora = load_script(ROOT / "video" / "sora.py")


def live(net):
    """Leave adaLN-Zero: every zero-initialised layer gets weights, so every path carries signal."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.3)
    return net.eval().requires_grad_(False)


def dit(heads=2):
    torch.manual_seed(0)
    return sora.DiT(z_ch=4, hidden=32, depth=2, heads=heads, patch=2)


def text(n, hidden=32, texts=("3 and 5", "seven and one", "a handwritten two and a handwritten nine")):
    torch.manual_seed(1)
    return sora.encode_text(sora.TextEncoder(hidden).eval(), [texts[i % 3] for i in range(n)], {}, "cpu")


def test_vae_latent_shape_images_and_sizes():
    vae = sora.VideoAE(8, 4).eval()
    with torch.no_grad():
        z = vae.encode(torch.randn(2, 1, 16, 32, 32))
        assert z.shape == (2, 4, 8, 8, 8)                                 # x2 in time, x4 in space: 1x16x32x32 -> 4x8x8x8
        assert vae.decode(z).shape == (2, 1, 16, 32, 32)
        img = torch.randn(2, 1, 1, 32, 32)
        zi = vae.encode(img)
        assert zi.shape == (2, 4, 1, 8, 8) and torch.equal(zi, vae.encode(img.expand(-1, -1, 2, -1, -1)))   # a still
        assert vae.decode(zi, 1).shape == (2, 1, 1, 32, 32)
        assert vae.encode(torch.randn(1, 1, 8, 32, 48)).shape == (1, 4, 4, 8, 12)
        x = torch.randn(1, 1, 6, 32, 32)                                  # each latent frame codes its 2 frames alone
        x2 = x.clone()
        x2[:, :, 2:4] = torch.randn(1, 1, 2, 32, 32)
        z, z2 = vae.encode(x), vae.encode(x2)
        assert torch.equal(z[:, :, [0, 2]], z2[:, :, [0, 2]]) and not torch.allclose(z[:, :, 1], z2[:, :, 1])
        assert torch.allclose(vae.decode(z)[:, :, 2:4], vae.decode(z[:, :, 1:2]), atol=1e-6)
        vae.scale.fill_(4.0)                                              # the latent scale is undone by decode
        assert torch.allclose(vae.encode(img), 4 * zi) and torch.allclose(vae.decode(4 * zi), vae.decode.__self__.dec(zi))
    assert "scale" in vae.state_dict()                                    # travels with the checkpoint


@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 8, 8), (4, 8, 8), (4, 8, 12), (4, 12, 8), (7, 4, 6)])
def test_patchify_round_trip_for_every_bucket(shape):
    t, h, w = shape
    z = torch.randn(3, 4, t, h, w)
    x = sora.patchify(z, 2)
    assert x.shape == (3, t * h * w // 4, 16) and torch.equal(sora.unpatchify(x, 2, t, h // 2), z)
    assert torch.equal(x[1, 0], z[1, :, 0, :2, :2].permute(1, 2, 0).flatten())   # token 0: frame 0, top-left 1x2x2


def test_zero_init_output_and_identity_blocks():
    net, (tok, mask, pooled) = dit(), text(3)
    z = torch.randn(3, 4, 4, 8, 8)
    for mode in (net.train, net.eval):
        mode()
        out = net(z, torch.rand(3), tok, mask, pooled)
        assert out.shape == z.shape and (out == 0).all()                  # zero final layer (adaLN-Zero)
    x, c = torch.randn(3, 20, 32), torch.randn(3, 2, 32)
    pe = sora.rope(torch.zeros(20, 3, dtype=torch.float64), net.dims)
    known = torch.zeros(3, 20, 1, dtype=torch.bool)
    assert torch.equal(net.blocks[0](x, c, known, pe, None), x)          # gates 0: each block is the identity


def test_image_is_a_one_frame_video_through_the_same_weights():
    net, (tok, mask, pooled) = live(dit()), text(2)
    img = torch.randn(2, 4, 1, 8, 8)
    out = net(img, torch.rand(2), tok, mask, pooled)
    assert out.shape == (2, 4, 1, 8, 8) and out.abs().sum() > 0
    video = torch.randn(2, 4, 4, 8, 8)
    assert net(video, torch.rand(2), tok, mask, pooled).shape == (2, 4, 4, 8, 8)


def test_rope_is_relative_in_time_and_space():
    """Attention logits depend on offsets only: shifting every frame index (or row) leaves the output unchanged."""
    net, (tok, mask, pooled) = live(dit()), text(2)
    z, t = torch.randn(2, 4, 3, 8, 8), torch.rand(2)
    q = torch.randn(1, 2, 5, 16)
    ids = torch.randint(0, 9, (5, 3)).double()
    pe, pe2 = sora.rope(ids, net.dims), sora.rope(ids + torch.tensor([3.0, 5.0, 1.0], dtype=torch.float64), net.dims)
    k = torch.randn(1, 2, 5, 16)
    logits = sora.apply_rope(q, pe) @ sora.apply_rope(k, pe).transpose(-1, -2)
    assert torch.allclose(logits, sora.apply_rope(q, pe2) @ sora.apply_rope(k, pe2).transpose(-1, -2), atol=1e-4)
    assert sum(net.dims) == 16 and all(d % 2 == 0 for d in net.dims)      # time, row, col share the head
    assert not torch.allclose(net(z, t, tok, mask, pooled), net(z.flip(2), t, tok, mask, pooled).flip(2), atol=1e-4)


def test_batch_and_text_padding_invariance():
    """A clip's v is the same alone or batched with others whose prompts are longer (padding masked out)."""
    net, (tok, mask, pooled) = live(dit()), text(3)
    z, t = torch.randn(3, 4, 2, 8, 8), torch.rand(3)
    both = net(z, t, tok, mask, pooled)
    n = int(mask[0].sum())
    alone = net(z[:1], t[:1], tok[:1, :n], mask[:1, :n], pooled[:1])
    assert tok.shape[1] > n and torch.allclose(alone, both[:1], atol=1e-5)


def test_known_tokens_take_the_t0_modulation():
    net, (tok, mask, pooled) = live(dit()), text(2)
    z, t = torch.randn(2, 4, 3, 8, 8), torch.rand(2)
    every, none = torch.ones(2, 3, dtype=torch.bool), (tok[:, :0], mask[:, :0], pooled)   # no text tokens: they take t
    assert torch.allclose(net(z, t, *none, every), net(z, 0 * t, *none), atol=1e-5)
    m = sora.select(net.blocks[0].mod, torch.randn(2, 2, 32), part := torch.tensor([[True], [False]]).expand(2, 5)[..., None])
    c = torch.randn(2, 2, 32)
    m, full = sora.select(net.blocks[0].mod, c, part), net.blocks[0].mod(c)
    assert torch.equal(m[0], full[0, 1].expand(5, -1)) and torch.equal(m[1], full[1, 0].expand(5, -1))
    part = torch.tensor([[True, False, False]] * 2)
    assert not torch.allclose(net(z, t, tok, mask, pooled, part), net(z, t, tok, mask, pooled), atol=1e-4)


def test_rf_loss_target_and_known_frames_excluded():
    torch.manual_seed(0)
    x0 = torch.randn(4, 4, 3, 8, 8)
    known = torch.tensor([[True, False, False], [False, False, True], [False] * 3, [True, True, False]])
    seen = {}

    def oracle(z, t, tok, mask, pooled, kn):                             # the exact v = (z - x0) / t off the known frames
        seen.update(z=z, t=t)
        return (z - x0) / t.view(-1, 1, 1, 1, 1)
    assert sora.rf_loss(oracle, x0, (None, None, None), known).max() < 1e-8
    k = known[:, None, :, None, None]
    assert torch.equal(torch.where(k, seen["z"], 0), torch.where(k, x0, 0))   # known frames are fed clean
    torch.manual_seed(1)
    base = sora.rf_loss(lambda *a: torch.zeros_like(x0), x0, (None, None, None), known)
    junk = torch.where(k, torch.randn_like(x0) * 100, 0)                 # garbage on known frames only: no effect
    torch.manual_seed(1)
    assert torch.allclose(sora.rf_loss(lambda *a: junk, x0, (None, None, None), known), base)


def test_euler_returns_known_frames_unchanged_and_is_exact_for_constant_v():
    torch.manual_seed(0)
    noise, c, x_known = torch.randn(2, 4, 4, 8, 8), torch.randn(2, 4, 4, 8, 8), torch.randn(2, 4, 4, 8, 8)
    assert torch.allclose(sora.euler(lambda x, t, k: c, noise, 7), noise - c, atol=1e-5)
    known = torch.tensor([[True, True, False, False], [False, False, False, True]])
    out = sora.euler(lambda x, t, k: c, noise, 7, x_known, known)
    assert torch.equal(out[0, :, :2], x_known[0, :, :2]) and torch.equal(out[1, :, 3], x_known[1, :, 3])
    assert torch.allclose(out[0, :, 2:], (noise - c)[0, :, 2:], atol=1e-5)
    net, (tok, mask, pooled) = live(dit()), text(2)                       # with the real network too
    out = sora.euler(lambda x, t, k: net(x, t, tok, mask, pooled, k), noise, 3, x_known, known)
    assert torch.equal(out[0, :, :2], x_known[0, :, :2]) and not torch.allclose(out[0, :, 2:], noise[0, :, 2:])


def test_extension_appends_n_latent_frames_conditioned_on_the_last_k():
    z, calls = torch.arange(4.0).reshape(1, 1, 4, 1, 1), []

    def sample_fn(x_known, known):                                        # new frames: last known + 1, + 2, ...
        calls.append((x_known.shape, known[0].tolist(), x_known[0, 0, :, 0, 0].tolist()))
        k = int(known[0].sum())
        new = x_known[:, :, k - 1:k] + torch.arange(1.0, 1 + x_known.shape[2] - k).reshape(1, 1, -1, 1, 1)
        return torch.cat([x_known[:, :, :k], new], 2)

    for n, windows in ((0, 0), (2, 1), (3, 2), (5, 3)):
        calls.clear()
        out = sora.extend(sample_fn, z, n, 2)
        assert out.shape == (1, 1, 4 + n, 1, 1) and out.flatten().tolist() == list(range(4 + n))
        assert len(calls) == windows and all(c[0] == (1, 1, 4, 1, 1) and c[1] == [1, 1, 0, 0] for c in calls)
    assert [c[2][:2] for c in calls] == [[2, 3], [4, 5], [6, 7]]          # known: the last 2 latent frames so far


def test_buckets_keep_tokens_and_mark_known_prefix_or_suffix():
    torch.manual_seed(0)
    lat, still, labels = torch.randn(10, 4, 4, 8, 8), torch.randn(10, 4, 1, 8, 8), torch.randint(10, (10, 2))
    cfg = sora.Config(batch_size=3, p_known=0.5)
    seen = set()
    for _ in range(60):
        x, y, known = sora.bucket(lat, still, labels, cfg)
        f = x.shape[2]
        seen.add(f)
        assert x.shape[0] * f == 12 and y.shape == (x.shape[0], 2) and known.shape == (x.shape[0], f)
        assert not known.all(1).any()                                      # never every frame known
        for row in known.tolist():                                        # a prefix or a suffix
            k = sum(row)
            assert row in ([True] * k + [False] * (f - k), [False] * (f - k) + [True] * k)
    assert seen == {1, 2, 4}
    cfg, first = sora.Config(batch_size=200, p_known=1.0), 0                # image prompting: a still first frame
    while not first:
        x, y, known = sora.bucket(lat, still, labels, cfg)
        if x.shape[2] == 4:
            idx = [next(j for j in range(10) if torch.equal(x[b, :, 1:], lat[j, :, 1:])) for b in range(len(x))]
            is_still = torch.tensor([torch.equal(x[b, :, 0], still[j, :, 0]) for b, j in enumerate(idx)])
            assert (is_still <= (known[:, 0] & (known.sum(1) == 1))).all()
            first = int(is_still.sum())
    assert 0.25 < first / (known[:, 0] & (known.sum(1) == 1)).sum() < 0.75


def test_cli_durations_sizes_extension_and_user_errors(fake_data, tmp_path):
    args = [*map(str, tiny(fake_data, tmp_path))]
    sora.main(["--train", *args])

    def videos(*flags):
        sora.main(["--sample", *args, "--num-samples", "3", *flags])
        with np.load(tmp_path / "samples.npz") as f:
            return f["videos"], f["labels"], f["prompts"]
    v, labels, texts = videos()
    assert v.shape == (3, 8, 1, 32, 32) and labels.tolist() == [[0, 1], [1, 2], [2, 3]] and texts[1] == "1 and 2"
    assert np.array_equal(v, videos()[0])                                 # same seed, same samples
    assert videos("--frames", "1")[0].shape == (3, 1, 1, 32, 32)          # an image
    assert videos("--frames", "16", "--width", "48")[0].shape == (3, 16, 1, 32, 48)   # size control
    e, _, _ = videos("--extend", "8", "--cond-frames", "4")
    assert e.shape == (3, 16, 1, 32, 32)
    a, labels, texts = videos("--animate", "1")                          # image prompting: new clips' digits
    assert a.shape == (3, 8, 1, 32, 32) and texts[0] == f"{labels[0, 0]} and {labels[0, 1]}"
    for flags, needle in ((["--frames", "5"], "--frames"), (["--cond-frames", "8", "--extend", "4"], "--cond-frames"),
                          (["--width", "36"], "--width"), (["--hidden", "64"], "does not match"),
                          (["--patch", "4"], "does not match"), (["--animate", "1", "--frames", "1"], "--animate"),
                          (["--clips", "1"], "--clips")):
        with pytest.raises(SystemExit) as err:
            sora.main(["--sample", *args, *flags])
        assert needle in str(err.value.code) and "\n" not in str(err.value.code)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)          # a checkpoint of the x4-in-time version:
    w = state["ema"]["vae.dec.4.weight"]                                  # its time upsampling kernel was 4, not 3
    state["ema"]["vae.dec.4.weight"] = state["model"]["vae.dec.4.weight"] = w.new_zeros(*w.shape[:2], 4, *w.shape[3:])
    torch.save(state, tmp_path / "old.pt")
    for flags in (["--sample"], ["--train", "--resume", "--steps", "3"]):
        with pytest.raises(SystemExit) as err:
            sora.main([*flags, *args, "--ckpt", str(tmp_path / "old.pt")])
        assert "another version" in str(err.value.code) and "\n" not in str(err.value.code)


def test_fit_text_names_both_digits_of_a_prompt():
    torch.manual_seed(0)   # "3 and 5": both digits must survive the frozen encoder's pooling (a one-digit fit kept 60%)
    assert sora.fit_text(sora.TextEncoder(16), 300, "cpu") > 0.8
