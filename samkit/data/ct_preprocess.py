"""FLARE22-style CT/MR NIfTI volumes -> SAM-ready 2D slices (``scripts/preprocess_CT_MR_dataset.py``).

Input: ``<input-dir>/images/<case>_0000.nii.gz`` (CT in Hounsfield units) and
``<input-dir>/labels/<case>.nii.gz`` (organ ids 0..13; uncompressed ``.nii`` files are taken as well).
Labels that have an image are the cases, in sorted order; the first ``floor(n * (1 - val_fraction))``
go to ``train`` and the rest to ``val`` (FLARE22's 50 cases -> 40/10, the seed's split). Per case:

1. labels: ids in ``drop_labels`` (12, the duodenum) become 0; 3D components (26-connected, per id)
   under ``min_volume`` voxels are removed; then per axial slice 2D components (8-connected, per id)
   under ``min_area`` pixels;
2. only the axial slices that still hold a label are kept;
3. CT: clipped to the window [level - width/2, level + width/2] (default [-160, 240]) and min-max
   rescaled over the whole volume to uint8. MR: clipped to the 0.5-99.5 percentiles of the voxels
   > 0, rescaled likewise, voxels that were 0 stay 0;
4. each kept slice is resized to ``image_size`` squared (bicubic, anti-aliased), repeated to three
   channels and min-max normalised to [0, 1]; its label is resized nearest-neighbour.

Output: ``<output-dir>/{train,val}/images/CT_Abd_<case>-<NNN>.npy`` (image_size, image_size, 3)
float64 in [0, 1] and ``.../labels/CT_Abd_<case>-<NNN>.npy`` (image_size, image_size) uint8, NNN
the 0-based index among the kept slices (``MR_`` with ``--modality MR``). The rows of a slice run
along the volume's Y axis and its columns along X, as the seed's SimpleITK arrays (Z, Y, X) gave:
nibabel's (X, Y, Z) arrays are transposed to (Z, Y, X) on loading.

Every file is written under a hidden temporary name and renamed into place, and a case counts as
done only once ``<output-dir>/.done/<case>.json`` is written after its slices, so an interrupted run
leaves no half-written file and a re-run skips the finished cases (``--overwrite`` redoes them; a case
done with other settings is redone). A volume that cannot be read, or whose image and label shapes
differ, is named on one line and skipped; the run then ends with status 1.

    python scripts/preprocess_CT_MR_dataset.py                      # ./datasets/FLARE22Train -> ..._processed
    python scripts/preprocess_CT_MR_dataset.py --input-dir D --output-dir O --val-fraction 0.1
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np

from ..errors import DatasetError
from ..utils.files import atomic_write

PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_INPUT_DIR = "./datasets/FLARE22Train"
DEFAULT_OUTPUT_DIR = "./datasets/FLARE22Train_processed"
IMAGE_SUFFIX, LABEL_SUFFIX = "_0000.nii.gz", ".nii.gz"
SPLITS = ("train", "val")


class CaseError(DatasetError):
    """One case cannot be processed (unreadable file, shape mismatch); the run names it and goes on."""


@dataclass(frozen=True)
class Case:
    name: str  # the label file's name without its suffix: FLARE22_Tr_0001
    image: Path
    label: Path


# ---------------------------------------------------------------------------------------------------
# Pure array functions. Volumes are (Z, Y, X); slices (Y, X).


def rescale_to_uint8(volume: np.ndarray) -> np.ndarray:
    """Min-max rescale to 0-255 and truncate to uint8, as the seed did; a constant volume gives zeros.

    NaN voxels (e.g. outside a scan's field of view) give 0 and do not count for the range: with
    plain min/max a single NaN made the whole volume 0."""
    x = np.asarray(volume, dtype=np.float64)
    nan = np.isnan(x)
    finite = x[~nan] if nan.any() else x
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if not hi > lo:  # constant, empty, all-NaN or an infinite range
        return np.zeros(x.shape, dtype=np.uint8)
    out = (x - lo) / (hi - lo) * 255.0
    if nan.any():
        out[nan] = 0
    return out.astype(np.uint8)


def window_ct(volume: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    """Clip CT values (HU) to [level - width/2, level + width/2], then :func:`rescale_to_uint8`.

    The rescale uses the clipped volume's own min and max (the seed's rule), which are the window's
    bounds for any abdominal CT (air and bone lie outside the window). Any shape; returns uint8.
    """
    lower, upper = level - width / 2, level + width / 2
    return rescale_to_uint8(np.clip(np.asarray(volume, dtype=np.float64), lower, upper))


def normalize_mr(volume: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Clip MR values to percentiles of the voxels > 0, rescale to uint8; voxels that were 0 stay 0."""
    volume = np.asarray(volume)
    foreground = volume[(volume > 0) & np.isfinite(volume)]
    if foreground.size == 0:
        return np.zeros(volume.shape, dtype=np.uint8)
    lower, upper = np.percentile(foreground, percentiles)
    out = rescale_to_uint8(np.clip(volume.astype(np.float64), lower, upper))
    out[volume == 0] = 0
    return out


