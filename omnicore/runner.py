"""``omni recipe run``: a run directory, the recipe's stages in order, evaluation, inference.

A run directory holds recipe.yaml (resolved), metrics.jsonl, checkpoints/, model/ (the final model,
loadable with ``omnicore.load``), eval.json and outputs/; distillation runs also teacher/ (the teacher their
students were seeded from) and the model directories stages name with ``save_model``. The last line printed names
the final model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console

from .errors import OmnicoreError, RecipeError
from .recipe import load_recipe
from .recipe.validate import validate_recipe
from .training.checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, load_state_dict_file


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str | None) -> torch.device:
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise OmnicoreError(f"--device {name}: CUDA is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def launch_distributed(argv: list[str], nproc: int) -> int:
    """Re-run this command under torchrun with ``nproc`` processes on this node."""
    args = [a for a in argv[1:]]
    cleaned, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--nproc-per-node":
            skip = True
            continue
        if a.startswith("--nproc-per-node="):
            continue
        cleaned.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "omnicore.cli", *cleaned]
    return subprocess.call(cmd)


def _init_source(path: str) -> Path | None:
    """What ``init_from`` names: a checkpoint directory (or a run's checkpoints/ folder: its latest), a model
    directory, a weights file or a Mamba-2 LM directory (state-spaces/mamba2-*); None when it is none of these."""
    from .convert.mamba2_lm import is_mamba2_lm_dir

    p = Path(path)
    if is_mamba2_lm_dir(p):  # before the model-directory test: such a directory may hold a model.safetensors
        return p
    if (p / "latest").is_file():
        p = latest_checkpoint(p) or p
    if (p / "trainer.pt").is_file() or (p / "model.safetensors").is_file() or p.is_file():
        return p
    return None


def _hf_model_type(path: Path) -> str | None:
    """The ``model_type`` of a Hugging Face model directory (config.json with one, not an omnicore model's);
    None for anything else. Never raises."""
    import json

    config_path = path / "config.json"
    try:
        if not path.is_dir() or not config_path.is_file() or config_path.stat().st_size > (1 << 20):
            return None
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("format") is not None:
        return None
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def _load_init_weights(model, path: str, label: str) -> None:
    """Start a stage from a checkpoint directory, a model directory, a weights file, a Mamba-2 LM directory
    (its backbone and text embedding; omnicore.convert.mamba2_lm) or a Hugging Face decoder directory (loaded by
    a backbone that reads one, ``load_hf_directory``: its layers, and its embedding and LM head into the text
    head)."""
    from .convert.mamba2_lm import is_mamba2_lm_dir, load_mamba2_lm

    p = _init_source(path) or Path(path)
    if is_mamba2_lm_dir(p):
        load_mamba2_lm(model, p, label)
        return
    model_type = _hf_model_type(Path(path))
    if model_type is not None:
        loader = getattr(model.backbone, "load_hf_directory", None)
        if loader is None:
            raise OmnicoreError(f"{label}: {path} is a Hugging Face model directory (model_type {model_type!r}); "
                                "the model's backbone cannot load one (backbone type transformer can)")
        heads = getattr(model, "heads", {})
        loader(Path(path), heads["text"] if "text" in heads else None, label,
               getattr(model, "text_tokenizer", None))
        return
    if (p / "trainer.pt").is_file():
        state, _ = load_checkpoint(p)
    elif (p / "model.safetensors").is_file():
        state = load_state_dict_file(p / "model.safetensors")
        if (p / "adapters.safetensors").is_file():
            state.update(load_state_dict_file(p / "adapters.safetensors"))
    elif p.is_file():
        state = load_state_dict_file(p)
    else:
        raise OmnicoreError(f"{label}: {path}: no checkpoint, model directory or weights file there")
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise OmnicoreError(f"{label}: {path}: {len(wrong)} tensors of another shape than the model's, e.g. {k}: "
                            f"{tuple(state[k].shape)} there, {tuple(own[k].shape)} in the model")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise OmnicoreError(f"{label}: {path}: {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")


def run_recipe(ref: str, overrides: list[str], *, run_dir: Path | None = None, resume: bool = False,
               device: str | None = None, console: Console | None = None, stop_after_step: int | None = None) -> Path:
    """Run a recipe; returns the run directory."""
    from .model.unified import build_from_spec, load
    from .training.distributed import end_distributed, init_distributed
    from .training.metrics import MetricsWriter
    from .distill.stages import run_distill_stage
    from .training.trainer import (RunContext, restore_process_rng, run_contrastive_stage, run_unified_stage,
                                   run_vqgan_stage)

    console = console or Console()
    loaded = load_recipe(ref, overrides)
    problems = validate_recipe(loaded)
    if problems:
        raise RecipeError(problems[0] + (f" (+{len(problems) - 1} more; see `omni recipe validate`)" if len(problems) > 1 else ""))
    recipe = loaded.recipe
    for stage in recipe.stages:  # before any stage trains, not hours later when the stage starts
        if stage.init_from and _init_source(stage.init_from) is None \
                and not (run_dir is not None and Path(stage.init_from).resolve().is_relative_to(Path(run_dir).resolve())):
            raise OmnicoreError(f"{loaded.where(('stages', recipe.stages.index(stage), 'init_from'))}: "
                                f"stages.{stage.name}.init_from: {stage.init_from}: no checkpoint, model directory or "
                                "weights file there")
    for stage in recipe.stages:
        teacher = stage.distill.teacher if stage.distill is not None else None
        if teacher and not (Path(teacher) / "config.json").is_file():
            raise OmnicoreError(f"{loaded.where(('stages', recipe.stages.index(stage), 'distill', 'teacher'))}: "
                                f"stages.{stage.name}.distill.teacher: {teacher}: not a model directory")
    if recipe.inference is not None:  # its input files are read now: a bad one is refused before anything runs
        from .generation.recipe_inference import read_inputs

        read_inputs(recipe.inference, loaded.path.parent)
    dev = pick_device(device)
    dist_info = init_distributed(dev)
    if run_dir is None:
        if resume:
            raise OmnicoreError("--resume needs --run-dir naming the run to continue")
        run_dir = Path("runs") / f"{loaded.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir / "checkpoints") if resume else None
    if resume and ckpt is None and not (run_dir / "recipe.yaml").is_file():
        raise OmnicoreError(f"--resume: {run_dir} has no run to continue (no recipe.yaml or checkpoints)")
    if not resume and (run_dir / "checkpoints").exists():
        raise OmnicoreError(f"{run_dir}: already holds a run; use --resume to continue it or choose another --run-dir")
    created = not run_dir.exists()
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", f"# resolved from {loaded.path}"
                          + (f" with {' '.join(overrides)}" if overrides else "") + "\n"
                          + yaml.safe_dump(loaded.data, sort_keys=False))
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=dist_info.is_main)
    ctx = RunContext(run_dir=run_dir, device=dev, seed=recipe.seed, console=console, metrics=metrics,
                     dist=dist_info, stop_after_step=stop_after_step)
    seed_everything(recipe.seed)
    model = None
    final_dir = run_dir / "model"
    completed = False
    try:
        if recipe.stages:
            model = build_from_spec(recipe.model.model_dump(mode="json")).to(dev)
            resume_state = None
            if ckpt is not None:
                state, resume_state = load_checkpoint(ckpt)
                saved_spec = resume_state.get("model_spec")
                if saved_spec is not None and json.loads(saved_spec) != model.config.get("model"):
                    model = build_from_spec(json.loads(saved_spec)).to(dev)  # a distilled student by now
                model.load_state_dict(state, strict=True)
                console.print(f"resuming from {ckpt} (stage {resume_state['stage']}, step {resume_state['step']})")
                if resume_state["done"]:  # the next stage draws from the random streams where that stage left them
                    restore_process_rng(resume_state, dist_info)
                    done_stage = recipe.stages[resume_state["stage_index"]]
                    if done_stage.save_model and dist_info.is_main and not (run_dir / done_stage.save_model).is_dir():
                        model.save(run_dir / done_stage.save_model)  # killed between its checkpoint and this
            for i, stage in enumerate(recipe.stages):
                this_resume = None
                if resume_state is not None:
                    if i < resume_state["stage_index"] or (i == resume_state["stage_index"] and resume_state["done"]):
                        continue
                    if i == resume_state["stage_index"]:
                        this_resume = resume_state
                if stage.init_from and this_resume is None:
                    _load_init_weights(model, stage.init_from, f"stages.{stage.name}.init_from")
                if stage.seed is not None:
                    seed_everything(stage.seed)
                runner = {"vqgan": run_vqgan_stage, "contrastive": run_contrastive_stage,
                          "distill_layerwise": run_distill_stage, "distill_e2e": run_distill_stage}.get(
                    stage.kind, run_unified_stage)
                result = runner(model, stage, i, ctx, resume=this_resume)
                if stage.kind.startswith("distill_"):
                    model = result  # a student from here on
                if stage.save_model and dist_info.is_main:
                    model.save(run_dir / stage.save_model)
            if dist_info.is_main:
                model.save(final_dir)
        if recipe.evaluation is not None and dist_info.is_main:
            from .evaluation import run_evaluation

            if model is None:
                raise OmnicoreError("evaluation needs a model: add stages, or use inference.model")
            results = run_evaluation(model, recipe.evaluation, run_dir, console, device=dev)
            metrics.log({"event": "evaluation", **results})
        if recipe.inference is not None and dist_info.is_main:
            from .generation.recipe_inference import run_inference

            inf_model = load(recipe.inference.model, device=dev) if recipe.inference.model else model
            if inf_model is None:
                raise OmnicoreError("inference: set inference.model to a model directory (or add stages)")
            run_inference(inf_model, recipe.inference, run_dir, loaded.path.parent, console)
        completed = True
    except OmnicoreError:
        # refused before anything was trained (a bad data file, say): leave no half-made run directory behind
        if created and dist_info.is_main and latest_checkpoint(run_dir / "checkpoints") is None:
            metrics.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        metrics.close()
        end_distributed(dist_info, completed)
    if dist_info.is_main:
        if model is not None and recipe.stages:
            console.print(f"final model: {final_dir}", highlight=False, soft_wrap=True)
        else:
            console.print(f"run directory: {run_dir}", highlight=False, soft_wrap=True)
    return run_dir
