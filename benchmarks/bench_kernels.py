"""Decode kernels on their own (GPU): the fused top-k Gumbel sampler against PyTorch's, and the prefill's one-kernel
short scan against mamba_ssm's chunked scan (with the float32 final state copied into a bf16 cache, as the mixer
did), at the 1.3B mixer's shape (64 heads of 64, d_state 128, one group) for each --rows batch and --lengths.

Every time is per call, from replays of a CUDA graph of back-to-back calls. (A Triton skinny GEMM was swept here
against cuBLAS too, on an H100 on 2026-11-28; it only matched cuBLAS and was removed: benchmarks/NOTES.md.) Run:
python benchmarks/bench_kernels.py [--rows 1,64,128] [--lengths 72] [--only sampler|scan]
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


def bench_short_scan(rows_list, lengths) -> None:
    import torch.nn.functional as F

    from omnicore.plugins.backbones.mamba2 import kernels, triton_short_scan

    h, p, n, conv = 64, 64, 128, 64 * 64 + 2 * 128
    chunk_scan = kernels.fast_ops().chunk_scan
    for b in rows_list:
        for l in lengths:
            torch.manual_seed(0)
            wide = torch.randn(b, l, 2 * h * p + 2 * n + h, device="cuda", dtype=torch.bfloat16)
            xBC = torch.randn(b, l, conv, device="cuda", dtype=torch.bfloat16)
            x = xBC[..., :h * p].reshape(b, l, h, p)
            B = xBC[..., h * p:h * p + n].reshape(b, l, 1, n)
            C = xBC[..., h * p + n:].reshape(b, l, 1, n)
            dt_raw = wide[..., -h:]
            dt_bias = torch.randn(h, device="cuda", dtype=torch.bfloat16) - 4
            A_log = torch.log(torch.rand(h, device="cuda") * 15 + 1).to(torch.bfloat16)
            D = torch.ones(h, device="cuda", dtype=torch.bfloat16)
            state = torch.empty(b, h, p, n, device="cuda", dtype=torch.bfloat16)

            def chunked(i):  # the mixer's path before: dt's softplus, A, the chunked scan, the state copy
                dt = F.softplus(dt_raw.float() + dt_bias.float())
                y, final = chunk_scan(x, dt, -torch.exp(A_log.float()), B, C, 256, D=D, z=None, dt_bias=None,
                                      initial_states=None, dt_softplus=False, return_final_states=True)
                state.copy_(final)
                return y

            t_chunked = graph_us(chunked, 4)
            y_ref, s_ref = chunked(0), state.clone()
            line = f"scan batch {b:3d} length {l:4d}: chunked + state copy {t_chunked:8.1f} us; short scan"
            for heads in (1, 2, 4, 8):
                for warps in (4, 8):
                    t = graph_us(lambda i: triton_short_scan.short_scan(x, dt_raw, dt_bias, A_log, B, C, D, state,
                                                                        heads=heads, num_warps=warps), 4)
                    line += f" h{heads}w{warps} {t:7.1f}"
            y = triton_short_scan.short_scan(x, dt_raw, dt_bias, A_log, B, C, D, state)
            err_y = float((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max())
            err_s = float((state.float() - s_ref.float()).abs().max() / s_ref.float().abs().max())
            print(line + f" us; default {triton_short_scan.HEADS_PER_PROGRAM} heads; rel. diff y "
                  f"{err_y:.1e}, state {err_s:.1e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,64,128")
    ap.add_argument("--lengths", default="72", help="prompt lengths for the short-scan rows")
    ap.add_argument("--only", choices=["sampler", "scan"], default=None)
    args = ap.parse_args()
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    bw = 2 * a.numel() / (replay_ms(lambda: b.copy_(a), 10) / 1e3)
    del a, b
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = [int(r) for r in args.rows.split(",")]
    if args.only != "scan":
        bench_sampler(rows)
    if args.only != "sampler":
        bench_short_scan(rows, [int(v) for v in args.lengths.split(",")])


if __name__ == "__main__":
    main()
