"""``samkit volume`` and ``volume_inference.py``: segment organs in a CT/MR NIfTI scan from a box or a
few clicks on one slice each, by slice propagation (:func:`samkit.volume.segment_volume`).

    samkit volume --input ct.nii.gz --box 40,120,90,210,170 --checkpoint medsam_like.pth
    samkit volume --input ct.nii.gz --label 1 --box 40,120,90,210,170 --box 75,118,95,205,160 \
        --label 2 --point 52,300,200 --window 40,400 --output-dir out

Prompts are in voxel indices of the array as stored in the file: ``Z`` is the slice index along the
slicing axis (``--axis``, axial by default: the stored axis the affine maps to head-feet), ``X`` the
index along the first other stored axis and ``Y`` along the second (for the usual X, Y, Z storage:
X, Y and Z as stored). ``--label N`` makes the prompts after it object N (default 1); several prompts
of one label are one object, propagated between them. Writes ``<stem>_labels.nii.gz`` (the input's
affine and header, uint8 or uint16) and ``<stem>_montage.png`` (labelled slices with the masks) to
``--output-dir``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from ..errors import PromptError, SamkitError
from .base import add_model_arguments, check_device, checkpoint_or_none, run_standalone
from .outputs import check_not_input, check_output, make_dirs

VIEWS = ("axial", "coronal", "sagittal")


class _Prompt(argparse.Action):
    """Appends (flag, text, current --label) to ``namespace.prompts``; ``--label`` changes the label."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Optional[str] = None) -> None:
        if self.dest == "label":
            try:
                label = int(values)
            except ValueError:
                label = 0
            if not 1 <= label <= 65535:
                raise SamkitError(f"--label {values!r}: expected a whole number 1..65535")
            namespace.label = label
            return
        prompts = list(getattr(namespace, "prompts", None) or [])
        prompts.append((option_string, values, getattr(namespace, "label", 1)))
        namespace.prompts = prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``samkit volume``."""
    parser.add_argument("--input", required=True, metavar="SCAN", help="a .nii or .nii.gz volume (3D)")
    parser.add_argument("--box", action=_Prompt, dest="box", metavar="Z,X0,Y0,X1,Y1",
                        help="a box on slice Z (voxel indices of the stored array); repeatable")  # fmt: skip
    parser.add_argument("--point", action=_Prompt, dest="point", metavar="Z,X,Y[,LABEL]",
                        help="a click on slice Z, label 1 (foreground, default) or 0; repeatable")  # fmt: skip
    parser.add_argument("--label", action=_Prompt, dest="label", metavar="N",
                        help="the object id (1..65535) of the prompts that follow (default 1)")  # fmt: skip
    parser.set_defaults(prompts=[], label=1)
    parser.add_argument("--axis", default="axial", help="slicing axis: axial (default), coronal, sagittal, "
                        "or a stored axis 0, 1, 2")  # fmt: skip
    parser.add_argument("--window", default="abdomen", help="CT window: a preset (abdomen = the FLARE "
                        "preprocessing's 40,400; liver, lung, mediastinum, bone, brain), LEVEL,WIDTH in HU, "
                        "mr (0.5-99.5 percentile scaling) or none (min-max); default abdomen")  # fmt: skip
    parser.add_argument(
        "--iou-thresh", type=float, default=0.5, help="stop where the predicted IoU falls below (default 0.5)"
    )
    parser.add_argument(
        "--min-area", type=int, default=10, help="stop where the mask has fewer pixels (default 10)"
    )
    parser.add_argument(
        "--box-margin",
        type=float,
        default=0.1,
        help="widen the carried box by this share of its size per side (default 0.1)",
    )
    parser.add_argument(
        "--use-points",
        action="store_true",
        help="also prompt each next slice with the previous mask's most interior point",
    )
    parser.add_argument(
        "--use-mask-input",
        action="store_true",
        help="also give the previous slice's low-res logits as mask_input",
    )
    parser.add_argument(
        "--batch-size", type=int, default=4, help="slices embedded per encoder call (default 4)"
    )
    parser.add_argument(
        "--embeddings",
        metavar="DIR",
        help="cache the slice embeddings here (samkit embed's format) and reuse them",
    )
    parser.add_argument(
        "--output-dir",
        default=".",
        metavar="DIR",
        help="gets <stem>_labels.nii.gz and <stem>_montage.png (default .)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)


def volume_stem(path: str) -> str:
    name = os.path.basename(path.rstrip("/"))
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def parse_prompts(prompts: Sequence[tuple[str, str, int]]) -> list[Any]:
    """The (flag, text, label) triples of the command line as :class:`SlicePrompt`\\ s."""
    from ..volume.propagate import SlicePrompt
    from .prompt_args import parse_box, parse_point

    out = []
    for flag, text, label in prompts:
        head, _, rest = str(text).partition(",")
        try:
            z = int(head)
        except ValueError:
            raise PromptError(f"{flag} {text!r}: the slice Z must be a whole number, got {head!r}") from None
        if flag == "--box":
            try:
                box = parse_box(rest)
            except PromptError:
                raise PromptError(f"--box {text!r}: expected Z,X0,Y0,X1,Y1 (5 numbers)") from None
            out.append(SlicePrompt(slice=z, box=box, label=label))
        else:
            try:
                x, y, point_label = parse_point(rest)
            except PromptError:
                raise PromptError(f"--point {text!r}: expected Z,X,Y or Z,X,Y,LABEL (label 0 or 1)") from None
            out.append(SlicePrompt(slice=z, points=[(x, y)], point_labels=[point_label], label=label))
    return out


def run(args: argparse.Namespace) -> int:
    """Segment objects through a NIfTI scan from prompts on a few slices (slice propagation)."""
    import numpy as np
    import torch

    from ..volume import nifti
    from ..volume.intensity import parse_window, to_uint8
    from ..volume.montage import save_montage
    from ..volume.propagate import check_prompts, segment_volume_objects

    if not args.prompts:
        raise SamkitError("give at least one --box Z,X0,Y0,X1,Y1 or --point Z,X,Y")
    prompts = parse_prompts(args.prompts)
    try:
        window = parse_window(args.window)
    except ValueError as err:
        raise SamkitError(f"--window: {err}") from None
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--min-area", args.min_area, 0)):
        if value < low:
            raise SamkitError(f"{flag} {value}: must be at least {low}")
    if not 0 <= args.box_margin <= 5 or not 0 <= args.iou_thresh <= 1:
        raise SamkitError("--box-margin must be 0..5 and --iou-thresh 0..1")
    volume = nifti.read_volume(args.input)
    axis = _axis(args.axis, volume.affine)
    grey = nifti.to_slices(to_uint8(volume.data, window), axis)
    check_prompts(prompts, grey.shape)
    checkpoint = checkpoint_or_none(args)
    device = check_device(args.device)
    stem = volume_stem(args.input)
    labels_path = os.path.join(args.output_dir, f"{stem}_labels.nii.gz")
    montage_path = os.path.join(args.output_dir, f"{stem}_montage.png")
    inputs = {"the input scan": args.input, "the checkpoint": checkpoint}
    check_output(args.output_dir, "--output-dir", inputs, directory=True)
    check_not_input([labels_path, montage_path], inputs, "--output-dir")
    if args.embeddings:
        check_output(args.embeddings, "--embeddings", inputs, directory=True)

    from ..build import build_model
    from ..checkpoints.download import download_checkpoint
    from ..predictor import SamPredictor
    from ..volume.slices import SliceEmbeddings

    if checkpoint is None and args.download:
        checkpoint = download_checkpoint(args.model_type)
    model = (
        build_model(args.model_type, checkpoint).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    )
    if checkpoint is None:
        print(
            f"warning: {args.model_type} runs with random weights: its masks are meaningless", file=sys.stderr
        )
    predictor = SamPredictor(model)
    embeddings = SliceEmbeddings(
        predictor,
        grey,
        batch_size=args.batch_size,
        cache_dir=args.embeddings,
        model_type=args.model_type,
        name=stem,
    )
    labels, results = segment_volume_objects(
        predictor, grey, prompts, embeddings=embeddings, iou_thresh=args.iou_thresh, min_area=args.min_area,
        box_margin=args.box_margin, use_points=args.use_points, use_mask_input=args.use_mask_input,
        progress=not args.no_progress,
    )  # fmt: skip
    make_dirs(args.output_dir, "--output-dir")
    nifti.write_labels(labels_path, nifti.from_slices(labels, axis), volume)
    save_montage(montage_path, grey, labels)
    voxel_ml = float(abs(np.prod(volume.spacing))) / 1000.0
    for result in results:
        zs = sorted(result.masks)
        voxels = int((labels == result.label).sum())
        span = f"slices {zs[0]}..{zs[-1]}" if zs else "no slice"
        print(f"label {result.label}: {span} ({len(zs)} slices, {voxels} voxels, {voxels * voxel_ml:.1f} mL)")
    cached = f"; {embeddings.loaded} slice embeddings read from {args.embeddings}" if args.embeddings else ""
    print(f"wrote {labels_path} and {montage_path} ({embeddings.computed} slices embedded{cached})")
    return 0


def _axis(text: str, affine: Any) -> int:
    from ..volume import nifti

    if text in ("0", "1", "2"):
        return int(text)
    if text not in VIEWS:
        raise SamkitError(f"--axis {text!r}: expected axial, coronal, sagittal, 0, 1 or 2")
    try:
        return nifti.axis_of(affine, text)
    except nifti.VolumeError as err:
        raise SamkitError(f"--axis {text}: {err}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``volume_inference.py``: exit status 0, or 2 with one error line."""
    return run_standalone(add_arguments, run, argv, prog="volume_inference.py", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
