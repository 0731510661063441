"""samkit: Segment Anything on PyTorch.

Drop-in names from Meta's ``segment_anything``: ``sam_model_registry``, ``SamPredictor``,
``SamAutomaticMaskGenerator`` and the ``build_sam*`` builders, at the same module paths
(``samkit.build_sam``, ``samkit.predictor``, ``samkit.automatic_mask_generator``, ``samkit.modeling.*``,
``samkit.utils.amg``, ``samkit.utils.transforms``): Meta's client code runs with its import changed.

The public names are loaded on first use (``samkit.SamPredictor`` imports :mod:`samkit.predictor`
then), so that ``import samkit.onnx`` runs where PyTorch is not installed; only the exceptions and
the version are imported eagerly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._lazy import submodule as _submodule
from .errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    DownloadError,
    ImageError,
    PromptError,
    SamkitError,
)
from .version import __version__ as __version__

# Public name -> the module (relative to samkit) that defines it.
_LAZY: dict[str, str] = {
    "SamAutomaticMaskGenerator": "automatic_mask_generator",
    "SamPredictor": "predictor",
    "build_model": "build",
    "build_sam_vit_tiny": "build",
    "load_checkpoint": "build",
    # As in Meta's package, ``samkit.build_sam`` is the vit_h builder and also a module; the module
    # is callable too (samkit/build_sam.py), so either works whichever is imported first.
    "build_sam": "build_sam",
    "build_sam_vit_b": "build_sam",
    "build_sam_vit_h": "build_sam",
    "build_sam_vit_l": "build_sam",
    "sam_model_registry": "build_sam",
    "download_checkpoint": "checkpoints.download",
    "load_image": "utils.image",
    "tune_cpu_allocator": "fast.allocator",
}


def __getattr__(name: str) -> Any:
    """Load a public name, or a subpackage (``samkit.modeling``), on first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    return _submodule(__name__, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .automatic_mask_generator import SamAutomaticMaskGenerator
    from .build import build_model, build_sam_vit_tiny, load_checkpoint
    from .build_sam import build_sam, build_sam_vit_b, build_sam_vit_h, build_sam_vit_l, sam_model_registry
    from .checkpoints.download import download_checkpoint
    from .fast.allocator import tune_cpu_allocator
    from .predictor import SamPredictor
    from .utils.image import load_image

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "DownloadError",
    "ImageError",
    "PromptError",
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "SamkitError",
    "build_model",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_tiny",
    "download_checkpoint",
    "load_checkpoint",
    "load_image",
    "sam_model_registry",
    "tune_cpu_allocator",
]
