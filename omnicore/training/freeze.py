"""What a stage trains: whole roles, parameter-name globs and LoRA adapters; everything else is frozen."""

from __future__ import annotations

import fnmatch
from collections import Counter

from torch import nn

from ..errors import OmnicoreError
from ..recipe.schema import TrainSpec


def _adapter_of(name: str) -> str | None:
    """The task of a peft LoRA parameter (``...lora_A.<task>.weight``), else None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def apply_trainable(model: nn.Module, roles: dict[str, nn.Module], train: TrainSpec) -> dict[str, int]:
    """Set requires_grad per the stage; return trainable parameter counts per role (and 'other')."""
    role_prefixes = {}
    for role in roles:
        role_prefixes[role] = role + "."
    wanted_roles = set()
    for role in train.roles:
        if role == "heads":
            wanted_roles |= {r for r in roles if r.startswith("heads.")}
        elif role in roles:
            wanted_roles.add(role)
        else:
            raise OmnicoreError(f"train.roles: no model role {role!r}; roles: {', '.join(sorted(roles))}")
    adapters_seen = set()
    counts: Counter[str] = Counter()
    for name, param in model.named_parameters():
        role = next((r for r, p in role_prefixes.items() if name.startswith(p)), "other")
        adapter = _adapter_of(name)
        if adapter is not None:
            adapters_seen.add(adapter)
        on = (role in wanted_roles
              or any(fnmatch.fnmatchcase(name, g) for g in train.globs)
              or (adapter is not None and adapter in train.adapters))
        param.requires_grad_(on)
        if on:
            counts[role] += param.numel()
    missing = [a for a in train.adapters if a not in adapters_seen]
    if missing:
        raise OmnicoreError(f"train.adapters: no LoRA adapter {missing[0]!r} in the backbone "
                            f"(adapters: {', '.join(sorted(adapters_seen)) or 'none'})")
    return dict(counts)
