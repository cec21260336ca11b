"""The Triton kernels written for CUDA (the fused top-k sampler, the one-pass SSM state update with and without the
gated norm, the prefill's causal conv and short scan) checked on the CPU with Triton's interpreter (TRITON_INTERPRET=1, in a subprocess, since it is read when
kernels are defined)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

SCRIPT = textwrap.dedent("""
    import torch
    from omnicore.generation import triton_sampling
    from omnicore.generation.sampling import Sampling, pick_token

    torch.manual_seed(0)
    # sampler: the same token as pick_token for the same noise, guided too, ties and -0.0 in the row
    B, V, k = 4, 700, 37
    x = torch.randn(B, V) * 3
    x[0, :50] = x[0, 0]
    x[1, :40] = -0.0
    x[1, 40:80] = 0.0
    u, n = torch.randn(B, V), torch.rand(B, V)
    for T, kk in [(0.7, k), (1.0, 1), (1.3, None)]:
        s = Sampling(temperature=T, top_k=kk)
        assert torch.equal(triton_sampling.topk_gumbel(x, n, T, kk), pick_token(x, s, n))
        assert torch.equal(triton_sampling.topk_gumbel(x, n, T, kk, u, 3.0), pick_token(u + 3.0 * (x - u), s, n))
    # the kept set is exactly pick_token's (a huge Gumbel draw at j returns j exactly when j is kept)
    row = torch.rand(V) * 2 - 1
    row[:30] = torch.topk(row, k).values[-1]
    noise = torch.full((V, V), 1e-30)
    noise.fill_diagonal_(1 - 2 ** -24)
    kept = triton_sampling.topk_gumbel(row[None].expand(V, V).contiguous(), noise, 1.0, k) == torch.arange(V)
    assert torch.equal(kept, ~(row < torch.topk(row, k).values[-1]))

    # state update: plain, and with dt's softplus (+ dt_limit clamp) and A = -exp(A_log) done in the kernel, against
    # the PyTorch step in float64; dt given as the strided last columns of a wider in_proj output
    import torch.nn.functional as F
    from omnicore.plugins.backbones.mamba2 import triton_step
    from omnicore.plugins.backbones.mamba2.ssd import ssd_step
    b, h, p, n, g = 3, 4, 8, 16, 2
    state = torch.randn(b, h, p, n)
    x, B_, C_ = torch.randn(b, h, p), torch.randn(b, g, n), torch.randn(b, g, n)
    wide = torch.randn(b, 40)
    dt_raw, dt_bias = wide[:, -h:], torch.tensor([-30.0, -4.0, 0.5, 25.0])
    A_log, D = torch.randn(h), torch.randn(h)
    for limit in [(0.0, float("inf")), (1e-3, 0.5)]:
        dt = F.softplus(dt_raw.double() + dt_bias.double()).clamp(*limit)
        A = -torch.exp(A_log.double())
        ref_state = state.double()
        ref_y = ssd_step(ref_state, x.double(), dt, A, B_.double(), C_.double(), D.double())
        for fused in (False, True):
            st = state.clone()
            if fused:
                y = triton_step.state_update(st, x, dt_raw, A_log, B_, C_, D, block_p=4, dt_bias=dt_bias,
                                             dt_limit=limit, a_is_log=True)
            else:
                y = triton_step.state_update(st, x, dt.float(), A.float(), B_, C_, D, block_p=4)
            assert torch.allclose(y.double(), ref_y, rtol=1e-4, atol=1e-4), (limit, fused)
            assert torch.allclose(st.double(), ref_state, rtol=1e-4, atol=1e-4), (limit, fused)

    # the gated RMSNorm folded into the state update: g * rstd(row sums of the partial sums) is the mixer's norm
    from omnicore.plugins.backbones.mamba2 import kernels
    from omnicore.plugins.backbones.mamba2.norm import RMSNormGated
    z, nw = torch.randn(b, h, p), torch.rand(h * p) + 0.5
    norm = RMSNormGated(h * p, eps=1e-5).double()
    norm.weight.data.copy_(nw)
    dt = F.softplus(dt_raw.double() + dt_bias.double())
    ref_state = state.double()
    ref = norm(ssd_step(ref_state, x.double(), dt, -torch.exp(A_log.double()), B_.double(), C_.double(),
                        D.double()).reshape(b, -1), z.double().reshape(b, -1))
    st = state.clone()
    g, sumsq = triton_step.state_update(st, x, dt_raw, A_log, B_, C_, D, block_p=4, dt_bias=dt_bias, a_is_log=True,
                                        z=z, norm_weight=nw)
    assert sumsq.shape == (b, h * 2) and sumsq.dtype == torch.float32
    got = g.double().reshape(b, -1) * kernels.norm_scale(sumsq, h * p, 1e-5).double()[:, 0]
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.allclose(st.double(), ref_state, rtol=1e-4, atol=1e-4)

    # prefill causal conv: the (B, L, C) layout read from a strided slice of a wider in_proj output, continuing
    # from a conv state (or from zeros), against the PyTorch conv over the concatenated window; lengths below d_conv,
    # across tiles, and a channel count that is not a multiple of the tile
    dim = 150
    w_, bias_ = torch.randn(dim, 4), torch.randn(dim)
    for l in (1, 3, 7, 45):
        wide = torch.randn(2, l, dim + 30)
        xs = wide[..., 10:10 + dim]
        cstate = torch.randn(2, dim, 4)
        for st in (cstate, None):
            full = torch.cat([torch.zeros(2, dim, 4) if st is None else st, xs.transpose(1, 2)], dim=-1)
            ref = F.silu(F.conv1d(full[..., 1:].double(), w_[:, None].double(), bias_.double(), groups=dim))
            got = triton_step.causal_conv(xs, st, w_, bias_, block_l=16, block_c=64)
            assert got.shape == (2, l, dim) and got.is_contiguous()
            assert torch.allclose(got.double(), ref.transpose(1, 2), rtol=1e-4, atol=1e-4), (l, st is None)
        assert torch.equal(cstate, cstate.clone())  # only read

    # the prefill's one-kernel short scan against the chunked PyTorch scan in float64: strided views of one wide
    # tensor (as in_proj's and the conv's outputs), dt's softplus (+ clamp) in the kernel, 1 and 2 groups, D per head
    # and per channel, several heads a program, the final state written over whatever the cache held
    from omnicore.plugins.backbones.mamba2 import triton_short_scan
    from omnicore.plugins.backbones.mamba2.ssd import ssd_chunked
    for (b, l, h, p, n, g, per_channel, limit, heads) in [(2, 13, 4, 8, 16, 2, False, (0.0, float("inf")), None),
                                                         (3, 37, 4, 16, 8, 1, True, (1e-3, 0.5), 2),
                                                         (1, 2, 2, 4, 4, 1, False, (0.0, float("inf")), 2)]:
        wide = torch.randn(b, l, h * p + 2 * g * n + 5 + h)
        x = wide[..., :h * p].reshape(b, l, h, p)
        B_ = wide[..., h * p:h * p + g * n].reshape(b, l, g, n)
        C_ = wide[..., h * p + g * n:h * p + 2 * g * n].reshape(b, l, g, n)
        dt_raw, dt_bias, A_log = wide[..., -h:], torch.randn(h), torch.randn(h)
        D = torch.randn(h, p) if per_channel else torch.randn(h)
        dt = F.softplus(dt_raw.double() + dt_bias.double()).clamp(*limit)
        y_ref, s_ref = ssd_chunked(x.double(), dt, -torch.exp(A_log.double()), B_.double(), C_.double(), 8,
                                   D=D.double())
        st = torch.full((b, h, p, n), 7.0)
        y = triton_short_scan.short_scan(x, dt_raw, dt_bias, A_log, B_, C_, D, st, dt_limit=limit, heads=heads)
        assert torch.allclose(y.double(), y_ref, rtol=1e-4, atol=1e-4), (b, l, h)
        assert torch.allclose(st.double(), s_ref, rtol=1e-4, atol=1e-4), (b, l, h)
        assert torch.equal(triton_short_scan.short_scan(x, dt_raw, dt_bias, A_log, B_, C_, D, None,
                                                        dt_limit=limit), y)
        if limit[0] > 0:  # checked to fail: without the clamp the outputs differ
            y = triton_short_scan.short_scan(x, dt_raw, dt_bias, A_log, B_, C_, D, None)
            assert not torch.allclose(y.double(), y_ref, rtol=1e-4, atol=1e-4)

    print("ok")
