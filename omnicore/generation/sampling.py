"""Turning logits into the next token: repetition penalty, temperature, top-k, top-p, min-p, greedy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import triton_sampling

# CUDA: sample with the fused Triton kernel (triton_sampling.py) where the rule allows it (temperature and top-k,
# no top-p, min-p or repetition penalty); False keeps the PyTorch sampler everywhere (the reference).
FUSED_SAMPLER = True


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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of already generated tokens by ``penalty``, multiply negative ones.

    ``seen`` is a (B, V) bool mask of the tokens generated so far (a fixed-shape buffer, so the decode step can
    be captured in a CUDA graph); see ``mark_seen``.
    """
    if seen is None or penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def mark_seen(seen: torch.Tensor | None, tokens: torch.Tensor) -> None:
    """Record ``tokens`` (B,) in the (B, V) mask, in place."""
    if seen is not None:
        seen.scatter_(1, tokens[:, None], True)


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


def pick_token(logits: torch.Tensor, s: Sampling, noise: torch.Tensor | None = None,
               seen: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, V)`` logits -> ``(B,)`` token ids, given uniform ``noise`` in [0, 1) of the same shape.

    Sampling is the Gumbel-max trick: argmax(logits / T + Gumbel(noise)) is a draw from softmax(logits / T),
    restricted to what the filters keep. It needs no host synchronisation and reads its randomness from a
    buffer, so the whole step (sampling included) can be replayed as one CUDA graph.
    """
    if _fused(logits, s, noise, seen):
        return triton_sampling.topk_gumbel(logits, noise, s.temperature, s.top_k)
    logits = apply_repetition_penalty(logits.float(), seen, s.repetition_penalty)
    if s.is_greedy:
        return logits.argmax(-1)
    logits = filter_logits(logits / s.temperature, s.top_k, s.top_p, s.min_p)
    gumbel = -torch.log(-torch.log(noise.clamp(min=1e-20)))
    return (logits + gumbel).argmax(-1)


def _fused(logits: torch.Tensor, s: Sampling, noise: torch.Tensor | None, seen: torch.Tensor | None,
           uncond: torch.Tensor | None = None) -> bool:
    """Whether the rule is one the Triton sampler implements and it can take these tensors."""
    return (FUSED_SAMPLER and noise is not None and not s.is_greedy and s.top_p is None and not s.min_p
            and (seen is None or s.repetition_penalty == 1.0)
            and triton_sampling.supported(logits, noise, s.top_k, uncond))


def pick_guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float, s: Sampling,
                noise: torch.Tensor | None = None, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance: ``pick_token(uncond + scale * (cond - uncond))``, the mixing fused into the sampler
    on CUDA."""
    if _fused(cond, s, noise, seen, uncond):
        return triton_sampling.topk_gumbel(cond, noise, s.temperature, s.top_k, uncond, scale)
    return pick_token(uncond + scale * (cond - uncond), s, noise, seen)


def next_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None,
               seen: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, V)`` logits -> ``(B,)`` token ids, drawing the noise from ``generator`` (or the global one)."""
    noise = None
    if not s.is_greedy:
        noise = torch.rand(logits.shape, generator=generator, device=logits.device)
    return pick_token(logits, s, noise, seen)
