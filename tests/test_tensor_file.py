"""Safetensors files written one tensor at a time (omnicore/training/tensor_file.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from omnicore.training.tensor_file import write_safetensors


def test_every_dtype_shape_and_view_reads_back_with_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    tensors = {
        "f32": base, "f16": base.half(), "bf16": base.bfloat16(), "f64": base.double(),
        "i64": torch.arange(7), "i32": torch.arange(3, dtype=torch.int32), "u8": torch.arange(4, dtype=torch.uint8),
        "i8": -torch.arange(4, dtype=torch.int8), "i16": torch.arange(2, dtype=torch.int16),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
        "transposed": base.t(), "row": base[2], "odd": torch.randn(3, generator=g).half(),  # 6 bytes: unaligned after
    }
    path = tmp_path / "t.safetensors"
    write_safetensors(tensors, path, metadata={"format": "pt"})
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0 and json.loads(path.read_bytes()[8:8 + header_len])["f16"]["dtype"] == "F16"


def test_an_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(TypeError, match="c: dtype torch.complex64"):
        write_safetensors({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")


_RSS = r"""
import sys, torch
from omnicore.training.tensor_file import write_safetensors
from safetensors.torch import load_file

def hwm():  # the peak resident size since the last reset, in bytes
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

src, out, drop = sys.argv[1], sys.argv[2], sys.argv[3] == "drop"
state = torch.load(src, mmap=True, weights_only=True)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the present size
before = hwm()
write_safetensors(state, out, drop_pages=set(state) if drop else ())
grew = hwm() - before
back = load_file(out)
assert all(torch.equal(back[k], v) for k, v in state.items())
print(grew)
"""


def test_pages_of_a_memory_mapped_checkpoint_are_given_back_as_written(tmp_path):
    """A 96 MiB mmap'd file of 8 tensors: written with drop_pages, the process grows by about one tensor (12 MiB),
    not by the file (measured 12 MiB against 96 MiB; without the page drop the test fails)."""
    src = tmp_path / "src.pt"
    torch.save({f"t{i}": torch.full((6, 1024, 1024), float(i), dtype=torch.float16) for i in range(8)}, src)
    grew = {}
    for mode in ("drop", "keep"):
        run = subprocess.run([sys.executable, "-c", _RSS, str(src), str(tmp_path / f"{mode}.safetensors"), mode],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        grew[mode] = int(run.stdout.strip().splitlines()[-1])
    size = src.stat().st_size
    assert grew["keep"] > 0.8 * size  # the measurement sees the pages when they stay
    assert grew["drop"] < 0.35 * size, grew
