"""Box-prompt inference on one image: one mask per box, saved as a picture and a ``.npz``.

The library side of the seed's ``box_inference.py`` (a thin script at the repository's root):

    python box_inference.py --image-path photo.jpg --box 425,600,700,875 --checkpoint sam_vit_b_01ec64.pth
    python box_inference.py --image-path photo.jpg --box 10,20,200,300 --box 220,40,400,380 --download

Every box is one prompt; all of them are decoded in one call with one mask each. The results go to
``<output-dir>/<image stem>_infer.png`` (the masks and boxes over the image) and
``<output-dir>/<image stem>_masks.npz`` with ``masks`` KxHxW bool at the image's own size, ``iou``
K (the model's IoU predictions) and ``boxes`` Kx4 (XYXY pixels, as given).

The seed's flags work too: ``--box-prompt`` for ``--box``, and ``--amp-level``/``--amp_level`` O0
(float32) or O1/O2 (bfloat16 on CPU, float16 on other devices) instead of ``--dtype``.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import numpy as np

from . import single_image as si
from .prompt_args import Box, check_boxes, parse_box
from .single_image import AMP_LEVELS, amp_dtype, result_paths


def predict_boxes(predictor: Any, image: np.ndarray, boxes: Sequence[Box]) -> tuple[np.ndarray, np.ndarray]:
    """Embed ``image`` (HxWx3 uint8 RGB) and predict one mask per XYXY pixel box, all in one decoder call.

    Returns masks KxHxW bool at the image's size and IoU predictions K float32.
    """
    import torch

    predictor.set_image(image)
    box_tensor = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), device=predictor.device)
    box_tensor = predictor.transform.apply_boxes_torch(box_tensor, image.shape[:2])
    masks, iou, _ = predictor.predict_torch(None, None, boxes=box_tensor, multimask_output=False)
    return masks[:, 0].cpu().numpy(), iou[:, 0].float().cpu().numpy()


# ---------------------------------------------------------------------------------------------------
# The command: box_inference.py


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of box inference: the seed's, each settable from the command line."""
    si.add_image_argument(parser)
    parser.add_argument(
        "--box",
        "--box-prompt",
        dest="box",
        action="append",
        required=True,
        metavar="X0,Y0,X1,Y1",
        help="a box prompt in pixels (top-left, bottom-right corners); repeat for several objects",
    )
    si.add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Predict one mask per box prompt on one image; save a picture and the masks."""
    from ..predictor import SamPredictor
    from ..utils.image import load_image

    # Everything a user can get wrong is checked before the model is built or a file is written.
    boxes = [parse_box(b) for b in args.box]
    device, dtype_name = si.resolve_precision(args)
    image = load_image(args.image_path)
    check_boxes(boxes, image.shape[:2])
    checkpoint, output_dir, paths = si.prepare_outputs(args)

    model = si.build_sam(args, checkpoint, device, dtype_name)
    masks, iou = predict_boxes(SamPredictor(model), image, boxes)
    boxes_array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    arrays = {"masks": masks.astype(bool), "iou": iou.astype(np.float32), "boxes": boxes_array}
    title = si.plural(len(boxes_array), "box prompt")
    draw = si.draw_panel(image, masks=masks, scores=iou, boxes=boxes_array, title=title)
    lines = [f"box {box}: predicted IoU {score:.3f}" for box, score in zip(args.box, iou)]
    si.write_results(output_dir, paths, arrays, draw, lines)
    return 0


main = si.main_for(add_arguments, run, __doc__, "box_inference.py")


__all__ = [
    "AMP_LEVELS",
    "add_arguments",
    "amp_dtype",
    "main",
    "predict_boxes",
    "result_paths",
    "run",
]
