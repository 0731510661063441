"""Uncompressed RLE of binary masks (COCO's form), numpy only: the one encoder of both mask generators.

An RLE is ``{"size": [H, W], "counts": [...]}``: run lengths over the column-major (Fortran-order)
pixel sequence, starting with a run of zeros (0 when the first pixel is set).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def masks_to_rle(masks: np.ndarray) -> list[dict[str, Any]]:
    """BxHxW bool -> B uncompressed RLEs."""
    b, h, w = masks.shape
    if b == 0:
        return []
    columns = np.ascontiguousarray(np.asarray(masks, dtype=bool).transpose(0, 2, 1)).reshape(b, h * w)
    out = []
    for seq in columns:
        edges = np.flatnonzero(seq[1:] != seq[:-1]) + 1
        counts = np.diff(np.concatenate([[0], edges, [h * w]])).tolist()
        if h * w and seq[0]:
            counts = [0] + counts
        out.append({"size": [h, w], "counts": counts})
    return out


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """HxW bool -> uncompressed RLE."""
    return masks_to_rle(np.asarray(mask)[None])[0]


def area_from_rle(rle: dict[str, Any]) -> int:
    """Foreground pixels of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


__all__ = ["area_from_rle", "mask_to_rle", "masks_to_rle"]
