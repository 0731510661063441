"""Meta's module path ``segment_anything.build_sam``: the SAM builders and registry of :mod:`samkit.build`.

A thin re-export, so that ``from samkit.build_sam import build_sam_vit_b`` works as it does with Meta's
package. As there, the package attribute ``samkit.build_sam`` is the function (the vit_h builder), not
this module (which is callable as the builder too, whichever of the two a program imports first).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .build import (
    build_sam,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    build_sam_vit_tiny,
    sam_model_registry,
)
from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

__all__ = [
    "ImageEncoderViT",
    "MaskDecoder",
    "PromptEncoder",
    "Sam",
    "TwoWayTransformer",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_tiny",
    "sam_model_registry",
]


class _CallableModule(types.ModuleType):
    """This module, callable as the vit_h builder: after ``from samkit.build_sam import ...`` Python
    sets the package attribute ``samkit.build_sam`` to this module, and Meta's users call it."""

    def __call__(self, checkpoint: Any = None) -> Sam:
        return build_sam(checkpoint)


sys.modules[__name__].__class__ = _CallableModule
