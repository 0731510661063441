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
import contextlib
import os
import secrets
import sys
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import SamkitError
from .base import add_model_arguments, check_device, check_output_dir, checkpoint_or_none, run_standalone
from .prompt_args import Box, check_boxes, parse_box

AMP_LEVELS: tuple[str, ...] = ("O0", "O1", "O2")
DEFAULT_OUTPUT_DIR = "."


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


def result_paths(output_dir: str, image_path: str) -> tuple[str, str]:
    """The picture and the mask archive written for ``image_path``."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return os.path.join(output_dir, f"{stem}_infer.png"), os.path.join(output_dir, f"{stem}_masks.npz")


def save_results(
    picture_path: str,
    masks_path: str,
    image: np.ndarray,
    masks: np.ndarray,
    iou: np.ndarray,
    boxes: Sequence[Box],
) -> None:
    """Write the overlay picture and the ``.npz`` of masks KxHxW, iou K and boxes Kx4, each atomically."""
    from ..utils.visualize import Panel, save_figure

    boxes_array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    directory, name = os.path.split(os.path.abspath(masks_path))
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.part")
    try:
        # The archive waits under a temporary name until the picture is in place, so that a
        # failure leaves neither file new.
        with open(tmp, "xb") as f:
            np.savez_compressed(f, masks=masks.astype(bool), iou=iou.astype(np.float32), boxes=boxes_array)
        count = len(boxes_array)
        title = f"{count} box prompt{'s' if count != 1 else ''}"
        save_figure(picture_path, image, [Panel(masks, iou, boxes=boxes_array, title=title)])
        os.replace(tmp, masks_path)
    except BaseException:  # KeyboardInterrupt included: never leave a partial file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------------
# The command: box_inference.py


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of box inference: the seed's, each settable from the command line."""
    parser.add_argument(
        "--image-path", required=True, metavar="IMAGE", help="local image file (PNG, JPEG, ...)"
    )
    parser.add_argument(
        "--box",
        "--box-prompt",
        dest="box",
        action="append",
        required=True,
        metavar="X0,Y0,X1,Y1",
        help="a box prompt in pixels (top-left, bottom-right corners); repeat for several objects",
    )
    parser.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        metavar="DIR",
        help="where <image stem>_infer.png and <image stem>_masks.npz go (default: the current directory)",
    )
    add_model_arguments(parser)
    # None tells an explicit --dtype apart from the default, which --amp-level may replace.
    parser.set_defaults(dtype=None)
    parser.add_argument(
        "--amp-level",
        "--amp_level",
        dest="amp_level",
        choices=AMP_LEVELS,
        help="the seed's precision flag, instead of --dtype: O0 = float32; O1, O2 = bfloat16 on CPU, "
        "float16 on other devices",
    )
    # The seed's MindSpore execution mode (graph or eager) has no meaning here; accepted and hidden.
    parser.add_argument("--mode", type=int, help=argparse.SUPPRESS)


def amp_dtype(amp_level: str, device_type: str) -> str:
    """The dtype name an ``--amp-level`` means on a device type: O0 float32, else a 16-bit float."""
    if amp_level not in AMP_LEVELS:
        raise ValueError(f"unknown amp level {amp_level!r}; choose one of {', '.join(AMP_LEVELS)}")
    if amp_level == "O0":
        return "float32"
    # CPUs compute float16 slowly or not at all, bfloat16 well; accelerators take float16 as the seed did.
    return "bfloat16" if device_type == "cpu" else "float16"


def run(args: argparse.Namespace) -> int:
    """Predict one mask per box prompt on one image; save a picture and the masks."""
    import torch

    from ..build import build_model
    from ..predictor import SamPredictor
    from ..utils.download import download_checkpoint
    from ..utils.image import load_image

    # Everything a user can get wrong is checked before the model is built or a file is written.
    boxes = [parse_box(b) for b in args.box]
    device = check_device(args.device)
    if args.dtype is not None and args.amp_level is not None:
        raise SamkitError(
            f"--dtype {args.dtype} and --amp-level {args.amp_level} both set the precision; give one of them"
        )
    dtype_name = args.dtype or (amp_dtype(args.amp_level, device.type) if args.amp_level else "float32")
    image = load_image(args.image_path)
    check_boxes(boxes, image.shape[:2])
    checkpoint = checkpoint_or_none(args)
    output_dir = check_output_dir(args.output_dir)
    picture_path, masks_path = result_paths(output_dir, args.image_path)

    if checkpoint is None and args.download:
        checkpoint = download_checkpoint(args.model_type)
    model = build_model(args.model_type, checkpoint).to(device=device, dtype=getattr(torch, dtype_name))
    # Notes come after the last check that can fail, so that an error stays the only line on stderr.
    if checkpoint is None:
        print(
            f"warning: {args.model_type} runs with random weights: its masks are meaningless", file=sys.stderr
        )
    masks, iou = predict_boxes(SamPredictor(model), image, boxes)
    try:
        os.makedirs(output_dir, exist_ok=True)
        save_results(picture_path, masks_path, image, masks, iou, boxes)
    except OSError as err:
        raise SamkitError(f"cannot write results to {output_dir}: {err.strerror or err}") from None
    for box, score in zip(args.box, iou):
        print(f"box {box}: predicted IoU {score:.3f}")
    print(f"wrote {picture_path}")
    print(f"wrote {masks_path}")
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = "box_inference.py") -> int:
    """Run box inference as a script: exit status 0, or 2 with one ``error:`` line for a user mistake."""
    return run_standalone(add_arguments, run, argv, prog=prog, description=__doc__.split("\n\n")[0])


__all__ = [
    "AMP_LEVELS",
    "add_arguments",
    "amp_dtype",
    "main",
    "predict_boxes",
    "result_paths",
    "run",
    "save_results",
]
