"""The mmMamba mixer (CPU, float64): chunked forward, one-token steps and prefill + steps against a per-token
recurrence written here; left padding; seeding from a transformers attention layer (the weights it copies, the
initialisation it promises, and linear attention over the teacher's projections once the decay is off); a
backbone of these mixers; the released checkpoints' packed form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import omnicore
import omnicore.distill
from omnicore.errors import CheckpointError, ParamError
from omnicore.plugins.backbones import build_mamba2
from omnicore.plugins.backbones.mamba2 import MMambaMixer, fused_step, pack_inference, unpack_inference
from omnicore.plugins.backbones.mamba2.mmmamba_mixer import inference_config

torch.set_num_threads(2)
F64 = torch.float64
D_MODEL, H, HKV, HD = 24, 4, 2, 8  # H * HD = 32 != D_MODEL: a transposed projection cannot pass


def mixer(chunk_size=5, bias=False, seed=0) -> MMambaMixer:
    """A mixer with every parameter random (not the seeding's identity conv / zero dt projection)."""
    torch.manual_seed(seed)
    mx = MMambaMixer(D_MODEL, H, HKV, HD, chunk_size=chunk_size, qkv_bias=bias, o_bias=bias, kernel="torch",
                     dtype=F64)
    with torch.no_grad():
        for name, p in mx.named_parameters():
            p.normal_(0, 0.3)
        mx.A_log_bias.uniform_(-1.0, 0.5)
        mx.dt_bias.uniform_(-3.0, 0.0)
        mx.g_norm.weight.uniform_(0.5, 1.5)
    return mx


# ---- an independent reference: the recurrence one token at a time, one head at a time --------------------
def naive(mx: MMambaMixer, u: torch.Tensor, mask: torch.Tensor | None = None):
    """u (b, l, D) -> (y (b, l, D), final SSM state (b, H, d, d), conv inputs window (b, conv_dim, width))."""
    b, l, _ = u.shape
    d, G, W = mx.head_dim, mx.num_heads // mx.num_kv_heads, mx.d_conv
    m = torch.ones(b, l, dtype=F64) if mask is None else mask.to(F64)
    lin = lambda p, x: x @ p.weight.T + (p.bias if p.bias is not None else 0)  # noqa: E731
    feats = torch.cat([lin(mx.v_proj, u), lin(mx.k_proj, u), lin(mx.q_proj, u)], -1) * m[..., None]
    S = [torch.zeros(b, d, d, dtype=F64) for _ in range(mx.num_heads)]  # per head: (value dim, key dim)
    window = torch.zeros(b, mx.conv_dim, W, dtype=F64)  # the last W conv inputs
    w = mx.conv1d.weight[:, 0]  # (conv_dim, W); tap W-1 is the current token
    A = -torch.exp(mx.A_log_bias)
    outs = []
    for t in range(l):
        mt = m[:, t, None]
        window = torch.where(mt[..., None] > 0, torch.cat([window[..., 1:], feats[:, t, :, None]], -1), window)
        c = F.silu((window * w).sum(-1) + mx.conv1d.bias) * mt
        v, k, q = torch.split(c, [mx.kv_dim, mx.kv_dim, mx.d_inner], -1)
        dt = F.softplus(u[:, t] @ mx.in_proj.weight.T + mx.dt_bias) * mt
        ys = []
        for h in range(mx.num_heads):
            kv = h // G
            vh, kh, qh = v[:, kv * d:(kv + 1) * d], k[:, kv * d:(kv + 1) * d], q[:, h * d:(h + 1) * d]
            decay = torch.exp(dt[:, h] * A[h])[:, None, None]
            S[h] = decay * S[h] + dt[:, h, None, None] * vh[:, :, None] * kh[:, None, :]
            y = (S[h] @ qh[..., None])[..., 0]
            ys.append(y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * mx.g_norm.weight)
        gate = F.silu(u[:, t] @ mx.g_proj.weight.T)
        outs.append(lin(mx.o_proj, torch.cat(ys, -1) * gate))
    return torch.stack(outs, 1), torch.stack(S, 1), window


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ---- the mixer against the recurrence ---------------------------------------------------------------------
@pytest.mark.parametrize("L,chunk,bias", [(13, 5, False), (16, 8, True), (3, 128, False), (1, 4, True)],
                         ids=["13-chunk5", "16-chunk8-bias", "3-chunk128", "1-token"])
def test_chunked_forward_matches_recurrence(L, chunk, bias):
    mx = mixer(chunk, bias)
    u = torch.randn(2, L, D_MODEL, dtype=F64)
    y_ref, _, _ = naive(mx, u)
    close(mx(u), y_ref)


def test_gradients_match_recurrence():
    mx = mixer(4, bias=True)
    u = torch.randn(2, 11, D_MODEL, dtype=F64, requires_grad=True)
    params = [u] + list(mx.parameters())
    g = torch.autograd.grad(mx(u).square().sum(), params)
    g_ref = torch.autograd.grad(naive(mx, u)[0].square().sum(), params)
    for (name, _), a, b in zip([("u", u)] + list(mx.named_parameters()), g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def test_steps_and_prefill_continued_by_steps_match_recurrence():
    mx = mixer(chunk_size=4)
    u = torch.randn(2, 14, D_MODEL, dtype=F64)
    y_ref, S_ref, window_ref = naive(mx, u)
    # one token at a time from an empty cache
    cache = mx.allocate_cache(2)
    assert cache.conv_state.shape == (2, 2 * HKV * HD + H * HD, 2) and cache.ssm_state.shape == (2, H, HD, HD)
    close(torch.cat([mx(u[:, t:t + 1], cache) for t in range(14)], 1), y_ref)
    close(cache.ssm_state, S_ref)
    close(cache.conv_state, window_ref)
    # a prefill (not a multiple of the chunk), a second prefill continuing from it, then steps
    for cut in (1, 6):
        cache = mx.allocate_cache(2)
        outs = [mx(u[:, :cut], cache), mx(u[:, cut:9], cache)] + [mx(u[:, t:t + 1], cache) for t in range(9, 14)]
        close(torch.cat(outs, 1), y_ref)
        close(cache.ssm_state, S_ref)


def test_left_padding_masks():
    mx = mixer(chunk_size=5)
    lengths, L, new = [7, 12], 12, 4
    seqs = [torch.randn(1, n + new, D_MODEL, dtype=F64) for n in lengths]
    x = torch.randn(2, L, D_MODEL, dtype=F64)  # padding holds garbage, which the mask must keep out
    mask = torch.zeros(2, L, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        x[i, L - n:] = s[0, :n]
        mask[i, L - n:] = True
    out = mx(x, mask=mask)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        close(out[i, L - n:], naive(mx, s[:, :n])[0][0])
    # masked prefill into a cache, then steps: each sample as if alone
    cache = mx.allocate_cache(2)
    outs = [mx(x, cache, mask)[:, -1:]]
    for t in range(new):
        outs.append(mx(torch.cat([s[:, n + t:n + t + 1] for s, n in zip(seqs, lengths)]), cache))
    batched = torch.cat(outs, 1)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        close(batched[i], naive(mx, s)[0][0, n - 1:])
    # a masked step leaves that row's cache as it was and moves the other
    before = (cache.conv_state.clone(), cache.ssm_state.clone())
    mx(torch.randn(2, 1, D_MODEL, dtype=F64), cache, torch.tensor([[False], [True]]))
    assert torch.equal(cache.conv_state[0], before[0][0]) and torch.equal(cache.ssm_state[0], before[1][0])
    assert not torch.equal(cache.ssm_state[1], before[1][1])


# ---- seeding from a transformers attention layer ----------------------------------------------------------
def llama_attention(bias=False):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    cfg = LlamaConfig(hidden_size=D_MODEL, num_attention_heads=H, num_key_value_heads=HKV, head_dim=HD,
                      attention_bias=bias)
    torch.manual_seed(3)
    return LlamaAttention(cfg, layer_idx=0).to(F64)


def qwen2_attention():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    cfg = Qwen2Config(hidden_size=D_MODEL, num_attention_heads=H, num_key_value_heads=HKV, head_dim=HD)
    torch.manual_seed(4)
    layer = Qwen2Attention(cfg, layer_idx=0).to(F64)
    with torch.no_grad():
        for p in (layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias):
            p.normal_()
    return layer


TEACHERS = {"llama": llama_attention, "llama-bias": lambda: llama_attention(bias=True), "qwen2": qwen2_attention}


@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_seed_copies_the_attention_and_initialises_as_mmmamba(teacher):
    att = TEACHERS[teacher]()
    mx = omnicore.distill.seed(att, kernel="torch", chunk_size=4)
    assert isinstance(mx, MMambaMixer) and mx.o_proj.weight.dtype == F64
    assert (mx.num_heads, mx.num_kv_heads, mx.head_dim, mx.d_conv, mx.chunk_size) == (H, HKV, HD, 2, 4)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        src, dst = getattr(att, name), getattr(mx, name)
        assert torch.equal(dst.weight, src.weight), name
        assert (dst.bias is None) == (src.bias is None), name
        if src.bias is not None:
            assert torch.equal(dst.bias, src.bias), name
    w = mx.conv1d.weight
    assert torch.equal(w[:, 0, -1], torch.ones(mx.conv_dim, dtype=F64))  # the current token passes
    assert not w[:, 0, :-1].any() and not mx.conv1d.bias.any() and not mx.in_proj.weight.any()
    dt = F.softplus(mx.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-9) and dt.max() <= 0.1 * (1 + 1e-9)
    assert torch.equal(mx.A_log_bias, torch.ones(H, dtype=F64))
    assert torch.equal(mx.g_norm.weight, torch.ones(HD, dtype=F64))
    bound = 2 ** -2.5 * math.sqrt(6 / (D_MODEL + H * HD))  # xavier_uniform, gain 2^-2.5
    assert mx.g_proj.weight.abs().max() <= bound and mx.g_proj.weight.abs().max() > 0.9 * bound
    # the generator option makes the new parameters reproducible
    a = omnicore.distill.seed(att, generator=torch.Generator().manual_seed(7))
    b = omnicore.distill.seed(att, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.dt_bias, b.dt_bias) and torch.equal(a.g_proj.weight, b.g_proj.weight)


def linear_attention_reference(att, mx, u):
    """What seeding promises once the decay is off, from the teacher's own weights in plain torch: causal linear
    attention with a SiLU feature map over the teacher's q, k, v (heads sharing kv heads as the teacher does), each
    key weighted by dt = softplus(dt_bias); then per-head RMSNorm, the gate silu(g_proj(u)), the teacher's o_proj."""
    b, l, _ = u.shape
    q = F.silu(att.q_proj(u)).view(b, l, H, HD).transpose(1, 2)  # (b, H, l, d)
    k = F.silu(att.k_proj(u)).view(b, l, HKV, HD).transpose(1, 2)
    v = F.silu(att.v_proj(u)).view(b, l, HKV, HD).transpose(1, 2)
    group = att.num_key_value_groups
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    dt = F.softplus(mx.dt_bias)[None, :, None, None]
    scores = (q @ k.transpose(-1, -2)).tril()  # causal, no softmax, no 1/sqrt(d)
    y = scores @ (dt * v)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)
    y = y.transpose(1, 2).reshape(b, l, H * HD) * F.silu(u @ mx.g_proj.weight.T)
    return att.o_proj(y)


@pytest.mark.parametrize("teacher", list(TEACHERS))
def test_seeded_mixer_without_decay_is_linear_attention_over_the_teacher(teacher):
    att = TEACHERS[teacher]()
    mx = omnicore.distill.seed(att, kernel="torch", chunk_size=4)
    u = torch.randn(2, 11, D_MODEL, dtype=F64)
    with torch.no_grad():
        ref = linear_attention_reference(att, mx, u)
        assert not torch.allclose(mx(u), ref, atol=1e-6)  # seeded as mmMamba, the decay A = -e is on
        mx.A_log_bias.fill_(-math.inf)  # A = -exp(-inf) = 0: no decay
        close(mx(u), ref)
        cache = mx.allocate_cache(2)  # and so does decoding from a cache
        close(torch.cat([mx(u[:, :5], cache)] + [mx(u[:, t:t + 1], cache) for t in range(5, 11)], 1), ref)


def test_seed_refuses_what_it_cannot_map():
    att = llama_attention()
    with pytest.raises(ParamError, match="dt_mn"):
        omnicore.distill.seed(att, dt_mn=0.01)
    with pytest.raises(ParamError, match="dt_min"):
        omnicore.distill.seed(att, dt_min=0.5, dt_max=0.1)
    with pytest.raises(ParamError, match="q_proj"):
        omnicore.distill.seed(torch.nn.Linear(4, 4))
    with pytest.raises(ParamError, match="torch module"):
        omnicore.distill.seed("layer")
    with pytest.raises(omnicore.UnknownComponentError, match="mixer"):
        omnicore.distill.seed(att, mixer="gru")
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

    qk_norm = Qwen3Attention(Qwen3Config(hidden_size=D_MODEL, num_attention_heads=H, num_key_value_heads=HKV,
                                         head_dim=HD), layer_idx=0)
    with pytest.raises(ParamError, match="q_norm"):
        omnicore.distill.seed(qk_norm)


# ---- a backbone of these mixers -----------------------------------------------------------------------------
MIXER_CFG = dict(num_heads=4, num_kv_heads=2, head_dim=8, chunk_size=5)


def stack(**kw):
    torch.manual_seed(0)
    model = build_mamba2(size="tiny", n_layer=3, mixer="mmmamba", mixer_cfg=MIXER_CFG, kernel="torch",
                         dtype="float64", **kw).eval()
    with torch.no_grad():  # move the seeding-style init (identity conv, zero dt projection) off its special point
        for block in model.layers:
            if isinstance(block.mixer, MMambaMixer):
                for name in ("conv1d", "in_proj"):
                    getattr(block.mixer, name).weight.normal_(0, 0.3)
    return model


def decode(model, x, prefill, mask=None):
    state = model.allocate_inference_state(x.shape[0], x.shape[1])
    outs = [model(x[:, :prefill], state=state, mask=None if mask is None else mask[:, :prefill])]
    outs += [model(x[:, t:t + 1], state=state) for t in range(prefill, x.shape[1])]
    return torch.cat(outs, 1)


HYBRID = dict(attn_layer_idx=[1], attn_cfg=dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=8))


@pytest.mark.parametrize("kw", [dict(), dict(d_intermediate=40), HYBRID], ids=["plain", "mlp", "hybrid"])
def test_backbone_of_mmmamba_mixers_trains_and_decodes_like_its_forward(kw):
    model = stack(**kw)
    kinds = [type(b.mixer).__name__ for b in model.layers]
    assert kinds.count("MMambaMixer") == 3 - len(kw.get("attn_layer_idx", []))
    x = torch.randn(2, 13, 64, dtype=F64)
    model.train()
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.layers[0].mixer.dt_bias.grad.abs().sum() > 0 and model.layers[0].mixer.q_proj.weight.grad.any()
    model.eval()
    with torch.no_grad():
        full = model(x)
        close(decode(model, x, prefill=7), full)
        close(decode(model, x, prefill=1), full)
        # left padding: the padded row decodes as the same sequence alone
        pad = torch.cat([torch.randn(1, 4, 64, dtype=F64), x[1:, :9]], 1)
        mask = torch.ones(2, 13, dtype=torch.bool)
        mask[1, :4] = False
        padded = torch.cat([x[:1], pad], 0)
        state = model.allocate_inference_state(2, 17)
        outs = [model(padded, state=state, mask=mask)]
        nxt = torch.randn(2, 4, 64, dtype=F64)
        outs += [model(nxt[:, t:t + 1], state=state) for t in range(4)]
        alone = model(torch.cat([x[1:, :9], nxt[1:]], 1))
        close(torch.cat(outs, 1)[1, 4:], alone[0])


def test_backbone_names_fast_paths_and_registry(fresh_registry):
    model = stack()
    keys = {k.split("mixer.")[1] for k in model.state_dict() if k.startswith("layers.0.mixer.")}
    assert keys == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "conv1d.weight",
                    "conv1d.bias", "in_proj.weight", "g_proj.weight", "g_norm.weight", "dt_bias", "A_log_bias"}
    # the fused Triton step and the merged LoRA weights are Mamba-2's: an mmMamba stack is not handed to them
    assert fused_step.layer_weights(model, None) is None and model.prepare_decode(None) == ()
    built = omnicore.create("backbone", "mamba2", size="tiny", mixer="mmmamba", mixer_cfg=MIXER_CFG)
    assert isinstance(built.layers[1].mixer, MMambaMixer) and built.layers[1].mixer.chunk_size == 5
    assert "mmmamba" in [c.name for c in omnicore.list_components("mixer")]
    alone = omnicore.create("mixer", "mmmamba", d_model=16, num_heads=2)
    assert alone.head_dim == 8 and alone.num_kv_heads == 2 and alone(torch.randn(1, 3, 16)).shape == (1, 3, 16)
    bad = [(dict(mixer_cfg={**MIXER_CFG, "d_state": 8}), "d_state"), (dict(mixer_cfg={"head_dim": 8}), "num_heads"),
           (dict(mixer_cfg=MIXER_CFG, headdim=8), "headdim"), (dict(mixer="mmmamba2"), "mixer"),
           (dict(mixer_cfg=MIXER_CFG, lora={"tasks": ["mmu"]}), "lora"),
           (dict(mixer_cfg={**MIXER_CFG, "num_kv_heads": 3}), "num_kv_heads")]
    for kw, word in bad:
        kw.setdefault("mixer", "mmmamba")
        with pytest.raises(ParamError, match=word):
            omnicore.create("backbone", "mamba2", size="tiny", **kw)
    with pytest.raises(ParamError, match="mixer_cfg"):
        omnicore.create("backbone", "mamba2", size="tiny", mixer_cfg=MIXER_CFG)


