"""A third-party plugin package, pip-installed like a user would: listed, buildable, usable in a recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "omnicore-example-plugin"


def run(*args, **kw):
    env = {**os.environ, "COLUMNS": "250"}  # a wide table: one component per line
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, **kw)


@pytest.fixture(scope="module")
def installed_example():
    r = run("-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    yield
    run("-m", "pip", "uninstall", "-q", "-y", "omnicore-example-plugin")


def test_listed_by_omni_plugins(installed_example):
    r = run("-m", "omnicore.cli", "plugins", "--kind", "dataset")
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if "solid_colors" in line)
    assert "omnicore-example-plugin" in row and "0.2.0" in row


def test_created_through_the_registry(installed_example):
    code = ("import omnicore; ds = omnicore.create('dataset', 'solid_colors', task='t2i', size=4); "
            "print(len(ds), ds[0]['caption'])")
    r = run("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("4 a ") and r.stdout.strip().endswith("square")


def test_plugin_command_added_to_cli(installed_example):
    r = run("-m", "omnicore.cli", "solid-colors", "--n", "2")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 2


def test_usable_in_a_recipe(installed_example, tmp_path):
    recipe = tmp_path / "colors.yaml"
    recipe.write_text(f"""\
extends: quickstart
stages:
  - name: colors
    tasks:
      mmu: {{batch_size: 4, data: {{type: solid_colors, params: {{size: 16, image_size: 32}}}}}}
    train: {{roles: [projector], adapters: [mmu]}}
    optimizer: {{lr: 1.0e-3}}
    steps: 2
""")
    r = run("-m", "omnicore.cli", "recipe", "validate", str(recipe))
    assert r.returncode == 0, r.stderr
    r = run("-m", "omnicore.cli", "recipe", "run", str(recipe), "~evaluation", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert r.stdout.strip().splitlines()[-1] == f"final model: {tmp_path / 'run' / 'model'}"
