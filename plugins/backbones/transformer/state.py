"""The inference state of a Transformer stack (and of its distilled students): the Mamba-2 plugin's
``InferenceState``, whose layers are ``KVCache`` (attention) or ``MambaCache`` (mixer) entries with one shared
``offset``, ``positions`` and ``kv_valid``. Here only the KV cache of one of transformers' attention modules:
K and V of shape ``(B, kv_heads, max_seqlen, head_dim)`` (transformers' axis order).
"""

from __future__ import annotations

import torch

from ..mamba2.state import InferenceState, KVCache

__all__ = ["InferenceState", "KVCache", "allocate_kv"]


def allocate_kv(attn, batch_size: int, max_seqlen: int, dtype=None, device=None) -> KVCache:
    """A zeroed cache for one of transformers' attention modules (its kv heads and head_dim)."""
    weight = attn.k_proj.weight
    kv_heads = weight.shape[0] // attn.head_dim
    shape = (batch_size, kv_heads, max_seqlen, attn.head_dim)
    kw = {"dtype": dtype or weight.dtype, "device": device or weight.device}
    return KVCache(torch.zeros(shape, **kw), torch.zeros(shape, **kw))
