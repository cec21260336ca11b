"""Built-in plugin: the recipe files shipped with omnicore (installed as package data)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from omnicore import hookimpl


@hookimpl
def register_recipes(register):
    root = Path(str(resources.files("omnicore.recipes")))
    for path in sorted(root.rglob("*.yaml")):
        if path.name.startswith("_"):  # shared fragments other recipes extend
            continue
        name = path.relative_to(root).with_suffix("").as_posix()
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        description = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        register(name, path, description=description)
