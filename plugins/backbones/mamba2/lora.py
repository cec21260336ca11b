"""Task LoRA adapters (peft) on the backbone: one adapter per task, selected by ``forward(task=...)``.

Adapters go on the ``in_proj`` of every Mamba-2 mixer (optionally the MLP's fc1/fc2). They are never put on
``out_proj`` or ``conv1d``: mamba_ssm's fused Mamba-2 path (``mamba_split_conv1d_scan_combined``) reads those
weights directly, so an adapter there would be silently skipped by fast kernels. in_proj always runs as a
module call, so its adapter works with every kernel and when decoding.

Selecting a task is stateless per call: each block sets its own LoRA layers' active adapter right before it
runs (so gradient checkpointing recomputes with the right adapter even when tasks alternate).

Decoding (one-token steps without gradients, eval mode) runs in_proj as one matrix product with the task's merged
weight ``W + scaling * B @ A`` (``decode_weight``) instead of peft's three (the base and the two adapter factors).
The merged weight is kept per layer and task and recomputed in place when W, A, B or the scaling change (seen
through their version counters and storage), so training, prefill and peft's own merge keep exact peft semantics.
It costs one extra copy of in_proj's weight per decoded task (1.6 GiB per task at the 1.3B shape in bf16;
``clear_decode_weights`` frees it). A CUDA graph captured over a step reads that buffer: before replaying, call the
backbone's ``prepare_decode`` (the decode engine does so on every call and captures again when the buffers moved).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from .block import GatedMLP
from .mixer import Mamba2

ALLOWED_TARGETS = {"in_proj": Mamba2, "fc1": GatedMLP, "fc2": GatedMLP}
ADAPTERS_FILE = "adapters.safetensors"
_META_KEY = "omnicore_lora"


def _lora_layer_cls():
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def check_targets(target_modules: Iterable[str]) -> list[str]:
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    for t in targets:
        short = t.split(".")[-1]
        if short not in ALLOWED_TARGETS:
            why = ("mamba_ssm's fused Mamba-2 kernel path reads out_proj and conv1d weights directly, so a LoRA "
                   "there would be bypassed" if short in ("out_proj", "conv1d", "dt_bias", "A_log", "D", "norm")
                   else "only plain projections that every kernel path calls as modules can carry adapters")
            raise ValueError(f"LoRA target {t!r} refused: {why}; allowed targets: {', '.join(ALLOWED_TARGETS)} "
                             "(in_proj = every Mamba-2 mixer's input projection)")
    if not targets:
        raise ValueError("target_modules is empty")
    return targets


def _target_names(model: nn.Module, targets: list[str]) -> list[str]:
    names = []
    for name, module in model.named_modules():
        for short, owner in ALLOWED_TARGETS.items():
            if short in targets and isinstance(module, owner) and hasattr(module, short):
                names.append(f"{name}.{short}" if name else short)
    return names


def tasks_of(model: nn.Module) -> list[str]:
    return list(getattr(model, "adapter_config", {}).get("tasks", []))


def add_task_adapters(model: nn.Module, tasks: Sequence[str], r: int = 8, alpha: float = 32, dropout: float = 0.05,
                      target_modules: Sequence[str] = ("in_proj",)) -> None:
    """Inject one peft LoRA adapter per task. Afterwards the base weights are frozen and every adapter is
    trainable (unfreeze what else should train: ``backbone.base_parameters()``, ``adapter_parameters(task)``)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = check_targets(target_modules)
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    have = tasks_of(model)
    config = getattr(model, "adapter_config", None)
    if config and (config["r"], config["alpha"], config["dropout"], config["target_modules"]) != (r, alpha, dropout, targets):
        raise ValueError(f"existing adapters use {config}; new ones must use the same r/alpha/dropout/targets")
    for task in tasks:
        if task in have:
            raise ValueError(f"adapter {task!r} already exists (adapters: {', '.join(have)})")
        if not task or not task.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"adapter name {task!r}: use letters, digits, '_' or '-'")
    if getattr(model, "merged_task", None) is not None:
        raise ValueError("unmerge_adapter() before adding adapters")
    names = _target_names(model, targets)
    if not names:
        raise ValueError(f"no modules match target_modules {targets}")
    for task in tasks:
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
        with warnings.catch_warnings():  # one adapter per task is the point here
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            inject_adapter_in_model(cfg, model, adapter_name=task)
    model.train(model.training)  # new dropout modules follow the model's mode
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    model.adapter_config = {"tasks": have + tasks, "r": r, "alpha": alpha, "dropout": dropout,
                            "target_modules": targets}
    LoraLayer = _lora_layer_cls()
    for block in model.layers:
        block.lora_layers = [m for m in block.modules() if isinstance(m, LoraLayer)]
        activate(block.lora_layers, None)


def activate(layers: list[nn.Module], task: str | None) -> None:
    """Make ``task``'s adapter the only active one in ``layers`` (None: no adapter)."""
    want = [task] if task is not None else []
    for m in layers:
        if m._active_adapter != want:
            m._active_adapter = want


def check_task(model: nn.Module, task: str | None) -> None:
    merged = getattr(model, "merged_task", None)
    if merged is not None and task != merged:
        raise ValueError(f"adapter {merged!r} is merged into the weights; forward(task={merged!r}) only, or call "
                         "unmerge_adapter() first")
    if task is None:
        return
    tasks = tasks_of(model)
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}: adapters are {', '.join(tasks) or 'none (add_task_adapters)'}")


