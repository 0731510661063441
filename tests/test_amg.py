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


def compare_records(ref: list[dict], got: list[dict], min_identical: float = 0.98) -> None:
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


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(points_per_side=5, **RELAXED),
        dict(
            points_per_side=4,
            points_per_batch=7,
            crop_n_layers=1,
            crop_n_points_downscale_factor=2,
            **RELAXED,
            output_mode="uncompressed_rle",
        ),
        dict(points_per_side=4, min_mask_region_area=300, **RELAXED, output_mode="coco_rle"),
        dict(points_per_side=8),
    ],
    ids=["relaxed", "crops", "cleanup-coco", "defaults"],
)
def test_random_tiny_model_matches_meta(tiny_pair, kwargs):
    from skimage import data

    ours, meta = tiny_pair
    image = data.coffee()[::2, ::2].copy()
    compare_records(
        MetaGenerator(meta, **kwargs).generate(image),
        SamAutomaticMaskGenerator(ours, **kwargs).generate(image),
    )


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


def test_bfloat16_model_runs(tiny_model):
    from skimage import data

    model = build_model("vit_tiny")
    model.load_state_dict(tiny_model.state_dict())
    model.to(torch.bfloat16)
    records = SamAutomaticMaskGenerator(model, points_per_side=4, **RELAXED).generate(data.camera()[::4, ::4])
    assert all(r["segmentation"].dtype == bool for r in records)


@pytest.mark.parametrize(
    "kwargs",
    [
        # 8x8 points: Meta keeps 16 of 34 records after its NMS (12x12 took twice as long, ~19 s)
        dict(points_per_side=8, pred_iou_thresh=0.2, stability_score_thresh=0.8),
        dict(
            points_per_side=6,
            pred_iou_thresh=0.2,
            stability_score_thresh=0.8,
            crop_n_layers=1,
            crop_n_points_downscale_factor=2,  # 3x3 points per crop: Meta's 5 crops cost ~10 s
            min_mask_region_area=100,  # on this image: 12 records without, 8 with
        ),
    ],
    ids=["nms", "crops-cleanup"],
)
def test_prompt_dependent_model_matches_meta(shapes_model, shapes_image, kwargs):
    """A model whose masks follow the prompt (trained on shapes) gives many overlapping candidates,
    so NMS, crops and hole/island cleanup really decide which records survive."""
    ours, meta = shapes_model
    image = shapes_image[0]
    ref = MetaGenerator(meta, **kwargs).generate(image)
    assert len(ref) >= 3
    if kwargs.get("crop_n_layers"):
        assert len({tuple(r["crop_box"]) for r in ref}) >= 2  # records from the image and from crops
    compare_records(ref, SamAutomaticMaskGenerator(ours, **kwargs).generate(image))


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
