"""Loading a local weights file into a timm model, with a report of what did not match.

Nothing is downloaded: ``weights`` is a path to a ``.safetensors`` file, or a torch file (``.pth``, ``.bin``, ``.pt``)
read with ``torch.load(weights_only=True)``. timm's own ViT checkpoint filter runs first, so original DINOv2 /
OpenCLIP layouts are converted and position embeddings are resampled to the model's grid (DINOv2 ships 518 px
weights; OmniMamba runs it at 384 px).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from omnicore.errors import CheckpointError

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


@dataclass
class LoadReport:
    """What loading ``path`` into a model did: keys the model wanted but the file lacked, and the reverse."""

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
            state = torch.load(str(path), map_location="cpu", weights_only=True)
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


def load_timm_weights(model: nn.Module, path: str | Path, label: str = "encoder") -> LoadReport:
    """Load ``path`` into the timm ``model`` (non-strict); log and warn about missing/unexpected keys.

    Shape mismatches that timm's filter cannot fix raise CheckpointError naming the path and the key.
    """
    state = read_state_dict(path)
    try:
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        if isinstance(model, VisionTransformer):
            state = checkpoint_filter_fn(state, model)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: {label}: cannot adapt the checkpoint to the model: {exc}") from None
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(f"{path}: {label}: shape mismatch for {key!r}: file {tuple(value.shape)} vs "
                                  f"model {tuple(own[key].shape)}")
    result = model.load_state_dict(state, strict=False)
    report = LoadReport(str(path), loaded=[k for k in state if k in own], missing=list(result.missing_keys),
                        unexpected=list(result.unexpected_keys))
    if report.complete:
        log.info("%s: %s", label, report.summary())
    else:
        log.warning("%s: %s", label, report.summary())
        warnings.warn(f"{label}: {report.summary()}", stacklevel=3)
    return report
