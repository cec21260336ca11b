"""omnicore: a plugin framework for unified multimodal state-space models.

Public API: ``create``, ``list_components``, ``hookimpl`` (for plugins), ``build`` and ``load`` (models),
``load_recipe`` (recipe files).
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._source_layout import install_source_aliases as _install_source_aliases
from .errors import OmnicoreError, ParamError, PluginError, RecipeError, UnknownComponentError
from .hookspecs import hookimpl
from .registry import create, get_component, list_components, reload_plugins

_install_source_aliases()

_LAZY = {
    "load_recipe": ("omnicore.recipe", "load_recipe"),
    "build": ("omnicore.model.unified", "build"),
    "load": ("omnicore.model.unified", "load"),
}


def __getattr__(name: str):  # heavy modules (torch models, training) load on first use
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'omnicore' has no attribute {name!r}")


__all__ = ["__version__", "create", "list_components", "get_component", "hookimpl", "build", "load",
           "load_recipe", "reload_plugins", "OmnicoreError", "ParamError", "PluginError", "RecipeError",
           "UnknownComponentError"]
