"""The base of datasets built from users' own files (mask folders, labelme): each image's objects are
read whole (:meth:`ObjectFilesDataset.read_objects`), then sub-sampled and boxed like COCO's."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import DatasetError
from .common import BoxPromptDataset
from .prompts import boxes_from_masks


def coco_boxes(masks: np.ndarray) -> np.ndarray:
    """KxHxW masks -> Kx4 float64 XYXY boxes as COCO's ``bbox`` gives them (pycocotools ``toBbox``,
    then x + w): x0, y0 the first column/row of the mask, x1, y1 one past the last (the right and
    bottom EDGES). So a folder and its ``samkit convert --to coco`` file prompt with the same boxes."""
    boxes = boxes_from_masks(masks)
    if len(boxes):
        boxes[:, 2:] += 1.0
    return boxes


class ObjectFilesDataset(BoxPromptDataset):
    """Subclasses set ``self._stems`` (one per image, sorted), ``self.categories`` (id -> name) and
    implement ``read_objects`` and ``image_path``; this class sub-samples the objects (``max_objects``,
    seeded per sample) and boxes them with :func:`coco_boxes` (jittered by ``box_jitter``)."""

    _stems: list[str]
    categories: dict[int, str]

    def __len__(self) -> int:
        return len(self._stems)

    def read_objects(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(HxWx3 uint8 image, KxHxW bool masks, K int64 category ids) of every object of image
        ``index``, in the dataset's object order."""
        raise NotImplementedError

    def image_path(self, index: int) -> str | None:
        """The image file of ``index`` (None when the image is embedded, as in labelme's imageData)."""
        raise NotImplementedError

    def _load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        image, masks, categories = self.read_objects(index)
        keep = self.choose(len(masks), rng)
        masks = masks[keep]
        return image, masks.astype(np.uint8), coco_boxes(masks), categories[keep]

    def image_info(self, index: int) -> dict[str, Any]:
        """The stem and image file (None when embedded) of image ``index``."""
        return {"stem": self._stems[index], "file": self.image_path(index)}


def check_folder(path: str, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DatasetError(f"{what} not found: {path}")
    return path


def drop_small(masks: np.ndarray, categories: np.ndarray, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the masks of at least ``min_area`` pixels (and at least one)."""
    if not len(masks):
        return masks, categories
    keep = masks.reshape(len(masks), -1).sum(axis=1) >= max(1, int(min_area))
    return masks[keep], categories[keep]
