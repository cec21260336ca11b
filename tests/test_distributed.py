"""Data-parallel training under torchrun on the CPU (gloo): DDP and FSDP2 against one process, and exact resume
after a process is killed (kill -9) at a random checkpoint, for two stages (MMU on adapters, then both tasks with
the backbone training and gradient accumulation)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import omnicore

RECIPE = """\
extends: quickstart
stages:
  - name: mmu
    tasks: {mmu: {batch_size: 4, data: {type: synthetic_shapes, params: {task: mmu, size: 64, image_size: 32}}}}
    train: {roles: [projector], adapters: [mmu]}
    optimizer: {lr: 1.0e-3}
    steps: 3
    log_every: 1
    checkpoint_every: 1
  - name: unified
    tasks:
      mmu: {batch_size: 4, data: {type: synthetic_shapes, params: {task: mmu, size: 64, image_size: 32, seed: 1}}}
      t2i: {batch_size: 4, data: {type: synthetic_shapes, params: {task: t2i, size: 64, image_size: 32}}}
    train: {roles: [backbone, projector, heads.text, heads.image, heads.caption, heads.caption_pool]}
    optimizer: {lr: 1.0e-3}
    steps: 4
    grad_accum: 2
    log_every: 1
    checkpoint_every: 1
"""
CHECKPOINTS = 3 + 4
# LoRA dropout draws a mask over the rows a process holds: one process and two draw different masks
NO_DROPOUT, DROPOUT = ["model.backbone.params.lora.dropout=0.0"], ["model.backbone.params.lora.dropout=0.1"]


def _overrides(strategy: str, extra: list[str]) -> list[str]:
    return ["~evaluation", f"stages.mmu.distributed={strategy}", f"stages.unified.distributed={strategy}", *extra]


def _command(recipe: Path, run: Path, procs: int, overrides: list[str], resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "omnicore.cli", "recipe", "run", str(recipe), *overrides, "--run-dir", str(run)]
    return cmd + (["--nproc-per-node", str(procs)] if procs > 1 else []) + (["--resume"] if resume else [])


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(recipe: Path, run: Path, procs: int, overrides: list[str], resume: bool = False) -> None:
    r = subprocess.run(_command(recipe, run, procs, overrides, resume), capture_output=True, text=True,
                       timeout=600, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[tuple]:
    """Per (stage, step): the losses and the gradient norm, in the order logged."""
    return [(r["stage"], r["step"], r.get("loss_mmu"), r.get("loss_t2i"), r["grad_norm"])
            for r in _records(run) if "grad_norm" in r]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return omnicore.load(run / "model").state_dict()


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "dist.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def one_process(recipe, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one") / "run"
    _run(recipe, run, 1, _overrides("ddp", NO_DROPOUT))  # one process: the strategy does not apply
    return run


@pytest.fixture(scope="module")
def initial_weights(recipe) -> dict[str, torch.Tensor]:
    """The weights the run starts from (the runner seeds, then builds)."""
    from omnicore.model.unified import build_from_spec
    from omnicore.recipe import load_recipe
    from omnicore.runner import seed_everything

    loaded = load_recipe(recipe, _overrides("ddp", NO_DROPOUT))
    seed_everything(loaded.recipe.seed)
    return build_from_spec(loaded.recipe.model.model_dump(mode="json")).state_dict()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_like_one(strategy, recipe, one_process, initial_weights, tmp_path):
    """gloo, 2 processes, the same global batch (2 + 2 rows against 4): the same losses, gradient norms and final
    weights as one process, and the saved model/ is one consolidated directory that loads in this one process."""
    run = tmp_path / "two"
    _run(recipe, run, 2, _overrides(strategy, NO_DROPOUT))
    a, b = _losses(one_process), _losses(run)
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == CHECKPOINTS
    for x, y in zip(a, b):
        assert [v is None for v in x] == [v is None for v in y], (x, y)
        assert [v for v in x[2:] if v is not None] == pytest.approx([v for v in y[2:] if v is not None], rel=1e-4,
                                                                    abs=1e-5), (x, y)
    assert sorted(p.name for p in (run / "model").iterdir()) == ["adapters.safetensors", "config.json",
                                                                 "model.safetensors"]
    one, two = _weights(one_process), _weights(run)
    assert one.keys() == two.keys() == initial_weights.keys()
    moved = {k for k in one if not torch.equal(one[k], initial_weights[k])}
    # the stages trained what they name (backbone, projector, heads) and nothing else
    assert any(k.startswith("backbone.") and ".lora_" not in k for k in moved)
    assert not any(k.startswith(("encoder.", "image_tokenizer.", "heads.contrastive.")) for k in moved)
    # Adam moves a weight by up to lr (1e-3) a step whatever the gradient's size, so float noise in small gradients
    # shows at about 1e-5 here; one missed or wrong step is 1e-3
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=0, atol=1e-4), k
    assert max(float((one[k] - initial_weights[k]).abs().max()) for k in moved) > 3e-3


def _worker_pids(tag: str) -> dict[int, int]:
    """RANK -> pid of the torchrun workers started with OMNICORE_TEST_RUN=tag."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except OSError:
            continue
        if env.get("OMNICORE_TEST_RUN") == tag and "RANK" in env and "LOCAL_RANK" in env:
            out[int(env["RANK"])] = int(proc.name)
    return out


def _kill_at_checkpoint(cmd: list[str], run: Path, at: int, rank: int | None) -> str:
    """Start ``cmd``; once its ``at``-th checkpoint is written kill -9 one worker (``rank``; None: the process
    itself). Returns the name of the last complete checkpoint."""
    tag = f"{run}-{time.time()}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**ENV, "OMNICORE_TEST_RUN": tag})
    root = run / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (root / "latest").is_file() and len([p for p in root.iterdir() if "-step" in p.name and not p.name.startswith(".")]) >= at:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    if rank is None:
        proc.send_signal(signal.SIGKILL)
    else:
        os.kill(_worker_pids(tag)[rank], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    return (root / "latest").read_text().strip()


@pytest.mark.parametrize("strategy,procs,at", [("ddp", 1, None), ("ddp", 2, 3), ("fsdp", 2, None)])
def test_killed_run_resumes_to_the_same_weights(strategy, procs, at, recipe, one_process, tmp_path):
    """kill -9 (one rank of two, or the single process) after a checkpoint, resume with --resume, and finish with
    the same weights and later losses as a run never interrupted. The checkpoint is a random one, or (``at`` 3) the
    first stage's last, where the next stage starts from the saved random state. Two processes keep LoRA dropout
    on, so each rank's random state has to come back too."""
    overrides = _overrides(strategy, NO_DROPOUT if procs == 1 else DROPOUT)
    if procs == 1:
        reference = one_process
    else:
        reference = tmp_path / "whole"
        _run(recipe, reference, procs, overrides)
    at = at or random.randint(1, CHECKPOINTS - 1)
    run = tmp_path / "cut"
    killed_at = _kill_at_checkpoint(_command(recipe, run, procs, overrides), run, at,
                                    rank=None if procs == 1 else random.randint(0, procs - 1))
    _run(recipe, run, procs, overrides, resume=True)
    a, b = _weights(reference), _weights(run)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a kill at checkpoint {at} ({killed_at})"
    done = {x[:2]: x for x in _losses(run)}  # the resumed steps' records come last
    assert [done[x[:2]] for x in _losses(reference)] == _losses(reference), f"kill at {killed_at}"
