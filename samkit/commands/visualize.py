"""Pictures of SAM results: masks over the image, point and box prompts, scores.

Matplotlib is imported where a picture is drawn (it is the ``demo`` extra), and only its Agg canvas is
used: no pyplot, no global backend switch, no window. Conventions: images HxWx3 uint8 RGB, masks HxW
bool, points XY pixels with labels 1 (foreground, green star) and 0 (background, red star), boxes XYXY.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np

from ..utils.files import atomic_write

# Distinct, saturated colours that are neither the green nor the red of the point markers.
MASK_COLORS: tuple[tuple[int, int, int], ...] = (
    (30, 144, 255),  # dodger blue
    (255, 165, 0),  # orange
    (186, 85, 211),  # orchid
    (0, 206, 209),  # turquoise
    (255, 215, 0),  # gold
    (255, 105, 180),  # pink
    (65, 105, 225),  # royal blue
    (210, 105, 30),  # chocolate
    (154, 205, 50),  # yellow green
    (112, 128, 144),  # slate grey
)
MASK_ALPHA = 0.5
POSITIVE_COLOR = "#00c000"
NEGATIVE_COLOR = "#e00000"


def mask_color(i: int) -> tuple[float, float, float]:
    """The i-th mask colour as RGB floats in 0-1 (cycles after ``len(MASK_COLORS)``)."""
    r, g, b = MASK_COLORS[i % len(MASK_COLORS)]
    return r / 255, g / 255, b / 255


@dataclass
class Panel:
    """What one picture panel shows on top of the image.

    masks: KxHxW (or HxW) bool, each in its own colour; scores: K, shown in the title and next to each
    mask; point_coords: Nx2 XY pixels with point_labels N; boxes: Mx4 (or 4) XYXY pixels, drawn in the
    colour of the mask with the same index when there are as many boxes as masks.
    """

    masks: Any = None
    scores: Any = None
    point_coords: Any = None
    point_labels: Any = None
    boxes: Any = None
    title: str = ""
    first_color: int = 0  # index of the first mask's colour, to tell apart masks in side-by-side panels


def show_mask(
    ax: Any, mask: np.ndarray, color: tuple[float, float, float], alpha: float = MASK_ALPHA
) -> None:
    """Overlay one HxW bool mask on ``ax`` in ``color`` (RGB 0-1), semi-transparent."""
    mask = np.asarray(mask, dtype=bool)
    overlay = np.zeros(mask.shape + (4,), dtype=np.uint8)  # uint8 RGBA keeps big images cheap
    overlay[mask] = [round(c * 255) for c in color] + [round(alpha * 255)]
    h, w = mask.shape
    ax.imshow(overlay, interpolation="nearest", extent=(0, w, h, 0))


def show_points(ax: Any, coords: np.ndarray, labels: np.ndarray | None, marker_size: float = 300) -> None:
    """Positive points (label 1, or no labels) as green stars, negative ones (0) as red stars, white-edged."""
    coords = np.asarray(coords, dtype=float).reshape(-1, 2)
    labels = np.ones(len(coords), int) if labels is None else np.asarray(labels).reshape(-1)
    for value, color in ((1, POSITIVE_COLOR), (0, NEGATIVE_COLOR)):
        pts = coords[labels == value]
        if len(pts):
            ax.scatter(
                pts[:, 0], pts[:, 1], color=color, marker="*", s=marker_size,
                edgecolor="white", linewidth=1.25, zorder=3,
            )  # fmt: skip


def show_box(ax: Any, box: Sequence[float], color: Any = POSITIVE_COLOR, linewidth: float = 2.0) -> None:
    """Draw one XYXY box as an unfilled rectangle."""
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(
        Rectangle((x0, y0), x1 - x0, y1 - y0, edgecolor=color, facecolor="none", lw=linewidth, zorder=2)
    )


def draw_panel(ax: Any, image: np.ndarray, panel: Panel) -> None:
    """Draw ``image`` and everything in ``panel`` on one matplotlib axes."""
    h, w = image.shape[:2]
    # Pixel (i, j) covers [j, j+1) x [i, i+1): the picture spans exactly the coordinates a prompt may
    # take (0 <= x <= W, 0 <= y <= H), so prompts on tiny images are drawn where they are.
    ax.imshow(image, interpolation="nearest" if max(h, w) < 64 else "antialiased", extent=(0, w, h, 0))
    masks = _as_masks(panel.masks)
    scores = None if panel.scores is None else np.asarray(panel.scores, dtype=float).reshape(-1)
    for i, mask in enumerate(masks):
        show_mask(ax, mask, mask_color(panel.first_color + i))
    boxes = None if panel.boxes is None else np.asarray(panel.boxes, dtype=float).reshape(-1, 4)
    if boxes is not None:
        for i, box in enumerate(boxes):
            paired = len(boxes) == len(masks) and len(masks) > 1
            show_box(ax, box, mask_color(panel.first_color + i) if paired else POSITIVE_COLOR)
    if panel.point_coords is not None:
        show_points(ax, panel.point_coords, panel.point_labels)
    if scores is not None and len(masks) > 1:
        # Several masks share the panel: label each with its number and score, at its prompt if it has one.
        coords = (
            None if panel.point_coords is None else np.asarray(panel.point_coords, dtype=float).reshape(-1, 2)
        )
        for i, mask in enumerate(masks[: len(scores)]):
            if boxes is not None and len(boxes) == len(masks):
                anchor = (boxes[i][0], boxes[i][1])
            elif coords is not None and len(coords) == len(masks):
                anchor = (coords[i][0] + 0.02 * w, coords[i][1] + 0.02 * h)  # beside the star, not on it
            else:
                anchor = _mask_corner(mask)
            if anchor is not None:
                ax.text(
                    anchor[0], anchor[1], f"{i + 1}: {scores[i]:.3f}", fontsize=9, color="white",
                    va="top", ha="left", zorder=4, clip_on=True,
                    bbox={"facecolor": mask_color(panel.first_color + i), "alpha": 0.85, "pad": 2, "lw": 0},
                )  # fmt: skip
    ax.set_title(_title(panel.title, scores), fontsize=11)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")


PanelRows = Union[Sequence[Panel], Sequence[Sequence[Panel]]]


def save_figure(
    path: str | os.PathLike,
    image: np.ndarray,
    panels: PanelRows,
    *,
    suptitle: str | None = None,
    panel_inches: float = 5.0,
    dpi: int = 100,
) -> str:
    """Save one PNG of ``image`` under each panel; ``panels`` is one row or a list of rows.

    The file is written to a temporary name in the same directory and renamed into place, so ``path``
    is either the previous file or the complete new picture, never half of one. Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [list(panels)] if panels and isinstance(panels[0], Panel) else [list(r) for r in panels]
    if not rows or not any(rows):
        raise ValueError("save_figure needs at least one panel")
    ncols = max(len(r) for r in rows)
    h, w = image.shape[:2]
    aspect = min(max(h / w, 0.25), 4.0)  # keep extreme shapes (1xN strips) readable
    # Each row gets room for a two-line title above its panels.
    height = (panel_inches * aspect + 0.6) * len(rows) + (0.4 if suptitle else 0)
    fig = Figure(figsize=(panel_inches * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = fig.add_subplot(len(rows), ncols, r * ncols + c + 1)
            if c < len(row):
                draw_panel(ax, image, row[c])
            else:
                ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=13)
    _save_atomically(fig, os.fspath(path), dpi)
    return os.fspath(path)


def save_masks(
    path: str | os.PathLike,
    image: np.ndarray,
    masks: Any,
    scores: Any = None,
    point_coords: Any = None,
    point_labels: Any = None,
    boxes: Any = None,
    title: str = "",
    *,
    side_by_side: bool = False,
) -> str:
    """Save masks (KxHxW) with their prompts and scores as a PNG, atomically.

    All masks go in one panel, or with ``side_by_side`` one panel per mask, each titled with its score.
    """
    if not side_by_side:
        panel = Panel(masks, scores, point_coords, point_labels, boxes, title)
        return save_figure(path, image, [panel])
    masks = _as_masks(masks)
    scores = [None] * len(masks) if scores is None else np.asarray(scores, dtype=float).reshape(-1)
    row = [
        Panel(m[None], None if s is None else [s], point_coords, point_labels, boxes,
              f"{title} mask {i + 1}".strip(), first_color=i)
        for i, (m, s) in enumerate(zip(masks, scores))
    ]  # fmt: skip
    return save_figure(path, image, row)


def _as_masks(masks: Any) -> np.ndarray:
    if masks is None:
        return np.zeros((0, 1, 1), dtype=bool)
    masks = np.asarray(masks)
    masks = masks.reshape((-1,) + masks.shape[-2:])  # HxW, KxHxW and BxCxHxW all become KxHxW
    return masks.astype(bool, copy=False)


def _title(title: str, scores: np.ndarray | None) -> str:
    if scores is None or len(scores) == 0:
        return title
    text = f"score {scores[0]:.3f}" if len(scores) == 1 else "scores " + ", ".join(f"{s:.3f}" for s in scores)
    return f"{title}\n{text}" if title else text


def _mask_corner(mask: np.ndarray) -> tuple[float, float] | None:
    """Top-left corner of the mask's bounding box, or None for an empty mask."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return (float(cols[0]), float(rows[0])) if len(cols) else None


def _save_atomically(fig: Any, path: str, dpi: int) -> None:
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=dpi)


__all__ = [
    "MASK_COLORS",
    "Panel",
    "draw_panel",
    "mask_color",
    "save_figure",
    "save_masks",
    "show_box",
    "show_mask",
    "show_points",
]
