"""The small-batch decode step: three Triton kernels a layer (CUDA; no torch.compile needed).

At batch 1 the compiled step (compiled_step.py) still runs seven kernels a Mamba-2 layer: in_proj, the conv update,
the state update, out_proj and its split-K reduction, the reduction of the gated norm's partial sums, and the next
residual add + norm. Here a layer is

1. ``triton_gemv.gemv`` with ``scale`` and ``conv``: in_proj (the task's merged LoRA weight) of the block's
   RMSNorm input, times its row scale, then the conv update and SiLU of the xBC columns;
2. ``kernels.state_update_gated``: the state update, gate and norm weight, and partial sums of squares;
3. ``triton_gemv.gemv`` with ``scale`` and ``residual``: out_proj, times the gated norm's row scale, added to the
   float32 residual stream in place; it writes the next block's norm input and partial sums of squares.

Up to MAX_BATCH rows the products are triton_gemv's GEMV; from MIN_GEMM_BATCH rows up to
triton_gemv.MAX_GEMM_ROWS its tensor-core kernel, which saves the small kernels around cuBLAS's products. Stacks
this does not cover (attention layers, MLPs, LayerNorm, adapters that cannot be merged) keep the compiled or eager
step; so do the batches between and above those ranges.
"""

from __future__ import annotations

import torch

from . import kernels, lora
from .mixer import Mamba2
from .norm import RMSNorm

# The fused step up to this batch (rows; at most triton_gemv.MAX_ROWS); 0: never. Step of the 1.3B shape in a CUDA
# graph (H200, benchmarks/profile_decode.py): 1 row 1.153 ms against 1.737 compiled, 2 rows 1.688 against 1.789,
# but 4 rows 2.559 against 1.846 (each row streams its own input through the K loop). bench_generation.py
# --ablate fused-step compares whole generations.
MAX_BATCH = 2
# The fused step with the tensor-core products from this batch up to triton_gemv.MAX_GEMM_ROWS; None: never, the
# default. Correct (tests) but not faster yet (H200, 1.3B shape, step in a CUDA graph): 1.78 / 2.14 / 3.20 / 4.86 ms
# at batch 8 / 16 / 32 / 64 against 1.80 / 2.13 / 2.60 / 3.39 compiled. At 64 rows in_proj alone takes 15.7 us
# (cuBLAS 11.9) but 42.7 with its conv epilogue, whose per-element state accesses in the tensor-core layout cost
# ~0.45 us a row of the batch (benchmarks/NOTES.md, "2026-12-01, H200: the fused step on tensor cores").
MIN_GEMM_BATCH: int | None = None


def takes(rows: int) -> bool:
    """Whether the fused step runs a step of ``rows`` rows (by the two ranges above)."""
    from . import triton_gemv

    if 1 <= rows <= MAX_BATCH:
        return True
    return MIN_GEMM_BATCH is not None and MIN_GEMM_BATCH <= rows <= triton_gemv.MAX_GEMM_ROWS


def _weight(layer: torch.nn.Module, task: str | None) -> torch.Tensor | None:
    """The weight one product with which gives ``layer``'s output for ``task``; None if only peft can apply it."""
    merged = lora.decode_weight(layer, task)
    if merged is not None:
        return merged
    lora_A = getattr(layer, "lora_A", None)
    if lora_A is None:
        return layer.weight
    if task is None or task not in lora_A or layer.merged or layer.disable_adapters:
        return layer.get_base_layer().weight
    return None


def plan(backbone, h: torch.Tensor, task: str | None) -> list[tuple] | None:
    """``layer_weights`` when the fused step runs this one-token step of ``backbone`` on ``h`` (B, 1, d_model):
    CUDA, triton, a row count it ``takes``, the Triton state update with dt/A inside (kernels.fuses_dt_a)."""
    if not h.is_cuda or not takes(h.shape[0]) or not kernels.fuses_dt_a() or not kernels.triton_available():
        return None
    return layer_weights(backbone, task)


