"""A safetensors file written one tensor at a time, for state dicts larger than the memory to spare.

``safetensors.torch.save_file`` turns every tensor into a bytes object before writing, so a multi-GB state dict
is held twice. Here the header is computed from shapes and dtypes, then each tensor's memory is written straight
to the file. Tensors that are read-only views of a memory-mapped file (a checkpoint read with ``torch.load(mmap=True)``)
can have their pages given back after they are written (``drop_pages``): the process then never holds the whole
input file, only the tensor being copied. The format is safetensors' own: an 8-byte little-endian header length,
a JSON header padded with spaces to 8 bytes, then the tensors' bytes back to back in header order.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import struct
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
# reclaim the range: clean file-backed pages are dropped (read again from the file if touched); anonymous memory
# is only ever swapped out, never lost, so a wrong name in drop_pages costs speed, not data (Linux 5.4+)
_MADV_PAGEOUT = 21


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (it must be contiguous and on the CPU)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    buf = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    return memoryview(np.ctypeslib.as_array(buf)).cast("B")


def _drop_pages(tensor: torch.Tensor) -> None:
    """Give back the resident pages under a tensor that views a read-only file mapping: they are read from the file
    again if touched."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes < mmap.PAGESIZE:
        return
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = -(-(tensor.data_ptr() + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)  # advice: failure is harmless


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None,
                      drop_pages: Iterable[str] = ()) -> None:
    """Write ``tensors`` to ``path`` in the safetensors format, one at a time; ``drop_pages``: names of
    tensors that view a read-only file mapping, whose pages are given back once written."""
    drop = set(drop_pages)
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, t in tensors.items():
            c = t.detach().cpu().contiguous()  # one tensor's copy at a time, if any
            fh.write(_bytes_view(c))
            if name in drop and c.data_ptr() == t.data_ptr():
                _drop_pages(t)
            del c