def adapter_parameters(model: nn.Module, task: str | None = None) -> Iterator[nn.Parameter]:
    """The LoRA parameters of ``task`` (all adapters when None)."""
    for name, p in model.named_parameters():
        if ".lora_" in name and (task is None or f".{task}." in name):
            yield p


def base_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            yield p


def _all_lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for block in model.layers for m in block.lora_layers]


def merge_adapter(model: nn.Module, task: str) -> None:
    """Fold ``task``'s adapter into the base weights (inference); then only ``task`` (or unmerge) may run."""
    check_task(model, None)
    if task not in tasks_of(model):
        raise ValueError(f"unknown task {task!r}: adapters are {', '.join(tasks_of(model)) or 'none'}")
    if getattr(model, "merged_task", None) is not None:
        unmerge_adapter(model)
    with torch.no_grad():
        for m in _all_lora_layers(model):
            m.merge(adapter_names=[task])
    model.merged_task = task


def unmerge_adapter(model: nn.Module) -> None:
    with torch.no_grad():
        for m in _all_lora_layers(model):
            if m.merged:
                m.unmerge()
    model.merged_task = None


def _adapter_file(path: str | Path) -> Path:
    path = Path(path)
    return path / ADAPTERS_FILE if path.is_dir() or not path.suffix else path


def save_adapters(model: nn.Module, path: str | Path, tasks: Sequence[str] | None = None) -> Path:
    """Write only the adapter weights (and their config as metadata) to a safetensors file; returns its path."""
    from safetensors.torch import save_file

    config = getattr(model, "adapter_config", None)
    if not config:
        raise ValueError("the backbone has no adapters to save")
    tasks = list(tasks or config["tasks"])
    file = _adapter_file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()
               if ".lora_" in name and any(f".{t}." in name for t in tasks)}
    save_file(tensors, str(file), metadata={_META_KEY: json.dumps({**config, "tasks": tasks})})
    return file


def load_adapters(model: nn.Module, path: str | Path, strict: bool = True) -> list[str]:
    """Load adapters saved by ``save_adapters`` (adding missing ones from the stored config); returns the tasks."""
    from safetensors import safe_open

    file = _adapter_file(path)
    with safe_open(str(file), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if not meta:
        raise ValueError(f"{file}: no omnicore adapter metadata")
    missing_tasks = [t for t in meta["tasks"] if t not in tasks_of(model)]
    if missing_tasks:
        add_task_adapters(model, missing_tasks, r=meta["r"], alpha=meta["alpha"], dropout=meta["dropout"],
                          target_modules=meta["target_modules"])
    own = dict(model.named_parameters())
    unexpected = [k for k in tensors if k not in own]
    expected = [k for k in own if ".lora_" in k and any(f".{t}." in k for t in meta["tasks"])]
    missing = [k for k in expected if k not in tensors]
    if strict and (unexpected or missing):
        raise ValueError(f"{file}: adapter weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, v in tensors.items():
            if k in own:
                own[k].copy_(v)
    return list(meta["tasks"])


# ---- merged weights for decoding ------------------------------------------------------------------------
_DECODE_CACHE = "_omnicore_decode_weights"
_warned_inference = False


def _version_key(t: torch.Tensor):
    return t.data_ptr(), t._version


def decode_weight(layer: nn.Module, task: str | None) -> torch.Tensor | None:
    """For a peft LoRA Linear with ``task``'s adapter: ``W + scaling * B @ A`` (computed in float32 or wider, stored
    in W's dtype), cached on ``layer`` and recomputed in place when W, A, B or the scaling changed. None when
    there is nothing to merge or merging would change the result: no such adapter (or a plain Linear), adapters
    disabled or already merged by peft, DoRA or adapter biases, or LoRA dropout active (training mode)."""
    lora_A = getattr(layer, "lora_A", None)
    if task is None or lora_A is None or task not in lora_A:
        return None
    if layer.merged or layer.disable_adapters or getattr(layer, "fan_in_fan_out", False):
        return None
    if layer.use_dora.get(task, False) or getattr(layer, "lora_bias", {}).get(task, False):
        return None
    if layer.training and not isinstance(layer.lora_dropout[task], nn.Identity):
        return None
    W = layer.get_base_layer().weight
    A, B, scale = lora_A[task].weight, layer.lora_B[task].weight, float(layer.scaling[task])
    try:
        key = (_version_key(W), _version_key(A), _version_key(B), scale)
    except RuntimeError:  # inference tensors have no version counter: changes could not be seen
        global _warned_inference
        if not _warned_inference:
            _warned_inference = True
            warnings.warn("mamba2: the LoRA weights are inference tensors (the model was built or moved inside "
                          "torch.inference_mode()), so their changes cannot be tracked; decoding runs peft's unmerged "
                          "adapters (slower). Build the model outside inference mode.", stacklevel=2)
        return None
    cache: dict = layer.__dict__.setdefault(_DECODE_CACHE, {})
    hit = cache.get(task)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, updatable in place in or out of inference
        ct = torch.promote_types(W.dtype, torch.float32)
        merged = torch.addmm(W.to(ct), B.to(ct), A.to(ct), alpha=scale)
        buf = hit[1] if hit is not None else None
        if buf is not None and buf.shape == W.shape and buf.dtype == W.dtype and buf.device == W.device:
            buf.copy_(merged)  # same storage: CUDA graphs captured over it stay valid
        else:
            buf = merged.to(W.dtype)
    cache[task] = (key, buf)
    return buf


def clear_decode_weights(model: nn.Module) -> None:
    """Free the merged decoding weights (recomputed on the next decoding step)."""
    for m in _all_lora_layers(model):
        m.__dict__.pop(_DECODE_CACHE, None)
