"""labelme annotations (one JSON file per picture, https://github.com/wkentaro/labelme) as box-prompt
samples, with the label names as categories.

Each ``<data_dir>/*.json`` is one picture: its pixels come from ``imageData`` (base64, embedded) when
present, else from ``imagePath`` (relative to the JSON file). Shapes become objects:

- ``polygon`` (3 points or more), ``rectangle`` (two corners), ``circle`` (centre, then a point on
  the circle) and ``mask`` (a base64 PNG over the box of its two points) are rasterised as labelme
  itself does (Pillow, outline included); ``line``, ``linestrip`` and ``point`` shapes cover no area
  and are ignored.
- Shapes with the same ``label`` and ``group_id`` (not null) are one object, combined by the
  even-odd rule: a polygon drawn inside another cuts a hole, disjoint ones add up (an object split
  by an occluder). Every shape without a group_id is its own object.
- Categories are the label names of the whole folder's area shapes, sorted, numbered from 1; objects of fewer
  than ``min_area`` pixels are dropped and pictures without an object are left out.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from typing import Any, Sequence

import numpy as np

from ..errors import DatasetError
from .files import (
    DEFAULT_PERCENTILES,
    check_percentiles,
    image_size_of,
    load_training_image,
    read_image_array,
    split_stems,
)
from .objects import ObjectFilesDataset, check_folder, drop_small

AREA_SHAPES = ("polygon", "rectangle", "circle", "mask")
IGNORED_SHAPES = ("line", "linestrip", "point", "points")


def read_labelme(path: str) -> dict[str, Any]:
    """A labelme JSON file, checked for ``shapes`` and either ``imageData`` or ``imagePath``."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot parse labelme file {path}: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise DatasetError(f"not a labelme file (no 'shapes' list): {path}")
    if not doc.get("imageData") and not doc.get("imagePath"):
        raise DatasetError(f"labelme file {path} has neither imageData nor imagePath")
    for i, shape in enumerate(doc["shapes"]):
        kind = _kind(shape) if isinstance(shape, dict) else None
        if (
            kind is None
            or not isinstance(shape.get("label"), str)
            or not isinstance(shape.get("points"), list)
        ):
            raise DatasetError(f"shape {i} of {path} lacks a label or points")
        if kind not in AREA_SHAPES + IGNORED_SHAPES:
            raise DatasetError(f"shape {i} of {path} has an unknown shape_type {kind!r}")
    return doc


def _kind(shape: dict[str, Any]) -> str:
    """A shape's type; labelme's oldest files have no shape_type and mean polygons."""
    return shape.get("shape_type") or "polygon"


def rasterize_shape(shape: dict[str, Any], size: tuple[int, int], where: str) -> np.ndarray:
    """One labelme shape -> HxW bool mask (``size`` = (H, W)), drawn as labelme's ``shape_to_mask``."""
    from PIL import Image, ImageDraw

    kind = _kind(shape)
    try:
        points = [(float(x), float(y)) for x, y in shape["points"]]
    except (TypeError, ValueError):
        raise DatasetError(f"{where} has points that are not [x, y] numbers") from None
    if not np.isfinite(points).all():
        raise DatasetError(f"{where} has non-finite points")
    h, w = size
    if kind == "mask":
        return _mask_shape(shape, points, size, where)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "polygon" and len(points) >= 3:
        draw.polygon(points, outline=1, fill=1)
    elif kind == "rectangle" and len(points) == 2:
        (x0, y0), (x1, y1) = points
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=1, fill=1)
    elif kind == "circle" and len(points) == 2:
        (cx, cy), (px, py) = points
        r = float(np.hypot(px - cx, py - cy))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
    else:
        raise DatasetError(f"{where}: a {kind} with {len(points)} points")
    return np.asarray(canvas, dtype=bool)


def _mask_shape(shape: dict, points: list, size: tuple[int, int], where: str) -> np.ndarray:
    from PIL import Image

    if len(points) != 2 or not isinstance(shape.get("mask"), str):
        raise DatasetError(f"{where}: a mask shape needs two corner points and a base64 'mask'")
    try:
        with Image.open(io.BytesIO(base64.b64decode(shape["mask"]))) as img:
            part = np.asarray(img.convert("L")) > 0
    except (binascii.Error, OSError, ValueError) as err:
        raise DatasetError(f"{where}: cannot decode its mask: {err}") from None
    out = np.zeros(size, dtype=bool)
    x0, y0 = (int(round(min(p[i] for p in points))) for i in (0, 1))
    rows, cols = part.shape
    y1, x1 = min(size[0], y0 + rows), min(size[1], x0 + cols)
    if y1 > max(y0, 0) and x1 > max(x0, 0):
        out[max(y0, 0) : y1, max(x0, 0) : x1] = part[max(-y0, 0) : y1 - y0, max(-x0, 0) : x1 - x0]
    return out


