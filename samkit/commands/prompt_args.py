"""Prompts on the command line: ``--point X,Y[,LABEL]`` and ``--box X0,Y0,X1,Y1`` parsed and checked.

Conventions: points are XY pixels of the original image with label 1 (foreground) or 0 (background),
boxes XYXY pixels, sizes (H, W). A point or box may touch the image border (0 <= x <= W, 0 <= y <= H).
Every mistake raises :class:`samkit.errors.PromptError` naming the flag and the value.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..errors import PromptError

Point = tuple[float, float, int]  # x, y, label
Box = tuple[float, float, float, float]  # x0, y0, x1, y1

# ---------------------------------------------------------------------------------------------------
# Parsing and checking prompts


def parse_point(text: str, flag: str = "--point") -> Point:
    """``"X,Y"`` or ``"X,Y,LABEL"`` (label 1 = foreground, the default; 0 = background). ``flag``:
    how errors name the argument (``--points-prompt`` gives its points in this form too)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (2, 3):
        raise PromptError(
            f"{flag} {text!r}: expected X,Y or X,Y,LABEL (label 1 = foreground, 0 = background), "
            f"got {len(parts)} values"
        )
    x, y = (_number(p, flag, text) for p in parts[:2])
    label = 1
    if len(parts) == 3:
        if parts[2] not in ("0", "1"):
            raise PromptError(
                f"{flag} {text!r}: label must be 0 (background) or 1 (foreground), got {parts[2]!r}"
            )
        label = int(parts[2])
    return x, y, label


def parse_box(text: str) -> Box:
    """``"X0,Y0,X1,Y1"``: the top-left and bottom-right corners in pixels."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4:
        raise PromptError(f"--box {text!r}: expected X0,Y0,X1,Y1 (4 numbers), got {len(parts)} values")
    x0, y0, x1, y1 = (_number(p, "--box", text) for p in parts)
    return x0, y0, x1, y1


def _number(part: str, flag: str, text: str) -> float:
    try:
        value = float(part)
    except ValueError:
        raise PromptError(f"{flag} {text!r}: {part!r} is not a number") from None
    if not math.isfinite(value):
        raise PromptError(f"{flag} {text!r}: {part!r} is not a finite number")
    return value


def check_points(points: Sequence[Point], image_size: tuple[int, int]) -> None:
    """Raise :class:`PromptError` naming the first point outside an image of size (H, W) or with a bad label."""
    h, w = image_size
    for x, y, label in points:
        name = f"point {_fmt(x)},{_fmt(y)}"
        if label not in (0, 1):
            raise PromptError(f"{name}: label must be 0 or 1, got {label!r}")
        if not (0 <= x <= w and 0 <= y <= h):
            raise PromptError(
                f"{name} is outside the image (width {w}, height {h}: 0 <= x <= {w}, 0 <= y <= {h})"
            )


def check_boxes(boxes: Sequence[Box], image_size: tuple[int, int]) -> None:
    """Raise :class:`PromptError` naming the first box that is empty, inverted or outside an (H, W) image."""
    h, w = image_size
    for x0, y0, x1, y1 in boxes:
        name = "box " + ",".join(_fmt(v) for v in (x0, y0, x1, y1))
        if x1 <= x0:
            raise PromptError(f"{name}: x1 ({_fmt(x1)}) must be greater than x0 ({_fmt(x0)})")
        if y1 <= y0:
            raise PromptError(f"{name}: y1 ({_fmt(y1)}) must be greater than y0 ({_fmt(y0)})")
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise PromptError(
                f"{name} is outside the image (width {w}, height {h}: 0 <= x <= {w}, 0 <= y <= {h})"
            )


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"
