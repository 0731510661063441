"""The interactive point evaluation protocol (``eval_prompt: point``): deterministic simulated clicks.

For each valid object: the first click is the interior point of the ground truth farthest from its
boundary (Euclidean distance transform; the frame's edge counts as boundary); each next click is the
most interior point of the largest error region (connected, 4-neighbour) between the prediction
(logits > 0) and the ground truth, positive in a false negative region, negative in a false positive
one. Clicks accumulate, the previous logits are fed back as the mask input (the 3 masks of the first
click: the one with the highest predicted IoU), up to 20 clicks. Clicks and IoUs are computed at the
padded SxS input frame; after the 10th click an object that has reached IoU 0.90 is no longer
clicked (nothing reported depends on its later clicks). Ties go to the first pixel in raster
order, so a checkpoint always gets the same numbers.

Reported (means over objects, x100 for IoU): ``miou_{1024,original}_click{1,3,5,10}`` (and Dice),
``miou_{1024,original}_click1_oracle`` (the best of the first click's 3 masks by true IoU; the
``_click1`` numbers use the mask of highest predicted IoU), ``noc85`` / ``noc90`` (clicks until the
IoU at the input frame reaches 0.85 / 0.90; 20 when never).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..metrics import MiouAccumulator, mask_iou
from .base import PromptMode, TrainBatch, score_objects
from .point import Click, decode_clicks

MAX_CLICKS = 20
REPORTED_CLICKS = (1, 3, 5, 10)
NOC_THRESHOLDS = (85, 90)


def interior_point(region: np.ndarray) -> Optional[tuple[int, int]]:
    """(x, y) of the pixel of an HxW bool mask farthest from its boundary (and the frame's edge);
    the first in raster order among equals; None for an empty mask."""
    from scipy import ndimage

    rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
    if rows.size == 0:
        return None
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(region[y0:y1, x0:x1], 1)  # outside the crop is outside the region
    dist = ndimage.distance_transform_edt(crop)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x0 + x), int(y0 + y)


def next_click(target: np.ndarray, pred: np.ndarray) -> Optional[Click]:
    """The correction click for HxW bool masks: the most interior point of the largest connected error
    region, label 1 in a false negative region, 0 in a false positive one; None without error.
    Equal areas: false negatives first, then the region met first in raster order.

    Worked on the bounding box of the errors: every error region, its area, its raster order and
    its most interior point are the same there as in the whole frame (which the labelling and the
    counts would otherwise sweep at 1024x1024 for an object a few hundred pixels wide, each click)."""
    from scipy import ndimage

    wrong = target != pred
    rows = np.flatnonzero(wrong.any(axis=1))
    if rows.size == 0:
        return None
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(wrong[y0:y1].any(axis=0))
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    target, pred = target[y0:y1, x0:x1], pred[y0:y1, x0:x1]
    best: Optional[tuple[int, np.ndarray, int]] = None
    for label, error in ((1, target & ~pred), (0, pred & ~target)):
        if not error.any():
            continue
        regions, count = ndimage.label(error)
        areas = np.bincount(regions.ravel(), minlength=count + 1)[1:]
        largest = int(np.argmax(areas))
        if best is None or areas[largest] > best[0]:
            best = (int(areas[largest]), regions == largest + 1, label)
    assert best is not None
    xy = interior_point(best[1])
    assert xy is not None
    return x0 + xy[0], y0 + xy[1], best[2]


@torch.no_grad()
def evaluate_batch(
    mode: PromptMode, batch: TrainBatch, embeddings: torch.Tensor, acc: MiouAccumulator
) -> None:
    """Run the interactive protocol on one batch's valid objects and add its metrics to ``acc``."""
    from ...utils.transforms import greater
    from ..losses import upsample_logits

    image_ids, slots = (t.tolist() for t in batch.valid.nonzero(as_tuple=True))
    objects = list(zip(image_ids, slots))
    if not objects:
        return
    targets = batch.targets.bool()
    targets_np = targets.cpu().numpy()
    size = targets.shape[-1]
    clicks: list[list[Click]] = []
    for target in targets_np:
        xy = interior_point(target)
        clicks.append([(xy[0], xy[1], 1)] if xy is not None else [])
    mask_input = None
    ious = np.zeros((len(objects), MAX_CLICKS))
    # The objects still clicked on: all of them up to the last reported click, then those that have
    # not reached the highest NoC threshold (the others' later clicks change no reported number).
    active = np.arange(len(objects))
    for count in range(1, MAX_CLICKS + 1):
        pred = decode_clicks(
            mode,
            embeddings,
            [objects[i] for i in active],
            [clicks[i] for i in active],
            [None] * len(active),
            mask_input,
            count == 1,
        )
        low_res = pred.low_res.float()
        rows = torch.arange(len(active), device=low_res.device)
        if count == 1:
            candidates = greater(upsample_logits(low_res.flatten(0, 1), size), 0.0).view(
                *low_res.shape[:2], size, size
            )
            true_iou = mask_iou(candidates, targets[:, None].expand_as(candidates))
            score_objects(acc, low_res[rows, true_iou.argmax(dim=1)], batch, key="_click1_oracle")
        logits = low_res[rows, pred.iou.argmax(dim=1)]
        masks = greater(upsample_logits(logits, size), 0.0)
        ious[active, count - 1] = (
            mask_iou(masks, targets[torch.from_numpy(active).to(targets.device)]).cpu().numpy()
        )
        if count in REPORTED_CLICKS:  # every object is still active here
            score_objects(acc, logits, batch, key=f"_click{count}")
        keep = np.ones(len(active), dtype=bool)
        if count >= max(REPORTED_CLICKS):
            keep = ~(ious[active, :count] >= max(NOC_THRESHOLDS) / 100).any(axis=1)
            if not keep.any():
                break
        if not keep.all():
            kept = torch.from_numpy(keep).to(logits.device)
            active, logits, masks = active[keep], logits[kept], masks[kept]
        mask_input = logits[:, None]
        masks_np = masks.cpu().numpy()
        for row, i in enumerate(active):
            click = next_click(targets_np[i], masks_np[row])
            if click is not None:
                clicks[i] = clicks[i] + [click]
    for threshold in NOC_THRESHOLDS:
        reached = ious >= threshold / 100
        noc = np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, MAX_CLICKS)
        acc.update_mean(f"noc{threshold}", torch.as_tensor(noc, dtype=torch.float64))


__all__ = [
    "MAX_CLICKS",
    "NOC_THRESHOLDS",
    "REPORTED_CLICKS",
    "evaluate_batch",
    "interior_point",
    "next_click",
]
