"""Shared fixtures: in-process plugins, fake installed distributions, and a clean registry per test."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import omnicore
from omnicore.plugin_host import host
from omnicore.registry import registry

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA (GPU tests run on the device)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture
def fresh_registry():
    """Reload plugins before and after the test, so registrations made in it do not leak."""
    omnicore.reload_plugins()
    yield registry
    omnicore.reload_plugins()


@pytest.fixture
def fake_dist(tmp_path, monkeypatch, fresh_registry):
    """Make a fake installed distribution with an `omnicore` entry point: fake_dist(name, module_source)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(dist: str, module: str, source: str, version: str = "1.0") -> None:
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[omnicore]\n{module} = {module}\n")
        made.append(module)
        omnicore.reload_plugins()

    yield make
    for module in made:
        sys.modules.pop(module, None)
