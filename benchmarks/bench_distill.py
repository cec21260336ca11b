"""Long-context cost of a distilled student against its Transformer teacher (mmMamba reports 20.6x faster and
75.8% less memory than HoVLE at 103K tokens, and ships no script).

A 1.8B-shaped teacher (InternLM2-1.8B's dimensions: d_model 2048, 24 layers, 16 heads on 8 kv heads, head_dim 128,
MLP 8192, vocabulary 92544; random weights), its linear student (every layer a seeded mmMamba mixer) and its hybrid
student (1 layer in 4 kept as attention), batch 1: each prompt length is prefilled (in chunks, through the
inference state) and then 256 tokens are decoded greedily (embedding, backbone step, LM head, argmax). Reported per
length and model: prefill seconds, decode tokens/s, peak GPU memory (weights included), and the student's decode
speed-up and memory against the teacher's. One table, one run.

    python benchmarks/bench_distill.py                       # GPU: 4K, 16K, 64K, 128K prompts + 256 tokens
    python benchmarks/bench_distill.py --device cpu --tiny   # a smoke run of the same code at toy sizes
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

import omnicore
from omnicore.plugins.backbones.transformer.student import StudentBackbone

FULL = {"d_model": 2048, "n_layer": 24, "n_head": 16, "n_kv_head": 8, "d_intermediate": 8192, "vocab": 92544,
        "rope_theta": 1e6}
TINY = {"d_model": 64, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "d_intermediate": 128, "vocab": 512,
        "rope_theta": 1e4}


def build(dims: dict, max_len: int, device: torch.device, dtype: torch.dtype, hybrid_every: int):
    torch.manual_seed(0)
    teacher = omnicore.create("backbone", "transformer", arch="internlm2", d_model=dims["d_model"],
                              n_layer=dims["n_layer"], n_head=dims["n_head"], n_kv_head=dims["n_kv_head"],
                              d_intermediate=dims["d_intermediate"], rope_theta=dims["rope_theta"],
                              max_position_embeddings=max_len, device=str(device))
    teacher = teacher.to(dtype).eval()
    head = omnicore.create("head", "text_lm", vocab_size=dims["vocab"], d_model=dims["d_model"]).to(device, dtype)
    hybrid = list(range(0, dims["n_layer"], hybrid_every))
    models = {"teacher": teacher,
              "linear": StudentBackbone.from_teacher(teacher).to(device, dtype).eval(),
              f"hybrid 1/{hybrid_every}": StudentBackbone.from_teacher(teacher, hybrid).to(device, dtype).eval()}
    for m in models.values():  # parked on the host; each goes to the device for its own measurement
        m.to("cpu")
    return models, head


@contextlib.contextmanager
def resident(backbone, device: torch.device):
    """Only the measured backbone (and the shared head) on the device, so each peak is that model's alone."""
    backbone.to(device)
    try:
        yield
    finally:
        backbone.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


