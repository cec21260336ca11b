"""Training-step benchmark on a GPU: omnicore's 1.3B unified model for each OmniMamba stage against the stock
mamba_ssm Mamba-2 LM and transformers' Llama 1.3B (sdpa) at the same tokens per step, in one run.

Every model keeps fp32 master weights and trains under bf16 autocast with fused AdamW and gradient clipping at 1.0,
as omnicore's trainer does. Rows (``--jobs``):
- ``stage1_mmu``: projector + MMU LoRA on a frozen backbone; 733 image/special positions + 128 text tokens a row
- ``stage1_t2i``: image embedding + projection, position tables, caption MLP, image head and T2I LoRA; 72 + 256
- ``stage2_t2i``: the same T2I rows with the whole backbone and the heads training
- ``stage2``: both tasks a step (MMU : T2I rows 1 : 16, OmniMamba's 3 : 48), whole backbone + projector
- ``text2k`` / ``text8k``: plain text through the backbone and text head (4 x 2048 / 1 x 8192 tokens)
Baselines (``--baselines mamba_ssm,llama``) train the same number of rows x tokens as each job on text ids.
Reported: tokens/s, model FLOPs utilisation (FLOPs of one step counted by torch's FlopCounterMode, matmuls only,
against the H100/H200's 989 dense bf16 TFLOP/s), peak memory, and with ``--max-batch`` the largest batch that fits.
Run: python benchmarks/bench_train.py [--jobs ...] [--baselines ...] [--steps 10] [--max-batch]
``--device cpu --tiny`` runs every path at a tiny width (a smoke test, no figures worth reading).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import torch.nn.functional as F

from omnicore.model.unified import build_from_spec
from omnicore.plugins.backbones.mamba2.block import FUSED_OPS
from omnicore.recipe.schema import TrainSpec
from omnicore.training.freeze import apply_trainable
from omnicore.training.graphed_step import GraphCaptureError, GraphedTrainStep, capturable_adamw

PEAK_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16
MMU_TEXT = 128
JOBS = {  # name -> (tasks with rows, train spec)
    "stage1_mmu": ({"mmu": 16}, TrainSpec(roles=["projector"], adapters=["mmu"])),
    "stage1_t2i": ({"t2i": 16}, TrainSpec(roles=["heads.image", "heads.caption", "heads.t2i_positions"],
                                          adapters=["t2i"])),
    "stage2_t2i": ({"t2i": 16}, TrainSpec(roles=["backbone", "heads"])),
    "stage2": ({"mmu": 1, "t2i": 16}, TrainSpec(roles=["backbone", "projector"])),
    "text2k": ({"text": (4, 2048)}, TrainSpec(roles=["backbone", "heads.text"])),
    "text8k": ({"text": (1, 8192)}, TrainSpec(roles=["backbone", "heads.text"])),
}


def omni_spec(tiny: bool, fused_ops: list[str] | None = None) -> dict:
    backbone = {"size": "1.3b"} if not tiny else {"d_model": 64, "n_layer": 2, "d_state": 16, "headdim": 16,
                                                   "chunk_size": 16}
    encoder = {"type": "dinosiglip"} if not tiny else {
        "type": "timm_vit", "params": {"model_name": "vit_tiny_patch16_224", "image_size": 32,
                                       "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}}}
    return {
        "text_tokenizer": {"type": "byte"},
        "backbone": {"type": "mamba2", "params": {**backbone, "compile_decode": False, "fused_ops": fused_ops,
                                                   "lora": {"tasks": ["mmu", "t2i"], "r": 8, "alpha": 32,
                                                            "dropout": 0.0}}},
        "image_tokenizer": {"type": "vqgan", "params": {} if not tiny else {"preset": "tiny"}},
        "encoder": encoder,
        "projector": {"type": "mlp_gelu"},
        "heads": {"text": {"type": "text_vocab", "params": {"vocab_size": 50304 if not tiny else 512}},
                  "image": {"type": "image_vocab"}, "caption": {"type": "caption_mlp"},
                  "mmu_positions": {"type": "position_table", "params": {"num_positions": 1500}},
                  "t2i_positions": {"type": "position_table", "params": {"num_positions": 256 + 73}}},
        "max_caption_tokens": 68, "image_size": 256 if not tiny else 32,
    }


def omni_batches(model, tasks: dict, device: str) -> tuple[dict, int]:
    """Random inputs in the collators' format, and the tokens they hold (sequence positions through the backbone)."""
    out, tokens = {}, 0
    vocab = model.heads["text"].vocab_size if hasattr(model.heads["text"], "vocab_size") else 512
    for task, rows in tasks.items():
        if task == "mmu":
            size = model.encoder.image_size
            ids = torch.randint(0, 256, (rows, MMU_TEXT), device=device)
            out["mmu"] = {"text_ids": ids, "labels": ids.clone(), "has_image": torch.ones(rows, device=device),
                          "pixels": torch.randn(rows, 3, size, size, device=device)}
            tokens += rows * (model.mmu_prefix_len + MMU_TEXT)
        elif task == "t2i":
            prefix = torch.tensor([model.layout.t2i_prefix("x" * 68)] * rows, device=device)
            codes = torch.randint(0, model.image_tokenizer.codebook_size, (rows, model.num_image_codes), device=device)
            out["t2i"] = {"prefix_ids": prefix, "codes": codes}
            tokens += rows * (prefix.shape[1] + codes.shape[1])
        else:
            n, length = rows
            out["text"] = torch.randint(0, min(vocab, 50000), (n, length), device=device)
            tokens += n * length
    return out, tokens


