"""Point-prompt inference on one image: masks from clicks, saved as a picture and a ``.npz``.

The library side of the seed's ``point_inference.py`` (a thin script at the repository's root):

    python point_inference.py --image-path slice.png --point 300,200 --point 120,340 --checkpoint sam.pth
    python point_inference.py --image-path photo.jpg --point 500,375 --point 1125,625,0 --one-object --download

Points are XY pixels of the image as stored on disk (any size: they are transformed to the model's
input frame, which the seed skipped), with label 1 (foreground, the default) or 0 (background).
By default each positive point is its own prompt (one mask each, as the seed's demo does) and the
negative points are added to every prompt; ``--one-object`` makes all the points clicks on one
object (one mask). A prompt of a single point predicts 3 masks and keeps the one with the highest
predicted IoU (the seed's ``output_best_mask``); a prompt of several points predicts one.

The results go to ``<output-dir>/<image stem>_infer.png`` (the masks and points over the image) and
``<output-dir>/<image stem>_masks.npz`` with ``masks`` KxHxW bool at the image's own size, ``iou`` K,
``points`` Px3 (x, y, label, as given) and ``point_object`` P (the mask each point prompted; -1 for
a negative point shared by every prompt).

The seed's flags work too: ``--image_path``, ``--points-prompt``/``--points_prompt`` with its list
form (``"[[868,622]]"``: a list of prompts, each a list of [x, y] or [x, y, label]; or a flat list of
points, one prompt each), ``--amp-level``/``--amp_level`` and ``--mode`` (ignored).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import secrets
import sys
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import PromptError, SamkitError
from .base import add_model_arguments, check_device, check_output_dir, checkpoint_or_none, run_standalone
from .box import AMP_LEVELS, amp_dtype, result_paths
from .prompt_args import Point, check_points, parse_point

Prompt = list[Point]


def parse_points_prompt(text: str) -> list[Prompt]:
    """The seed's list form: ``[[[x, y], ...], ...]`` (prompts of points) or ``[[x, y], ...]`` (one
    prompt per point); a point may carry a third value, its label (1 by default)."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise PromptError(
            f"--points-prompt {text!r}: not a list such as [[868,622]] or [[[10,20],[30,40,0]]]"
        ) from None
    if not isinstance(value, (list, tuple)) or not value:
        raise PromptError(f"--points-prompt {text!r}: expected a non-empty list of points or of prompts")
    if all(isinstance(v, (list, tuple)) and v and isinstance(v[0], (int, float)) for v in value):
        value = [[v] for v in value]  # a flat list of points: one prompt each
    prompts = []
    for prompt in value:
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise PromptError(f"--points-prompt {text!r}: every prompt must be a non-empty list of points")
        points = []
        for point in prompt:
            if not isinstance(point, (list, tuple)) or not all(isinstance(v, (int, float)) for v in point):
                raise PromptError(
                    f"--points-prompt {text!r}: {point!r} is not a point [x, y] or [x, y, label]"
                )
            points.append(parse_point(",".join(str(v) for v in point)))
        prompts.append(points)
    return prompts


def group_points(points: Sequence[Point], one_object: bool) -> list[Prompt]:
    """``--point`` values as prompts: all of them as one (``one_object``), or one prompt per positive
    point, each with every negative point. Raises PromptError when no prompt has a positive point."""
    positives = [p for p in points if p[2] == 1]
    negatives = [p for p in points if p[2] == 0]
    if not positives:
        raise PromptError("every point is a background point (label 0): give at least one foreground point")
    if one_object:
        return [list(points)]
    return [[p, *negatives] for p in positives]


def predict_points(
    predictor: Any, image: np.ndarray, prompts: Sequence[Prompt]
) -> tuple[np.ndarray, np.ndarray]:
    """Embed ``image`` (HxWx3 uint8 RGB) once and predict one mask per prompt (a list of (x, y, label)
    in the image's pixels). Returns masks KxHxW bool at the image's size and IoU predictions K float32."""
    predictor.set_image(image)
    masks, scores = [], []
    for prompt in prompts:
        coords = np.array([[x, y] for x, y, _ in prompt], dtype=np.float32)
        labels = np.array([label for _, _, label in prompt], dtype=np.int64)
        single = len(prompt) == 1
        candidates, iou, _ = predictor.predict(coords, labels, multimask_output=single)
        best = int(np.argmax(iou)) if single else 0
        masks.append(candidates[best])
        scores.append(float(iou[best]))
    return np.stack(masks).astype(bool), np.asarray(scores, dtype=np.float32)


