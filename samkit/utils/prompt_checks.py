"""Prompt checks without PyTorch, shared by :class:`samkit.SamPredictor` and the torch-free
:class:`samkit.onnx.OnnxPredictor`, so both accept the same prompts and refuse the same ones with the
same errors.

Prompts are in the original image's pixels: points Nx2 XY (or BxNx2) with labels N (or BxN), boxes 4
XYXY (or Bx4), low-res mask logits 1xHxW (or Bx1xHxW); B is the number of prompts decoded together.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..errors import PromptError

PROMPT_KEYS = ("point_coords", "point_labels", "boxes", "mask_input")


def prompt_sets(prompts: Sequence[Mapping[str, Any]], n_images: int) -> Iterator[tuple[Any, Any, Any, Any]]:
    """``predict_batch``'s prompts, one set per image: yields each image's (point_coords, point_labels,
    boxes, mask_input), None where absent. ValueError for a set per image that does not match the
    ``n_images`` images set (at once) or for a key other than :data:`PROMPT_KEYS` (on reaching that image)."""
    if len(prompts) != n_images:
        raise ValueError(f"got prompts for {len(prompts)} images, but {n_images} are set")
    return _prompt_sets(prompts)


def _prompt_sets(prompts: Sequence[Mapping[str, Any]]) -> Iterator[tuple[Any, Any, Any, Any]]:
    for i, p in enumerate(prompts):
        unknown = set(p) - set(PROMPT_KEYS)
        if unknown:
            raise ValueError(f"unknown prompt keys {sorted(unknown)} for image {i}")
        yield tuple(p.get(k) for k in PROMPT_KEYS)  # type: ignore[misc]


def check_prompts(
    point_coords: Any,
    point_labels: Any,
    box: Any,
    mask_input: Any,
    *,
    batched: bool,
    mask_size: tuple[int, int],
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Check one call's prompts and give them a prompt axis: points BxNx2 (float64), labels BxN (as
    given), boxes Bx4 (float64), masks Bx1xHxW (float32), None where absent; PromptError otherwise.

    ``batched``: whether B prompts may be given (``predict_batch``); without it a single prompt is
    expected (Nx2, N, 4 or 1x4, 1xHxW). ``mask_size``: (H, W) of the low-res mask input.
    """
    coords = labels = boxes = masks = None
    if point_coords is not None:
        if point_labels is None:
            raise PromptError("point_labels must be given with point_coords")
        coords = check_numbers(point_coords, "point_coords")
        labels = np.asarray(point_labels)
        if labels.dtype.kind not in "biuf" or not np.isin(labels, POINT_LABELS).all():
            raise PromptError(
                "point_labels must be 1 (foreground), 0 (background), -1 (padding) or 2/3 (box corners), "
                f"got {_sample(labels)}"
            )
        if coords.ndim == 2:
            coords, labels = coords[None], labels.reshape(1, -1)
        if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
            raise PromptError(
                f"point_coords must be Nx2{' or BxNx2' if batched else ''} with matching point_labels, "
                f"got {tuple(np.shape(point_coords))} and {tuple(np.shape(point_labels))}"
            )
    if box is not None:
        boxes = check_numbers(box, "box")
        if boxes.shape == (4,) or (not batched and boxes.shape == (1, 4)):
            boxes = boxes.reshape(1, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise PromptError(
                f"box must be 4 values (XYXY){' or Bx4' if batched else ''}, got {tuple(boxes.shape)}"
            )
    if mask_input is not None:
        masks = check_numbers(mask_input, "mask_input", np.float32)
        if masks.ndim == 3:
            masks = masks[None]
        if masks.ndim != 4 or masks.shape[1] != 1 or tuple(masks.shape[2:]) != mask_size:
            raise PromptError(
                f"mask_input must be 1x{mask_size[0]}x{mask_size[1]} per prompt, got {tuple(masks.shape)}"
            )
    counts = {a.shape[0] for a in (coords, boxes, masks) if a is not None}
    if len(counts) > 1:
        raise PromptError(f"points, boxes and masks disagree on the number of prompts: {sorted(counts)}")
    return coords, labels, boxes, masks


POINT_LABELS = (-1, 0, 1, 2, 3)  # SAM's point labels: padding, background, foreground, box corners


def check_numbers(value: Any, name: str, dtype: type = np.float64) -> np.ndarray:
    """``value`` as a float array; PromptError unless it holds only finite numbers (a NaN or
    infinite coordinate or logit would give NaN masks and scores without a word)."""
    try:
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        raise PromptError(f"{name} must be numbers, got {_sample(np.asarray(value, dtype=object))}") from None
    if not np.isfinite(array).all():
        raise PromptError(f"{name} must be finite numbers, got {_sample(array[~np.isfinite(array)])}")
    return array


def _sample(array: np.ndarray) -> str:
    """A few of an array's values, for an error message."""
    flat = array.reshape(-1)
    return repr(flat[:4].tolist())[:80] + (" ..." if flat.size > 4 else "")


__all__ = ["POINT_LABELS", "PROMPT_KEYS", "check_numbers", "check_prompts", "prompt_sets"]
