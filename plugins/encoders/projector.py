"""The MMU projector: encoder features ``(B, N, in_dim)`` -> backbone width ``(B, N, out_dim)``.

Layer widths (``depth`` Linear layers, exact GELU between them):
``depth=1``: in -> out; ``depth>=2``: in -> hidden -> out -> out ... (hidden defaults to out).
So the default is prismatic's "gelu-mlp" (Linear(in, out), GELU, Linear(out, out)), and ``fused=True`` is its
"fused-gelu-mlp" for DINO-SigLIP features: depth 3 with hidden = 4 * in (in -> 4in -> out -> out).
The layers sit in ``self.projector`` (an nn.Sequential), the key layout of prismatic/Cobra checkpoints
(``projector.0.weight``, ``projector.2.weight``...).
"""

from __future__ import annotations

import torch
from torch import nn

from omnicore.errors import OmnicoreError


class MLPProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, depth: int = 2) -> None:
        super().__init__()
        if depth < 1:
            raise OmnicoreError(f"projector: depth must be >= 1 (got {depth})")
        if min(in_dim, out_dim, hidden_dim or 1) < 1:
            raise OmnicoreError(f"projector: widths must be positive (in {in_dim}, out {out_dim}, hidden {hidden_dim})")
        hidden = hidden_dim or out_dim
        dims = [in_dim, out_dim] if depth == 1 else [in_dim, hidden] + [out_dim] * (depth - 1)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(a, b, bias=True))
        self.projector = nn.Sequential(*layers)
        self.in_dim, self.out_dim, self.hidden_dim, self.depth = in_dim, out_dim, hidden, depth

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)


def mlp_gelu(in_dim: int, out_dim: int, hidden_dim: int | None = None, depth: int = 2,
             fused: bool = False) -> MLPProjector:
    """GELU MLP projector (prismatic gelu-mlp; fused=True: fused-gelu-mlp, 3 layers, 4x in_dim hidden)."""
    if fused:
        depth = max(depth, 3)
        hidden_dim = hidden_dim or 4 * in_dim
    return MLPProjector(in_dim, out_dim, hidden_dim, depth)
