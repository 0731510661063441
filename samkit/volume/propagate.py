"""Segment an object through a volume from prompts on a few of its slices: slice propagation.

Volumes are numpy arrays; slices are taken along ``axis`` (moved first, so a slice's rows run along
the next remaining axis and its columns along the last). Prompts are in slice pixels: X = column,
Y = row, boxes XYXY, as on a 2D image (:class:`SlicePrompt`).

For each object (label), its prompted slices are segmented from their prompts; from each, the mask
is carried slice by slice to the neighbours: the next slice is prompted with the box of the previous
mask (widened by ``box_margin``), optionally its most interior point (``use_points``) and the
previous low-res logits as ``mask_input`` (``use_mask_input``); the new mask is cut to that box
(``clip_to_box``: a stray blob elsewhere would widen the next box and drag the object onto a
neighbour, as seen on thin tubes next to other organs). Propagation stops, and that slice's
mask is dropped, when the predicted IoU falls below ``iou_thresh`` or the mask's area below
``min_area`` pixels. Outward from the first and last prompted slices it runs to the volume's ends;
between two prompted slices of one object each side runs to the midpoint, so the prompts merge
into one object.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import PromptError
from .intensity import Window, to_uint8
from .slices import SliceEmbeddings


@dataclass(frozen=True)
class SlicePrompt:
    """A prompt on one slice of one object.

    ``slice``: index along the slicing axis; ``box``: X0, Y0, X1, Y1 in slice pixels; ``points``: Nx2
    XY slice pixels with ``point_labels`` N (1 foreground, 0 background; default all 1); ``label``: the
    object's id in the output (1..65535). Several prompts of one label are one object.
    """

    slice: int
    box: Optional[Sequence[float]] = None
    points: Sequence[Sequence[float]] = ()
    point_labels: Optional[Sequence[int]] = None
    label: int = 1


@dataclass
class ObjectResult:
    """One object's propagation: masks (slice -> HxW bool), predicted IoU per slice, prompted slices."""

    label: int
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    iou: dict[int, float] = field(default_factory=dict)
    prompted: list[int] = field(default_factory=list)


def check_prompts(prompts: Sequence[SlicePrompt], shape: tuple[int, int, int]) -> None:
    """Raise :class:`PromptError` (one line naming the prompt) for a prompt outside a ZxHxW volume."""
    if not prompts:
        raise PromptError("segment_volume needs at least one prompt")
    depth, height, width = shape
    for p in prompts:
        where = f"prompt on slice {p.slice} (label {p.label})"
        if not 0 <= p.slice < depth:
            raise PromptError(f"{where}: slice {p.slice} is outside the volume's 0..{depth - 1}")
        if not 1 <= int(p.label) <= 65535:
            raise PromptError(f"{where}: label must be 1..65535")
        if p.box is None and len(p.points) == 0:
            raise PromptError(f"{where}: needs a box or points")
        if p.box is not None:
            x0, y0, x1, y1 = (float(v) for v in p.box)
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise PromptError(
                    f"{where}: box {x0:g},{y0:g},{x1:g},{y1:g} is not inside the slice's {width}x{height} "
                    "pixels with X0 < X1 and Y0 < Y1"
                )
        for x, y in np.asarray(p.points, dtype=np.float64).reshape(-1, 2):
            if not (0 <= x < width and 0 <= y < height):
                raise PromptError(
                    f"{where}: point {x:g},{y:g} is outside the slice's {width}x{height} pixels"
                )


def segment_volume(
    predictor_or_model: Any,
    volume: np.ndarray,
    prompts: Sequence[SlicePrompt],
    *,
    axis: int = 0,
    window: Window = None,
    iou_thresh: float = 0.5,
    min_area: int = 10,
    box_margin: float = 0.1,
    use_points: bool = False,
    use_mask_input: bool = False,
    clip_to_box: bool = True,
    batch_size: int = 4,
    cache_dir: Optional[str | os.PathLike] = None,
    progress: bool = False,
) -> np.ndarray:
    """Segment the prompted objects of a 3D ``volume``; returns a label volume of its shape.

    ``predictor_or_model``: a :class:`~samkit.predictor.SamPredictor` or a Sam model (wrapped in one).
    ``window``: see :func:`samkit.volume.intensity.to_uint8` (None: uint8 as is, else min-max; a CT
    preset such as ``"abdomen"``, ``(level, width)`` in HU, or ``"mr"``). Where objects overlap the
    lower label wins. The result is uint8, or uint16 when a label exceeds 255. See the module
    docstring for the propagation and its thresholds; ``batch_size`` slices are embedded per encoder
    call and ``cache_dir`` keeps the embeddings in ``samkit embed``'s format.
    """
    labels, _ = segment_volume_objects(
        predictor_or_model, volume, prompts, axis=axis, window=window, iou_thresh=iou_thresh,
        min_area=min_area, box_margin=box_margin, use_points=use_points, use_mask_input=use_mask_input,
        clip_to_box=clip_to_box, batch_size=batch_size, cache_dir=cache_dir, progress=progress,
    )  # fmt: skip
    return labels