def labelme_objects(
    doc: dict[str, Any], size: tuple[int, int], categories: dict[str, int], path: str
) -> tuple[np.ndarray, np.ndarray]:
    """(KxHxW bool masks, K category ids) of a labelme document, objects in the order of their first shape."""
    groups: dict[Any, int] = {}
    masks: list[np.ndarray] = []
    ids: list[int] = []
    for i, shape in enumerate(doc["shapes"]):
        if _kind(shape) not in AREA_SHAPES:
            continue
        mask = rasterize_shape(shape, size, f"shape {i} of {path}")
        group = shape.get("group_id")
        key = (shape["label"], group) if group is not None else ("", "shape", i)
        if key in groups:
            masks[groups[key]] ^= mask  # even-odd: an inner shape cuts a hole
            continue
        groups[key] = len(masks)
        masks.append(mask)
        ids.append(categories[shape["label"]])
    stacked = np.stack(masks) if masks else np.zeros((0, *size), dtype=bool)
    return stacked, np.asarray(ids, dtype=np.int64)


class LabelmeDataset(ObjectFilesDataset):
    """A folder of labelme JSON files (module docstring for the rules). Pictures go through the
    intensity rule of :mod:`samkit.data.files`; ``val_fraction``/``subset``/``split_seed`` split the
    files by stem as :class:`~samkit.data.masks.MaskFolderDataset` does."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        min_area: int = 0,
        val_fraction: float | None = None,
        subset: str = "all",
        split_seed: int = 0,
        percentiles: Sequence[float] | None = DEFAULT_PERCENTILES,
        image_size: int = 1024,
        max_objects: int = 20,
        box_jitter: int = 0,
        seed: int = 0,
        return_original_masks: bool = False,
        compact: bool = False,
    ) -> None:
        super().__init__(
            image_size=image_size,
            max_objects=max_objects,
            box_jitter=box_jitter,
            seed=seed,
            return_original_masks=return_original_masks,
            compact=compact,
        )
        self.data_dir = check_folder(data_dir, "labelme folder")
        self.min_area = int(min_area)
        self.percentiles = check_percentiles(percentiles)
        names = sorted(
            n for n in os.listdir(self.data_dir) if n.lower().endswith(".json") and not n.startswith(".")
        )
        if not names:
            raise DatasetError(f"no labelme .json files in {self.data_dir}")
        docs = {os.path.splitext(n)[0]: read_labelme(os.path.join(self.data_dir, n)) for n in names}
        labels = sorted({s["label"] for d in docs.values() for s in d["shapes"] if _kind(s) in AREA_SHAPES})
        self._ids = {name: i + 1 for i, name in enumerate(labels)}
        self.categories = {i: name for name, i in self._ids.items()}
        self._files = {os.path.splitext(n)[0]: n for n in names}
        self._stems, self.num_objects = [], 0
        for stem in split_stems(list(docs), val_fraction, split_seed, subset):
            masks, _ = self._objects(stem, docs[stem], self._size(stem, docs[stem]))
            if len(masks):
                self._stems.append(stem)
                self.num_objects += len(masks)
        if not self._stems:
            raise DatasetError(
                f"no labelme file with an object (of >= {max(1, self.min_area)} pixels) in {self.data_dir}"
            )

    def json_path(self, stem: str) -> str:
        return os.path.join(self.data_dir, self._files[stem])

    def _image_file(self, stem: str, doc: dict[str, Any]) -> str | None:
        if doc.get("imageData"):
            return None
        relative = str(doc["imagePath"]).replace("\\", "/")  # labelme on Windows writes backslashes
        path = os.path.normpath(os.path.join(self.data_dir, relative))
        if not os.path.isfile(path):
            raise DatasetError(f"image {path} of {self.json_path(stem)} (imagePath) not found")
        return path

    def image_path(self, index: int) -> str | None:
        stem = self._stems[index]
        return self._image_file(stem, read_labelme(self.json_path(stem)))

    def _size(self, stem: str, doc: dict[str, Any]) -> tuple[int, int]:
        """(H, W) of the picture (embedded or on disk), checked against imageHeight/imageWidth."""
        file = self._image_file(stem, doc)
        size = image_size_of(file) if file else self._embedded(stem, doc).shape[:2]
        stated = (doc.get("imageHeight"), doc.get("imageWidth"))
        if None not in stated and tuple(int(v) for v in stated) != tuple(size):
            raise DatasetError(
                f"{self.json_path(stem)} says {stated[0]}x{stated[1]} but its image is {size[0]}x{size[1]}"
            )
        return int(size[0]), int(size[1])

    def _embedded(self, stem: str, doc: dict[str, Any], percentiles: Any = False) -> np.ndarray:
        """The embedded picture: raw pixels, or with ``percentiles`` given the uint8 RGB training image."""
        where = f"the imageData of {self.json_path(stem)}"
        try:
            data = base64.b64decode(doc["imageData"])
        except (binascii.Error, ValueError, TypeError) as err:
            raise DatasetError(f"cannot decode {where}: {err}") from None
        if percentiles is False:
            return read_image_array(io.BytesIO(data), where)
        return load_training_image(io.BytesIO(data), percentiles, where)

    def _objects(
        self, stem: str, doc: dict[str, Any], size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        masks, ids = labelme_objects(doc, size, self._ids, self.json_path(stem))
        return drop_small(masks, ids, self.min_area)

    def read_objects(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stem = self._stems[index]
        doc = read_labelme(self.json_path(stem))
        file = self._image_file(stem, doc)
        image = (
            load_training_image(file, self.percentiles)
            if file
            else self._embedded(stem, doc, self.percentiles)
        )
        masks, ids = self._objects(stem, doc, image.shape[:2])
        return image, masks, ids

    def describe(self) -> str:
        return f"labelme {len(self)} images, {self.num_objects} objects, {len(self.categories)} labels from {self.data_dir}"
