"""The training path's causal depthwise conv (d_conv 4) + SiLU in Triton, forward and backward, in in_proj's own
(b, l, dim) layout: no transposes to PyTorch's (b, dim, l) and back, no separate SiLU pass, no causal-conv1d build.

Forward is the prefill kernel (triton_step.causal_conv, from zeros). Backward recomputes the conv's pre-activation
where it needs it rather than saving it: g = dout * silu'(pre); dx[t] = sum_k w[k] g[t + 3 - k]; dw[k] and dbias
are sums over rows of g[t] x[t - 3 + k] and g[t], each program writing its block's partial sums (float32), added
up afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_step import causal_conv

BLOCK_L, BLOCK_C = 32, 128


@triton.jit
def _pre(x_ptr, w_ptr, bias_ptr, b, offs_t, offs_c, mask_c, seqlen, x_b, x_l, w_c, BLOCK_L: tl.constexpr,
         BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The conv's output before SiLU at rows offs_t (zeros before the sequence)."""
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(4):
        pos = offs_t - 3 + k
        inside = (pos >= 0) & (pos < seqlen)
        v = tl.load(x_ptr + b * x_b + pos[:, None] * x_l + offs_c[None, :], mask=inside[:, None] & mask_c[None, :],
                    other=0.0).to(tl.float32)
        acc += v * tl.load(w_ptr + offs_c * w_c + k, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _causal_conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr, seqlen, dim, x_b, x_l, w_c,
                            d_b, d_l, dx_b, dx_l, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                            HAS_BIAS: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_l = tl.program_id(1)
    b = tl.program_id(2)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < dim
    dx = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for j in tl.static_range(4):  # g at rows t + j feeds dx[t] through w[3 - j]
        offs_t = offs_l + j
        inside = offs_t < seqlen
        pre = _pre(x_ptr, w_ptr, bias_ptr, b, offs_t, offs_c, mask_c, seqlen, x_b, x_l, w_c, BLOCK_L, BLOCK_C,
                   HAS_BIAS)
        sig = tl.sigmoid(pre)
        d = tl.load(dout_ptr + b * d_b + offs_t[:, None] * d_l + offs_c[None, :],
                    mask=inside[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        g = d * sig * (1.0 + pre * (1.0 - sig))
        dx += g * tl.load(w_ptr + offs_c * w_c + (3 - j), mask=mask_c, other=0.0).to(tl.float32)[None, :]
        if j == 0:  # this block's own rows: its share of dw and dbias
            part = (b * tl.num_programs(1) + pid_l) * dim
            for k in tl.static_range(4):
                pos = offs_l - 3 + k
                v = tl.load(x_ptr + b * x_b + pos[:, None] * x_l + offs_c[None, :],
                            mask=((pos >= 0) & (pos < seqlen))[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
                tl.store(dw_ptr + (part + offs_c) * 4 + k, tl.sum(g * v, axis=0), mask=mask_c)
            if HAS_BIAS:
                tl.store(db_ptr + part + offs_c, tl.sum(g, axis=0), mask=mask_c)
    tl.store(dx_ptr + b * dx_b + offs_l[:, None] * dx_l + offs_c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=(offs_l < seqlen)[:, None] & mask_c[None, :])


class _CausalConvSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return causal_conv(x, None, weight, bias, silu=True)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        if x.stride(-1) != 1:
            x = x.contiguous()
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        b, l, dim = x.shape
        blocks = triton.cdiv(l, BLOCK_L)
        dx = torch.empty(b, l, dim, dtype=x.dtype, device=x.device)
        dw = torch.empty(b * blocks, dim, 4, dtype=torch.float32, device=x.device)
        db = torch.empty(b * blocks, dim, dtype=torch.float32, device=x.device) if bias is not None else None
        w = weight.contiguous()
        grid = (triton.cdiv(dim, BLOCK_C), blocks, b)
        _causal_conv_bwd_kernel[grid](x, w, bias if bias is not None else w, dout, dx, dw, db if db is not None else dw,
                                      l, dim, x.stride(0), x.stride(1), w.stride(0), dout.stride(0), dout.stride(1),
                                      dx.stride(0), dx.stride(1), BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C,
                                      HAS_BIAS=bias is not None, num_warps=4)
        dw = dw.sum(0).to(weight.dtype)
        db = db.sum(0).to(bias.dtype) if db is not None else None
        return dx, dw, db


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(causal depthwise conv of x (b, l, dim) from zeros), weight (dim, 4); differentiable in x, weight and
    bias. Returns (b, l, dim) contiguous in x's dtype."""
    if weight.shape[-1] != 4:
        raise ValueError(f"causal_conv_silu: needs d_conv 4, got weight {tuple(weight.shape)}")
    return _CausalConvSilu.apply(x, weight, bias)
