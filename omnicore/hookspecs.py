"""The whole plugin contract: collector hooks that receive a ``register`` callback.

A plugin module implements any of these with ``@omnicore.hookimpl``. Hooks return nothing; they call
``register(name, factory, **metadata)`` once per component, so the callback can grow keyword
arguments later without breaking plugins.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("omnicore")
hookimpl = pluggy.HookimplMarker("omnicore")


@hookspec
def register_encoders(register):
    """Register understanding encoders (and projectors): ``register(name, factory, **metadata)``."""


@hookspec
def register_image_tokenizers(register):
    """Register image tokenizers (VQ models mapping images to discrete codes and back)."""


@hookspec
def register_text_tokenizers(register):
    """Register text tokenizers."""


@hookspec
def register_backbones(register):
    """Register sequence backbones (Mamba-2 stacks, hybrids)."""


@hookspec
def register_mixers(register):
    """Register sequence mixers (one layer's token mixing, e.g. ``mmmamba``); metadata ``seed`` is a callable
    ``seed(teacher_layer, **options) -> mixer`` that maps an attention layer into it (``omnicore.distill.seed``)."""


@hookspec
def register_heads(register):
    """Register embeddings and vocabulary heads."""


@hookspec
def register_datasets(register):
    """Register datasets."""


@hookspec
def register_mmu_layouts(register):
    """Register MMU input layouts: ``register(name, factory)``, ``factory()`` returning an
    ``omnicore.model.layout.MMULayout`` (usable as ``model.mmu_template: <name>``)."""


@hookspec
def register_recipes(register):
    """Register recipe files: ``register(name, path, description=...)`` with ``path`` a YAML file."""


@hookspec
def register_commands(app):
    """Add typer sub-commands to the ``omni`` application."""
