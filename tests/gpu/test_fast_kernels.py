"""GPU: the fused top-k Gumbel sampler keeps exactly PyTorch's top-k set and draws from the same distribution.

Run on a machine with CUDA: ``pytest -m gpu tests/gpu/test_fast_kernels.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from omnicore.generation import sampling, triton_sampling
from omnicore.generation.sampling import Sampling, pick_guided, pick_token

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _kept_by_kernel(logits: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """(V,) row -> (V,) bool: which entries the kernel keeps. Row j of a (V, V) batch has a huge Gumbel draw at j
    and tiny ones elsewhere, so it returns j exactly when j is kept."""
    V = logits.shape[-1]
    rows = logits[None].expand(V, V).contiguous()
    noise = torch.full((V, V), 1e-30, device="cuda")
    noise.fill_diagonal_(1 - 2 ** -24)
    tok = triton_sampling.topk_gumbel(rows, noise, temperature, k)
    return tok == torch.arange(V, device="cuda")


@pytest.mark.parametrize("V,k", [(16384, 1000), (1000, 37), (300, 1), (50, 49)])
def test_fused_sampler_keeps_exactly_the_top_k(V, k):
    torch.manual_seed(0)
    logits = torch.rand(V, device="cuda") * 2 - 1  # in [-1, 1]: the spike (+16.6) decides among the kept
    logits[:20] = logits[5]  # ties at some value
    logits[20:40] = -0.0
    logits[40:60] = 0.0
    if V > 100:
        top = torch.topk(logits, k).values[-1]
        logits[60:80] = top  # ties at the threshold
    kept = _kept_by_kernel(logits, k)
    expected = ~(logits < torch.topk(logits, k).values[-1])  # pick_token's rule: drop entries below the k-th
    assert torch.equal(kept, expected)
    # the same with the guidance mix done in the kernel
    uncond = torch.randn(V, device="cuda")
    mixed = uncond + 1.5 * (logits - uncond)
    V_ = V
    rows, un = logits[None].expand(V_, V_).contiguous(), uncond[None].expand(V_, V_).contiguous()
    noise = torch.full((V_, V_), 1e-30, device="cuda")
    noise.fill_diagonal_(1 - 2 ** -24)
    tok = triton_sampling.topk_gumbel(rows, noise, 1.0, k, un, 1.5)
    kept = tok == torch.arange(V_, device="cuda")
    expected = ~(mixed < torch.topk(mixed, k).values[-1])
    # a spike of +16.6 wins unless the mixed logits differ by more: only compare where they are in range
    assert torch.equal(kept, expected) or (mixed.max() - mixed.min()) > 16


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_fused_sampler_gives_pytorchs_token_for_the_same_noise(guided):
    torch.manual_seed(1)
    B, V = 64, 16384
    cond, uncond = torch.randn(B, V, device="cuda") * 3, torch.randn(B, V, device="cuda") * 3
    agree = []
    for temperature, k in [(1.0, 1000), (0.7, 50), (1.3, None), (1.0, V)]:
        s = Sampling(temperature=temperature, top_k=k)
        for _ in range(5):
            noise = torch.rand(B, V, device="cuda")
            sampling.FUSED_SAMPLER = False
            ref = pick_guided(cond, uncond, 3.0, s, noise) if guided else pick_token(cond, s, noise)
            sampling.FUSED_SAMPLER = True
            got = pick_guided(cond, uncond, 3.0, s, noise) if guided else pick_token(cond, s, noise)
            agree.append((ref == got).float().mean().item())
    # the same arithmetic up to the last bit of log (and the fused multiply-add of the guidance mix)
    assert min(agree) > 0.98 and sum(agree) / len(agree) > 0.995, agree


def test_fused_sampler_draws_from_the_softmax_of_the_top_k():
    torch.manual_seed(2)
    V, k, n, T = 24, 6, 400_000, 0.8
    logits = torch.randn(V, device="cuda")
    noise = torch.rand(n, V, device="cuda")
    tok = triton_sampling.topk_gumbel(logits[None].expand(n, V).contiguous(), noise, T, k)
    counts = torch.bincount(tok, minlength=V).double().cpu()
    top = torch.topk(logits, k).indices.cpu()
    outside = torch.ones(V, dtype=torch.bool)
    outside[top] = False
    assert counts[outside].sum() == 0
    p = torch.softmax(logits.double().cpu()[top] / T, -1)
    expected = p * n
    chi2 = float(((counts[top] - expected) ** 2 / expected).sum())
    assert chi2 < 22.5, chi2  # chi-square with 5 degrees of freedom: p = 0.0004


def test_greedy_and_unsupported_rules_keep_the_pytorch_path():
    torch.manual_seed(3)
    logits = torch.randn(4, 1000, device="cuda")
    noise = torch.rand(4, 1000, device="cuda")
    assert torch.equal(pick_token(logits, Sampling(greedy=True), noise), logits.argmax(-1))
    s = Sampling(temperature=1.0, top_p=0.5)
    assert not sampling._fused(logits, s, noise, None)
    s = Sampling(temperature=1.0, top_k=5, repetition_penalty=1.2)
    assert not sampling._fused(logits, s, noise, torch.zeros(4, 1000, dtype=torch.bool, device="cuda"))
    assert sampling._fused(logits, Sampling(temperature=1.0, top_k=5), noise, None)
