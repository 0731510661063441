"""Point grids, crop boxes, RLE decoding and the mask generators' argument checks (numpy only), shared by
:mod:`samkit.amg` (through :mod:`samkit.utils.amg`, which re-exports them under Meta's names) and the
torch-free :mod:`samkit.onnx`.

Grids are Nx2 XY in [0, 1]; crop boxes are XYXY with exclusive ends; RLEs are COCO's uncompressed form
``{"size": [H, W], "counts": [...]}`` over the column-major pixel sequence, starting with a run of zeros.
"""

from __future__ import annotations

import math
from itertools import product
from typing import Any

import numpy as np

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def build_point_grid(n_per_side: int) -> np.ndarray:
    """Cell centres of an n x n grid over [0, 1]^2 as (n*n)x2 XY, row by row."""
    if n_per_side < 1:
        raise ValueError(f"a point grid needs at least 1 point per side, got {n_per_side}")
    offset = 1 / (2 * n_per_side)
    centres = np.linspace(offset, 1 - offset, n_per_side)
    xs, ys = np.meshgrid(centres, centres, indexing="xy")
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer; layer i has n_per_side / scale_per_layer**i points per side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """The whole image, then 2^i x 2^i overlapping crops for layer i = 1..n_layers (XYXY, exclusive ends)."""
    im_h, im_w = im_size
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * min(im_h, im_w) * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + im_w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + im_h) / n))
        x0s = [int((crop_w - overlap) * i) for i in range(n)]
        y0s = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer)
    return boxes, layers


def image_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """The crops a mask generator runs on: :func:`generate_crop_boxes` without the empty ones, which
    an image narrower or shorter than a layer's 2^i crops per side gets (a 1-pixel-wide image's second
    crop starts at its right edge). Any other image keeps every crop."""
    boxes, layers = generate_crop_boxes(im_size, n_layers, overlap_ratio)
    kept = [i for i, (x0, y0, x1, y1) in enumerate(boxes) if x1 > x0 and y1 > y0]
    return [boxes[i] for i in kept], [layers[i] for i in kept]


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed RLE -> HxW bool."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T


def coco_encode_rle(uncompressed_rle: dict[str, Any]) -> dict[str, Any]:
    """Uncompressed RLE -> COCO compressed RLE with a str ``counts`` (JSON-ready; needs pycocotools)."""
    from pycocotools import mask as mask_utils

    h, w = uncompressed_rle["size"]
    rle = mask_utils.frPyObjects(uncompressed_rle, h, w)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def generator_point_grids(
    points_per_side: int | None,
    point_grids: list[np.ndarray] | None,
    crop_n_layers: int,
    crop_n_points_downscale_factor: int,
    output_mode: str,
) -> list[np.ndarray]:
    """A mask generator's argument checks, then its grids, one per crop layer: ``point_grids`` as given,
    or built from ``points_per_side``. ValueError unless exactly one of the two is given, ``output_mode``
    is one of :data:`OUTPUT_MODES` and there is one grid per crop layer (checked in that order)."""
    if (points_per_side is None) == (point_grids is None):
        raise ValueError("give exactly one of points_per_side and point_grids")
    if output_mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}, got {output_mode!r}")
    if output_mode == "coco_rle":
        import pycocotools.mask  # noqa: F401  (fail now, with the missing package's name)
    if point_grids is not None:
        if len(point_grids) != crop_n_layers + 1:
            raise ValueError(
                f"point_grids needs one grid per crop layer ({crop_n_layers + 1}), got {len(point_grids)}"
            )
        return point_grids
    return build_all_layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)


__all__ = [
    "OUTPUT_MODES",
    "build_all_layer_point_grids",
    "build_point_grid",
    "coco_encode_rle",
    "generate_crop_boxes",
    "generator_point_grids",
    "rle_to_mask",
]