def layer_weights(backbone, task: str | None) -> list[tuple] | None:
    """Per layer (in_proj weight, bias, out_proj weight, bias) if every layer is one the fused step covers (a
    Mamba-2 mixer with a one-group gated norm and d_conv 4, RMSNorm, residual in float32, no MLP, adapters
    mergeable for ``task``), else None."""
    weights = []
    for block in backbone.layers:
        mixer = block.mixer
        if not (isinstance(mixer, Mamba2) and block.mlp is None and isinstance(block.norm, RMSNorm)
                and block.residual_in_fp32 and mixer.can_fold_norm() and mixer.d_conv == 4
                and mixer.kernel != "torch"):
            return None
        w_in, w_out = _weight(mixer.in_proj, task), _weight(mixer.out_proj, task)
        if w_in is None or w_out is None or w_in.stride(-1) != 1 or w_out.stride(-1) != 1:
            return None
        base_in = getattr(mixer.in_proj, "base_layer", mixer.in_proj)
        base_out = getattr(mixer.out_proj, "base_layer", mixer.out_proj)
        weights.append((w_in, base_in.bias, w_out, base_out.bias))
    return weights


def step(backbone, h: torch.Tensor, state, weights: list[tuple]) -> torch.Tensor:
    """One token through every layer and the final norm -> (B, 1, d_model); updates ``state``'s caches in place (not
    its offset: the caller's)."""
    from . import triton_gemv

    b, d = h.shape[0], h.shape[-1]
    layers = backbone.layers
    # the first layer's input: the embedding is the residual stream; its RMSNorm short of the row scale
    residual = h[:, 0].to(torch.float32, copy=True)  # updated in place by every out_proj
    rounded = residual.to(h.dtype).float()
    x = (rounded * layers[0].norm.weight.float()).to(h.dtype)
    partials = (rounded * rounded).sum(-1, keepdim=True)
    # the next layer's input and partial sums, written by each out_proj (in_proj has read the last ones by then)
    programs = -(-d // triton_gemv.out_columns_per_program(b))
    next_x = torch.empty(b, d, dtype=h.dtype, device=h.device)
    next_partials = torch.empty(b, programs, dtype=torch.float32, device=h.device)
    for i, (block, cache, (w_in, b_in, w_out, b_out)) in enumerate(zip(layers, state.layers, weights)):
        mixer = block.mixer
        zxbcdt = triton_gemv.gemv(x, w_in, b_in, scale=(partials, d, block.norm.eps),
                                  conv=(cache.conv_state, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
                                        mixer.d_inner))
        z, xBC, dt_raw = mixer._split(zxbcdt)
        xs, B, C = torch.split(xBC, [mixer.d_inner, mixer.d_state, mixer.d_state], dim=-1)
        D = mixer.D.reshape(mixer.nheads, mixer.headdim) if mixer.D_has_hdim else mixer.D
        g, sumsq = kernels.state_update_gated(
            cache.ssm_state, xs.reshape(b, mixer.nheads, mixer.headdim), dt_raw, mixer.dt_bias, mixer.A_log,
            B.reshape(b, 1, mixer.d_state), C.reshape(b, 1, mixer.d_state), D,
            z.reshape(b, mixer.nheads, mixer.headdim), mixer.norm.weight, float(mixer.dt_limit[0]),
            float(mixer.dt_limit[1]))
        last = i == len(layers) - 1
        x, partials = (None, None) if last else (next_x, next_partials)
        triton_gemv.gemv(g.reshape(b, mixer.d_inner).to(w_out.dtype), w_out, b_out,
                         scale=(sumsq, mixer.d_inner, mixer.norm.eps),
                         residual=(residual, None if last else layers[i + 1].norm.weight, x, partials))
        cache.empty = False
    return backbone.norm_f(residual.to(backbone.norm_f.weight.dtype))[:, None]
