"""The plugin host: finds plugins through entry points (group ``omnicore``), loads them once, lazily.

Built-in plugins are entry points of omnicore's own distribution and load exactly like third-party ones.
In an uninstalled source checkout the entry points are missing, so the built-ins are read from
pyproject.toml instead. A plugin that fails to import is recorded and skipped; the rest keep working.

``OMNICORE_PLUGINS`` limits which third-party plugins load: a comma-separated list of entry-point or
distribution names (empty: none). Built-ins always load.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import re
import threading
import traceback
import warnings
from dataclasses import dataclass, field
from types import ModuleType

import pluggy

from . import hookspecs
from ._source_layout import SOURCE_ROOT, install_source_aliases

GROUP = "omnicore"
ENV_VAR = "OMNICORE_PLUGINS"
BUILTIN_DIST = "omnicore"


@dataclass
class PluginInfo:
    name: str  # entry-point name
    module: str
    package: str  # distribution providing it
    version: str
    builtin: bool
    error: str | None = None  # one-line load error, if it failed
    hooks: list[str] = field(default_factory=list)


def _builtin_entry_points_from_source() -> dict[str, str]:
    """Read ``[project.entry-points.omnicore]`` from the checkout's pyproject.toml."""
    pyproject = SOURCE_ROOT / "pyproject.toml"
    if not pyproject.exists():
        return {}
    text = pyproject.read_text(encoding="utf-8")
    match = re.search(r"^\[project\.entry-points\.omnicore\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if not match:
        return {}
    return dict(re.findall(r'^\s*([\w.-]+)\s*=\s*"([\w.:]+)"', match.group(1), re.M))


def _dist_version(dist_name: str) -> str:
    try:
        return md.version(dist_name)
    except md.PackageNotFoundError:
        from . import __version__

        return __version__ if dist_name == BUILTIN_DIST else "unknown"


class PluginHost:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pm: pluggy.PluginManager | None = None
        self.plugins: dict[str, PluginInfo] = {}

    @property
    def pm(self) -> pluggy.PluginManager:
        self.load()
        assert self._pm is not None
        return self._pm

    @property
    def errors(self) -> list[PluginInfo]:
        self.load()
        return [p for p in self.plugins.values() if p.error]

    def load(self) -> None:
        with self._lock:
            if self._pm is not None:
                return
            pm = pluggy.PluginManager(GROUP)
            pm.add_hookspecs(hookspecs)
            install_source_aliases()
            allowed = os.environ.get(ENV_VAR)
            allow = None if allowed is None else {s.strip() for s in allowed.split(",") if s.strip()}

            found: list[tuple[str, str, str, str]] = []  # (name, module, dist, version)
            for ep in md.entry_points(group=GROUP):
                dist = ep.dist.name if ep.dist is not None else "unknown"
                found.append((ep.name, ep.value, dist, ep.dist.version if ep.dist is not None else "unknown"))
            if not any(dist == BUILTIN_DIST for _, _, dist, _ in found):
                version = _dist_version(BUILTIN_DIST)
                for name, value in _builtin_entry_points_from_source().items():
                    found.append((name, value, BUILTIN_DIST, version))

            seen_modules: set[str] = set()
            for name, value, dist, version in found:
                builtin = dist == BUILTIN_DIST
                if not builtin and allow is not None and name not in allow and dist not in allow:
                    continue
                module_name = value.split(":")[0]
                if module_name in seen_modules:
                    continue  # the same distribution seen twice on sys.path
                seen_modules.add(module_name)
                key = name if name not in self.plugins else f"{dist}:{name}"
                info = PluginInfo(key, module_name, dist, version, builtin)
                self.plugins[key] = info
                try:
                    module = importlib.import_module(module_name)
                    pm.register(module, name=key)
                    info.hooks = sorted(h.name for h in pm.get_hookcallers(module) or [])
                except Exception as exc:  # a broken plugin must not take the others down
                    info.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    info.traceback = traceback.format_exc()
                    warnings.warn(f"omnicore plugin {key!r} from {dist} {version} failed to load and was skipped: "
                                  f"{info.error}", RuntimeWarning, stacklevel=2)
            self._pm = pm

    def register_module(self, module: ModuleType | object, name: str, package: str = "<in-process>") -> None:
        """Register an in-process plugin object (tests, notebooks)."""
        self.load()
        self.pm.register(module, name=name)
        self.plugins[name] = PluginInfo(name, getattr(module, "__name__", repr(module)), package, "", False,
                                        hooks=sorted(h.name for h in self.pm.get_hookcallers(module) or []))

    def unregister(self, name: str) -> None:
        self.load()
        self.pm.unregister(name=name)
        self.plugins.pop(name, None)

    def info_for(self, plugin_name: str) -> PluginInfo | None:
        return self.plugins.get(plugin_name)

    def reset(self) -> None:
        """Forget everything; the next use reloads (tests, after installing a plugin)."""
        with self._lock:
            self._pm = None
            self.plugins = {}


host = PluginHost()
