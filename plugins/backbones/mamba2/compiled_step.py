"""The one-token decode step of a Mamba-2 block, compiled with torch.compile (CUDA only).

Eager decoding launches about 35 small kernels per layer (norms, dt, conv shift, gating, LoRA, casts), so at
the 1.3B shape a step is bound by launches, not by the 2.6 GB of weights it reads. Compiled, each block fuses
into a handful of kernels around its matrix products. One compiled function serves every layer: since torch
2.5 a module's parameters are graph inputs (``inline_inbuilt_nn_modules``), so identical blocks share the code.
The step must run before CUDA-graph capture (the decode engine's warm-up does that), as compilation cannot
happen inside a capture.
"""

from __future__ import annotations

import os
import warnings

import torch

from . import kernels
from .state import MambaCache

# The one-pass Triton state update from this batch on; below it Inductor fuses the PyTorch update. Since dt/A
# moved into the kernel it wins at batch 1 too: 1.821 -> 1.535 ms a step (H200, 1.3B shape)
KERNEL_MIN_BATCH = 1
CONV_KERNEL_MIN_BATCH = 1  # the one-pass conv update (kernels.conv_update) from this batch on
_compiled: dict = {}  # the compiled step, by whether its Inductor kernels launch with PDL (kernels.pdl_ok)
_failed: str | None = None


def _block_step(block, h: torch.Tensor, residual: torch.Tensor | None, conv_state: torch.Tensor,
                ssm_state: torch.Tensor, use_kernels: bool, in_proj_weight: torch.Tensor | None, conv_kernel: bool,
                pending: tuple | None, fold: bool):
    # with use_kernels, the one-pass state update runs as an opaque custom op (kernels.state_update); without,
    # Inductor fuses the PyTorch state update itself. conv_kernel: the same for the conv-state shift + conv.
    # in_proj_weight: the task's merged LoRA weight (one matrix product instead of three), a graph input.
    # pending: the previous block's folded gated norm (partial sums, width, eps): its row scale multiplies h here,
    # inside this block's residual add + norm kernel. fold: this block's mixer leaves its own scale pending.
    h = apply_pending(h, pending)
    cache = MambaCache(conv_state, ssm_state)
    if not fold:
        h, residual = block(h, residual, cache, None, None, use_kernels=use_kernels, in_proj_weight=in_proj_weight,
                            conv_kernel=conv_kernel)
        return h, residual, None
    residual = block._add(h, residual)
    x = block.norm(residual.to(block.norm.weight.dtype))
    out, sumsq = block.mixer.step(x, cache, None, use_kernels, in_proj_weight, conv_kernel, fold_norm=True)
    return out, residual, sumsq


# ``compile_decode=None`` compiles from this width up. Compiling costs about a minute per process; for a small
# model that is more than its whole generation (the quick-start model answered in 67 s on the H100, nearly all of
# it compilation), while at the 1.3B shape it halves every step (benchmarks/NOTES.md).
AUTO_MIN_D_MODEL = 1024


def wanted(setting: bool | None, x: torch.Tensor) -> bool:
    """``setting`` None: on for CUDA tensors of models at least AUTO_MIN_D_MODEL wide, unless OMNICORE_COMPILE=0;
    True/False: as given (CUDA only)."""
    if _failed is not None or x.device.type != "cuda":
        return False
    if setting is None:
        return os.environ.get("OMNICORE_COMPILE", "1") != "0" and x.shape[-1] >= AUTO_MIN_D_MODEL
    return bool(setting)


def apply_pending(h: torch.Tensor, pending: tuple | None) -> torch.Tensor:
    """h with a pending gated-norm scale (from ``block_step``) applied, inside a compiled block or after one."""
    return h if pending is None else h * kernels.norm_scale(*pending)


def block_step(block, h: torch.Tensor, residual: torch.Tensor | None, cache: MambaCache,
               in_proj_weight: torch.Tensor | None = None, pending: tuple | None = None):
    """The compiled step -> (h, residual, pending); if compilation fails once, warn and fall back to eager for the
    rest of the process. ``in_proj_weight``: see Mamba2.step (the merged LoRA weight of the task). ``pending``:
    the previous block's gated-norm scale still to be applied to ``h`` (None: none); the returned one is this
    block's (kernels.FOLD_GATED_NORM_BELOW), to pass to the next block or to ``apply_pending``."""
    global _failed
    pdl = kernels.pdl_ok(h.device, h.shape[0]) and hasattr(torch._inductor.config.triton, "enable_pdl")
    compiled = _compiled.get(pdl)
    if compiled is None:
        limit = getattr(torch._dynamo.config, "recompile_limit", None)
        if limit is not None and limit < 32:  # dtype, batch size and task each add a specialisation
            torch._dynamo.config.recompile_limit = 32
        options = {"triton.enable_pdl": True} if pdl else None
        compiled = _compiled[pdl] = torch.compile(_block_step, dynamic=False, options=options)
    try:
        # decided here, a constant for the compiler (the one-pass kernel, or the PyTorch update fused by Inductor)
        use_kernels = h.shape[0] >= KERNEL_MIN_BATCH and kernels.use_fast(block.mixer.kernel, h)
        conv_kernel = h.shape[0] >= CONV_KERNEL_MIN_BATCH and kernels.conv_kernel_ok(cache.conv_state)
        fold = (use_kernels and kernels.folds_gated_norm(h.shape[0]) and block.mlp is None
                and block.mixer.can_fold_norm())
        out = compiled(block, h, residual, cache.conv_state, cache.ssm_state, use_kernels, in_proj_weight,
                        conv_kernel, pending, fold)
        if out[2] is None:
            return out
        return out[0], out[1], (out[2], block.mixer.d_inner, block.mixer.norm.eps)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: keep generating, eagerly
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            raise
        _failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(f"mamba2: compiled decode step failed, decoding eagerly from now on ({_failed})", stacklevel=2)
        return (*block(apply_pending(h, pending), residual, cache, in_proj_weight=in_proj_weight), None)
