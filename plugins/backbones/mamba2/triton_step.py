"""One-pass Triton kernels for the Mamba-2 decode step (CUDA; need only triton, not mamba_ssm): the SSM state
update and the conv-state shift with the depthwise conv.

Per (batch, head) and a block of ``headdim`` rows it reads the state tile once, applies
``state = state * exp(dt * A) + dt * x * B``, writes it back and reduces ``y = state @ C + D * x`` from registers,
so the state crosses memory exactly twice (read + write), which is the floor for this step. At batch 64 and the
1.3B shape, mamba_ssm's ``selective_state_update`` (4-row tiles) reached about 63% of copy bandwidth; the wider
tiles here are meant to close that gap (``benchmarks/profile_decode.py`` measures both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import kernels

try:  # programmatic dependent launch (kernels.pdl_ok is False without these)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """First thing in a kernel launched with PDL: wait until the kernel before has finished and its writes are
    visible, then let the next kernel launch (it waits the same way before reading what this one writes)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def pdl_launch(t: torch.Tensor) -> dict:
    """Launch options and the kernel's PDL flag for a launch over ``t``'s batch rows (dimension 0) on its device."""
    on = kernels.pdl_ok(t.device, t.shape[0])
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def _softplus(v):
    # log(1 + e^v) without overflow and accurate for very negative v (torch.nn.functional.softplus: v above 20
    # is returned as is)
    u = tl.exp(-tl.abs(v))
    log1p = tl.where(u < 1e-4, u * (1.0 - 0.5 * u), tl.log(1.0 + u))
    return tl.where(v > 20.0, v, tl.maximum(v, 0.0) + log1p)


@triton.jit
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr, dt_bias_ptr, dt_lo, dt_hi,
                         z_ptr, nw_ptr, ss_ptr, nheads, headdim, dstate, heads_per_group,
                         s_b, s_h, s_p, x_b, x_h, dt_b, B_b, B_g, C_b, C_g, y_b, y_h, z_b, z_h,
                         D_HAS_HDIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                         DT_SOFTPLUS: tl.constexpr, DT_CLAMP: tl.constexpr, A_LOG: tl.constexpr,
                         GATE: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    g = h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    mask = mask_p[:, None] & mask_n[None, :]
    s_ptrs = state_ptr + b * s_b + h * s_h + offs_p[:, None] * s_p + offs_n[None, :]
    s = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * x_b + h * x_h + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * dt_b + h).to(tl.float32)
    if DT_SOFTPLUS:  # dt straight from in_proj: softplus(dt + dt_bias), clamped to dt_limit
        dt = _softplus(dt + tl.load(dt_bias_ptr + h).to(tl.float32))
        if DT_CLAMP:
            dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    A = tl.load(A_ptr + h).to(tl.float32)
    if A_LOG:  # A given as the parameter A_log: A = -exp(A_log)
        A = -tl.exp(A)
    Bv = tl.load(B_ptr + b * B_b + g * B_g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * C_b + g * C_g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if GATE:  # loaded with the other inputs, not after the state: their latency overlaps the state's
        zv = tl.load(z_ptr + b * z_b + h * z_h + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        nw = tl.load(nw_ptr + h * headdim + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    s = s * tl.exp(dt * A) + (dt * x)[:, None] * Bv[None, :]
    tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(s * Cv[None, :], axis=1)
    if D_HAS_HDIM:
        D = tl.load(D_ptr + h * headdim + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    else:
        D = tl.load(D_ptr + h).to(tl.float32)
    y += x * D
    if GATE:  # the gated RMSNorm's gate and weight, and this tile's share of the row's sum of squares
        y = y * (zv * tl.sigmoid(zv))
        tl.store(ss_ptr + pid_bh * tl.num_programs(0) + pid_p, tl.sum(tl.where(mask_p, y * y, 0.0), axis=0))
        y = y * nw
    tl.store(y_ptr + b * y_b + h * y_h + offs_p, y.to(y_ptr.dtype.element_ty), mask=mask_p)


STATE_BLOCK_P = 32  # rows of headdim per program of the state update (tile sweep below)


def state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor, block_p: int = STATE_BLOCK_P, num_warps: int = 4,
                 dt_bias: torch.Tensor | None = None, dt_limit: tuple[float, float] = (0.0, float("inf")),
                 a_is_log: bool = False, z: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None):
    """state (b, h, p, n) updated in place (last dim contiguous); x (b, h, p), dt (b, h), A (h,), B/C (b, g, n),
    D (h,) or (h, p) -> y (b, h, p) in x's dtype. Same result as ``ssd.ssd_step``. Tiles (``--sweep`` of
    benchmarks/profile_decode.py, H100, batch 64, 1.3B shape, in a CUDA graph): 32 rows x 4 warps 47.8 us, 94% of
    copy bandwidth; 16 x 4 49.5 us.

    With ``dt_bias`` the kernel takes dt as in_proj gives it and applies softplus(dt + dt_bias) clamped to
    ``dt_limit`` itself; with ``a_is_log`` A is the parameter A_log (A = -exp(A_log)). Each saves the decode step
    an element-wise kernel per layer (~1.3 us at batch 64 at the 1.3B shape).

    With ``z`` (b, h, p) and ``norm_weight`` (h * p,) it also does the gated RMSNorm (one group) except for its
    per-row scale: returns (g, sumsq) with g = y * silu(z) * norm_weight and sumsq (b, k) float32 partial sums of
    (y * silu(z))^2 whose row sums give the scale rsqrt(sum / (h * p) + eps). The scale commutes with out_proj, so
    the caller applies it after that product, where it fuses with the next residual add (``kernels.norm_scale``)."""
    b, h, p, n = state.shape
    g = B.shape[1]
    if state.stride(-1) != 1:
        raise ValueError("state_update: the state's last dimension must be contiguous")
    # x, B and C are slices of the conv output: strided rows are fine, only the last dimension must be unit-stride
    # (copying them cost three extra kernels per layer, about 7 us at batch 64)
    x, B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, B, C))
    # dt may be the strided last columns of in_proj's output: only its head dimension must be unit-stride
    dt = dt if dt.stride(-1) == 1 else dt.contiguous()
    A, D = A.contiguous(), D.contiguous()
    if dt_bias is not None:
        dt_bias = dt_bias.contiguous()
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    clamp = dt_bias is not None and (lo, hi) != (0.0, float("inf"))
    gate = z is not None
    if gate:
        if norm_weight is None or norm_weight.numel() != h * p:
            raise ValueError("state_update: z needs norm_weight of h * p elements (one norm group)")
        z = z if z.stride(-1) == 1 else z.contiguous()
        norm_weight = norm_weight.contiguous()
    y = torch.empty_like(x)
    block_n = triton.next_power_of_2(n)
    grid = (triton.cdiv(p, block_p), b * h)
    sumsq = torch.empty(b, h * grid[0], device=x.device, dtype=torch.float32) if gate else y
    _state_update_kernel[grid](state, x, dt, A, B, C, D, y, dt_bias if dt_bias is not None else A,
                               lo, hi if hi != float("inf") else 3.0e38, z if gate else x,
                               norm_weight if gate else A, sumsq, h, p, n, h // g,
                               state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1),
                               dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
                               y.stride(0), y.stride(1), z.stride(0) if gate else 0, z.stride(1) if gate else 0,
                               D_HAS_HDIM=D.dim() == 2, BLOCK_P=block_p,
                               BLOCK_N=block_n, DT_SOFTPLUS=dt_bias is not None, DT_CLAMP=clamp,
                               A_LOG=a_is_log, GATE=gate, num_warps=num_warps, **pdl_launch(x))
    return (y, sumsq) if gate else y



