"""Demo photos shipped inside scikit-image (real photos without a download), and writing one to a file."""

from __future__ import annotations

import os

from ..errors import SamkitError
from ..utils.files import atomic_write

# name -> the skimage.data function that returns it (all RGB photos, public domain or CC0)
PHOTOS: dict[str, str] = {
    "astronaut": "astronaut",  # 512x512, Eileen Collins (NASA)
    "coffee": "coffee",  # 400x600, a cup of coffee
    "chelsea": "chelsea",  # 300x451, a cat
    "rocket": "rocket",  # 427x640, a rocket on the launch pad
}
DEFAULT_PHOTO = "astronaut"


def load_photo(name: str = DEFAULT_PHOTO):
    """The named photo as an HxWx3 uint8 RGB array."""
    if name not in PHOTOS:
        raise ValueError(f"unknown demo photo {name!r}; choose one of {', '.join(PHOTOS)}")
    try:
        from skimage import data
    except ImportError:
        raise SamkitError("the demo photos come with scikit-image: pip install 'samkit[demo]'") from None
    return getattr(data, PHOTOS[name])()


def write_photo(path: str | os.PathLike, name: str = DEFAULT_PHOTO) -> str:
    """Write the named photo to ``path`` (format from the extension; parent folders created), atomically."""
    from PIL import Image

    path = os.path.abspath(os.fspath(path))
    image = Image.fromarray(load_photo(name))
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    with atomic_write(path, make_parents=True) as f:
        image.save(f, format=fmt)
    return path