# ---- the released checkpoints' packed form ------------------------------------------------------------------
def test_packing_round_trip_into_a_fresh_stack():
    src, dst = stack(), stack()
    with torch.no_grad():
        for p in dst.parameters():
            p.normal_()
    for sb, db in zip(src.layers, dst.layers):
        packed = pack_inference(sb.mixer)
        assert packed["wvkqgdt.weight"].shape == (2 * 2 * 8 + 2 * 4 * 8 + 4, 64)
        # the rows are [v, k, q, g, dt]
        assert torch.equal(packed["wvkqgdt.weight"][:16], sb.mixer.v_proj.weight)
        assert torch.equal(packed["wvkqgdt.weight"][-4:], sb.mixer.in_proj.weight)
        assert inference_config(packed) == dict(d_model=64, num_heads=4, num_kv_heads=2, head_dim=8, conv_width=2,
                                                qkv_bias=False, o_bias=False)
        db.mixer.load_state_dict(unpack_inference(packed, db.mixer))
        db.norm.load_state_dict(sb.norm.state_dict())
    dst.norm_f.load_state_dict(src.norm_f.state_dict())
    x = torch.randn(1, 9, 64, dtype=F64)
    close(dst(x), src(x))


def test_packing_with_biases_shapes_and_errors():
    mx = mixer(bias=True)
    packed = pack_inference(mx)
    assert set(packed) == {"wvkqgdt.weight", "wvkqgdt.bias", "conv1d.weight", "conv1d.bias",
                           "g_norm_swish_gate.weight", "dt_bias", "A_log_bias", "o_proj.weight", "o_proj.bias"}
    twin = mixer(bias=True, seed=1)
    twin.load_state_dict(unpack_inference(packed, twin))
    u = torch.randn(1, 6, D_MODEL, dtype=F64)
    close(twin(u), mx(u))
    bad = dict(packed)
    bad["wvkqgdt.bias"] = bad["wvkqgdt.bias"].clone()
    bad["wvkqgdt.bias"][-1] = 1.0  # a dt bias the mixer has no place for
    with pytest.raises(CheckpointError, match="g and dt rows"):
        unpack_inference(bad, twin, where="model.safetensors: layers.0.attention")
    with pytest.raises(CheckpointError, match="model.safetensors: .*dt_bias"):
        unpack_inference({**packed, "dt_bias": torch.zeros(5, dtype=F64)}, twin,
                         where="model.safetensors: layers.0.attention")
    # InternLM2-1.8B's layer (d_model 2048, 16 heads, 8 kv heads, head_dim 128): the released [6160, 2048]
    big = MMambaMixer(2048, 16, 8, 128, kernel="torch", device="meta")
    assert pack_inference(big)["wvkqgdt.weight"].shape == (6160, 2048)
