"""What the single-image commands share (``box_inference.py``, ``point_inference.py``,
``text_inference.py``): their common flags, the checks made before any work, the model, the result
paths and the atomic writing of the picture and the ``.npz``.

Each command parses and checks its own prompts, then:

    device, dtype_name = resolve_precision(args)
    image = load_image(args.image_path)            # then check the prompts against image.shape[:2]
    checkpoint, output_dir, paths = prepare_outputs(args)
    model = build_sam(args, checkpoint, device, dtype_name)
    ...predict...
    write_results(output_dir, paths, draw, arrays)   # prints the "wrote ..." lines

Results go to ``<output-dir>/<image stem>_infer.png`` (the masks and prompts over the image) and
``<output-dir>/<image stem>_masks.npz``. Precision comes from ``--dtype`` or the seed's
``--amp-level``/``--amp_level`` O0 (float32) or O1/O2 (bfloat16 on CPU, float16 on other devices).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ..errors import SamkitError
from ..utils.files import atomic_write
from .base import (
    AddArguments,
    Run,
    add_model_arguments,
    check_device,
    checkpoint_or_none,
    run_standalone,
    with_adapter,
)
from .outputs import check_not_input, check_output, make_dirs

AMP_LEVELS: tuple[str, ...] = ("O0", "O1", "O2")
DEFAULT_OUTPUT_DIR = "."


def add_image_argument(parser: argparse.ArgumentParser) -> None:
    """``--image-path``/``--image_path`` (the seed's spelling), required."""
    parser.add_argument(
        "--image-path",
        "--image_path",
        dest="image_path",
        required=True,
        metavar="IMAGE",
        help="local image file (PNG, JPEG, ...)",
    )


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--output-dir``, the model flags (:func:`~samkit.commands.base.add_model_arguments`), the seed's
    ``--amp-level``/``--amp_level`` and its ignored ``--mode``."""
    parser.add_argument(
        "--output-dir",
        default=DEFAULT_OUTPUT_DIR,
        metavar="DIR",
        help="where <image stem>_infer.png and <image stem>_masks.npz go (default: the current directory)",
    )
    add_model_arguments(parser)
    # None tells an explicit --dtype apart from the default, which --amp-level may replace.
    parser.set_defaults(dtype=None)
    parser.add_argument(
        "--amp-level",
        "--amp_level",
        dest="amp_level",
        choices=AMP_LEVELS,
        help="the seed's precision flag, instead of --dtype: O0 = float32; O1, O2 = bfloat16 on CPU, "
        "float16 on other devices",
    )
    # The seed's MindSpore execution mode (graph or eager) has no meaning here; accepted and hidden.
    parser.add_argument("--mode", type=int, help=argparse.SUPPRESS)


def amp_dtype(amp_level: str, device_type: str) -> str:
    """The dtype name an ``--amp-level`` means on a device type: O0 float32, else a 16-bit float."""
    if amp_level not in AMP_LEVELS:
        raise ValueError(f"unknown amp level {amp_level!r}; choose one of {', '.join(AMP_LEVELS)}")
    if amp_level == "O0":
        return "float32"
    # CPUs compute float16 slowly or not at all, bfloat16 well; accelerators take float16 as the seed did.
    return "bfloat16" if device_type == "cpu" else "float16"


def resolve_precision(args: argparse.Namespace) -> tuple[Any, str]:
    """The checked ``--device`` and the dtype name from ``--dtype`` or ``--amp-level`` (not both)."""
    device = check_device(args.device)
    if args.dtype is not None and args.amp_level is not None:
        raise SamkitError(
            f"--dtype {args.dtype} and --amp-level {args.amp_level} both set the precision; give one of them"
        )
    dtype_name = args.dtype or (amp_dtype(args.amp_level, device.type) if args.amp_level else "float32")
    return device, dtype_name


def result_paths(output_dir: str, image_path: str) -> tuple[str, str]:
    """The picture and the mask archive written for ``image_path``."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return os.path.join(output_dir, f"{stem}_infer.png"), os.path.join(output_dir, f"{stem}_masks.npz")


def prepare_outputs(args: argparse.Namespace) -> tuple[Optional[str], str, tuple[str, str]]:
    """The checked checkpoint (None: download or random weights), output directory and result paths:
    a folder that can be written, results that overwrite neither the image nor the checkpoint."""
    checkpoint = checkpoint_or_none(args)
    inputs = {"the input image": args.image_path, "the checkpoint": checkpoint}
    output_dir = check_output(args.output_dir, "--output-dir", inputs, directory=True)
    paths = result_paths(output_dir, args.image_path)
    check_not_input(paths, inputs, "--output-dir")
    return checkpoint, output_dir, paths


def build_sam(
    args: argparse.Namespace,
    checkpoint: Optional[str],
    device: Any,
    dtype_name: str,
    build: Optional[Callable[[Optional[str]], Any]] = None,
) -> Any:
    """The model of ``--model-type`` with ``checkpoint`` (downloaded first with ``--download``), on
    ``device`` in ``dtype_name``; ``build(checkpoint)`` replaces :func:`samkit.build_model` when given.
    Warns on stderr when the weights are random (after the last check that can fail)."""
    import torch

    from ..build import build_model
    from ..checkpoints.download import download_checkpoint

    if checkpoint is None and args.download:
        checkpoint = download_checkpoint(args.model_type)
    model = build(checkpoint) if build is not None else build_model(args.model_type, checkpoint)
    model = with_adapter(model, args)
    model = model.to(device=device, dtype=getattr(torch, dtype_name))
    if checkpoint is None:  # after the last check that can fail: an error stays the only line on stderr
        print(
            f"warning: {args.model_type} runs with random weights: its masks are meaningless", file=sys.stderr
        )
    return model


def save_results(
    picture_path: str,
    masks_path: str,
    arrays: Mapping[str, np.ndarray],
    draw: Callable[[str], Any],
) -> None:
    """Write the ``.npz`` of ``arrays`` and the picture (``draw(picture_path)``), each atomically.

    The archive waits under a temporary name until the picture is in place: a failure leaves neither
    file new.
    """
    with atomic_write(masks_path) as f:
        np.savez_compressed(f, **arrays)
        draw(picture_path)  # inside the block: the archive is renamed into place only after it


def write_results(
    output_dir: str,
    paths: tuple[str, str],
    arrays: Mapping[str, np.ndarray],
    draw: Callable[[str], Any],
    lines: Sequence[str] = (),
) -> None:
    """Create ``output_dir``, save the results (:func:`save_results`), then print ``lines`` and the
    ``wrote ...`` lines. A file-system error is one :class:`SamkitError` line."""
    picture_path, masks_path = paths
    make_dirs(output_dir, "--output-dir")
    try:
        save_results(picture_path, masks_path, arrays, draw)
    except OSError as err:
        raise SamkitError(f"cannot write results to {output_dir}: {err.strerror or err}") from None
    for line in lines:
        print(line)
    print(f"wrote {picture_path}")
    print(f"wrote {masks_path}")


def draw_panel(image: np.ndarray, **panel: Any) -> Callable[[str], Any]:
    """A ``draw`` for :func:`save_results`: one :class:`~samkit.commands.visualize.Panel` over ``image``."""

    def draw(picture_path: str) -> Any:
        from .visualize import Panel, save_figure

        return save_figure(picture_path, image, [Panel(**panel)])

    return draw


def plural(count: int, what: str) -> str:
    return f"{count} {what}{'s' if count != 1 else ''}"


def main_for(
    add_arguments: AddArguments, run: Run, doc: Optional[str], default_prog: str
) -> Callable[..., int]:
    """A ``main(argv=None, prog=default_prog)`` running one command as a script: exit status 0, or 2 with
    one ``error:`` line for a user mistake."""

    def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = default_prog) -> int:
        return run_standalone(add_arguments, run, argv, prog=prog, description=(doc or "").split("\n\n")[0])

    main.__doc__ = f"Run {default_prog} as a script: exit status 0, or 2 with one ``error:`` line."
    return main


__all__ = [
    "AMP_LEVELS",
    "add_common_arguments",
    "add_image_argument",
    "amp_dtype",
    "build_sam",
    "draw_panel",
    "main_for",
    "prepare_outputs",
    "resolve_precision",
    "result_paths",
    "save_results",
    "write_results",
]
