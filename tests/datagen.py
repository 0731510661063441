"""Small datasets in the real on-disk formats (COCO, SA-1B, preprocessed FLARE22), drawn from
``tests/shapes.py``'s shape images, for the ``samkit.data`` tests.

Each generator is deterministic for a seed and writes under ``root``; all are fast (small images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import measure

from .shapes import make_shapes_image


def _rle(mask: np.ndarray) -> dict:
    """HxW bool -> COCO compressed RLE with a str ``counts`` (as written in JSON files)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _polygons(mask: np.ndarray) -> list[list[float]]:
    """Outlines of a mask as COCO polygons ([x0, y0, x1, y1, ...] in pixel-centre coordinates)."""
    padded = np.pad(mask.astype(np.float64), 1)  # so shapes touching the border close
    polygons = []
    for contour in measure.find_contours(padded, 0.5):
        if len(contour) >= 3:
            xy = contour[:, ::-1] - 1  # (row, col) -> (x, y), undo the padding
            polygons.append([round(float(v), 2) for v in xy.reshape(-1)])
    return polygons


def _box_area(rle: dict) -> tuple[list[float], int]:
    return [float(v) for v in mask_utils.toBbox(rle)], int(mask_utils.area(rle))


def make_coco_dataset(
    root: Path, num_images: int = 6, seed: int = 0, size: tuple[int, int] = (96, 128), split: str = "train"
) -> tuple[Path, Path]:
    """A COCO instances dataset: ``root/<split>2017/*.jpg`` and ``root/annotations/instances_<split>2017.json``.

    Shapes alternate polygon and compressed-RLE segmentations (with bbox and area as COCO computes
    them). Image ids do not follow the file order. Special images (with ``num_images >= 4``):
    image 0 also has a crowd annotation (uncompressed RLE, ``iscrowd=1``); image 1 also has two
    unusable ones (a zero-width bbox and an empty mask); image ``num_images - 2`` has only a crowd
    annotation; the last image has none. So ``num_images - 2`` images are usable without crowd
    regions and ``num_images - 1`` with them. Returns (image folder, annotation file).
    """
    root = Path(root)
    image_dir, ann_path = root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    images, annotations = [], []

    def add(image_id: int, segmentation, bbox, area, iscrowd=0) -> None:
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(rng.integers(1, 4)),
                "segmentation": segmentation,
                "area": area,
                "bbox": bbox,
                "iscrowd": iscrowd,
            }
        )

    # Unique ids, not increasing in file order (the old formula repeated ids for some num_images).
    id_order = np.random.default_rng(12345).permutation(num_images)
    for i in range(num_images):
        image_id = 100 + 3 * int(id_order[i])
        image, masks = make_shapes_image(rng, size)
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(image).save(image_dir / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w, "license": 1})
        if i == num_images - 1:
            continue  # no annotation at all
        if i == 0 or i == num_images - 2:
            crowd = np.zeros((h, w), bool)
            crowd[h // 8 : h // 3, w // 2 : w - 4] = True
            bbox, area = _box_area(_rle(crowd))
            add(image_id, {"size": [h, w], "counts": _uncompressed_counts(crowd)}, bbox, area, iscrowd=1)
            if i == num_images - 2:
                continue
        for j, mask in enumerate(masks):
            rle = _rle(mask)
            if j % 2 == 0:
                polygons = _polygons(mask)
                merged = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
                bbox, area = _box_area(merged)
                add(image_id, polygons, bbox, area)
            else:
                bbox, area = _box_area(rle)
                add(image_id, rle, bbox, area)
        if i == 1:
            add(image_id, [[10.0, 10.0, 10.0, 20.0, 10.0, 30.0]], [10.0, 10.0, 0.0, 20.0], 0)
            add(image_id, _rle(np.zeros((h, w), bool)), [5.0, 5.0, 10.0, 10.0], 0)
    data = {
        "info": {"description": "samkit test shapes", "version": "1.0", "year": 2024},
        "licenses": [{"id": 1, "name": "CC0", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": c, "name": n, "supercategory": "shape"} for c, n in ((1, "a"), (2, "b"), (3, "c"))
        ],
    }
    ann_path.write_text(json.dumps(data))
    return image_dir, ann_path


def make_coco_splits(root: Path, train_images: int, val_images: int) -> dict[str, tuple[str, str]]:
    """A train split (seed 1) and a val split (seed 2) under ``root``, as the training configs take
    them: ``{"train": (image folder, annotation file), "val": (...)}``."""
    root = Path(root)
    splits = {}
    for split, count, seed in (("train", train_images, 1), ("val", val_images, 2)):
        image_dir, ann = make_coco_dataset(root / split, num_images=count, seed=seed, split=split)
        splits[split] = (str(image_dir), str(ann))
    return splits


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts of a mask: run lengths over the column-major pixels, zeros first."""
    flat = mask.ravel(order="F").astype(np.uint8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [len(flat)]])
    counts = np.diff(bounds).tolist()
    return [0, *counts] if flat[0] else counts


def make_sa1b_dataset(
    root: Path, num_images: int = 4, seed: int = 0, size: tuple[int, int] = (96, 128)
) -> Path:
    """An SA-1B folder ``root/sa1b`` with one part ``sa_000000/`` of ``sa_<id>.jpg`` + ``sa_<id>.json``.

    Masks are the shapes' masks (the large ones cover a few hundred pixels or more, the small ones
    ~40-180); the last image has a single 8x8 square (area 64) only, so ``min_area=65`` or more
    drops it. Returns the folder to give ``Sa1bDataset``.
    """
    data_dir = Path(root) / "sa1b"
    part = data_dir / "sa_000000"
    part.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(num_images):
        image_id = 1 + 3 * i
        image, masks = make_shapes_image(rng, size)
        if i == num_images - 1:
            masks = np.zeros((1, h, w), bool)
            masks[0, 20:28, 30:38] = True
        Image.fromarray(image).save(part / f"sa_{image_id}.jpg", quality=95)
        annotations = []
        for j, mask in enumerate(masks):
            rle = _rle(mask)
            bbox, area = _box_area(rle)
            ys, xs = np.nonzero(mask)
            k = int(rng.integers(len(ys)))
            annotations.append(
                {
                    "id": image_id * 100 + j,
                    "segmentation": rle,
                    "area": area,
                    "bbox": bbox,
                    "predicted_iou": round(float(rng.uniform(0.85, 1.0)), 4),
                    "point_coords": [[float(xs[k]) + 0.5, float(ys[k]) + 0.5]],
                    "stability_score": round(float(rng.uniform(0.9, 1.0)), 4),
                    "crop_box": [0.0, 0.0, float(w), float(h)],
                }
            )
        record = {
            "image": {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"},
            "annotations": annotations,
        }
        (part / f"sa_{image_id}.json").write_text(json.dumps(record))
    return data_dir


def make_flare_slices(root: Path, num_slices: int = 4, seed: int = 0, size: int = 64) -> Path:
    """The seed's preprocessed FLARE22 layout: ``root/flare/images/*.npy`` (HxWx3 float64 in [0, 1],
    grey CT-like slices that are not multiples of 1/255) and ``root/flare/labels/*.npy`` (HxW uint8
    organ ids: each shape gets a distinct id from 1-13, not consecutive). Returns ``root/flare``."""
    data_dir = Path(root) / "flare"
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    (data_dir / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_slices):
        image, masks = make_shapes_image(rng, (size, size))
        grey = image.mean(axis=2) / 255 + rng.uniform(-0.4, 0.4, (size, size)) / 255
        slice_ = np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=2).astype(np.float64)
        ids = np.sort(rng.choice(np.arange(1, 14), size=len(masks), replace=False))
        label = np.zeros((size, size), np.uint8)
        for organ, mask in zip(ids, masks):
            label[mask] = organ
        name = f"CT_Abd_FLARE22_Tr_{i // 2 + 1:04d}-{i % 2:03d}.npy"
        np.save(data_dir / "images" / name, slice_)
        np.save(data_dir / "labels" / name, label)
    return data_dir
