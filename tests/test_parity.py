"""Parity with Meta's segment-anything 1.0 on shared random weights (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor as MetaPredictor

from samkit import SamPredictor

from .conftest import model_pair


def rel_diff(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / a.norm())


def prompt_cases(h: int, w: int) -> dict[str, dict]:
    return {
        "point": dict(point_coords=np.array([[0.4 * w, 0.3 * h]]), point_labels=np.array([1])),
        "two_points": dict(
            point_coords=np.array([[0.4 * w, 0.3 * h], [0.7 * w, 0.8 * h]]), point_labels=np.array([1, 0])
        ),
        "box": dict(box=np.array([0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h])),
        "point_box": dict(
            point_coords=np.array([[0.3 * w, 0.5 * h]]),
            point_labels=np.array([0]),
            box=np.array([0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h]),
        ),
    }


def assert_same_prediction(a, b) -> None:
    masks_a, iou_a, low_a = a
    masks_b, iou_b, low_b = b
    assert masks_b.shape == masks_a.shape and masks_b.dtype == masks_a.dtype
    assert iou_b.dtype == np.float32 and low_b.dtype == np.float32
    assert (masks_a == masks_b).mean() >= 0.999
    np.testing.assert_allclose(iou_b, iou_a, atol=1e-3)
    assert rel_diff(low_a, low_b) < 1e-4


@pytest.fixture(scope="module")
def vit_b_predictors(photo):
    ours, meta = model_pair("vit_b", seed=11, scale=0.02)
    p_ours, p_meta = SamPredictor(ours), MetaPredictor(meta)
    p_ours.set_image(photo)
    p_meta.set_image(photo)
    return p_ours, p_meta


def test_state_dict_names_and_shapes_match_meta():
    ours, meta = model_pair("vit_b", seed=0)
    a, b = ours.state_dict(), meta.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


def test_vit_b_embedding(vit_b_predictors):
    ours, meta = vit_b_predictors
    assert ours.features.shape == (1, 256, 64, 64)
    assert rel_diff(meta.features, ours.features) < 1e-4


@pytest.mark.parametrize("case", ["point", "two_points", "box", "point_box"])
@pytest.mark.parametrize("multimask", [True, False])
def test_vit_b_prompts(vit_b_predictors, photo, case, multimask):
    ours, meta = vit_b_predictors
    kwargs = prompt_cases(*photo.shape[:2])[case]
    assert_same_prediction(
        meta.predict(**kwargs, multimask_output=multimask), ours.predict(**kwargs, multimask_output=multimask)
    )
    logits_a = meta.predict(**kwargs, multimask_output=multimask, return_logits=True)[0]
    logits_b = ours.predict(**kwargs, multimask_output=multimask, return_logits=True)[0]
    assert logits_b.dtype == np.float32
    assert rel_diff(logits_a, logits_b) < 1e-4


def test_vit_b_mask_input_refinement(vit_b_predictors, photo):
    ours, meta = vit_b_predictors
    kwargs = prompt_cases(*photo.shape[:2])["point"]
    _, scores, low = meta.predict(**kwargs)
    mask_input = low[np.argmax(scores)][None]
    follow = dict(
        point_coords=np.array([[200, 150], [300, 400]]), point_labels=np.array([1, 0]), mask_input=mask_input
    )
    assert_same_prediction(
        meta.predict(**follow, multimask_output=False), ours.predict(**follow, multimask_output=False)
    )


def test_vit_b_many_boxes_predict_torch(vit_b_predictors, photo):
    ours, meta = vit_b_predictors
    h, w = photo.shape[:2]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [w, h], size=(16, 2, 2))
    boxes = np.concatenate([xy.min(1), xy.max(1) + 5], axis=1)
    out = []
    for p in (meta, ours):
        tb = p.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), (h, w))
        out.append([t.numpy() for t in p.predict_torch(None, None, boxes=tb, multimask_output=False)])
    assert out[1][0].shape == (16, 1, h, w)
    assert_same_prediction(out[0], out[1])
    # predict_batch gives the same, from original-pixel boxes.
    masks, iou, low = ours.predict_batch([{"boxes": boxes}], multimask_output=False)[0]
    assert (masks == out[1][0]).all() and np.allclose(iou, out[1][1]) and np.allclose(low, out[1][2])


@pytest.mark.parametrize("seed", [5, 6])
def test_tiny_model_on_other_images(seed):
    """Parity on several images and sizes (portrait, landscape, tiny) with other random weights."""
    from skimage import data

    ours, meta = model_pair("vit_tiny", seed=seed)
    p_ours, p_meta = SamPredictor(ours), MetaPredictor(meta)
    images = [data.coffee(), data.chelsea()[:, :200], np.full((1, 1, 3), 200, np.uint8)]
    for image in images:
        p_ours.set_image(image)
        p_meta.set_image(image)
        assert rel_diff(p_meta.features, p_ours.features) < 1e-4
        for kwargs in prompt_cases(*image.shape[:2]).values():
            assert_same_prediction(p_meta.predict(**kwargs), p_ours.predict(**kwargs))


def test_sam_forward_matches_meta_and_is_differentiable(tiny_pair, photo):
    ours, meta = tiny_pair
    p = SamPredictor(ours)
    x = torch.from_numpy(np.array(p.transform.apply_image(photo))).permute(2, 0, 1).float()
    boxes = p.transform.apply_boxes_torch(
        torch.tensor([[10.0, 20, 300, 400], [100, 100, 200, 250]]), photo.shape[:2]
    )
    batch = [{"image": x, "original_size": photo.shape[:2], "boxes": boxes}]
    with torch.no_grad():
        ref = meta(batch, multimask_output=True)[0]
    got = ours(batch, multimask_output=True)[0]
    assert got["low_res_logits"].requires_grad
    assert (ref["masks"] == got["masks"]).float().mean() >= 0.999
    assert rel_diff(ref["low_res_logits"], got["low_res_logits"].detach()) < 1e-4
    (got["low_res_logits"].sum() + got["iou_predictions"].sum()).backward()
    # Boxes only and multimask: the point embeddings, the mask branch and mask token 0 are unused.
    unused = (
        "prompt_encoder.point_embeddings.0.",
        "prompt_encoder.point_embeddings.1.",
        "prompt_encoder.not_a_point_embed.",
        "prompt_encoder.mask_downscaling.",
        "mask_decoder.output_hypernetworks_mlps.0.",
    )
    no_grad = [n for n, p in ours.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad and all(n.startswith(unused) for n in no_grad), no_grad
    ours.zero_grad(set_to_none=True)
