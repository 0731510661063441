"""Demo photos shipped inside scikit-image, written to a file: ``python -m samkit.demo_data OUT.png``.

Used by ``make demo``, so the demo runs on a real photo without a download.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from typing import Optional, Sequence

from .errors import SamkitError

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
    directory, base = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.part")
    try:
        with open(tmp, "xb") as f:
            image.save(f, format=Image.registered_extensions().get(os.path.splitext(base)[1].lower(), "PNG"))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUT", help="file to write, e.g. outputs/demo/astronaut.png")
    parser.add_argument(
        "--name", default=DEFAULT_PHOTO, choices=list(PHOTOS), help=f"default: {DEFAULT_PHOTO}"
    )


def run(args: argparse.Namespace) -> int:
    """Write a demo photo shipped with scikit-image to a file."""
    try:
        path = write_photo(args.output, args.name)
    except OSError as err:
        raise SamkitError(f"cannot write {args.output}: {err.strerror or err}") from None
    print(f"wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import run_standalone

    return run_standalone(add_arguments, run, argv, prog="python -m samkit.demo_data")


if __name__ == "__main__":
    sys.exit(main())