def segment_volume_objects(
    predictor_or_model: Any,
    volume: np.ndarray,
    prompts: Sequence[SlicePrompt],
    *,
    axis: int = 0,
    window: Window = None,
    embeddings: Optional[SliceEmbeddings] = None,
    **options: Any,
) -> tuple[np.ndarray, list[ObjectResult]]:
    """:func:`segment_volume`, also returning each object's :class:`ObjectResult` (slices along the
    slicing axis). ``embeddings``: a :class:`SliceEmbeddings` of the same slices, to reuse."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"segment_volume needs a 3D volume, got shape {volume.shape}")
    if not -3 <= axis < 3:
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    slices = np.ascontiguousarray(np.moveaxis(to_uint8(volume, window), axis, 0))
    check_prompts(prompts, slices.shape)  # type: ignore[arg-type]
    progress = options.pop("progress", False)
    batch_size = options.pop("batch_size", 4)
    cache_dir = options.pop("cache_dir", None)
    if embeddings is None:
        predictor = as_predictor(predictor_or_model)
        embeddings = SliceEmbeddings(predictor, slices, batch_size=batch_size, cache_dir=cache_dir)
    propagator = Propagator(embeddings, **options)
    by_label: dict[int, list[SlicePrompt]] = {}
    for p in prompts:
        by_label.setdefault(int(p.label), []).append(p)
    bar = _progress_bar(len(slices) * len(by_label), progress)
    results = []
    try:
        for label in sorted(by_label):
            results.append(propagator.segment(label, by_label[label], bar))
    finally:
        if bar is not None:
            bar.total = bar.n
            bar.close()
    dtype = np.uint8 if max(by_label) <= 255 else np.uint16
    out = np.zeros(slices.shape, dtype=dtype)
    for result in results:
        for z, mask in result.masks.items():
            out[z][mask & (out[z] == 0)] = result.label
    return np.moveaxis(out, 0, axis), results


def as_predictor(predictor_or_model: Any) -> Any:
    """A SamPredictor as given, or one around a Sam model."""
    if hasattr(predictor_or_model, "set_image_batch"):
        return predictor_or_model
    from ..predictor import SamPredictor

    return SamPredictor(predictor_or_model)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="slices", unit="slice", file=sys.stderr, dynamic_ncols=True, leave=False)


class Propagator:
    """Prompts slices of one volume (through ``embeddings``) and carries masks between them."""

    def __init__(
        self,
        embeddings: SliceEmbeddings,
        *,
        iou_thresh: float = 0.5,
        min_area: int = 10,
        box_margin: float = 0.1,
        use_points: bool = False,
        use_mask_input: bool = False,
        clip_to_box: bool = True,
    ) -> None:
        self.embeddings = embeddings
        self.predictor = embeddings.predictor
        self.iou_thresh = float(iou_thresh)
        self.min_area = int(min_area)
        self.box_margin = float(box_margin)
        self.use_points = use_points
        self.use_mask_input = use_mask_input
        self.clip_to_box = clip_to_box
        self.depth, self.height, self.width = embeddings.slices.shape
        self._bar: Any = None

    def segment(self, label: int, prompts: Sequence[SlicePrompt], bar: Any = None) -> ObjectResult:
        """One object from its prompts (all of ``label``)."""
        self._bar = bar
        result = ObjectResult(label)
        seeds: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for z in sorted({p.slice for p in prompts}):
            mask, iou, logits = self.prompt_slice(z, [p for p in prompts if p.slice == z])
            seeds[z] = (mask, logits)
            result.masks[z], result.iou[z] = mask, iou
            _tick(self._bar)
        zs = sorted(seeds)
        result.prompted = zs
        self._carry(result, seeds[zs[0]], zs[0], -1, 0)
        for a, b in zip(zs, zs[1:]):
            middle = (a + b) // 2
            self._carry(result, seeds[a], a, 1, middle)
            self._carry(result, seeds[b], b, -1, middle + 1)
        self._carry(result, seeds[zs[-1]], zs[-1], 1, self.depth - 1)
        return result

    def prompt_slice(self, z: int, prompts: Sequence[SlicePrompt]) -> tuple[np.ndarray, float, np.ndarray]:
        """The union of the masks of a slice's prompts; a box is decoded with the slice's points, points
        alone as one prompt (one point: the best of 3 masks). Returns (mask, lowest IoU, low-res
        logits of the first prompt)."""
        self.embeddings.use(z)
        points = [pt for p in prompts for pt in np.asarray(p.points, np.float64).reshape(-1, 2)]
        point_labels = [
            int(v) for p in prompts
            for v in (p.point_labels if p.point_labels is not None else [1] * len(p.points))
        ]  # fmt: skip
        coords = np.array(points, dtype=np.float64).reshape(-1, 2) if points else None
        labels = np.array(point_labels, dtype=np.int64) if points else None
        boxes = [np.asarray(p.box, dtype=np.float64) for p in prompts if p.box is not None]
        outputs = []
        for box in boxes or [None]:
            multimask = box is None and len(points) == 1
            masks, iou, low_res = self.predictor.predict(coords, labels, box, None, multimask)
            best = int(np.argmax(iou)) if multimask else 0
            outputs.append((masks[best], float(iou[best]), low_res[best : best + 1]))
        mask = np.logical_or.reduce([m for m, _, _ in outputs])
        return mask, min(i for _, i, _ in outputs), outputs[0][2]

    def _carry(
        self, result: ObjectResult, seed: tuple[np.ndarray, np.ndarray], start: int, step: int, end: int
    ) -> None:
        """Propagate from slice ``start`` by ``step`` up to ``end`` (inclusive) or until it stops."""
        mask, logits = seed
        z = start + step
        while (z <= end) if step > 0 else (z >= end):
            if mask.sum() < self.min_area:
                return
            mask, iou, logits = self._follow(z, step, mask, logits)
            _tick(self._bar)
            if iou < self.iou_thresh or mask.sum() < self.min_area:
                return
            result.masks[z], result.iou[z] = mask, iou
            z += step

    def _follow(
        self, z: int, step: int, previous: np.ndarray, logits: np.ndarray
    ) -> tuple[np.ndarray, float, np.ndarray]:
        """Slice ``z`` prompted from the neighbouring slice's mask ``previous`` (and its logits)."""
        self.embeddings.use(z, step)
        box = self.box_of(previous)
        coords = labels = None
        if self.use_points:
            coords = interior_point(previous)[None]
            labels = np.ones(1, dtype=np.int64)
        mask_input = logits if self.use_mask_input else None
        masks, iou, low_res = self.predictor.predict(coords, labels, box, mask_input, False)
        mask = masks[0]
        if self.clip_to_box:  # a stray blob elsewhere would widen the next box and drag it away
            x0, y0, x1, y1 = np.floor(box[:2]).astype(int).tolist() + np.ceil(box[2:]).astype(int).tolist()
            inside = np.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            mask = mask & inside
        return mask, float(iou[0]), low_res[:1]

    def box_of(self, mask: np.ndarray) -> np.ndarray:
        """The XYXY box around ``mask`` (x1, y1 one past the last column/row), widened on each side by
        ``box_margin`` of its size (at least 1 pixel) and clipped to the slice."""
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        x0, x1, y0, y1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
        mx = max(1.0, self.box_margin * (x1 - x0))
        my = max(1.0, self.box_margin * (y1 - y0))
        return np.array(
            [max(0.0, x0 - mx), max(0.0, y0 - my), min(self.width, x1 + mx), min(self.height, y1 + my)]
        )


def interior_point(mask: np.ndarray) -> np.ndarray:
    """The XY pixel centre farthest from the background of ``mask`` (its most interior point)."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return np.array([x + 0.5, y + 0.5])


def _tick(bar: Any) -> None:
    if bar is not None:
        bar.update(1)


__all__ = [
    "ObjectResult",
    "Propagator",
    "SlicePrompt",
    "check_prompts",
    "interior_point",
    "segment_volume",
    "segment_volume_objects",
]
