"""The `omni` command line as a user runs it: exit codes, one-line errors, recipe ls/cp/validate, plugins."""

from __future__ import annotations

import subprocess
import sys

import pytest

import omnicore


def omni(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "omnicore.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_version():
    r = omni("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"omnicore {omnicore.__version__}"


def test_missing_recipe_is_one_line_exit_2(tmp_path):
    r = omni("recipe", "validate", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.yaml'}: no such recipe file or registered "
                                             f"recipe (see `omni recipe ls`)"]
    assert "Traceback" not in r.stderr + r.stdout


def test_bad_yaml_points_at_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: {type: mamba2\nstages: []\n")
    r = omni("recipe", "validate", str(bad))
    assert r.returncode == 2 and r.stderr.startswith(f"error: {bad}:") and "invalid YAML" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback(tmp_path):
    r = omni("--debug", "recipe", "validate", str(tmp_path / "nope.yaml"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_recipe_ls_and_cp(tmp_path):
    r = omni("recipe", "ls")
    assert r.returncode == 0 and "quickstart" in r.stdout
    r = omni("recipe", "cp", "quickstart", str(tmp_path))
    assert r.returncode == 0 and (tmp_path / "quickstart.yaml").is_file()
    r = omni("recipe", "cp", "quickstart", str(tmp_path))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = omni("recipe", "validate", str(tmp_path / "quickstart.yaml"))
    assert r.returncode == 0, r.stderr


def test_plugins_lists_builtin_components():
    r = omni("plugins")
    assert r.returncode == 0
    for name in ("mamba2", "vqgan", "dinosiglip", "synthetic_shapes", "text_vocab", "byte"):
        assert name in r.stdout, name


def test_shipped_recipes_validate():
    names = [c.name for c in omnicore.list_components("recipe")]
    assert "quickstart" in names and any(n.startswith("omnimamba-1.3b/") for n in names)
    for name in names:
        r = omni("recipe", "validate", name)
        assert r.returncode == 0, f"{name}: {r.stderr}"


def test_mistyped_command_exits_2_with_the_usage_line():
    r = omni("convrt")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("Usage: omni [OPTIONS] COMMAND [ARGS]...") and "No such command 'convrt'" in r.stderr
    assert "Traceback" not in r.stderr and "UsageError" not in r.stderr


def test_non_utf8_recipe_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("description: caf\xe9\n".encode("latin-1"))
    r = omni("recipe", "validate", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {bad}: recipe is not UTF-8 text (byte 0xe9 on line 1); save it "
                                             f"as UTF-8"]
