"""Meta's module path ``segment_anything.automatic_mask_generator``: :class:`SamAutomaticMaskGenerator`
(defined in :mod:`samkit.amg`) and the names Meta's module imports, re-exported."""

from .amg import SamAutomaticMaskGenerator
from .modeling import Sam
from .predictor import SamPredictor
from .utils.amg import (
    MaskData,
    area_from_rle,
    batch_iterator,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    mask_to_rle_pytorch,
    remove_small_regions,
    rle_to_mask,
    uncrop_boxes_xyxy,
    uncrop_masks,
    uncrop_points,
)
from .utils.nms import batched_nms, box_area  # Meta's module has torchvision's (same indices)

__all__ = [
    "MaskData",
    "Sam",
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "area_from_rle",
    "batch_iterator",
    "batched_mask_to_box",
    "batched_nms",
    "box_area",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "calculate_stability_score",
    "coco_encode_rle",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_rle_pytorch",
    "remove_small_regions",
    "rle_to_mask",
    "uncrop_boxes_xyxy",
    "uncrop_masks",
    "uncrop_points",
]
