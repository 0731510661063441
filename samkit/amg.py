"""Automatic mask generation: prompt SAM with a grid of points, keep the good masks, remove duplicates.

Same constructor, defaults and records as Meta's ``SamAutomaticMaskGenerator``. It gives the same
masks, faster: candidates are filtered by predicted IoU before any upsampling, and the survivors are
upsampled straight to the crop's size (no 1024x1024 intermediate), in bounded chunks, on the model's
device; masks are run-length encoded a chunk at a time. Stability scores and masks come from
``UpscaledThresholds``: full-resolution logits are computed only near the masks' edges.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .fast.decoder import decode_above_iou
from .maskgen.grids import OUTPUT_MODES, generator_point_grids, image_crop_boxes  # noqa: F401
from .modeling import Sam
from .predictor import SamPredictor
from .utils.amg import (
    MaskData,
    UpscaledThresholds,
    area_from_rle,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    coco_encode_rle,
    is_box_near_crop_edge,
    mask_to_rle,
    remove_small_regions,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from .utils.image import to_rgb_uint8
from .utils.nms import batched_nms, box_area

# Full-resolution pixels (masks x H x W) handled at once: bounds memory for big images and crops.
_PIXELS_PER_CHUNK = 32 * 1024 * 1024


class SamAutomaticMaskGenerator:
    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        """Generate masks for a whole image.

        points_per_side: grid points per image side (``points_per_side**2`` prompts; the grid of crop
        layer i has ``points_per_side / crop_n_points_downscale_factor**i`` per side). Exactly one of
        it and ``point_grids`` (a list of Nx2 grids in [0, 1], one per crop layer) must be given.
        points_per_batch: prompts decoded together. pred_iou_thresh / stability_score_thresh: keep
        masks whose predicted IoU is above / stability score at least this (0 disables).
        stability_score_offset: logit offset of the stability score. box_nms_thresh /
        crop_nms_thresh: IoU thresholds of NMS within a crop / across crops. crop_n_layers: extra
        layers of 2^i x 2^i overlapping crops; crop_overlap_ratio: their overlap as a fraction of
        the image's short side (at layer 1). min_mask_region_area: fill holes and drop islands
        smaller than this many pixels (needs OpenCV). output_mode: "binary_mask" (HxW bool),
        "uncompressed_rle" or "coco_rle" (needs pycocotools).
        """
        self.point_grids = generator_point_grids(
            points_per_side, point_grids, crop_n_layers, crop_n_points_downscale_factor, output_mode
        )
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be at least 1, got {points_per_batch}")
        if min_mask_region_area > 0:
            import cv2  # noqa: F401  (fail now, with the missing package's name)
        self.predictor = SamPredictor(model)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for an HxWx3 uint8 RGB image (other layouts converted as by ``SamPredictor.set_image``).

        Returns one record per mask: ``segmentation`` (per output_mode), ``area`` (pixels), ``bbox``
        (XYWH), ``predicted_iou``, ``point_coords`` ([[x, y]] of the prompt), ``stability_score`` and
        ``crop_box`` (XYWH).
        """
        image = to_rgb_uint8(image)
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            data = self.postprocess_small_regions(
                data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh)
            )
        if self.output_mode == "coco_rle":
            segmentations = [coco_encode_rle(rle) for rle in data["rles"]]
        elif self.output_mode == "binary_mask":
            segmentations = [rle_to_mask(rle) for rle in data["rles"]]
        else:
            segmentations = data["rles"]
        boxes = box_xyxy_to_xywh(data["boxes"]).tolist()
        crop_boxes = box_xyxy_to_xywh(data["crop_boxes"]).tolist()
        points = data["points"].tolist()
        ious, stabilities = data["iou_preds"].tolist(), data["stability_score"].tolist()
        return [
            {
                "segmentation": segmentations[i],
                "area": area_from_rle(rle),
                "bbox": boxes[i],
                "predicted_iou": ious[i],
                "point_coords": [points[i]],
                "stability_score": stabilities[i],
                "crop_box": crop_boxes[i],
            }
            for i, rle in enumerate(data["rles"])
        ]

    # ------------------------------------------------------------------ pipeline
    def _generate_masks(self, image: np.ndarray) -> MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = image_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        data = _cat(
            [self._process_crop(image, box, layer, orig_size) for box, layer in zip(crop_boxes, layer_idxs)]
        )
        if len(crop_boxes) > 1 and len(data["rles"]):
            # Across crops prefer the mask from the smaller crop (finer detail).
            scores = 1 / box_area(data["crop_boxes"].float())
            data.filter(
                batched_nms(data["boxes"].float(), scores, torch.zeros_like(scores), self.crop_nms_thresh)
            )
        return data

    def _process_crop(
        self, image: np.ndarray, crop_box: list[int], layer: int, orig_size: tuple[int, int]
    ) -> MaskData:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_size = crop.shape[:2]
        self.predictor.set_image(crop)
        points_for_crop = self.point_grids[layer] * np.array(crop_size)[None, ::-1]
        batches = [
            self._process_batch(
                points_for_crop[i : i + self.points_per_batch], crop_size, crop_box, orig_size
            )
            for i in range(0, len(points_for_crop), self.points_per_batch)
        ]
        self.predictor.reset_image()
        data = _cat(batches)
        if len(data["rles"]):
            data.filter(
                batched_nms(
                    data["boxes"].float(),
                    data["iou_preds"],
                    torch.zeros_like(data["iou_preds"]),
                    self.box_nms_thresh,
                )
            )
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box] * len(data["rles"]), dtype=torch.long).reshape(-1, 4)
        return data

    def _process_batch(
        self, points: np.ndarray, crop_size: tuple[int, int], crop_box: list[int], orig_size: tuple[int, int]
    ) -> MaskData:
        predictor, model = self.predictor, self.predictor.model
        orig_h, orig_w = orig_size
        dev = predictor.device
        coords = torch.as_tensor(
            predictor.transform.apply_coords(points, crop_size), dtype=torch.float, device=dev
        )
        labels = torch.ones(len(points), 1, dtype=torch.int, device=dev)
        sparse, dense = model.prompt_encoder((coords[:, None, :], labels), None, None)
        decoder_args = (predictor.features, predictor.dense_pe(), sparse, dense, True)
        if self.pred_iou_thresh > 0.0:
            # Predicted IoU needs no pixels: the decoder computes masks only for the candidates above
            # the threshold (and upsampling below touches nothing else).
            low_res, iou, flat = decode_above_iou(
                model.mask_decoder, *decoder_args, self.pred_iou_thresh, session=predictor.decoder_session
            )
            point_idx = flat // model.mask_decoder.num_multimask_outputs
            low_res, iou = low_res.float(), iou.float()
        else:
            low_res, iou = model.mask_decoder(*decoder_args)
            n_out = low_res.shape[1]
            low_res, iou = low_res.flatten(0, 1).float(), iou.flatten(0, 1).float()
            point_idx = torch.arange(len(points), device=dev).repeat_interleave(n_out)

        threshold = model.mask_threshold
        frame = model.image_encoder.img_size
        h, w = crop_size
        chunk = max(1, _PIXELS_PER_CHUNK // (h * w))
        out: dict[str, list] = {
            "rles": [],
            "boxes": [],
            "iou_preds": [],
            "stability_score": [],
            "point_idx": [],
        }
        offset = self.stability_score_offset
        for s in range(0, len(iou), chunk):
            # Pixels above threshold+offset (strict), threshold-offset (loose) and threshold (the
            # mask), full-resolution logits computed only near the masks' edges.
            upscaled = UpscaledThresholds(
                low_res[s : s + chunk],
                frame,
                predictor.input_size,
                crop_size,
                (threshold + offset, threshold - offset, threshold),
            )
            stability = upscaled.counts[:, 0] / upscaled.counts[:, 1]
            c_iou, c_idx = iou[s : s + chunk], point_idx[s : s + chunk]
            if self.stability_score_thresh > 0.0:
                keep = (stability >= self.stability_score_thresh).nonzero().flatten()
                stability, c_iou, c_idx = stability[keep], c_iou[keep], c_idx[keep]
            else:
                keep = torch.arange(len(stability), device=stability.device)
            masks = upscaled.masks(keep, 2)
            del upscaled
            boxes = batched_mask_to_box(masks)
            keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
            masks, boxes, stability, c_iou, c_idx = (
                masks[keep],
                boxes[keep],
                stability[keep],
                c_iou[keep],
                c_idx[keep],
            )
            # Padded to the full image a crop's masks grow with H x W: encode a few at a time.
            step = max(1, _PIXELS_PER_CHUNK // (orig_h * orig_w))
            for t in range(0, len(masks), step):
                out["rles"] += mask_to_rle(uncrop_masks(masks[t : t + step], crop_box, orig_h, orig_w))
            out["boxes"].append(boxes.cpu())
            out["iou_preds"].append(c_iou.cpu())
            out["stability_score"].append(stability.cpu())
            out["point_idx"].append(c_idx.cpu())
        point_idx = torch.cat(out.pop("point_idx")) if out["boxes"] else torch.zeros(0, dtype=torch.long)
        return MaskData(
            rles=out["rles"],
            boxes=torch.cat(out["boxes"]) if out["boxes"] else torch.zeros(0, 4, dtype=torch.long),
            iou_preds=torch.cat(out["iou_preds"]) if out["iou_preds"] else torch.zeros(0),
            stability_score=torch.cat(out["stability_score"]) if out["stability_score"] else torch.zeros(0),
            points=torch.as_tensor(points, dtype=torch.float64)[point_idx].reshape(-1, 2),
        )

    @staticmethod
    def postprocess_small_regions(mask_data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
        """Fill holes and drop islands smaller than ``min_area`` pixels in each mask of ``mask_data``.

        ``mask_data`` holds ``rles`` (uncompressed RLEs), ``boxes`` (Nx4 XYXY) and any other per-mask
        values. Masks are compared again by NMS at ``nms_thresh`` on their new boxes, preferring masks
        that did not change; the survivors' RLEs and boxes are updated. Edits ``mask_data`` in place
        and returns it, as Meta's does. Needs OpenCV.
        """
        if len(mask_data["rles"]) == 0:
            return mask_data
        # One full-resolution mask at a time: what is kept per mask is its box and, if cleaned, its RLE.
        boxes_list, unchanged, cleaned = [], [], {}
        for i, rle in enumerate(mask_data["rles"]):
            mask = rle_to_mask(rle)
            mask, changed_holes = remove_small_regions(mask, min_area, "holes")
            mask, changed_islands = remove_small_regions(mask, min_area, "islands")
            tensor = torch.from_numpy(np.ascontiguousarray(mask))[None]
            boxes_list.append(batched_mask_to_box(tensor)[0])
            unchanged.append(not (changed_holes or changed_islands))
            if not unchanged[-1]:
                cleaned[i] = mask_to_rle(tensor)[0]
        boxes = torch.stack(boxes_list)
        scores = torch.tensor(unchanged, dtype=torch.float)
        keep = batched_nms(boxes.float(), scores, torch.zeros_like(scores), nms_thresh)
        for i in (int(i) for i in keep):
            if not unchanged[i]:
                mask_data["rles"][i] = cleaned[i]
                mask_data["boxes"][i] = boxes[i]
        mask_data.filter(keep)
        return mask_data


def _cat(parts: list[MaskData]) -> MaskData:
    """The records of ``parts`` one after the other (without MaskData.cat's copies)."""
    out = {}
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        out[key] = [v for vs in values for v in vs] if isinstance(first, list) else torch.cat(values)
    return MaskData(**out)