@torch.no_grad()
def profile_decode(label: str, backbone, head, length: int, device: torch.device, dtype: torch.dtype) -> None:
    """The GPU kernels of 8 eager decode steps after a ``length``-token cache, top 12 by time."""
    state = backbone.allocate_inference_state(1, length + 16, dtype=dtype, device=device)
    backbone(torch.zeros(1, length, backbone.d_model, device=device, dtype=dtype), state=state)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    _sync(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(8):
            token = head.logits(backbone(head.embed(token), state=state)).argmax(-1)
        _sync(device)
    print(f"--- {label}: 8 decode steps after {length} tokens, GPU kernels")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graphed_step(backbone, head, state, token: torch.Tensor):
    """One greedy decode step (embedding, backbone step, LM head, argmax) captured as a CUDA graph reading and
    writing ``token`` in place; both models' steps are graph-safe (static shapes, the cache offset a tensor). Two
    eager steps first compile the kernels; the capture itself advances the state by one more token."""
    token = token.clone()
    for _ in range(2):
        token.copy_(head.logits(backbone(head.embed(token), state=state)).argmax(-1))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        token.copy_(head.logits(backbone(head.embed(token), state=state)).argmax(-1))
    return graph, token


@torch.no_grad()
def measure(backbone, head, length: int, new_tokens: int, chunk: int, device: torch.device,
            dtype: torch.dtype, graph: bool = False) -> dict:
    """Prefill ``length`` random embeddings in chunks, then decode ``new_tokens`` greedily (each step a CUDA graph
    replay with ``graph``); times and peak memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator(device=device).manual_seed(length)
    state = backbone.allocate_inference_state(1, length + new_tokens + (3 if graph else 0), dtype=dtype,
                                              device=device)
    _sync(device)
    t0 = time.perf_counter()
    h = None
    for start in range(0, length, chunk):
        x = torch.randn(1, min(chunk, length - start), backbone.d_model, generator=g, device=device, dtype=dtype)
        h = backbone(x, state=state)
    token = head.logits(h[:, -1:]).argmax(-1)
    _sync(device)
    t1 = time.perf_counter()
    if graph:
        step, token = _graphed_step(backbone, head, state, token)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            step.replay()
    else:
        for _ in range(new_tokens):
            h = backbone(head.embed(token), state=state)
            token = head.logits(h).argmax(-1)
    _sync(device)
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del state
    return {"prefill_s": t1 - t0, "decode_tok_s": new_tokens / (t2 - t1), "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy dimensions and lengths (a smoke run, e.g. on CPU)")
    ap.add_argument("--lengths", default=None, help="prompt lengths, comma separated (default 4K,16K,64K,128K; "
                                                     "tiny: 64,256)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens decoded after each prompt (256; tiny 8)")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk (4096; tiny 32): the teacher's "
                                                             "attention mask is chunk x length")
    ap.add_argument("--hybrid-every", type=int, default=4, help="the hybrid keeps layers 0, k, 2k, ... as attention")
    ap.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--profile", action="store_true", help="also print each model's top GPU kernels over 8 eager "
                                                            "decode steps at the shortest length")
    ap.add_argument("--eager", action="store_true", help="decode step by step in Python (default on CUDA: each "
                                                          "model's decode step replayed as a CUDA graph)")
    args = ap.parse_args()
    device = torch.device(args.device)
    dims = TINY if args.tiny else FULL
    lengths = [int(x) for x in (args.lengths or ("64,256" if args.tiny else "4096,16384,65536,131072")).split(",")]
    new_tokens = args.new_tokens or (8 if args.tiny else 256)
    chunk = args.chunk or (32 if args.tiny else 4096)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    graph = device.type == "cuda" and not args.eager
    models, head = build(dims, max(lengths) + new_tokens, device, dtype, args.hybrid_every)
    name = "tiny" if args.tiny else "InternLM2-1.8B-shaped"
    print(f"{name} teacher vs students on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{dtype}, batch 1, +{new_tokens} tokens, prefill chunk {chunk}, decode "
          f"{'one CUDA graph a step' if graph else 'eager'}")
    for label, backbone in models.items():  # warm-up: kernels (a prefill of two chunks), allocator, first calls
        with resident(backbone, device):
            measure(backbone, head, min(min(lengths), 2 * chunk), 4, chunk, device, dtype, graph)
            if args.profile:
                profile_decode(label, backbone, head, min(lengths), device, dtype)
    rows = []
    for length in lengths:
        base = None
        for label, backbone in models.items():
            try:
                with resident(backbone, device):
                    r = measure(backbone, head, length, new_tokens, chunk, device, dtype, graph)
            except torch.cuda.OutOfMemoryError:
                r = None
            if label == "teacher":
                base = r
            rows.append((length, label, r, base))
    header = f"{'prompt':>8} {'model':<12} {'prefill s':>10} {'decode tok/s':>13} {'peak GiB':>9} " \
             f"{'decode vs teacher':>18} {'memory vs teacher':>18}"
    print(header)
    print("-" * len(header))
    for length, label, r, base in rows:
        if r is None:
            print(f"{length:>8} {label:<12} {'out of memory':>10}")
            continue
        speed = f"{r['decode_tok_s'] / base['decode_tok_s']:.1f}x" if base else "-"
        mem = (f"{100 * r['peak_gib'] / base['peak_gib']:.1f}%" if base and r["peak_gib"] is not None
               and base["peak_gib"] else "-")
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{length:>8} {label:<12} {r['prefill_s']:>10.3f} {r['decode_tok_s']:>13.1f} {peak:>9} "
              f"{speed:>18} {mem:>18}")


if __name__ == "__main__":
    main()
