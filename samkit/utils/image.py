"""Reading image files and converting arrays to the HxWx3 uint8 RGB that SAM takes.

The rule (documented in the README):
- uint8 arrays are used as they are; uint16 arrays (16-bit images) are scaled to 0-255 by /257
  with rounding, so 65535 -> 255;
- HxW and HxWx1 are grayscale and repeated to three channels;
- HxWx3 is RGB (or BGR when ``image_format="BGR"``);
- HxWx4 is RGBA (BGRA with ``image_format="BGR"``) and the alpha channel is dropped;
- anything else (floats, bools, other channel counts, empty images) raises :class:`ImageError`.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from ..errors import ImageError


def to_rgb_uint8(image: np.ndarray, image_format: str = "RGB") -> np.ndarray:
    """Convert an image array by the rule above. Returns a C-contiguous HxWx3 uint8 RGB array."""
    if image_format not in ("RGB", "BGR"):
        raise ImageError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    if not isinstance(image, np.ndarray):
        raise ImageError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(
            f"image dtype must be uint8 or uint16, got {image.dtype} (scale float images to 0-255 and cast to uint8)"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ImageError(f"image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"image is empty (shape {tuple(image.shape)})")
    image = image[..., :3]
    if image_format == "BGR":
        image = image[..., ::-1]
    return np.ascontiguousarray(image)


def load_image(path: str | os.PathLike, *, apply_exif: bool = True) -> np.ndarray:
    """Read an image file (any format Pillow reads, 8 or 16 bit) as HxWx3 uint8 RGB.

    The EXIF orientation is applied (a phone photo comes out upright) unless ``apply_exif=False``:
    datasets use the stored pixel grid, which is what COCO's and SA-1B's annotations refer to.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(f"image not found: {path}")
    if os.path.isdir(path):
        raise ImageError(f"expected an image file, got a directory: {path}")
    try:
        with warnings.catch_warnings():
            # Pillow warns from ~89 megapixels; such photos are fine, only its hard limit is an error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                if apply_exif:
                    img = ImageOps.exif_transpose(img)
                array = pil_to_array(img)
    except Image.DecompressionBombError as err:
        raise ImageError(f"cannot read image {path}: {err}") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read image {path}: not an image file") from None
    except (OSError, ValueError, SyntaxError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"cannot read image {path}: {reason}") from None
    return to_rgb_uint8(array)


def pil_to_array(img) -> np.ndarray:
    """A loaded Pillow image -> the array :func:`to_rgb_uint8` takes: 16-bit grey stays uint16 (scaled
    there, not truncated by Pillow's ``convert``), palettes and other modes become RGB or RGBA."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(img)
        if array.dtype != np.uint16:
            array = np.clip(array, 0, 65535).astype(np.uint16)
        return array
    if mode in ("RGB", "RGBA", "L"):
        return np.asarray(img)
    if mode == "LA":
        return np.asarray(img.convert("L"))
    if mode in ("P", "PA"):
        return np.asarray(img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB"))
    if mode == "F":
        raise ValueError("floating-point images are not supported")
    return np.asarray(img.convert("RGB"))
