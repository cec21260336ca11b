"""Running training stages: unified (MMU/T2I with task adapters), vqgan (the image tokenizer) and contrastive (the
encoder); the distillation stages (omnicore.distill.stages) share this step loop and checkpoints.

Each stage: freeze all but what it lists, AdamW with warm-up + cosine, gradient clipping and accumulation,
bf16 autocast on GPU (fp32 on CPU), periodic atomic checkpoints with optimizer, RNG and data position, and
optionally (``ema``) an exponential moving average of the trained weights that replaces them at the stage's end.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import OmnicoreError
from ..model.unified import UnifiedModel
from ..recipe.schema import DataSpec, StageSpec
from ..registry import registry
from .checkpoint import save_checkpoint
from .code_cache import WithCodes, encode_dataset, worth_caching
from .data import MMUCollator, T2ICollator, image_to_tensor, make_loader
from .distributed import (DistInfo, all_gather_objects, average_gradients, barrier, full_state_dict, gather_into,
                          grad_norm_value, gradient_sync, load_optimizer_state, mean_across, optimizer_state,
                          wrap_model)
from .ema import ParamEMA
from .freeze import apply_trainable
from .graphed_step import GraphedTrainStep, capturable_adamw
from .metrics import MetricsWriter
from .schedule import lr_factor

# a graphed stage pads MMU text to a multiple of this: a graph per 64 tokens of answer length, not per length
GRAPH_TEXT_MULTIPLE = 64


@dataclass
class RunContext:
    run_dir: Path
    device: torch.device
    seed: int
    console: Console
    metrics: MetricsWriter
    dist: DistInfo = field(default_factory=DistInfo)
    stop_after_step: int | None = None  # tests: simulate a kill after this global step
    teachers: dict[str, Any] = field(default_factory=dict)  # distillation teachers loaded so far, by directory

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"


def build_dataset(spec: DataSpec, label: str):
    try:
        return registry.get("dataset", spec.type).build(**spec.params)
    except OmnicoreError as exc:
        raise type(exc)(f"{label}: {exc}") from None


def autocast_for(stage: StageSpec, device: torch.device):
    precision = stage.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def capture_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=not enabled, transient=False)


def _restore_progress(optimizer: torch.optim.Optimizer, resume: dict[str, Any] | None, wrapped: torch.nn.Module,
                      info: DistInfo) -> int:
    """Put a resumed stage's optimizer and this process's RNG back; returns the step to continue from."""
    if not resume:
        return 0
    if resume.get("optimizer"):
        load_optimizer_state(wrapped, optimizer, resume["optimizer"])
    restore_process_rng(resume, info)
    return resume["step"]


def restore_process_rng(trainer_state: dict[str, Any], info: DistInfo) -> None:
    """This process's random streams as a checkpoint saved them; on another number of processes, rank 0's."""
    by_rank = trainer_state.get("rng_by_rank") or [trainer_state["rng"]]
    restore_rng(by_rank[info.rank] if len(by_rank) == info.world_size else by_rank[0])


def _make_optimizer(params: list[torch.nn.Parameter], stage: StageSpec) -> torch.optim.Optimizer:
    opt = stage.optimizer
    if stage.cuda_graph:  # fused, its state on the device: what a captured step can replay
        return capturable_adamw(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps)
    return torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps)


def _set_train_modes(model: torch.nn.Module) -> None:
    """Modules with nothing to train run in eval mode (no dropout in frozen encoders/tokenizers). Modules without
    parameters (dropout, activations) follow the module they sit in: a trained LoRA layer's dropout is on."""

    def visit(module: torch.nn.Module, training: bool) -> None:
        params = list(module.parameters())
        if params:
            training = any(p.requires_grad for p in params)
        module.training = training
        for child in module.children():
            visit(child, training)

    visit(model, True)