@triton.jit
def conv4_step(row, w, new, mask, w_mask, SYNC: tl.constexpr):
    """One decode step of a depthwise conv with d_conv 4 (also used by triton_gemv): ``row`` points at state rows
    (the last 4 inputs, oldest first), ``w`` at the matching weight rows (``w_mask`` its mask; it may be a row of
    the tile, broadcast: one load a channel); shifts ``new`` in and returns the conv (float32, no bias). SYNC: a
    barrier between the loads and the stores, for layouts where an element sits in several threads (one thread's
    store must not overtake another's load)."""
    c1 = tl.load(row + 1, mask=mask, other=0.0)
    c2 = tl.load(row + 2, mask=mask, other=0.0)
    c3 = tl.load(row + 3, mask=mask, other=0.0)
    new = new.to(c1.dtype)  # the state keeps its own dtype, as the PyTorch step does
    if SYNC:
        tl.debug_barrier()
    tl.store(row, c1, mask=mask)
    tl.store(row + 1, c2, mask=mask)
    tl.store(row + 2, c3, mask=mask)
    tl.store(row + 3, new, mask=mask)
    return (c1.to(tl.float32) * tl.load(w, mask=w_mask, other=0.0).to(tl.float32)
            + c2.to(tl.float32) * tl.load(w + 1, mask=w_mask, other=0.0).to(tl.float32)
            + c3.to(tl.float32) * tl.load(w + 2, mask=w_mask, other=0.0).to(tl.float32)
            + new.to(tl.float32) * tl.load(w + 3, mask=w_mask, other=0.0).to(tl.float32))


