"""Invariants of image/sd3.py (PAPERS.md §8 sanity tests)."""
import math

import numpy as np
import pytest
import torch

from conftest import ROOT, load_script, run_here, tiny

sd3 = load_script(ROOT / "image" / "sd3.py")
dit = load_script(ROOT / "image" / "dit.py")                              # an independent DiT block to compare with


def small(depth=2, head_dim=8, randomize=False):
    torch.manual_seed(0)
    net = sd3.MMDiT(depth, head_dim, patch=4)
    if randomize:                                                         # leave adaLN-Zero: every path live
        for b in net.blocks:
            for s in (b.context, b.x):
                torch.nn.init.normal_(s.ada[-1].weight, std=0.2)
        for m in (net.final.ada[-1], net.final.linear):
            torch.nn.init.normal_(m.weight, std=0.2)
    return net


def inputs(n=3, texts=("7", "seven", "a handwritten seven")):
    torch.manual_seed(1)
    return torch.randn(n, 1, 32, 32), torch.rand(n), sd3.tokenize(list(texts)[:n])


def test_fresh_model_output_is_zero_and_blocks_are_identity():
    net, (x, t, ids) = small(), inputs()
    for mode in (net.train, net.eval):
        mode()
        out = net(x, t, ids)
        assert out.shape == (3, 1, 32, 32) and (out == 0).all()          # zero final linear (DiT's adaLN-Zero)
    ctx, h, c, mask = torch.randn(3, 48, 16), torch.randn(3, 64, 16), torch.randn(3, 16), ids > 0
    ctx_out, h_out = net.blocks[0](ctx, h, c, mask)
    assert torch.equal(ctx_out, ctx) and torch.equal(h_out, h)            # gates 0: both streams the identity
    assert net.blocks[-1](ctx, h, c, mask)[0] is None
    assert "pos" not in net.state_dict() and not net.pos.requires_grad    # fixed sin-cos, rebuilt from the sizes


def test_sizes_follow_the_sd3_rule():
    net = sd3.MMDiT(depth=3, head_dim=8, patch=4)
    assert len(net.blocks) == 3 and all(b.x.heads == b.context.heads == 3 for b in net.blocks)
    assert net.blocks[0].x.qkv.in_features == 24 and net.blocks[0].x.ln_q.weight.shape == (8,)   # hidden = 8 x 3


def test_pre_only_last_context_stream():
    net = small(depth=3)
    for i, b in enumerate(net.blocks):
        last, dim = i == 2, b.x.qkv.in_features
        assert b.context.pre_only == last and not b.x.pre_only
        assert b.context.ada[-1].out_features == (2 if last else 6) * dim and b.x.ada[-1].out_features == 6 * dim
        assert hasattr(b.context, "mlp") != last and hasattr(b.context, "proj") != last
        assert hasattr(b.x, "mlp") and hasattr(b.x, "proj")


def test_separate_weights_per_modality():
    net, (x, t, ids) = small(randomize=True).eval(), inputs()
    for b in net.blocks:                                                  # no Parameter shared by the streams
        assert not {id(p) for p in b.context.parameters()} & {id(p) for p in b.x.parameters()}
    image_params = {k: v.clone() for k, v in net.state_dict().items() if ".x." in k}
    ref = net(x, t, ids)
    with torch.no_grad():
        net.blocks[0].context.qkv.weight.mul_(1.5)                        # the text stream's weights only
    assert all(torch.equal(net.state_dict()[k], v) for k, v in image_params.items())
    assert not torch.allclose(net(x, t, ids), ref, atol=1e-5)             # ... yet the image sees the change
    with torch.no_grad():
        net.blocks[-1].context.qkv.weight.mul_(1.5)                       # pre_only stream: keys and values only
    assert not torch.allclose(net(x, t, ids), ref, atol=1e-5)


def test_qk_norm_unit_rms_and_scale_invariant_logits():
    stream = small(randomize=True).blocks[0].x
    h, c = torch.randn(2, 10, 16), torch.randn(2, 16)
    (q, k, _), _ = stream.pre(h, c)                                       # (B, H, N, D/H)
    assert q.shape == (2, 2, 10, 8)
    for a in (q, k):                                                      # RMSNorm scale starts at 1: RMS 1
        assert torch.allclose(a.pow(2).mean(-1).sqrt(), torch.ones(()), atol=1e-3)
    logits = q @ k.transpose(-1, -2)
    with torch.no_grad():                                                 # scale the q and k projections by 7
        stream.qkv.weight[:32].mul_(7), stream.qkv.bias[:32].mul_(7)
    (q2, k2, _), _ = stream.pre(h, c)
    assert torch.allclose(q2 @ k2.transpose(-1, -2), logits, atol=1e-4)
    assert isinstance(stream.ln_q, torch.nn.RMSNorm) and stream.ln_q.eps == 1e-6 and stream.ln_q.weight.requires_grad


