"""Load a recipe: read YAML (with source lines), follow ``extends:``, apply command-line overrides, validate.

Overrides: ``a.b.c=value`` sets (the value is read as YAML, then typed by the schema), ``~a.b`` deletes.
Inside lists, an element is addressed by index or, for stages, by its ``name``: ``stages.stage1_mmu.steps=10``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from ..errors import InputFileError, RecipeError
from ..inputs import regular_file
from .schema import Recipe
from .yaml_source import KeyPath, Location, YamlSyntaxError, load_bounded, read_yaml


@dataclass
class LoadedRecipe:
    recipe: Recipe
    data: dict[str, Any]  # the resolved plain data (after extends and overrides)
    path: Path
    sources: dict[KeyPath, Location] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem

    def where(self, path: KeyPath) -> str:
        """The best source location for a key path: the key itself or its nearest ancestor."""
        for n in range(len(path), -1, -1):
            loc = self.sources.get(tuple(path[:n]))
            if loc is not None:
                return str(loc)
        return str(self.path)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)


def resolve_recipe_path(ref: str | Path, relative_to: Path | None = None) -> Path:
    """A file path (absolute, or relative to ``relative_to`` / the cwd) or the name of a registered recipe."""
    candidates = []
    p = Path(ref)
    if relative_to is not None and not p.is_absolute():
        candidates.append(relative_to / p)
    candidates.append(p)
    if p.suffix not in (".yaml", ".yml"):
        candidates += [c.with_name(c.name + ".yaml") for c in list(candidates)]
    for c in candidates:
        if c.is_file():
            return c
    for c in candidates:  # something is there, but not a file to read: say what, not "no such recipe"
        if c.exists() or c.is_symlink():
            try:
                regular_file(c, "recipe")
            except InputFileError as exc:
                raise RecipeError(str(exc)) from None
            return c
    from ..registry import registry  # registered recipes (built-in or from plugins)

    try:
        return Path(registry.get("recipe", str(ref).removesuffix(".yaml")).factory)
    except KeyError:
        pass
    raise RecipeError(f"{ref}: no such recipe file or registered recipe (see `omni recipe ls`)")


def _deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _deep_merge(base[k], v) if k in base else v
        return out
    return copy.deepcopy(over)


# Recipes extend one or two others; a longer chain is a mistake (or a crafted file), not a layout.
MAX_EXTENDS = 16


def _read_with_extends(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[KeyPath, Location]]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise RecipeError(f"{path}: 'extends' cycle: {cycle}")
    if len(chain) >= MAX_EXTENDS:
        raise RecipeError(f"{path}: 'extends' chain longer than {MAX_EXTENDS} recipes (from {chain[0]})")
    data, sources = read_yaml(path)
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data, sources
    where = sources.get(("extends",), path)
    if not isinstance(parent_ref, str):
        raise RecipeError(f"{where}: 'extends' must be a recipe path or name")
    try:
        parent_path = resolve_recipe_path(parent_ref, relative_to=path.parent)
    except RecipeError as exc:
        raise RecipeError(f"{where}: extends: {exc}") from None
    parent_data, parent_sources = _read_with_extends(parent_path, chain + (path,))
    merged_sources = dict(parent_sources)
    merged_sources.update(sources)
    return _deep_merge(parent_data, data), merged_sources


def _step_into(node: Any, key: str, trail: str) -> tuple[Any, Any]:
    """Resolve one path component; returns (container key, child)."""
    if isinstance(node, dict):
        return key, node.get(key)
    if isinstance(node, list):
        if key.lstrip("-").isdigit():
            i = int(key)
            if not -len(node) <= i < len(node):
                raise RecipeError(f"override {trail!r}: index {i} out of range (list has {len(node)} items)")
            return i, node[i]
        for i, item in enumerate(node):
            if isinstance(item, dict) and item.get("name") == key:
                return i, item
        names = [str(item.get("name")) for item in node if isinstance(item, dict) and "name" in item]
        raise RecipeError(f"override {trail!r}: no list item named {key!r}" + (f"; names: {', '.join(names)}" if names else ""))
    raise RecipeError(f"override {trail!r}: cannot index into a {type(node).__name__}")


def apply_override(data: dict, override: str) -> KeyPath:
    """Apply one ``a.b=value`` or ``~a.b`` override in place; returns the (resolved) key path touched."""
    delete = override.startswith("~")
    body = override[1:] if delete else override
    if delete:
        dotted, raw = body, None
    else:
        if "=" not in body:
            raise RecipeError(f"override {override!r}: expected key.path=value or ~key.path")
        dotted, raw = body.split("=", 1)
    keys = [k for k in dotted.strip().split(".")]
    if not all(keys):
        raise RecipeError(f"override {override!r}: empty key in {dotted!r}")
    node: Any = data
    resolved: list[Any] = []
    for key in keys[:-1]:
        k, child = _step_into(node, key, override)
        if child is None:
            if delete:
                raise RecipeError(f"override {override!r}: {'.'.join(keys)} is not set")
            child = {}
            node[k] = child
        resolved.append(k)
        node = child
    last = keys[-1]
    if isinstance(node, list):
        k, _ = _step_into(node, last, override)
    elif isinstance(node, dict):
        k = last
    else:
        raise RecipeError(f"override {override!r}: {'.'.join(keys[:-1])} is not a mapping")
    resolved.append(k)
    if delete:
        try:
            del node[k]
        except (KeyError, IndexError):
            raise RecipeError(f"override {override!r}: {'.'.join(keys)} is not set") from None
    else:
        try:
            label = override if len(override) <= 60 else override[:57] + "..."
            value = load_bounded(raw, f"override {label!r}") if raw.strip() else ""
        except YamlSyntaxError:  # not YAML: the text itself (too deep or too many aliases still fails)
            value = raw
        node[k] = value
    return tuple(resolved)


def _format_validation_error(exc: pydantic.ValidationError, loaded_where, overridden: dict[KeyPath, str]) -> str:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    # pydantic reports model-level validators at the model's own path; the key path is what users see
    dotted = ".".join(str(p) for p in loc) or "<root>"
    origin = next((f"override {o!r}" for p, o in overridden.items() if loc[: len(p)] == p), None)
    where = origin or loaded_where(loc)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif "input" in err and err["type"] not in ("value_error", "assertion_error") and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: {dotted}: {msg}{more}"


def load_recipe(ref: str | Path, overrides: list[str] | None = None) -> LoadedRecipe:
    """Read, merge, override and validate a recipe. Raises RecipeError with file:line and key path."""
    path = resolve_recipe_path(ref)
    data, sources = _read_with_extends(path)
    overridden: dict[KeyPath, str] = {}
    for ov in overrides or []:
        overridden[apply_override(data, ov)] = ov
    loaded = LoadedRecipe(recipe=None, data=data, path=path, sources=sources, overrides=list(overrides or []))  # type: ignore[arg-type]
    try:
        loaded.recipe = Recipe.model_validate(data)
    except pydantic.ValidationError as exc:
        raise RecipeError(_format_validation_error(exc, loaded.where, overridden)) from None
    return loaded
