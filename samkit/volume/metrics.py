"""3D overlap and surface metrics of binary masks, in millimetres through the voxel spacing.

``normalized_surface_dice`` is the NSD of Nikolov et al. (2021) on voxel borders, as MONAI's
``compute_surface_dice`` without sub-voxel borders: the border of a mask is its voxels with a
face-neighbour outside it (the volume's edge counts as outside), distances are Euclidean between voxel
centres scaled by ``spacing`` (``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``), and

    NSD = (#{a in border(P): d(a, border(T)) <= tol} + #{t in border(T): d(t, border(P)) <= tol})
          / (#border(P) + #border(T)).

Both empty: 1.0 (nothing to find, nothing found); exactly one empty: 0.0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|P & T| / (|P| + |T|) of two boolean arrays of one shape; 1.0 when both are empty."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {pred.shape} and {truth.shape}")
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def border(mask: np.ndarray) -> np.ndarray:
    """The voxels of ``mask`` with a face-neighbour outside it (or on the array's edge)."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def normalized_surface_dice(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance: float
) -> float:
    """NSD of two boolean arrays at ``tolerance`` (mm); ``spacing``: voxel size (mm) per axis."""
    from scipy import ndimage

    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"shapes differ: {pred.shape} and {truth.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not have one value per axis of {pred.shape}")
    if not pred.any() and not truth.any():
        return 1.0
    if not pred.any() or not truth.any():
        return 0.0
    # Work in the box around both masks plus one voxel: same distances, far less to transform.
    both = pred | truth
    lo = [max(0, int(np.flatnonzero(both.any(axis=tuple(a for a in range(both.ndim) if a != d)))[0]) - 1)
          for d in range(both.ndim)]  # fmt: skip
    hi = [int(np.flatnonzero(both.any(axis=tuple(a for a in range(both.ndim) if a != d)))[-1]) + 2
          for d in range(both.ndim)]  # fmt: skip
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    # Borders on the whole array (the volume's edge is outside), then cropped.
    pred_border, truth_border = border(pred)[box], border(truth)[box]
    sampling = [float(s) for s in spacing]
    to_truth = ndimage.distance_transform_edt(~truth_border, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_border, sampling=sampling)
    close = int((to_truth[pred_border] <= tolerance).sum()) + int((to_pred[truth_border] <= tolerance).sum())
    return close / (int(pred_border.sum()) + int(truth_border.sum()))


__all__ = ["border", "dice", "normalized_surface_dice"]