@pytest.mark.parametrize("context_len", [0, 5])
def test_joint_block_without_context_is_a_dit_block(context_len):
    """With no (or only padding) context tokens, the image stream is a DiT block with the same weights
    (PAPERS §8 test 4), here against image/dit.py's DiTBlock, QK-norm switched off."""
    stream = small(randomize=True).blocks[0].x
    stream.ln_q = stream.ln_k = torch.nn.Identity()
    block = sd3.JointBlock(16, 2)
    block.x = stream
    ref = dit.DiTBlock(16, 2)
    ref.attn.in_proj_weight.data, ref.attn.in_proj_bias.data = stream.qkv.weight.data, stream.qkv.bias.data
    ref.attn.out_proj.load_state_dict(stream.proj.state_dict())
    ref.mlp.load_state_dict(stream.mlp.state_dict()), ref.ada.load_state_dict(stream.ada.state_dict())
    h, c = torch.randn(2, 64, 16), torch.randn(2, 16)
    ctx, mask = torch.randn(2, context_len, 16), torch.zeros(2, context_len, dtype=torch.bool)
    assert torch.allclose(block(ctx, h, c, mask)[1], ref(h, c), atol=1e-5)


def test_text_mask_is_honoured():
    net, (x, t, ids) = small(randomize=True), inputs()
    longest = int((ids > 0).sum(1).max())
    for mode in (net.train, net.eval):
        mode()
        ref = net(x, t, ids)
        with torch.no_grad():
            keep = net.text.tok.weight[0].clone(), net.text.pos[longest:].clone()
            net.text.tok.weight[0].normal_(), net.text.pos[longest:].normal_(std=5)   # padding id and positions
            assert torch.allclose(net(x, t, ids), ref, atol=1e-5)
            net.text.tok.weight[0], net.text.pos[longest:] = keep
            net.text.tok.weight[int(ids[2, 5])].normal_()                 # a real token: the output moves
            assert not torch.allclose(net(x, t, ids), ref, atol=1e-4)


def test_tokenize_and_unseen_text():
    assert sd3.tokenize([""]).tolist() == [[1] + [0] * 47]                # the unconditional prompt: BOS only
    ids = sd3.tokenize(["Seven", "ünïcode ✓ " * 9])
    assert ids[0, :6].tolist() == [1] + [ord(ch) + 2 for ch in "seven"] and (ids[0, 6:] == 0).all()
    assert ids.shape == (2, 48) and (ids[1] > 0).all() and ids.max() < 258   # cut at 48, bytes 0..255
    tokens, mask, pooled = sd3.TextEncoder(16)(ids)
    assert tokens.shape == (2, 48, 16) and pooled.shape == (2, 16) and torch.isfinite(pooled).all()


