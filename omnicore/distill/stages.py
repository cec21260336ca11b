"""The distillation stages: ``distill_layerwise`` (mmMamba's stages 1 and 2) and ``distill_e2e`` (its stage 3).

A stage distils a frozen teacher (a model directory, or the model the run held before its first stage that made a
student, kept as the run directory's ``teacher/``) into a student: a new one seeded from the teacher when the stage
has ``distill.student``, else the student the previous stage left (whose teacher it keeps unless it names one). Only the named mixer parameters of the mixer
layers train; everything else (encoder, projector, heads, MLPs, norms, hybrid attention layers) stays as the teacher
has it. The step loop, checkpoints and exact resume are the trainer's (``_run_loop``); checkpoints hold the whole
student, every trained tensor included, and its model spec, so a resumed run rebuilds the student.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import OmnicoreError
from ..recipe.schema import StageSpec
from ..training.data import MMUCollator, make_loader
from ..training.distributed import average_gradients, barrier
from ..training.trainer import (RunContext, _restore_progress, _run_loop, _set_train_modes, autocast_for,
                                build_dataset)
from .losses import kl_loss, layerwise_loss
from .student import is_student, make_student

TEACHER_DIR = "teacher"  # in the run directory: the run's own model, when a student is made from it
TEACHER_POINTER = "teacher-path"  # in the run directory: the directory of the latest student's teacher


class DistillCollator(MMUCollator):
    """MMU batches plus ``text_len`` (B,): each row's real text tokens, so losses can leave the padding out."""

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(samples)
        batch["text_len"] = torch.tensor([len(self.layout.mmu_text(s["turns"])[0]) for s in samples])
        return batch


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _teacher(model, stage: StageSpec, ctx: RunContext, fresh_student: bool):
    """The stage's frozen teacher: ``distill.teacher``; else, for a new student made from the run's model, that
    model (saved as the run's teacher/); else the teacher the latest student was made from (the run directory's
    teacher-path file names it, so a resumed run finds it too)."""
    from ..model.unified import load
    from ..training.checkpoint import atomic_write_text

    spec = stage.distill
    pointer = ctx.run_dir / TEACHER_POINTER
    where = f"stages.{stage.name}"
    if spec.teacher is not None:
        path = Path(spec.teacher).resolve()
        where += ".distill.teacher"
    elif fresh_student and not is_student(model):
        path = (ctx.run_dir / TEACHER_DIR).resolve()
        if ctx.dist.is_main:
            model.save(path)
        barrier(ctx.dist)
    elif pointer.is_file():
        path = Path(pointer.read_text(encoding="utf-8").strip())
    else:
        raise OmnicoreError(f"{where}: no teacher: give distill.teacher (a model directory), or run a stage that "
                            "trains the teacher before the first distillation stage")
    if fresh_student and ctx.dist.is_main:
        atomic_write_text(pointer, f"{path}\n")
    key = str(path)
    if key not in ctx.teachers:
        try:
            # building draws random initial values: keep the run's streams as they are, so a run that loads its
            # teacher again after a resume seeds its students as the uninterrupted run does
            with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
                teacher = load(path, device=ctx.device)
        except OmnicoreError as exc:
            raise OmnicoreError(f"{where}: {exc}") from None
        if (teacher.config.get("model", {}).get("backbone", {}).get("type")) != "transformer":
            raise OmnicoreError(f"{where}: {path}: the teacher's backbone must be of type transformer")
        ctx.teachers[key] = _freeze(teacher)
    return ctx.teachers[key]


def _student(model, teacher, stage: StageSpec, resume: dict[str, Any] | None):
    spec = stage.distill.student
    if spec is not None and resume is None:
        return make_student(teacher, spec.hybrid, spec.mixer, spec.mixer_options)
    if not is_student(model):
        raise OmnicoreError(f"stages.{stage.name}: the model is not a distilled student yet: give distill.student "
                            "to start one from the teacher")
    return model


def trainable_mixer_params(student, names: tuple[str, ...], label: str) -> list[torch.nn.Parameter]:
    """The parameters ``names`` (first component of a mixer parameter's name) of every mixer layer, all else
    frozen. OmnicoreError naming a parameter no mixer layer has."""
    _freeze(student)
    backbone = student.backbone
    found: dict[str, list[torch.nn.Parameter]] = {n: [] for n in names}
    for i in backbone.mixer_layers:
        for pname, p in backbone.layers[i].self_attn.named_parameters():
            top = pname.split(".")[0]
            if top in found:
                found[top].append(p)
    missing = [n for n, ps in found.items() if not ps]
    if missing:
        raise OmnicoreError(f"{label}: the student's mixer layers have no parameter {missing[0]!r}")
    out = [p for ps in found.values() for p in ps]
    for p in out:
        p.requires_grad_(True)
    return out


