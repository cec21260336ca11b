"""A pre-norm residual block (mamba_ssm ``Block``): add -> norm -> mixer [-> add -> norm2 -> gated MLP].

Like mamba_ssm, a block takes and returns (hidden, residual): the residual stream is the running sum and,
with ``residual_in_fp32``, is kept in float32 while the branches run in the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MHA, AttnContext
from .norm import RMSNorm


class GatedMLP(nn.Module):
    """mamba_ssm ``GatedMLP``: fc1 -> (y, gate) -> y * silu(gate) -> fc2; hidden rounded up to a multiple of 128."""

    def __init__(self, d_model: int, hidden: int, multiple_of: int = 128, device=None, dtype=None) -> None:
        super().__init__()
        hidden = (hidden + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


def make_norm(d_model: int, rms_norm: bool, eps: float, device=None, dtype=None) -> nn.Module:
    if rms_norm:
        return RMSNorm(d_model, eps=eps, device=device, dtype=dtype)
    return nn.LayerNorm(d_model, eps=eps, device=device, dtype=dtype)


def _residual_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


class Block(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module, mlp: nn.Module | None = None, rms_norm: bool = True,
                 norm_epsilon: float = 1e-5, residual_in_fp32: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.norm = make_norm(d_model, rms_norm, norm_epsilon, device, dtype)
        self.mixer = mixer
        if mlp is not None:
            self.norm2 = make_norm(d_model, rms_norm, norm_epsilon, device, dtype)
            self.mlp = mlp
        else:
            self.mlp = None
        self.lora_layers: list[nn.Module] = []  # peft LoRA layers inside this block (set by lora.py)

    def _add(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        residual = h if residual is None else h + residual
        return residual.to(_residual_dtype(residual)) if self.residual_in_fp32 else residual

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cache=None, mask: torch.Tensor | None = None,
                ctx: AttnContext | None = None, use_kernels: bool | None = None,
                in_proj_weight: torch.Tensor | None = None,
                conv_kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``use_kernels``, ``in_proj_weight``, ``conv_kernel``: one-token steps of a Mamba-2 mixer (Mamba2.forward)."""
        residual = self._add(h, residual)
        h = self.norm(residual.to(self.norm.weight.dtype))
        if isinstance(self.mixer, MHA):
            h = self.mixer(h, cache, ctx)
        else:
            h = self.mixer(h, cache, mask, use_kernels, in_proj_weight, conv_kernel)
        if self.mlp is not None:
            residual = self._add(h, residual)
            h = self.mlp(self.norm2(residual.to(self.norm2.weight.dtype)))
        return h, residual
