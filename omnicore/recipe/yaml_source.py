"""YAML reading that remembers where every key came from, so errors can point at file:line."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputFileError, RecipeError
from ..inputs import MAX_RECIPE_BYTES, first_line, read_text

KeyPath = tuple  # ("stages", 0, "optimizer", "lr")


@dataclass(frozen=True)
class Location:
    file: str
    line: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


# A recipe nests about six levels; the composer and the value builder recurse once per level.
MAX_DEPTH = 64
# A recipe holds a few hundred values. Pure-Python PyYAML composes some 10**4 to 10**5 nodes a second, so a
# bound on the nodes in the text keeps a crafted file's parse to seconds, and one on the values after aliases
# are expanded stops "billion laughs" (10**9 values from a dozen lines).
MAX_NODES = 20_000
MAX_VALUES = 100_000
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlSyntaxError(RecipeError):
    """The text is not well-formed YAML (as opposed to YAML that is too deep or expands too far)."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting deeper than ``max_depth`` (before Python's stack runs out) and
    documents of more than ``max_nodes`` nodes."""

    def __init__(self, text: str, file: str, max_depth: int, max_nodes: int) -> None:
        super().__init__(text)
        self._file, self._max_depth, self._max_nodes = file, max_depth, max_nodes
        self._depth = self._nodes = 0

    def compose_node(self, parent, index):
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > self._max_depth:
                line = self.peek_event().start_mark.line + 1
                raise RecipeError(f"{self._file}:{line}: nested more than {self._max_depth} levels deep")
            if self._nodes > self._max_nodes:
                line = self.peek_event().start_mark.line + 1
                raise RecipeError(f"{self._file}:{line}: more than {self._max_nodes:,} values (long lists such "
                                  f"as prompts belong in a file of their own)")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Builder:
    """Plain data from composed nodes, recording each key path's line, with aliases expanded under a budget."""

    def __init__(self, file: str, lines: dict[KeyPath, Location], max_depth: int, max_values: int) -> None:
        self.file, self.lines, self.max_depth = file, lines, max_depth
        self.max_values = self.budget = max_values
        self.open: set[int] = set()  # nodes being built: an alias back into one is a cycle
        self.scalars = yaml.SafeLoader("")  # one constructor for every scalar

    def where(self, node: yaml.Node) -> str:
        return f"{self.file}:{node.start_mark.line + 1}"

    def build(self, node: yaml.Node, path: KeyPath, depth: int = 1) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise RecipeError(f"{self.where(node)}: aliases expand to more than {self.max_values:,} values")
        if depth > self.max_depth:  # aliases can nest deeper than the text does
            raise RecipeError(f"{self.where(node)}: nested more than {self.max_depth} levels deep (through aliases)")
        self.lines[path] = Location(self.file, node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            return _scalar(self.scalars, node, self.where(node))
        if id(node) in self.open:
            raise RecipeError(f"{self.where(node)}: an alias refers to a value that contains it")
        expected = _MAP_TAG if isinstance(node, yaml.MappingNode) else _SEQ_TAG
        if node.tag != expected:
            raise RecipeError(f"{self.where(node)}: unsupported tag {node.tag!r}")
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise RecipeError(f"{self.where(key_node)}: keys must be plain scalars")
                if key_node.tag == _MERGE_TAG:
                    raise RecipeError(f"{self.where(key_node)}: merge keys ('<<') are not supported; "
                                      f"use 'extends' to build on another recipe")
                key = _scalar(self.scalars, key_node, self.where(key_node))
                if key in out:
                    raise RecipeError(f"{self.where(key_node)}: duplicate key {_fmt(path + (key,))!r}")
                child = path + (key,)
                out[key] = self.build(value_node, child, depth + 1)
                self.lines[child] = Location(self.file, key_node.start_mark.line + 1)
            return out
        finally:
            self.open.discard(id(node))


def _scalar(loader: yaml.SafeLoader, node: yaml.ScalarNode, where: str) -> Any:
    try:
        return loader.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError:
        raise RecipeError(f"{where}: unsupported tag {node.tag!r}") from None
    except ValueError as exc:  # a malformed timestamp, an integer over Python's digit limit, ...
        if "integer string conversion" in str(exc):
            raise RecipeError(f"{where}: an integer longer than {sys.get_int_max_str_digits()} digits") from None
        raise RecipeError(f"{where}: invalid value: {first_line(exc)}") from None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    """(1-based line or None, one-line problem) of a PyYAML error, whose own str() spans several lines."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
        char = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or b"?")
        return line, f"character #x{char:04x} is not allowed in YAML"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or first_line(exc)
    return (mark.line + 1 if mark is not None else None), " ".join(str(problem).split())


def compose_bounded(text: str, file: str, max_depth: int = MAX_DEPTH,
                    max_nodes: int = MAX_NODES) -> yaml.Node | None:
    """Compose one YAML document with nesting and size bounded; syntax errors become one-line RecipeErrors."""
    loader = None
    try:
        loader = _BoundedLoader(text, file, max_depth, max_nodes)  # its reader checks every character up front
        return loader.get_single_node()
    except yaml.YAMLError as exc:
        line, problem = _yaml_problem(exc, text)
        raise YamlSyntaxError(f"{file}{'' if line is None else f':{line}'}: invalid YAML: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_bounded(text: str, file: str) -> Any:
    """Plain data from a YAML text, under the same nesting and alias bounds as a recipe file."""
    node = compose_bounded(text, file)
    return None if node is None else _Builder(file, {}, MAX_DEPTH, MAX_VALUES).build(node, ())


def _fmt(path: KeyPath) -> str:
    return ".".join(str(p) for p in path) or "<root>"


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[KeyPath, Location]]:
    """Parse one YAML file into plain data plus a map from key path to its source location."""
    try:
        text = read_text(path, "recipe", MAX_RECIPE_BYTES)
    except InputFileError as exc:
        raise RecipeError(str(exc)) from None
    node = compose_bounded(text, str(path))
    lines: dict[KeyPath, Location] = {}
    if node is None:
        return {}, lines
    data = _Builder(str(path), lines, MAX_DEPTH, MAX_VALUES).build(node, ())
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: a recipe must be a mapping at the top level")
    return data, lines
