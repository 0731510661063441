"""Reading users' own image and label files: any format Pillow reads, 8 to 32 bits, and the
intensity rule that turns them into the HxWx3 uint8 RGB that SAM trains on.

Intensity rule (:func:`to_training_rgb`):

- 8-bit images (grey, RGB, RGBA, palette, 1-bit) are used as they are: palettes are expanded to their
  colours, alpha is dropped, grey is repeated to three channels.
- Images of more than 8 bits (16-bit and 32-bit integer, float) are normalised per image by
  percentiles: the value at the ``low`` percentile becomes 0, the one at the ``high`` percentile
  255, values between are scaled linearly, values outside are clipped, then rounded. Percentiles
  are taken over all pixels and channels together; NaN and infinite pixels are left out of them
  and become 0. A constant image becomes 0 everywhere. ``percentiles=None`` uses samkit's
  inference rule instead (16-bit / 257, floats refused), so that a model fine-tuned on raw 16-bit
  files sees at inference what ``SamPredictor`` sees for the same file.

  At inference, feed the same uint8 picture: ``to_training_rgb(read_image_array(path), (1, 99))``
  gives it, and ``SamPredictor.set_image`` takes it unchanged.
"""

from __future__ import annotations

import os
import warnings
from typing import IO, Sequence

import numpy as np

from ..errors import DatasetError, ImageError
from ..utils.image import to_rgb_uint8

# The file endings read as images (Pillow reads them all); other files in a folder are ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".pgm", ".ppm", ".pnm")
DEFAULT_PERCENTILES = (1.0, 99.0)


