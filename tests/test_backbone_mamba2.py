"""Mamba-2 backbone (CPU): the chunked scan against a plain sequential recurrence, prefill + decode against
one forward, left padding, hybrid attention, state handling, mamba_ssm names and registration."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import omnicore
from omnicore.errors import ParamError
from omnicore.plugins.backbones import build_mamba2
from omnicore.plugins.backbones.mamba2 import Mamba2, ssd_chunked

torch.set_num_threads(2)
F64 = torch.float64


# ---- an independent reference: the recurrence one step at a time ---------------------------------------
def naive_scan(x, dt, A, B, C, D=None, h0=None):
    """x (b,l,h,p), dt (b,l,h), A (h,), B/C (b,l,g,n) -> y, final state (b,h,p,n)."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    Bh, Ch = B.repeat_interleave(h // g, dim=2), C.repeat_interleave(h // g, dim=2)
    state = torch.zeros(b, h, p, n, dtype=x.dtype) if h0 is None else h0.clone()
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = state * decay + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        y = (state * Ch[:, t, :, None, :]).sum(-1)
        if D is not None:
            y = y + x[:, t] * D.reshape(h, -1)
        ys.append(y)
    return torch.stack(ys, 1), state


def naive_mixer(mx: Mamba2, u, mask=None):
    b, l, _ = u.shape
    z, xBC, dt = torch.split(u @ mx.in_proj.weight.T, [mx.d_inner, mx.conv_dim, mx.nheads], dim=-1)
    dt = F.softplus(dt + mx.dt_bias)
    m = torch.ones(b, l, 1, dtype=u.dtype) if mask is None else mask[..., None].to(u.dtype)
    xBC, dt = xBC * m, dt * m
    w = mx.conv1d.weight[:, 0]  # (conv_dim, d_conv)
    padded = F.pad(xBC, (0, 0, mx.d_conv - 1, 0))
    conv = torch.stack([(padded[:, t:t + mx.d_conv] * w.T).sum(1) for t in range(l)], 1) + mx.conv1d.bias
    xBC = F.silu(conv) * m
    x, B, C = torch.split(xBC, [mx.d_inner, mx.ngroups * mx.d_state, mx.ngroups * mx.d_state], dim=-1)
    y, _ = naive_scan(x.reshape(b, l, mx.nheads, mx.headdim), dt, -torch.exp(mx.A_log),
                      B.reshape(b, l, mx.ngroups, -1), C.reshape(b, l, mx.ngroups, -1), mx.D)
    y = y.reshape(b, l, -1) * F.silu(z)
    grouped = y.reshape(b, l, mx.ngroups, -1)
    y = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(b, l, -1) * mx.norm.weight
    return y @ mx.out_proj.weight.T


def tiny(**kw):
    torch.manual_seed(0)
    kw.setdefault("kernel", "torch")
    return build_mamba2(size="tiny", dtype="float64", **kw).eval()


# ---- the scan ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L,chunk,groups", [(23, 8, 1), (16, 16, 2), (5, 16, 2), (33, 7, 4)])
def test_chunked_scan_matches_sequential(L, chunk, groups):
    torch.manual_seed(L)
    b, h, p, n = 2, 4, 3, 5
    x, dt = torch.randn(b, L, h, p, dtype=F64), F.softplus(torch.randn(b, L, h, dtype=F64))
    A, D = -torch.rand(h, dtype=F64) * 2, torch.randn(h, dtype=F64)
    B, C = torch.randn(b, L, groups, n, dtype=F64), torch.randn(b, L, groups, n, dtype=F64)
    h0 = torch.randn(b, h, p, n, dtype=F64)
    y, final = ssd_chunked(x, dt, A, B, C, chunk, D=D, initial_state=h0)
    y_ref, final_ref = naive_scan(x, dt, A, B, C, D, h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def test_mixer_forward_and_gradients_match_sequential():
    torch.manual_seed(1)
    mx = Mamba2(32, d_state=8, headdim=8, ngroups=2, chunk_size=8, kernel="torch", dtype=F64)
    u = torch.randn(2, 21, 32, dtype=F64, requires_grad=True)
    out = mx(u)
    ref = naive_mixer(mx, u)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [u, *mx.parameters()], g)
    grads_ref = torch.autograd.grad(ref, [u, *mx.parameters()], g)
    for name, a, r in zip(["input"] + [n for n, _ in mx.named_parameters()], grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-9, msg=name)


# ---- prefill, decode, padding -----------------------------------------------------------------------------
def decode(model, x, prefill: int, **kw):
    """Prefill ``prefill`` tokens then step one at a time; return all outputs (B, L, D)."""
    state = model.allocate_inference_state(x.shape[0], x.shape[1] + 4)
    outs = [model(x[:, :prefill], state=state, **kw)]
    for t in range(prefill, x.shape[1]):
        outs.append(model(x[:, t:t + 1], state=state, **kw))
    assert state.seqlen_offset == x.shape[1]
    return torch.cat(outs, 1)


