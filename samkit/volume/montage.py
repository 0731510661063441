"""An overlay montage of a segmented volume: a grid of slices with each label in its own colour."""

from __future__ import annotations

import os

import numpy as np

from ..utils.files import atomic_write

PALETTE = np.array(
    [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
     (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)],
    dtype=np.float64,
)  # fmt: skip


def montage(
    slices: np.ndarray, labels: np.ndarray, *, max_tiles: int = 16, alpha: float = 0.45
) -> np.ndarray:
    """HxWx3 uint8 grid of up to ``max_tiles`` slices (ZxHxW uint8 grey levels and their labels): the
    labelled slices evenly spread (all slices when none is labelled), each label blended in colour."""
    if slices.shape != labels.shape or slices.ndim != 3:
        raise ValueError(f"slices {slices.shape} and labels {labels.shape} must be the same ZxHxW")
    labelled = np.flatnonzero(labels.reshape(len(labels), -1).any(1))
    pool = labelled if len(labelled) else np.arange(len(slices))
    picks = pool[np.unique(np.linspace(0, len(pool) - 1, min(max_tiles, len(pool))).round().astype(int))]
    cols = int(np.ceil(np.sqrt(len(picks))))
    rows = int(np.ceil(len(picks) / cols))
    zoom = max(1, 128 // max(slices.shape[1:]))  # small scans: nearest-neighbour tiles of 128+ pixels
    if zoom > 1:
        slices, labels = (a.repeat(zoom, axis=1).repeat(zoom, axis=2) for a in (slices, labels))
    h, w = slices.shape[1:]
    out = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, z in enumerate(picks):
        tile = np.repeat(slices[z][:, :, None].astype(np.float64), 3, axis=2)
        for value in np.unique(labels[z][labels[z] > 0]):
            where = labels[z] == value
            tile[where] = (1 - alpha) * tile[where] + alpha * PALETTE[(int(value) - 1) % len(PALETTE)]
        r, c = divmod(i, cols)
        out[r * h : (r + 1) * h, c * w : (c + 1) * w] = np.clip(tile, 0, 255).astype(np.uint8)
    return out


def save_montage(path: str | os.PathLike, slices: np.ndarray, labels: np.ndarray, **kwargs: object) -> None:
    """Write :func:`montage` as a PNG, atomically."""
    from PIL import Image

    image = Image.fromarray(montage(slices, labels, **kwargs))  # type: ignore[arg-type]
    with atomic_write(path) as f:
        image.save(f, format="PNG")


__all__ = ["PALETTE", "montage", "save_montage"]
