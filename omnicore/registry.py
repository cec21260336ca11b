"""The component registry: ``create(kind, name, **params)`` and ``list_components``.

Components come from the plugins' collector hooks. Each is a factory plus metadata; parameters are checked
against a pydantic model the plugin supplies (``params_model=``) or else the factory's signature, before
anything is built, so ``omni recipe validate`` can check a recipe without building weights.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import threading
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import pydantic

from .errors import OmnicoreError, ParamError, PluginError, UnknownComponentError
from .plugin_host import PluginHost, host as default_host

# kind -> the hook that registers it. A hook may also file components under a related kind
# (``register(name, factory, kind="projector")`` from register_encoders).
KIND_HOOKS: dict[str, str] = {
    "encoder": "register_encoders",
    "projector": "register_encoders",
    "image_tokenizer": "register_image_tokenizers",
    "text_tokenizer": "register_text_tokenizers",
    "backbone": "register_backbones",
    "mixer": "register_mixers",
    "head": "register_heads",
    "dataset": "register_datasets",
    "recipe": "register_recipes",
    "mmu_layout": "register_mmu_layouts",
}
HOOK_DEFAULT_KIND = {
    "register_encoders": "encoder",
    "register_image_tokenizers": "image_tokenizer",
    "register_text_tokenizers": "text_tokenizer",
    "register_backbones": "backbone",
    "register_mixers": "mixer",
    "register_heads": "head",
    "register_datasets": "dataset",
    "register_recipes": "recipe",
    "register_mmu_layouts": "mmu_layout",
}
KINDS = tuple(KIND_HOOKS)


@dataclass
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    package: str
    version: str
    description: str = ""
    params_model: type[pydantic.BaseModel] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def check_params(self, params: dict[str, Any], allow_missing: set[str] = frozenset()) -> dict[str, Any] | None:
        """Validate and coerce ``params``; raise ParamError naming component, parameter and expectation.

        ``allow_missing`` names parameters that will be supplied later (assembly injects them); when one of
        those is absent the check still runs for the rest, and None is returned instead of the values.
        """
        label = f"{self.kind} {self.name!r}"
        model = self.params_model or _signature_model(self.factory, f"{self.kind}_{self.name}")
        if model is None:  # the factory takes **kwargs only: nothing to check
            return dict(params)
        try:
            validated = model.model_validate(params)
        except pydantic.ValidationError as exc:
            errors = [e for e in exc.errors() if not (e["type"] == "missing" and e["loc"][0] in allow_missing)]
            if not errors:
                return None
            err = errors[0]
            loc = ".".join(str(p) for p in err["loc"]) or "<params>"
            if err["type"] == "extra_forbidden":
                known = list(model.model_fields)
                close = difflib.get_close_matches(str(err["loc"][0]), known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; accepted: {', '.join(known)}"
                raise ParamError(f"{label}: unknown parameter {loc!r}{hint}") from None
            if err["type"] == "missing":
                raise ParamError(f"{label}: missing required parameter {loc!r}") from None
            raise ParamError(f"{label}: parameter {loc!r}: {err['msg']} (got {err.get('input')!r})") from None
        if self.params_model is not None:  # the plugin's own model: pass every field, defaults included
            return dict(validated)
        # signature model: pass only what was given (coerced), so the factory's own defaults apply
        out = {k: getattr(validated, k) for k in params if k in model.model_fields}
        out.update(validated.model_extra or {})
        return out

    def build(self, **params: Any) -> Any:
        checked = self.check_params(params)
        try:
            return self.factory(**checked)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, OmnicoreError):
                raise
            # factories reject bad combinations of params this way: report it as the user's input error
            raise ParamError(f"{self.kind} {self.name!r}: {exc}") from exc


_MODEL_CACHE: dict[Any, Any] = {}


def _signature_model(factory: Callable[..., Any], name: str) -> type[pydantic.BaseModel] | None:
    """A pydantic model mirroring the factory's signature (None when it only takes **kwargs)."""
    if factory in _MODEL_CACHE:
        return _MODEL_CACHE[factory]
    sig = inspect.signature(factory)
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # unresolvable forward references: check names, not types
        hints = {}
    fields: dict[str, Any] = {}
    open_kwargs = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            open_kwargs = True
            continue
        if p.kind is p.VAR_POSITIONAL:
            continue
        annotation = hints.get(p.name, Any)
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (annotation, default)
    if not fields and open_kwargs:
        model = None
    else:
        config = pydantic.ConfigDict(extra="allow" if open_kwargs else "forbid", arbitrary_types_allowed=True,
                                     protected_namespaces=())
        model = pydantic.create_model(name, __config__=config, **fields)
    _MODEL_CACHE[factory] = model
    return model