def test_timestep_input_is_1000_t():
    net, (x, t, ids), seen = small(), inputs(), []
    net.t_embed[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    net(x, t, ids)
    assert torch.allclose(seen[0], sd3.timestep_embedding(1000 * t, 256))


def test_time_shift():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for alpha in (0.5, 1.0, 3.0, 4.0):
        s = sd3.time_shift(t, alpha)
        assert s[0] == 0 and s[-1] == 1 and (s.diff() > 0).all()
        mu = math.log(alpha)                                              # = Flux time_shift(mu, 1, t)
        assert torch.allclose(s[1:], math.exp(mu) / (math.exp(mu) + (1 / t[1:] - 1)))
    assert torch.equal(sd3.time_shift(t, 1.0), t) and sd3.time_shift(0.5, 3.0) == 0.75
    assert (sd3.time_shift(t[1:-1], 3.0) > t[1:-1]).all()                  # alpha > 1: more noise


def logit_normal_t(n, alpha=1.0):
    seen = []
    sd3.rf_loss(lambda z, t, ids: seen.append(t) or z, torch.zeros(n, 1, 1, 1), None, alpha)
    return seen[0].double()


def test_logit_normal_timesteps():
    torch.manual_seed(0)
    t = logit_normal_t(1_000_000)
    u = torch.log(t / (1 - t))
    assert abs(t.median() - 0.5) < 0.003 and abs(u.mean()) < 0.005 and abs(u.std() - 1) < 0.005
    assert abs((t < 0.1).double().mean() - 0.5 * math.erfc(-math.log(1 / 9) / math.sqrt(2))) < 5e-4   # Phi(logit 0.1)
    assert 0 < t.min() and t.max() < 1
    t3 = logit_normal_t(200_000, alpha=3.0)                                # the shift applies to training t too
    assert abs(t3.median() - 0.75) < 0.005


def test_rf_loss_target_and_x0_recovery():
    """z_t = (1 - t) x0 + t eps, target eps - x0, mean over pixels; with v = eps - x0, D = z - t v is x0."""
    x0 = torch.rand(5, 1, 4, 4) * 2 - 1
    out, seen = torch.randn(5, 1, 4, 4), {}
    torch.manual_seed(3)
    loss = sd3.rf_loss(lambda z, t, ids: seen.update(z=z, t=t) or out, x0, None, 2.0)
    torch.manual_seed(3)
    t = sd3.time_shift(torch.sigmoid(torch.randn(5)), 2.0)
    eps, tt = torch.randn_like(x0), t.view(-1, 1, 1, 1)
    assert torch.allclose(seen["t"], t) and torch.allclose(seen["z"], (1 - tt) * x0 + tt * eps)
    assert loss.shape == (5,) and torch.allclose(loss, ((out - (eps - x0)) ** 2).mean((1, 2, 3)))
    assert torch.allclose(seen["z"] - tt * (eps - x0), x0, atol=1e-6)
    oracle = sd3.rf_loss(lambda z, t, ids: (z - x0) / t.view(-1, 1, 1, 1), x0, None, 2.0)
    assert oracle.abs().max() < 1e-10


@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_euler_schedule_and_exact_for_constant_v(alpha):
    n, c, seen = 7, torch.randn(4, 1, 2, 2), []
    noise = torch.randn(4, 1, 2, 2)
    traj = sd3.euler(lambda x, t: seen.append(t[0].item()) or c, noise, n, alpha)
    expected = sd3.time_shift(torch.linspace(1, 1e-3, n, dtype=torch.float64), alpha)
    assert np.allclose(seen, expected.numpy()) and seen[0] == 1.0
    assert torch.allclose(traj[-1], noise - c, atol=1e-6)                 # integral of v over sigma 1 -> 0
    assert traj.shape == (n + 1, 4, 1, 2, 2) and torch.allclose(traj[0], noise - c)   # x0_hat at sigma = 1


def test_guidance():
    def net(x, t, ids):                                                   # v = number of real tokens
        return (ids > 0).sum(1).float().view(-1, 1, 1, 1).expand(len(x), 1, 2, 2)
    x, t = torch.zeros(2, 1, 2, 2), torch.ones(2)
    ids, uncond = sd3.tokenize(["7", "seven"]), sd3.tokenize(["", ""])
    cond = net(x, t, ids)
    assert torch.equal(sd3.guided(net, x, t, ids, uncond, 1.0), cond)
    assert torch.equal(sd3.guided(net, x, t, ids, uncond, 0.0), torch.ones_like(cond))   # "" = BOS only
    assert torch.allclose(sd3.guided(net, x, t, ids, uncond, 4.0), 1 + 4 * (cond - 1))


def test_prompt_dropout_and_random_styles(fake_data, tmp_path, monkeypatch):
    seen, loss = [], sd3.rf_loss
    monkeypatch.setattr(sd3, "rf_loss", lambda net, x0, ids, a: seen.append(ids) or loss(net, x0, ids, a))
    sd3.main(["--train", *map(str, tiny(fake_data, tmp_path, "--steps", "1", "--batch-size", "3000"))])
    texts = [bytes(b - 2 for b in row[1:row.gt(0).sum()].tolist()).decode() for row in seen[0]]
    assert 0.085 < texts.count("") / len(texts) < 0.115                    # p_uncond = 0.1
    words = "zero one two three four five six seven eight nine".split()
    styles = [{str(k), w, f"a handwritten {w}"} for k, w in enumerate(words)]
    assert set(texts) - {""} <= set().union(*styles) and len(set(texts)) == 31


def test_sampling_determinism_prompt_flag_and_user_errors(fake_data, tmp_path):
    r = run_here(ROOT / "image" / "sd3.py", "--train", "--sample", *tiny(fake_data, tmp_path))
    assert r.returncode == 0 and "guidance 2.0" in r.stdout, r.stderr[-3000:]
    with np.load(tmp_path / "samples.npz") as f:
        a = f["images"]
        assert f["labels"].tolist() == list(range(10)) and f["prompts"][3] == "a handwritten three"
    sd3.main(["--sample", *map(str, tiny(fake_data, tmp_path))])
    with np.load(tmp_path / "samples.npz") as f:
        assert np.array_equal(f["images"], a)                             # same seed, same samples
    sd3.main(["--sample", "--prompt", "a handwritten three", *map(str, tiny(fake_data, tmp_path))])
    with np.load(tmp_path / "samples.npz") as f:
        assert "labels" not in f and set(f["prompts"]) == {"a handwritten three"} and f["images"].shape == a.shape
    for flags, needle in ((["--depth", "2"], "does not match"), (["--head-dim", "8"], "does not match"),
                          (["--shift", "0"], "--shift"), (["--patch", "3"], "--patch")):
        with pytest.raises(SystemExit) as e:
            sd3.main(["--sample", "--out", str(tmp_path), "--device", "cpu", *flags])
        assert needle in str(e.value.code)