def omni_loss(model, batches: dict) -> torch.Tensor:
    if "text" in batches:  # a plain language-model step: backbone and tied text head
        ids = batches["text"]
        h = model.backbone(model.text_embed(ids), task="mmu")
        logits = model.heads["text"].logits(h[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    return sum(model(batches).values())


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids).logits  # both baselines return an output with logits
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def mamba_lm(tiny: bool, device: str):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    cfg = MambaConfig(d_model=2048 if not tiny else 64, n_layer=48 if not tiny else 2, vocab_size=50277,
                      # the memory-efficient fused path needs the causal-conv1d CUDA build; without it, mamba_ssm's
                      # Mamba2 runs its conv in PyTorch and the chunked scan in Triton
                      ssm_cfg={"layer": "Mamba2", "use_mem_eff_path": False}, rms_norm=True, residual_in_fp32=True,
                      fused_add_norm=True,
                      pad_vocab_size_multiple=16)
    return MambaLMHeadModel(cfg, device=device)


def llama(tiny: bool, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048 if not tiny else 64, num_hidden_layers=24 if not tiny else 2,
                      num_attention_heads=16 if not tiny else 2, num_key_value_heads=16 if not tiny else 2,
                      intermediate_size=5504 if not tiny else 128, vocab_size=50304, max_position_embeddings=8192,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device)


def step_runner(model, params, loss_fn, device: str, graph: bool = False):
    """One training step as a function: eager, or (``graph``) omnicore's GraphedTrainStep, which captures forward,
    backward, clipping and the optimizer as one CUDA graph, as ``cuda_graph: true`` stages train."""
    if graph:
        optimizer = capturable_adamw(params, lr=1e-4, betas=(0.9, 0.95))
        graphed = GraphedTrainStep(lambda _: {"loss": loss_fn()}, lambda losses: losses["loss"], params, optimizer,
                                   1.0, autocast_dtype=torch.bfloat16)
        return lambda: graphed.step([()])[0]["loss"]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=device == "cuda")

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def count_flops(loss_fn, params, device: str) -> float:
    """Matmul FLOPs of one forward and backward (eager; the same work a graphed step replays)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_fn()
        loss.backward()
    for p in params:
        p.grad = None
    return counter.get_total_flops()


def measure(step, tokens: int, steps: int, device: str, flops: float) -> dict:
    """Peak memory counts from before the warm-up: a graphed step's activations are allocated while it is captured
    (its replays allocate nothing), so a peak taken over the replays alone would leave them out."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step()  # warm-up (autotuning, allocator; a graphed step captures here)
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / steps
    cuda = device == "cuda"
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    # what the process held from the device: a graphed step keeps its capture's pool beside the eager warm-up's
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    return {"tokens_per_s": tokens / seconds, "step_s": seconds, "mfu": flops / seconds / (PEAK_TFLOPS * 1e12),
            "peak_gib": peak, "reserved_gib": reserved}


