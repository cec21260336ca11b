"""The decode step's two products with their neighbours fused in (Triton, CUDA; the interpreter on CPU).

At batch 1 a decode step of the 1.3B shape reads 2.6 GB of weights but runs about seven kernels a layer, most of them
tiny: launch gaps and the split-K reduction of cuBLAS's GEMV cost as much as the weights. At batch 64 the weights
still dominate the products, and the small kernels around them (conv update, split-K reduction, residual add and
norm) cost about as much again as the products' distance from their bandwidth floor. These kernels let a layer run
in three (``fused_step.py``):

1. in_proj, times the RMSNorm's row scale, with the conv update (and SiLU) of in_proj's xBC columns;
2. the SSM state update with the gated norm short of its row scale (``triton_step.state_update`` with ``z``);
3. out_proj, times the gated norm's row scale, added to the residual stream; it also writes the next layer's
   input to in_proj: the new residual times the next norm's weight, with partial sums of its squares.

Row scales commute with the matrix product, ``W @ (s * v) = s * (W @ v)``, so neither norm needs its own kernel: the
sums of squares come as partial sums from the kernel that produced the values, and the scale multiplies the outputs.

Each program owns BLOCK_N output columns for all M rows, so W is read once whatever M is, and the epilogues see
whole rows of their columns. Up to MAX_ROWS rows a GEMV accumulates products per thread in a (BLOCK_N, BLOCK_K) tile
per row and reduces across K once, after the loop; above, up to MAX_GEMM_ROWS, tl.dot runs on tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_step import conv4_step, pdl_launch, pdl_prologue

MAX_ROWS = 4  # rows (batch) one call takes; each row has its own accumulator tile


@triton.jit
def _tile_output(out, offs_m, mask_m, pid, offs_n, mask_n, BLOCK_N: tl.constexpr, eps, scale_dim, n_partials, out_ptr,
                 o_m, bias_ptr, ss_ptr, ss_m, cs_ptr, cw_ptr, cb_ptr, conv_lo, conv_dim, cs_b, cs_c, cw_c,
                 res_ptr, res_m, nw_ptr, xn_ptr, xn_m, pn_ptr, pn_m,
                 HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, BLOCK_P: tl.constexpr, CONV: tl.constexpr,
                 CONV_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, NEXT_NORM: tl.constexpr):
    # a (rows, BLOCK_N) tile of outputs (one row from the GEMV, all rows from the GEMM): row scale, bias, then the
    # conv epilogue or the residual epilogue, the stores
    rows = offs_m[:, None]
    mask = mask_m[:, None] & mask_n[None, :]
    if SCALE:  # rsqrt(mean square + eps) of each row whose partial sums of squares are given
        # BLOCK_P partials at a time: a (rows, all partials) tile would not fit in registers at 64 rows
        total = offs_m.to(tl.float32) * 0.0
        for q0 in range(0, n_partials, BLOCK_P):
            offs_q = q0 + tl.arange(0, BLOCK_P)
            total += tl.sum(tl.load(ss_ptr + rows * ss_m + offs_q[None, :],
                                    mask=mask_m[:, None] & (offs_q < n_partials)[None, :], other=0.0), axis=1)
        out = out * tl.rsqrt(total / scale_dim + eps)[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if CONV:
        # columns [conv_lo, conv_lo + conv_dim) are xBC: append to the conv state (d_conv 4, oldest first) and
        # output silu(conv). This program owns these channels: no other program touches their state rows.
        first = pid * BLOCK_N
        if (first + BLOCK_N > conv_lo) & (first < conv_lo + conv_dim):  # programs without xBC columns skip it
            c = offs_n - conv_lo
            is_conv_n = (c >= 0) & (c < conv_dim) & mask_n
            is_conv = mask_m[:, None] & is_conv_n[None, :]
            # an output may sit in several threads: SYNC orders every load of the state before every store
            v = conv4_step(cs_ptr + rows * cs_b + c[None, :] * cs_c, cw_ptr + (c * cw_c)[None, :], out, is_conv,
                           is_conv_n[None, :], True)
            if CONV_BIAS:
                v += tl.load(cb_ptr + c, mask=is_conv_n, other=0.0).to(tl.float32)[None, :]
            out = tl.where(is_conv, v * tl.sigmoid(v), out)
    if RESIDUAL:
        # residual (float32) += out, in place: this program owns these columns (loads before stores, as above)
        r_ptrs = res_ptr + rows * res_m + offs_n[None, :]
        r = tl.load(r_ptrs, mask=mask, other=0.0) + out
        tl.debug_barrier()
        tl.store(r_ptrs, r, mask=mask)
        if NEXT_NORM:
            # the next RMSNorm's input short of its row scale; Block normalises the residual in the model's dtype
            rb = r.to(xn_ptr.dtype.element_ty).to(tl.float32)
            nw = tl.load(nw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(xn_ptr + rows * xn_m + offs_n[None, :], (rb * nw).to(xn_ptr.dtype.element_ty), mask=mask)
            tl.store(pn_ptr + offs_m * pn_m + pid, tl.sum(tl.where(mask, rb * rb, 0.0), axis=1), mask=mask_m)
    else:
        tl.store(out_ptr + rows * o_m + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, ss_ptr, cs_ptr, cw_ptr, cb_ptr, res_ptr, nw_ptr, xn_ptr, pn_ptr,
                 N, K, eps, scale_dim, n_partials, conv_lo, conv_dim,
                 x_m, w_n, o_m, ss_m, cs_b, cs_c, cw_c, res_m, xn_m, pn_m,
                 M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SCALE: tl.constexpr, BLOCK_P: tl.constexpr, CONV: tl.constexpr, CONV_BIAS: tl.constexpr,
                 RESIDUAL: tl.constexpr, NEXT_NORM: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
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
    for m in tl.static_range(M):  # each row's outputs as a one-row tile
        if m == 0:
            acc = acc0
        elif m == 1:
            acc = acc1
        elif m == 2:
            acc = acc2
        else:
            acc = acc3
        offs_m = tl.full((1,), m, tl.int32)
        _tile_output(tl.sum(acc, axis=1)[None, :], offs_m, offs_m < M, pid, offs_n, mask_n, BLOCK_N, eps,
                     scale_dim, n_partials, out_ptr, o_m, bias_ptr, ss_ptr, ss_m, cs_ptr, cw_ptr, cb_ptr, conv_lo,
                     conv_dim, cs_b, cs_c, cw_c, res_ptr, res_m, nw_ptr, xn_ptr, xn_m, pn_ptr, pn_m,
                     HAS_BIAS, SCALE, BLOCK_P, CONV, CONV_BIAS, RESIDUAL, NEXT_NORM)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, ss_ptr, cs_ptr, cw_ptr, cb_ptr, res_ptr, nw_ptr, xn_ptr, pn_ptr,
                 M, N, K, eps, scale_dim, n_partials, conv_lo, conv_dim,
                 x_m, w_n, o_m, ss_m, cs_b, cs_c, cw_c, res_m, xn_m, pn_m,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, BLOCK_P: tl.constexpr, CONV: tl.constexpr,
                 CONV_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, NEXT_NORM: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    # all rows (BLOCK_M >= M) and BLOCK_N columns per program, on tensor cores: W is still read once, and each
    # program holds whole rows of its columns, as the epilogues need
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * x_m + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        b = tl.load(w_ptr + offs_n[None, :] * w_n + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :],
                    other=0.0)
        if IEEE:  # float32 weights: no TF32 rounding
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    _tile_output(acc, offs_m, mask_m, pid, offs_n, mask_n, BLOCK_N, eps, scale_dim, n_partials, out_ptr, o_m,
                 bias_ptr, ss_ptr, ss_m, cs_ptr, cw_ptr, cb_ptr, conv_lo, conv_dim, cs_b, cs_c, cw_c,
                 res_ptr, res_m, nw_ptr, xn_ptr, xn_m, pn_ptr, pn_m,
                 HAS_BIAS, SCALE, BLOCK_P, CONV, CONV_BIAS, RESIDUAL, NEXT_NORM)


# GEMV (up to MAX_ROWS rows): (block_n, block_k, num_warps) by rows, for in_proj (scale, conv) and out_proj (scale,
# residual). Fastest at the 1.3B shape on an H200 (benchmarks/profile_decode.py --gemv-sweep times the alternatives)
IN_PROJ_TILES = {1: (16, 256, 4), 2: (8, 256, 4), 3: (8, 256, 4), 4: (8, 256, 4)}
OUT_PROJ_TILES = {1: (8, 1024, 8), 2: (8, 1024, 8), 3: (8, 512, 8), 4: (8, 512, 8)}
# GEMM (above MAX_ROWS, up to MAX_GEMM_ROWS): (block_n, block_k, num_warps, num_stages) by BLOCK_M, the rows
# rounded up to a power of two (at least 16, tl.dot's smallest tile). These are first guesses, not sweep results:
# profile_decode.py --gemm-sweep picks its own for the run (the 2026-12-01 H200 sweep's picks, e.g. in_proj
# (32, 64, 8, 4) at 64 rows, are in benchmarks/NOTES.md); the kernel is off by default (fused_step.MIN_GEMM_BATCH)
MAX_GEMM_ROWS = 128
GEMM_IN_PROJ_TILES = {16: (64, 128, 4, 4), 32: (64, 128, 4, 4), 64: (64, 128, 4, 4), 128: (64, 64, 8, 4)}
GEMM_OUT_PROJ_TILES = {16: (16, 256, 4, 4), 32: (16, 256, 4, 4), 64: (16, 256, 4, 4), 128: (16, 128, 4, 4)}


def gemm_rows(M: int) -> int:
    """BLOCK_M of the tensor-core kernel for M rows."""
    return max(16, triton.next_power_of_2(M))


def tiles_for(M: int, residual: bool) -> tuple:
    """The tiles of the kernel that takes M rows: out_proj's (residual epilogue) or in_proj's."""
    if M <= MAX_ROWS:
        return (OUT_PROJ_TILES if residual else IN_PROJ_TILES)[M]
    return (GEMM_OUT_PROJ_TILES if residual else GEMM_IN_PROJ_TILES)[gemm_rows(M)]


def out_columns_per_program(M: int) -> int:
    """BLOCK_N of the out_proj product for M rows: the residual epilogue writes one partial sum per program."""
    return tiles_for(M, True)[0]


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         scale: tuple | None = None, conv: tuple | None = None, residual: tuple | None = None,
         tiles: tuple | None = None) -> torch.Tensor | None:
    """``x (M, K) @ weight (N, K).T (+ bias)`` for M <= MAX_GEMM_ROWS, in x's dtype, float32 accumulation: the GEMV
    kernel up to MAX_ROWS rows, the tensor-core kernel above (``tiles`` as in the tables above).

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
    if not 1 <= M <= MAX_GEMM_ROWS:
        raise ValueError(f"gemv: takes 1 to {MAX_GEMM_ROWS} rows, got {M}")
    if weight.shape[1] != K or weight.stride(-1) != 1:
        raise ValueError(f"gemv: weight {tuple(weight.shape)} (unit last stride) does not fit x {tuple(x.shape)}")
    if conv is not None and residual is not None:
        raise ValueError("gemv: conv and residual are exclusive")
    if x.stride(-1) != 1:
        x = x.contiguous()
    tiles = tiles or tiles_for(M, residual is not None)
    dummy = x
    out = None if residual is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    ss = cs = cw = cb = res = nw = xn = pn = dummy
    eps, dim, n_partials, block_p = 0.0, 1.0, 0, 1
    ss_m = cs_b = cs_c = cw_c = res_m = xn_m = pn_m = conv_lo = conv_dim = 0
    if scale is not None:
        ss, dim, eps = scale
        ss = ss.contiguous()
        ss_m, n_partials = ss.stride(0), ss.shape[1]
        # all partials in one pass for the GEMV; 4096 values a pass for the tensor-core kernel's rows
        block_p = triton.next_power_of_2(n_partials if M <= MAX_ROWS else min(n_partials, 4096 // gemm_rows(M)))
    if conv is not None:
        cs, cw, cb, conv_lo = conv
        if cs.shape[-1] != 4 or cs.stride(-1) != 1 or cs.shape[0] != M:
            raise ValueError(f"gemv: conv state must be (M, C, 4) with contiguous rows, got {tuple(cs.shape)}")
        conv_dim = cs.shape[1]
        cw = cw.contiguous()
        cs_b, cs_c, cw_c = cs.stride(0), cs.stride(1), cw.stride(0)
        cb = cb if cb is not None else dummy
    grid = (triton.cdiv(N, tiles[0]),)
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
    args = (x, weight, out if out is not None else dummy, bias if bias is not None else dummy, ss, cs, cw, cb, res, nw,
            xn, pn)
    sizes = (N, K, float(eps), float(dim), n_partials, conv_lo, conv_dim)
    strides = (x.stride(0), weight.stride(0), out.stride(0) if out is not None else 0, ss_m, cs_b, cs_c, cw_c, res_m,
               xn_m, pn_m)
    flags = dict(HAS_BIAS=bias is not None, SCALE=scale is not None, BLOCK_P=block_p, CONV=conv is not None,
                 CONV_BIAS=conv is not None and conv[2] is not None, RESIDUAL=residual is not None,
                 NEXT_NORM=residual is not None and residual[1] is not None, **pdl_launch(x))
    if M <= MAX_ROWS:
        block_n, block_k, num_warps = tiles[:3]
        _gemv_kernel[grid](*args, *sizes, *strides, M=M, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                           **flags)
    else:
        block_n, block_k, num_warps, num_stages = tiles
        if x.element_size() > 2:  # the tables are for 16-bit inputs: the same bytes of shared memory a stage
            block_k = max(16, block_k * 2 // x.element_size())
        _gemm_kernel[grid](*args, M, *sizes, *strides, BLOCK_M=gemm_rows(M), BLOCK_N=block_n, BLOCK_K=block_k,
                           IEEE=x.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages, **flags)
    return out
