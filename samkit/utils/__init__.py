"""Helpers the library and the commands share: transforms, images, pictures, RLE and AMG helpers, AMG
result writers, checkpoint formats, downloads, demo photos, the CPU allocator, ONNX export.

Submodules load on first use (``samkit.utils.amg`` after ``import samkit`` works, as in Meta's package).
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
