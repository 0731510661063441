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

import torch

from ..maskgen.nms import nms as numpy_nms

# Past this many box coordinates batched_nms runs one NMS per class (as torchvision does).
_PER_CLASS_NUMEL = {"cpu": 4000}
_PER_CLASS_NUMEL_OTHER = 20000


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of Nx4 XYXY boxes."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices (int64, on the boxes' device) of the Nx4 XYXY ``boxes`` kept by greedy NMS, highest
    score first (equal scores: lower index first); :func:`samkit.maskgen.nms.nms` on the host."""
    keep = numpy_nms(boxes.detach().cpu().numpy(), scores.detach().cpu().numpy(), iou_threshold)
    return torch.as_tensor(keep, device=boxes.device)


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
