"""The Triton kernels written for CUDA (the fused top-k sampler, the one-pass SSM state update with and without the
gated norm, the prefill's causal conv) checked on the CPU with Triton's interpreter (TRITON_INTERPRET=1, in a subprocess, since it is read when
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

    print("ok")
""")


def test_triton_decode_kernels_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
