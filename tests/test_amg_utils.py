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


@pytest.mark.parametrize("shape", [(4, 30, 20), (2, 3, 17, 9)])
def test_mask_to_rle_pytorch_and_stability_of_any_leading_shape_match_meta(shape):
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3
    torch.testing.assert_close(
        amg.calculate_stability_score(logits, 0.5, 1.0), meta_amg.calculate_stability_score(logits, 0.5, 1.0)
    )
    masks = logits.flatten(0, -3) > 0
    assert amg.mask_to_rle_pytorch(masks) == meta_amg.mask_to_rle_pytorch(masks)


def test_box_and_point_helpers_match_meta():
    g = torch.Generator().manual_seed(2)
    boxes = torch.randint(0, 500, (6, 4), generator=g)
    boxes[:, 2:] += boxes[:, :2]
    for box in boxes:  # Meta's converts one box at a time (its indexing is along the first axis)
        assert torch.equal(amg.box_xyxy_to_xywh(box), meta_amg.box_xyxy_to_xywh(box))
    assert torch.equal(amg.box_xyxy_to_xywh(boxes), torch.stack([amg.box_xyxy_to_xywh(b) for b in boxes]))
    crop = [30, 40, 300, 200]
    points = torch.rand(5, 2, generator=g, dtype=torch.float64) * 100
    for t, ref in (
        (amg.uncrop_boxes_xyxy(boxes, crop), meta_amg.uncrop_boxes_xyxy(boxes, crop)),
        (amg.uncrop_boxes_xyxy(boxes[None], crop), meta_amg.uncrop_boxes_xyxy(boxes[None], crop)),
        (amg.uncrop_points(points, crop), meta_amg.uncrop_points(points, crop)),
        (amg.uncrop_points(points[None], crop), meta_amg.uncrop_points(points[None], crop)),
    ):
        torch.testing.assert_close(t, ref)


@pytest.mark.parametrize("n, batch", [(10, 3), (9, 3), (0, 4), (5, 8)])
def test_batch_iterator_matches_meta(n, batch):
    a, b = np.arange(n), list(range(100, 100 + n))
    ours, ref = list(amg.batch_iterator(batch, a, b)), list(meta_amg.batch_iterator(batch, a, b))
    assert len(ours) == len(ref)
    for x, y in zip(ours, ref):
        assert np.array_equal(x[0], y[0]) and x[1] == y[1]
    with pytest.raises(ValueError, match="same length"):
        next(amg.batch_iterator(2, a, b + [1]))


def mask_data_pair(seed: int = 0):
    """The same records (a list, tensors and an array) as a samkit and a Meta MaskData."""
    g = torch.Generator().manual_seed(seed)
    masks = random_masks(6, 20, 30, seed=seed)
    values = dict(
        rles=amg.mask_to_rle(masks),
        boxes=amg.batched_mask_to_box(masks),
        iou_preds=torch.rand(6, generator=g),
        points=np.arange(12.0).reshape(6, 2),
    )
    return amg.MaskData(**values), meta_amg.MaskData(**values)


def assert_same_mask_data(ours, ref) -> None:
    assert [k for k, _ in ours.items()] == [k for k, _ in ref.items()]
    for key, value in ref.items():
        got = ours[key]
        assert type(got) is type(value)
        if isinstance(value, torch.Tensor):
            assert torch.equal(got, value)
        elif isinstance(value, np.ndarray):
            assert np.array_equal(got, value)
        else:
            assert got == value


def test_mask_data_filter_cat_and_to_numpy_match_meta():
    for keep in (torch.tensor([True, False, True, True, False, False]), torch.tensor([4, 0, 2])):
        ours, ref = mask_data_pair()
        ours.filter(keep)
        ref.filter(keep)
        assert_same_mask_data(ours, ref)
    ours, ref = mask_data_pair()
    more_ours, more_ref = mask_data_pair(seed=1)
    more_ours["extra"] = torch.ones(6)
    more_ref["extra"] = torch.ones(6)
    ours.cat(more_ours)
    ref.cat(more_ref)
    assert_same_mask_data(ours, ref)
    more_ours["rles"][0]["counts"].append(1)  # cat copied the lists: no shared records
    assert ours["rles"][6] == ref["rles"][6]
    ours.to_numpy()
    ref.to_numpy()
    assert_same_mask_data(ours, ref)
    del ours["extra"]
    assert "extra" not in dict(ours.items())
    with pytest.raises(TypeError, match="lists, numpy arrays or tensors"):
        amg.MaskData(boxes=3)
    with pytest.raises(TypeError, match="lists, numpy arrays or tensors"):
        ours["score"] = 0.5


@pytest.mark.parametrize(
    "low, input_size, crop_size, sharpness",
    [
        (64, (171, 256), (100, 150), 1.0),  # vit_tiny-like frame, wide photo
        (64, (256, 200), (256, 200), 30.0),  # tall, no resize after the crop
        (256, (683, 1024), (400, 600), 8.0),  # vit_b on the coffee photo
        (256, (1024, 1024), (37, 1500), 0.3),  # a strip: the columns upsampled, the rows shrunk
    ],
)
@pytest.mark.parametrize("offset", [1.0, 0.0])
def test_upscaled_thresholds_equal_full_upscaling(low, input_size, crop_size, sharpness, offset):
    """Counts and masks from the edge-only computation equal those of upscale_masks's logits."""
    from samkit.utils.transforms import upscale_masks

    frame = low * 4 if low == 64 else 1024
    g = torch.Generator().manual_seed(low + crop_size[1])
    coarse = torch.randn(6, 1, low // 8, low // 8, generator=g)
    logits = torch.nn.functional.interpolate(coarse, (low, low), mode="bicubic")[:, 0] * sharpness
    logits[0] = -5.0  # empty everywhere
    logits[1] = 5.0  # full everywhere
    logits[2, :, : low // 2] = 0.0  # exactly at the mask threshold over a region
    thresholds = (offset, -offset, 0.0)
    full = upscale_masks(logits, frame, input_size, crop_size)
    up = amg.UpscaledThresholds(logits, frame, input_size, crop_size, thresholds)
    expected = torch.stack([(full > t).flatten(1).sum(-1, dtype=torch.int32) for t in thresholds], 1)
    assert torch.equal(up.counts, expected)
    assert up.counts.dtype == torch.int32
    for index in (torch.arange(6), torch.tensor([4, 1, 3]), torch.zeros(0, dtype=torch.long)):
        for t in range(3):
            assert torch.equal(up.masks(index, t), full[index] > thresholds[t])
