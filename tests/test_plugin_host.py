"""The plugin host: built-ins through entry points, third-party plugins, broken and conflicting plugins."""

from __future__ import annotations

import warnings

import pytest

import omnicore
from omnicore.errors import PluginError
from omnicore.plugin_host import host

PLUGIN_A = """
from omnicore import hookimpl

def build_thing(width: int = 4, name: str = "x"):
    '''A thing for tests.'''
    return {"width": width, "name": name}

@hookimpl
def register_datasets(register):
    register("thing", build_thing)
"""


def test_builtins_load_through_entry_points(fresh_registry):
    host.load()
    builtins = {p.name for p in host.plugins.values() if p.builtin}
    assert {"encoders", "tokenizers", "backbones", "heads", "datasets", "recipes"} <= builtins
    assert all(p.package == "omnicore" for p in host.plugins.values() if p.builtin)
    assert not host.errors


def test_third_party_plugin_registers_component(fake_dist):
    fake_dist("acme-things", "acme_things", PLUGIN_A, version="2.3")
    comp = omnicore.get_component("dataset", "thing")
    assert (comp.package, comp.version) == ("acme-things", "2.3")
    assert comp.description == "A thing for tests."
    assert omnicore.create("dataset", "thing", width=7) == {"width": 7, "name": "x"}


def test_broken_plugin_is_reported_and_skipped(fake_dist):
    fake_dist("acme-broken", "acme_broken", "raise ImportError('needs libfoo')")
    fake_dist("acme-things", "acme_things", PLUGIN_A)
    with pytest.warns(RuntimeWarning, match="acme_broken.*needs libfoo"):
        host.load()
    (err,) = host.errors
    assert err.package == "acme-broken" and "needs libfoo" in err.error
    assert omnicore.create("dataset", "thing")["width"] == 4  # the others still work


def test_duplicate_names_name_both_packages(fake_dist):
    fake_dist("acme-things", "acme_things", PLUGIN_A)
    fake_dist("other-things", "other_things", PLUGIN_A)
    with pytest.raises(PluginError) as info:
        omnicore.list_components("dataset")
    assert "acme-things" in str(info.value) and "other-things" in str(info.value)


def test_env_var_limits_third_party_plugins(fake_dist, monkeypatch):
    fake_dist("acme-things", "acme_things", PLUGIN_A)
    monkeypatch.setenv("OMNICORE_PLUGINS", "")
    omnicore.reload_plugins()
    assert not omnicore.list_components("dataset", "thing")
    assert omnicore.list_components("recipe")  # built-ins still load
    monkeypatch.setenv("OMNICORE_PLUGINS", "acme-things")
    omnicore.reload_plugins()
    assert omnicore.list_components("dataset", "thing")


def test_plugins_load_once_lazily(fresh_registry, monkeypatch):
    calls = []
    real = host.load.__func__

    def counting(self):
        calls.append(self._pm is None)
        return real(self)

    monkeypatch.setattr(type(host), "load", counting)
    omnicore.list_components()
    omnicore.list_components("recipe")
    assert calls.count(True) == 1
