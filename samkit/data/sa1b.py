"""SA-1B (Segment Anything 1-Billion) image/annotation pairs as box-prompt samples."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ..errors import DatasetError
from ..utils.image import load_image
from .coco import box_numbers, decode_rle, import_mask_utils
from .common import BoxPromptDataset, Ragged


def find_sa1b_pairs(data_dir: str) -> list[tuple[str, str]]:
    """(image, annotation) paths of every ``sa_<id>.jpg`` + ``sa_<id>.json`` pair directly in
    ``data_dir`` or in its sub-folders (one level: SA-1B's tar parts extracted side by side),
    sorted by folder then file name. A file without its partner raises DatasetError naming it."""
    folders = [data_dir] + sorted(
        os.path.join(data_dir, d) for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d))
    )
    pairs = []
    for folder in folders:
        names = set(os.listdir(folder))
        stems = sorted(
            {n[:-4] for n in names if n.startswith("sa_") and n.endswith(".jpg")}
            | {n[:-5] for n in names if n.startswith("sa_") and n.endswith(".json")}
        )
        for stem in stems:
            image, ann = os.path.join(folder, stem + ".jpg"), os.path.join(folder, stem + ".json")
            if stem + ".json" not in names:
                raise DatasetError(f"SA-1B image without its annotation file: {image} (no {ann})")
            if stem + ".jpg" not in names:
                raise DatasetError(f"SA-1B annotation file without its image: {ann} (no {image})")
            pairs.append((image, ann))
    return pairs


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot parse SA-1B annotation file {path}: {err}") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("image"), dict)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DatasetError(f"not an SA-1B annotation file (no 'image' and 'annotations'): {path}")
    return data


def _area(ann: dict[str, Any], path: str) -> float:
    """The mask's ``area``, or its bbox's w*h when the file has no area."""
    try:
        if "area" in ann:
            return float(ann["area"])
        return float(ann["bbox"][2]) * float(ann["bbox"][3])
    except (KeyError, IndexError, TypeError, ValueError):
        raise DatasetError(f"annotation {ann.get('id')} in {path} has neither area nor bbox") from None


class Sa1bDataset(BoxPromptDataset):
    """SA-1B images with their masks (area >= ``min_area`` pixels) and box prompts.

    ``data_dir`` holds ``sa_<id>.jpg`` + ``sa_<id>.json`` pairs, directly or in sub-folders (one
    level). Every JSON is read once at construction to find the masks kept (only their positions
    are remembered, in flat arrays); images left with no mask are dropped. At load time the JSON is
    read again and the kept masks' COCO RLEs decoded. The box prompt is the annotation's ``bbox``
    (XYWH -> XYXY, x1 = x + w is the right EDGE), jittered by ``box_jitter`` and clipped.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        min_area: float = 10000,
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
        self.data_dir = os.fspath(data_dir)
        self.min_area = float(min_area)
        if not os.path.isdir(self.data_dir):
            raise DatasetError(f"SA-1B folder not found: {self.data_dir}")
        import_mask_utils("Sa1bDataset")
        pairs = find_sa1b_pairs(self.data_dir)
        if not pairs:
            raise DatasetError(
                f"no SA-1B pairs (sa_<id>.jpg + sa_<id>.json) in {self.data_dir} or its sub-folders"
            )
        images, anns, kept = [], [], []
        for image, ann_path in pairs:
            annotations = _read_json(ann_path)["annotations"]
            positions = [i for i, a in enumerate(annotations) if _area(a, ann_path) >= self.min_area]
            if positions:
                images.append(image)
                anns.append(ann_path)
                kept.append(np.asarray(positions, dtype=np.int32))
        if not images:
            raise DatasetError(
                f"no SA-1B mask of area >= {self.min_area:g} in {len(pairs)} images under {self.data_dir}"
            )
        self.num_pairs = len(pairs)  # before dropping images with no mask left
        self._images = np.array(images)  # fixed-width strings: no per-item Python objects
        self._annotations = np.array(anns)
        self._kept = Ragged(kept, np.int32)  # positions in each file's "annotations" list

    def __len__(self) -> int:
        return len(self._images)

    @property
    def num_objects(self) -> int:
        return len(self._kept.values)

    def _load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image_path, ann_path = str(self._images[index]), str(self._annotations[index])
        data = _read_json(ann_path)
        annotations = data["annotations"]
        image = load_image(image_path, apply_exif=False)  # annotations refer to the stored pixel grid
        height, width = image.shape[:2]
        positions = self._kept[index]
        keep = self.choose(len(positions), rng)
        mask_utils = import_mask_utils("Sa1bDataset")
        masks = np.zeros((len(keep), height, width), dtype=np.uint8)
        boxes = np.zeros((len(keep), 4), dtype=np.float64)
        for row, j in enumerate(keep):
            position = int(positions[j])
            if position >= len(annotations):
                raise DatasetError(f"{ann_path} changed since the dataset was built (fewer annotations)")
            ann = annotations[position]
            where = f"annotation {ann.get('id') if isinstance(ann, dict) else None} in {ann_path}"
            try:
                segmentation, bbox = ann["segmentation"], ann["bbox"]
                size, counts = segmentation["size"], segmentation["counts"].encode("ascii")
                same_size = [int(v) for v in size] == [height, width]
            except (KeyError, TypeError, ValueError, AttributeError):
                raise DatasetError(
                    f"{where} lacks a bbox or an RLE segmentation (size, counts string)"
                ) from None
            x, y, w, h = box_numbers(bbox, where)
            if not same_size:
                raise DatasetError(
                    f"{where} has a {size[0]}x{size[1]} mask but {image_path} is {height}x{width}"
                )
            masks[row] = decode_rle(mask_utils, (height, width), counts, where)
            boxes[row] = [x, y, x + w, y + h]
        return image, masks, boxes

    def describe(self) -> str:
        return (
            f"SA-1B {len(self)} images, {self.num_objects} masks of area >= {self.min_area:g} "
            f"from {self.data_dir}"
        )
