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
from typing import Any, Sequence

import numpy as np

from ..errors import PromptError
from . import single_image as si
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
            points.append(
                parse_point(",".join(str(v) for v in point), flag=f"--points-prompt {text!r}: point")
            )
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


def result_arrays(masks: np.ndarray, iou: np.ndarray, prompts: Sequence[Prompt]) -> dict[str, np.ndarray]:
    """What the ``.npz`` holds: masks, iou, points Px3 and point_object P (-1: a negative point shared
    by every prompt)."""
    points, owners = [], []
    for k, prompt in enumerate(prompts):
        for point in prompt:
            shared = point[2] == 0 and len(prompts) > 1
            if shared and point in points:
                continue
            points.append(point)
            owners.append(-1 if shared else k)
    return {
        "masks": masks.astype(bool),
        "iou": iou.astype(np.float32),
        "points": np.asarray(points, dtype=np.float32).reshape(-1, 3),
        "point_object": np.asarray(owners, dtype=np.int64),
    }


# ---------------------------------------------------------------------------------------------------
# The command: point_inference.py


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of point inference: the seed's, each settable from the command line."""
    si.add_image_argument(parser)
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
    si.add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Predict masks from point prompts on one image; save a picture and the masks."""
    from ..predictor import SamPredictor
    from ..utils.image import load_image

    # Everything a user can get wrong is checked before the model is built or a file is written.
    if not args.point and args.points_prompt is None:
        raise PromptError("give at least one --point X,Y[,LABEL] (or the seed's --points-prompt)")
    prompts = group_points([parse_point(p) for p in args.point], args.one_object) if args.point else []
    if args.points_prompt is not None:
        if args.one_object:
            raise PromptError("--one-object applies to --point; --points-prompt already groups its points")
        prompts += parse_points_prompt(args.points_prompt)
    device, dtype_name = si.resolve_precision(args)
    image = load_image(args.image_path)
    for prompt in prompts:
        check_points(prompt, image.shape[:2])
    checkpoint, output_dir, paths = si.prepare_outputs(args)

    model = si.build_sam(args, checkpoint, device, dtype_name)
    masks, iou = predict_points(SamPredictor(model), image, prompts)
    arrays = result_arrays(masks, iou, prompts)
    points = arrays["points"]
    draw = si.draw_panel(
        image, masks=masks, scores=iou, point_coords=points[:, :2], point_labels=points[:, 2],
        title=si.plural(len(prompts), "point prompt"),
    )  # fmt: skip
    lines = []
    for k, (prompt, score) in enumerate(zip(prompts, iou)):
        clicks = " ".join(f"{x:g},{y:g},{label}" for x, y, label in prompt)
        lines.append(f"prompt {k} ({clicks}): predicted IoU {score:.3f}")
    si.write_results(output_dir, paths, arrays, draw, lines)
    return 0


main = si.main_for(add_arguments, run, __doc__, "point_inference.py")


__all__ = [
    "add_arguments",
    "group_points",
    "main",
    "parse_points_prompt",
    "predict_points",
    "result_arrays",
    "run",
]
