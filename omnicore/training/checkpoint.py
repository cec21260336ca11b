"""Files that must never be half-written: model directories, training checkpoints, weight files.

Everything is written to a temporary sibling and renamed into place; a ``latest`` pointer is replaced only
after the checkpoint it names is complete, so a kill at any instant leaves the last good one readable.
Nothing here unpickles arbitrary objects: tensors go through safetensors, the rest through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import CheckpointError, InputFileError
from ..inputs import regular_file
from .tensor_file import write_safetensors

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` only if the block finishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_state_dict(state: dict[str, torch.Tensor], path: Path, file_backed: frozenset[str] = frozenset()
                    ) -> dict[str, str]:
    """Save tensors with safetensors, one at a time (tensor_file.py); tied tensors are stored once. Returns
    {alias: stored name}. ``file_backed``: names of tensors that view a read-only memory-mapped file (a checkpoint
    being converted), whose pages are given back once written."""
    stored: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.dtype) if tensor.numel() else None
        if key is not None and key in stored:
            tied[name] = stored[key]
            continue
        if key is not None:
            stored[key] = name
        out[name] = tensor
    write_safetensors(out, path, drop_pages=file_backed)
    return tied


def _existing_regular_file(path: Path, what: str) -> None:
    """A FIFO, directory or missing path is refused before anything opens it."""
    try:
        regular_file(path, what)
    except InputFileError as exc:
        raise CheckpointError(str(exc)) from None


def read_torch_file(path: Path, what: str = "weights file") -> Any:
    """A torch file's contents read with weights_only=True (no pickled code runs) and memory-mapped (a multi-GB file
    is not copied into memory before its tensors are used); a one-line CheckpointError when it cannot be."""
    path = Path(path)
    _existing_regular_file(path, what)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # pickle errors, refused globals, truncation, a pre-zip (legacy) torch file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read as a weights-only torch file: {reason}") from None


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file: safetensors, or a torch file (``read_torch_file``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        _existing_regular_file(path, "weights file")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file: {exc}") from None
    obj = read_torch_file(path)
    for key in ("model", "state_dict", "module"):  # common wrappers (LlamaGen keeps weights under 'model')
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj


def load_component_weights(obj: torch.nn.Module, spec: dict, label: str) -> None:
    """Load a role's local weights file, optionally a prefix or a key map of it (e.g. from a full LM checkpoint).

    Strict: the (prefixed / mapped) file must hold exactly the module's tensors with its shapes, else a one-line
    CheckpointError names the file and the first tensor at fault. A module may list tensors it keeps for itself
    in ``ignored_weights`` (the VQ tokenizer's usage record): taken from neither side. Backbones that know a public
    layout (``load_mamba_state_dict``) map names themselves, strictly too."""
    from ..convert.strict import check_tensors, shapes

    path = spec["weights"]
    state = load_state_dict_file(Path(path))
    if spec.get("weights_prefix"):
        prefix = spec["weights_prefix"]
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if spec.get("weights_map"):
        missing = [k for k in spec["weights_map"] if k not in state]
        if missing:
            raise CheckpointError(f"{path}: {label}.weights_map: no key {missing[0]!r} in the file")
        state = {dst: state[src] for src, dst in spec["weights_map"].items()}
    if not state:
        raise CheckpointError(f"{path}: {label}: no weights left to load (check weights_prefix)")
    loader = getattr(obj, "load_mamba_state_dict", None)  # backbones that know their public layout
    if loader is not None:
        loader(state, strict=True, source=f"{path}: {label}")
        return
    ignored = set(getattr(obj, "ignored_weights", ()))
    state = {k: v for k, v in state.items() if k not in ignored}
    own = {k: v for k, v in obj.state_dict().items() if k not in ignored}
    check_tensors(state, shapes(own), f"{path}: {label}")
    obj.load_state_dict(state, strict=False)  # strict=False only for the ignored names, checked above


def save_checkpoint(root: Path, name: str, model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any]) -> Path:
    """Write ``root/name`` (model.safetensors + trainer.pt) atomically, then point ``root/latest`` at it."""
    root = Path(root)
    target = root / name
    with atomic_directory(target) as tmp:
        tied = save_state_dict(model_state, tmp / "model.safetensors")
        torch.save({**trainer_state, "tied": tied}, tmp / "trainer.pt")
    atomic_write_text(root / LATEST, name + "\n")
    return target


def latest_checkpoint(root: Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    target = Path(root) / pointer.read_text().strip()
    return target if (target / "trainer.pt").is_file() else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    state = load_state_dict_file(path / "model.safetensors")
    try:
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path / 'trainer.pt'}: unreadable: {str(exc).splitlines()[0]}") from None
    for alias, canonical in trainer.pop("tied", {}).items():
        state[alias] = state[canonical]
    return state, trainer
