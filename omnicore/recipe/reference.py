"""The recipe reference, generated from the pydantic schema (``omnicore.recipe.schema``).

``json_schema()`` is the recipe schema as JSON Schema (``Recipe.model_json_schema()``). ``markdown()`` renders every
section and field of it as Markdown: name, type, default, constraints and description. A field's description is
its ``Field(description=...)`` where the schema gives one, else the comment beside it (or in the lines right
above it) in ``schema.py``. ``undescribed()`` lists the fields that have neither.

Regenerate ``docs/recipes.md`` (``tests/test_docs.py`` checks that it is current)::

    python -m omnicore.recipe.reference --markdown > docs/recipes.md

``python -m omnicore.recipe.reference`` without an option prints the JSON Schema.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import json
import sys
import tokenize
from typing import Any, Iterator

from pydantic import BaseModel

from . import schema

REGENERATE = "python -m omnicore.recipe.reference --markdown > docs/recipes.md"
_ROOT = "Recipe"


def json_schema() -> dict:
    """The recipe schema as JSON Schema (what ``omni recipe schema`` prints)."""
    return schema.Recipe.model_json_schema()


# --- descriptions from schema.py's comments -------------------------------------------------------------------

def _source_comments() -> dict[str, dict[str, str]]:
    """``{class name: {field name: comment}}`` for the fields of schema.py that carry a comment.

    A field's comment is the block of comment lines right above it (no blank line between) followed by the comment
    at the end of its own line(s)."""
    try:
        source = inspect.getsource(schema)
    except (OSError, TypeError):  # no source shipped: descriptions come from Field(description=...) only
        return {}
    lines = source.splitlines()
    trailing: dict[int, str] = {}  # line number -> comment ending a line of code
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            if lines[row - 1][:col].strip():
                trailing[row] = tok.string.lstrip("#").strip()
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, str] = {}
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above: list[str] = []
            row = stmt.lineno - 1
            while row >= 1 and lines[row - 1].strip().startswith("#"):
                above.insert(0, lines[row - 1].strip().lstrip("#").strip())
                row -= 1
            beside = [trailing[r] for r in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if r in trailing]
            text = " ".join(above + beside).strip()
            if text:
                fields[stmt.target.id] = text
        out[node.name] = fields
    return out


def _description(model: type[BaseModel], name: str, comments: dict[str, dict[str, str]]) -> str:
    field = model.model_fields[name]
    if field.description:
        return field.description
    for cls in model.__mro__:  # an inherited field: the comment in the class that declares it
        if name in cls.__dict__.get("__annotations__", {}):
            return comments.get(cls.__name__, {}).get(name, "")
    return ""


# --- rendering ------------------------------------------------------------------------------------------------

def _models() -> dict[str, type[BaseModel]]:
    return {name: obj for name, obj in vars(schema).items()
            if inspect.isclass(obj) and issubclass(obj, BaseModel) and obj.__module__ == schema.__name__}


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(prop: dict) -> str:
    """A JSON Schema property as a short type, with links to the sections of referenced models."""
    if "$ref" in prop:
        name = _ref_name(prop["$ref"])
        return f"[{name}](#{name.lower()})"
    if "anyOf" in prop:
        branches = [b for b in prop["anyOf"] if b.get("type") != "null"]
        text = " or ".join(_type(b) for b in branches)
        return text + " or null" if len(branches) < len(prop["anyOf"]) else text
    if "enum" in prop:
        return "one of " + ", ".join(f"`{_yaml(v)}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{_yaml(prop['const'])}`"
    kind = prop.get("type")
    if kind == "array":
        if "prefixItems" in prop:
            return "[" + ", ".join(_type(p) for p in prop["prefixItems"]) + "]"
        return f"list of {_type(prop.get('items', {}))}"
    if kind == "object":
        values = prop.get("additionalProperties", True)
        return "mapping" if values is True else f"mapping of name to {_type(values)}"
    return {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean",
            "null": "null"}.get(kind, "any")


_BOUNDS = (("minimum", ">= {}"), ("exclusiveMinimum", "> {}"), ("maximum", "<= {}"), ("exclusiveMaximum", "< {}"),
           ("minItems", "at least {} items"), ("maxItems", "at most {} items"), ("minLength", "at least {} characters"),
           ("maxLength", "at most {} characters"), ("pattern", "matches `{}`"))


def _constraints(prop: dict) -> str:
    found: list[str] = []
    for part in [prop, *prop.get("anyOf", [])]:
        exact = "minItems" in part and part["minItems"] == part.get("maxItems")
        if exact:
            found.append(f"exactly {part['minItems']} items")
        for key, fmt in _BOUNDS:
            if key in part and not (exact and key in ("minItems", "maxItems")):
                text = fmt.format(_yaml(part[key]))
                if text not in found:
                    found.append(text)
    return ", ".join(found)


def _yaml(value: Any) -> str:
    """A value as YAML flow text (how it would be written in a recipe)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_defaults=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value) if not value or not value.replace("_", "").isalnum() else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(model: type[BaseModel], name: str) -> str:
    field = model.model_fields[name]
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    return f"`{_yaml(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _refs(prop: dict, path: str) -> Iterator[tuple[str, str]]:
    """(model name, YAML path) for each model a property holds, directly or in a list or mapping."""
    if "$ref" in prop:
        yield _ref_name(prop["$ref"]), path
    for branch in prop.get("anyOf", []):
        yield from _refs(branch, path)
    if isinstance(prop.get("items"), dict):
        yield from _refs(prop["items"], path + "[]")
    if isinstance(prop.get("additionalProperties"), dict):
        yield from _refs(prop["additionalProperties"], path + ".<name>")


