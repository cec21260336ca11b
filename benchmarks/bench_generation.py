"""Generation benchmark on a GPU: omnicore (Mamba-2 1.3B shape, random weights, bf16) against a same-size
Transformer (transformers' Llama: 2048 wide, 24 layers, 16 heads, MLP 5504), eager and static-cache compiled.

Jobs: T2I (72-token caption prefix + 256 codes) at batch 1/16/64, with and without guidance; MMU
(729 image positions + 64 text tokens, 128 new tokens); long generation 1K..16K tokens with peak memory.
Omnicore runs as two decode variants: CUDA graph over eager kernels ("graph") and CUDA graph over the
torch.compile'd step ("compiled"); "llama" in --jobs adds the Transformer baselines for the jobs chosen;
"imported" adds the same T2I and MMU jobs on a model imported by ``omni convert omnimamba`` from random files in the
release's layout at its own size (written to a temporary folder: about 7 GB of files).
Prints a table. Run: python benchmarks/bench_generation.py [--quick] [--jobs t2i,mmu,long,llama,imported]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import omnicore
from omnicore.generation import engine
from omnicore.generation.engine import clear_decode_cache, generate_codes, generate_text
from omnicore.generation.sampling import Sampling
from omnicore.model.unified import build_from_spec
from omnicore.plugins.backbones.mamba2 import backbone as backbone_module
from omnicore.plugins.backbones.mamba2 import compiled_step, fused_step, kernels

ROWS: list[dict] = []


def timed(fn, repeat: int = 3) -> tuple[float, float]:
    """Best wall time of ``repeat`` runs after one warm-up, and peak GiB of the last run."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, torch.cuda.max_memory_allocated() / 2**30


def record(model: str, job: str, batch: int, seconds: float, units: float, unit: str, peak: float) -> None:
    row = dict(model=model, job=job, batch=batch, seconds=seconds, rate=units / seconds, unit=unit, peak=peak)
    ROWS.append(row)
    print(f"{model:34s} {job:40s} {batch:4d} {seconds:9.3f}s {units / seconds:10.2f} {unit:9s} {peak:7.2f} GiB", flush=True)


VARIANTS = {"graph": False, "compiled": True}  # CUDA graph with eager kernels / with the torch.compile'd step


def label(variant: str) -> str:
    return f"omnicore mamba2-1.3b ({'graph+compile' if VARIANTS[variant] else 'graph'})"


def fresh_compiler() -> None:
    """Forget every compiled step: a later model of other shapes (a 50288-row text head after a 50304-row one)
    would otherwise be compiled with those dimensions made dynamic, slower than in a process of its own."""
    torch._dynamo.reset()


def omni_model(mmu_positions: int = 1500, kernel: str = "auto", compile_decode: bool = True):
    fresh_compiler()
    spec = {
        "text_tokenizer": {"type": "byte"},
        "backbone": {"type": "mamba2", "params": {"size": "1.3b", "kernel": kernel, "compile_decode": compile_decode,
                                                   "lora": {"tasks": ["mmu", "t2i"], "r": 8, "alpha": 32, "dropout": 0.0}}},
        "image_tokenizer": {"type": "vqgan"},
        "encoder": {"type": "dinosiglip"},
        "projector": {"type": "mlp_gelu"},
        "heads": {"text": {"type": "text_vocab", "params": {"vocab_size": 50304}},
                  "image": {"type": "image_vocab"}, "caption": {"type": "caption_mlp"},
                  "mmu_positions": {"type": "position_table", "params": {"num_positions": mmu_positions}},
                  "t2i_positions": {"type": "position_table", "params": {"num_positions": 256 + 73}}},
        "max_caption_tokens": 68, "image_size": 256,
    }
    torch.manual_seed(0)
    return build_from_spec(spec).to("cuda", torch.bfloat16).eval()


