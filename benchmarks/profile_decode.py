"""Where a decode step's time goes (GPU): the Mamba-2 1.3B backbone step and the sampler, per variant and batch.

For each variant (eager kernels; compiled with a one-pass Triton state update, ours or mamba_ssm's; compiled
with the PyTorch state update; the compiled step before merged LoRA weights and the one-pass conv update, and with
each alone) and batch: the median time of a CUDA-graph replay of one backbone step, the bandwidth floor (weights
plus reading and writing the SSM state once), with --profile the heaviest kernels, with --sweep the tile sizes of
the one-pass kernels, with --prefill the graphed 72-token prefill (Triton or PyTorch conv, empty or read state),
with --gemv-sweep / --gemm-sweep ROWS the tiles of the fused step's GEMV or tensor-core products (triton_gemv.py)
against cuBLAS (the best ones are then used for the rest of the run), and for the batches the fused step takes
(fused_step.takes) its outputs against the compiled step's.
Run: python benchmarks/profile_decode.py [--batches 1,64,128] [--variants a,b] [--profile] [--prefill] [--gemv-sweep]
     [--gemm-sweep 64,16,128]
"""

from __future__ import annotations

import argparse

import torch

from omnicore.generation.graphs import GraphedStep
from omnicore.generation.sampling import Sampling, pick_token
from omnicore.plugins.backbones import build_mamba2
from omnicore.plugins.backbones.mamba2 import compiled_step, fused_step, kernels
from timing import graph_us, replay_ms  # benchmarks/timing.py (this script's folder is on sys.path)

VARIANTS = {  # name -> (kernel, compile_decode, state update, conv update, merged LoRA weights for decoding,
    #                    smallest batch for the one-pass state update in the compiled step)
    "eager+kernels": ("auto", False, "triton", "triton", True, 8),
    "compiled (before)": ("auto", True, "triton", "torch", False, 8),  # no merged LoRA, no conv kernel
    "compiled+merged lora": ("auto", True, "triton", "torch", True, 8),
    "compiled+conv kernel": ("auto", True, "triton", "triton", False, 8),
    "compiled+triton ssu": ("auto", True, "triton", "triton", True, 1),  # the default
    "compiled+mamba_ssm ssu": ("auto", True, "mamba_ssm", "triton", True, 8),
    "compiled+torch ssu": ("torch", True, None, "triton", True, 8),
    "compiled dt/A apart": ("auto", True, "triton", "triton", True, 8),  # the default before FUSE_DT_A
    "compiled ssu from 8": ("auto", True, "triton", "triton", True, 8),  # Inductor's update below 8, norm apart
    "compiled norm apart": ("auto", True, "triton", "triton", True, 1),
    "compiled norm folded": ("auto", True, "triton", "triton", True, 1),  # at every batch
    "fused step": ("auto", True, "triton", "triton", True, 1),  # the default: fused_step.py where it takes the batch
    "compiled no pdl": ("auto", True, "triton", "triton", True, 1),  # the default without programmatic dependent launch
    "fused step pdl": ("auto", True, "triton", "triton", True, 1),
}
PDL_FROM = {"fused step pdl": 1}  # variants with kernels.PDL on from this batch (the others: the default's setting)
# variants without PDL: the default without it, and the earlier defaults (PDL on by default since 2026-12-02)
PDL_OFF = {"compiled no pdl", "compiled (before)", "compiled+merged lora", "compiled+conv kernel",
           "compiled dt/A apart", "compiled ssu from 8"}
FUSED = {"fused step", "fused step pdl"}  # variants with the fused step (model.fused_decode)
UNFUSED_DT_A = {"compiled dt/A apart"}  # variants with dt's softplus and -exp(A_log) outside the state update
FOLD_BELOW = {"compiled dt/A apart": 0, "compiled ssu from 8": 0, "compiled norm apart": 0,
              "compiled norm folded": 1 << 30}  # kernels.FOLD_GATED_NORM_BELOW, where not the default


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


