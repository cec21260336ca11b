"""A text head with its own output projection: a Transformer LM's token embedding and (untied) ``lm_head``.

The decoupled ``text_vocab`` head scores against its embedding table (tied); most decoder LMs (Llama, InternLM2)
keep a separate output matrix, which this head holds so their weights load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from omnicore.errors import OmnicoreError


class TextLMHead(nn.Module):
    """Embedding ``(vocab_size, d_model)`` plus ``lm_head`` ``(vocab_size, d_model)`` (no bias); ``tied`` scores
    against the embedding instead (no second table)."""

    def __init__(self, vocab_size: int, d_model: int, tied: bool = False, init_std: float = 0.02) -> None:
        super().__init__()
        if vocab_size < 1 or d_model < 1:
            raise OmnicoreError(f"head text_lm: vocab_size and d_model must be >= 1 (got {vocab_size}, {d_model})")
        self.vocab_size, self.d_model = vocab_size, d_model
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embedding.weight, std=init_std)
        self.lm_head = None
        if not tied:
            self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, std=init_std)

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight if self.lm_head is None else self.lm_head.weight
        return nn.functional.linear(hidden, weight.to(hidden.dtype))

    forward = embed
