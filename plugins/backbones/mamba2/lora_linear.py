"""A peft LoRA linear layer's forward in two matrix products and one accumulate, for the training fast path.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: besides the products, one pass over the (rows,
out_features) adapter output to scale it and one to add it, each again in backward, and (under autocast) a float32
copy of the input (peft casts it to the adapter's dtype, then autocast casts it back). Here the scaling goes into
the small ``B`` (out_features x r) and the adapter's product accumulates into the base output inside the GEMM
(``addmm``'s beta = 1): the same function, with none of those passes.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


def _unsupported(layer: nn.Module, adapters: list[str]) -> str | None:
    """Why this LoRA layer's forward is not the two products and the accumulate (None: it is)."""
    name = adapters[0]
    if len(adapters) != 1:
        return f"{len(adapters)} adapters active at once"
    if getattr(layer, "merged", False) or layer.disable_adapters:
        return "the adapter is merged or disabled"
    if name not in layer.lora_A or not isinstance(layer.base_layer, nn.Linear):
        return "not a linear layer with this adapter"
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return "a LoRA variant (DoRA or another)"
    return None


def fused_lora_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` for a peft LoRA ``Linear`` with one plain (not DoRA) adapter active and unmerged. None for a
    layer without an active adapter (the plain product is then the whole function) and, with a warning naming why,
    for one this does not cover: the caller then calls the layer as usual."""
    adapters = getattr(layer, "active_adapters", None)
    if not adapters:
        return None
    why = _unsupported(layer, list(adapters))
    if why is not None:
        warnings.warn(f"fused LoRA product not used ({why}); peft's forward runs instead", stacklevel=2)
        return None
    name = adapters[0]
    base = layer.base_layer
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    out = F.linear(x, base.weight, base.bias)
    low = F.linear(layer.lora_dropout[name](x), a)  # dropout is Identity at p = 0, or in eval mode a no-op
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), (b * layer.scaling[name]).t())
    return flat.view(out.shape)