def _run_loop(*, stage: StageSpec, stage_index: int, ctx: RunContext, model: torch.nn.Module,
              plain: torch.nn.Module, trainable: list[torch.nn.Parameter], step_fn: Callable[[int], dict[str, float]],
              data_positions: Callable[[], dict[str, int]], start_step: int,
              optimizer: torch.optim.Optimizer, resume: dict[str, Any] | None = None,
              steps_optimizer: bool = False) -> None:
    """The shared step loop: schedule, clip, step, EMA, log, checkpoint. ``model`` is what trains (a DDP or FSDP2
    wrapper, or ``plain`` itself), ``plain`` the whole model whose names and shapes checkpoints keep.
    ``steps_optimizer``: ``step_fn`` clips and steps itself (a graphed step) and returns (losses, gradient norm)."""
    ema = None
    if stage.ema is not None:
        if ctx.dist.enabled and stage.distributed == "fsdp":
            raise OmnicoreError(f"stage {stage.name!r}: ema is not supported with distributed: fsdp")
        ema = ParamEMA(trainable, stage.ema)
        if resume and resume.get("ema"):
            ema.load_state_dict(resume["ema"])
    base_lrs = [stage.optimizer.lr for _ in optimizer.param_groups]  # not the groups: a resumed optimizer holds a decayed lr
    ckpt_every = stage.checkpoint_every
    with _progress(ctx.console, ctx.dist.is_main) as progress:
        bar = progress.add_task(f"{stage.name}", total=stage.steps, completed=start_step, info="")
        t0 = time.time()
        for step in range(start_step, stage.steps):
            factor = lr_factor(step, stage.steps, stage.schedule.warmup_steps, stage.schedule.min_lr_ratio,
                               stage.schedule.kind, stage.schedule.decay_steps)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * factor
            if steps_optimizer:
                losses, grad_norm = step_fn(step)
            else:
                losses = step_fn(step)
                grad_norm = None
                if stage.grad_clip is not None:
                    grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(trainable, stage.grad_clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            done = step + 1
            if any(not math.isfinite(v) for v in losses.values()):
                raise OmnicoreError(f"stage {stage.name!r}: loss became non-finite at step {done}: {losses}")
            if done % stage.log_every == 0 or done == stage.steps:
                losses = {k: mean_across(v, ctx.dist) for k, v in losses.items()}
                record = {"stage": stage.name, "step": done, "lr": base_lrs[0] * factor,
                          **{("loss" if k == "loss" else f"loss_{k}"): round(v, 6) for k, v in losses.items()},
                          "steps_per_s": round((done - start_step) / max(1e-9, time.time() - t0), 3)}
                if grad_norm is not None:
                    record["grad_norm"] = round(grad_norm, 4)
                ctx.metrics.log(record)
                progress.update(bar, info=" ".join(f"{k} {v:.4f}" for k, v in losses.items()))
            progress.update(bar, completed=done)
            final = done == stage.steps
            if final and ema is not None:
                ema.copy_to_params()  # the stage's result is the average
            if final or (ckpt_every and done % ckpt_every == 0):
                _checkpoint(ctx, model, plain, stage, stage_index, done, optimizer, data_positions(), final,
                            ema.state_dict() if ema is not None and not final else None)
            if ctx.stop_after_step is not None and done >= ctx.stop_after_step and not final:
                raise KeyboardInterrupt(f"stopped after step {done} (test hook)")


def _checkpoint(ctx: RunContext, model, plain, stage: StageSpec, stage_index: int, step: int, optimizer,
                positions: dict[str, int], done: bool, ema_state: dict[str, Any] | None = None) -> None:
    """Every rank takes part (sharded weights and optimizer state are gathered); rank 0 writes."""
    state = full_state_dict(model, plain)
    optim = optimizer_state(model, optimizer) if not done else {}
    rngs = all_gather_objects(capture_rng(), ctx.dist)
    if ctx.dist.is_main:
        trainer_state = {"stage_index": stage_index, "stage": stage.name, "step": step, "done": done,
                         "optimizer": optim, "rng": rngs[0], "rng_by_rank": rngs, "data_positions": positions}
        if ema_state is not None:  # mid-stage: the model state holds the raw weights, this their average
            trainer_state["ema"] = ema_state
        spec = (getattr(plain, "config", None) or {}).get("model")
        if spec is not None:  # a distillation stage changes the model's architecture: a resumed run rebuilds this one
            trainer_state["model_spec"] = json.dumps(spec)
        save_checkpoint(ctx.checkpoint_root, f"{stage_index:02d}-{stage.name}-step{step:07d}", state, trainer_state)
    barrier(ctx.dist)


def run_unified_stage(model: UnifiedModel, stage: StageSpec, stage_index: int, ctx: RunContext,
                      resume: dict[str, Any] | None = None) -> None:
    counts = apply_trainable(model, model.roles(), stage.train)
    if not counts:
        raise OmnicoreError(f"stage {stage.name!r}: nothing to train (train.roles/globs/adapters are empty)")
    if ctx.dist.is_main:
        total = sum(counts.values())
        ctx.console.print(f"[bold]stage {stage.name}[/bold]: {total:,} trainable parameters "
                          + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    ctx.metrics.log({"stage": stage.name, "event": "start", "trainable": counts})
    if stage.cuda_graph:
        _check_graph_mode(stage, ctx)
    if stage.gradient_checkpointing:
        if not hasattr(model.backbone, "gradient_checkpointing"):
            raise OmnicoreError(f"stage {stage.name!r}: this backbone does not support gradient_checkpointing")
        model.backbone.gradient_checkpointing = True
    W = ctx.dist.world_size
    positions = dict((resume or {}).get("data_positions", {}))
    loaders, consumed = {}, {}
    for task, tspec in stage.tasks.items():
        if tspec.batch_size % W:
            raise OmnicoreError(f"stage {stage.name!r}: tasks.{task}.batch_size {tspec.batch_size} is not divisible "
                                f"by the {W} processes")
        dataset = build_dataset(tspec.data, f"stages.{stage.name}.tasks.{task}.data")
        if task == "mmu":
            transform = model.encoder.image_transform() if model.encoder is not None else None
            size = model.encoder.image_size if model.encoder is not None else 0
            collate = MMUCollator(model.layout, transform, size,
                                  pad_multiple=GRAPH_TEXT_MULTIPLE if stage.cuda_graph else 1)
        else:
            dataset = _maybe_cache_codes(model, stage, task, dataset, ctx)
            collate = T2ICollator(model.layout, model.image_size, model.num_image_codes, stage.caption_dropout,
                                  seed=ctx.seed)
        consumed[task] = positions.get(task, 0)
        loaders[task] = make_loader(dataset, tspec.batch_size // W, collate, seed=ctx.seed + stage_index,
                                    start=consumed[task], shuffle=tspec.data.shuffle,
                                    num_workers=tspec.data.num_workers, rank=ctx.dist.rank, world_size=W)
    wrapped = wrap_model(model, ctx.dist, stage.distributed, ctx.device)
    # after wrapping: FSDP2 trains a sharded copy, whose parameters are not the model's
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = _make_optimizer(trainable, stage)
    start_step = _restore_progress(optimizer, resume, wrapped, ctx.dist)
    _set_train_modes(wrapped)
    weights = {t: s.weight for t, s in stage.tasks.items()}
    loss_options = {t: s.loss_options() for t, s in stage.tasks.items()}

    def combined(losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(weights[t] * losses[t] for t in losses)

    def next_batches() -> dict[str, Any]:
        for t in stage.tasks:
            consumed[t] += stage.tasks[t].batch_size
        return {t: next(loaders[t]) for t in stage.tasks}

    if stage.cuda_graph:
        bf16 = stage.precision in ("auto", "bf16")  # auto is bf16 on CUDA, where a graphed stage runs
        graphed = GraphedTrainStep(lambda batches: wrapped(batches, loss_options), combined, trainable, optimizer,
                                   stage.grad_clip, autocast_dtype=torch.bfloat16 if bf16 else None)

        def graphed_fn(step: int) -> tuple[dict[str, float], float | None]:
            losses, norm = graphed.step([next_batches() for _ in range(stage.grad_accum)])
            return {t: float(v) for t, v in losses.items()}, None if norm is None else float(norm)

    def step_fn(step: int) -> dict[str, float]:
        sums = {t: 0.0 for t in stage.tasks}
        for micro in range(stage.grad_accum):
            batches = next_batches()
            with gradient_sync(wrapped, sync=micro == stage.grad_accum - 1):
                with autocast_for(stage, ctx.device):
                    losses = wrapped(batches, loss_options)
                total = combined(losses) / stage.grad_accum
                total.backward()
            for t in losses:
                sums[t] += float(losses[t].detach()) / stage.grad_accum
        return sums

    _run_loop(stage=stage, stage_index=stage_index, ctx=ctx, model=wrapped, plain=model, trainable=trainable,
              step_fn=graphed_fn if stage.cuda_graph else step_fn, data_positions=lambda: dict(consumed),
              start_step=start_step, optimizer=optimizer, resume=resume, steps_optimizer=stage.cuda_graph)
    gather_into(model, wrapped)
    if hasattr(model.backbone, "gradient_checkpointing"):
        model.backbone.gradient_checkpointing = False


def _check_graph_mode(stage: StageSpec, ctx: RunContext) -> None:
    if ctx.device.type != "cuda":
        raise OmnicoreError(f"stage {stage.name!r}: cuda_graph needs a CUDA device (this run is on {ctx.device})")
    if ctx.dist.enabled:
        raise OmnicoreError(f"stage {stage.name!r}: cuda_graph runs on one process; turn it off for distributed runs")



def _maybe_cache_codes(model: UnifiedModel, stage: StageSpec, task: str, dataset, ctx: RunContext):
    """Encode a T2I dataset's images once up front when that is cheaper than encoding them at every draw."""
    tokenizer = model.image_tokenizer
    frozen = tokenizer is not None and not any(p.requires_grad for p in tokenizer.parameters())
    drawn = stage.tasks[task].batch_size * stage.grad_accum * stage.steps
    if not worth_caching(stage.cache_codes, dataset, drawn, frozen):
        return dataset
    was_training = tokenizer.training
    tokenizer.eval()
    with _progress(ctx.console, ctx.dist.is_main) as progress:
        bar = progress.add_task(f"{stage.name}: {task} codes", total=len(dataset), info="")
        codes = encode_dataset(dataset, model.image_size, model.images_to_codes,
                               lambda n: progress.advance(bar, n))
    tokenizer.train(was_training)
    return WithCodes(dataset, codes)


class _ImagesOnly:
    """Collate raw samples with an ``image`` into a tensor batch in [-1, 1]."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, samples: list[dict]) -> torch.Tensor:
        missing = [i for i, s in enumerate(samples) if s.get("image") is None]
        if missing:
            raise OmnicoreError("vqgan stage: dataset samples need an 'image'")
        return torch.stack([image_to_tensor(s["image"], self.size) for s in samples])


def _single_source_setup(model: UnifiedModel, stage: StageSpec, stage_index: int, ctx: RunContext,
                         resume: dict[str, Any] | None, trainable: list[torch.nn.Parameter], what: str,
                         collate, position_key: str):
    """Shared start of the stages that train one part on one dataset (kinds vqgan and contrastive): freeze all
    but ``trainable``, announce it, shard ``stage.data`` over the processes from the resumed position, and make
    the optimizer. Returns (loader, consumed, optimizer, start_step)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    if ctx.dist.is_main:
        ctx.console.print(f"[bold]stage {stage.name}[/bold]: {what} "
                          f"({sum(p.numel() for p in trainable):,} parameters)")
    W = ctx.dist.world_size
    if stage.batch_size % W:
        raise OmnicoreError(f"stage {stage.name!r}: batch_size {stage.batch_size} is not divisible by {W} processes")
    dataset = build_dataset(stage.data, f"stages.{stage.name}.data")
    consumed = {position_key: (resume or {}).get("data_positions", {}).get(position_key, 0)}
    loader = make_loader(dataset, stage.batch_size // W, collate, seed=ctx.seed + stage_index,
                         start=consumed[position_key], shuffle=stage.data.shuffle, num_workers=stage.data.num_workers,
                         rank=ctx.dist.rank, world_size=W)
    optimizer = _make_optimizer(trainable, stage)
    return loader, consumed, optimizer, _restore_progress(optimizer, resume, model, ctx.dist)


def run_vqgan_stage(model: UnifiedModel, stage: StageSpec, stage_index: int, ctx: RunContext,
                    resume: dict[str, Any] | None = None) -> None:
    tokenizer = model.image_tokenizer
    if tokenizer is None:
        raise OmnicoreError(f"stage {stage.name!r}: a vqgan stage needs model.image_tokenizer")
    trainable = list(tokenizer.parameters())
    loader, consumed, optimizer, start_step = _single_source_setup(
        model, stage, stage_index, ctx, resume, trainable, "training the image tokenizer",
        _ImagesOnly(model.image_size), "images")
    tokenizer.train()
    training_losses = tokenizer.training_losses

    def step_fn(step: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        for _ in range(stage.grad_accum):
            images = next(loader).to(ctx.device)
            consumed["images"] += stage.batch_size
            with autocast_for(stage, ctx.device):
                out = training_losses(images)
            (out["loss"] / stage.grad_accum).backward()
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) / stage.grad_accum
        average_gradients(trainable, ctx.dist)  # data parallel without a wrapper: the tokenizer's entry is not forward
        return sums

    _run_loop(stage=stage, stage_index=stage_index, ctx=ctx, model=model, plain=model, trainable=trainable,
              step_fn=step_fn,
              data_positions=lambda: dict(consumed), start_step=start_step, optimizer=optimizer,
              resume=resume)
    for p in tokenizer.parameters():
        p.requires_grad_(False)
    tokenizer.eval()


def _describes(caption_sample: dict, image_sample: dict) -> bool:
    """Whether ``caption_sample``'s caption is true of ``image_sample``'s image. Samples may carry ``tags`` (what is
    true of the image) and ``caption_tags`` (what its caption claims, a subset when the caption is partial); then a
    caption matches every image having all the tags it claims. Otherwise captions match images of equal captions."""
    claimed, tags = caption_sample.get("caption_tags"), image_sample.get("tags")
    if claimed is not None and tags is not None:
        return set(claimed) <= set(tags)
    return caption_sample["caption"] == image_sample["caption"]


class _ImagesAndCaptions:
    """Collate samples with an ``image`` and a ``caption``: encoder pixels, padded caption ids, positive pairs."""

    def __init__(self, transform, tokenizer, max_tokens: int) -> None:
        self.transform, self.tokenizer, self.max_tokens = transform, tokenizer, max_tokens

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        if any(s.get("image") is None or not s.get("caption") for s in samples):
            raise OmnicoreError("contrastive stage: dataset samples need an 'image' and a 'caption'")
        ids = [self.tokenizer.encode(s["caption"])[: self.max_tokens] for s in samples]
        L = max(1, max(len(i) for i in ids))
        text = torch.full((len(ids), L), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(ids), L, dtype=torch.bool)
        for row, i in enumerate(ids):
            text[row, : len(i)] = torch.tensor(i, dtype=torch.long)
            mask[row, : len(i)] = True
        positive = torch.tensor([[_describes(c, image) for c in samples] for image in samples])
        return {"pixels": torch.stack([self.transform(s["image"]) for s in samples]), "ids": text, "mask": mask,
                "positive": positive}


def run_contrastive_stage(model: UnifiedModel, stage: StageSpec, stage_index: int, ctx: RunContext,
                          resume: dict[str, Any] | None = None) -> None:
    """Pretrain the encoder against the caption tower ``heads.contrastive`` with the SigLIP loss."""
    tower = model.heads["contrastive"] if "contrastive" in model.heads else None
    if model.encoder is None or tower is None:
        raise OmnicoreError(f"stage {stage.name!r}: a contrastive stage needs model.encoder and "
                            "model.heads.contrastive (type contrastive_text)")
    trainable = list(model.encoder.parameters()) + list(tower.parameters())
    collate = _ImagesAndCaptions(model.encoder.image_transform(), model.text_tokenizer, tower.max_tokens)
    # with several processes each one scores the pairs of its own share of the batch
    loader, consumed, optimizer, start_step = _single_source_setup(
        model, stage, stage_index, ctx, resume, trainable, "pretraining the encoder against captions", collate,
        "pairs")
    model.encoder.train()
    tower.train()

    def step_fn(step: int) -> dict[str, float]:
        total = 0.0
        for _ in range(stage.grad_accum):
            batch = {k: v.to(ctx.device) for k, v in next(loader).items()}
            consumed["pairs"] += stage.batch_size
            with autocast_for(stage, ctx.device):
                loss = tower.loss(model.encoder(batch["pixels"]), batch["ids"], batch["mask"], batch["positive"])
            (loss / stage.grad_accum).backward()
            total += float(loss.detach()) / stage.grad_accum
        average_gradients(trainable, ctx.dist)
        return {"contrastive": total}

    _run_loop(stage=stage, stage_index=stage_index, ctx=ctx, model=model, plain=model, trainable=trainable,
              step_fn=step_fn,
              data_positions=lambda: dict(consumed), start_step=start_step, optimizer=optimizer,
              resume=resume)
    for p in trainable:
        p.requires_grad_(False)
    model.encoder.eval()
    tower.eval()
