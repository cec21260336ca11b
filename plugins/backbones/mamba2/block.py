"""A pre-norm residual block (mamba_ssm ``Block``): add -> norm -> mixer [-> add -> norm2 -> gated MLP].

Like mamba_ssm, a block takes and returns (hidden, residual): the residual stream is the running sum and,
with ``residual_in_fp32``, is kept in float32 while the branches run in the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .attention import MHA, AttnContext
from .mixer import Mamba2
from .norm import RMSNorm

# Triton replacements on the chunked training path, on CUDA with mamba_ssm's kernels; each one a name of
# Block.forward's ``fused``: the residual add and pre-norm in one pass (forward and backward), the mixer's gated
# RMSNorm, dt's softplus and bias inside the chunked scan, the task LoRA without a separate scaling pass, and the
# causal conv + SiLU with its backward in in_proj's layout (triton_conv_train.py)
FUSED_OPS = ("add_norm", "gated_norm", "dt_softplus", "lora", "conv")
# what a backbone uses unless told: the ones measured faster on the GPU (benchmarks/NOTES.md); "conv" is not yet
DEFAULT_FUSED_OPS = ("add_norm", "gated_norm", "dt_softplus", "lora")


def fused_here(fused: frozenset[str], h: torch.Tensor, kernel: str) -> bool:
    """Whether the fused kernels run on this call: training forwards (gradients recorded) of more than one position
    on CUDA with mamba_ssm. Inference keeps the paths its own measurements chose (docs/gpu.md)."""
    return bool(fused) and h.shape[1] > 1 and torch.is_grad_enabled() and kernels.use_fast(kernel, h)


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
                in_proj_weight: torch.Tensor | None = None, conv_kernel: bool | None = None,
                fused: frozenset[str] = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
        """``use_kernels``, ``in_proj_weight``, ``conv_kernel``: one-token steps of a Mamba-2 mixer (Mamba2.forward).
        ``fused``: which of FUSED_OPS may run where they apply (several positions on CUDA with mamba_ssm)."""
        fast = fused_here(fused, h, self.mixer_kernel())
        residual, h = self._add_norm(h, residual, self.norm, fast and "add_norm" in fused)
        if isinstance(self.mixer, MHA):
            h = self.mixer(h, cache, ctx)
        elif isinstance(self.mixer, Mamba2):
            h = self.mixer(h, cache, mask, use_kernels, in_proj_weight, conv_kernel, fused if fast else frozenset())
        else:
            h = self.mixer(h, cache, mask, use_kernels, in_proj_weight, conv_kernel)
        if self.mlp is not None:
            residual, h = self._add_norm(h, residual, self.norm2, fast and "add_norm" in fused)
            h = self.mlp(h)
        return h, residual

    def mixer_kernel(self) -> str:
        """The mixer's kernel choice (attention layers: auto), which the block's own kernels follow."""
        return getattr(self.mixer, "kernel", "auto")

    def _add_norm(self, h: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module,
                  fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(the new residual, its normalised value). Fused: one Triton pass, the norm's output in h's dtype (what
        autocast would round it to before the next product anyway)."""
        if not fused:
            residual = self._add(h, residual)
            return residual, norm(residual.to(norm.weight.dtype))
        out, residual = kernels.fast_ops().add_norm(
            h, norm.weight, getattr(norm, "bias", None), residual=residual, prenorm=True,
            residual_in_fp32=self.residual_in_fp32, eps=norm.eps, is_rms_norm=isinstance(norm, RMSNorm))
        return residual, out
