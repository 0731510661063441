"""Greedy non-maximum suppression on numpy boxes: the one NMS of both mask generators (the PyTorch
one through :mod:`samkit.utils.nms`, which keeps torchvision's names and tensors)."""

from __future__ import annotations

import numpy as np


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices (int64) of the Nx4 XYXY ``boxes`` kept by greedy NMS, highest score first (equal
    scores: lower index first): each kept box suppresses the later boxes whose IoU with it is above
    ``iou_threshold``. Computed in the boxes' dtype as torchvision does (float32 boxes: float32
    areas); two empty boxes have IoU NaN and do not suppress each other."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-np.asarray(scores), kind="stable")
    b = np.asarray(boxes)
    x1, y1, x2, y2 = (np.ascontiguousarray(b[order, k]) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    zero = b.dtype.type(0)
    alive = np.ones(len(order), dtype=bool)
    keep = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(len(order)):
            if not alive[i]:
                continue
            keep.append(order[i])
            rest = slice(i + 1, None)
            w = np.maximum(zero, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
            h = np.maximum(zero, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
            inter = w * h
            iou = inter / (areas[i] + areas[rest] - inter)
            alive[rest] &= ~(iou.astype(np.float64) > iou_threshold)
    return np.array(keep, dtype=np.int64)


__all__ = ["nms"]
