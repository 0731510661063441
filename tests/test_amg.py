"""SamAutomaticMaskGenerator against Meta's on the same weights and images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator as MetaGenerator

from samkit import build_model
from samkit.amg import SamAutomaticMaskGenerator

RELAXED = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)


def same_segmentation(a, b) -> bool:
    return np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b


MIN_COMPARED = 20  # every parity case compares at least this many records: none can pass on an empty list


def compare_records(ref: list[dict], got: list[dict], min_identical: float = 0.98) -> None:
    assert len(ref) >= MIN_COMPARED, f"Meta kept {len(ref)} records: too few to compare"
    assert len(got) == len(ref)
    assert all(set(r) == set(g) for r, g in zip(ref, got))
    identical = sum(same_segmentation(r["segmentation"], g["segmentation"]) for r, g in zip(ref, got))
    assert identical >= min_identical * len(ref), f"{identical} of {len(ref)} segmentations identical"
    for r, g in zip(ref, got):
        assert abs(r["predicted_iou"] - g["predicted_iou"]) < 1e-3
        assert abs(r["stability_score"] - g["stability_score"]) < 1e-2
        assert r["crop_box"] == g["crop_box"] and r["point_coords"] == g["point_coords"]
        if same_segmentation(r["segmentation"], g["segmentation"]):
            assert r["bbox"] == g["bbox"] and r["area"] == g["area"]
        assert type(r["area"]) is type(g["area"]) and all(type(v) is int for v in g["bbox"])


def test_argument_checks(tiny_model):
    with pytest.raises(ValueError, match="exactly one"):
        SamAutomaticMaskGenerator(tiny_model, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        SamAutomaticMaskGenerator(tiny_model, output_mode="png")
    with pytest.raises(ValueError, match="one grid per crop layer"):
        SamAutomaticMaskGenerator(
            tiny_model, points_per_side=None, point_grids=[np.zeros((4, 2))], crop_n_layers=1
        )


def test_images_smaller_than_the_crop_grid_skip_empty_crops(tiny_model):
    """A 1-pixel-wide (or tall) image with crop layers: generate_crop_boxes (as Meta's) gives crops
    that start at the image's edge and are empty; the generator runs on the others. Images of any
    usual size keep every crop."""
    from segment_anything.utils.amg import generate_crop_boxes as meta_crop_boxes

    from samkit.maskgen.grids import generate_crop_boxes, image_crop_boxes

    for size in [(480, 640), (7, 300), (1500, 2250)]:
        assert image_crop_boxes(size, 2, 512 / 1500) == generate_crop_boxes(size, 2, 512 / 1500)
        assert generate_crop_boxes(size, 2, 512 / 1500) == meta_crop_boxes(size, 2, 512 / 1500)
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 3), (3, 1, 3)]:
        boxes, _ = generate_crop_boxes(shape[:2], 1, 512 / 1500)
        assert any(x1 <= x0 or y1 <= y0 for x0, y0, x1, y1 in boxes)  # the case at hand
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        generator = SamAutomaticMaskGenerator(
            tiny_model, points_per_side=2, crop_n_layers=1, pred_iou_thresh=0, stability_score_thresh=0
        )
        records = generator.generate(image)
        assert records and all(r["segmentation"].shape == shape[:2] for r in records)
        assert all(w > 0 and h > 0 for r in records for _, _, w, h in [r["crop_box"]])


def test_bfloat16_model_runs(shapes_model, shapes_image):
    model = build_model("vit_tiny")
    model.load_state_dict(shapes_model[0].state_dict())
    model.to(torch.bfloat16)
    records = SamAutomaticMaskGenerator(model, points_per_side=4, **RELAXED).generate(shapes_image[0])
    assert len(records) >= 5 and all(r["segmentation"].dtype == bool for r in records)
    assert all(0 < r["area"] == r["segmentation"].sum() for r in records)


@pytest.mark.parametrize(
    "kwargs",
    [
        # On shapes_image a quarter of the 8x8 prompts have no candidate above 0.4: samkit skips their
        # mask pixels (Meta computes them), and NMS then decides among the rest.
        dict(points_per_side=8, pred_iou_thresh=0.4, stability_score_thresh=0.0),
        dict(points_per_side=6, points_per_batch=7, **RELAXED, output_mode="uncompressed_rle"),  # 47 records
        dict(
            points_per_side=6,
            crop_n_layers=1,
            crop_n_points_downscale_factor=2,  # 3x3 points per crop
            min_mask_region_area=100,
            **RELAXED,
            output_mode="coco_rle",
        ),  # 56 records, 25 of them from the crops
    ],
    ids=["iou-threshold-nms", "batches-rle", "crops-cleanup-coco"],
)
def test_trained_model_matches_meta(shapes_model, shapes_image, kwargs):
    """A model whose masks follow the prompt (trained on shapes) gives many overlapping candidates,
    so NMS, crops and hole/island cleanup really decide which records survive. Random weights keep 0
    or 1 records, whatever the thresholds, so every case runs on this model and compares at least
    MIN_COMPARED records; the crop case as many from the crops."""
    ours, meta = shapes_model
    image = shapes_image[0]
    ref = MetaGenerator(meta, **kwargs).generate(image)
    got = SamAutomaticMaskGenerator(ours, **kwargs).generate(image)
    if kwargs.get("crop_n_layers"):
        whole = [0, 0, image.shape[1], image.shape[0]]
        from_crops = sum(r["crop_box"] != whole for r in ref)
        assert from_crops >= MIN_COMPARED and len(ref) - from_crops >= MIN_COMPARED, (from_crops, len(ref))
    compare_records(ref, got)


@pytest.mark.parametrize("min_area", [0, 30, 200, 5000])
def test_postprocess_small_regions_matches_meta(min_area):
    """The public static method, on its own: Meta's MaskData in, the same records out, edited in place."""
    from segment_anything.utils import amg as meta_amg

    from samkit.utils import amg

    g = torch.Generator().manual_seed(min_area)
    blobs = torch.nn.functional.interpolate(torch.randn(12, 1, 8, 10, generator=g), (60, 80), mode="bilinear")
    masks = blobs[:, 0] > 0.3
    masks[3] = masks[2]  # a duplicate
    masks[5, 20:23, 30:33] = ~masks[5, 20:23, 30:33]  # a small hole or island
    values = dict(
        rles=amg.mask_to_rle(masks),
        boxes=amg.batched_mask_to_box(masks),
        iou_preds=torch.rand(12, generator=g),
        points=torch.rand(12, 2, generator=g),
    )
    ref = meta_amg.MaskData(
        **{k: v.clone() if isinstance(v, torch.Tensor) else list(v) for k, v in values.items()}
    )
    ref = MetaGenerator.postprocess_small_regions(ref, min_area, 0.7)
    ours = amg.MaskData(
        **{k: v.clone() if isinstance(v, torch.Tensor) else list(v) for k, v in values.items()}
    )
    out = SamAutomaticMaskGenerator.postprocess_small_regions(ours, min_area, 0.7)
    assert out is ours
    assert ours["rles"] == ref["rles"]
    for key in ("boxes", "iou_preds", "points"):
        assert torch.equal(ours[key], ref[key])
    if min_area >= 200:
        assert len(ref["rles"]) < 12  # the method really removed and merged masks here
    empty = amg.MaskData(rles=[], boxes=torch.zeros(0, 4))
    assert SamAutomaticMaskGenerator.postprocess_small_regions(empty, 10, 0.7) is empty
