"""Image + mask folders (microscopy, medical, remote sensing exports) as box-prompt samples.

Layout (``data_dir``), files paired by stem (the name without its ending)::

    images/<stem>.<png|jpg|tif|...>     the pictures (any format Pillow reads, 8 to 32 bits)
    labels/<stem>.<png|tif>             EITHER one label image per picture: 0 = background, each
                                        other value one object (8/16/32-bit grey or palette PNG)
    masks/<stem>/<any>.<png|tif|...>    OR one folder of binary masks per picture (non-zero = object)
    categories.json                     optional: {"1": "nucleus", ...}, the category names

With ``semantic=True`` a label value is a class, not an object: each class's connected components
(8-connected) are its objects, and the value is their category. Objects of fewer than ``min_area``
pixels are dropped; pictures left with no object are left out, as COCO's are.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from ..errors import DatasetError
from .files import (
    DEFAULT_PERCENTILES,
    check_percentiles,
    image_files_by_stem,
    image_size_of,
    load_training_image,
    read_image_array,
    read_label_array,
    split_stems,
)
from .objects import ObjectFilesDataset, check_folder, drop_small


def objects_from_label(label: np.ndarray, *, semantic: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An HxW integer label image -> (KxHxW bool masks, K int64 category ids).

    Instance labels: one object per non-zero value, in increasing value order, category 1 (a value
    may cover several pieces: an occluded object stays one object). Semantic labels: one object per
    8-connected component of each non-zero class value, classes in increasing order, components in
    the order of their first pixel (row-major); the category is the class value.
    """
    values = np.unique(label)
    values = values[values != 0]
    if not semantic:
        masks = label[None] == values[:, None, None]
        return masks, np.ones(len(values), dtype=np.int64)
    from scipy import ndimage

    masks, categories = [], []
    for value in values:
        components, count = ndimage.label(label == value, structure=np.ones((3, 3), dtype=bool))
        masks.extend(components == k for k in range(1, count + 1))
        categories.extend([int(value)] * count)
    shape = (len(masks), *label.shape)
    return (np.stack(masks) if masks else np.zeros(shape, bool)), np.asarray(categories, dtype=np.int64)


