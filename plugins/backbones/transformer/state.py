"""The inference state of a Transformer stack: a static KV cache per layer, allocated once.

Per layer K and V of shape ``(B, kv_heads, max_seqlen, head_dim)`` (transformers' axis order). Shared by all
layers: ``offset`` (a 0-d long tensor, columns consumed; read inside CUDA graphs), ``positions`` (B,) (real
tokens seen per row: the RoPE position of the next one under left padding) and ``kv_valid`` (B, max_seqlen) (which
columns hold real tokens). Everything is updated in place, so a captured decoding step stays valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    k: torch.Tensor
    v: torch.Tensor


def allocate_kv(attn, batch_size: int, max_seqlen: int, dtype=None, device=None) -> KVCache:
    """A zeroed cache for one of transformers' attention modules (its kv heads and head_dim)."""
    weight = attn.k_proj.weight
    kv_heads = weight.shape[0] // attn.head_dim
    shape = (batch_size, kv_heads, max_seqlen, attn.head_dim)
    kw = {"dtype": dtype or weight.dtype, "device": device or weight.device}
    return KVCache(torch.zeros(shape, **kw), torch.zeros(shape, **kw))


class TransformerState:
    def __init__(self, layers: list[KVCache], batch_size: int, max_seqlen: int, device: torch.device) -> None:
        self.layers = layers
        self.batch_size = batch_size
        self.max_seqlen = max_seqlen
        self.offset = torch.zeros((), dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.kv_valid = torch.zeros(batch_size, max_seqlen, dtype=torch.bool, device=device)

    @property
    def seqlen_offset(self) -> int:
        """Columns consumed so far (reads the tensor ``offset``; use that one inside CUDA graphs)."""
        return int(self.offset.item())

    def tensors(self) -> list[torch.Tensor]:
        out = [self.offset, self.positions, self.kv_valid]
        for c in self.layers:
            out += [c.k, c.v]
        return out

    def reset(self) -> None:
        """Zero everything in place: a new sequence can start (CUDA graphs stay valid)."""
        for t in self.tensors():
            t.zero_()

    # A KV cache is read only where kv_valid says so, so "empty" needs no flag: these keep the engine's contract.
    def mark_empty(self) -> None:
        pass

    def mark_written(self) -> None:
        pass

    def snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.tensors()]

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        for t, s in zip(self.tensors(), snapshot):
            t.copy_(s)

    def __repr__(self) -> str:
        return f"TransformerState(batch={self.batch_size}, max_seqlen={self.max_seqlen}, layers={len(self.layers)})"
