"""Sampling rules: greedy, top-k, top-p, min-p, repetition penalty, seeds."""

from __future__ import annotations

import pytest
import torch

from omnicore.generation.sampling import (Sampling, apply_repetition_penalty, filter_logits, mark_seen, next_token,
                                         pick_guided, pick_token)


def test_greedy_is_argmax_and_ignores_seed():
    logits = torch.randn(4, 50)
    assert torch.equal(next_token(logits, Sampling(greedy=True)), logits.argmax(-1))
    assert torch.equal(next_token(logits, Sampling(temperature=0.0)), logits.argmax(-1))


def test_top_k_never_samples_outside_top_k():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    allowed = torch.topk(logits, 5, dim=-1).indices
    s = Sampling(temperature=2.0, top_k=5)
    for _ in range(200):
        tok = next_token(logits, s)
        assert (allowed == tok[:, None]).any(-1).all()


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probs.log(), top_p=0.75) > torch.finfo(torch.float32).min
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(probs.log(), top_p=0.8) > torch.finfo(torch.float32).min
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(probs.log(), top_p=0.81) > torch.finfo(torch.float32).min
    assert kept.tolist() == [[True, True, True, False]]


def test_top_p_in_shuffled_order():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    kept = filter_logits(probs.log(), top_p=0.75) > torch.finfo(torch.float32).min
    assert kept.tolist() == [[False, True, False, True]]


def test_min_p_drops_tokens_below_fraction_of_best():
    probs = torch.tensor([[0.6, 0.3, 0.05, 0.05]])
    kept = filter_logits(probs.log(), min_p=0.2) > torch.finfo(torch.float32).min
    assert kept.tolist() == [[True, True, False, False]]


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    seen = torch.zeros(1, 3, dtype=torch.bool)
    mark_seen(seen, torch.tensor([0]))
    mark_seen(seen, torch.tensor([1]))
    mark_seen(seen, torch.tensor([0]))  # a repeat is penalised once, as CTRL does
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5]]


def test_sampling_follows_the_softmax_of_the_kept_tokens():
    # the Gumbel-max draw must match softmax(logits / T) restricted to the top-k: a wrong temperature, a missing
    # renormalisation or a biased noise transform shows up as frequencies off by far more than 0.01
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 5.0]])
    s = Sampling(temperature=2.0, top_k=4)
    g = torch.Generator().manual_seed(0)
    n = 40000
    draws = pick_token(logits.expand(n, 5), s, torch.rand(n, 5, generator=g))
    freq = torch.bincount(draws, minlength=5).float() / n
    expected = torch.zeros(5)
    keep = torch.tensor([0, 1, 2, 4])
    expected[keep] = (logits[0, keep] / 2.0).softmax(-1)
    assert freq[3] == 0
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


def test_seeded_sampling_repeats():
    logits = torch.randn(3, 30)
    a = [next_token(logits, Sampling(top_k=10), Sampling(seed=7).generator(torch.device("cpu"))) for _ in range(1)]
    b = [next_token(logits, Sampling(top_k=10), Sampling(seed=7).generator(torch.device("cpu"))) for _ in range(1)]
    assert torch.equal(a[0], b[0])


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError, match="unknown sampling option.*topk"):
        Sampling.from_kwargs(topk=3)


def test_guided_pick_mixes_conditional_and_unconditional_logits():
    # the engine's classifier-free guidance: uncond + scale * (cond - uncond), then the usual rule (on CUDA the mix
    # is fused into the Triton sampler, tests/gpu/test_fast_kernels.py)
    torch.manual_seed(0)
    cond, uncond, noise = torch.randn(4, 64), torch.randn(4, 64), torch.rand(4, 64)
    s = Sampling(temperature=0.9, top_k=10)
    for scale in (0.0, 1.0, 3.0):
        assert torch.equal(pick_guided(cond, uncond, scale, s, noise),
                           pick_token(uncond + scale * (cond - uncond), s, noise))
    assert torch.equal(pick_guided(cond, uncond, 0.0, s, noise), pick_token(uncond, s, noise))
