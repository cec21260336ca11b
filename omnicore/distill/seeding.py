"""``seed(teacher_layer) -> mixer``: a student mixer initialised from one attention layer of a Transformer teacher.

The mixer kinds come from plugins (``register_mixers``); a kind that can be seeded registers a ``seed`` callable as
metadata, ``seed(teacher_layer, **options) -> mixer``. Its options are checked against that callable's signature
before anything is built, as components' parameters are.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import OmnicoreError, ParamError
from ..registry import Component, get_component


def seed(teacher_layer: Any, mixer: str = "mmmamba", **options: Any):
    """The ``mixer`` kind's seeding of ``teacher_layer`` (e.g. a transformers LlamaAttention / Qwen2Attention):
    ``mmmamba`` copies q/k/v/o and initialises the rest as mmMamba does. ParamError (one line) for an unknown
    option, a mixer that cannot be seeded, or a layer it cannot map."""
    import torch

    fn = check_seed_options(mixer, options)
    if not isinstance(teacher_layer, torch.nn.Module):
        raise ParamError(f"distill.seed: teacher_layer must be a torch module (an attention layer); got "
                         f"{type(teacher_layer).__name__}")
    try:
        return fn(teacher_layer, **options)
    except ValueError as exc:
        if isinstance(exc, OmnicoreError):
            raise
        raise ParamError(f"distill.seed (mixer {mixer!r}): {exc}") from exc


def check_seed_options(mixer: str, options: dict[str, Any]):
    """The ``mixer`` kind's seed callable, after checking ``options`` against its signature (ParamError, one line,
    for an unknown mixer, one that cannot be seeded, or an unknown or mistyped option)."""
    component = get_component("mixer", mixer)
    fn = component.metadata.get("seed")
    if not callable(fn):
        raise ParamError(f"distill.seed: mixer {mixer!r} ({component.package}) registers no seed constructor")
    checker = Component("mixer seed", mixer, fn, component.plugin, component.package, component.version)
    layer_param = next(iter(inspect.signature(fn).parameters))  # supplied by the caller of the seed, not options
    checker.check_params(options, allow_missing={layer_param})
    return fn