def _structure(connectivity: int, ndim: int) -> np.ndarray:
    """scipy.ndimage.label's neighbourhood for ``connectivity`` 4 or 8 (2D), 6, 18 or 26 (3D)."""
    from scipy import ndimage

    reach = {2: {4: 1, 8: 2}, 3: {6: 1, 18: 2, 26: 3}}[ndim].get(connectivity)
    if reach is None:
        raise ValueError(f"connectivity {connectivity} is not one of a {ndim}D image's")
    return ndimage.generate_binary_structure(ndim, reach)


def _remove_small(label: np.ndarray, min_size: int, structure: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    out = label.copy()
    for value in np.unique(label[label != 0]):
        components, _ = ndimage.label(label == value, structure=structure)
        small = np.bincount(components.ravel()) < min_size
        small[0] = False  # the rest of the volume, not a component
        out[small[components]] = 0
    return out


def remove_small_components_3d(label: np.ndarray, min_size: int, connectivity: int = 26) -> np.ndarray:
    """Zero the connected components of each id with fewer than ``min_size`` voxels, like cc3d.dust.

    ``label``: (Z, Y, X) integers; ``connectivity``: 6, 18 or 26. Returns a new array.
    """
    if label.ndim != 3:
        raise ValueError(f"need a (Z, Y, X) label, got shape {label.shape}")
    return _remove_small(label, min_size, _structure(connectivity, 3))


def remove_small_components_2d(label: np.ndarray, min_size: int, connectivity: int = 8) -> np.ndarray:
    """Per slice, zero the components of each id with fewer than ``min_size`` pixels.

    ``label``: one slice (Y, X) or a stack (Z, Y, X) whose slices are treated alone; ``connectivity``: 4
    or 8. Returns a new array.
    """
    if label.ndim not in (2, 3):
        raise ValueError(f"need a (Y, X) or (Z, Y, X) label, got shape {label.shape}")
    structure = _structure(connectivity, 2)
    if label.ndim == 3:
        # One labelling of the whole stack: neighbours only in the middle (same-z) plane.
        structure = np.stack([np.zeros_like(structure), structure, np.zeros_like(structure)])
    return _remove_small(label, min_size, structure)


def clean_labels(
    label: np.ndarray, drop_labels: Sequence[int] = (12,), min_volume: int = 1000, min_area: int = 100
) -> np.ndarray:
    """The seed's label cleanup of a (Z, Y, X) uint8 volume: drop ids, then 3D and 2D small components."""
    label = np.where(np.isin(label, list(drop_labels)), 0, label).astype(label.dtype)
    return remove_small_components_2d(remove_small_components_3d(label, min_volume), min_area)


def labelled_slices(label: np.ndarray) -> np.ndarray:
    """Indices (ascending, int64) of the axial slices of a (Z, Y, X) label that hold a non-zero id."""
    return np.flatnonzero(label.reshape(len(label), -1).any(axis=1))


def resize_slice(
    image: np.ndarray, label: np.ndarray, image_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """One (Y, X) uint8 image slice and its label -> (S, S, 3) float64 in [0, 1] and (S, S) uint8.

    The seed resized the 3-channel image; resizing one channel and repeating it gives the same values
    (to 1e-12: the channel axis is interpolated at its own sample points) about 15 times faster
    (0.1 s instead of 1.6 s for 512 -> 1024 on one core).
    """
    from skimage.transform import resize

    size = (image_size, image_size)
    if image.ndim == 2 and image.size and max(image.shape) <= image_size:
        # Upsampling: no anti-aliasing filter applies, and the spline interpolation is linear and
        # separable, so it is two matrix products (1e-13 from resize's; 48 -> 1024: 115 -> 6 ms).
        rows, cols = (_upsampling_matrix(n, image_size) for n in image.shape)
        resized = np.clip(rows @ image.astype(np.float64) @ cols.T, image.min(), image.max())
    else:
        resized = resize(image, size, order=3, mode="constant", preserve_range=True, anti_aliasing=True)
    lo, hi = resized.min(), resized.max()
    resized = (resized - lo) / max(hi - lo, 1e-8)  # a constant slice becomes all zeros
    image_out = np.repeat(resized[:, :, None], 3, axis=2)
    if label.ndim == 2 and label.size and max(label.shape) <= image_size:  # nearest: an index per axis
        rows, cols = (_nearest_indices(n, image_size) for n in label.shape)
        return image_out, label[rows[:, None], cols[None, :]].astype(np.uint8)
    label_out = resize(label, size, order=0, mode="constant", preserve_range=True, anti_aliasing=False)
    return image_out, label_out.astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _upsampling_matrix(n: int, size: int) -> np.ndarray:
    """The (size, n) matrix of skimage's order-3 ``resize`` from n to size >= n samples along one axis
    (mode "constant", no clipping): column j is the resized unit impulse at j. Along the other axis
    the identity keeps its n samples (a spline reproduces the values it interpolates)."""
    from skimage.transform import resize

    impulses = resize(np.eye(n), (size, n), order=3, mode="constant", preserve_range=True, clip=False)
    impulses.setflags(write=False)
    return impulses


@functools.lru_cache(maxsize=8)
def _nearest_indices(n: int, size: int) -> np.ndarray:
    """The source index of each of the size >= n samples of skimage's order-0 ``resize`` along one axis."""
    from skimage.transform import resize

    ramp = np.arange(n, dtype=np.float64)[:, None]
    indices = resize(ramp, (size, 1), order=0, mode="constant", preserve_range=True, anti_aliasing=False)
    indices = np.rint(indices[:, 0]).astype(np.intp)
    indices.setflags(write=False)
    return indices


# ---------------------------------------------------------------------------------------------------
# Files


def pair_cases(
    input_dir: PathLike, image_suffix: str = IMAGE_SUFFIX, label_suffix: str = LABEL_SUFFIX
) -> tuple[list[Case], list[str]]:
    """The cases (labels with an image, sorted by name) and one warning per unpaired file."""
    root = Path(input_dir)
    images_dir, labels_dir = root / "images", root / "labels"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: folder not found (expected {root}/images and {root}/labels)")

    warnings: list[str] = []

    def listing(folder: Path, suffix: str) -> dict[str, Path]:
        # Hidden files are skipped: macOS leaves "._<name>" copies in unpacked archives.
        found: dict[str, Path] = {}
        # A .nii.gz suffix takes the uncompressed .nii twin as well (both are NIfTI-1 to nibabel):
        # such cases were left out without a word. A name present as both keeps the given suffix.
        twins = [suffix, suffix[: -len(".gz")]] if suffix.endswith(".nii.gz") else [suffix]
        for twin in reversed(twins):
            for p in sorted(folder.glob(f"*{twin}")):
                if not p.is_file() or p.name.startswith("."):
                    continue
                name = p.name[: -len(twin)]
                if name in found:
                    warnings.append(f"{found[name]} is left out: {p} holds the same case")
                found[name] = p
        return found

    labels, images = listing(labels_dir, label_suffix), listing(images_dir, image_suffix)
    warnings += [
        f"{images[n]} has no label {labels_dir / (n + label_suffix)}"
        for n in sorted(images.keys() - labels.keys())
    ]
    warnings += [
        f"{labels[n]} has no image {images_dir / (n + image_suffix)}"
        for n in sorted(labels.keys() - images.keys())
    ]
    cases = [Case(n, images[n], labels[n]) for n in sorted(labels.keys() & images.keys())]
    if not cases:
        raise DatasetError(
            f"{root}: no label in labels/*{label_suffix} has an image images/<name>{image_suffix}"
        )
    return cases, warnings


def split_cases(cases: Sequence[Case], val_fraction: float = 0.2) -> dict[str, list[Case]]:
    """``train``: the first floor(n * (1 - val_fraction)) cases; ``val``: the rest."""
    n_train = math.floor(len(cases) * (1 - val_fraction) + 1e-9)  # 1e-9: 50 * 0.8 is 40, not 39.99..
    return {"train": list(cases[:n_train]), "val": list(cases[n_train:])}


def load_nifti_zyx(path: PathLike) -> np.ndarray:
    """A 3D NIfTI volume as a (Z, Y, X) array of its stored dtype (scaled if the header says so)."""
    return _read(_open(Path(path)), Path(path))


def _open(path: Path) -> Any:
    import nibabel as nib

    try:
        return nib.load(str(path))  # reads the header only
    except Exception as err:  # nibabel raises many kinds for a broken file
        raise CaseError(f"{path}: cannot read NIfTI ({_one_line(err)})") from None


def _read(image: Any, path: Path) -> np.ndarray:
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as err:  # a truncated .gz fails only when its data is read
        raise CaseError(f"{path}: cannot read NIfTI data ({_one_line(err)})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return data.transpose(2, 1, 0)  # nibabel's (X, Y, Z) -> (Z, Y, X)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a hidden temporary file in the same folder, renamed into place.

    Raises :class:`DatasetError` when the file cannot be written.
    """
    _write_atomic(path, lambda f: np.save(f, array, allow_pickle=False))


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    try:
        with atomic_write(path) as f:
            write(f)
    except OSError as err:  # a full disk or a read-only folder: the user's to fix
        raise DatasetError(f"{path}: cannot write ({err.strerror or err})") from None


# ---------------------------------------------------------------------------------------------------
# The dataset


def preprocess_ct_dataset(
    input_dir: PathLike = DEFAULT_INPUT_DIR,
    output_dir: PathLike = DEFAULT_OUTPUT_DIR,
    *,
    val_fraction: float = 0.2,
    modality: str = "CT",
    anatomy: str = "Abd",
    window_level: float = 40.0,
    window_width: float = 400.0,
    drop_labels: Sequence[int] = (12,),
    min_volume: int = 1000,
    min_area: int = 100,
    image_size: int = 1024,
    image_suffix: str = IMAGE_SUFFIX,
    label_suffix: str = LABEL_SUFFIX,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, int]]:
    """Preprocess a dataset as the module docstring describes; warnings and case errors go to stderr.

    Returns per split (``train``, ``val``) the counts of this run: ``cases`` and ``slices`` written,
    ``skipped`` (done before) and ``failed`` cases. Raises :class:`DatasetError` for a missing or
    empty input folder or an output folder that cannot be written, ``ValueError`` for bad settings.
    """
    from tqdm import tqdm

    if not 0 <= val_fraction <= 1 or modality not in ("CT", "MR") or window_width <= 0 or image_size < 1:
        raise ValueError("need 0 <= val_fraction <= 1, modality CT or MR, window_width > 0, image_size >= 1")
    settings = {
        "modality": modality, "anatomy": anatomy, "window": [window_level, window_width],
        "drop_labels": sorted(int(v) for v in drop_labels), "min_volume": min_volume, "min_area": min_area,
        "image_size": image_size,
    }  # fmt: skip
    cases, warnings = pair_cases(input_dir, image_suffix, label_suffix)
    for warning in warnings:
        print(f"warning: {warning}; skipped", file=sys.stderr)
    out = Path(output_dir)
    try:
        for split in SPLITS:
            for kind in ("images", "labels"):
                (out / split / kind).mkdir(parents=True, exist_ok=True)
        (out / ".done").mkdir(exist_ok=True)
    except OSError as err:
        raise DatasetError(f"{out}: cannot create the output folders ({err.strerror or err})") from None

    counts = {split: dict.fromkeys(("cases", "slices", "skipped", "failed"), 0) for split in SPLITS}
    jobs = [(split, case) for split, group in split_cases(cases, val_fraction).items() for case in group]
    with tqdm(
        jobs, desc="cases", unit="case", file=sys.stderr, disable=not progress, dynamic_ncols=True
    ) as bar:
        for split, case in bar:
            marker = out / ".done" / f"{case.name}.json"
            if not overwrite and _is_done(marker, out, case.name, split, settings):
                counts[split]["skipped"] += 1
                continue
            marker.unlink(missing_ok=True)  # an interrupted redo must not look done
            try:
                slices = _preprocess_case(case, out, split, settings)
            except CaseError as err:
                tqdm.write(f"error: {err}; skipped", file=sys.stderr)
                counts[split]["failed"] += 1
                continue
            text = json.dumps(_marker(split, slices, settings)).encode()
            _write_atomic(marker, lambda f, text=text: f.write(text))
            counts[split]["cases"] += 1
            counts[split]["slices"] += slices
    return counts


def _marker(split: str, slices: int, settings: dict[str, Any]) -> dict[str, Any]:
    return {"split": split, "slices": slices, "settings": settings}


def _output_paths(out: Path, split: str, prefix: str, case: str, index: int) -> tuple[Path, Path]:
    name = f"{prefix}{case}-{index:03d}.npy"
    return out / split / "images" / name, out / split / "labels" / name


def _is_done(marker: Path, out: Path, case: str, split: str, settings: dict[str, Any]) -> bool:
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
        # Through JSON, as stored: it turns tuples into lists.
        if done != json.loads(json.dumps(_marker(split, int(done["slices"]), settings))):
            return False
    except (OSError, ValueError, TypeError, KeyError):
        return False
    prefix = f"{settings['modality']}_{settings['anatomy']}_"
    paths = (_output_paths(out, split, prefix, case, i) for i in range(int(done["slices"])))
    return all(image.is_file() and label.is_file() for image, label in paths)


def _preprocess_case(case: Case, out: Path, split: str, settings: dict[str, Any]) -> int:
    """Write one case's slices (replacing any earlier ones) and return their number."""
    image_nii, label_nii = _open(case.image), _open(case.label)
    if tuple(image_nii.shape)[:3] != tuple(label_nii.shape)[:3]:
        raise CaseError(
            f"{case.image} has shape {tuple(image_nii.shape)} but {case.label} has shape {tuple(label_nii.shape)}"
        )
    raw = _read(label_nii, case.label)
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():  # NaN would become background silently
        raise CaseError(
            f"{case.label}: label ids must be finite numbers, found {np.sum(~np.isfinite(raw))} NaN/inf voxels"
        )
    if raw.size and (raw.min() < 0 or raw.max() > 255):
        raise CaseError(f"{case.label}: label ids must lie in 0..255, found {raw.min()}..{raw.max()}")
    raw = raw if np.issubdtype(raw.dtype, np.integer) else np.rint(raw)  # scaled labels come as floats
    label = clean_labels(
        raw.astype(np.uint8), settings["drop_labels"], settings["min_volume"], settings["min_area"]
    )
    keep = labelled_slices(label)
    prefix = f"{settings['modality']}_{settings['anatomy']}_"
    if len(keep):  # the seed read the image only when a slice is kept
        volume = _read(image_nii, case.image)
        volume = (
            window_ct(volume, *settings["window"]) if settings["modality"] == "CT" else normalize_mr(volume)
        )
        for i, z in enumerate(keep):
            image, label_slice = resize_slice(volume[z], label[z], settings["image_size"])
            image_path, label_path = _output_paths(out, split, prefix, case.name, i)
            save_npy(image_path, image)
            save_npy(label_path, label_slice)
    _remove_stale(out, prefix, case.name, split, len(keep))
    return len(keep)


def _remove_stale(out: Path, prefix: str, case: str, split: str, count: int) -> None:
    """Remove the case's slices of an earlier run that this run did not write (fewer slices, other split)."""
    import glob

    for other in SPLITS:
        for kind in ("images", "labels"):
            for path in (out / other / kind).glob(f"{glob.escape(prefix + case)}-*.npy"):
                index = path.name[len(prefix + case) + 1 : -len(".npy")]
                if index.isdigit() and (other != split or int(index) >= count):
                    path.unlink(missing_ok=True)
