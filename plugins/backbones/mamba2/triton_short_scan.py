"""The SSD scan of a short prompt from an empty state in one Triton kernel (CUDA; needs only triton).

A prompt that fits in one chunk (at most ``MAX_LEN`` tokens, as a T2I caption prefix does) needs none of the
chunked scan's inter-chunk machinery. mamba_ssm's ``mamba_chunk_scan_combined`` still runs five kernels over it
(dt cumsum, C B^T, chunk state, state passing, chunk scan), pads its work to the 256-token chunk, and returns the
final state in float32 for the caller to copy into the cache. Here one program per (batch row, head) computes

    y_i   = sum_{j<=i} exp(cum_i - cum_j) dt_j (C_i . B_j) x_j + D x_i,     cum = cumsum(dt * A)
    state = sum_j exp(cum_last - cum_j) dt_j x_j B_j^T

with dt = softplus(dt_raw + dt_bias) (clamped to dt_limit) and A = -exp(A_log) done in the kernel, and stores
the state straight into the cache in its dtype. Products are rounded as mamba_ssm's are (the decayed C B^T cast
to x's dtype before its product with x).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_step import _softplus

MAX_LEN = 128  # a (L, L) float32 tile a program: 128 is the longest that stays in registers


@triton.jit
def _short_scan_kernel(x_ptr, dt_ptr, dt_bias_ptr, A_log_ptr, B_ptr, C_ptr, D_ptr, y_ptr, st_ptr,
                       seqlen, headdim, dstate, heads_per_group, dt_lo, dt_hi,
                       x_b, x_l, x_h, dt_b, dt_l, B_b, B_l, B_g, C_b, C_l, C_g, y_b, y_l, y_h, s_b, s_h, s_p,
                       BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr,
                       D_HAS_HDIM: tl.constexpr, DT_CLAMP: tl.constexpr, STORE_STATE: tl.constexpr,
                       IEEE: tl.constexpr):
    h0 = tl.program_id(0) * HEADS
    b = tl.program_id(1)
    g = h0 // heads_per_group  # the caller makes all HEADS heads of a program share one group
    offs_l = tl.arange(0, BLOCK_L)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_l = offs_l < seqlen
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask_ln = mask_l[:, None] & mask_n[None, :]
    Bt = tl.load(B_ptr + b * B_b + g * B_g + offs_l[:, None] * B_l + offs_n[None, :], mask=mask_ln, other=0.0)
    Ct = tl.load(C_ptr + b * C_b + g * C_g + offs_l[:, None] * C_l + offs_n[None, :], mask=mask_ln, other=0.0)
    if IEEE:
        cb = tl.dot(Ct, tl.trans(Bt), input_precision="ieee")
    else:
        cb = tl.dot(Ct, tl.trans(Bt))
    causal = (offs_l[:, None] >= offs_l[None, :]) & mask_l[None, :]
    mask_lp = mask_l[:, None] & mask_p[None, :]
    for k in tl.static_range(HEADS):
        h = h0 + k
        dt = tl.load(dt_ptr + b * dt_b + offs_l * dt_l + h, mask=mask_l, other=0.0).to(tl.float32)
        dt = _softplus(dt + tl.load(dt_bias_ptr + h).to(tl.float32))
        if DT_CLAMP:
            dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
        dt = tl.where(mask_l, dt, 0.0)
        A = -tl.exp(tl.load(A_log_ptr + h).to(tl.float32))
        cum = tl.cumsum(dt * A, axis=0)
        # exp of a non-positive exponent only: the masked (j > i) entries are exp(-inf) = 0
        decay = tl.exp(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
        xt = tl.load(x_ptr + b * x_b + h * x_h + offs_l[:, None] * x_l + offs_p[None, :], mask=mask_lp, other=0.0)
        s = (cb * decay * dt[None, :]).to(xt.dtype)
        if IEEE:
            y = tl.dot(s, xt, input_precision="ieee")
        else:
            y = tl.dot(s, xt)
        if D_HAS_HDIM:
            Dv = tl.load(D_ptr + h * headdim + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
        else:
            Dv = tl.load(D_ptr + h).to(tl.float32)
        y += Dv * xt.to(tl.float32)
        tl.store(y_ptr + b * y_b + h * y_h + offs_l[:, None] * y_l + offs_p[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=mask_lp)
        if STORE_STATE:
            last = tl.sum(tl.where(offs_l == seqlen - 1, cum, 0.0), axis=0)
            w = tl.where(mask_l, tl.exp(last - cum) * dt, 0.0)
            xw = (xt.to(tl.float32) * w[:, None]).to(xt.dtype)
            if IEEE:
                st = tl.dot(tl.trans(xw), Bt, input_precision="ieee")
            else:
                st = tl.dot(tl.trans(xw), Bt)
            tl.store(st_ptr + b * s_b + h * s_h + offs_p[:, None] * s_p + offs_n[None, :],
                     st.to(st_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_n[None, :])


def supported(seqlen: int, x: torch.Tensor) -> bool:
    """Whether ``short_scan`` takes a prompt of ``seqlen`` tokens with x of this dtype."""
    return 1 < seqlen <= MAX_LEN and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


# One head a program, 4 warps: at the 1.3B shape, batch 64, 72 tokens, 186 us against 282-589 us for 2-8 heads a
# program sharing one C B^T, and 633 us for the chunked scan with its state copy (benchmarks/bench_kernels.py)
HEADS_PER_PROGRAM = 1


def short_scan(x: torch.Tensor, dt_raw: torch.Tensor, dt_bias: torch.Tensor, A_log: torch.Tensor,
               B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, state_out: torch.Tensor | None,
               dt_limit: tuple[float, float] = (0.0, float("inf")), heads: int | None = None,
               num_warps: int | None = None) -> torch.Tensor:
    """x (b, l, h, p), dt_raw (b, l, h) (before dt_bias and softplus), B and C (b, l, g, n), D (h) or (h, p),
    A_log (h); any of them may be strided views of in_proj's and the conv's outputs. Returns y
    (b, l, h, p) contiguous in x's dtype and, when ``state_out`` (b, h, p, n) is given, writes the final state
    into it (in its dtype), as a scan from a zero state would leave it."""
    b, l, nh, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if not supported(l, x):
        raise ValueError(f"short_scan: takes 2-{MAX_LEN} tokens of float32/float16/bfloat16, got {l} of {x.dtype}")
    # the kernel takes any strides but the last (a conv output in the (B, C, L) layout, transposed, has others)
    x, dt_raw, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, dt_raw, B, C))
    hpg = nh // g
    heads = heads or HEADS_PER_PROGRAM
    if hpg % heads:
        raise ValueError(f"short_scan: heads {heads} a program must divide the {hpg} heads of a group")
    y = torch.empty(b, l, nh, p, device=x.device, dtype=x.dtype)
    st = state_out if state_out is not None else y
    if state_out is not None and (state_out.shape != (b, nh, p, n) or state_out.stride(-1) != 1):
        raise ValueError(f"short_scan: state_out must be ({b}, {nh}, {p}, {n}) with unit last stride, "
                         f"got {tuple(state_out.shape)} strides {state_out.stride()}")
    lo, hi = dt_limit
    block_l = max(16, triton.next_power_of_2(l))
    grid = (nh // heads, b)
    _short_scan_kernel[grid](
        x, dt_raw, dt_bias, A_log, B, C, D.contiguous(), y, st, l, p, n, hpg, float(lo),
        float(hi) if hi != float("inf") else 3.0e38,
        x.stride(0), x.stride(1), x.stride(2), dt_raw.stride(0), dt_raw.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        st.stride(0) if state_out is not None else 0, st.stride(1) if state_out is not None else 0,
        st.stride(2) if state_out is not None else 0,
        BLOCK_L=block_l, BLOCK_P=max(16, triton.next_power_of_2(p)), BLOCK_N=max(16, triton.next_power_of_2(n)),
        HEADS=heads, D_HAS_HDIM=D.dim() == 2, DT_CLAMP=dt_limit != (0.0, float("inf")),
        STORE_STATE=state_out is not None, IEEE=x.dtype == torch.float32,
        num_warps=num_warps or 4)
    return y