""")


def test_triton_decode_kernels_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


FUSED_STEP_SCRIPT = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from omnicore.plugins.backbones.mamba2 import fused_step, triton_gemv, triton_step
    from omnicore.plugins.backbones.mamba2.backbone import Mamba2Backbone
    from omnicore.plugins.backbones.mamba2.norm import RMSNorm

    torch.manual_seed(0)
    tol = dict(rtol=1e-4, atol=1e-4)
    # the products against x @ W.T: the GEMV at 1-4 rows, the tensor-core kernel at 5 and 17 (row tiles of 16 and
    # 32, partly masked), N and K off the tiles, several K blocks, a strided x, a bias
    N, K = 75, 52
    W, bias = torch.randn(N, K), torch.randn(N)
    for M in (1, 2, 3, 4, 5, 17):
        x = torch.randn(M, K + 6)[:, 3:3 + K]
        small, large = ((16, 16, 1), (32, 64, 2)) if M <= 4 else ((16, 16, 1, 1), (32, 64, 2, 2))
        for tiles in (small, large):
            assert torch.allclose(triton_gemv.gemv(x, W, tiles=tiles), x @ W.T, **tol), (M, tiles)
        assert torch.allclose(triton_gemv.gemv(x, W, bias, tiles=small), x @ W.T + bias, **tol)
        # residual epilogue: stream += x @ W.T in place; the next norm's input (stream * weight) and the partial
        # sums of the stream's squares over the column blocks
        Wr = torch.randn(40, K)
        stream, nw = torch.randn(M, 40), torch.rand(40) + 0.5
        want = stream + x @ Wr.T
        nxt, parts = torch.full((M, 40), float("nan")), torch.full((M, 3), float("nan"))
        assert triton_gemv.gemv(x, Wr, residual=(stream, nw, nxt, parts), tiles=small) is None
        assert torch.allclose(stream, want, **tol) and torch.allclose(nxt, want * nw, **tol)
        assert torch.allclose(parts.sum(-1), (want * want).sum(-1), **tol) and parts.shape == (M, 3)
        assert torch.allclose(parts[:, 0], (want[:, :16] ** 2).sum(-1), **tol)
        with __import__("pytest").raises(ValueError, match="next_partials"):
            triton_gemv.gemv(x, Wr, residual=(stream, nw, nxt, parts[:, :2]), tiles=small)
        # scale: each row times rsqrt(sum of its partial sums / dim + eps); 300 partials take the tensor-core
        # kernel more than one pass
        parts = torch.rand(M, 300) / 60
        want = (x @ W.T) * torch.rsqrt(parts.sum(-1, keepdim=True) / 40.0 + 1e-5)
        assert torch.allclose(triton_gemv.gemv(x, W, scale=(parts, 40, 1e-5), tiles=small), want, **tol)
        # conv epilogue on output columns [20, 60): the state shifted as conv_update shifts it, silu(conv) out
        cs, cw, cb = torch.randn(M, 40, 4), torch.randn(40, 4), torch.randn(40)
        plain = x @ W.T
        ref_state = torch.cat([cs[..., 1:], plain[:, 20:60, None]], -1)
        ref_conv = F.silu((ref_state * cw).sum(-1) + cb)
        one_pass = cs.clone()  # the decode step's conv kernel, against the same PyTorch reference
        assert torch.allclose(triton_step.conv_update(one_pass, plain[:, 20:60].contiguous(), cw, cb), ref_conv, **tol)
        assert torch.allclose(one_pass, ref_state, **tol)
        got_state = cs.clone()
        got = triton_gemv.gemv(x, W, conv=(got_state, cw, cb, 20), tiles=small)
        assert torch.allclose(got_state, ref_state, **tol), M
        assert torch.allclose(got[:, 20:60], ref_conv, **tol), M
        assert torch.allclose(got[:, :20], plain[:, :20], **tol) and torch.allclose(got[:, 60:], plain[:, 60:], **tol)
        # checked to fail: the conv columns offset by one
        bad_state = cs.clone()
        bad = triton_gemv.gemv(x, W, conv=(bad_state, cw, cb, 21), tiles=small)
        assert not torch.allclose(bad[:, 20:60], ref_conv, **tol)

    # the whole fused step against the backbone's PyTorch step: task LoRA (merged), three tokens after a prefill,
    # outputs and both caches of every layer
    bb = Mamba2Backbone(64, 3, ssm_cfg=dict(d_state=16, headdim=16, chunk_size=8, dt_limit=(0.0, 0.5)))
    bb.add_task_adapters(("mmu", "t2i"), r=4, alpha=8, dropout=0.0)
    for name, p in bb.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    bb.eval()
    for batch in (1, 3, 5):
        ref_state, got_state = (bb.allocate_inference_state(batch, 32) for _ in range(2))
        prompt = torch.randn(batch, 5, 64)
        with torch.no_grad():
            bb(prompt, "t2i", ref_state)
            bb(prompt, "t2i", got_state)
            weights = fused_step.layer_weights(bb, "t2i")
            assert weights is not None
            for t in range(3):
                h = torch.randn(batch, 1, 64)
                want = bb(h, "t2i", ref_state)
                got = fused_step.step(bb, h, got_state, weights)
                assert torch.allclose(got, want, **tol), (batch, t, (got - want).abs().max())
        for a, c in zip(ref_state.layers, got_state.layers):
            assert torch.allclose(a.conv_state, c.conv_state, **tol) and torch.allclose(a.ssm_state, c.ssm_state, **tol)
        # the merged adapter matters: the mmu weights give other outputs
        assert not torch.allclose(fused_step.layer_weights(bb, "mmu")[0][0], weights[0][0])
    print("ok")
""")