def profile(step, name: str, rows: int = 40) -> None:
    """The GPU kernels of two steps (after a warm-up) by total CUDA time: where a step's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(f"\n--- profile: {name}, two steps ---")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def largest_batch(make_step, start: int, device: str, limit: int = 1024) -> int:
    """Rows doubled from ``start`` until a step runs out of memory: the last that fitted."""
    fitted, rows = 0, start
    while rows <= limit:
        try:
            step = make_step(rows)
            step()
            step()
            fitted = rows
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            step = None
            gc.collect()
            torch.cuda.empty_cache()
        rows *= 2
    return fitted


def rows_of(tasks: dict) -> int:
    return sum(r if isinstance(r, int) else r[0] for r in tasks.values())


def scaled(tasks: dict, rows: int) -> dict:
    """The job's task mix at ``rows`` rows in all (the largest-batch search scales every task)."""
    base = rows_of(tasks)
    return {t: (max(1, r * rows // base) if isinstance(r, int) else (max(1, r[0] * rows // base), r[1]))
            for t, r in tasks.items()}


def report(name: str, job: str, r: dict, fits: int | None) -> None:
    print(f"{name:28s} {job:12s} {r['tokens_per_s'] / 1e3:9.2f}K tok/s {r['step_s'] * 1e3:9.1f} ms "
          f"MFU {r['mfu'] * 100:5.1f}% peak {r['peak_gib']:6.1f} GiB (reserved {r['reserved_gib']:6.1f})"
          + (f" largest batch {fits} rows" if fits is not None else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--baselines", default="mamba_ssm,llama")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-batch", action="store_true", help="also search the largest batch that fits (slow)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny widths: a smoke test of every path")
    ap.add_argument("--profile", action="store_true", help="also print each model's top GPU kernels (torch.profiler)")
    ap.add_argument("--variants", default="eager,graph",
                    help="omnicore's steps: eager, and/or graph (the whole step one CUDA graph, cuda_graph: true)")
    ap.add_argument("--fused-ops", default="default",
                    help="the backbone's Triton training kernels: default (the backbone's), all, none, or a list of "
                         + ", ".join(FUSED_OPS) + " (an ablation)")
    args = ap.parse_args()
    dev = args.device
    torch.backends.cuda.matmul.allow_tf32 = True
    if dev == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    jobs = [j for j in args.jobs.split(",") if j]
    variants = [v for v in args.variants.split(",") if v]
    fused = {"default": None, "none": [], "all": list(FUSED_OPS)}.get(
        args.fused_ops, [o for o in args.fused_ops.split(",") if o])
    for job in jobs:
        tasks, train = JOBS[job]
        for variant in variants:
            graph = variant == "graph"
            if graph and dev != "cuda":
                continue  # CUDA graphs need CUDA
            torch.manual_seed(0)
            model = build_from_spec(omni_spec(args.tiny, fused)).to(dev)
            apply_trainable(model, model.roles(), train)
            params = [p for p in model.parameters() if p.requires_grad]
            model.train()

            def make_step(rows, tasks=tasks, model=model, params=params, graph=graph):
                batches, _ = omni_batches(model, scaled(tasks, rows), dev)
                return step_runner(model, params, lambda: omni_loss(model, batches), dev, graph)

            batches, tokens = omni_batches(model, tasks, dev)
            flops = count_flops(lambda: omni_loss(model, batches), params, dev)
            try:
                r = measure(step_runner(model, params, lambda: omni_loss(model, batches), dev, graph), tokens,
                            args.steps, dev, flops)
                fits = largest_batch(make_step, rows_of(tasks), dev) if args.max_batch and dev == "cuda" else None
                report(f"omnicore 1.3B {variant}", job, r, fits)
                if args.profile and dev == "cuda":
                    profile(step_runner(model, params, lambda: omni_loss(model, batches), dev, graph),
                            f"omnicore {variant} {job}")
            except GraphCaptureError as exc:
                print(f"omnicore 1.3B {variant:5s}        {job:12s} not captured: {exc}", flush=True)
            del model, params, batches
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
        for name in [b for b in args.baselines.split(",") if b]:
            build = {"mamba_ssm": mamba_lm, "llama": llama}[name]
            torch.manual_seed(0)
            base = build(args.tiny, dev)
            base.train()
            params = list(base.parameters())
            length = tokens // rows_of(tasks)

            def base_step(rows, base=base, params=params, length=length):
                ids = torch.randint(0, 50000, (rows, length), device=dev)
                return step_runner(base, params, lambda: lm_loss(base, ids), dev)

            ids = torch.randint(0, 50000, (rows_of(tasks), length), device=dev)
            r = measure(base_step(rows_of(tasks)), rows_of(tasks) * length, args.steps, dev,
                        count_flops(lambda: lm_loss(base, ids), params, dev))
            fits = largest_batch(base_step, rows_of(tasks), dev) if args.max_batch and dev == "cuda" else None
            report(f"{name} 1.3B ({rows_of(tasks)}x{length})", job, r, fits)
            if args.profile and dev == "cuda":
                profile(base_step(rows_of(tasks)), f"{name} {job}")
            del base, params
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
