"""Helpers the library and the commands share: transforms, images, pictures, RLE and AMG helpers, AMG
result writers, checkpoint formats, downloads, demo photos, the CPU allocator, ONNX export.

Submodules load on first use (``samkit.utils.amg`` after ``import samkit`` works, as in Meta's package).
"""

from __future__ import annotations

from typing import Any

from .._lazy import submodule as _submodule


def __getattr__(name: str) -> Any:
    return _submodule(__name__, name)