def _sections(full: dict) -> list[tuple[str, dict, list[str]]]:
    """(model name, its JSON Schema, the YAML paths it appears at), the top level first, then breadth first."""
    defs = full.get("$defs", {})
    top = {k: v for k, v in full.items() if k != "$defs"}
    order: list[str] = [_ROOT]
    paths: dict[str, list[str]] = {_ROOT: []}
    i = 0
    while i < len(order):
        name = order[i]
        body = top if name == _ROOT else defs[name]
        for field, prop in body.get("properties", {}).items():
            for ref, path in _refs(prop, field if name == _ROOT else f"{{}}.{field}"):
                prefixes = paths[name] or [""]
                for prefix in prefixes:
                    at = path.format(prefix) if name != _ROOT else path
                    paths.setdefault(ref, [])
                    if at not in paths[ref]:
                        paths[ref].append(at)
                if ref not in order:
                    order.append(ref)
        i += 1
    return [(name, top if name == _ROOT else defs[name], paths[name]) for name in order]


_INTRO = """\
# Recipe reference

Generated from the pydantic schema in `omnicore/recipe/schema.py`; do not edit by hand. Regenerate with

```bash
.venv/bin/{regen}
```

(`tests/test_docs.py` fails when this file is out of date). The same schema as JSON Schema: `omni recipe schema`.

A recipe is a YAML file; unknown keys are errors everywhere. Two keys are handled before the schema sees the file:
`extends: OTHER` (a recipe file path or registered name) merges this file over OTHER, and command-line overrides
(`key.path=value`, `~key.path` to delete) are applied to the merged data. Component names (`type`) and their
`params` are checked against the registered plugins' factories by `omni recipe validate`, since plugins define them.

In the paths below, `stages[]` is any item of the `stages` list and `<name>` any key of a mapping (a head's name, a
task's name). Types link to their own section. A description comes from the field's `Field(description=...)` or
else from the comment beside the field in `schema.py`; a blank description means the schema has none yet.
"""


def markdown() -> str:
    """Every section and field of the recipe schema, as Markdown (the content of docs/recipes.md)."""
    full = json_schema()
    models = _models()
    comments = _source_comments()
    sections = _sections(full)
    out = [_INTRO.format(regen=REGENERATE), "Sections: " + ", ".join(f"[{n}](#{n.lower()})" for n, _, _ in sections)
           + ".", ""]
    for name, body, paths in sections:
        model = models[name]
        out += [f"## {name}", ""]
        where = "the top level of the file" if name == _ROOT else ", ".join(f"`{p}`" for p in paths)
        out.append(f"At: {where}.")
        doc = body.get("description") or ""
        if doc:
            out += ["", " ".join(doc.split()).replace("``", "`")]
        out += ["", "| field | type | default | constraints | description |", "|---|---|---|---|---|"]
        for field, prop in body.get("properties", {}).items():
            cells = [f"`{field}`", _type(prop), _default(model, field), _constraints(prop),
                     _description(model, field, comments)]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def undescribed() -> list[str]:
    """``Model.field`` for every field without a Field description or a comment in schema.py."""
    comments = _source_comments()
    missing: list[str] = []
    for name, body, _ in _sections(json_schema()):
        model = _models()[name]
        for field in body.get("properties", {}):
            if not _description(model, field, comments):
                missing.append(f"{name}.{field}")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omnicore.recipe.reference",
                                     description="Print the recipe schema as JSON Schema (default) or Markdown.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--markdown", action="store_true", help="the Markdown reference (docs/recipes.md)")
    group.add_argument("--undescribed", action="store_true", help="fields without a description, one a line")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
    elif args.undescribed:
        sys.stdout.write("".join(f"{f}\n" for f in undescribed()))
    else:
        sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
