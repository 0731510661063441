"""Writing automatic-mask results, each complete or not at all, and the overlay picture.

Used by :mod:`samkit.amg_cli`: Meta's ``<stem>/N.png`` + ``metadata.csv`` folders, SA-1B annotation
JSON, and pictures, all written under a hidden temporary name and renamed into place.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import warnings
from typing import Any, Optional, Sequence

import numpy as np

from ..utils.files import atomic_write, hidden_sibling

METADATA_HEADER = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,"
    "predicted_iou,stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)
OVERLAY_ALPHA = 0.5


def json_float(value: float) -> Optional[float]:
    """``value`` as a JSON number, or None (null) where it is NaN or infinite, which JSON cannot hold.

    The stability score of a mask that is empty even at the loose threshold is 0/0 = NaN, as in
    Meta's code (a generator keeps such masks when ``stability_score_thresh`` is 0); written as
    ``NaN`` it would make the file unreadable to strict JSON parsers (browsers, jq, most languages)."""
    value = float(value)
    return value if np.isfinite(value) else None


def sa1b_annotation(
    records: list[dict[str, Any]], image_id: int, file_name: str, width: int, height: int
) -> dict[str, Any]:
    """The generator's coco_rle records as one SA-1B annotation file (a dict ready for strict JSON:
    a NaN score, see :func:`json_float`, becomes null)."""
    keys = ("segmentation", "area", "bbox", "predicted_iou", "stability_score", "point_coords", "crop_box")
    scores = ("predicted_iou", "stability_score")
    return {
        "image": {"image_id": image_id, "file_name": file_name, "width": width, "height": height},
        "annotations": [
            {"id": i, **{k: json_float(r[k]) if k in scores else r[k] for k in keys}}
            for i, r in enumerate(records)
        ],
    }


def metadata_rows(records: list[dict[str, Any]]) -> list[str]:
    """The lines of Meta's metadata.csv: the header, then one line per mask (its PNG's number first)."""
    rows = [METADATA_HEADER]
    for i, r in enumerate(records):
        values = [i, r["area"], *r["bbox"], *r["point_coords"][0], r["predicted_iou"], r["stability_score"]]
        rows.append(",".join(str(v) for v in values + list(r["crop_box"])))
    return rows


def write_mask_folder(path: str, records: list[dict[str, Any]]) -> None:
    """Meta's layout: ``path/<i>.png`` (uint8 0/255) per mask and ``path/metadata.csv``.

    The folder is built as ``.<name>.tmp-XXXX`` next to ``path`` and renamed into place when complete;
    an existing ``path`` is replaced.
    """
    tmp = hidden_sibling(path, "tmp")
    os.mkdir(tmp)
    try:
        for i, r in enumerate(records):
            save_mask_png(os.path.join(tmp, f"{i}.png"), r["segmentation"])
        with open(os.path.join(tmp, "metadata.csv"), "x", encoding="utf-8") as f:
            f.write("\n".join(metadata_rows(records)) + "\n")
        _move_into_place(tmp, path)
    except BaseException:  # KeyboardInterrupt included: no half-built folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_mask_png(path: str, mask: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255).save(path, format="PNG")


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file renamed into place."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def save_image(path: str, image: np.ndarray) -> None:
    """Save an HxWx3 uint8 picture, its format from the extension (PNG if unknown), atomically.

    Parent folders are created.
    """
    from PIL import Image

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    with atomic_write(path) as f:
        Image.fromarray(image).save(f, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))


def _move_into_place(tmp: str, path: str) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` (file or folder) is moved aside first, then removed."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    old = hidden_sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if not os.path.lexists(path):
            os.rename(old, path)
        raise
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.unlink(old)


# ---------------------------------------------------------------------------------------------------
# The overlay picture


def distinct_colors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random, clearly different saturated colours as nx3 floats in 0-255.

    Hues step by the golden ratio from a random start, so any number of them stay spread out.
    """
    rng = np.random.default_rng(seed)
    hues = (rng.random() + np.arange(n) * 0.6180339887498949) % 1.0
    saturations, values = rng.uniform(0.55, 1.0, n), rng.uniform(0.75, 1.0, n)
    rgb = [colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, saturations, values)]
    return np.asarray(rgb, dtype=np.float32).reshape(n, 3) * 255


def overlay_masks(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    alpha: float = OVERLAY_ALPHA,
    seed: int = 0,
    areas: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """``image`` (HxWx3 uint8 RGB) with each HxW bool mask painted over it, semi-transparent, outlined.

    Each mask gets its own colour from :func:`distinct_colors`; larger masks are painted first, so that
    the smaller ones on top of them stay visible. Returns a new HxWx3 uint8 array. With ``areas`` (each
    mask's pixel count) ``masks`` is only indexed, one mask at a time, so it may decode them lazily.
    """
    out = np.asarray(image, dtype=np.float32).copy()
    if areas is None:
        masks = [np.asarray(m, dtype=bool) for m in masks]
        areas = [int(m.sum()) for m in masks]
    order = sorted(range(len(masks)), key=lambda i: -int(areas[i]))  # stable: ties keep their order
    colors = distinct_colors(len(masks), seed)
    edge_width = max(1, round(max(out.shape[:2]) / 600))
    for i, color in zip(order, colors):
        mask = np.asarray(masks[i], dtype=bool)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not len(rows):
            continue
        # Work on the mask's box only, widened so that its sides are boundaries unless they are the image's.
        h, w = mask.shape
        y0, y1 = max(rows[0] - edge_width, 0), min(rows[-1] + 1 + edge_width, h)
        x0, x1 = max(cols[0] - edge_width, 0), min(cols[-1] + 1 + edge_width, w)
        region, m = out[y0:y1, x0:x1], mask[y0:y1, x0:x1]
        region[m] = region[m] * (1 - alpha) + color * alpha
        inner = m
        for _ in range(edge_width):
            inner = _eroded(inner)
        region[m & ~inner] = color
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _eroded(mask: np.ndarray) -> np.ndarray:
    """The mask less its 4-connected boundary (the image border does not count as a boundary)."""
    p = np.pad(mask, 1, mode="edge")
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def decode_segmentation(segmentation: Any) -> np.ndarray:
    """A record's segmentation as an HxW bool mask (binary masks pass through, COCO RLEs are decoded)."""
    if isinstance(segmentation, dict):
        from pycocotools import mask as mask_utils

        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
        with warnings.catch_warnings():  # pycocotools' own DeprecationWarning under numpy 2
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            return mask_utils.decode(rle).astype(bool)
    return np.asarray(segmentation, dtype=bool)


__all__ = [
    "METADATA_HEADER",
    "decode_segmentation",
    "distinct_colors",
    "json_float",
    "metadata_rows",
    "overlay_masks",
    "sa1b_annotation",
    "save_image",
    "save_mask_png",
    "write_json",
    "write_mask_folder",
]
