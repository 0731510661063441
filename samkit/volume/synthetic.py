"""Generated CT-like volumes with organ labels, for demos, tests and the 3D evaluation's smoke runs.

A volume (Z, Y, X) in Hounsfield units (int16): air, an elliptic body of soft tissue with a fat rim,
a bony spine, and four organs of their own intensities, each varied per case:

1. "liver": a large ellipsoid (90 HU);
2. "kidney": a small ellipsoid (200 HU);
3. "aorta": a tube along Z whose centre drifts across slices (160 HU);
4. "fork": one blob on its lower slices that splits in two on its upper ones (two tubes drifting
   apart; 130 HU), an organ whose mask has two parts on some slices.

The voxel spacing is anisotropic (``spacing`` (z, y, x) mm, thick slices by default), and the labels
are the organ ids. :func:`write_synthetic_dataset` writes FLARE22-style NIfTI folders (``images/<case>_0000.nii.gz``
and ``labels/<case>.nii.gz``, nibabel's (X, Y, Z) order with the spacing in the affine).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

ORGANS: dict[int, str] = {1: "liver", 2: "kidney", 3: "aorta", 4: "fork"}
ORGAN_HU: dict[int, float] = {1: 90.0, 2: 200.0, 3: 160.0, 4: 130.0}
DEFAULT_SHAPE = (24, 96, 112)  # (Z, Y, X)
DEFAULT_SPACING = (2.5, 0.8, 0.8)  # (z, y, x) mm


def synthetic_volume(
    seed: int,
    shape: Sequence[int] = DEFAULT_SHAPE,
    noise: float = 15.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(ct int16 HU, label uint8), both of ``shape`` (Z, Y, X), drawn from ``seed``. Needs Z >= 12."""
    nz, ny, nx = (int(s) for s in shape)
    if nz < 12 or ny < 32 or nx < 32:
        raise ValueError(f"shape must be at least (12, 32, 32), got {tuple(shape)}")
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(
        np.linspace(0, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij"
    )
    label = np.zeros((nz, ny, nx), dtype=np.uint8)

    def jitter(value: float, spread: float) -> float:
        return value + float(rng.uniform(-spread, spread))

    def ellipsoid(cz: float, cy: float, cx: float, rz: float, ry: float, rx: float) -> np.ndarray:
        return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1

    # 1 liver: large, left of the image; 2 kidney: small, lower right.
    label[ellipsoid(jitter(0.5, 0.05), jitter(-0.1, 0.05), jitter(-0.4, 0.05),
                    jitter(0.38, 0.04), jitter(0.35, 0.04), jitter(0.3, 0.04))] = 1  # fmt: skip
    label[ellipsoid(jitter(0.5, 0.06), jitter(0.35, 0.05), jitter(0.5, 0.04),
                    jitter(0.25, 0.04), jitter(0.16, 0.02), jitter(0.12, 0.02))] = 2  # fmt: skip
    # 3 aorta: a tube drifting in X over slices z0..z1.
    z0, z1 = jitter(0.08, 0.04), jitter(0.92, 0.04)
    cx = jitter(0.05, 0.05) + jitter(0.0, 0.1) * (z - 0.5)
    tube = ((y - jitter(0.35, 0.03)) ** 2 + (x - cx) ** 2 <= jitter(0.09, 0.01) ** 2) & (z >= z0) & (z <= z1)
    label[tube & (label == 0)] = 3
    # 4 fork: two tubes, together below z_split, apart above it.
    fz0, fz1, split = jitter(0.15, 0.05), jitter(0.85, 0.05), jitter(0.45, 0.05)
    apart = np.clip((z - split) / max(fz1 - split, 1e-3), 0, 1) * jitter(0.2, 0.03)
    fy, radius = jitter(-0.45, 0.04), jitter(0.08, 0.01)
    fork = np.zeros_like(tube)
    for sign in (-1, 1):
        fork |= (y - fy) ** 2 + (x - (0.15 + sign * apart)) ** 2 <= radius**2
    label[fork & (z >= fz0) & (z <= fz1) & (label == 0)] = 4

    r = (x / 0.95) ** 2 + (y / 0.85) ** 2
    ct = np.where(r < 1, np.where(r > 0.8, -100.0, -20.0), -1000.0)
    ct[(x**2 + (y - 0.68) ** 2) < 0.01] = 700.0  # spine
    for organ, hu in ORGAN_HU.items():
        ct[label == organ] = hu + rng.uniform(-10, 10)
    ct += rng.normal(0, noise, size=ct.shape)
    return np.clip(np.rint(ct), -1000, 1500).astype(np.int16), label


def zyx_to_nifti_affine(spacing: Sequence[float]) -> np.ndarray:
    """The 4x4 affine of a volume stored in nibabel's (X, Y, Z) order with (z, y, x) ``spacing``."""
    return np.diag([float(spacing[2]), float(spacing[1]), float(spacing[0]), 1.0])


def write_synthetic_dataset(
    root: str | os.PathLike,
    num_cases: int = 3,
    *,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
) -> Path:
    """Write ``root/images/case_NNN_0000.nii.gz`` and ``root/labels/case_NNN.nii.gz`` (FLARE22's
    layout; int16 HU and uint8 labels) for cases drawn from seeds ``seed``, ``seed + 1``, ...; returns
    ``root``."""
    import nibabel as nib

    from ..utils.files import atomic_write

    root = Path(root)
    affine = zyx_to_nifti_affine(spacing)
    for i in range(num_cases):
        ct, label = synthetic_volume(seed + i, shape)
        for sub, name, data in (
            ("images", f"case_{i:03d}_0000.nii.gz", ct),
            ("labels", f"case_{i:03d}.nii.gz", label),
        ):
            image = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine)
            image.set_data_dtype(data.dtype)
            (root / sub).mkdir(parents=True, exist_ok=True)
            with atomic_write(root / sub / name) as f:
                f.write(_gzip(image.to_bytes()))
    return root


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=1, mtime=0)


__all__ = [
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING",
    "ORGANS",
    "ORGAN_HU",
    "synthetic_volume",
    "write_synthetic_dataset",
    "zyx_to_nifti_affine",
]
