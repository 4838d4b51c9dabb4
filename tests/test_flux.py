"""Invariants of image/flux.py (PAPERS.md §9 sanity tests)."""
import copy
import math

import numpy as np
import pytest
import torch

from conftest import ROOT, load_script, tiny

flux = load_script(ROOT / "image" / "flux.py")


def small_flux(**kw):
    torch.manual_seed(0)
    return flux.Flux(**{"hidden": 32, "depth": 1, "depth_single": 2, "heads": 2, "patch": 4, **kw})


def perturb(net, std=0.1):
    """Give the zero-initialised layers weights, so the output depends on everything."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not name.startswith("text.") and (p == 0).all():
                p.normal_(std=std)
    return net


def reference_rope(ids, axes_dim, theta=10000):
    """math.rope + EmbedND + apply_rope of the reference, as 2x2 rotation matrices (float64)."""
    mats = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        out = ids[:, i, None] * omega                                     # (L, d/2)
        mats.append(torch.stack([out.cos(), -out.sin(), out.sin(), out.cos()], -1).view(*out.shape, 2, 2))
    m = torch.cat(mats, -3)                                               # (L, D/2, 2, 2)

    def apply(x):
        x_ = x.double().reshape(*x.shape[:-1], -1, 1, 2)
        return (m[..., 0] * x_[..., 0] + m[..., 1] * x_[..., 1]).reshape(x.shape)
    return apply


def scores(q, k, pe):
    return flux.apply_rope(q, pe) @ flux.apply_rope(k, pe).transpose(-1, -2)


def test_rope_matches_reference_and_is_relative_and_norm_preserving():
    torch.manual_seed(0)
    head_dim, L = 24, 10
    ids = torch.randint(0, 8, (L, 3)).double()
    q, k = torch.randn(2, 3, L, head_dim, dtype=torch.float64), torch.randn(2, 3, L, head_dim, dtype=torch.float64)
    d = (head_dim - head_dim // 8) // 4 * 2
    ref = reference_rope(ids, (head_dim - 2 * d, d, d))
    pe = flux.rope(ids, head_dim).double()
    assert pe.shape == (2, L, head_dim // 2)
    assert torch.allclose(flux.apply_rope(q, pe), ref(q), atol=1e-6)
    s = scores(q, k, pe)                                                  # q_i . k_j depends on ids_i - ids_j only
    for shift in ([5, 0, 0], [0, 3, -2], [7, 11, 13]):
        assert torch.allclose(scores(q, k, flux.rope(ids + torch.tensor(shift).double(), head_dim).double()), s, atol=1e-5)
    assert not torch.allclose(scores(q, k, flux.rope(ids * 2, head_dim).double()), s, atol=1e-3)   # not trivially
    assert torch.allclose(flux.apply_rope(q, pe).norm(dim=-1), q.norm(dim=-1), atol=1e-6)   # a rotation
    assert torch.equal(flux.apply_rope(q.float(), flux.rope(torch.zeros(L, 3), head_dim)), q.float())   # ids 0: identity


def test_axes_and_position_ids():
    d = lambda hd: (hd - hd // 8) // 4 * 2  # noqa: E731, as in rope
    assert (128 - 2 * d(128), d(128), d(128)) == (16, 56, 56)             # FLUX.1's axes_dim
    for head_dim in (8, 16, 24, 32, 64):
        assert 0 < head_dim - 2 * d(head_dim) and d(head_dim) % 2 == 0
    net = small_flux(patch=4)
    ids = net.ids
    assert ids.shape == (48 + 64, 3) and (ids[:48] == 0).all()           # text ids are zero
    row, col = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.equal(ids[48:], torch.stack([0 * row, row, col], -1).flatten(0, 1).double())
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert torch.equal(flux.patchify(x, 4)[0, :, 0].double(), ids[48:, 1] * 8 + ids[48:, 2])   # token order = ids order
    assert "pe" not in net.state_dict() and net.pe.shape == (2, 112, 8)
    assert torch.allclose(net.pe[:, :48], torch.tensor([1.0, 0.0]).view(2, 1, 1).expand(2, 48, 8))   # text: no rotation


@pytest.mark.parametrize("p", [1, 2, 4])
def test_pack_unpack_round_trip(p):
    x = torch.randn(2, 1, 32, 32)
    tokens = flux.patchify(x, p)
    assert tokens.shape == (2, (32 // p) ** 2, p * p) and torch.equal(flux.unpatchify(tokens, p, 32 // p), x)
    ref = torch.einsum("bchpwq->bhwcpq", x.view(2, 1, 32 // p, p, 32 // p, p)).reshape(2, -1, p * p)  # sampling.prepare
    assert torch.equal(tokens, ref)                                       # "b c (h ph) (w pw) -> b (h w) (c ph pw)"


def test_zero_init_output_and_identity_blocks():
    """Our adaLN-Zero init (the reference has no init code): every modulation and the final layer are zero."""
    net, x = small_flux(), torch.randn(3, 1, 32, 32)
    ids, t = flux.tokenize(["a handwritten seven", "", "7"]), torch.tensor([0.0, 0.5, 1.0])
    out = net(x, t, ids, torch.ones(3))
    assert out.shape == (3, 1, 32, 32) and (out == 0).all()
    for b in list(net.double_blocks) + list(net.single_blocks):
        for m in ([b.txt.mod[-1], b.img.mod[-1]] if hasattr(b, "txt") else [b.mod[-1]]):
            assert (m.weight == 0).all() and (m.bias == 0).all()
    assert (net.final.linear.weight == 0).all() and (net.final.ada[-1].weight == 0).all()
    img, txt, vec = torch.randn(3, 64, 32), torch.randn(3, 48, 32), torch.randn(3, 32)
    keep = torch.ones(3, 1, 1, 112, dtype=torch.bool)
    i2, t2 = net.double_blocks[0](img, txt, vec, net.pe, keep)
    assert i2.shape == img.shape and t2.shape == txt.shape and torch.equal(i2, img) and torch.equal(t2, txt)
    h = torch.cat([txt, img], 1)
    assert net.single_blocks[0](h, vec, net.pe, keep).shape == (3, 112, 32)
    assert torch.equal(net.single_blocks[0](h, vec, net.pe, keep), h)
    perturb(net)
    i3, t3 = net.double_blocks[0](img, txt, vec, net.pe, keep)
    assert not torch.allclose(i3, img) and not torch.allclose(t3, txt)
    assert not torch.allclose(net.single_blocks[0](h, vec, net.pe, keep), h)


def test_streams_share_no_parameters_and_qk_norm():
    b = small_flux().double_blocks[0]
    assert not {id(p) for p in b.txt.parameters()} & {id(p) for p in b.img.parameters()}
    qkv = torch.randn(4, 10, 96) * 5
    q, k, v = b.img.qk_norm(qkv)
    assert q.shape == (4, 2, 10, 16) and torch.equal(v, qkv[..., 64:].view(4, 10, 2, 16).transpose(1, 2))
    for z in (q, k):
        assert torch.allclose(z.pow(2).mean(-1).sqrt(), torch.ones(4, 2, 10), atol=1e-3)   # RMS 1 at init
    assert isinstance(b.img.qk_norm.q, torch.nn.RMSNorm) and b.img.qk_norm.q.weight.requires_grad


def test_single_block_is_parallel_attention_plus_mlp():
    """Splitting linear2 into its attention and MLP columns and summing the two branches gives the fused output."""
    net = perturb(small_flux())
    blk, D = net.single_blocks[0], 32
    h, vec = torch.randn(2, 112, D), torch.randn(2, D)
    keep = torch.ones(2, 1, 1, 112, dtype=torch.bool)
    shift, scale, gate = blk.mod(vec)[:, None].chunk(3, -1)
    y = blk.linear1(flux.modulate(blk.norm(h), shift, scale))
    qkv, mlp = y[..., :3 * D], y[..., 3 * D:]
    w, bias = blk.linear2.weight, blk.linear2.bias
    attn = flux.attention(*blk.qk_norm(qkv), net.pe, keep) @ w[:, :D].T
    mlp = blk.act(mlp) @ w[:, D:].T
    assert torch.allclose(blk(h, vec, net.pe, keep), h + gate * (attn + mlp + bias), atol=1e-5)


def test_text_tokenizer_and_mask():
    assert flux.tokenize([""]).tolist()[0] == [1] + [0] * 47              # BOS only: the unconditional prompt
    ids = flux.tokenize(["Écrit à la main: 七", "x" * 100])
    assert ids.shape == (2, 48) and (ids[1] == torch.tensor([1] + [ord("x") + 2] * 47)).all() and ids.max() < 258
    net = perturb(small_flux()).eval()
    x, t, g = torch.randn(2, 1, 32, 32), torch.tensor([0.3, 0.8]), torch.ones(2)
    ids = flux.tokenize(["a handwritten seven", "3"])
    with torch.no_grad():
        out = net(x, t, ids, g)
        net.text.pos[25:] += torch.randn(23, 32)                           # padding positions only
        net.text.tok.weight[0] += torch.randn(32)                          # the padding token
        assert torch.allclose(net(x, t, ids, g), out, atol=1e-5)
        assert not torch.allclose(net(x, t, flux.tokenize(["a handwritten eight", "3"]), g), out, atol=1e-3)


def test_time_shift_and_schedule():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert flux.time_shift(0.0, 1.0, torch.tensor(0.5)) == 0.5 and torch.allclose(flux.time_shift(0.0, 1.0, t), t)
    for mu in (-0.5, 0.5, math.log(3)):
        s = flux.time_shift(mu, 1.0, t)
        assert s[0] == 0 and abs(s[-1] - 1) < 1e-15 and (s.diff() > 0).all()   # endpoints fixed, monotone
        a = math.exp(mu)
        assert torch.allclose(s, a * t / (1 + (a - 1) * t))               # = SD3's shift with alpha = e^mu
    assert abs(flux.time_shift(math.log(3), 1.0, torch.tensor(0.5)) - 0.75) < 1e-12
    assert flux.time_shift(0.5, 1.0, torch.tensor(0.5)) > 0.5             # mu > 0: towards noise
    assert abs(flux.lin_mu(256) - 0.5) < 1e-12 and abs(flux.lin_mu(4096) - 1.15) < 1e-12
    s = flux.get_schedule(50, 256)
    assert s.shape == (51,) and abs(s[0] - 1) < 1e-15 and s[-1] == 0 and (s.diff() < 0).all()
    assert torch.allclose(s, flux.time_shift(0.5, 1.0, torch.linspace(1, 0, 51, dtype=torch.float64)))


def test_training_loss_t_distribution_and_target():
    """t = time_shift(mu, 1, sigmoid(u)) = sigmoid(u + mu): median sigmoid(mu); target eps - x0 at g = 1."""
    seen = {}

    def net(zt, t, ids, g):
        seen.update(zt=zt, t=t, g=g)
        return torch.zeros_like(zt)
    x0 = torch.randn(200000, 1, 1, 1)
    torch.manual_seed(0)
    loss = flux.flux_loss(net, x0, None, 0.5)
    t = seen["t"]
    assert abs(t.median() - torch.sigmoid(torch.tensor(0.5))) < 0.005 and 0 < t.min() and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.01 and abs(logit.std() - 1) < 0.01
    assert (seen["g"] == 1).all()
    torch.manual_seed(0)                                                  # replay the draws: t, then eps
    t2 = flux.time_shift(0.5, 1.0, torch.sigmoid(torch.randn(len(x0))))
    eps = torch.randn_like(x0)
    assert torch.allclose(t2, t) and torch.allclose(seen["zt"], (1 - t2.view(-1, 1, 1, 1)) * x0 + t2.view(-1, 1, 1, 1) * eps)
    assert torch.allclose(loss, ((eps - x0) ** 2).mean())                  # v = 0: loss = |eps - x0|^2


def test_guidance_embedding_only_on_the_distilled_path():
    calls = []

    def net(x, t, ids, g):                                                # v_c = 1, v_u = 0 (ids[:, 1] == 0 is "")
        calls.append((len(x), g.clone(), ids.clone()))
        return (ids[:, 1] > 0).float().view(-1, 1, 1, 1).expand(len(x), 1, 2, 2) + 0 * g.view(-1, 1, 1, 1)
    x, t, ids = torch.zeros(3, 1, 2, 2), torch.full((3,), 0.5), flux.tokenize(["7", "seven", "a handwritten seven"])
    for w in (0.0, 2.5, 4.0):
        calls.clear()
        out = flux.velocity(net, x, t, ids, w, distilled=False)          # CFG: two passes, g = 1 throughout
        assert torch.allclose(out, torch.full_like(out, w)) and len(calls) == 1 and calls[0][0] == 6
        assert (calls[0][1] == 1).all() and torch.equal(calls[0][2][3:], flux.tokenize([""] * 3))
        calls.clear()
        flux.velocity(net, x, t, ids, w, distilled=True)                  # distilled: one pass, g = w
        assert len(calls) == 1 and calls[0][0] == 3 and (calls[0][1] == w).all()
    calls.clear()
    flux.velocity(net, x, t, ids, 1.0, distilled=False)                   # w = 1: the conditional alone
    assert len(calls) == 1 and calls[0][0] == 3 and (calls[0][1] == 1).all()
    model = perturb(small_flux()).eval()                                  # the real network: g matters to it ...
    xb, tb, idb, one = torch.randn(2, 1, 32, 32), torch.full((2,), 0.6), flux.tokenize(["3", "5"]), torch.ones(2)
    with torch.no_grad():
        v_c, v_u = model(xb, tb, idb, one), model(xb, tb, flux.tokenize(["", ""]), one)
        assert not torch.allclose(model(xb, tb, idb, 3 * one), v_c, atol=1e-4)
        for w in (2.0, 3.0):                                              # ... but only the distilled path feeds it w
            assert torch.allclose(flux.velocity(model, xb, tb, idb, w, distilled=False), v_u + w * (v_c - v_u), atol=1e-5)
            assert torch.allclose(flux.velocity(model, xb, tb, idb, w, distilled=True), model(xb, tb, idb, w * one))


def test_distillation_loss_regresses_teacher_cfg():
    seen = {}

    def student(zt, t, ids, g):
        seen.update(zt=zt, t=t, g=g)
        return torch.zeros_like(zt)

    def teacher(x, t, ids, g):                                            # v_c = 2, v_u = -1: CFG = -1 + 3 w
        assert (g == 1).all()
        return torch.where((ids[:, 1] > 0).view(-1, 1, 1, 1), 2.0, -1.0).expand_as(x)
    x0, ids = torch.randn(4000, 1, 2, 2), flux.tokenize(["7"] * 4000)
    loss = flux.flux_loss(student, x0, ids, 0.5, teacher)
    w = seen["g"]
    assert 1 <= w.min() and w.max() <= 4 and abs(w.mean() - 2.5) < 0.05   # w ~ U[1, 4]
    assert torch.allclose(loss, ((-1 + 3 * w) ** 2).mean(), rtol=1e-5)


def test_euler_sampler_exact_on_straight_paths():
    noise, c = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    for n in (1, 3, 50):
        sched = flux.get_schedule(n, 256)
        traj = flux.denoise(lambda x, t: c, noise, sched)
        assert traj.shape == (n + 1, 4, 1, 8, 8) and torch.allclose(traj[-1], noise - c, atol=1e-5)   # constant v
        x_star = torch.randn(1, 1, 8, 8)                                  # one data point: v = (z_t - x*) / t, exact
        out = flux.denoise(lambda x, t: (x - x_star) / t.view(-1, 1, 1, 1), noise, sched)[-1]
        assert torch.allclose(out, x_star.expand_as(out), atol=1e-5)
        eps, x0 = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)        # v = eps - x0 from z_1 = eps: x0 exactly
        assert torch.allclose(flux.denoise(lambda x, t: eps - x0, eps, sched)[-1], x0, atol=1e-5)


def test_distill_end_to_end_prompt_and_errors(fake_data, tmp_path, capsys):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    flux.main(["--train", *map(str, tiny(fake_data, teacher_dir))])
    flux.main(["--train", "--sample", "--distill-guidance", str(teacher_dir / "ckpt.pt"),
               *map(str, tiny(fake_data, student_dir, "--guidance", "3", "--sample-steps", "3"))])
    out = capsys.readouterr().out
    assert "guidance 3.0 (distilled), 3 NFE" in out, out
    state = torch.load(student_dir / "ckpt.pt", weights_only=True)
    teacher = torch.load(teacher_dir / "ckpt.pt", weights_only=True)
    assert state["teacher"] == str(teacher_dir / "ckpt.pt") and teacher["teacher"] is None
    assert all(state["config"][k] == teacher["config"][k] for k in flux.ARCH)
    flux.main(["--train", "--resume", *map(str, tiny(fake_data, student_dir, "--steps", "3"))])
    assert torch.load(student_dir / "ckpt.pt", weights_only=True)["teacher"] == str(teacher_dir / "ckpt.pt")
    flux.main(["--sample", "--prompt", "a handwritten three", *map(str, tiny(fake_data, teacher_dir))])
    assert "guidance 2.5, 4 NFE" in capsys.readouterr().out
    with np.load(teacher_dir / "samples.npz") as f:
        assert "labels" not in f and list(f["prompts"]) == ["a handwritten three"] * 10 and f["images"].shape == (10, 1, 32, 32)
    a = (teacher_dir / "samples.npz").read_bytes()
    flux.main(["--sample", "--prompt", "a handwritten three", *map(str, tiny(fake_data, teacher_dir))])
    assert (teacher_dir / "samples.npz").read_bytes() == a                 # same seed, same samples
    for flags, needle in ((["--hidden", "32"], "does not match"), (["--depth-single", "3"], "does not match"),
                          (["--heads", "3"], "--heads"), (["--guidance", "-1"], "--guidance")):
        with pytest.raises(SystemExit) as e:
            flux.main(["--sample", "--out", str(teacher_dir), "--device", "cpu", *flags])
        assert needle in str(e.value.code)


def test_distilled_student_beats_the_conditional_teacher_at_w():
    """PAPERS §9 test 5 at toy scale: after a short guidance distillation, the student's one pass at w = 3 is closer
    to the teacher's CFG velocity at w = 3 than the teacher's own conditional velocity is."""
    teacher = perturb(small_flux(hidden=16, heads=2, depth=1, depth_single=1)).eval()
    student = copy.deepcopy(teacher).train()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    torch.manual_seed(2)
    x0, ids = torch.randn(8, 1, 32, 32).clamp(-1, 1), flux.tokenize(["a handwritten seven", "3"] * 4)
    for _ in range(150):
        loss = flux.flux_loss(student, x0, ids, 0.47, teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
    zt, t, w = torch.randn(8, 1, 32, 32), torch.full((8,), 0.6), 3.0
    with torch.no_grad():
        cfg = flux.velocity(teacher, zt, t, ids, w, distilled=False)
        gap_student = (flux.velocity(student.eval(), zt, t, ids, w, distilled=True) - cfg).pow(2).mean()
        gap_cond = (flux.velocity(teacher, zt, t, ids, 1.0, distilled=False) - cfg).pow(2).mean()
    assert gap_student < 0.5 * gap_cond, (gap_student, gap_cond)
