"""Decoupled vocabularies (OmniMamba): a text table tied to the text head, an image-code table tied to the image
head, the caption MLP of the T2I prefix, and learned absolute position tables.

MMU scores only the text vocabulary and T2I only the image codebook, so neither task can emit the other's tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from omnicore.errors import OmnicoreError


def _positive(label: str, **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise OmnicoreError(f"{label}: {name} must be >= 1 (got {value})")


class TextVocab(nn.Module):
    """Text embedding ``(vocab_size, d_model)``; the text head is tied to it: ``logits = h @ E^T``."""

    def __init__(self, vocab_size: int, d_model: int, init_std: float = 0.02, label: str = "head text_vocab") -> None:
        super().__init__()
        _positive(label, vocab_size=vocab_size, d_model=d_model)
        self.vocab_size, self.d_model = vocab_size, d_model
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embedding.weight, std=init_std)

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``(...)`` token ids -> ``(..., d_model)``."""
        return self.embedding(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., d_model)`` -> ``(..., vocab_size)``, scored against the (tied) embedding table."""
        return F.linear(hidden, self.embedding.weight.to(hidden.dtype))

    forward = embed


class ImageVocab(nn.Module):
    """Image-code table ``(codebook_size, embed_dim)`` + MLP projection to ``d_model``; head tied to the table.

    ``embed(codes) = proj(E[codes])``. ``logits(h) = head_proj(h) @ E^T`` over exactly ``codebook_size`` codes, where
    ``head_proj`` is a bias-free Linear ``d_model -> embed_dim`` present only when ``embed_dim != d_model``
    (OmniMamba has embed_dim == d_model and scores ``h`` against the table directly).
    ``proj="fused"`` (OmniMamba's FusedMLPProjector): Linear(e, 4e), GELU, Linear(4e, d), GELU, Linear(d, d);
    ``proj="gelu"``: Linear(e, d), GELU, Linear(d, d).
    """

    def __init__(self, codebook_size: int, d_model: int, embed_dim: int | None = None, proj: str = "fused",
                 init_std: float = 0.02) -> None:
        super().__init__()
        _positive("head image_vocab", codebook_size=codebook_size, d_model=d_model, embed_dim=embed_dim)
        e = embed_dim or d_model
        self.codebook_size, self.d_model, self.embed_dim = codebook_size, d_model, e
        self.embedding = nn.Embedding(codebook_size, e)
        nn.init.normal_(self.embedding.weight, std=init_std)
        if proj == "fused":
            self.proj = nn.Sequential(nn.Linear(e, 4 * e), nn.GELU(), nn.Linear(4 * e, d_model), nn.GELU(),
                                      nn.Linear(d_model, d_model))
        elif proj == "gelu":
            self.proj = nn.Sequential(nn.Linear(e, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        else:
            raise OmnicoreError(f"head image_vocab: unknown proj {proj!r}; use fused or gelu")
        self.head_proj = nn.Linear(d_model, e, bias=False) if e != d_model else None

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """``(...)`` image codes -> ``(..., d_model)``."""
        return self.proj(self.embedding(codes))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., d_model)`` -> ``(..., codebook_size)``, scored against the (tied) image-code table."""
        if self.head_proj is not None:
            hidden = self.head_proj(hidden)
        return F.linear(hidden, self.embedding.weight.to(hidden.dtype))

    forward = embed


class CaptionMLP(nn.Module):
    """2-layer GELU MLP ``d_model -> hidden -> d_model`` (bias-free, tanh GELU, as OmniMamba's caption embedder),
    applied to the text-embedded T2I prefix."""

    def __init__(self, d_model: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        _positive("head caption_mlp", d_model=d_model, hidden_dim=hidden_dim)
        hidden = hidden_dim or d_model
        self.fc1 = nn.Linear(d_model, hidden, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, d_model, bias=False)
        self.d_model = d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionPool(nn.Module):
    """The caption as one vector: a bias-free Linear of the sum of its token embeddings (pads left out).

    The unified model adds it to the input of every image-code position, so each code sees the caption directly
    and additively (a word's effect does not depend on the other words), not only through the backbone's state
    after the prefix. A sum, not a mean: a partial caption adds exactly the words it has, and the unconditional
    (all-pad) prefix pools to zero, so guidance's unconditional stream gets no condition.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        _positive("head caption_pool", d_model=d_model)
        self.d_model = d_model
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, L, d_model)`` caption token embeddings, ``mask`` ``(B, L)`` true for real tokens ->
        ``(B, d_model)``."""
        return self.proj((x * mask[..., None].to(x.dtype)).sum(1))


class PositionTable(nn.Module):
    """Learned absolute positions ``(num_positions, d_model)``, (truncated) normal init, std 0.02.

    ``forward(L)`` (an int) -> rows ``0..L-1`` ``(L, d_model)``; ``forward(positions)`` (an integer tensor of any
    shape, e.g. ``(L,)`` or ``(B, L)``) -> ``(*positions.shape, d_model)``.
    """

    def __init__(self, num_positions: int, d_model: int, init_std: float = 0.02) -> None:
        super().__init__()
        _positive("head position_table", num_positions=num_positions, d_model=d_model)
        self.num_positions, self.d_model = num_positions, d_model
        self.weight = nn.Parameter(torch.empty(num_positions, d_model))
        nn.init.trunc_normal_(self.weight, std=init_std)  # as OmniMamba (bounds +-2: in effect a normal)

    def forward(self, positions: int | torch.Tensor) -> torch.Tensor:
        if isinstance(positions, int):
            if not 0 <= positions <= self.num_positions:
                raise OmnicoreError(f"position table: {positions} positions asked, the table has {self.num_positions}")
            return self.weight[:positions]
        if positions.is_floating_point():
            raise OmnicoreError("position table: positions must be integers")
        return F.embedding(positions, self.weight)


# --- factories (registered under kind "head") --------------------------------------------------------------------
def text_vocab(vocab_size: int, d_model: int, init_std: float = 0.02) -> TextVocab:
    """Text embedding tied to the text head (scores only the text vocabulary)."""
    return TextVocab(vocab_size, d_model, init_std)


def image_vocab(codebook_size: int, d_model: int, embed_dim: int | None = None, proj: Literal["fused", "gelu"] = "fused",
                init_std: float = 0.02) -> ImageVocab:
    """Image-code embedding + MLP projection, image head tied to the table (scores only codebook_size codes)."""
    return ImageVocab(codebook_size, d_model, embed_dim, proj, init_std)


def caption_mlp(d_model: int, hidden_dim: int | None = None) -> CaptionMLP:
    """2-layer GELU MLP over the embedded T2I caption prefix."""
    return CaptionMLP(d_model, hidden_dim)


def caption_pool(d_model: int) -> CaptionPool:
    """The caption pooled into one vector that every image-code position adds to its input."""
    return CaptionPool(d_model)


def position_table(num_positions: int, d_model: int, init_std: float = 0.02) -> PositionTable:
    """Learned absolute position table (OmniMamba: 1500 rows for MMU, 256 + 73 for T2I)."""
    return PositionTable(num_positions, d_model, init_std)
