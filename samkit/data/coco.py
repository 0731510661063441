"""COCO instance segmentation (a COCO ``instances_*.json`` and its image folder) as box-prompt samples."""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from typing import Any

import numpy as np

from ..errors import DatasetError
from ..utils.image import load_image
from .common import BoxPromptDataset, Ragged


def import_mask_utils(what: str):
    """``pycocotools.mask``, or a DatasetError saying how to install it."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise DatasetError(f"{what} needs pycocotools: pip install 'samkit[train]'") from None
    return mask_utils


def decode_rle(mask_utils, size: tuple[int, int], counts: bytes, where: str) -> np.ndarray:
    """A COCO compressed RLE -> HxW uint8 0/1 mask; DatasetError naming ``where`` (e.g. "annotation 5
    in <file>") when the RLE does not decode (runs longer than the image)."""
    try:
        with warnings.catch_warnings():  # pycocotools' own DeprecationWarning under numpy 2
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            return mask_utils.decode({"size": [int(size[0]), int(size[1])], "counts": counts})
    except (TypeError, ValueError) as err:  # pycocotools: "Invalid RLE mask representation"
        raise DatasetError(f"cannot decode the mask of {where}: {err}") from None


def box_numbers(bbox: Any, where: str) -> tuple[float, float, float, float]:
    """A COCO/SA-1B ``bbox`` (x, y, w, h) as 4 finite floats; DatasetError naming ``where`` otherwise
    (a NaN or infinite box would turn into NaN prompts and losses without a word)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise DatasetError(f"{where} has no 4-number bbox")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise DatasetError(f"{where} has a bbox of non-numbers: {bbox!r}") from None
    if not np.isfinite([x, y, w, h]).all():
        raise DatasetError(f"{where} has a bbox with non-finite numbers: {bbox!r}")
    return x, y, w, h


class CocoDataset(BoxPromptDataset):
    """Images of a COCO instances file with their objects' masks and box prompts.

    An object is usable when it is not a crowd region (unless ``include_crowd``), its mask is not
    empty and its ``bbox`` has a positive width and height; images with no usable object are left
    out. Images are in order of image id; objects in the file's order. The box prompt is the
    annotation's ``bbox`` (XYWH -> XYXY, so x1 = x + w is the right EDGE, not the last column) in
    original pixels, jittered by ``box_jitter`` and clipped to the image; the mask is
    ``COCO.annToMask`` (polygons rasterised by pycocotools).

    The file is parsed once: masks are kept as compressed RLEs in flat arrays, and pycocotools'
    index is dropped, so the dataset stays small in memory and in DataLoader workers.

    ``categories`` maps the file's category ids to their names; samples carry each kept object's
    ``category_ids`` and ``category_names`` (what the category-name text evaluation prompts with).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        annotation_path: str | os.PathLike,
        *,
        include_crowd: bool = False,
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
        self.image_dir = os.fspath(image_dir)
        self.annotation_path = os.fspath(annotation_path)
        self.include_crowd = bool(include_crowd)
        if not os.path.isdir(self.image_dir):
            raise DatasetError(f"COCO image folder not found: {self.image_dir}")
        if not os.path.isfile(self.annotation_path):
            raise DatasetError(f"COCO annotation file not found: {self.annotation_path}")
        mask_utils = import_mask_utils("CocoDataset")
        self._read(self._load_coco(), mask_utils)

    def _load_coco(self):
        from pycocotools.coco import COCO

        path = self.annotation_path
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DatasetError(f"cannot parse COCO annotation file {path}: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DatasetError(f"not a COCO instances file (no 'images' list): {path}")
        if not isinstance(data.get("annotations"), list):
            raise DatasetError(f"not a COCO instances file (no 'annotations' list): {path}")
        coco = COCO()
        coco.dataset = data
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                coco.createIndex()
        except (KeyError, TypeError) as err:
            raise DatasetError(f"malformed COCO annotation file {path}: missing or bad {err}") from None
        return coco

    def _read(self, coco, mask_utils) -> None:
        path = self.annotation_path
        files, sizes, ids, boxes, counts, objects, cats = [], [], [], [], [], [], []
        self.categories: dict[int, str] = {
            int(c["id"]): str(c.get("name", c["id"])) for c in coco.cats.values() if "id" in c
        }
        for image_id in sorted(coco.imgs):
            info = coco.imgs[image_id]
            kept_boxes, kept_counts = [], []
            for ann in coco.imgToAnns.get(image_id, []):
                if ann.get("iscrowd", 0) and not self.include_crowd:
                    continue
                x, y, bw, bh = box_numbers(ann.get("bbox"), f"annotation {ann.get('id')} in {path}")
                if bw <= 0 or bh <= 0 or not ann.get("segmentation"):
                    continue
                segmentation = ann["segmentation"]
                if isinstance(segmentation, list):
                    # Polygons of fewer than 3 points (label tools export them) cover no pixel, and
                    # pycocotools reads a first one of 4 numbers as a box and fails: drop them.
                    polygons = [p for p in segmentation if _is_polygon(p)]
                    if not polygons:
                        continue
                    if len(polygons) < len(segmentation):
                        ann = {**ann, "segmentation": polygons}
                try:
                    rle = coco.annToRLE(ann)  # what annToMask decodes
                    area = int(mask_utils.area(rle))
                except Exception as err:  # pycocotools raises bare Exceptions on bad input
                    raise DatasetError(
                        f"cannot read the segmentation of annotation {ann.get('id')} in {path}: {err}"
                    ) from None
                if area == 0:
                    continue
                if [int(v) for v in rle["size"]] != [int(info.get("height", -1)), int(info.get("width", -1))]:
                    raise DatasetError(
                        f"annotation {ann.get('id')} in {path} has a {rle['size']} mask for image {image_id} "
                        f"of {info.get('height')}x{info.get('width')}"
                    )
                try:
                    category = int(ann.get("category_id", -1))
                except (TypeError, ValueError):
                    raise DatasetError(
                        f"annotation {ann.get('id')} in {path} has a category_id that is not an integer: "
                        f"{ann.get('category_id')!r}"
                    ) from None
                c = rle["counts"]
                kept_counts.append(c.encode("ascii") if isinstance(c, str) else bytes(c))
                kept_boxes.append([x, y, x + bw, y + bh])
                cats.append(category)
            if not kept_counts:
                continue
            try:
                file_name, height, width = info["file_name"], int(info["height"]), int(info["width"])
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"image {image_id} in {path} lacks file_name/height/width") from None
            files.append(os.path.join(self.image_dir, file_name))
            sizes.append((height, width))
            ids.append(image_id)
            boxes.append(np.asarray(kept_boxes, dtype=np.float64))
            counts.extend(kept_counts)
            objects.append(len(kept_counts))
        if not files:
            crowd = "" if self.include_crowd else " (crowd regions excluded)"
            raise DatasetError(f"no image with a usable annotation{crowd} in {path}")
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            more = f" (and {len(missing) - 1} more of {len(files)})" if len(missing) > 1 else ""
            raise DatasetError(f"COCO image not found: {missing[0]}{more}, listed in {path}")
        self._files = np.array(files)  # fixed-width strings: no per-item Python objects
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self.image_ids = np.asarray(ids, dtype=np.int64)
        self._boxes = Ragged(boxes, np.float64)  # 4 numbers per object
        self._rles = Ragged(counts, np.uint8)  # one compressed RLE string per object
        self._first = np.concatenate([[0], np.cumsum(objects)]).astype(np.int64)  # image -> first object
        self._categories = np.asarray(cats, dtype=np.int64)  # per object, in the order of _rles

    def __len__(self) -> int:
        return len(self._files)

    @property
    def num_objects(self) -> int:
        return len(self._rles)

    def _load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        path = str(self._files[index])
        height, width = (int(v) for v in self._sizes[index])
        image = load_image(path, apply_exif=False)  # annotations refer to the stored pixel grid
        if image.shape[:2] != (height, width):
            raise DatasetError(
                f"image {path} is {image.shape[0]}x{image.shape[1]} but {self.annotation_path} says "
                f"{height}x{width}"
            )
        first = int(self._first[index])
        keep = self.choose(int(self._first[index + 1]) - first, rng)
        mask_utils = import_mask_utils("CocoDataset")
        masks = np.zeros((len(keep), height, width), dtype=np.uint8)
        for row, j in enumerate(keep):
            where = f"object {int(j)} of image {self.image_ids[index]} ({path}) in {self.annotation_path}"
            masks[row] = decode_rle(mask_utils, (height, width), self._rles[first + int(j)].tobytes(), where)
        boxes = self._boxes[index].reshape(-1, 4)[keep]
        categories = self._categories[first : int(self._first[index + 1])][keep]
        return image, masks, boxes, categories

    def describe(self) -> str:
        crowd = ", crowd included" if self.include_crowd else ""
        return f"COCO {len(self)} images, {self.num_objects} objects{crowd} from {self.annotation_path}"

    def image_info(self, index: int) -> dict[str, Any]:
        """The file, COCO image id and (H, W) of image ``index``."""
        return {
            "file": str(self._files[index]),
            "image_id": int(self.image_ids[index]),
            "size": tuple(int(v) for v in self._sizes[index]),
        }


def _is_polygon(p: object) -> bool:
    """A COCO polygon [x1, y1, x2, y2, ...] of at least 3 points."""
    return isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0
