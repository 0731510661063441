"""Intensities of a scan -> the 0-255 grey levels SAM is prompted on: CT windows, MR percentile scaling.

The default CT window is the one samkit's FLARE22 preprocessing (``samkit preprocess-ct``) trains on,
level 40 HU, width 400 HU (:func:`samkit.data.ct_preprocess.window_ct`), so a model fine-tuned on those
slices sees the same grey levels here; MR uses the same preprocessing's rule (0.5-99.5 percentiles of
the voxels > 0, :func:`samkit.data.ct_preprocess.normalize_mr`).
"""

from __future__ import annotations

from typing import Union

import numpy as np

from ..data.ct_preprocess import normalize_mr, rescale_to_uint8, window_ct

# name -> (level, width) in Hounsfield units. "abdomen" is the FLARE preprocessing's window.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
DEFAULT_WINDOW = "abdomen"
MR = "mr"  # the window name that asks for MR percentile scaling

Window = Union[str, tuple[float, float], None]


def parse_window(window: Window) -> tuple[float, float] | str | None:
    """A window as given (a preset name of :data:`CT_WINDOWS`, ``"mr"``, a (level, width) pair, a
    ``"L,W"`` string, or None) -> (level, width), ``"mr"`` or None. Raises ValueError naming it."""
    if window is None or (isinstance(window, str) and window.lower() in (MR, "none")):
        return None if window is None or window.lower() == "none" else MR
    if isinstance(window, str):
        name = window.strip().lower()
        if name in CT_WINDOWS:
            return CT_WINDOWS[name]
        parts = name.split(",")
        try:
            pair = tuple(float(p) for p in parts)
        except ValueError:
            pair = ()
        if len(pair) != 2:
            raise ValueError(
                f"window {window!r}: expected LEVEL,WIDTH in HU (e.g. 40,400), mr, none, or one of "
                f"{', '.join(CT_WINDOWS)}"
            )
        window = pair  # type: ignore[assignment]
    level, width = (float(v) for v in window)  # type: ignore[union-attr]
    if not (np.isfinite(level) and np.isfinite(width) and width > 0):
        raise ValueError(f"window {level:g},{width:g}: the level must be finite and the width positive")
    return level, width


def to_uint8(volume: np.ndarray, window: Window = None) -> np.ndarray:
    """Any-shape scan -> uint8 grey levels of the same shape.

    ``window``: a CT preset name or (level, width) in HU (clipped to the window, then rescaled as the
    FLARE preprocessing does), ``"mr"`` (percentile scaling), or None: a uint8 volume is used as it
    is, any other is min-max rescaled over the whole volume (NaN voxels give 0).
    """
    parsed = parse_window(window)
    volume = np.asarray(volume)
    if parsed is None:
        return volume if volume.dtype == np.uint8 else rescale_to_uint8(volume)
    if parsed == MR:
        return normalize_mr(volume)
    level, width = parsed  # type: ignore[misc]
    return window_ct(volume, level, width)


__all__ = ["CT_WINDOWS", "DEFAULT_WINDOW", "MR", "Window", "parse_window", "to_uint8"]
