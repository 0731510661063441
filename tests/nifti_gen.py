"""Synthetic FLARE22-style NIfTI cases for the preprocessing tests.

Each case is a small abdominal-looking CT (int16 Hounsfield units in -1000..1500: air, a soft-tissue
body, fat, a bony spine, organs) and a uint8 label volume whose cleanup result is known exactly:

- three organs (ids from 1..13 without 12), boxes of at least 12x12 pixels on each of 8 slices, in
  three quadrants of the slice: every one survives the cleanup;
- junk the cleanup removes, in the fourth quadrant or touching the organs: a duodenum (id 12) box that
  is the only label on the last slice; a 12x12x2 box (288 voxels < 1000, though 144 pixels per slice)
  that is the only label on the first slice; a 4x4 patch (16 pixels < 100) on the slice above an organ,
  3D-connected to it (so only the 2D pass removes it).

Arrays here are in nibabel's (X, Y, Z) order; ``clean`` is the expected label after the cleanup.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ORGAN_HU = {1: 60, 2: 150, 3: 45, 4: 30, 5: 120, 6: 200, 7: 80, 8: 70, 9: 100, 10: 35, 11: 90, 13: 55}
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])  # FLARE22-like voxel spacing in mm


def case_name(index: int) -> str:
    """The label file stem of case ``index`` (0-based): FLARE22_Tr_0001, ..."""
    return f"FLARE22_Tr_{index + 1:04d}"


def synthetic_case(
    seed: int, index: int, shape: tuple[int, int, int] = (64, 64, 12)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ct int16, label uint8, clean uint8), each of ``shape`` (X, Y, Z); needs X, Y >= 48 and Z >= 11."""
    nx, ny, nz = shape
    if nx < 48 or ny < 48 or nz < 11:
        raise ValueError(f"shape must be at least (48, 48, 11), got {shape}")
    rng = np.random.default_rng([seed, index])
    label = np.zeros(shape, dtype=np.uint8)
    hx, hy = nx // 2, ny // 2
    quadrants = [(0, 0), (hx, 0), (0, hy), (hx, hy)]
    junk_x, junk_y = quadrants.pop(int(rng.integers(4)))
    organs = rng.choice(sorted(ORGAN_HU), size=3, replace=False)
    tails = []
    for organ, (qx, qy) in zip(organs, quadrants):
        sx, sy = rng.integers(12, min(hx, hy) - 6, size=2)
        x0, y0 = qx + 2 + rng.integers(hx - sx - 4), qy + 2 + rng.integers(hy - sy - 4)
        z0 = int(rng.integers(1, 3))  # organs on slices 1..9 at most: never on the first or last
        label[x0 : x0 + sx, y0 : y0 + sy, z0 : z0 + 8] = organ
        tails.append((organ, x0, y0, z0 + 8))
    clean = label.copy()
    for organ, x0, y0, z in tails[:2]:  # 3D-connected to its organ, 16 pixels in its slice
        label[x0 : x0 + 4, y0 : y0 + 4, z] = organ
    label[junk_x + 2 : junk_x + 16, junk_y + 2 : junk_y + 16, nz - 6 :] = (
        12  # 14x14x6 > 1000: only id 12 goes
    )
    label[junk_x + 4 : junk_x + 16, junk_y + 4 : junk_y + 16, 0:2] = organs[0]  # 288 voxels

    # CT: air, an elliptic body of soft tissue with a fat rim, a spine, organs at their own HU; noise.
    x, y = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), indexing="ij")
    r = (x / 0.95) ** 2 + (y / 0.85) ** 2
    ct = np.where(r < 1, np.where(r > 0.8, -100.0, 40.0), -1000.0)[:, :, None].repeat(nz, axis=2)
    spine = (x**2 + (y - 0.6) ** 2) < 0.02
    ct[spine] = 1200.0
    for organ, hu in ORGAN_HU.items():
        ct[label == organ] = hu
    ct += rng.normal(0, 25, size=shape)
    return np.clip(np.rint(ct), -1000, 1500).astype(np.int16), label, clean


def write_nifti(path: Path, data: np.ndarray) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(data, AFFINE)
    image.set_data_dtype(data.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def make_flare_nifti(root: Path, num_cases: int = 3, seed: int = 0, shape=(64, 64, 12)) -> Path:
    """Write ``root/images/<case>_0000.nii.gz`` and ``root/labels/<case>.nii.gz`` per case; return root."""
    root = Path(root)
    for index in range(num_cases):
        ct, label, _ = synthetic_case(seed, index, shape)
        write_nifti(root / "images" / f"{case_name(index)}_0000.nii.gz", ct)
        write_nifti(root / "labels" / f"{case_name(index)}.nii.gz", label)
    return root
