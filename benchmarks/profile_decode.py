"""Where a decode step's time goes (GPU): the Mamba-2 1.3B backbone step and the sampler, per variant and batch.

For each variant (eager kernels; compiled with a one-pass Triton state update, ours or mamba_ssm's; compiled
with the PyTorch state update) and batch: the median time of a CUDA-graph replay of one backbone step, the
bandwidth floor (weights plus reading and writing the SSM state once), and, with --profile, the heaviest kernels.
Run: python benchmarks/profile_decode.py [--batches 1,64,128] [--profile]
"""

from __future__ import annotations

import argparse

import torch

from omnicore.generation.graphs import GraphedStep
from omnicore.generation.sampling import Sampling, pick_token
from omnicore.plugins.backbones import build_mamba2
from omnicore.plugins.backbones.mamba2 import kernels

VARIANTS = {  # name -> (kernel, compile_decode, state update implementation)
    "eager+kernels": ("auto", False, "triton"),
    "compiled+triton ssu": ("auto", True, "triton"),
    "compiled+mamba_ssm ssu": ("auto", True, "mamba_ssm"),
    "compiled+torch ssu": ("torch", True, None),
}


def replay_ms(fn, reps: int = 50) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def floor_ms(model, batch: int, bandwidth: float) -> float:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(c.ssm_state.numel() * c.ssm_state.element_size() for c in
                model.allocate_inference_state(batch, 8).layers)
    return (weights + 2 * state) / bandwidth * 1e3


def measure_bandwidth() -> float:
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = replay_ms(lambda: b.copy_(a), 20)
    return 2 * a.numel() / (ms / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64,128")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", action="store_true", help="print the heaviest kernels of one step")
    args = ap.parse_args()
    bw = measure_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s")
    torch.manual_seed(0)
    model = build_mamba2(size="1.3b", lora={"tasks": ["mmu", "t2i"], "dropout": 0.0}, device="cuda",
                         dtype="bfloat16").eval()
    rows = []
    for name in args.variants.split(","):
        kernel, compiled, impl = VARIANTS[name]
        kernels.STATE_UPDATE_IMPL = impl or kernels.STATE_UPDATE_IMPL
        for block in model.layers:
            block.mixer.kernel = kernel
        model.compile_decode = compiled
        for b in [int(x) for x in args.batches.split(",")]:
            with torch.inference_mode():
                state = model.allocate_inference_state(b, 128)
                model(torch.randn(b, 72, 2048, device="cuda", dtype=torch.bfloat16), task="t2i", state=state)
                x = torch.randn(b, 1, 2048, device="cuda", dtype=torch.bfloat16)
                runner = GraphedStep(lambda: model(x, task="t2i", state=state), state.tensors(), True,
                                     torch.device("cuda"))
                runner()
                ms = replay_ms(runner)
                if args.profile:
                    from torch.profiler import ProfilerActivity, profile

                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        model(x, task="t2i", state=state)
                        torch.cuda.synchronize()
                    print(f"\n{name} batch {b}: kernels of one eager-launched step")
                    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
            rows.append((name, b, ms, floor_ms(model, b, bw)))
            print(f"{name:22s} batch {b:4d}: step {ms:7.3f} ms  floor {rows[-1][3]:6.3f} ms  "
                  f"x{ms / rows[-1][3]:.2f} of floor", flush=True)
    # the sampler alone (top-k 1000 over the 16384 image codes), captured the same way
    for b in [int(x) for x in args.batches.split(",")]:
        logits = torch.randn(b, 16384, device="cuda")
        noise = torch.rand(b, 16384, device="cuda")
        out = torch.zeros(b, dtype=torch.long, device="cuda")
        s = Sampling(temperature=1.0, top_k=1000)
        runner = GraphedStep(lambda: out.copy_(pick_token(logits, s, noise)), [out], True, torch.device("cuda"))
        runner()
        print(f"sampler top-k 1000     batch {b:4d}: {replay_ms(runner):7.3f} ms")


if __name__ == "__main__":
    main()
