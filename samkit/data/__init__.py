"""Datasets for box-prompt fine-tuning and evaluation: COCO, SA-1B, preprocessed FLARE22 slices, and
users' own image + mask folders and labelme files.

Every dataset returns samples of one contract (see :mod:`samkit.data.common`); batch them with
:func:`collate`.
"""

from __future__ import annotations

from typing import Any

from .coco import CocoDataset
from .common import (
    BoxPromptDataset,
    batch_images,
    batch_masks,
    collate,
    normalize_padded,
    pack_masks,
    prepare_image,
    prepare_masks,
    resize_and_pad,
    unpack_masks,
)
from .flare import FlareDataset
from .labelme import LabelmeDataset
from .masks import MaskFolderDataset
from .prompts import boxes_from_masks, choose_objects, jitter_boxes
from .sa1b import Sa1bDataset

DATASETS: dict[str, type[BoxPromptDataset]] = {
    "coco": CocoDataset,
    "sa1b": Sa1bDataset,
    "flare": FlareDataset,
    "masks": MaskFolderDataset,
    "labelme": LabelmeDataset,
}


def build_dataset(type: str, **kwargs: Any) -> BoxPromptDataset:
    """The dataset of the named type (a key of ``DATASETS``) built with ``kwargs``."""
    if type not in DATASETS:
        raise ValueError(f"unknown dataset type {type!r}; valid types: {', '.join(DATASETS)}")
    return DATASETS[type](**kwargs)


__all__ = [
    "DATASETS",
    "BoxPromptDataset",
    "CocoDataset",
    "FlareDataset",
    "LabelmeDataset",
    "MaskFolderDataset",
    "Sa1bDataset",
    "batch_images",
    "batch_masks",
    "boxes_from_masks",
    "build_dataset",
    "choose_objects",
    "collate",
    "jitter_boxes",
    "normalize_padded",
    "pack_masks",
    "prepare_image",
    "prepare_masks",
    "resize_and_pad",
    "unpack_masks",
]
