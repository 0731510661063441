"""Greedy non-maximum suppression with torchvision's results, without importing torchvision.

``import torchvision.ops`` imports ``torch._dynamo`` (through its RoI ops): about 2 s of every
process that runs automatic mask generation on a 2-core CPU, for the one NMS call per crop. These
functions give ``torchvision.ops.nms`` / ``batched_nms``'s indices, in their order: the same float32
arithmetic per pair of boxes (the IoU as ``inter / (area_i + area_j - inter)``, compared in double
precision with the threshold), the same stable sort of the scores, and ``batched_nms``'s two
strategies (offset coordinates per class, or one NMS per class past 1000 boxes on the CPU, 5000 on
other devices, then sorted by score).
"""

from __future__ import annotations

import numpy as np
import torch

# Past this many box coordinates batched_nms runs one NMS per class (as torchvision does).
_PER_CLASS_NUMEL = {"cpu": 4000}
_PER_CLASS_NUMEL_OTHER = 20000


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of Nx4 XYXY boxes."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices (int64, on the boxes' device) of the Nx4 XYXY ``boxes`` kept by greedy NMS, highest
    score first (equal scores: lower index first): each kept box suppresses the later boxes whose
    IoU with it is above ``iou_threshold``."""
    device = boxes.device
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    order = torch.sort(scores, stable=True, descending=True)[1].cpu().numpy()
    b = boxes.detach().cpu().numpy()
    x1, y1, x2, y2 = (np.ascontiguousarray(b[order, k]) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    zero = b.dtype.type(0)
    alive = np.ones(len(order), dtype=bool)
    keep = []
    with np.errstate(
        divide="ignore", invalid="ignore"
    ):  # 0 / 0 for empty boxes: NaN, kept as torchvision does
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
    return torch.as_tensor(np.array(keep, dtype=np.int64), device=device)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each class (``idxs``: N class ids): the kept indices sorted by decreasing score."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    if boxes.numel() > _PER_CLASS_NUMEL.get(boxes.device.type, _PER_CLASS_NUMEL_OTHER):
        kept = torch.zeros_like(scores, dtype=torch.bool)
        for class_id in torch.unique(idxs):
            members = torch.where(idxs == class_id)[0]
            kept[members[nms(boxes[members], scores[members], iou_threshold)]] = True
        index = torch.where(kept)[0]
        return index[scores[index].sort(descending=True)[1]]
    # One NMS over boxes moved apart by class: boxes of different classes never overlap.
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


__all__ = ["batched_nms", "box_area", "nms"]
