"""Automatic mask generation ('everything' mode) on ONNX Runtime with numpy only: SamAutomaticMaskGenerator's records.

The same pipeline as :class:`samkit.SamAutomaticMaskGenerator` (grid of point prompts per crop,
predicted-IoU and stability filters, crop-edge filter, NMS within and across crops), each point
decoded by ``decoder.onnx`` (Meta's interface: one prompt per call, masks at the crop's size).
``min_mask_region_area`` (OpenCV post-processing) is not supported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..maskgen.grids import (
    OUTPUT_MODES,
    build_point_grid,
    coco_encode_rle,
    generate_crop_boxes,
    generator_point_grids,
    image_crop_boxes,
    rle_to_mask,
)
from ..maskgen.nms import nms
from ..maskgen.rle import mask_to_rle
from .predictor import OnnxPredictor

# Earlier names of the shared helpers, kept for callers of samkit.onnx.amg.
point_grid = build_point_grid
crop_boxes = generate_crop_boxes


def mask_to_box(masks: np.ndarray) -> np.ndarray:
    """NxHxW bool -> Nx4 XYXY inclusive boxes (int64); empty masks give [0, 0, 0, 0]."""
    boxes = np.zeros((len(masks), 4), dtype=np.int64)
    for i, m in enumerate(masks):
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        if len(rows):
            boxes[i] = [cols[0], rows[0], cols[-1], rows[-1]]
    return boxes


class OnnxAutomaticMaskGenerator:
    """SamAutomaticMaskGenerator's arguments and records, on an :class:`OnnxPredictor`."""

    def __init__(
        self,
        predictor: OnnxPredictor,
        points_per_side: int | None = 32,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        output_mode: str = "binary_mask",
    ) -> None:
        self.point_grids = generator_point_grids(
            points_per_side, point_grids, crop_n_layers, crop_n_points_downscale_factor, output_mode
        )
        self.predictor = predictor
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.output_mode = output_mode

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Records for an HxWx3 uint8 RGB image: ``segmentation``, ``area``, ``bbox`` (XYWH),
        ``predicted_iou``, ``point_coords``, ``stability_score``, ``crop_box`` (XYWH)."""
        h, w = image.shape[:2]
        boxes_, layers = image_crop_boxes((h, w), self.crop_n_layers, self.crop_overlap_ratio)
        parts = [self._process_crop(image, box, layer, (h, w)) for box, layer in zip(boxes_, layers)]
        data = {
            k: [v for p in parts for v in p[k]]
            for k in ("masks", "boxes", "iou", "stability", "points", "crops")
        }
        if len(boxes_) > 1 and data["masks"]:
            crops = np.array(data["crops"], dtype=np.float64)
            scores = 1 / ((crops[:, 2] - crops[:, 0]) * (crops[:, 3] - crops[:, 1]))
            keep = nms(np.array(data["boxes"]), scores, self.crop_nms_thresh)
            data = {k: [v[i] for i in keep] for k, v in data.items()}
        records = []
        for mask, box, iou, stability, point, crop in zip(
            *(data[k] for k in ("masks", "boxes", "iou", "stability", "points", "crops"))
        ):
            rle = mask_to_rle(mask)
            if self.output_mode == "binary_mask":
                segmentation: Any = mask
            elif self.output_mode == "uncompressed_rle":
                segmentation = rle
            else:
                segmentation = coco_encode_rle(rle)
            records.append(
                {
                    "segmentation": segmentation,
                    "area": int(mask.sum()),
                    "bbox": [int(box[0]), int(box[1]), int(box[2] - box[0]), int(box[3] - box[1])],
                    "predicted_iou": float(iou),
                    "point_coords": [[float(point[0]), float(point[1])]],
                    "stability_score": float(stability),
                    "crop_box": [crop[0], crop[1], crop[2] - crop[0], crop[3] - crop[1]],
                }
            )
        return records

    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], layer: int, orig_size: tuple[int, int]
    ) -> dict[str, list]:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1]
        ch, cw = crop.shape[:2]
        predictor = self.predictor
        predictor.set_image(crop)
        points = self.point_grids[layer] * np.array([cw, ch])
        threshold, offset = predictor.mask_threshold, self.stability_score_offset
        out: dict[str, list] = {"masks": [], "boxes": [], "iou": [], "stability": [], "points": []}
        for point in points:
            inputs = predictor.decoder_inputs(0, point[None], np.array([1]), None, None)
            result = dict(zip(predictor.decoder_output_names, predictor.decoder.run(None, inputs)))
            logits, ious = result["masks"][0, 1:], result["iou_predictions"][0, 1:]
            for logit, iou in zip(logits, ious):
                if self.pred_iou_thresh > 0.0 and not iou > self.pred_iou_thresh:
                    continue
                strict = int((logit > threshold + offset).sum())
                loose = int((logit > threshold - offset).sum())
                stability = np.float32(strict) / np.float32(loose) if loose else np.float32("nan")
                if self.stability_score_thresh > 0.0 and not stability >= self.stability_score_thresh:
                    continue
                mask = logit > threshold
                box = mask_to_box(mask[None])[0]
                if self._near_crop_edge(box, crop_box, orig_size):
                    continue
                out["masks"].append(mask)
                out["boxes"].append(box)
                out["iou"].append(float(iou))
                out["stability"].append(float(stability))
                out["points"].append(point)
        predictor.reset_image()
        if out["masks"]:
            keep = nms(np.array(out["boxes"]), np.array(out["iou"], dtype=np.float32), self.box_nms_thresh)
            out = {k: [v[i] for i in keep] for k, v in out.items()}
        h, w = orig_size
        out["masks"] = [_uncrop(m, crop_box, h, w) for m in out["masks"]]
        out["boxes"] = [b + np.array([x0, y0, x0, y0]) for b in out["boxes"]]
        out["points"] = [p + np.array([x0, y0]) for p in out["points"]]
        out["crops"] = [list(crop_box)] * len(out["masks"])
        return out

    @staticmethod
    def _near_crop_edge(
        box: np.ndarray, crop_box: list[int], orig_size: tuple[int, int], atol: float = 20.0
    ) -> bool:
        crop = np.array(crop_box, dtype=np.float64)
        orig = np.array([0, 0, orig_size[1], orig_size[0]], dtype=np.float64)
        uncropped = box + crop[[0, 1, 0, 1]]
        near_crop = np.abs(uncropped - crop) <= atol
        near_image = np.abs(uncropped - orig) <= atol
        return bool((near_crop & ~near_image).any())


def _uncrop(mask: np.ndarray, crop_box: list[int], h: int, w: int) -> np.ndarray:
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, w, h):
        return mask
    full = np.zeros((h, w), dtype=bool)
    full[y0:y1, x0:x1] = mask
    return full


__all__ = [
    "OUTPUT_MODES",
    "OnnxAutomaticMaskGenerator",
    "crop_boxes",
    "mask_to_box",
    "mask_to_rle",
    "nms",
    "point_grid",
    "rle_to_mask",
]