def test_fused_small_batch_step_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", FUSED_STEP_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


TRAIN_CONV_SCRIPT = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from omnicore.plugins.backbones.mamba2.triton_conv_train import causal_conv_silu

    torch.manual_seed(0)
    # forward and every gradient against PyTorch's conv + SiLU: a strided slice of a wider in_proj output, lengths
    # below d_conv and across tiles, a channel count that is not a multiple of the tile, with and without a bias
    dim = 150
    for l, with_bias in ((2, True), (45, True), (70, False)):
        wide = torch.randn(2, l, dim + 30, dtype=torch.float64)
        w = torch.randn(dim, 4, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(dim, dtype=torch.float64, requires_grad=True) if with_bias else None
        dout = torch.randn(2, l, dim, dtype=torch.float64)
        outs = []
        for kernel in (False, True):
            src = wide.clone().requires_grad_(True)
            x = src[..., 10:10 + dim]
            if kernel:
                y = causal_conv_silu(x.float(), w.float(), None if bias is None else bias.float()).double()
            else:
                y = F.silu(F.conv1d(x.transpose(1, 2), w[:, None], bias, padding=3, groups=dim)[..., :l]).transpose(1, 2)
            params = [src, w] + ([bias] if bias is not None else [])
            outs.append([y.detach()] + list(torch.autograd.grad(y, params, dout)))
        for name, a, b in zip(["out", "dx", "dw", "dbias"], outs[1], outs[0]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (l, name, float((a - b).abs().max()))
    print("ok")
""")


def test_training_conv_forward_and_backward_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", TRAIN_CONV_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
