"""The inference state of a backbone: per-layer caches allocated once with static shapes.

Mamba-2 layers keep a conv state (B, conv_dim, d_conv) (the last d_conv conv inputs, oldest first) and an SSM
state (B, nheads, headdim, d_state); attention layers keep K and V caches (B, max_seqlen, nheads_kv, head_dim).
Shared by all layers: ``offset`` (a 0-d long tensor, the number of columns consumed, read inside CUDA graphs),
``positions`` (B,) (real tokens seen per sample, for rotary positions under left padding) and ``kv_valid``
(B, max_seqlen) (which cache columns hold real tokens). Everything is updated in place.

A Mamba cache that was just allocated or reset is marked empty, and a prefill then does not read it (it holds
zeros). Code that writes cache tensors itself, rather than through the backbone, calls ``mark_written()`` after.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MambaCache:
    conv_state: torch.Tensor
    ssm_state: torch.Tensor
    # True while both states are known to hold zeros (allocated or reset, nothing run since): a prefill then skips
    # reading them (at batch 64 of the 1.3B shape, widening the SSM state to float32 for the scan cost ~2.4 ms)
    empty: bool = False


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
        self.mark_empty()

    def mark_empty(self) -> None:
        """From now on the Mamba caches count as zeros (a new sequence starts) without being written: the next
        prefill does not read them. The caller answers for ``offset``/``positions`` (reset() zeroes everything)."""
        self._mark(empty=True)

    def mark_written(self) -> None:
        """Say the caches may hold data: after running captured work (a CUDA-graph replay runs no Python, so the
        layers cannot record it themselves)."""
        self._mark(empty=False)

    def _mark(self, empty: bool) -> None:
        for c in self.layers:
            if isinstance(c, MambaCache):
                c.empty = empty

    def snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.tensors()]

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        for t, s in zip(self.tensors(), snapshot):
            t.copy_(s)
        self.mark_written()

    def __repr__(self) -> str:
        kinds = "".join("M" if isinstance(c, MambaCache) else "A" for c in self.layers)
        return f"InferenceState(batch={self.batch_size}, max_seqlen={self.max_seqlen}, layers={kinds!r})"
