"""Loading a local weights file into a timm model, strictly.

Nothing is downloaded: ``weights`` is a path to a ``.safetensors`` file, or a torch file (``.pth``, ``.bin``, ``.pt``)
read with ``torch.load(weights_only=True, mmap=True)``. timm's own ViT checkpoint filter runs first, so timm-named
DINOv2 files (and Meta's original layout) and OpenCLIP files (SigLIP: ``visual.trunk.*``, the text tower dropped)
are converted and position embeddings are resampled to the model's grid (DINOv2 ships 518 px weights; OmniMamba
runs it at 384 px). After that the file must hold exactly the model's tensors with its shapes: a missing,
unexpected or misshapen tensor is a one-line CheckpointError naming the file and the tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from omnicore.errors import CheckpointError

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


@dataclass
class LoadReport:
    """What loading ``path`` into a model did. Loading is strict, so ``missing`` and ``unexpected`` stay empty
    (kept for callers that print the report)."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f", ... ({len(keys) - 5} more)" if len(keys) > 5 else "")

        text = f"{self.path}: loaded {len(self.loaded)} tensors"
        if self.missing:
            text += f"; {len(self.missing)} missing (kept at their initial values): {show(self.missing)}"
        if self.unexpected:
            text += f"; {len(self.unexpected)} unexpected (ignored): {show(self.unexpected)}"
        return text


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` dict; CheckpointError naming the path otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt file, pickled objects refused by weights_only, wrong format...
        raise CheckpointError(f"{path}: cannot read weights: {type(exc).__name__}: {exc}") from None
    # common wrappers: {"state_dict": {...}}, {"model": {...}}, {"module": {...}}
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: no tensors found (expected a state dict)")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entry {bad[0]!r} is not a tensor (expected a flat state dict)")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _drop_unused_classifier(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A model built without a classifier (``num_classes=0``, a feature extractor) ignores a file's classifier,
    as timm's own pretrained loading does when the class counts differ."""
    if getattr(model, "num_classes", None) != 0:
        return state
    heads = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return {k: v for k, v in state.items() if not any(k in (f"{h}.weight", f"{h}.bias") for h in heads)}


def load_timm_weights(model: nn.Module, path: str | Path, label: str = "encoder") -> LoadReport:
    """Load ``path`` into the timm ``model``, strictly (after timm's checkpoint filter); CheckpointError naming
    the path and the first missing, unexpected or misshapen tensor otherwise."""
    from omnicore.convert.strict import check_tensors, shapes

    state = read_state_dict(path)
    names = set(state)
    try:
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        if isinstance(model, VisionTransformer):
            state = checkpoint_filter_fn(state, model)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: {label}: cannot adapt the checkpoint to the model: {exc}") from None
    state = _drop_unused_classifier(state, model)
    converted = " (names after timm's checkpoint filter)" if set(state) - names else ""
    check_tensors(state, shapes(model.state_dict()), f"{path}: {label}{converted}")
    model.load_state_dict(state, strict=True)
    report = LoadReport(str(path), loaded=list(state))
    log.info("%s: %s", label, report.summary())
    return report
