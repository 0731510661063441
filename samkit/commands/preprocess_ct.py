"""``samkit preprocess-ct`` and ``scripts/preprocess_CT_MR_dataset.py``: FLARE22-style CT/MR NIfTI
volumes -> 2D .npy slices (the work is :func:`samkit.data.ct_preprocess.preprocess_ct_dataset`)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..data.ct_preprocess import (
    DEFAULT_INPUT_DIR,
    DEFAULT_OUTPUT_DIR,
    IMAGE_SUFFIX,
    LABEL_SUFFIX,
    preprocess_ct_dataset,
)
from .base import run_standalone
from .outputs import check_output

INTERRUPTED = 130  # 128 + SIGINT


def _number(convert: Callable[[str], Any], low: float, high: float = math.inf) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert``, then check ``low <= value <= high`` (finite)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if not low <= value <= high:
            bounds = f"at least {low}" if high == math.inf else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value

    return parse


# (flags, argparse keywords): the first flag names a keyword of preprocess_ct_dataset; "(default: ..)"
# is added to each help.
OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--input-dir", "--root"), dict(default=DEFAULT_INPUT_DIR, help="holds images/ and labels/")),
    (("--output-dir", "--save-dir"), dict(default=DEFAULT_OUTPUT_DIR, help="gets train/ and val/")),
    (("--modality",), dict(choices=("CT", "MR"), default="CT", help="intensity rule and name prefix")),
    (("--anatomy",), dict(default="Abd", help="second part of the name prefix")),
    (("--val-fraction",), dict(type=_number(float, 0, 1), default=0.2, help="share of the cases (the last) for val")),
    (("--window-level",), dict(type=_number(float, -math.inf), default=40.0, help="CT window centre in HU")),
    (("--window-width",), dict(type=_number(float, 1e-6), default=400.0, help="CT window width in HU")),
    (("--drop-labels",), dict(type=_number(int, 1, 255), nargs="*", default=[12], metavar="ID", help="ids set to 0")),
    (("--min-volume",), dict(type=_number(int, 0), default=1000, help="3D components (26-connected, per id) with fewer voxels are removed")),
    (("--min-area",), dict(type=_number(int, 0), default=100, help="then 2D ones (8-connected) per slice with fewer pixels")),
    (("--image-size",), dict(type=_number(int, 1), default=1024, help="side of the square output slices")),
    (("--image-suffix",), dict(default=IMAGE_SUFFIX, help="image file name = case name + this (a .nii.gz suffix also takes .nii)")),
    (("--label-suffix",), dict(default=LABEL_SUFFIX, help="label file name = case name + this (a .nii.gz suffix also takes .nii)")),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for flags, options in OPTIONS:
        parser.add_argument(*flags, **{**options, "help": options["help"] + " (default: %(default)s)"})
    parser.add_argument("--overwrite", action="store_true", help="redo the cases whose outputs exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Turn FLARE22-style CT/MR NIfTI volumes into SAM-ready 2D .npy slices split into train and val."""
    names = [flags[0][2:].replace("-", "_") for flags, _ in OPTIONS]
    check_output(args.output_dir, "--output-dir", {"the input folder": args.input_dir}, directory=True)
    try:
        counts = preprocess_ct_dataset(
            **{name: getattr(args, name) for name in names},
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print("error: interrupted; finished cases are complete, a re-run does the rest", file=sys.stderr)
        return INTERRUPTED
    for split, c in counts.items():
        done = f"; {c['skipped']} case(s) done before (--overwrite redoes them)" if c["skipped"] else ""
        where = Path(args.output_dir) / split
        print(f"{split}: {c['slices']} slices of {c['cases']} case(s) in {where}{done}")
    failed = sum(c["failed"] for c in counts.values())
    if failed:
        print(f"error: {failed} case(s) could not be processed (named above)", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``scripts/preprocess_CT_MR_dataset.py``: exit status 0, 1 (some cases failed), 2 (bad input) or 130."""
    prog, description = "preprocess_CT_MR_dataset.py", (run.__doc__ or "").strip()
    return run_standalone(add_arguments, run, argv, prog=prog, description=description)


if __name__ == "__main__":
    sys.exit(main())
