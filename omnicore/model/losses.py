"""Loss functions of the unified model's tasks that plain cross-entropy does not cover."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def code_balanced_ce(logits: torch.Tensor, targets: torch.Tensor, balance: float = 0.0) -> torch.Tensor:
    """Cross-entropy over ``targets`` (N,), each weighted by ``count ** -balance``, where ``count`` is how often its
    code occurs among the batch's targets; the weighted mean. ``balance`` 0 is the plain mean, 1 gives every code
    present the same total weight.

    Why: in an image's codes a few (a plain background, say) make up most of the targets and are the easiest to
    predict, so the plain mean spends most of its gradient on them; the codes that carry what a caption says (the
    colour of a small object) are rare. Counts come from the batch itself, so no statistics need be kept, and
    they are not differentiated through."""
    if balance == 0.0:
        return F.cross_entropy(logits, targets)
    per_code = F.cross_entropy(logits, targets, reduction="none")
    counts = torch.bincount(targets, minlength=logits.shape[-1]).to(per_code.dtype)
    weights = counts[targets].pow(-balance)
    return (per_code * weights).sum() / weights.sum()
