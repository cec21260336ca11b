"""A fused top-k + Gumbel-max sampler for CUDA (Triton): one program per row, no sort.

Per row it (optionally) mixes the conditional and unconditional logits of classifier-free guidance, divides by the
temperature, finds the value of the k-th largest entry exactly by a 32-step bisection over the bits of an
order-preserving integer key (the row stays in registers; each step counts the entries at or above a candidate),
and returns ``argmax(logits / T + Gumbel(noise))`` over the entries at or above it. That is the same rule, the same
noise and the same arithmetic as ``sampling.pick_token`` (which keeps the entries not below ``torch.topk``'s k-th
value): the kept set is identical, ties included, and the token is the same up to the last bit of ``log``.

PyTorch's path (``torch.topk`` with k=1000 over 16384 codes, a mask, two logs, an argmax) is a dozen kernels, and the
top-k alone sorts. The PyTorch sampler stays the reference and the path for CPU, greedy decoding, top-p, min-p and
repetition penalties.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines without triton
    triton = None

MAX_VOCAB = 32768  # one row in registers (32 values per thread at 32 warps)


def _layout_problem(logits: torch.Tensor, noise: torch.Tensor, uncond: torch.Tensor | None) -> str | None:
    """Why the kernel cannot read these tensors as they are laid out, or None."""
    if logits.dim() != 2 or noise.shape != logits.shape or noise.dtype != torch.float32:
        return f"noise must be float32 {tuple(logits.shape)}, got {noise.dtype} {tuple(noise.shape)}"
    if uncond is not None and uncond.shape != logits.shape:
        return f"uncond {tuple(uncond.shape)} != logits {tuple(logits.shape)}"
    if any(t.stride(-1) != 1 for t in (logits, noise, uncond) if t is not None):
        return "rows must be contiguous"
    return None


def supported(logits: torch.Tensor, noise: torch.Tensor, top_k: int | None,
              uncond: torch.Tensor | None = None) -> bool:
    """Whether the fused sampler can take these ``(B, V)`` logits, noise and (guided) unconditional logits: CUDA,
    triton, V up to MAX_VOCAB, the layout ``topk_gumbel`` needs."""
    return (triton is not None and logits.is_cuda and logits.dim() == 2 and 0 < logits.shape[-1] <= MAX_VOCAB
            and (top_k is None or top_k >= 1) and _layout_problem(logits, noise, uncond) is None)


if triton is not None:
    @triton.jit
    def _topk_gumbel_kernel(cond_ptr, uncond_ptr, noise_ptr, out_ptr, V, c_stride, u_stride, n_stride,
                            scale, temperature, k, GUIDED: tl.constexpr, FILTER: tl.constexpr,
                            BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK_V)
        inside = offs < V
        x = tl.load(cond_ptr + row * c_stride + offs, mask=inside, other=0.0).to(tl.float32)
        if GUIDED:  # uncond + scale * (cond - uncond), as the engine mixes them
            u = tl.load(uncond_ptr + row * u_stride + offs, mask=inside, other=0.0).to(tl.float32)
            x = u + scale * (x - u)
        x = tl.math.div_rn(x, temperature)  # IEEE division, as torch
        keep = inside
        if FILTER:
            # order-preserving unsigned key of a float: negative -> all bits flipped, positive -> sign bit set
            bits = x.to(tl.int32, bitcast=True)
            bits = tl.where(bits == -2147483648, 0, bits)  # -0.0 is 0.0, as torch compares them
            key = tl.where(bits < 0, ~bits, bits | (-2147483648)).to(tl.uint32, bitcast=True)
            key = tl.where(inside, key, tl.zeros_like(key))
            # the largest t with #(key >= t) >= k is the key of the k-th largest entry: set its bits from the top
            t = tl.zeros((), dtype=tl.uint32)
            for i in tl.static_range(32):
                cand = t | (1 << (31 - i))
                count = tl.sum((key >= cand).to(tl.int32), axis=0)
                t = tl.where(count >= k, cand, t)
            keep = inside & (key >= t)
        n = tl.load(noise_ptr + row * n_stride + offs, mask=inside, other=0.5)
        g = -tl.log(-tl.log(tl.maximum(n, 1e-20)))
        score = tl.where(keep, x + g, float("-inf"))
        tl.store(out_ptr + row, tl.argmax(score, axis=0).to(tl.int64))


def topk_gumbel(logits: torch.Tensor, noise: torch.Tensor, temperature: float, top_k: int | None,
                uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, V)`` logits -> ``(B,)`` int64 tokens: argmax over the top ``top_k`` of ``logits / temperature`` (after
    ``uncond + guidance_scale * (logits - uncond)`` when ``uncond`` is given) plus Gumbel noise made from ``noise``
    (uniform in [0, 1), float32, ``(B, V)``). Rows must have a unit last stride."""
    problem = _layout_problem(logits, noise, uncond)
    if problem is not None:
        raise ValueError(f"topk_gumbel: {problem}")
    B, V = logits.shape
    if out is None:
        out = torch.empty(B, dtype=torch.long, device=logits.device)
    block = triton.next_power_of_2(V)
    warps = max(4, min(32, block // 1024))
    filt = top_k is not None and top_k < V
    _topk_gumbel_kernel[(B,)](logits, uncond if uncond is not None else logits, noise, out, V, logits.stride(0),
                              (uncond if uncond is not None else logits).stride(0), noise.stride(0),
                              float(guidance_scale), float(temperature), int(top_k or V), GUIDED=uncond is not None,
                              FILTER=filt, BLOCK_V=block, num_warps=warps)
    return out
