"""Learning-rate schedules: linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak (``cosine``), the peak
(``constant``), or the peak until the last ``decay_steps``, which decay along a cosine (``wsd``: warm-up, stable,
decay)."""

from __future__ import annotations

import math


def _cosine(progress: float, min_lr_ratio: float) -> float:
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float, kind: str = "cosine",
              decay_steps: int | None = None) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay_start = total_steps - (decay_steps or 0)
        if step < decay_start:
            return 1.0
        # the last step reaches min_lr_ratio exactly
        return _cosine((step - decay_start + 1) / max(1, decay_steps or 0), min_lr_ratio)
    span = max(1, total_steps - warmup_steps)
    return _cosine((step - warmup_steps) / span, min_lr_ratio)
