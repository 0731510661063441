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

# The torch-free helpers live in samkit.maskgen (samkit.onnx uses them too); Meta's names are here.
from ..maskgen.grids import (  # noqa: F401  (re-exported under Meta's names)
    build_all_layer_point_grids,
    build_point_grid,
    coco_encode_rle,
    generate_crop_boxes,
    rle_to_mask,
)
from ..maskgen.rle import area_from_rle, masks_to_rle  # noqa: F401  (area_from_rle: Meta's name)


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
    if flat.dtype == torch.bool:  # max over bytes: several times faster than any() here
        as_bytes = flat.view(torch.uint8)
        rows, cols = as_bytes.amax(dim=-1) > 0, as_bytes.amax(dim=-2) > 0  # N x H, N x W
    else:
        rows, cols = flat.any(dim=-1), flat.any(dim=-2)
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
    """BxHxW bool -> uncompressed RLEs (:func:`samkit.maskgen.rle.masks_to_rle` on the host)."""
    return masks_to_rle(masks.detach().cpu().numpy())


def mask_to_rle_pytorch(tensor: torch.Tensor) -> list[dict[str, Any]]:
    """Meta's name for :func:`mask_to_rle`: BxHxW bool -> uncompressed RLEs."""
    return mask_to_rle(tensor)


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


class UpscaledThresholds:
    """Low-res mask logits upscaled to a crop and compared with a few thresholds, computing only the
    full-resolution logits near a mask's edge.

    The upscaling is :func:`samkit.utils.transforms.upscale_masks`: rows resized with a few taps,
    then columns by a banded matrix, block by block of output columns. Every output logit is a
    convex combination (non-negative weights summing to 1) of the low-res logits in a small
    rectangle: its row's taps times the columns its block reads. Where the minimum and maximum of
    that rectangle lie on one side of every threshold (with a margin for rounding), the whole block
    of the row is decided; the other blocks are computed with ``upscale_masks``'s arithmetic (same
    operations in the same order). Memory: the decided flags, KxHx(blocks), and the edge blocks'
    bits; no KxHxW float tensor.

    ``counts`` (K x len(thresholds), int32): pixels above each threshold per mask, as
    ``(upscale_masks(...) > t).sum()`` counts them. ``masks(index, t)``: the bool masks
    ``upscale_masks(...)[index] > thresholds[t]``.
    """

    def __init__(
        self,
        low_res: torch.Tensor,
        frame_size: int,
        input_size: tuple[int, int],
        crop_size: tuple[int, int],
        thresholds: Sequence[float],
    ) -> None:
        from .transforms import _column_blocks, _resize_matrix, _sparse_resize

        x = low_res.float().contiguous()
        k, h, w = x.shape
        dev = x.device
        out_h, out_w = int(crop_size[0]), int(crop_size[1])
        ih, iw = _sparse_resize(h, frame_size, int(input_size[0]), out_h)
        cols_t = _resize_matrix(w, frame_size, int(input_size[1]), out_w).t().to(dev)
        self.blocks = _column_blocks(w, frame_size, int(input_size[1]), out_w)
        ih, iw = ih.to(dev), iw.to(dev)
        self.shape = (k, out_h, out_w)
        self.thresholds = [float(t) for t in thresholds]
        # Low-res min/max over tiles of 8 columns, then over the tiles that hold each block's columns.
        tile = 8
        pad = (-w) % tile
        padded = F.pad(x, (0, pad), mode="replicate") if pad else x
        tile_min, tile_max = torch.aminmax(padded.view(k, h, -1, tile), dim=-1)  # K x h x w/8
        spans = [(lo // tile, -(-hi // tile)) for _, _, lo, hi in self.blocks]
        n_tiles = max(b - a for a, b in spans)
        last = tile_min.shape[-1] - 1
        window = torch.tensor([[min(a + i, b - 1) for i in range(n_tiles)] for a, b in spans], device=dev)
        window = window.clamp(max=last).flatten()
        col_min = tile_min[:, :, window].view(k, h, len(spans), n_tiles).amin(-1)
        col_max = tile_max[:, :, window].view(k, h, len(spans), n_tiles).amax(-1)
        # Over each output row's taps: K x H x B bounds (taps of weight 0 only widen them).
        row_min = col_min[:, ih[:, 0]]
        row_max = col_max[:, ih[:, 0]]
        for t in range(1, ih.shape[1]):
            row_min = torch.minimum(row_min, col_min[:, ih[:, t]])
            row_max = torch.maximum(row_max, col_max[:, ih[:, t]])
        margin = 1e-4 * (1 + torch.maximum(row_min.abs(), row_max.abs()))
        row_min, row_max = row_min - margin, row_max + margin
        above = torch.stack([row_min > t for t in self.thresholds], dim=-1)  # K x H x B x T
        below = torch.stack([row_max <= t for t in self.thresholds], dim=-1)
        certain = (above | below).all(dim=-1)
        self.above = above & certain[..., None]
        widths = torch.tensor([c1 - c0 for c0, c1, _, _ in self.blocks], device=dev)
        counts = (self.above * widths[:, None]).sum((1, 2), dtype=torch.int64)  # K x T
        flat_x = x.view(k * h, w)
        self.uncertain: list[tuple[torch.Tensor, torch.Tensor]] = []  # per block: (mask*H + row, bits)
        for b, (c0, c1, lo, hi) in enumerate(self.blocks):
            idx = (~certain[:, :, b]).flatten().nonzero().flatten()
            mask_i, row = idx // out_h, idx % out_h
            base = mask_i * h
            # upscale_masks's rows (tap 0 times its weight, then each further tap added) ...
            seg = flat_x[base + ih[row, 0], lo:hi] * iw[row, 0, None]
            for t in range(1, ih.shape[1]):
                seg.addcmul_(flat_x[base + ih[row, t], lo:hi], iw[row, t, None])
            values = seg @ cols_t[lo:hi, c0:c1]  # ... and its columns
            bits = torch.stack([values > t for t in self.thresholds])  # T x U x (c1 - c0)
            counts.index_add_(0, mask_i, bits.sum(-1, dtype=torch.int64).t())
            self.uncertain.append((idx, bits))
        self.counts = counts.to(torch.int32)

    def masks(self, index: torch.Tensor, threshold: int) -> torch.Tensor:
        """The bool masks ``upscale_masks(...)[index] > thresholds[threshold]`` (index: K' mask indices)."""
        k, h, w = self.shape
        dev = self.above.device
        index = index.to(dev)
        out = torch.empty(len(index), h, w, dtype=torch.bool, device=dev)
        where = torch.full((k,), -1, dtype=torch.long, device=dev)
        where[index] = torch.arange(len(index), device=dev)
        decided = self.above[index, :, :, threshold]  # K' x H x B
        flat = out.view(-1, w)
        for b, ((c0, c1, _, _), (idx, bits)) in enumerate(zip(self.blocks, self.uncertain)):
            out[:, :, c0:c1] = decided[:, :, b, None]
            dest = where[idx // h]
            sel = dest >= 0
            flat[dest[sel] * h + idx[sel] % h, c0:c1] = bits[threshold][sel]
        return out
