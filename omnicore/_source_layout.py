"""Make ``omnicore.plugins``, ``omnicore.cli`` and ``omnicore.recipes`` importable from a source checkout.

Installed (normally or editable), setuptools maps the top-level folders plugins/, cli/ and recipes/ onto
these names. Run straight from a checkout (``PYTHONPATH=.``) there is no such mapping, so we add it here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent
ALIASES = {"omnicore.plugins": "plugins", "omnicore.cli": "cli", "omnicore.recipes": "recipes"}


def install_source_aliases() -> None:
    for name, folder in ALIASES.items():
        if name in sys.modules:
            continue
        init = SOURCE_ROOT / folder / "__init__.py"
        if not init.exists():
            continue
        try:
            if importlib.util.find_spec(name) is not None:
                continue  # an installed mapping wins
        except (ImportError, ValueError):
            pass
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        parent = sys.modules.get("omnicore")
        if parent is not None:
            setattr(parent, name.rsplit(".", 1)[1], module)