def save_results(
    picture_path: str,
    masks_path: str,
    image: np.ndarray,
    masks: np.ndarray,
    iou: np.ndarray,
    prompts: Sequence[Prompt],
) -> None:
    """Write the overlay picture and the ``.npz`` (masks, iou, points, point_object), each atomically."""
    from ..utils.visualize import Panel, save_figure

    points, owners = [], []
    for k, prompt in enumerate(prompts):
        for point in prompt:
            shared = point[2] == 0 and len(prompts) > 1
            if shared and point in points:
                continue
            points.append(point)
            owners.append(-1 if shared else k)
    points_array = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    directory, name = os.path.split(os.path.abspath(masks_path))
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.part")
    try:
        # The archive waits under a temporary name until the picture is in place: a failure leaves
        # neither file new.
        with open(tmp, "xb") as f:
            np.savez_compressed(
                f, masks=masks.astype(bool), iou=iou.astype(np.float32), points=points_array,
                point_object=np.asarray(owners, dtype=np.int64),
            )  # fmt: skip
        count = len(prompts)
        title = f"{count} point prompt{'s' if count != 1 else ''}"
        panel = Panel(
            masks, iou, point_coords=points_array[:, :2], point_labels=points_array[:, 2], title=title
        )
        save_figure(picture_path, image, [panel])
        os.replace(tmp, masks_path)
    except BaseException:  # KeyboardInterrupt included: never leave a partial file behind
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------------
# The command: point_inference.py


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of point inference: the seed's, each settable from the command line."""
    parser.add_argument(
        "--image-path",
        "--image_path",
        dest="image_path",
        required=True,
        metavar="IMAGE",
        help="local image file",
    )
    parser.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="X,Y[,LABEL]",
        help="a click in the image's pixels, label 1 (foreground, default) or 0 (background); repeatable",
    )
    parser.add_argument(
        "--points-prompt",
        "--points_prompt",
        dest="points_prompt",
        metavar="LIST",
        help="the seed's form: [[x,y]] per prompt, e.g. '[[[868,622]],[[724,466],[700,400,0]]]'",
    )
    parser.add_argument(
        "--one-object",
        action="store_true",
        help="all --point clicks are on one object (one mask); default: one prompt per foreground point",
    )
    parser.add_argument(
        "--output-dir",
        default=".",
        metavar="DIR",
        help="where <image stem>_infer.png and <image stem>_masks.npz go (default: the current directory)",
    )
    add_model_arguments(parser)
    parser.set_defaults(dtype=None)  # None tells an explicit --dtype apart from --amp-level
    parser.add_argument(
        "--amp-level",
        "--amp_level",
        dest="amp_level",
        choices=AMP_LEVELS,
        help="the seed's precision flag, instead of --dtype: O0 = float32; O1, O2 = bfloat16 on CPU, "
        "float16 on other devices",
    )
    parser.add_argument("--mode", type=int, help=argparse.SUPPRESS)  # the seed's MindSpore mode: ignored


def run(args: argparse.Namespace) -> int:
    """Predict masks from point prompts on one image; save a picture and the masks."""
    import torch

    from ..build import build_model
    from ..predictor import SamPredictor
    from ..utils.download import download_checkpoint
    from ..utils.image import load_image

    # Everything a user can get wrong is checked before the model is built or a file is written.
    if not args.point and args.points_prompt is None:
        raise PromptError("give at least one --point X,Y[,LABEL] (or the seed's --points-prompt)")
    prompts = group_points([parse_point(p) for p in args.point], args.one_object) if args.point else []
    if args.points_prompt is not None:
        if args.one_object:
            raise PromptError("--one-object applies to --point; --points-prompt already groups its points")
        prompts += parse_points_prompt(args.points_prompt)
    device = check_device(args.device)
    if args.dtype is not None and args.amp_level is not None:
        raise SamkitError(
            f"--dtype {args.dtype} and --amp-level {args.amp_level} both set the precision; give one"
        )
    dtype_name = args.dtype or (amp_dtype(args.amp_level, device.type) if args.amp_level else "float32")
    image = load_image(args.image_path)
    for prompt in prompts:
        check_points(prompt, image.shape[:2])
    checkpoint = checkpoint_or_none(args)
    output_dir = check_output_dir(args.output_dir)
    picture_path, masks_path = result_paths(output_dir, args.image_path)

    if checkpoint is None and args.download:
        checkpoint = download_checkpoint(args.model_type)
    model = build_model(args.model_type, checkpoint).to(device=device, dtype=getattr(torch, dtype_name))
    if checkpoint is None:  # after the last check that can fail: an error stays the only line on stderr
        print(
            f"warning: {args.model_type} runs with random weights: its masks are meaningless", file=sys.stderr
        )
    masks, iou = predict_points(SamPredictor(model), image, prompts)
    try:
        os.makedirs(output_dir, exist_ok=True)
        save_results(picture_path, masks_path, image, masks, iou, prompts)
    except OSError as err:
        raise SamkitError(f"cannot write results to {output_dir}: {err.strerror or err}") from None
    for k, (prompt, score) in enumerate(zip(prompts, iou)):
        clicks = " ".join(f"{x:g},{y:g},{label}" for x, y, label in prompt)
        print(f"prompt {k} ({clicks}): predicted IoU {score:.3f}")
    print(f"wrote {picture_path}")
    print(f"wrote {masks_path}")
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = "point_inference.py") -> int:
    """Run point inference as a script: exit status 0, or 2 with one ``error:`` line for a user mistake."""
    return run_standalone(add_arguments, run, argv, prog=prog, description=__doc__.split("\n\n")[0])


__all__ = [
    "add_arguments",
    "group_points",
    "main",
    "parse_points_prompt",
    "predict_points",
    "run",
    "save_results",
]
