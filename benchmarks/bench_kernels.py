"""Decode-step kernels on their own (GPU): the fused top-k Gumbel sampler against PyTorch's.

Every time is per call, from replays of a CUDA graph of back-to-back calls. (Session 4 also swept a Triton skinny
GEMM here against cuBLAS; it only matched cuBLAS and was removed: benchmarks/NOTES.md.) Run:
python benchmarks/bench_kernels.py [--rows 1,64,128]
"""

from __future__ import annotations

import argparse

import torch

from omnicore.generation import triton_sampling
from omnicore.generation.sampling import Sampling, pick_token
from timing import graph_us, replay_ms  # benchmarks/timing.py (this script's folder is on sys.path)


def bench_sampler(rows_list) -> None:
    V, k = 16384, 1000
    s = Sampling(temperature=1.0, top_k=k)
    for b in rows_list:
        logits = torch.randn(b, V, device="cuda") * 3
        uncond = torch.randn(b, V, device="cuda") * 3
        noise = torch.rand(b, V, device="cuda")
        out = torch.zeros(b, dtype=torch.long, device="cuda")
        t_torch = graph_us(lambda i: out.copy_(pick_token(logits, s, noise)), 8)
        t_torch_g = graph_us(lambda i: out.copy_(pick_token(uncond + 3.0 * (logits - uncond), s, noise)), 8)
        t_tri = graph_us(lambda i: triton_sampling.topk_gumbel(logits, noise, 1.0, k, out=out), 8)
        t_tri_g = graph_us(lambda i: triton_sampling.topk_gumbel(logits, noise, 1.0, k, uncond, 3.0, out=out), 8)
        ref = pick_token(logits, s, noise)
        got = triton_sampling.topk_gumbel(logits, noise, 1.0, k)
        print(f"sampler V={V} top_k={k} batch {b:4d}: torch {t_torch:7.1f} us (guided {t_torch_g:7.1f}), "
              f"triton {t_tri:6.1f} us (guided {t_tri_g:6.1f}); same token {float((ref == got).float().mean()):.4f}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,64,128")
    args = ap.parse_args()
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    bw = 2 * a.numel() / (replay_ms(lambda: b.copy_(a), 10) / 1e3)
    del a, b
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = [int(r) for r in args.rows.split(",")]
    bench_sampler(rows)


if __name__ == "__main__":
    main()
