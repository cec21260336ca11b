"""Prefill and decode throughput of the Mamba-2 backbone: PyTorch path vs mamba_ssm's Triton kernels.

    python benchmarks/bench_backbone.py                       # 130m and 1.3b shapes, batch 1 and 64, bf16
    python benchmarks/bench_backbone.py --device cpu --sizes tiny --batches 2 --kernels torch   # smoke test

Random weights, backbone only (embeddings in, hidden states out). Prefill: a prompt of --prompt tokens into a
fresh inference state. Decode: one token per step after a 16-token prompt, eager and as a replayed CUDA graph.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from omnicore.plugins.backbones import build_mamba2  # noqa: E402


def timed(fn, repeat: int, device: str) -> float:
    """Seconds per call (mean of ``repeat`` after the caller's warm-up)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def set_kernel(model, kernel: str) -> None:
    for block in model.layers:
        if hasattr(block.mixer, "kernel"):
            block.mixer.kernel = kernel


@torch.inference_mode()
def bench(model, batch: int, prompt: int, steps: int, device: str, dtype) -> dict[str, float]:
    D = model.d_model
    out: dict[str, float] = {}
    x = torch.randn(batch, prompt, D, device=device, dtype=dtype)
    state = model.allocate_inference_state(batch, prompt)

    def prefill():
        state.reset()
        model(x, state=state)

    prefill()
    prefill()
    out["prefill_tok_s"] = batch * prompt / timed(prefill, 3, device)

    state = model.allocate_inference_state(batch, 16 + 4 * steps + 8)
    model(torch.randn(batch, 16, D, device=device, dtype=dtype), state=state)
    tok = torch.randn(batch, 1, D, device=device, dtype=dtype)
    for _ in range(3):
        model(tok, state=state)
    out["decode_eager_tok_s"] = batch / timed(lambda: model(tok, state=state), steps, device)
    if device == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(tok, state=state)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(tok, state=state)
        for _ in range(3):
            graph.replay()
        out["decode_graph_tok_s"] = batch / timed(graph.replay, steps, device)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="130m,1.3b")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--kernels", default="torch,mamba_ssm")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = []
    if args.device == "cuda":
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, prompt {args.prompt}, "
              f"{args.steps} decode steps", flush=True)
    print(f"{'size':<6} {'kernel':<10} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode+graph tok/s':>19}",
          flush=True)
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        model = build_mamba2(size=size, kernel="torch", device=args.device, dtype=args.dtype).eval()
        for kernel in args.kernels.split(","):
            set_kernel(model, kernel)
            for batch in [int(b) for b in args.batches.split(",")]:
                r = bench(model, batch, args.prompt, args.steps, args.device, dtype)
                rows.append({"size": size, "kernel": kernel, "batch": batch, **r})
                graph = f"{r['decode_graph_tok_s']:>19,.0f}" if "decode_graph_tok_s" in r else f"{'-':>19}"
                print(f"{size:<6} {kernel:<10} {batch:>5} {r['prefill_tok_s']:>14,.0f} "
                      f"{r['decode_eager_tok_s']:>13,.0f} {graph}", flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
