"""Volumes: segment a CT/MR scan from prompts on a few slices by slice propagation, read and write
NIfTI, and score 3D masks (Dice, normalised surface Dice in mm).

    from samkit.volume import SlicePrompt, segment_volume
    labels = segment_volume(predictor, ct, [SlicePrompt(slice=40, box=(120, 90, 210, 170), label=1)],
                            window="abdomen")

``volume`` arrays are 3D numpy arrays; prompts are in the pixels of slices taken along ``axis``
(:mod:`samkit.volume.propagate`). The command line is ``samkit volume`` / ``volume_inference.py``.
"""

from __future__ import annotations

from .intensity import CT_WINDOWS, parse_window, to_uint8
from .metrics import dice, normalized_surface_dice
from .propagate import ObjectResult, SlicePrompt, segment_volume, segment_volume_objects
from .slices import SliceEmbeddings

__all__ = [
    "CT_WINDOWS",
    "ObjectResult",
    "SliceEmbeddings",
    "SlicePrompt",
    "dice",
    "normalized_surface_dice",
    "parse_window",
    "segment_volume",
    "segment_volume_objects",
    "to_uint8",
]