def is_image_name(name: str) -> bool:
    """An image file name by its ending (case-insensitive), not hidden (``.DS_Store``, ``._x.png``)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def read_image_array(path: str | IO[bytes], name: str | None = None) -> np.ndarray:
    """An image file's pixels as stored: HxW or HxWxC, uint8 for 8-bit modes (palettes expanded to
    RGB/RGBA, 1-bit to 0/255), uint16 for 16-bit grey, int32 for 32-bit integer, float32 for float.
    DatasetError naming ``name`` (default ``path``) when it is not a readable image. Only the first
    frame of a multi-page file is read."""
    from PIL import Image, UnidentifiedImageError

    name = name or str(path)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                if mode in ("P", "PA"):
                    img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
                elif mode in ("1", "LA"):
                    img = img.convert("L")
                elif mode not in ("L", "RGB", "RGBA", "I", "F") and not mode.startswith("I;16"):
                    img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV
                array = np.asarray(img)
    except UnidentifiedImageError:
        raise DatasetError(f"cannot read image {name}: not an image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DatasetError(f"cannot read image {name}: {reason}") from None
    if array.size == 0:
        raise DatasetError(f"image {name} is empty ({array.shape})")
    return array


def read_label_array(path: str) -> np.ndarray:
    """A label image as an HxW integer array: palette PNGs give their indices (the labels, as in
    PASCAL VOC), 8/16/32-bit grey give their values, 1-bit gives 0/1, float gives its values when
    they are all whole numbers. DatasetError naming ``path`` for colour images and fractions."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode == "1":
                img = img.convert("L")
            array = np.asarray(img)
    except UnidentifiedImageError:
        raise DatasetError(f"cannot read label image {path}: not an image file") from None
    except (OSError, ValueError, SyntaxError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DatasetError(f"cannot read label image {path}: {reason}") from None
    if array.ndim != 2:
        raise DatasetError(
            f"label image {path} must have one channel (0 = background, one value per object), got mode {mode}"
        )
    if mode == "1":
        array = (array > 0).astype(np.uint8)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise DatasetError(
                f"label image {path} holds fractional or non-finite values; labels are integers"
            )
        array = array.astype(np.int64)
    if array.dtype.kind not in "ui":
        raise DatasetError(f"label image {path} must hold integers, got {array.dtype}")
    if (array < 0).any():
        raise DatasetError(f"label image {path} holds negative values; 0 is background, objects are > 0")
    return array


def to_training_rgb(
    array: np.ndarray, percentiles: Sequence[float] | None = DEFAULT_PERCENTILES
) -> np.ndarray:
    """An array from :func:`read_image_array` -> HxWx3 uint8 RGB by the module's intensity rule."""
    if array.dtype != np.uint8:
        if percentiles is None:
            return to_rgb_uint8(array)  # the inference rule: uint16 / 257, anything else refused
        array = normalize_intensity(array, percentiles)
    if array.ndim == 3 and array.shape[2] == 2:  # grey + alpha
        array = array[..., 0]
    return to_rgb_uint8(array)


def check_percentiles(percentiles: Sequence[float] | None) -> tuple[float, float] | None:
    """The ``percentiles`` setting of a folder dataset as a (low, high) tuple (None: the inference rule);
    ValueError unless 0 <= low < high <= 100."""
    if percentiles is None:
        return None
    values = tuple(float(p) for p in percentiles)
    if len(values) != 2 or not 0 <= values[0] < values[1] <= 100:
        raise ValueError(f"percentiles must be two numbers 0 <= low < high <= 100, got {percentiles}")
    return values


def normalize_intensity(array: np.ndarray, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> np.ndarray:
    """Any-dtype image -> uint8 of the same shape: the ``percentiles`` (low, high) over all finite
    pixels map to 0 and 255, linear between, clipped outside, rounded; non-finite pixels -> 0."""
    low, high = float(percentiles[0]), float(percentiles[1])
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(array.shape, dtype=np.uint8)
    lo, hi = np.percentile(values[finite], [low, high])
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.clip((np.where(finite, values, lo) - lo) * scale, 0.0, 255.0)
    return np.rint(out).astype(np.uint8)


def load_training_image(
    path: str | IO[bytes], percentiles: Sequence[float] | None = DEFAULT_PERCENTILES, name: str | None = None
) -> np.ndarray:
    """Read ``path`` (a file name or a binary file) and apply the intensity rule; DatasetError naming
    the file (or ``name``) on any failure."""
    array = read_image_array(path, name)
    try:
        return to_training_rgb(array, percentiles)
    except ImageError as err:
        raise DatasetError(f"image {name or path}: {err}") from None


def image_size_of(path: str) -> tuple[int, int]:
    """(H, W) from the file's header alone; DatasetError naming ``path`` when it is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            width, height = img.size
    except UnidentifiedImageError:
        raise DatasetError(f"cannot read image {path}: not an image file") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DatasetError(
            f"cannot read image {path}: {str(err).splitlines()[0] if str(err) else err}"
        ) from None
    return int(height), int(width)


def image_files_by_stem(folder: str, what: str) -> dict[str, str]:
    """``stem -> file name`` of the image files in ``folder``; DatasetError when two files share a
    stem (``a.png`` and ``a.tif``: which one is meant?)."""
    out: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        if not is_image_name(name) or not os.path.isfile(os.path.join(folder, name)):
            continue
        stem = os.path.splitext(name)[0]
        if stem in out:
            raise DatasetError(
                f"two {what} with the stem {stem!r}: {os.path.join(folder, out[stem])} and {os.path.join(folder, name)}"
            )
        out[stem] = name
    return out


def split_stems(stems: Sequence[str], val_fraction: float | None, seed: int, subset: str) -> list[str]:
    """The ``subset`` ("all", "train" or "val") of ``stems`` under a seeded split: a permutation of
    the sorted stems drawn from ``seed``, its first ``round(n * val_fraction)`` (at least 1 when
    ``val_fraction > 0``, at most n - 1) are validation. Returned in sorted order. The split
    depends only on the stems, ``val_fraction`` and ``seed``: train and validation never overlap."""
    ordered = sorted(stems)
    if subset == "all" or not val_fraction:
        if subset == "val":
            raise ValueError("subset 'val' needs a val_fraction")
        return ordered
    if subset not in ("train", "val"):
        raise ValueError(f"subset must be all, train or val, got {subset!r}")
    n = len(ordered)
    n_val = min(max(1, round(n * float(val_fraction))), n - 1) if n > 1 else 0
    order = np.random.default_rng([int(seed), 36]).permutation(n)
    val = set(order[:n_val].tolist())
    keep = [i for i in range(n) if (i in val) == (subset == "val")]
    return [ordered[i] for i in keep]
