"""Rows of a backbone's inference state: copying a prefilled sequence into a slot, and a view of the first rows.

The scheduler keeps one state of ``capacity`` rows per task and steps only its first rows (a bucket). A backbone's
state (``allocate_inference_state``) lists its tensors with ``tensors()``; every tensor with a leading dimension
of the state's batch size holds one row per sequence, and 0-d tensors (a shared offset) are the same for all rows.
The view is built from that shape alone (a shallow copy whose per-row tensors are sliced), so any backbone whose
state keeps its tensors as attributes, batch first, works without the scheduler knowing its classes.
"""

from __future__ import annotations

import copy

import torch


def is_recurrent(backbone, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the state's size does not depend on the sequence length (Mamba layers only): then each row is
    complete in itself and rows may be at different steps. A KV cache grows with the length, and its rows share one
    column offset, so sequences can only step together when they started together."""
    short = backbone.allocate_inference_state(1, 8, dtype=dtype, device=device)
    long = backbone.allocate_inference_state(1, 16, dtype=dtype, device=device)
    return [t.shape for t in short.tensors()] == [t.shape for t in long.tensors()]


def _sliced(obj, batch: int, rows: int, seen: dict):
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = obj[:rows] if obj.dim() >= 1 and obj.shape[0] == batch else obj
    elif isinstance(obj, list):
        out = [_sliced(o, batch, rows, seen) for o in obj]
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        out = copy.copy(obj)
        for name, value in vars(obj).items():
            if isinstance(value, (torch.Tensor, list)) or hasattr(value, "__dict__"):
                setattr(out, name, _sliced(value, batch, rows, seen))
    else:
        out = obj
    seen[id(obj)] = out
    return out


def row_view(state, rows: int):
    """A state over the first ``rows`` rows of ``state``, sharing its memory (a CUDA graph captured over the view
    reads and writes the full state's storage)."""
    if rows == state.batch_size:
        return state
    view = _sliced(state, state.batch_size, rows, {})
    view.batch_size = rows
    return view


def copy_rows(dst, src, rows: torch.Tensor, shared: bool = False) -> None:
    """Copy every row of ``src`` (a state of ``len(rows)`` rows) into rows ``rows`` of ``dst``. ``shared``: also copy
    the 0-d tensors (the column offset of KV caches), for a non-recurrent state whose rows all start together."""
    for d, s in zip(dst.tensors(), src.tensors()):
        if s.dim() == 0:
            if shared:
                d.copy_(s)
            continue
        d.index_copy_(0, rows, s.to(d.dtype))
    dst.mark_written()
