"""``samkit predict`` and ``demo/inference_with_prompts.py``: masks from point and box prompts on one
image, drawn to PNG pictures (default prompts, one function per prompt type, the command's flags
and runner, written once for both commands; ``--point``/``--box`` parsing is in :mod:`.prompt_args`).

Conventions: points are XY pixels of the original image with label 1 (foreground) or 0 (background),
boxes XYXY pixels, sizes (H, W). A point or box may touch the image border (0 <= x <= W, 0 <= y <= H).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import PromptError, SamkitError
from .base import add_model_arguments, check_device, checkpoint_or_none, with_adapter
from .outputs import check_not_input, check_output
from .prompt_args import Box, Point, check_boxes, check_points, parse_box, parse_point

PROMPT_TYPES: tuple[str, ...] = ("point", "box", "point_box", "batch_point", "batch_box", "batch_point_box")
DEFAULT_OUTPUT_DIR = "./prompt_test_img"

# ---------------------------------------------------------------------------------------------------
# Default prompts: fractions of (W, H). They are placed on the shipped astronaut photo
# (samkit.demo_data) and scale to any image, so each lands inside whatever the size.

_FACE, _SUIT, _HELMET, _SHUTTLE, _FLAG = (0.44, 0.25), (0.44, 0.62), (0.75, 0.85), (0.78, 0.36), (0.07, 0.45)
_PERSON_BOX, _HELMET_BOX = (0.03, 0.02, 0.71, 1.0), (0.53, 0.66, 1.0, 1.0)
_SHUTTLE_BOX, _FLAG_BOX = (0.69, 0.0, 0.93, 0.57), (0.0, 0.0, 0.19, 1.0)

# prompt type -> (points as (fx, fy, label), boxes as fractions)
_DEFAULTS: dict[str, tuple[list[tuple[float, float, int]], list[Box]]] = {
    "point": ([(*_FACE, 1)], []),
    "box": ([], [_HELMET_BOX]),
    "point_box": ([(*_FACE, 0)], [_PERSON_BOX]),
    "batch_point": ([(*_FACE, 1), (*_HELMET, 1), (*_SHUTTLE, 1), (*_FLAG, 1)], []),
    "batch_box": ([], [_PERSON_BOX, _HELMET_BOX, _SHUTTLE_BOX, _FLAG_BOX]),
    "batch_point_box": ([(*_SUIT, 1), (*_HELMET, 1)], [_PERSON_BOX, _HELMET_BOX]),
}
_FOLLOWUP_CLICK = (*_SUIT, 0)  # the point demo's second, negative click


def default_prompts(prompt_type: str, image_size: tuple[int, int]) -> tuple[list[Point], list[Box]]:
    """The points and boxes a prompt type uses when none are given, in pixels of an (H, W) image."""
    _check_type(prompt_type)
    h, w = image_size
    points, boxes = _DEFAULTS[prompt_type]
    return (
        [(fx * w, fy * h, label) for fx, fy, label in points],
        [(a * w, b * h, c * w, d * h) for a, b, c, d in boxes],
    )


@dataclass
class PromptPlan:
    """The prompts one prompt type runs with, in pixels, already checked against the image."""

    prompt_type: str
    points: list[Point] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    followup_point: Optional[Point] = None  # "point" only: the negative second click


def plan_prompts(
    prompt_type: str,
    points: Sequence[Point] | None,
    boxes: Sequence[Box] | None,
    image_size: tuple[int, int],
) -> PromptPlan:
    """Combine given prompts with the defaults as ``prompt_type`` needs, and check them all.

    A kind of prompt that is not given (``None`` or empty) comes from :func:`default_prompts`.
    - ``point``: all points form one prompt; the follow-up adds a negative click (the default one, or
      with given points the inset corner farthest from them);
    - ``box``: the first box; ``point_box``: all points and the first box;
    - ``batch_point`` / ``batch_box``: each point / box is a prompt of its own;
    - ``batch_point_box``: the i-th box with the i-th point (the counts must agree); given boxes
      without points get a foreground point at each box's centre.
    Every given point and box is checked, used or not. Raises :class:`PromptError`.
    """
    _check_type(prompt_type)
    points, boxes = list(points or []), list(boxes or [])
    check_points(points, image_size)
    check_boxes(boxes, image_size)
    default_points, default_boxes = default_prompts(prompt_type, image_size)
    h, w = image_size
    plan = PromptPlan(prompt_type)
    if prompt_type == "point":
        plan.points = points or default_points
        if points:
            corners = [(fx * w, fy * h, 0) for fx in (0.1, 0.9) for fy in (0.1, 0.9)]
            plan.followup_point = max(corners, key=lambda c: min(math.dist(c[:2], p[:2]) for p in points))
        else:
            plan.followup_point = (_FOLLOWUP_CLICK[0] * w, _FOLLOWUP_CLICK[1] * h, 0)
    elif prompt_type == "box":
        plan.boxes = (boxes or default_boxes)[:1]
    elif prompt_type == "point_box":
        plan.points, plan.boxes = points or default_points, (boxes or default_boxes)[:1]
    elif prompt_type == "batch_point":
        plan.points = points or default_points
    elif prompt_type == "batch_box":
        plan.boxes = boxes or default_boxes
    else:  # batch_point_box
        if points and not boxes:
            raise PromptError(
                f"batch_point_box pairs each --point with a --box: got {len(points)} points and no box"
            )
        if boxes and not points:
            points = [((x0 + x1) / 2, (y0 + y1) / 2, 1) for x0, y0, x1, y1 in boxes]
        if len(points) != len(boxes):
            raise PromptError(
                f"batch_point_box pairs the i-th --box with the i-th --point: got {len(boxes)} boxes "
                f"and {len(points)} points"
            )
        plan.points, plan.boxes = points or default_points, boxes or default_boxes
    return plan


def _check_type(prompt_type: str) -> None:
    if prompt_type not in PROMPT_TYPES:
        raise ValueError(f"unknown prompt type {prompt_type!r}; choose one of {', '.join(PROMPT_TYPES)}")


# ---------------------------------------------------------------------------------------------------
# Running prompts and drawing the results


def run_prompt_demo(
    predictor: Any,
    image: np.ndarray,
    prompt_type: str,
    points: Sequence[Point] | None = None,
    boxes: Sequence[Box] | None = None,
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
) -> list[str]:
    """Run one prompt type on ``image`` and save its picture(s) in ``output_dir``; returns their paths.

    ``image`` is HxWx3 uint8 RGB (or anything :func:`samkit.utils.image.to_rgb_uint8` takes). If the
    predictor holds no embedding it is set from ``image``; if it does, that embedding is used as the
    embedding of ``image`` (so several prompt types share one), which must then be of the same size.
    Pictures: ``<prompt_type>.png``, and for ``point`` also ``point_followup.png``.
    """
    from ..utils.image import to_rgb_uint8

    image = to_rgb_uint8(image)
    plan = plan_prompts(prompt_type, points, boxes, image.shape[:2])
    if not predictor.is_image_set:
        predictor.set_image(image)
    elif tuple(predictor.original_size) != image.shape[:2]:
        raise ValueError(
            f"the predictor holds the embedding of a {predictor.original_size} image, not of this "
            f"{image.shape[:2]} one; call predictor.reset_image() first"
        )
    os.makedirs(output_dir, exist_ok=True)
    return _run_plan(predictor, image, plan, os.fspath(output_dir))


def _run_plan(predictor: Any, image: np.ndarray, plan: PromptPlan, output_dir: str) -> list[str]:
    from .visualize import Panel, save_figure

    kind = plan.prompt_type
    path = os.path.join(output_dir, f"{kind}.png")
    coords = np.array([p[:2] for p in plan.points], dtype=np.float64).reshape(-1, 2)
    labels = np.array([p[2] for p in plan.points], dtype=np.int64)
    boxes = np.array(plan.boxes, dtype=np.float64).reshape(-1, 4)

    if kind == "point":
        masks, scores, logits = predictor.predict(coords, labels, multimask_output=True)
        best = int(np.argmax(scores))
        row = []
        for i, (mask, score) in enumerate(zip(masks, scores)):
            title = f"point: mask {i + 1} of {len(masks)}" + (" (best)" if i == best else "")
            row.append(Panel(mask[None], [score], coords, labels, title=title, first_color=i))
        save_figure(path, image, row)
        # The follow-up: one more (negative) click, with the best mask's low-res logits as mask_input.
        coords2 = np.vstack([coords, [plan.followup_point[:2]]])
        labels2 = np.append(labels, plan.followup_point[2])
        masks2, scores2, _ = predictor.predict(
            coords2, labels2, mask_input=logits[best][None], multimask_output=False
        )
        path2 = os.path.join(output_dir, "point_followup.png")
        title = f"point follow-up: {len(coords2)} clicks + mask {best + 1} as mask_input"
        save_figure(path2, image, [Panel(masks2, scores2, coords2, labels2, title=title)])
        return [path, path2]

    if kind in ("box", "point_box"):
        masks, scores, _ = predictor.predict(
            coords if len(coords) else None,
            labels if len(labels) else None,
            box=boxes[0],
            multimask_output=False,
        )
        title = "box" if kind == "box" else f"box + {len(coords)} point{'s' if len(coords) != 1 else ''}"
        save_figure(path, image, [Panel(masks, scores, coords, labels, boxes, title=title)])
        return [path]

    prompt: dict[str, np.ndarray] = {}
    if kind in ("batch_point", "batch_point_box"):
        prompt["point_coords"], prompt["point_labels"] = coords[:, None, :], labels[:, None]
    if kind in ("batch_box", "batch_point_box"):
        prompt["boxes"] = boxes
    masks, scores, _ = predictor.predict_batch([prompt], multimask_output=False)[0]
    count = max(len(coords), len(boxes))
    title = f"{kind}: {count} prompts at once"
    save_figure(path, image, [Panel(masks, scores.reshape(-1), coords, labels, boxes, title=title)])
    return [path]


# ---------------------------------------------------------------------------------------------------
# The command: demo/inference_with_prompts.py and `samkit predict`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the prompt demo (the seed's flags; every one settable from the command line)."""

    parser.add_argument(
        "--prompt-type",
        default="point",
        choices=PROMPT_TYPES + ("all",),
        help="which prompts to run (default: point); 'all' runs every type on one image embedding",
    )
    parser.add_argument("--input", required=True, metavar="IMAGE", help="local image file (PNG, JPEG, ...)")
    parser.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        metavar="DIR",
        help=f"where the pictures go, named after the prompt type (default: {DEFAULT_OUTPUT_DIR})",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--point",
        action="append",
        metavar="X,Y[,LABEL]",
        help="a point prompt in pixels, label 1 (foreground, default) or 0 (background); repeatable",
    )
    parser.add_argument(
        "--box",
        action="append",
        metavar="X0,Y0,X1,Y1",
        help="a box prompt in pixels (top-left, bottom-right); repeatable. The prompt type decides how points "
        "and boxes combine: point = all points as one prompt; box = the first box; point_box = all points and "
        "the first box; batch_* = one prompt per point / box / (i-th box, i-th point). Without any, "
        "defaults placed relative to the image size are used",
    )
    # The seed's switch for saving pictures; they are always saved, so it is accepted and hidden.
    parser.add_argument("--enable-plt-visual", action="store_true", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Predict masks from point and box prompts on one image and save pictures of them."""
    import torch

    from ..build import build_model
    from ..checkpoints.download import download_checkpoint
    from ..predictor import SamPredictor
    from ..utils.image import load_image

    # Everything a user can get wrong is checked before the model is built or a file is written.
    types = PROMPT_TYPES if args.prompt_type == "all" else (args.prompt_type,)
    points = [parse_point(p) for p in args.point or []]
    boxes = [parse_box(b) for b in args.box or []]
    device = check_device(args.device)
    dtype = getattr(torch, args.dtype)
    image = load_image(args.input)
    plans = [
        plan_prompts(t, *_prompts_for(t, args.prompt_type, points, boxes), image.shape[:2]) for t in types
    ]
    checkpoint = checkpoint_or_none(args)
    inputs = {"the input image": args.input, "the checkpoint": checkpoint}
    output_dir = check_output(args.output_dir, "--output-dir", inputs, directory=True)
    names = [f"{t}.png" for t in types] + (["point_followup.png"] if "point" in types else [])
    check_not_input([os.path.join(output_dir, n) for n in names], inputs, "--output-dir")

    if checkpoint is None and args.download:
        checkpoint = download_checkpoint(args.model_type)
    model = with_adapter(build_model(args.model_type, checkpoint), args).to(device=device, dtype=dtype)
    # Notes come after the last check that can fail, so that an error stays the only line on stderr.
    for note in _unused_prompt_notes(args.prompt_type, points, boxes):
        print(f"note: {note}", file=sys.stderr)
    if checkpoint is None:
        print(
            f"warning: {args.model_type} runs with random weights: its masks are meaningless", file=sys.stderr
        )
    predictor = SamPredictor(model)
    predictor.set_image(image)
    written = []
    try:
        os.makedirs(output_dir, exist_ok=True)
        for plan in plans:
            written += _run_plan(predictor, image, plan, output_dir)
    except OSError as err:
        raise SamkitError(f"cannot write pictures to {output_dir}: {err.strerror or err}") from None
    for path in written:
        print(f"wrote {path}")
    return 0


def _prompts_for(
    prompt_type: str, requested: str, points: list[Point], boxes: list[Box]
) -> tuple[list[Point], list[Box]]:
    """The given prompts one type of an ``all`` run uses: batch_point_box cannot pair points without boxes."""
    if requested == "all" and prompt_type == "batch_point_box" and points and not boxes:
        return [], []
    return points, boxes


def _unused_prompt_notes(prompt_type: str, points: list[Point], boxes: list[Box]) -> list[str]:
    if prompt_type == "all":
        if points and not boxes:
            return [
                "batch_point_box pairs each --point with a --box; without --box it runs its default prompts"
            ]
        return []
    notes = []
    if points and prompt_type in ("box", "batch_box"):
        notes.append(f"--point is not used by --prompt-type {prompt_type}")
    if boxes and prompt_type in ("point", "batch_point"):
        notes.append(f"--box is not used by --prompt-type {prompt_type}")
    if len(boxes) > 1 and prompt_type in ("box", "point_box"):
        notes.append(f"--prompt-type {prompt_type} uses only the first of {len(boxes)} boxes")
    return notes


__all__ = [
    "PROMPT_TYPES",
    "PromptPlan",
    "add_arguments",
    "check_boxes",
    "check_points",
    "default_prompts",
    "parse_box",
    "parse_point",
    "plan_prompts",
    "run",
    "run_prompt_demo",
]