HYBRID = dict(attn_layer_idx=[1], attn_cfg=dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=8))


@pytest.mark.parametrize("kw", [dict(), dict(ngroups=2, chunk_size=5), dict(d_intermediate=40), HYBRID],
                         ids=["plain", "groups-chunk5", "mlp", "hybrid"])
def test_prefill_then_decode_equals_forward(kw):
    model = tiny(**kw)
    x = torch.randn(2, 19, 64, dtype=F64)
    full = model(x)
    torch.testing.assert_close(decode(model, x, prefill=11), full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(decode(model, x, prefill=1), full, rtol=1e-9, atol=1e-9)
    # prefill in two pieces (the second continues from the state), then decode
    state = model.allocate_inference_state(2, 19)
    parts = [model(x[:, :6], state=state), model(x[:, 6:15], state=state)]
    parts += [model(x[:, t:t + 1], state=state) for t in range(15, 19)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kw", [dict(), HYBRID], ids=["mamba", "hybrid"])
def test_left_padding_equals_unpadded(kw):
    model = tiny(**kw)
    lengths, L, new = [7, 12], 12, 5
    seqs = [torch.randn(1, n + new, 64, dtype=F64) for n in lengths]
    x = torch.zeros(2, L, 64, dtype=F64)
    mask = torch.zeros(2, L, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        x[i, L - n:] = s[0, :n]
        mask[i, L - n:] = True
    # no state: outputs at real positions equal the unpadded forward
    out = model(x, mask=mask)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        torch.testing.assert_close(out[i, L - n:], model(s[:, :n])[0], rtol=1e-9, atol=1e-9)
    # batched prefill with the mask, then batched decoding == each sequence alone
    state = model.allocate_inference_state(2, L + new)
    outs = [model(x, state=state, mask=mask)[:, -1:]]
    for t in range(new):
        step_in = torch.cat([s[:, n + t:n + t + 1] for s, n in zip(seqs, lengths)])
        outs.append(model(step_in, state=state))
    batched = torch.cat(outs, 1)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        alone = model(s)[0, n - 1:]
        torch.testing.assert_close(batched[i], alone, rtol=1e-9, atol=1e-9)


def test_state_reset_and_snapshot():
    model = tiny(**HYBRID)
    x = torch.randn(1, 9, 64, dtype=F64)
    state = model.allocate_inference_state(1, 16)
    first = decode_with(model, x, state)
    assert state.seqlen_offset == 9 and any(t.count_nonzero() > 0 for t in state.tensors())
    snap = state.snapshot()
    state.reset()
    assert state.seqlen_offset == 0 and all(t.count_nonzero() == 0 for t in state.tensors())
    torch.testing.assert_close(decode_with(model, x, state), first)
    state.restore(snap)
    assert state.seqlen_offset == 9


def test_a_state_marked_empty_is_not_read():
    # an engine reusing a state for a new sequence marks it empty instead of relying on zeros only: the prefill then
    # skips reading (and widening) the caches; garbage left in them must not reach the outputs
    model = tiny()
    x = torch.randn(2, 9, 64, dtype=F64)
    clean = decode_with(model, x, model.allocate_inference_state(2, 16))
    state = model.allocate_inference_state(2, 16)
    for t in state.tensors()[2:]:
        t.normal_()
    assert not torch.allclose(decode_with(model, x, state_copy(state)), clean)  # a written state is read
    state.mark_empty()
    torch.testing.assert_close(decode_with(model, x, state), clean)
    assert not any(c.empty for c in state.layers)  # the prefill wrote them


def state_copy(state):
    twin = copy.deepcopy(state)
    twin.mark_written()
    return twin


def decode_with(model, x, state):
    outs = [model(x[:, :4], state=state)] + [model(x[:, t:t + 1], state=state) for t in range(4, x.shape[1])]
    return torch.cat(outs, 1)


def test_prefill_longer_than_state_is_refused():
    model = tiny(**HYBRID)
    state = model.allocate_inference_state(1, 4)
    with pytest.raises(ValueError, match="max_seqlen"):
        model(torch.randn(1, 6, 64, dtype=F64), state=state)


# ---- names, loading, registry, kernels ------------------------------------------------------------------
def expected_keys(n_layer, mlp=False, attn=(), attn_bias=True):
    """mamba_ssm MixerModel's backbone names (without embedding), written out from its layout."""
    keys = []
    for i in range(n_layer):
        p = f"layers.{i}."
        if i in attn:
            mixer = ["mixer.in_proj.weight"] + (["mixer.in_proj.bias"] if attn_bias else []) + \
                    ["mixer.out_proj.weight"] + (["mixer.out_proj.bias"] if attn_bias else [])
        else:
            mixer = ["mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.in_proj.weight", "mixer.conv1d.weight",
                     "mixer.conv1d.bias", "mixer.norm.weight", "mixer.out_proj.weight"]
        keys += [p + "norm.weight"] + [p + k for k in mixer]
        if mlp:
            keys += [p + "norm2.weight", p + "mlp.fc1.weight", p + "mlp.fc2.weight"]
    return sorted(keys + ["norm_f.weight"])


def test_state_dict_names_and_shapes_match_mamba_ssm():
    m = build_mamba2(size="tiny", kernel="torch")
    sd = m.state_dict()
    assert sorted(sd) == expected_keys(2)
    # tiny: d_model 64, expand 2 -> d_inner 128, d_state 16, headdim 16 -> 8 heads, ngroups 1, d_conv 4
    assert sd["layers.0.mixer.in_proj.weight"].shape == (2 * 128 + 2 * 16 + 8, 64)
    assert sd["layers.0.mixer.conv1d.weight"].shape == (128 + 2 * 16, 1, 4)
    assert sd["layers.0.mixer.dt_bias"].shape == sd["layers.0.mixer.A_log"].shape == sd["layers.0.mixer.D"].shape == (8,)
    assert sd["layers.0.mixer.out_proj.weight"].shape == (64, 128)
    assert sorted(build_mamba2(size="tiny", n_layer=3, d_intermediate=100, attn_layer_idx=[2],
                               attn_cfg={"num_heads": 4}).state_dict()) == expected_keys(3, mlp=True, attn=(2,))
    big = build_mamba2(size="1.3b", n_layer=1, device="meta").state_dict()
    assert big["layers.0.mixer.in_proj.weight"].shape == (2 * 4096 + 2 * 128 + 64, 2048)
    assert big["layers.0.mixer.norm.weight"].shape == (4096,)


def test_mamba2_init_like_mamba_ssm():
    m = build_mamba2(d_model=256, n_layer=1, headdim=16)
    mx = m.layers[0].mixer
    dt = F.softplus(mx.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    A = torch.exp(mx.A_log)
    assert A.min() >= 1 and A.max() <= 16
    assert torch.equal(mx.D, torch.ones_like(mx.D))


def test_load_lm_checkpoint_keys():
    src, dst = tiny(), tiny()
    torch.manual_seed(5)
    for p in dst.parameters():
        p.data.normal_()
    lm = {"backbone." + k: v for k, v in src.state_dict().items()}
    lm["backbone.embedding.weight"] = torch.zeros(10, 64)
    lm["lm_head.weight"] = torch.zeros(10, 64)
    res = dst.load_mamba_state_dict(lm)
    assert res.missing_keys == [] and res.unexpected_keys == []
    x = torch.randn(1, 5, 64, dtype=F64)
    torch.testing.assert_close(dst(x), src(x))
    with pytest.raises(ValueError, match="missing"):
        dst.load_mamba_state_dict({k: v for k, v in src.state_dict().items() if "norm_f" not in k})
    res = dst.load_mamba_state_dict({**src.state_dict(), "layers.0.extra": torch.zeros(1)}, strict=False)
    assert res.unexpected_keys == ["layers.0.extra"]


def test_registry_create_and_param_errors(fresh_registry):
    m = omnicore.create("backbone", "mamba2", size="tiny")
    assert m.d_model == 64 and len(m.layers) == 2
    assert m(torch.randn(1, 3, 64)).shape == (1, 3, 64)
    assert omnicore.create("backbone", "mamba2", size="tiny", d_model=32, headdim=8).d_model == 32
    with pytest.raises(ParamError, match="kernel"):
        omnicore.create("backbone", "mamba2", size="tiny", kernel="cuda")
    with pytest.raises(ParamError, match="d_modle"):
        omnicore.create("backbone", "mamba2", size="tiny", d_modle=3)
    with pytest.raises(ParamError, match="size"):
        omnicore.create("backbone", "mamba2", size="huge")


def test_kernel_choice_on_cpu():
    from omnicore.plugins.backbones.mamba2 import kernels

    x = torch.randn(1, 4, 64)
    assert build_mamba2(size="tiny", kernel="auto")(x).shape == x.shape
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="mamba_ssm") as err:
            build_mamba2(size="tiny", kernel="mamba_ssm")
        assert "\n" not in str(err.value)
        assert not kernels.use_fast("auto", x)


def test_gradient_checkpointing_same_grads():
    model = tiny(d_intermediate=32)
    model.train()
    x = torch.randn(2, 10, 64, dtype=F64)
    for p in model.parameters():
        p.requires_grad_(True)
    g_plain = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    model.gradient_checkpointing = True
    g_ckpt = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    for a, b in zip(g_plain, g_ckpt):
        torch.testing.assert_close(a, b)
