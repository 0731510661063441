"""Write a mask folder or a labelme folder as a standard COCO instances file (``samkit convert --to coco``).

The output folder gets ``images/<stem>.png`` (the 8-bit RGB picture samkit trains on: palettes
expanded, alpha dropped, deeper pictures after the percentile rule of :mod:`samkit.data.files`) and
``instances.json``: one image per picture with an object (ids 1, 2, ... in the dataset's order), one
annotation per object with a compressed-RLE ``segmentation``, COCO's ``bbox`` and ``area``, and the
dataset's categories. ``CocoDataset(out/images, out/instances.json)`` then yields the same samples as
the folder (same pictures, masks, boxes, objects, order and per-sample randomness).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np

from .coco import import_mask_utils
from .objects import ObjectFilesDataset


def coco_annotations(dataset: ObjectFilesDataset) -> dict[str, Any]:
    """The COCO instances document of every object of ``dataset`` (reads every picture once, so a
    corrupt file stops here, before anything is written)."""
    mask_utils = import_mask_utils("samkit convert --to coco")
    images, annotations = [], []
    for index in range(len(dataset)):
        image, masks, categories = dataset.read_objects(index)
        stem = dataset.image_info(index)["stem"]
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": f"{stem}.png", "height": image.shape[0], "width": image.shape[1]}
        )
        for mask, category in zip(masks, categories):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(category),
                    "segmentation": {
                        "size": [int(v) for v in rle["size"]],
                        "counts": rle["counts"].decode("ascii"),
                    },
                    "area": int(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": int(i), "name": name, "supercategory": ""} for i, name in sorted(dataset.categories.items())
    ]
    return {
        "info": {"description": f"samkit convert --to coco: {dataset.describe()}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def write_coco(dataset: ObjectFilesDataset, out_dir: str | os.PathLike) -> dict[str, int]:
    """Write ``out_dir/images/*.png`` and ``out_dir/instances.json`` (each file atomically, the JSON
    last, after every picture was read); returns the counts written."""
    from PIL import Image

    from ..utils.files import atomic_write

    out_dir = os.fspath(out_dir)
    document = coco_annotations(dataset)
    for index, info in enumerate(document["images"]):
        image, _, _ = dataset.read_objects(index)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        with atomic_write(os.path.join(out_dir, "images", info["file_name"]), make_parents=True) as f:
            f.write(buffer.getvalue())
    with atomic_write(os.path.join(out_dir, "instances.json"), "w", encoding="utf-8", make_parents=True) as f:
        json.dump(document, f)
    return {"images": len(document["images"]), "annotations": len(document["annotations"])}
