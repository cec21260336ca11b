"""Turning logits into the next token: repetition penalty, temperature, top-k, top-p, min-p, greedy."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 64
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens

    @classmethod
    def from_kwargs(cls, **kw) -> "Sampling":
        known = {k: v for k, v in kw.items() if k in cls.__dataclass_fields__}
        unknown = set(kw) - set(known)
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}; "
                            f"options: {', '.join(cls.__dataclass_fields__)}")
        return cls(**known)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of already generated tokens by ``penalty``, multiply negative ones."""
    if previous is None or penalty == 1.0 or previous.numel() == 0:
        return logits
    picked = logits.gather(1, previous)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, previous, picked)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> torch.Tensor:
    """Set excluded entries to -inf. The most likely token always survives."""
    neg = torch.finfo(logits.dtype).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg)
    if min_p is not None and min_p > 0:
        probs = logits.softmax(-1)
        threshold = probs.max(-1, keepdim=True).values * min_p
        logits = logits.masked_fill(probs < threshold, neg)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), neg)
    return logits


def next_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None,
               previous: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, V)`` logits -> ``(B,)`` token ids."""
    logits = apply_repetition_penalty(logits.float(), previous, s.repetition_penalty)
    if s.is_greedy:
        return logits.argmax(-1)
    logits = filter_logits(logits / s.temperature, s.top_k, s.top_p, s.min_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
