"""Helpers of automatic mask generation: point grids, crops, stability scores, boxes, RLE and MaskData.

Every public name of Meta's ``segment_anything.utils.amg`` is here, with the same arguments and results.
Masks are BxHxW tensors; boxes are XYXY with inclusive pixel indices (x1 = last column of the mask);
RLEs are COCO's uncompressed form ``{"size": [H, W], "counts": [...]}`` over the column-major
(Fortran-order) pixel sequence, starting with a run of zeros.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any, ItemsView, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# The torch-free helpers live in amg_common (samkit.onnx uses them too); Meta's names are here.
from .amg_common import (  # noqa: F401  (re-exported under Meta's names)
    build_all_layer_point_grids,
    build_point_grid,
    coco_encode_rle,
    generate_crop_boxes,
    rle_to_mask,
)


class MaskData:
    """Per-mask records kept side by side: every value (list, numpy array or tensor) has one entry per
    mask along its first axis, so ``filter`` and ``cat`` act on all of them at once.

    Meta's ``MaskData``: item access by key, ``items()``, in-place ``filter``/``cat``, ``to_numpy()``.
    """

    def __init__(self, **kwargs: Any) -> None:
        for key, value in kwargs.items():
            _check_mask_data_value(key, value)
        self._stats: dict[str, Any] = dict(kwargs)

    def __setitem__(self, key: str, item: Any) -> None:
        _check_mask_data_value(key, item)
        self._stats[key] = item

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def items(self) -> ItemsView[str, Any]:
        return self._stats.items()

    def filter(self, keep: torch.Tensor) -> None:
        """Keep, in place, the masks ``keep`` selects: an N bool tensor or a tensor of indices (in that order)."""
        keep = torch.as_tensor(keep).detach().cpu()
        index = keep.nonzero().flatten() if keep.dtype == torch.bool else keep.flatten()
        for key, value in self._stats.items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                self._stats[key] = value[index.to(value.device)]
            elif isinstance(value, np.ndarray):
                self._stats[key] = value[index.numpy()]
            elif isinstance(value, list):
                self._stats[key] = [value[i] for i in index.tolist()]
            else:
                raise TypeError(f"MaskData key {key!r} has an unsupported type {type(value).__name__}")

    def cat(self, new_stats: MaskData) -> None:
        """Append ``new_stats``'s masks after these, in place (its values are copied, never shared)."""
        for key, value in new_stats.items():
            old = self._stats.get(key)
            if old is None:
                self._stats[key] = deepcopy(value)
            elif isinstance(value, torch.Tensor):
                self._stats[key] = torch.cat([old, value], dim=0)
            elif isinstance(value, np.ndarray):
                self._stats[key] = np.concatenate([old, value], axis=0)
            elif isinstance(value, list):
                self._stats[key] = old + deepcopy(value)
            else:
                raise TypeError(f"MaskData key {key!r} has an unsupported type {type(value).__name__}")

    def to_numpy(self) -> None:
        """Turn every tensor value into a numpy array (on the CPU), in place."""
        for key, value in self._stats.items():
            if isinstance(value, torch.Tensor):
                self._stats[key] = value.detach().cpu().numpy()


def _check_mask_data_value(key: str, value: Any) -> None:
    if not isinstance(value, (list, np.ndarray, torch.Tensor)):
        raise TypeError(
            f"MaskData values must be lists, numpy arrays or tensors; {key!r} is {type(value).__name__}"
        )


def batch_iterator(batch_size: int, *args: Sequence[Any]) -> Iterator[list[Any]]:
    """Yield ``[arg[i : i + batch_size] for arg in args]`` for i = 0, batch_size, ... (the last may be shorter).

    Every ``arg`` must have the same length.
    """
    if not args or any(len(a) != len(args[0]) for a in args):
        raise ValueError("batch_iterator needs one or more inputs, all of the same length")
    for start in range(0, len(args[0]), batch_size):
        yield [a[start : start + batch_size] for a in args]


def stability_score_from_counts(strict: torch.Tensor, loose: torch.Tensor) -> torch.Tensor:
    """IoU of the masks thresholded at threshold+offset (``strict`` pixel counts) and -offset (``loose``)."""
    return strict / loose


