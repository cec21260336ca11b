"""Where one whole T2I decode step goes (GPU): sample -> embed -> backbone step -> head, as generate_codes runs it.

At the 1.3B shape (bench_generation.omni_model: random weights, bf16, 72-token prefix + 256 codes, temperature 1,
top_k 1000) and each batch: the whole generate_codes call, the prefill, one replay of the captured step (graph
alone and with the host's noise refill), the host loop of 256 steps, and each part of the step captured on its
own (sampler, code embedding, backbone step, head); with --profile the heaviest kernels of a replayed step; the
eager prefill with the one-kernel short scan and with mamba_ssm's chunked scan (--profile-prefill: their kernels).
Works on HEAD's engine too (for before/after in one run). Run: python benchmarks/profile_t2i_step.py [--combos 1:1,64:1,64:3] [--profile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generation import omni_model  # noqa: E402
from timing import replay_ms  # noqa: E402

from omnicore.generation import engine  # noqa: E402
from omnicore.generation.sampling import Sampling, pick_token  # noqa: E402
from omnicore.plugins.backbones.mamba2 import kernels  # noqa: E402


def graphed(fn):
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def wall(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--combos", default="1:1,16:1,64:1,64:3", help="batch:guidance_scale pairs")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--profile-prefill", action="store_true", help="kernel tables of one eager prefill, short "
                    "scan and chunked scan")
    args = ap.parse_args()
    tag = args.tag or os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    model = omni_model()
    s = Sampling(temperature=1.0, top_k=1000)
    caption = "x" * 68
    for combo in args.combos.split(","):
        b, scale = int(combo.split(":")[0]), float(combo.split(":")[1])
        with torch.inference_mode():
            name = f"[{tag}] batch {b} cfg {scale:g}"
            engine.generate_codes(model, [caption] * b, scale, s)  # compile, capture
            total = wall(lambda: engine.generate_codes(model, [caption] * b, scale, s), 2)
            ses = list(model.__dict__["_decode_sessions"].values())[-1]
            runner = ses.runner
            zero = torch.zeros_like(ses.t)  # the step counter goes back to 0 before each replay (index_copy bound)
            step_graph = replay_ms(lambda: (ses.t.copy_(zero), runner.graph.replay()))
            reset = replay_ms(lambda: ses.t.copy_(zero), 30)
            step_graph -= reset
            step_host = replay_ms(lambda: (ses.t.copy_(zero), ses.refill_noise(), runner())) - reset

            def loop():
                ses.t.zero_()
                for _ in range(255):
                    ses.refill_noise()
                    runner()

            loop_s = wall(loop, 1)
            # prefill as generate_codes does it
            prefixes = [model.layout.t2i_prefix(caption)] * b + ([model.layout.t2i_prefix(None)] * b if scale != 1
                                                                  else [])
            prefix = torch.tensor(prefixes, device=model.device)

            def prefill():
                with torch.inference_mode():
                    ses.start(s)
                    x = model.add_positions(model.t2i_prefix_embeddings(prefix), "t2i_positions")
                    h = model.backbone(x, task="t2i", state=ses.state)
                    ses.logits.copy_(model.heads["image"].logits(h[:, -1]))

            pre = wall(prefill)
            short_scan = kernels.SHORT_SCAN
            kernels.SHORT_SCAN = False
            pre_chunked = wall(prefill)
            kernels.SHORT_SCAN = short_scan
            print(f"{name}: eager prefill {pre * 1e3:.2f} ms with the short scan, {pre_chunked * 1e3:.2f} ms with "
                  f"mamba_ssm's chunked scan", flush=True)
            if args.profile_prefill and scale == 1:
                from torch.profiler import ProfilerActivity, profile

                for short in (True, False):
                    kernels.SHORT_SCAN = short
                    prefill()
                    torch.cuda.synchronize()
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        prefill()
                        torch.cuda.synchronize()
                    print(f"\n{name}: kernels of one eager prefill, {'short scan' if short else 'chunked scan'}")
                    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                                    max_name_column_width=70), flush=True)
                kernels.SHORT_SCAN = short_scan
            rows = ses.logits.shape[0]
            parts = {}
            with torch.inference_mode():
                code = torch.zeros(rows, dtype=torch.long, device="cuda")
                mixed = ses.logits[:b]
                parts["sampler"] = graphed(lambda: code[:b].copy_(pick_token(mixed, s, ses.noise)))
                e_out = torch.zeros(rows, 1, model.d_model, device="cuda", dtype=torch.bfloat16)
                parts["embed"] = graphed(lambda: e_out.copy_(model.add_positions(
                    model.code_embeddings(code[:, None]), "t2i_positions", (ses.offsets + ses.t)[:, None])))
                h_out = torch.zeros_like(e_out)
                parts["backbone"] = graphed(lambda: h_out.copy_(model.backbone(e_out, task="t2i", state=ses.state)))
                parts["head"] = graphed(lambda: ses.logits.copy_(model.heads["image"].logits(h_out[:, -1])))
            times = {k: replay_ms(g.replay, 30) for k, g in parts.items()}
            print(f"{name}: generate {total:.4f} s; prefill {pre * 1e3:.2f} ms; step graph {step_graph:.3f} ms, "
                  f"with refill {step_host:.3f} ms; host loop 255 steps {loop_s:.4f} s "
                  f"({loop_s / 255 * 1e3:.3f} ms/step); parts: "
                  + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())
                  + f"; sum {sum(times.values()):.3f} ms", flush=True)
            if args.profile and scale == 1 and b in (1, 64):
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    ses.t.zero_()
                    for _ in range(3):
                        ses.refill_noise()
                        runner()
                    torch.cuda.synchronize()
                print(f"\n{name}: kernels of 3 replayed steps")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for k, g in parts.items():
                        if k != "backbone":
                            g.replay()
                    torch.cuda.synchronize()
                print(f"\n{name}: kernels outside the backbone (sampler, embed, head graphs; 1 replay each)")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
            engine.clear_decode_cache(model)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
