"""The inference state of a backbone: per-layer caches allocated once with static shapes.

Mamba-2 layers keep a conv state (B, conv_dim, d_conv) (the last d_conv conv inputs, oldest first) and an SSM
state (B, nheads, headdim, d_state); attention layers keep K and V caches (B, max_seqlen, nheads_kv, head_dim).
Shared by all layers: ``offset`` (a 0-d long tensor, the number of columns consumed, read inside CUDA graphs),
``positions`` (B,) (real tokens seen per sample, for rotary positions under left padding) and ``kv_valid``
(B, max_seqlen) (which cache columns hold real tokens). Everything is updated in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MambaCache:
    conv_state: torch.Tensor
    ssm_state: torch.Tensor


@dataclass
class KVCache:
    k: torch.Tensor
    v: torch.Tensor


class InferenceState:
    def __init__(self, layers: list[MambaCache | KVCache], batch_size: int, max_seqlen: int,
                 device: torch.device) -> None:
        self.layers = layers
        self.batch_size = batch_size
        self.max_seqlen = max_seqlen
        self.offset = torch.zeros((), dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        has_kv = any(isinstance(c, KVCache) for c in layers)
        self.kv_valid = torch.zeros(batch_size, max_seqlen, dtype=torch.bool, device=device) if has_kv else None

    @property
    def seqlen_offset(self) -> int:
        """Columns consumed so far (reads the tensor ``offset``; use that one inside CUDA graphs)."""
        return int(self.offset.item())

    def tensors(self) -> list[torch.Tensor]:
        out = [self.offset, self.positions] + ([self.kv_valid] if self.kv_valid is not None else [])
        for c in self.layers:
            out += [c.conv_state, c.ssm_state] if isinstance(c, MambaCache) else [c.k, c.v]
        return out

    def reset(self) -> None:
        """Zero every cache in place (a new sequence can start; CUDA graphs stay valid)."""
        for t in self.tensors():
            t.zero_()

    def snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.tensors()]

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        for t, s in zip(self.tensors(), snapshot):
            t.copy_(s)

    def __repr__(self) -> str:
        kinds = "".join("M" if isinstance(c, MambaCache) else "A" for c in self.layers)
        return f"InferenceState(batch={self.batch_size}, max_seqlen={self.max_seqlen}, layers={kinds!r})"
