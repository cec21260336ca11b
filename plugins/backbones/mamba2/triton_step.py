"""A one-pass Triton kernel for the Mamba-2 decode state update (CUDA; needs only triton, not mamba_ssm).

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


@triton.jit
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, y_ptr,
                         nheads, headdim, dstate, heads_per_group,
                         s_b, s_h, s_p, x_b, x_h, dt_b, B_b, B_g, C_b, C_g, y_b, y_h,
                         D_HAS_HDIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
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
    A = tl.load(A_ptr + h).to(tl.float32)
    Bv = tl.load(B_ptr + b * B_b + g * B_g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * C_b + g * C_g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    s = s * tl.exp(dt * A) + (dt * x)[:, None] * Bv[None, :]
    tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(s * Cv[None, :], axis=1)
    if D_HAS_HDIM:
        D = tl.load(D_ptr + h * headdim + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    else:
        D = tl.load(D_ptr + h).to(tl.float32)
    y += x * D
    tl.store(y_ptr + b * y_b + h * y_h + offs_p, y.to(y_ptr.dtype.element_ty), mask=mask_p)


def state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor, block_p: int = 16, num_warps: int = 4) -> torch.Tensor:
    """state (b, h, p, n) updated in place (last dim contiguous); x (b, h, p), dt (b, h), A (h,), B/C (b, g, n),
    D (h,) or (h, p) -> y (b, h, p) in x's dtype. Same result as ``ssd.ssd_step``."""
    b, h, p, n = state.shape
    g = B.shape[1]
    if state.stride(-1) != 1:
        raise ValueError("state_update: the state's last dimension must be contiguous")
    x, B, C = x.contiguous(), B.contiguous(), C.contiguous()
    dt, A, D = dt.contiguous(), A.contiguous(), D.contiguous()
    y = torch.empty_like(x)
    block_n = triton.next_power_of_2(n)
    grid = (triton.cdiv(p, block_p), b * h)
    _state_update_kernel[grid](state, x, dt, A, B, C, D, y, h, p, n, h // g,
                               state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1),
                               dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
                               y.stride(0), y.stride(1), D_HAS_HDIM=D.dim() == 2, BLOCK_P=block_p,
                               BLOCK_N=block_n, num_warps=num_warps)
    return y
