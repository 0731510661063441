"""Pure helpers for box prompts: tight boxes of masks, outward box jitter, and object sub-sampling.

Boxes are XYXY in pixels of the frame they belong to (here always the ORIGINAL image frame: the
datasets jitter and clip there, then scale to the model-input frame). Randomness comes only from
the ``np.random.Generator`` passed in, never from global state.
"""

from __future__ import annotations

import numpy as np


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """NxHxW bool/0-1 masks -> Nx4 float64 XYXY tight boxes of each mask's pixels.

    ``x0``/``y0`` are the first column/row holding a mask pixel and ``x1``/``y1`` the LAST one, so
    the maxima are inclusive pixel indices (a one-pixel mask at column 5, row 7 gives
    ``[5, 7, 5, 7]``), as the FLARE fine-tuning seed computed them. An empty mask gives
    ``[0, 0, 0, 0]``.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be NxHxW, got shape {tuple(masks.shape)}")
    masks = masks.astype(bool, copy=False)
    n, h, w = masks.shape
    rows = masks.any(axis=2)  # NxH: rows holding a pixel
    cols = masks.any(axis=1)  # NxW
    boxes = np.zeros((n, 4), dtype=np.float64)
    if n == 0 or h == 0 or w == 0:
        return boxes
    # argmax finds the first True; on the reversed axis it finds the last one.
    boxes[:, 0] = cols.argmax(axis=1)
    boxes[:, 1] = rows.argmax(axis=1)
    boxes[:, 2] = w - 1 - cols[:, ::-1].argmax(axis=1)
    boxes[:, 3] = h - 1 - rows[:, ::-1].argmax(axis=1)
    boxes[~rows.any(axis=1)] = 0
    return boxes


def jitter_boxes(
    boxes: np.ndarray, max_offset: int, size_hw: tuple[int, int], rng: np.random.Generator | None
) -> np.ndarray:
    """Move each side of each Nx4 XYXY box outward by its own uniform integer in [0, max_offset].

    The result is clipped to ``[0, W] x [0, H]`` (``size_hw`` = (H, W); W, not W - 1, as the seed
    clipped), so a box never grows past the image. ``max_offset=0`` only clips and draws nothing
    from ``rng`` (which may then be None). Returns a new Nx4 float64 array.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    if max_offset < 0:
        raise ValueError(f"max_offset must be >= 0, got {max_offset}")
    if max_offset > 0:
        if rng is None:
            raise ValueError("jitter_boxes needs an rng when max_offset > 0")
        offsets = rng.integers(0, max_offset + 1, size=boxes.shape)
        boxes += offsets * np.array([-1, -1, 1, 1])  # outward: x0, y0 decrease; x1, y1 increase
    h, w = size_hw
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    return boxes


def choose_objects(n: int, cap: int, rng: np.random.Generator | None) -> np.ndarray:
    """Indices of the objects to keep: all ``n`` when ``n <= cap`` (nothing is drawn from ``rng``),
    otherwise a uniformly random subset of ``cap`` distinct indices. Returns them sorted (int64), so
    the kept objects stay in their original order.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    if n <= cap:
        return np.arange(max(n, 0), dtype=np.int64)
    if rng is None:
        raise ValueError("choose_objects needs an rng when n > cap")
    return np.sort(rng.choice(n, size=cap, replace=False)).astype(np.int64)