def sweep(b: int, bw: float) -> None:
    """Tile sizes of the one-pass kernels (triton_step.py) at the 1.3B mixer shape: time and share of bandwidth."""
    from omnicore.plugins.backbones.mamba2 import triton_step

    h, p, n, dim = 64, 64, 128, 4096 + 256
    kw = dict(device="cuda", dtype=torch.bfloat16)
    states = [torch.randn(b, h, p, n, **kw) for _ in range(3)]  # rotate through more than L2 holds
    x, dt = torch.randn(b, h, p, **kw), torch.rand(b, h, device="cuda") * 0.1
    A, D = -torch.rand(h, device="cuda"), torch.randn(h, **kw)
    B, C = torch.randn(b, 1, n, **kw), torch.randn(b, 1, n, **kw)
    nbytes = 2 * states[0].numel() * 2
    for block_p in (8, 16, 32, 64):
        for warps in (2, 4, 8):
            us = graph_us(lambda i: triton_step.state_update(states[i % 3], x, dt, A, B, C, D, block_p, warps))
            print(f"state update batch {b} block_p {block_p:3d} warps {warps}: {us:6.1f} us "
                  f"{nbytes / (us / 1e6) / bw:5.0%} of copy bandwidth")
    convs = [torch.randn(b, dim, 4, **kw) for _ in range(max(4, 2**27 // (b * dim * 8)))]
    xc, w, bias = torch.randn(b, dim + 64, **kw)[:, :dim], torch.randn(dim, 4, **kw), torch.randn(dim, **kw)
    nbytes = 2 * convs[0].numel() * 2
    for block_c in (128, 256, 512, 1024):
        for warps in (1, 2, 4, 8):
            if block_c < 32 * warps:
                continue
            us = graph_us(lambda i: triton_step.conv_update(convs[i % len(convs)], xc, w, bias, True, block_c, warps))
            print(f"conv update batch {b} block_c {block_c:4d} warps {warps}: {us:6.2f} us "
                  f"{nbytes / (us / 1e6) / bw:5.0%} of copy bandwidth")


def gemv_sweep(bw: float, rows=(1, 2, 4)) -> None:
    """Tiles of triton_gemv.gemv at the 1.3B layer's two products (with their fused scale + conv, or scale + residual)
    against cuBLAS's plain product, weights rotated through more than L2 holds; the fastest tiles are kept for this
    run. All tiles at the first row count, the five best of those at the others. Rows up to triton_gemv.MAX_ROWS
    time the GEMV, rows above the tensor-core kernel (its table is by row tile)."""
    import torch.nn.functional as F

    from omnicore.plugins.backbones.mamba2 import triton_gemv

    kw = dict(device="cuda", dtype=torch.bfloat16)
    gemm = rows[0] > triton_gemv.MAX_ROWS
    for name, (N, K) in (("in_proj", (8512, 2048)), ("out_proj", (2048, 4096))):
        if gemm:
            table = triton_gemv.GEMM_IN_PROJ_TILES if name == "in_proj" else triton_gemv.GEMM_OUT_PROJ_TILES
        else:
            table = triton_gemv.IN_PROJ_TILES if name == "in_proj" else triton_gemv.OUT_PROJ_TILES
        copies = int(150e6 // (N * K * 2)) + 1
        Ws = [torch.randn(N, K, **kw) * 0.02 for _ in range(copies)]
        floor = N * K * 2 / bw * 1e6
        ranked: list = []
        for M in rows:
            x = torch.randn(M, K, **kw)
            parts = torch.rand(M, 256, device="cuda")
            cs, cw, cb = torch.randn(M, 4352, 4, **kw), torch.randn(4352, 4, **kw), torch.randn(4352, **kw)
            stream, nw, nxt = torch.randn(M, N, device="cuda"), torch.rand(N, **kw), torch.empty(M, N, **kw)

            def extra(tiles):
                if name == "in_proj":
                    return dict(scale=(parts, K, 1e-5), conv=(cs, cw, cb, 4096))
                sums = torch.empty(M, -(-N // tiles[0]), device="cuda")
                return dict(scale=(parts, K, 1e-5), residual=(stream, nw, nxt, sums))
            cublas = graph_us(lambda i: F.linear(x, Ws[i % copies]))
            if M != rows[0]:  # the five best of the first row count that fit
                configs = [c for c in ranked[:5] if gemm or c[0] * c[1] * M <= 4096 * c[2]] or [
                    table[triton_gemv.gemm_rows(M) if gemm else M]]
            elif gemm:
                widths = (32, 64, 128) if name == "in_proj" else (16, 32, 64)  # at least ~32 programs
                configs = [(bn, bk, w, st) for bn in widths for bk in (64, 128, 256) for w in (4, 8) for st in (3, 4)]
            else:
                configs = [(bn, bk, w) for bn in (8, 16, 32, 64) for bk in (128, 256, 512, 1024) for w in (4, 8)
                           if bn * bk * M <= 4096 * w]
            timed = []
            for tiles in configs:
                kw_t = extra(tiles)
                try:
                    us = graph_us(lambda i: triton_gemv.gemv(x, Ws[i % copies], tiles=tiles, **kw_t))
                except Exception as e:  # a tile that does not fit in shared memory or registers
                    print(f"  {name} rows {M} tiles {tiles}: {type(e).__name__}", flush=True)
                    continue
                timed.append((us, tiles))
            timed.sort()
            if M == rows[0]:
                ranked = [t for _, t in timed]
            us, best = timed[0]
            table[triton_gemv.gemm_rows(M) if gemm else M] = best
            bare = graph_us(lambda i: triton_gemv.gemv(x, Ws[i % copies], tiles=best))  # the product alone
            kw_b = extra(best)
            for part in kw_b:  # each epilogue on its own
                one = {part: kw_b[part]}
                print(f"  {name} rows {M} {best}: with {part} only "
                      f"{graph_us(lambda i: triton_gemv.gemv(x, Ws[i % copies], tiles=best, **one)):6.2f} us")
            print(f"{'gemm' if gemm else 'gemv'} {name} rows {M}: cuBLAS (plain) {cublas:6.2f} us, fused Triton best "
                  f"{us:6.2f} us {best}, without its epilogue {bare:6.2f} us (next "
                  f"{', '.join(f'{u:.2f} {t}' for u, t in timed[1:4])}); floor {floor:.2f} us",
                  flush=True)


def fused_parity(model, batches) -> None:
    """Outputs and states of 8 fused steps against 8 compiled steps from the same state (relative max diff)."""
    for b in [b for b in batches if fused_step.takes(b)]:
        with torch.inference_mode():
            state = model.allocate_inference_state(b, 128)
            model(torch.randn(b, 72, 2048, device="cuda", dtype=torch.bfloat16), task="t2i", state=state)
            start = state.snapshot()
            xs = torch.randn(8, b, 1, 2048, device="cuda", dtype=torch.bfloat16)
            outs = {}
            for fused in (True, False):
                model.fused_decode = fused
                state.restore(start)
                steps = torch.cat([model(x, task="t2i", state=state) for x in xs], 1).float()
                outs[fused] = (steps, state.layers[-1].ssm_state.float(), state.layers[-1].conv_state.float())
        errs = [float((a - c).abs().max() / c.abs().max()) for a, c in zip(outs[True], outs[False])]
        print(f"fused vs compiled step, batch {b}: outputs {errs[0]:.1e}, last ssm state {errs[1]:.1e}, "
              f"conv state {errs[2]:.1e} (relative max diff, 8 steps)", flush=True)


def prefill(model, batches) -> None:
    """The 72-token T2I prefill of the backbone captured as a CUDA graph, per batch: the Triton causal conv and
    an empty state (not read) against the PyTorch conv and a state read as if it held data; outputs compared."""
    for b in batches:
        x = torch.randn(b, 72, 2048, device="cuda", dtype=torch.bfloat16)
        state = model.allocate_inference_state(b, 128)
        results = {}
        for conv in ("triton", "torch"):
            for empty in (True, False):
                kernels.PREFILL_CONV_IMPL = conv

                def run():
                    state.mark_empty() if empty else state.mark_written()
                    return model(x, task="t2i", state=state)

                with torch.inference_mode():
                    state.reset()  # outputs from a zero state (replays below read what the last one wrote)
                    results[(conv, empty)] = out = run().float()
                    runner = GraphedStep(run, state.tensors(), True, torch.device("cuda"))
                    runner()
                    ms = replay_ms(runner, 20)
                ref = results[("triton", True)]
                err = float((out - ref).abs().max() / ref.abs().max())
                print(f"prefill 72 tokens batch {b:3d}: conv {conv:6s} state {'empty' if empty else 'read '}: "
                      f"{ms:7.2f} ms  (rel diff to the first {err:.1e})", flush=True)
    kernels.PREFILL_CONV_IMPL = "triton"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64,128")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", action="store_true", help="print the heaviest kernels of one step")
    ap.add_argument("--sweep", action="store_true", help="time the Triton kernels' tile sizes per batch")
    ap.add_argument("--prefill", action="store_true", help="time the 72-token prefill (conv kernel, empty state)")
    ap.add_argument("--gemv-sweep", action="store_true", help="time the fused GEMV's tiles, keep the best")
    ap.add_argument("--gemm-sweep", default="", help="rows (e.g. 64,16,128): time the fused tensor-core tiles")
    ap.add_argument("--min-gemm-batch", type=int, default=None, help="fused_step.MIN_GEMM_BATCH for this run")
    args = ap.parse_args()
    bw = measure_bandwidth()
    if args.min_gemm_batch is not None:
        fused_step.MIN_GEMM_BATCH = args.min_gemm_batch
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s, "
          f"PDL supported: {kernels.pdl_supported(torch.device('cuda'))}, Inductor PDL option: "
          f"{hasattr(torch._inductor.config.triton, 'enable_pdl')}")
    if args.sweep:
        for b in [int(x) for x in args.batches.split(",")]:
            sweep(b, bw)
    if args.gemv_sweep:
        gemv_sweep(bw)
    if args.gemm_sweep:
        gemv_sweep(bw, tuple(int(r) for r in args.gemm_sweep.split(",")))
    torch.manual_seed(0)
    model = build_mamba2(size="1.3b", lora={"tasks": ["mmu", "t2i"], "dropout": 0.0}, device="cuda",
                         dtype="bfloat16").eval()
    if args.prefill:
        prefill(model, [int(x) for x in args.batches.split(",")])
    fused_parity(model, [int(x) for x in args.batches.split(",")])
    rows = []
    fold_default, pdl_default, pdl_from_default = kernels.FOLD_GATED_NORM_BELOW, kernels.PDL, kernels.PDL_MIN_BATCH
    for name in [v for v in args.variants.split(",") if v]:
        kernel, compiled, impl, conv, merge, ssu_min_batch = VARIANTS[name]
        compiled_step.KERNEL_MIN_BATCH = ssu_min_batch
        kernels.STATE_UPDATE_IMPL = impl or kernels.STATE_UPDATE_IMPL
        kernels.CONV_UPDATE_IMPL = conv
        kernels.FUSE_DT_A = name not in UNFUSED_DT_A
        kernels.FOLD_GATED_NORM_BELOW = FOLD_BELOW.get(name, fold_default)
        kernels.PDL = (pdl_default or name in PDL_FROM) and name not in PDL_OFF
        kernels.PDL_MIN_BATCH = PDL_FROM.get(name, pdl_from_default)
        for block in model.layers:
            block.mixer.kernel = kernel
        model.compile_decode = compiled
        model.merge_lora_decode = merge
        model.fused_decode = name in FUSED
        for b in [int(x) for x in args.batches.split(",")]:
            with torch.inference_mode():
                state = model.allocate_inference_state(b, 128)
                model(torch.randn(b, 72, 2048, device="cuda", dtype=torch.bfloat16), task="t2i", state=state)
                x = torch.randn(b, 1, 2048, device="cuda", dtype=torch.bfloat16)
                runner = GraphedStep(lambda: model(x, task="t2i", state=state), state.tensors(), True,
                                     torch.device("cuda"))
                runner()
                ms = replay_ms(runner, 50)
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
        print(f"sampler top-k 1000     batch {b:4d}: {replay_ms(runner, 50):7.3f} ms")


if __name__ == "__main__":
    main()
