"""NIfTI volumes in and label volumes out, with the scan's geometry kept.

Reading (:func:`read_volume`): a ``.nii`` or ``.nii.gz`` file through nibabel, a 3D array in the file's
stored voxel order (X, Y, Z as nibabel gives it; a trailing axis of length 1 is dropped) with the
scaling of the header applied. Slicing: the stored axis that the affine maps closest to the patient's
superior-inferior direction is the axial one (:func:`axis_of`); a slice of axis ``a`` has the other
two stored axes in increasing order as its columns (X) and rows (Y): for the usual axial-last
storage, slice ``k`` of ``data[:, :, k]`` is shown as ``data[:, :, k].T`` (rows along the second
stored axis), as the FLARE preprocessing's (Z, Y, X) slices are. Prompts are given in those voxel
indices: ``Z`` along the slicing axis, ``X`` along the first other stored axis, ``Y`` along the second.

Writing (:func:`write_labels`): the label volume in the stored order with the input's affine and
header (data type uint8, or uint16 above 255; scaling reset), atomically; a ``.gz`` name is
gzip-compressed.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import SamkitError
from ..utils.files import atomic_write

AXES = {"sagittal": "LR", "coronal": "AP", "axial": "SI"}


class VolumeError(SamkitError, ValueError):
    """A volume file cannot be read, is not 3D, or a label volume cannot be written."""


@dataclass
class Volume:
    """A scan as read: ``data`` in stored order (3D), its ``affine`` (4x4), nibabel ``header`` and
    voxel ``spacing`` (mm per stored axis)."""

    data: np.ndarray
    affine: np.ndarray
    header: Any
    spacing: tuple[float, float, float]
    path: str


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3D NIfTI file; raises :class:`VolumeError` (one line naming the file) otherwise."""
    try:
        import nibabel as nib
    except ImportError:
        raise VolumeError("reading NIfTI needs nibabel: pip install 'samkit[train]' (or nibabel)") from None

    path = os.fspath(path)
    if os.path.isdir(path):
        raise VolumeError(_folder_message(path))
    if not os.path.isfile(path):
        raise VolumeError(f"{path}: not found")
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises many kinds for a broken or foreign file
        raise VolumeError(f"{path}: cannot read NIfTI ({_one_line(err)})") from None
    if not hasattr(image, "affine") or image.affine is None:
        raise VolumeError(f"{path}: not a NIfTI volume with an affine")
    shape = tuple(image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        what = "a 2D image" if len(shape) < 3 else f"a {len(shape)}D series"
        raise VolumeError(f"{path}: expected a 3D volume, got {what} of shape {tuple(image.shape)}")
    if min(shape) < 1:
        raise VolumeError(f"{path}: empty volume of shape {tuple(image.shape)}")
    try:
        data = np.asanyarray(image.dataobj).reshape(shape)
    except Exception as err:  # a truncated .gz fails only when its data is read
        raise VolumeError(f"{path}: cannot read NIfTI data ({_one_line(err)})") from None
    if data.dtype.kind not in "buif":
        raise VolumeError(f"{path}: voxels of type {data.dtype} are not intensities")
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    return Volume(data, np.asarray(image.affine, np.float64), image.header, spacing, path)  # type: ignore[arg-type]


def _folder_message(path: str) -> str:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return f"{path}: a folder; reading a DICOM series needs pydicom (pip install pydicom), or convert it to NIfTI"
    return f"{path}: a folder; DICOM series are not read yet: convert it to NIfTI (dcm2niix)"


def axis_of(affine: np.ndarray, name: str = "axial") -> int:
    """The stored axis (0, 1, 2) closest to the anatomical direction of a view (axial, coronal, sagittal)."""
    import nibabel as nib

    if name not in AXES:
        raise ValueError(f"unknown view {name!r}; choose one of {', '.join(AXES)}")
    codes = nib.aff2axcodes(affine)
    for i, code in enumerate(codes):
        if code in AXES[name]:
            return i
    raise VolumeError(f"the affine has no axis along the {name} direction (axis codes {codes})")


def to_slices(data: np.ndarray, axis: int) -> np.ndarray:
    """Stored (3D) -> (slices, rows, columns): the slicing axis first, then the second other stored
    axis as rows and the first as columns (see the module docstring). A view when possible."""
    others = [a for a in range(3) if a != axis]
    return np.transpose(data, (axis, others[1], others[0]))


def from_slices(slices: np.ndarray, axis: int) -> np.ndarray:
    """The inverse of :func:`to_slices`: (slices, rows, columns) -> stored order."""
    others = [a for a in range(3) if a != axis]
    order = (axis, others[1], others[0])
    return np.transpose(slices, np.argsort(order))


def slice_spacing(spacing: tuple[float, float, float], axis: int) -> tuple[float, float, float]:
    """The stored spacing reordered as :func:`to_slices` orders the axes."""
    others = [a for a in range(3) if a != axis]
    return spacing[axis], spacing[others[1]], spacing[others[0]]


def write_labels(path: str | os.PathLike, labels: np.ndarray, like: Volume) -> None:
    """Write ``labels`` (stored order, the shape of ``like.data``) as a NIfTI with ``like``'s affine
    and header; uint8, or uint16 when a label exceeds 255. Atomic; ``.gz`` names are compressed."""
    import nibabel as nib

    path = os.fspath(path)
    if labels.shape != like.data.shape:
        raise ValueError(f"labels of shape {labels.shape} for a volume of shape {like.data.shape}")
    dtype = np.uint8 if int(labels.max(initial=0)) <= 255 else np.uint16
    header = like.header.copy()
    kind = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = kind(np.asarray(labels, dtype=dtype), like.affine, header=header)
    image.set_data_dtype(dtype)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, int(labels.max(initial=0))
    data = image.to_bytes()
    try:
        with atomic_write(path) as f:
            f.write(gzip.compress(data, compresslevel=6) if path.endswith(".gz") else data)
    except OSError as err:
        raise VolumeError(f"{path}: cannot write ({err.strerror or err})") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


__all__ = [
    "AXES",
    "Volume",
    "VolumeError",
    "axis_of",
    "from_slices",
    "read_volume",
    "slice_spacing",
    "to_slices",
    "write_labels",
]
