"""AMG helpers against Meta's (same inputs, same outputs) and pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything.utils import amg as meta_amg

from samkit.utils import amg


def random_masks(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    blobs = torch.nn.functional.interpolate(
        torch.randn(n, 1, max(h // 8, 1), max(w // 8, 1), generator=g), (h, w)
    )
    masks = blobs[:, 0] > 0.6
    masks[0] = False  # an empty mask
    if n > 1:
        masks[1] = True  # a full one
    return masks


@pytest.mark.parametrize("n", [1, 2, 16, 32])
def test_point_grids(n):
    np.testing.assert_array_equal(amg.build_point_grid(n), meta_amg.build_point_grid(n))
    if n >= 4:
        for a, b in zip(
            amg.build_all_layer_point_grids(n, 2, 2), meta_amg.build_all_layer_point_grids(n, 2, 2)
        ):
            np.testing.assert_array_equal(a, b)
    else:  # Meta divides by zero here; samkit says what is wrong
        with pytest.raises(ValueError, match="at least 1 point per side"):
            amg.build_all_layer_point_grids(n, 2, 2)


@pytest.mark.parametrize("size", [(480, 640), (1000, 333), (5, 7), (1500, 1500)])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_crop_boxes(size, layers):
    assert amg.generate_crop_boxes(size, layers, 512 / 1500) == meta_amg.generate_crop_boxes(
        size, layers, 512 / 1500
    )


@pytest.mark.parametrize("shape", [(6, 37, 53), (3, 1, 1), (4, 64, 8)])
def test_masks_boxes_and_rle_match_meta(shape):
    masks = random_masks(*shape)
    torch.testing.assert_close(amg.batched_mask_to_box(masks), meta_amg.batched_mask_to_box(masks))
    ours = amg.mask_to_rle(masks)
    assert ours == meta_amg.mask_to_rle_pytorch(masks)
    for rle, mask in zip(ours, masks.numpy()):
        assert np.array_equal(amg.rle_to_mask(rle), mask)
        assert amg.area_from_rle(rle) == mask.sum()
        coco = amg.coco_encode_rle(rle)
        assert coco == meta_amg.coco_encode_rle(rle)
        assert isinstance(coco["counts"], str)
        assert np.array_equal(mask_utils.decode(coco).astype(bool), mask)
        assert mask_utils.area(coco) == mask.sum()


def test_mask_to_rle_of_an_empty_batch():
    assert amg.mask_to_rle(torch.zeros(0, 4, 5, dtype=torch.bool)) == []
    assert amg.batched_mask_to_box(torch.zeros(0, 4, 5, dtype=torch.bool)).shape == (0, 4)


def test_stability_and_edges_match_meta():
    logits = torch.randn(5, 40, 50) * 4
    torch.testing.assert_close(
        amg.calculate_stability_score(logits, 0.0, 1.0), meta_amg.calculate_stability_score(logits, 0.0, 1.0)
    )
    boxes = torch.tensor([[0, 0, 30, 30], [15, 5, 99, 40], [200, 10, 230, 479], [40, 40, 60, 60]])
    for crop in ([0, 0, 640, 480], [100, 0, 400, 480], [20, 30, 300, 200]):
        assert torch.equal(
            amg.is_box_near_crop_edge(boxes, crop, [0, 0, 640, 480]),
            meta_amg.is_box_near_crop_edge(boxes, crop, [0, 0, 640, 480]),
        )
        masks = random_masks(3, crop[3] - crop[1], crop[2] - crop[0])
        assert torch.equal(
            amg.uncrop_masks(masks, crop, 480, 640), meta_amg.uncrop_masks(masks, crop, 480, 640)
        )


@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("area", [0, 10, 60, 10_000])
def test_remove_small_regions_matches_meta(mode, area):
    mask = random_masks(3, 60, 80, seed=4)[2].numpy()
    mask[10:20, 10:20] = True
    mask[13:15, 13:15] = False  # a small hole
    ours, changed = amg.remove_small_regions(mask, area, mode)
    ref, ref_changed = meta_amg.remove_small_regions(mask, area, mode)
    assert changed == ref_changed and np.array_equal(ours, ref)
