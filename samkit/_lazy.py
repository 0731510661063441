"""Loading a package's submodules on first attribute access (PEP 562), shared by ``samkit`` and
``samkit.utils``: ``import samkit`` stays cheap (no torch) and ``samkit.modeling`` still works."""

from __future__ import annotations

import importlib
from types import ModuleType


def submodule(package: str, name: str) -> ModuleType:
    """``package.name`` imported, for a package's ``__getattr__``; AttributeError when there is no
    such submodule (an ImportError inside an existing submodule propagates)."""
    if not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", package)
        except ModuleNotFoundError as err:
            if err.name != f"{package}.{name}":
                raise
    raise AttributeError(f"module {package!r} has no attribute {name!r}")