def calculate_stability_score(
    masks: torch.Tensor, mask_threshold: float, threshold_offset: float
) -> torch.Tensor:
    """Stability of ...xHxW logits (one score per mask): IoU of the masks at threshold +- offset."""
    strict = (masks > (mask_threshold + threshold_offset)).flatten(-2).sum(-1, dtype=torch.int32)
    loose = (masks > (mask_threshold - threshold_offset)).flatten(-2).sum(-1, dtype=torch.int32)
    return stability_score_from_counts(strict, loose)


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """...xHxW bool -> ...x4 XYXY inclusive boxes; empty masks give [0, 0, 0, 0]."""
    h, w = masks.shape[-2:]
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, device=masks.device, dtype=torch.long)
    flat = masks.reshape(-1, h, w)
    rows = flat.any(dim=-1)  # N x H
    cols = flat.any(dim=-2)  # N x W
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    top = torch.where(rows, ys, h).amin(-1)
    bottom = torch.where(rows, ys, -1).amax(-1)
    left = torch.where(cols, xs, w).amin(-1)
    right = torch.where(cols, xs, -1).amax(-1)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    empty = ~rows.any(-1)
    boxes = torch.where(empty[:, None], torch.zeros_like(boxes), boxes)
    return boxes.reshape(*masks.shape[:-2], 4)


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: list[int], orig_box: list[int], atol: float = 20.0
) -> torch.Tensor:
    """Boxes (in crop coordinates) within ``atol`` px of a crop edge that is not also an image edge."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = (boxes - crop).abs() <= atol
    near_image = (boxes - orig).abs() <= atol
    return (near_crop & ~near_image).any(dim=1)


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: list[int]) -> torch.Tensor:
    """...x4 XYXY boxes in a crop's pixels -> in the image's pixels."""
    x0, y0 = crop_box[:2]
    return boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device, dtype=boxes.dtype)


def uncrop_points(points: torch.Tensor, crop_box: list[int]) -> torch.Tensor:
    """...x2 XY points in a crop's pixels -> in the image's pixels."""
    x0, y0 = crop_box[:2]
    return points + torch.tensor([x0, y0], device=points.device, dtype=points.dtype)


def uncrop_masks(masks: torch.Tensor, crop_box: list[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Pad BxhxW crop masks with zeros to the full image."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    return F.pad(masks, (x0, orig_w - x1, y0, orig_h - y1), value=0)


def box_xyxy_to_xywh(box_xyxy: torch.Tensor) -> torch.Tensor:
    """...x4 XYXY -> XYWH (a new tensor)."""
    out = box_xyxy.clone()
    out[..., 2:] = box_xyxy[..., 2:] - box_xyxy[..., :2]
    return out


def mask_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """BxHxW bool -> uncompressed RLEs, computed for the whole batch at once (one host transfer)."""
    b, h, w = masks.shape
    if b == 0:
        return []
    seq = masks.transpose(1, 2).reshape(b, h * w)  # column-major pixel order
    # Run boundaries: positions where the value changes, plus both ends of each sequence.
    changes = (seq[:, 1:] != seq[:, :-1]).nonzero()
    mask_idx, pos = changes[:, 0].cpu().numpy(), changes[:, 1].cpu().numpy() + 1
    starts_with_one = seq[:, 0].cpu().numpy()
    splits = np.searchsorted(mask_idx, np.arange(1, b))
    out = []
    for i, bounds in enumerate(np.split(pos, splits)):
        edges = np.concatenate([[0], bounds, [h * w]])
        counts = np.diff(edges).tolist()
        if starts_with_one[i]:
            counts = [0] + counts
        out.append({"size": [h, w], "counts": counts})
    return out


def mask_to_rle_pytorch(tensor: torch.Tensor) -> list[dict[str, Any]]:
    """Meta's name for :func:`mask_to_rle`: BxHxW bool -> uncompressed RLEs."""
    return mask_to_rle(tensor)


def area_from_rle(rle: dict[str, Any]) -> int:
    """Foreground pixels of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than ``area_thresh``.

    Returns the new mask and whether it changed. If every island is small, the largest is kept.
    """
    import cv2

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    fill_holes = mode == "holes"
    working = (mask ^ fill_holes).astype(np.uint8)  # the regions to examine: holes or islands
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = np.flatnonzero(sizes < area_thresh) + 1
    if small.size == 0:
        return mask, False
    if fill_holes:
        keep_labels = np.concatenate([[0], small])  # the mask itself plus the small holes
    else:
        keep_labels = np.setdiff1d(np.arange(1, n_labels), small)
        if keep_labels.size == 0:
            keep_labels = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(labels, keep_labels), True
