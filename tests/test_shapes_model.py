"""The shapes-trained tiny SAM (tests/shapes.py) is an honest test model: its masks follow the prompt.

Measured on the held-out ``shapes_image`` (seed 12345, 6 shapes) with the default 1000 training
steps: a point at the most interior pixel of each shape gives a best-of-3 mask with mean IoU
0.62-0.74 against that shape over training seeds 0-2 and 1 or 2 threads (the untrained model: 0.03).
The IoU head is the least stable part: the mask it picks has mean IoU 0.44-0.73 over the same runs
(on 2 threads of an Intel Xeon with AMX, seed 0 picks a 0-IoU mask for 2 of the 6 shapes and predicts
~0.3 for every mask; on 1 thread the same seed picks the best mask for all 6). So the assertions
leave that room, and the generator tests relax the thresholds to predicted IoU 0.2 and stability 0.8
(the defaults 0.88 and 0.95 keep no mask): 14-15 distinct records, 4-5 of the 6 shapes found.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage
from segment_anything import SamPredictor as MetaPredictor

from samkit import SamPredictor, build_model
from samkit.amg import SamAutomaticMaskGenerator

from .shapes import make_shapes_image

RELAXED = dict(pred_iou_thresh=0.2, stability_score_thresh=0.8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def interior_point(mask: np.ndarray) -> np.ndarray:
    """The pixel farthest from the mask's edge, as a 1x2 XY array."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(depth.argmax(), depth.shape)
    return np.array([[x, y]])


def point_ious(model, image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per shape, for a point inside it: (best IoU of the 3 masks, IoU of the mask the IoU head picks)."""
    predictor = SamPredictor(model)
    predictor.set_image(image)
    best, picked = [], []
    for shape in masks:
        out, scores, _ = predictor.predict(interior_point(shape), np.array([1]))
        ious = [iou(o, shape) for o in out]
        best.append(max(ious))
        picked.append(ious[int(scores.argmax())])
    return np.array(best), np.array(picked)


@pytest.fixture(scope="module")
def amg_records(shapes_model, shapes_image):
    model = shapes_model[0]
    image = shapes_image[0]
    plain = SamAutomaticMaskGenerator(model, points_per_side=16, **RELAXED).generate(image)
    cleaned = SamAutomaticMaskGenerator(
        model, points_per_side=16, min_mask_region_area=100, **RELAXED
    ).generate(image)
    return plain, cleaned


def test_shapes_image_masks_are_the_visible_parts():
    for seed in range(5):
        image, masks = make_shapes_image(np.random.default_rng(seed), size=(300, 400))
        assert image.shape == (300, 400, 3) and image.dtype == np.uint8
        assert 3 <= len(masks) <= 6 and masks.shape[1:] == (300, 400) and masks.dtype == bool
        assert masks.sum(0).max() == 1  # visible parts never overlap
        assert (masks.sum((1, 2)) >= 40).all()
        for shape in masks:  # one flat colour (+ noise) per shape, unlike its surroundings
            inside = image[shape].astype(float)
            assert inside.std(0).max() < 12
            ring = ndimage.binary_dilation(shape, iterations=3) & ~shape & ~masks.any(0)
            if ring.any():
                assert np.abs(image[ring].mean(0) - inside.mean(0)).max() > 25


def test_point_prompts_segment_the_prompted_shape(shapes_model, shapes_image):
    image, masks = shapes_image
    best, picked = point_ious(shapes_model[0], image, masks)
    torch.manual_seed(0)
    untrained_best, _ = point_ious(build_model("vit_tiny"), image, masks)
    print(
        f"trained: best-of-3 {np.round(best, 2)}, picked {np.round(picked, 2)}; untrained {np.round(untrained_best, 2)}"
    )
    assert best.mean() > 0.5
    assert (best > 0.5).sum() >= len(masks) // 2
    assert picked.mean() > 0.3
    assert untrained_best.mean() < 0.25
    assert best.mean() - untrained_best.mean() > 0.4


def test_meta_model_holds_the_same_weights(shapes_model, shapes_image):
    ours, meta = shapes_model
    image, masks = shapes_image
    a, b = SamPredictor(ours), MetaPredictor(meta)
    a.set_image(image)
    b.set_image(image)
    point = interior_point(masks[0])
    masks_a, scores_a, _ = a.predict(point, np.array([1]))
    masks_b, scores_b, _ = b.predict(point, np.array([1]))
    assert (masks_a == masks_b).mean() > 0.999
    np.testing.assert_allclose(scores_a, scores_b, atol=1e-3)


def test_automatic_masks_find_the_shapes(amg_records, shapes_image):
    plain, _ = amg_records
    _, masks = shapes_image
    segs = [r["segmentation"] for r in plain]
    distinct = [s for i, s in enumerate(segs) if all(iou(s, t) < 0.9 for t in segs[:i])]
    assert len(distinct) >= 3
    found = [max((iou(s, shape) for s in segs), default=0.0) for shape in masks]
    assert sum(f > 0.7 for f in found) >= 3, np.round(found, 2)


def test_small_region_cleanup_changes_masks(amg_records):
    plain, cleaned = amg_records
    before = {r["segmentation"].tobytes() for r in plain}
    assert any(r["segmentation"].tobytes() not in before for r in cleaned)
    for r in cleaned:  # after cleanup no island and no hole is under 100 pixels
        for region in (r["segmentation"], ~r["segmentation"]):
            n, _, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
            assert n <= 2 or stats[1:, cv2.CC_STAT_AREA].min() >= 100