def imported_model(work: Path, compile_decode: bool):
    """The 1.3B model as ``omni convert omnimamba`` imports it, from random files in the release's layout."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from omnimamba_files import Dims, write_all

    from omnicore.convert.omnimamba import convert

    fresh_compiler()
    directory = work / "converted"
    if not directory.exists():
        files = write_all(work / "release", Dims.release())
        del files.state
        t = time.perf_counter()
        convert(files.checkpoint, files.tokenizer, files.vq, files.dino, files.siglip, directory)
        print(f"(converted the release-layout files in {time.perf_counter() - t:.1f} s)", flush=True)
        shutil.rmtree(work / "release")
    model = omnicore.load(directory, device="cuda").to(torch.bfloat16).eval()
    model.backbone.compile_decode = compile_decode  # as the native model of the same variant
    return model


def imported_label(variant: str) -> str:
    return f"imported OmniMamba-1.3b ({'graph+compile' if VARIANTS[variant] else 'graph'})"


def llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                      intermediate_size=5504, vocab_size=vocab, max_position_embeddings=20000)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


# --ablate NAME: the same T2I job (guidance 1) timed again right after the default with one setting changed
ABLATIONS = {  # name -> (module, attribute, value, what the row is)
    "prefill-graph": (engine, "GRAPH_PREFILL", False, "eager prefill"),
    "prefill-conv": (kernels, "PREFILL_CONV_IMPL", "torch", "PyTorch prefill conv"),
    "fold-norm": (kernels, "FOLD_GATED_NORM_BELOW", 0, "gated norm never folded"),
    "fold-norm-all": (kernels, "FOLD_GATED_NORM_BELOW", 1 << 30, "gated norm folded at every batch"),
    "triton-ssu-from-1": (compiled_step, "KERNEL_MIN_BATCH", 8, "Inductor's state update below batch 8"),
    "fused-step": (fused_step, "MAX_BATCH", 0, "compiled step at batches 1-2 (no fused GEMV step)"),
    "fused-gemm": (fused_step, "MIN_GEMM_BATCH", 16, "fused tensor-core step from batch 16"),
    "pdl": (kernels, "PDL", False, "no programmatic dependent launch (kernels.PDL)"),
    "prefill-lora": (backbone_module, "MERGE_LORA_PREFILL", False, "prefill through peft's unmerged adapters"),
    "short-scan": (kernels, "SHORT_SCAN", False, "prefill by mamba_ssm's chunked scan (no one-kernel short scan)"),
}


def bench_t2i(model, batches, quick: bool, name: str, ablate: list[str] = ()) -> None:
    caption = "x" * 68  # 68 caption tokens: a 72-token prefix with the 4 specials
    s = Sampling(temperature=1.0, top_k=1000)
    for b in batches:
        for scale in (1.0, 3.0):
            sec, peak = timed(lambda: generate_codes(model, [caption] * b, scale, s), 1 if quick else 3)
            record(name, f"t2i 72+256 cfg={scale:g}", b, sec, b, "images/s", peak)
        for what in ablate:
            module, attr, value, desc = ABLATIONS[what]
            kept = getattr(module, attr)
            setattr(module, attr, value)
            clear_decode_cache(model)  # captured again with the change undone
            try:
                sec, peak = timed(lambda: generate_codes(model, [caption] * b, 1.0, s), 1 if quick else 3)
            finally:
                setattr(module, attr, kept)
                clear_decode_cache(model)
            record(name, f"t2i cfg=1, {desc}", b, sec, b, "images/s", peak)


def bench_llama_t2i(batches, quick: bool) -> None:
    m = llama(16384)
    for static in (False, True):
        name = "llama-1.3b static+compile" if static else "llama-1.3b eager"
        for b in batches:
            ids = torch.randint(0, 16384, (b, 72), device="cuda")
            kw = dict(max_new_tokens=256, min_new_tokens=256, do_sample=True, top_k=1000, pad_token_id=0)
            if static:
                kw["cache_implementation"] = "static"
            sec, peak = timed(lambda: m.generate(ids, attention_mask=torch.ones_like(ids), **kw), 1 if quick else 2)
            record(name, "t2i 72+256", b, sec, b, "images/s", peak)
    del m
    gc.collect()
    torch.cuda.empty_cache()


def bench_mmu(model, batch: int, name: str) -> None:
    pixels = torch.randn(batch, 3, 384, 384, device="cuda", dtype=torch.bfloat16)
    q = [list(range(100, 164))] * batch  # 64 text tokens after the 733 image/special positions
    s = Sampling(greedy=True, max_new_tokens=128, ignore_eos=True)
    sec, peak = timed(lambda: generate_text(model, pixels, None, q, s))
    record(name, "mmu 733+64 -> 128", batch, sec, batch * 128, "tokens/s", peak)


def bench_llama_mmu(batch: int) -> None:
    m = llama(50304)
    ids = torch.randint(0, 50304, (batch, 797), device="cuda")
    for static in (False, True):
        kw = dict(max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)
        if static:
            kw["cache_implementation"] = "static"
        sec, peak = timed(lambda: m.generate(ids, attention_mask=torch.ones_like(ids), **kw), 2)
        record("llama-1.3b " + ("static+compile" if static else "eager"), "mmu 797 -> 128", batch, sec,
               batch * 128, "tokens/s", peak)
    del m
    gc.collect()
    torch.cuda.empty_cache()


def once(fn) -> tuple[float, float]:
    """Wall time and peak GiB of one run (for long jobs, after a separate short warm-up)."""
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**30


def bench_long(lengths, batch: int, variant: str, llama_lengths) -> None:
    model = omni_model(mmu_positions=max(lengths) + 1024, compile_decode=VARIANTS[variant])
    q = [list(range(100, 116))] * batch
    generate_text(model, None, None, q, Sampling(greedy=True, max_new_tokens=64, ignore_eos=True))  # compile
    for n in lengths:
        clear_decode_cache(model)  # each length on its own: no kept decode graph of another length in the peak
        gc.collect()
        torch.cuda.empty_cache()
        s = Sampling(greedy=True, max_new_tokens=n, ignore_eos=True)
        sec, peak = once(lambda: generate_text(model, None, None, q, s))
        record(label(variant), f"long text 16+{n}", batch, sec, batch * n, "tokens/s", peak)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    if not llama_lengths:
        return
    m = llama(50304)
    for n in llama_lengths:
        ids = torch.randint(0, 50304, (batch, 16), device="cuda")
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sec, peak = once(lambda: m.generate(ids, attention_mask=torch.ones_like(ids), **kw))
        record("llama-1.3b eager", f"long text 16+{n}", batch, sec, batch * n, "tokens/s", peak)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    ap.add_argument("--jobs", default="t2i,mmu,long,llama", help="comma-separated: t2i, mmu, long, llama")
    ap.add_argument("--variants", default="graph,compiled", help="omnicore decode variants: graph, compiled")
    ap.add_argument("--batches", default="1,16,64", help="T2I batch sizes (comma-separated)")
    ap.add_argument("--ablate", default="", help=f"comma-separated, T2I timed again with a setting changed: {', '.join(ABLATIONS)}")
    args = ap.parse_args()
    unknown = [a for a in args.ablate.split(",") if a and a not in ABLATIONS]
    if unknown:
        ap.error(f"--ablate: unknown {', '.join(unknown)}; choose from {', '.join(ABLATIONS)}")
    torch.backends.cuda.matmul.allow_tf32 = True
    jobs = set(args.jobs.split(","))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    print(f"{'model':34s} {'job':40s} {'batch':>4s} {'time':>10s} {'rate':>10s} {'unit':9s} {'peak':>11s}")
    batches = [int(b) for b in args.batches.split(",")]
    variants = args.variants.split(",")
    for variant in variants if "t2i" in jobs or "mmu" in jobs else []:
        model = omni_model(compile_decode=VARIANTS[variant])
        if "t2i" in jobs:
            bench_t2i(model, batches, args.quick, label(variant), [a for a in args.ablate.split(",") if a])
        if "mmu" in jobs:
            bench_mmu(model, 1, label(variant))
        del model
        gc.collect()
        torch.cuda.empty_cache()
        if "imported" in jobs:  # the same jobs right after, on the imported release
            work = Path(tempfile.gettempdir()) / "bench_generation_imported"
            model = imported_model(work, VARIANTS[variant])
            if "t2i" in jobs:
                bench_t2i(model, batches, args.quick, imported_label(variant))
            if "mmu" in jobs:
                bench_mmu(model, 1, imported_label(variant))
            del model
            gc.collect()
            torch.cuda.empty_cache()
    if "long" in jobs:
        bench_long([1024, 4096, 16384] if not args.quick else [1024, 4096], 8, variants[-1],
                   [1024] if "llama" in jobs else [])  # eager Llama at 4K+ takes minutes
    if "llama" in jobs and "t2i" in jobs:
        bench_llama_t2i(batches, args.quick)
    if "llama" in jobs and "mmu" in jobs:
        bench_llama_mmu(1)
    # ratios against the baselines measured in this run
    def rate(model, job, batch):
        return next((r["rate"] for r in ROWS if r["model"] == model and r["job"] == job and r["batch"] == batch), None)

    print("\nratios (same run):")
    for b in batches:
        ours = rate(label(variants[-1]), "t2i 72+256 cfg=1", b)
        guided = rate(label(variants[-1]), "t2i 72+256 cfg=3", b)
        comp = rate("llama-1.3b static+compile", "t2i 72+256", b)
        eager = rate("llama-1.3b eager", "t2i 72+256", b)
        if ours:
            print(f"  t2i batch {b}: {ours:.2f} images/s ({1 / ours * b:.3f} s per batch); "
                  f"x{ours / comp:.2f} vs compiled llama; x{ours / eager:.2f} vs eager llama; "
                  f"guidance costs x{ours / guided:.2f}" if comp and eager and guided else f"  t2i batch {b}: {ours:.2f}")
    for variant in variants if "imported" in jobs else []:
        for r in [r for r in ROWS if r["model"] == imported_label(variant)]:
            native = rate(label(variant), r["job"], r["batch"])
            if native:
                print(f"  imported / native, {variant}, {r['job']} batch {r['batch']}: x{r['rate'] / native:.3f}")
    longs = [r for r in ROWS if r["model"].startswith("omnicore") and r["job"].startswith("long")]
    if len(longs) >= 2:
        print(f"  long generation peak memory: {longs[0]['peak']:.2f} GiB at {longs[0]['job']} -> "
              f"{longs[-1]['peak']:.2f} GiB at {longs[-1]['job']} ({(longs[-1]['peak'] / longs[0]['peak'] - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
