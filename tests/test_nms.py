"""samkit.utils.nms against torchvision.ops: the same indices in the same order."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision.ops as tv

from samkit.utils import nms


def random_boxes(n: int, seed: int, grid: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes that overlap a lot; ``grid``: integer corners and scores from a few values, as AMG gives
    (pixel boxes, tied scores, duplicates and empty boxes)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(n, generator=g)
    if grid:
        boxes = boxes.round()
        boxes[1::7] = boxes[::7][: len(boxes[1::7])]  # duplicates
        boxes[::11, 2:] = boxes[::11, :2]  # empty boxes (0 / 0 IoU)
        scores = (scores * 4).floor() / 4  # ties
    return boxes, scores


@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("n", [0, 1, 2, 50, 999, 1001, 3000])
def test_nms_and_batched_nms_equal_torchvision(n, grid):
    boxes, scores = random_boxes(n, seed=n, grid=grid)
    for threshold in (0.0, 0.3, 0.7, 1.0):
        assert torch.equal(nms.nms(boxes, scores, threshold), tv.nms(boxes, scores, threshold))
        zeros = torch.zeros(n, dtype=torch.long)
        assert torch.equal(
            nms.batched_nms(boxes, scores, zeros, threshold), tv.batched_nms(boxes, scores, zeros, threshold)
        )
        classes = torch.arange(n) % 3  # offset coordinates up to 1000 boxes, one NMS per class above
        assert torch.equal(
            nms.batched_nms(boxes, scores, classes, threshold),
            tv.batched_nms(boxes, scores, classes, threshold),
        )
    assert torch.equal(nms.box_area(boxes), tv.box_area(boxes))


def test_a_threshold_float32_rounds_up_is_compared_in_double():
    """IoU exactly float32(0.1) (which is above 0.1): suppressed, as torchvision compares in double."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 1.0, 10.0]])  # IoU 10 / 100
    scores = torch.tensor([0.9, 0.8])
    for threshold in (0.1, float(torch.tensor(0.1)), 0.09):
        assert torch.equal(nms.nms(boxes, scores, threshold), tv.nms(boxes, scores, threshold)), threshold


def test_automatic_mask_generation_imports_neither_torchvision_nor_dynamo():
    """``import torchvision.ops`` imports torch._dynamo: ~2 s of every AMG process's start."""
    code = "import sys, samkit.amg; print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
