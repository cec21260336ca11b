"""RMSNorm and the gated RMSNorm of the Mamba-2 mixer (computed in float32, returned in the weight's dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        return (_rms(x.to(ct), self.eps) * self.weight.to(ct)).to(self.weight.dtype)


class RMSNormGated(nn.Module):
    """``norm(x * silu(z))`` (``norm_before_gate=False``, as Mamba-2) or ``norm(x) * silu(z)``; RMS taken over
    groups of ``group_size`` channels (Mamba-2: d_inner // ngroups)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        x = x.to(ct)
        gate = F.silu(z.to(ct)) if z is not None else None
        if gate is not None and not self.norm_before_gate:
            x = x * gate
        shape = x.shape
        x = _rms(x.reshape(*shape[:-1], -1, self.group_size), self.eps).reshape(shape) * self.weight.to(ct)
        if gate is not None and self.norm_before_gate:
            x = x * gate
        return x.to(self.weight.dtype)
