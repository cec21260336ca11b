"""Check what can be checked without building weights: registered names, params binding, stage references."""

from __future__ import annotations

from typing import Any

from ..errors import OmnicoreError
from ..model.roles import HEAD_INJECTIONS, ROLE_INJECTIONS, ROLE_KINDS, TASKS
from ..registry import registry
from .loader import LoadedRecipe
from .schema import ComponentSpec


def _check_component(loaded: LoadedRecipe, path: tuple, kind: str, spec: ComponentSpec, injected: set[str],
                     problems: list[str]) -> None:
    try:
        component = registry.get(kind, spec.type)
    except OmnicoreError as exc:
        problems.append(f"{loaded.where(path + ('type',))}: {'.'.join(map(str, path))}.type: {exc}")
        return
    try:
        component.check_params(spec.params, allow_missing=injected)
    except OmnicoreError as exc:
        problems.append(f"{loaded.where(path + ('params',))}: {'.'.join(map(str, path))}.params: {exc}")


# The task whose decoding reads each sampling option of an inference block: T2I draws exactly the tokenizer grid's
# h*w codes (no length limit), MMU has no guidance.
_ONLY_FOR = {"max_new_tokens": "mmu", "guidance_scale": "t2i"}
_INPUTS = {"prompts": "t2i", "prompts_file": "t2i", "questions": "mmu", "jsonl": "mmu"}


def _given(data: dict, *path: str) -> dict:
    """The keys a block sets in the (resolved) recipe data; defaults do not count."""
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else {}


def validate_recipe(loaded: LoadedRecipe) -> list[str]:
    """All problems found, each a one-line message starting with file:line. Empty when the recipe is good."""
    recipe = loaded.recipe
    problems: list[str] = []
    roles: set[str] = set()
    adapters: set[str] = set()
    if recipe.model is not None:
        m = recipe.model
        for role, kind in ROLE_KINDS.items():
            spec = getattr(m, role)
            if spec is not None:
                roles.add(role)
                _check_component(loaded, ("model", role), kind, spec, ROLE_INJECTIONS.get(role, set()), problems)
        for name, spec in m.heads.items():
            roles.add(f"heads.{name}")
            _check_component(loaded, ("model", "heads", name), "head", spec, HEAD_INJECTIONS.get(name, set()), problems)
        for name, spec in m.extra.items():
            roles.add(name)
        lora = m.backbone.params.get("lora") or {}
        adapters = set(lora.get("tasks", [])) if isinstance(lora, dict) else set()
    for i, stage in enumerate(recipe.stages):
        base = ("stages", i)
        for task, tspec in stage.tasks.items():
            if task not in TASKS:
                problems.append(f"{loaded.where(base + ('tasks', task))}: stages.{i}.tasks.{task}: unknown task; "
                                f"tasks: {', '.join(TASKS)}")
            if tspec.code_balance and task != "t2i":
                problems.append(f"{loaded.where(base + ('tasks', task, 'code_balance'))}: stages.{i}.tasks.{task}."
                                f"code_balance: only the t2i task has image codes to balance")
            if tspec.data is not None:
                _check_component(loaded, base + ("tasks", task, "data"), "dataset", tspec.data, set(), problems)
        if stage.data is not None:
            _check_component(loaded, base + ("data",), "dataset", stage.data, set(), problems)
        for j, role in enumerate(stage.train.roles):
            if role not in roles and not (role == "heads" and any(r.startswith("heads.") for r in roles)):
                problems.append(f"{loaded.where(base + ('train', 'roles', j))}: stages.{i}.train.roles.{j}: "
                                f"no model role {role!r}; roles: {', '.join(sorted(roles))}")
        for j, adapter in enumerate(stage.train.adapters):
            if adapter not in adapters:
                problems.append(f"{loaded.where(base + ('train', 'adapters', j))}: stages.{i}.train.adapters.{j}: "
                                f"no LoRA adapter {adapter!r} (model.backbone.params.lora.tasks: "
                                f"{', '.join(sorted(adapters)) or 'none'})")
        if stage.kind == "vqgan" and "image_tokenizer" not in roles:
            problems.append(f"{loaded.where(base + ('kind',))}: stages.{i}.kind: a vqgan stage needs "
                            f"model.image_tokenizer")
    if recipe.evaluation is not None:
        for task in ("mmu", "t2i"):
            spec = getattr(recipe.evaluation, task)
            if spec is not None:
                _check_component(loaded, ("evaluation", task), "dataset", spec, set(), problems)
        if "guidance_scale" in _given(loaded.data, "evaluation", "sampling"):
            problems.append(f"{loaded.where(('evaluation', 'sampling', 'guidance_scale'))}: evaluation.sampling."
                            f"guidance_scale: not read: evaluation guides T2I with evaluation.guidance_scale")
    if recipe.inference is not None:
        task = recipe.inference.task
        for key in _given(loaded.data, "inference", "inputs"):
            if _INPUTS.get(key, task) != task:
                wanted = " and ".join(repr(k) for k, t in _INPUTS.items() if t == task)
                problems.append(f"{loaded.where(('inference', 'inputs', key))}: inference.inputs.{key}: an input "
                                f"for task {_INPUTS[key]}; task {task} reads {wanted}")
        for key in _given(loaded.data, "inference", "sampling"):
            if _ONLY_FOR.get(key, task) != task:
                problems.append(f"{loaded.where(('inference', 'sampling', key))}: inference.sampling.{key}: not "
                                f"read by task {task} (it applies to {_ONLY_FOR[key]})")
    return problems