def read_category_names(path: str) -> dict[int, str]:
    """``categories.json``: ``{"1": "nucleus", "2": "membrane"}`` (ids > 0) -> {1: "nucleus", ...}."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot parse {path}: {err}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f'{path} must map label values to names, like {{"1": "cell"}}')
    out = {}
    for key, name in raw.items():
        try:
            value = int(key)
        except ValueError:
            value = 0
        if value < 1 or not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{path}: {key!r}: {name!r} is not a label value > 0 with a name")
        out[value] = name.strip()
    return out


class MaskFolderDataset(ObjectFilesDataset):
    """Pictures with label images or binary-mask folders (module docstring for the layout).

    Images go through :func:`samkit.data.files.to_training_rgb`: 8-bit pictures as they are, deeper
    ones (16-bit, 32-bit, float TIFFs) normalised per image between the ``percentiles`` (default the
    1st and 99th). Box prompts are the objects' tight boxes as COCO writes them (right/bottom edge
    exclusive, :func:`~samkit.data.objects.coco_boxes`), jittered by ``box_jitter``.

    ``val_fraction`` with ``subset="train"`` or ``"val"`` takes a seeded part of the pictures
    (:func:`~samkit.data.files.split_stems`, seed ``split_seed``), for a folder without a separate
    validation folder; the training config does this by itself (train_data takes the train part,
    eval_data the validation part). Every file is checked when the dataset is built (pairs, sizes,
    labels read once), so a bad folder stops before training starts.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        semantic: bool = False,
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
        self.data_dir = check_folder(data_dir, "mask-folder dataset")
        self.semantic, self.min_area = bool(semantic), int(min_area)
        self.percentiles = check_percentiles(percentiles)
        image_dir = check_folder(os.path.join(self.data_dir, "images"), "images/ folder of the dataset")
        self._images = image_files_by_stem(image_dir, "images")
        self._kind, partners = self._find_partners()
        self._pair(partners)
        names_path = os.path.join(self.data_dir, "categories.json")
        names = read_category_names(names_path) if os.path.isfile(names_path) else {}
        stems = split_stems(list(self._images), val_fraction, split_seed, subset)
        self._partners = partners
        self._stems, counts, seen = [], [], set()
        for stem in stems:
            masks, categories = self._objects(
                stem, image_size_of(os.path.join(image_dir, self._images[stem]))
            )
            if len(masks):
                self._stems.append(stem)
                counts.append(len(masks))
                seen.update(int(c) for c in categories)
        if not self._stems:
            raise DatasetError(
                f"no picture with an object (of >= {max(1, self.min_area)} pixels) in {self.data_dir}"
            )
        self.num_objects = int(sum(counts))
        default = "object" if not self.semantic else None
        self.categories = {c: names.get(c, default or f"class {c}") for c in sorted(seen)}

    def _find_partners(self) -> tuple[str, dict[str, str]]:
        labels, masks = (os.path.join(self.data_dir, d) for d in ("labels", "masks"))
        if os.path.isdir(labels) and os.path.isdir(masks):
            raise DatasetError(f"{self.data_dir} has both labels/ and masks/: keep one of them")
        if os.path.isdir(labels):
            return "labels", image_files_by_stem(labels, "label images")
        if os.path.isdir(masks):
            folders = sorted(d for d in os.listdir(masks) if os.path.isdir(os.path.join(masks, d)))
            return "masks", {d: d for d in folders if not d.startswith(".")}
        raise DatasetError(f"{self.data_dir} has no labels/ (label images) or masks/ (mask folders) folder")

    def _pair(self, partners: dict[str, str]) -> None:
        if not self._images:
            raise DatasetError(f"no image files in {os.path.join(self.data_dir, 'images')}")
        unpaired = sorted(set(self._images) ^ set(partners))
        if unpaired:
            stem = unpaired[0]
            what = "label image" if self._kind == "labels" else "mask folder"
            if stem in self._images:
                where = os.path.join(self.data_dir, "images", self._images[stem])
                problem = f"image without its {what}: {where} (no {self._kind}/{stem}"
                problem += ".*)" if self._kind == "labels" else "/)"
            else:
                where = os.path.join(self.data_dir, self._kind, partners[stem])
                problem = f"{what} without its image: {where} (no images/{stem}.*)"
            raise DatasetError(f"{problem}; {len(unpaired)} unpaired")

    def _objects(self, stem: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Every object of ``stem`` (KxHxW bool, K categories), its files checked against ``size``."""
        if self._kind == "labels":
            path = os.path.join(self.data_dir, "labels", self._partners[stem])
            label = read_label_array(path)
            _check_size(label.shape, size, path, self.image_path_of(stem))
            masks, categories = objects_from_label(label, semantic=self.semantic)
        else:
            folder = os.path.join(self.data_dir, "masks", self._partners[stem])
            files = [os.path.join(folder, n) for n in image_files_by_stem(folder, "masks").values()]
            masks_list = []
            for path in files:
                array = read_image_array(path)
                _check_size(array.shape[:2], size, path, self.image_path_of(stem))
                colour = array[..., : min(3, array.shape[2])] if array.ndim == 3 else array[..., None]
                masks_list.append(np.asarray(colour != 0).any(axis=2))
            masks = np.stack(masks_list) if masks_list else np.zeros((0, *size), bool)
            categories = np.ones(len(masks), dtype=np.int64)
        return drop_small(masks, categories, self.min_area)

    def image_path_of(self, stem: str) -> str:
        return os.path.join(self.data_dir, "images", self._images[stem])

    def image_path(self, index: int) -> str:
        return self.image_path_of(self._stems[index])

    def read_objects(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stem = self._stems[index]
        image = load_training_image(self.image_path_of(stem), self.percentiles)
        masks, categories = self._objects(stem, image.shape[:2])
        return image, masks, categories

    def describe(self) -> str:
        how = (
            "semantic labels"
            if self.semantic
            else ("label images" if self._kind == "labels" else "mask folders")
        )
        return f"masks {len(self)} images, {self.num_objects} objects ({how}) from {self.data_dir}"


def _check_size(shape: tuple[int, ...], size: tuple[int, int], path: str, image: str) -> None:
    if tuple(shape[:2]) != tuple(size):
        raise DatasetError(f"{path} is {shape[0]}x{shape[1]} but its image {image} is {size[0]}x{size[1]}")