def _optimizer(params: list[torch.nn.Parameter], stage: StageSpec) -> torch.optim.Optimizer:
    """AdamW; biases, dt_bias and A_log_bias (and norm weights) without weight decay, as mmMamba trains."""
    opt = stage.optimizer
    ids = {id(p) for p in params if p.ndim < 2 or getattr(p, "_no_weight_decay", False)}
    groups = [{"params": [p for p in params if id(p) not in ids], "weight_decay": opt.weight_decay},
              {"params": [p for p in params if id(p) in ids], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=opt.lr, betas=opt.betas, eps=opt.eps)


def run_distill_stage(model, stage: StageSpec, stage_index: int, ctx: RunContext,
                      resume: dict[str, Any] | None = None):
    """Run one distillation stage; returns the student (the model later stages and the run's result use)."""
    spec = stage.distill
    label = f"stages.{stage.name}"
    teacher = _teacher(model, stage, ctx, fresh_student=spec.student is not None and resume is None)
    student = _student(model, teacher, stage, resume).to(ctx.device)
    names = spec.trained(stage.kind)
    trainable = trainable_mixer_params(student, names, label)
    if ctx.dist.is_main:
        hybrid = student.backbone.hybrid
        ctx.console.print(f"[bold]stage {stage.name}[/bold]: {stage.kind} of {len(student.backbone.mixer_layers)} "
                          f"mixer layers{f' (hybrid: {hybrid})' if hybrid else ''}, training {', '.join(names)} "
                          f"({sum(p.numel() for p in trainable):,} parameters)")
    ctx.metrics.log({"stage": stage.name, "event": "start", "trainable": {"backbone": sum(p.numel() for p in trainable)}})
    W = ctx.dist.world_size
    if stage.batch_size % W:
        raise OmnicoreError(f"stage {stage.name!r}: batch_size {stage.batch_size} is not divisible by {W} processes")
    dataset = build_dataset(stage.data, f"{label}.data")
    transform = student.encoder.image_transform() if student.encoder is not None else None
    size = student.encoder.image_size if student.encoder is not None else 0
    consumed = {"mmu": (resume or {}).get("data_positions", {}).get("mmu", 0)}
    loader = make_loader(dataset, stage.batch_size // W, DistillCollator(student.layout, transform, size),
                         seed=ctx.seed + stage_index, start=consumed["mmu"], shuffle=stage.data.shuffle,
                         num_workers=stage.data.num_workers, rank=ctx.dist.rank, world_size=W)
    optimizer = _optimizer(trainable, stage)
    start_step = _restore_progress(optimizer, resume, student, ctx.dist)
    _set_train_modes(student)
    layerwise = stage.kind == "distill_layerwise"
    if not layerwise:
        student.backbone.gradient_checkpointing = stage.gradient_checkpointing

    def step_fn(step: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        for _ in range(stage.grad_accum):
            batch = next(loader)
            consumed["mmu"] += stage.batch_size
            with autocast_for(stage, ctx.device):
                if layerwise:
                    loss, per_layer = layerwise_loss(student, teacher, batch, spec.loss_scale)
                    parts = {"mse": float(loss.detach()), **{f"mse_layer{i}": v for i, v in per_layer.items()}}
                else:
                    loss = kl_loss(student, teacher, batch, spec.temperature)
                    parts = {"kl": float(loss.detach())}
            (loss / stage.grad_accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / stage.grad_accum
        average_gradients(trainable, ctx.dist)  # data parallel without a wrapper, as the contrastive stage
        if step == 0:  # computed before the first update: the losses of the stage's starting point (the seeding)
            ctx.metrics.log({"stage": stage.name, "event": "initial", **{f"loss_{k}": round(v, 6)
                                                                         for k, v in sums.items()}})
        return sums

    _run_loop(stage=stage, stage_index=stage_index, ctx=ctx, model=student, plain=student, trainable=trainable,
              step_fn=step_fn, data_positions=lambda: dict(consumed), start_step=start_step, optimizer=optimizer,
              resume=resume)
    student.backbone.gradient_checkpointing = False
    return _freeze(student)
