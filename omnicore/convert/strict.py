"""The strict check of a weights file against a module: missing, unexpected and misshapen tensors are errors.

A loader that quietly keeps some tensors at their random init (``strict=False``) trains or answers with half a
model and no word said; every omnicore loader refuses instead, in one line naming the file and the first tensor
at fault (with how many more there are).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..errors import CheckpointError


def _more(names: Sequence[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def check_tensors(state: Mapping[str, torch.Tensor], expected: Mapping[str, Sequence[int]], where: str,
                  error: type[Exception] = CheckpointError) -> None:
    """Raise ``error`` unless ``state`` has exactly the names of ``expected`` with its shapes.

    ``where`` starts the message (the file and the component, e.g. ``"vq.pt: model.image_tokenizer"``)."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise error(f"{where}: missing tensor {missing[0]!r}: the model has it, the file does not{_more(missing)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise error(f"{where}: unexpected tensor {unexpected[0]!r}: the file has it, the model does not"
                    f"{_more(unexpected)}")
    wrong = [k for k in state if tuple(state[k].shape) != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        raise error(f"{where}: shape mismatch for {k!r}: file {tuple(state[k].shape)} vs model "
                    f"{tuple(expected[k])}{_more(wrong)}")


def shapes(module_state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module_state.items()}