@triton.jit
def _conv_update_kernel(state_ptr, x_ptr, w_ptr, bias_ptr, out_ptr, dim, s_b, s_c, x_b, w_c, o_b,
                        BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    # d_conv 4, state rows contiguous. Each row is read once and written once, by one thread (BLOCK_C is at least
    # the number of threads, so no element is replicated across threads), its loads before its stores
    pid_c = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < dim
    x = tl.load(x_ptr + b * x_b + offs_c, mask=mask_c, other=0.0)
    out = conv4_step(state_ptr + b * s_b + offs_c * s_c, w_ptr + offs_c * w_c, x, mask_c, mask_c, False)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    if SILU:
        out = out * tl.sigmoid(out)
    tl.store(out_ptr + b * o_b + offs_c, out.to(out_ptr.dtype.element_ty), mask=mask_c)


def conv_update_supported(state: torch.Tensor) -> bool:
    """The kernel handles d_conv 4 (Mamba-2's) with rows of the state contiguous."""
    return state.shape[-1] == 4 and state.stride(-1) == 1


def conv_update(state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                silu: bool = True, block_c: int = 128, num_warps: int = 4) -> torch.Tensor:
    """state (b, dim, 4) (the last 4 conv inputs, oldest first) shifted left in place with x (b, dim) appended
    (cast to the state's dtype); returns silu(sum(state * weight, -1) + bias) (b, dim) in x's dtype, contiguous;
    weight (dim, 4) with unit last stride. One read and one write of the state (the PyTorch version materialises
    the shifted window, copies it back and reads it again for the conv). Tiles: benchmarks/profile_decode.py --sweep
    (128 x 4 warps: 4.2 us at batch 64, 1.8 us at batch 1 on the H100, inside a CUDA graph)."""
    b, dim, d_conv = state.shape
    if block_c < 32 * num_warps:  # replicated elements would let one thread's store overtake another's load
        raise ValueError(f"conv_update: block_c {block_c} must be at least 32 * num_warps ({32 * num_warps})")
    if not conv_update_supported(state):
        raise ValueError(f"conv_update: needs d_conv 4 and contiguous state rows, got {tuple(state.shape)} "
                         f"strides {state.stride()}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(dim, block_c), b)
    _conv_update_kernel[grid](state, x, weight, bias if bias is not None else weight, out, dim, state.stride(0),
                              state.stride(1), x.stride(0), weight.stride(0), out.stride(0), BLOCK_C=block_c,
                              HAS_BIAS=bias is not None, SILU=silu, num_warps=num_warps, **pdl_launch(x))
    return out


@triton.jit
def _causal_conv_kernel(x_ptr, state_ptr, w_ptr, bias_ptr, out_ptr, seqlen, dim, x_b, x_l, s_b, s_c, w_c, o_b, o_l,
                        BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, HAS_STATE: tl.constexpr,
                        HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    # d_conv 4: out[t] = sum_k w[k] * in[t - 3 + k], where in[t] for t < 0 is the conv state's column 4 + t.
    # Only reads the state: the caller refills it after this kernel, so no program can see a half-written state
    pid_c = tl.program_id(0)
    pid_l = tl.program_id(1)
    b = tl.program_id(2)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < dim
    acc = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(4):
        pos = offs_l - 3 + k
        inside = (pos >= 0) & (pos < seqlen)
        v = tl.load(x_ptr + b * x_b + pos[:, None] * x_l + offs_c[None, :],
                    mask=inside[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        if HAS_STATE:
            before = (pos < 0) & (offs_l < seqlen)
            v += tl.load(state_ptr + b * s_b + offs_c[None, :] * s_c + (4 + pos)[:, None],
                         mask=before[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        acc += v * tl.load(w_ptr + offs_c * w_c + k, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + b * o_b + offs_l[:, None] * o_l + offs_c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_l < seqlen)[:, None] & mask_c[None, :])


def causal_conv(x: torch.Tensor, state: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                silu: bool = True, block_l: int = 32, block_c: int = 128, num_warps: int = 4) -> torch.Tensor:
    """Causal depthwise conv (d_conv 4) + SiLU over x (b, l, dim) in its own layout (rows may be strided, the
    channel dimension must be unit-stride, as a slice of in_proj's output is), continuing from ``state``
    (b, dim, 4), the previous 4 inputs oldest first (None: zeros). Returns (b, l, dim) contiguous in x's dtype.
    The state is only read; the caller refills it. Replaces the prefill's transpose, concatenation with the conv
    state, PyTorch depthwise conv and SiLU (benchmarks/NOTES.md, "2026-12-01, H200: Triton prefill conv")."""
    b, l, dim = x.shape
    if weight.shape[-1] != 4:
        raise ValueError(f"causal_conv: needs d_conv 4, got weight {tuple(weight.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if state is not None and state.stride(-1) != 1:
        state = state.contiguous()
    out = torch.empty(b, l, dim, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(dim, block_c), triton.cdiv(l, block_l), b)
    _causal_conv_kernel[grid](x, state if state is not None else x, weight, bias if bias is not None else weight,
                              out, l, dim, x.stride(0), x.stride(1),
                              state.stride(0) if state is not None else 0, state.stride(1) if state is not None else 0,
                              weight.stride(0), out.stride(0), out.stride(1), BLOCK_L=block_l, BLOCK_C=block_c,
                              HAS_STATE=state is not None, HAS_BIAS=bias is not None, SILU=silu,
                              num_warps=num_warps)
    return out