class Registry:
    def __init__(self, host: PluginHost | None = None) -> None:
        self.host = host or default_host
        self._lock = threading.RLock()
        self._components: dict[str, dict[str, Component]] | None = None

    def _collect(self) -> dict[str, dict[str, Component]]:
        with self._lock:
            if self._components is not None:
                return self._components
            components: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
            pm = self.host.pm
            for hook_name, default_kind in HOOK_DEFAULT_KIND.items():
                caller = getattr(pm.hook, hook_name)
                for impl in caller.get_hookimpls():
                    info = self.host.info_for(impl.plugin_name)
                    package = info.package if info else impl.plugin_name
                    version = info.version if info else ""

                    def register(name: str, factory: Callable[..., Any], *, kind: str = default_kind,
                                 description: str = "", params_model: type[pydantic.BaseModel] | None = None,
                                 _plugin=impl.plugin_name, _package=package, _version=version,
                                 **metadata: Any) -> None:
                        if kind not in components:
                            raise PluginError(f"plugin {_plugin!r} ({_package}) registered {name!r} under unknown "
                                              f"kind {kind!r}; kinds: {', '.join(KINDS)}")
                        existing = components[kind].get(name)
                        if existing is not None and existing.plugin != _plugin:
                            raise PluginError(f"{kind} {name!r} is registered twice: by {existing.package} "
                                              f"(plugin {existing.plugin!r}) and by {_package} (plugin {_plugin!r})")
                        if not description and callable(factory) and factory.__doc__:
                            description = factory.__doc__.strip().splitlines()[0]
                        components[kind][name] = Component(kind, name, factory, _plugin, _package, _version,
                                                           description, params_model, metadata)

                    impl.function(register=register)
            self._components = components
            return components

    def reset(self) -> None:
        with self._lock:
            self._components = None

    def get(self, kind: str, name: str) -> Component:
        if kind not in KINDS:
            close = difflib.get_close_matches(kind, KINDS, n=3)
            raise UnknownComponentError(f"unknown component kind {kind!r}"
                                        + (f"; did you mean {', '.join(close)}?" if close else f"; kinds: {', '.join(KINDS)}"))
        table = self._collect()[kind]
        if name not in table:
            close = difflib.get_close_matches(name, list(table), n=5, cutoff=0.4)
            hint = f"; closest: {', '.join(close)}" if close else (
                f"; registered: {', '.join(sorted(table))}" if table else "; none are registered")
            raise UnknownComponentError(f"no {kind} named {name!r}{hint}")
        return table[name]

    def create(self, kind: str, name: str, **params: Any) -> Any:
        return self.get(kind, name).build(**params)

    def list(self, kind: str | None = None, pattern: str = "*") -> list[Component]:
        kinds = [kind] if kind else list(KINDS)
        out = []
        for k in kinds:
            if k not in KINDS:
                self.get(k, "")  # raises the unknown-kind error
            out += [c for n, c in sorted(self._collect()[k].items()) if fnmatch.fnmatch(n, pattern)]
        return out


registry = Registry()


def create(kind: str, name: str, **params: Any) -> Any:
    """Build the component ``name`` of ``kind`` with ``params`` checked against its factory."""
    return registry.create(kind, name, **params)


def list_components(kind: str | None = None, pattern: str = "*") -> list[Component]:
    """Registered components, optionally of one kind and matching a glob pattern."""
    return registry.list(kind, pattern)


def get_component(kind: str, name: str) -> Component:
    return registry.get(kind, name)


def reload_plugins() -> None:
    """Forget loaded plugins and components; the next use loads them again."""
    registry.host.reset()
    registry.reset()
