"""A small-batch GEMV for the decode step with its neighbours fused in (Triton, CUDA; the interpreter on CPU).

At batch 1 a decode step of the 1.3B shape reads 2.6 GB of weights but runs about seven kernels a layer, most of them
tiny: launch gaps and the split-K reduction of cuBLAS's GEMV cost as much as the weights. This kernel lets a layer run
in three (``fused_step.py``):

1. in_proj, times the RMSNorm's row scale, with the conv update (and SiLU) of in_proj's xBC columns;
2. the SSM state update with the gated norm short of its row scale (``triton_step.state_update`` with ``z``);
3. out_proj, times the gated norm's row scale, added to the residual stream; it also writes the next layer's
   input to in_proj: the new residual times the next norm's weight, with partial sums of its squares.

Row scales commute with the matrix product, ``W @ (s * v) = s * (W @ v)``, so neither norm needs its own kernel: the
sums of squares come as partial sums from the kernel that produced the values, and the scale multiplies the outputs.

Each program owns BLOCK_N output columns for all M (at most 4) rows: W is read once whatever M is. Products are
accumulated per thread in a (BLOCK_N, BLOCK_K) tile and reduced across K once, after the loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_step import conv4_step

MAX_ROWS = 4  # rows (batch) one call takes; each row has its own accumulator tile


@triton.jit
def _row_output(out, m, pid, offs_n, mask_n, eps, scale_dim, n_partials, out_ptr, o_m, bias_ptr, ss_ptr, ss_m,
                cs_ptr, cw_ptr, cb_ptr, conv_lo, conv_dim, cs_b, cs_c, cw_c,
                res_ptr, res_m, nw_ptr, xn_ptr, xn_m, pn_ptr, pn_m,
                HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, BLOCK_P: tl.constexpr, CONV: tl.constexpr,
                CONV_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, NEXT_NORM: tl.constexpr):
    # row m's BLOCK_N outputs: row scale, bias, then the conv epilogue or the residual epilogue, the stores
    if SCALE:  # rsqrt(mean square + eps) of the row whose partial sums of squares are given
        offs_q = tl.arange(0, BLOCK_P)
        part = tl.load(ss_ptr + m * ss_m + offs_q, mask=offs_q < n_partials, other=0.0)
        out = out * tl.rsqrt(tl.sum(part, axis=0) / scale_dim + eps)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if CONV:
        # columns [conv_lo, conv_lo + conv_dim) are xBC: append to the conv state (d_conv 4, oldest first) and
        # output silu(conv). This program owns these channels: no other program touches their state rows.
        c = offs_n - conv_lo
        is_conv = (c >= 0) & (c < conv_dim) & mask_n
        # an output column may sit in several threads: SYNC orders every load of the state before every store
        v = conv4_step(cs_ptr + m * cs_b + c * cs_c, cw_ptr + c * cw_c, out, is_conv, True)
        if CONV_BIAS:
            v += tl.load(cb_ptr + c, mask=is_conv, other=0.0).to(tl.float32)
        out = tl.where(is_conv, v * tl.sigmoid(v), out)
    if RESIDUAL:
        # residual (float32) += out, in place: this program owns these columns (loads before stores, as above)
        r_ptrs = res_ptr + m * res_m + offs_n
        r = tl.load(r_ptrs, mask=mask_n, other=0.0) + out
        tl.debug_barrier()
        tl.store(r_ptrs, r, mask=mask_n)
        if NEXT_NORM:
            # the next RMSNorm's input short of its row scale; Block normalises the residual in the model's dtype
            rb = r.to(xn_ptr.dtype.element_ty).to(tl.float32)
            nw = tl.load(nw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            tl.store(xn_ptr + m * xn_m + offs_n, (rb * nw).to(xn_ptr.dtype.element_ty), mask=mask_n)
            tl.store(pn_ptr + m * pn_m + pid, tl.sum(tl.where(mask_n, rb * rb, 0.0), axis=0))
    else:
        tl.store(out_ptr + m * o_m + offs_n, out.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, ss_ptr, cs_ptr, cw_ptr, cb_ptr, res_ptr, nw_ptr, xn_ptr, pn_ptr,
                 N, K, eps, scale_dim, n_partials, conv_lo, conv_dim,
                 x_m, w_n, o_m, ss_m, cs_b, cs_c, cw_c, res_m, xn_m, pn_m,
                 M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SCALE: tl.constexpr, BLOCK_P: tl.constexpr, CONV: tl.constexpr, CONV_BIAS: tl.constexpr,
                 RESIDUAL: tl.constexpr, NEXT_NORM: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # one accumulator per row, spelled out: a Triton kernel cannot keep a list of tensors (M is a constant, so the
    # unused rows compile away)
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if M > 1:
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if M > 2:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if M > 3:
        acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(w_ptr + offs_n[:, None] * w_n + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)
        acc0 += w * tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        if M > 1:
            acc1 += w * tl.load(x_ptr + x_m + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        if M > 2:
            acc2 += w * tl.load(x_ptr + 2 * x_m + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        if M > 3:
            acc3 += w * tl.load(x_ptr + 3 * x_m + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
    _row_output(tl.sum(acc0, axis=1), 0, pid, offs_n, mask_n, eps, scale_dim, n_partials, out_ptr, o_m, bias_ptr,
                ss_ptr, ss_m, cs_ptr, cw_ptr, cb_ptr, conv_lo, conv_dim, cs_b, cs_c, cw_c,
                res_ptr, res_m, nw_ptr, xn_ptr, xn_m, pn_ptr, pn_m,
                HAS_BIAS, SCALE, BLOCK_P, CONV, CONV_BIAS, RESIDUAL, NEXT_NORM)
    if M > 1:
        _row_output(tl.sum(acc1, axis=1), 1, pid, offs_n, mask_n, eps, scale_dim, n_partials, out_ptr, o_m,
                    bias_ptr, ss_ptr, ss_m, cs_ptr, cw_ptr, cb_ptr, conv_lo, conv_dim, cs_b, cs_c, cw_c,
                    res_ptr, res_m, nw_ptr, xn_ptr, xn_m, pn_ptr, pn_m,
                    HAS_BIAS, SCALE, BLOCK_P, CONV, CONV_BIAS, RESIDUAL, NEXT_NORM)
    if M > 2:
        _row_output(tl.sum(acc2, axis=1), 2, pid, offs_n, mask_n, eps, scale_dim, n_partials, out_ptr, o_m,
                    bias_ptr, ss_ptr, ss_m, cs_ptr, cw_ptr, cb_ptr, conv_lo, conv_dim, cs_b, cs_c, cw_c,
                    res_ptr, res_m, nw_ptr, xn_ptr, xn_m, pn_ptr, pn_m,
                    HAS_BIAS, SCALE, BLOCK_P, CONV, CONV_BIAS, RESIDUAL, NEXT_NORM)
    if M > 3:
        _row_output(tl.sum(acc3, axis=1), 3, pid, offs_n, mask_n, eps, scale_dim, n_partials, out_ptr, o_m,
                    bias_ptr, ss_ptr, ss_m, cs_ptr, cw_ptr, cb_ptr, conv_lo, conv_dim, cs_b, cs_c, cw_c,
                    res_ptr, res_m, nw_ptr, xn_ptr, xn_m, pn_ptr, pn_m,
                    HAS_BIAS, SCALE, BLOCK_P, CONV, CONV_BIAS, RESIDUAL, NEXT_NORM)


# (block_n, block_k, num_warps) by rows, for in_proj (scale, conv) and out_proj (scale, residual). Fastest at the
# 1.3B shape on an H200 (benchmarks/profile_decode.py --gemv-sweep, which times the alternatives)
IN_PROJ_TILES = {1: (16, 256, 4), 2: (8, 256, 4), 3: (8, 256, 4), 4: (8, 256, 4)}
OUT_PROJ_TILES = {1: (8, 1024, 8), 2: (8, 1024, 8), 3: (8, 512, 8), 4: (8, 512, 8)}


def out_columns_per_program(M: int) -> int:
    """BLOCK_N of the out_proj GEMV for M rows: the residual epilogue writes one partial sum per program."""
    return OUT_PROJ_TILES[M][0]


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         scale: tuple | None = None, conv: tuple | None = None, residual: tuple | None = None,
         tiles: tuple[int, int, int] | None = None) -> torch.Tensor | None:
    """``x (M, K) @ weight (N, K).T (+ bias)`` for M <= MAX_ROWS, in x's dtype, float32 accumulation.

    ``scale = (partials, dim, eps)``: outputs times ``rsqrt(partials.sum(-1) / dim + eps)`` per row, before the bias
    (partials (M, P) float32: sums of squares over column blocks of the product's input).
    ``conv = (conv_state, conv_weight, conv_bias, first)``: output columns ``[first, first + C)`` are shifted into
    ``conv_state`` (M, C, 4) in place and replaced by ``silu(conv)``, as ``triton_step.conv_update`` does.
    ``residual = (stream, next_norm_weight, next_input, next_partials)``: nothing is returned; the outputs are added
    to ``stream`` (M, N) float32 in place, and with ``next_norm_weight`` (N,) the kernel writes ``next_input``
    (M, N) = stream (in x's dtype) * next_norm_weight and ``next_partials`` (M, programs) float32, the partial sums
    of the squares of stream in x's dtype (programs = cdiv(N, out_columns_per_program(M))): what ``scale`` of the
    next in_proj call needs for the next RMSNorm."""
    M, K = x.shape
    N = weight.shape[0]
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"gemv: takes 1 to {MAX_ROWS} rows, got {M}")
    if weight.shape[1] != K or weight.stride(-1) != 1:
        raise ValueError(f"gemv: weight {tuple(weight.shape)} (unit last stride) does not fit x {tuple(x.shape)}")
    if conv is not None and residual is not None:
        raise ValueError("gemv: conv and residual are exclusive")
    if x.stride(-1) != 1:
        x = x.contiguous()
    block_n, block_k, num_warps = tiles or (OUT_PROJ_TILES if residual is not None else IN_PROJ_TILES)[M]
    dummy = x
    out = None if residual is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    ss = cs = cw = cb = res = nw = xn = pn = dummy
    eps, dim, n_partials, block_p = 0.0, 1.0, 0, 1
    ss_m = cs_b = cs_c = cw_c = res_m = xn_m = pn_m = conv_lo = conv_dim = 0
    if scale is not None:
        ss, dim, eps = scale
        ss = ss.contiguous()
        ss_m, n_partials = ss.stride(0), ss.shape[1]
        block_p = triton.next_power_of_2(n_partials)
    if conv is not None:
        cs, cw, cb, conv_lo = conv
        if cs.shape[-1] != 4 or cs.stride(-1) != 1 or cs.shape[0] != M:
            raise ValueError(f"gemv: conv state must be (M, C, 4) with contiguous rows, got {tuple(cs.shape)}")
        conv_dim = cs.shape[1]
        cw = cw.contiguous()
        cs_b, cs_c, cw_c = cs.stride(0), cs.stride(1), cw.stride(0)
        cb = cb if cb is not None else dummy
    grid = (triton.cdiv(N, block_n),)
    if residual is not None:
        res, nw, xn, pn = residual
        if res.dtype != torch.float32 or res.shape != (M, N) or res.stride(-1) != 1:
            raise ValueError("gemv: the residual stream must be (M, N) float32 with a unit last stride")
        res_m = res.stride(0)
        if nw is not None:
            if xn.shape != (M, N) or xn.stride(-1) != 1 or xn.dtype != x.dtype:
                raise ValueError("gemv: next_input must be (M, N) in x's dtype with a unit last stride")
            if pn.shape != (M, grid[0]) or pn.dtype != torch.float32 or pn.stride(-1) != 1:
                raise ValueError(f"gemv: next_partials must be ({M}, {grid[0]}) float32")
            xn_m, pn_m = xn.stride(0), pn.stride(0)
        else:
            nw = xn = pn = dummy
    _gemv_kernel[grid](x, weight, out if out is not None else dummy, bias if bias is not None else dummy, ss, cs, cw,
                       cb, res, nw, xn, pn, N, K, float(eps), float(dim), n_partials, conv_lo, conv_dim,
                       x.stride(0), weight.stride(0), out.stride(0) if out is not None else 0, ss_m, cs_b, cs_c, cw_c,
                       res_m, xn_m, pn_m, M=M, BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
                       SCALE=scale is not None, BLOCK_P=block_p, CONV=conv is not None,
                       CONV_BIAS=conv is not None and conv[2] is not None, RESIDUAL=residual is not None,
                       NEXT_NORM=residual is not None and residual[1] is not None, num_warps=num_warps)
    return out
