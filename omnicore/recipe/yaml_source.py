"""YAML reading that remembers where every key came from, so errors can point at file:line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError

KeyPath = tuple  # ("stages", 0, "optimizer", "lr")


@dataclass(frozen=True)
class Location:
    file: str
    line: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def _construct(node: yaml.Node, path: KeyPath, file: str, lines: dict[KeyPath, Location]) -> Any:
    lines[path] = Location(file, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise RecipeError(f"{file}:{key_node.start_mark.line + 1}: keys must be plain scalars")
            key = _scalar(key_node)
            if key in out:
                raise RecipeError(f"{file}:{key_node.start_mark.line + 1}: duplicate key {_fmt(path + (key,))!r}")
            child = path + (key,)
            out[key] = _construct(value_node, child, file, lines)
            lines[child] = Location(file, key_node.start_mark.line + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, path + (i,), file, lines) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _fmt(path: KeyPath) -> str:
    return ".".join(str(p) for p in path) or "<root>"


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[KeyPath, Location]]:
    """Parse one YAML file into plain data plus a map from key path to its source location."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe file: {exc.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    lines: dict[KeyPath, Location] = {}
    if node is None:
        return {}, lines
    data = _construct(node, (), str(path), lines)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: a recipe must be a mapping at the top level")
    return data, lines
