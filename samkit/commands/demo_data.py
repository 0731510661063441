"""Write a demo photo to a file: ``python -m samkit.commands.demo_data OUT.png`` (``make demo`` uses it,
so the demo runs on a real photo without a download)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import SamkitError
from .base import run_standalone
from .demo_photos import DEFAULT_PHOTO, PHOTOS, write_photo


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
    return run_standalone(add_arguments, run, argv, prog="python -m samkit.commands.demo_data")


if __name__ == "__main__":
    sys.exit(main())
