"""A text head with its own output projection: a Transformer LM's token embedding and (untied) ``lm_head``.

The decoupled ``text_vocab`` head scores against its embedding table (tied); most decoder LMs (Llama, InternLM2)
keep a separate output matrix, which this head holds so their weights load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...heads.vocab import TextVocab


class TextLMHead(TextVocab):
    """``text_vocab``'s embedding ``(vocab_size, d_model)`` plus ``lm_head`` ``(vocab_size, d_model)`` (no bias);
    ``tied`` scores against the embedding instead (no second table)."""

    def __init__(self, vocab_size: int, d_model: int, tied: bool = False, init_std: float = 0.02) -> None:
        super().__init__(vocab_size, d_model, init_std, label="head text_lm")
        self.lm_head = None
        if not tied:
            self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
            nn.init.normal_(self.lm_head.weight, std=init_std)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return super().logits(hidden)
        return F.linear(hidden, self.lm_head.weight.to(hidden.dtype))
