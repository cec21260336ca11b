"""Atomic files: a failure mid-write never damages the last good checkpoint; no unpickling of objects."""

from __future__ import annotations

import pickle

import pytest
import torch

from omnicore.errors import CheckpointError
from omnicore.training.checkpoint import (atomic_directory, latest_checkpoint, load_checkpoint, load_state_dict_file,
                                          save_checkpoint, save_state_dict)


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    save_checkpoint(root, "step1", {"w": torch.ones(3)}, {"step": 1})

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic_directory(root / "step2") as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise Boom
    assert latest_checkpoint(root) == root / "step1"
    state, trainer = load_checkpoint(latest_checkpoint(root))
    assert torch.equal(state["w"], torch.ones(3)) and trainer["step"] == 1
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step1"]  # no half-written leftovers


def test_tied_tensors_are_stored_once_and_restored(tmp_path):
    shared = torch.randn(4, 2)
    root = tmp_path / "ckpt"
    save_checkpoint(root, "s", {"emb": shared, "head": shared, "b": torch.zeros(1)}, {"step": 0})
    state, _ = load_checkpoint(root / "s")
    assert torch.equal(state["head"], shared) and torch.equal(state["emb"], shared)


def test_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": Evil()}, fh)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_state_dict_file(path)


def test_reads_model_key_wrapped_torch_files(tmp_path):
    path = tmp_path / "vq.pt"
    torch.save({"model": {"a": torch.arange(3)}, "optimizer": {}}, path)
    assert torch.equal(load_state_dict_file(path)["a"], torch.arange(3))


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    save_state_dict({"a": torch.ones(2)}, path)
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_state_dict_file(path)
