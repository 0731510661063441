"""``samkit export-onnx``: write encoder.onnx and decoder.onnx (Meta's decoder interface), optionally verified.

    samkit export-onnx --model-type vit_b --checkpoint sam_vit_b_01ec64.pth --output onnx/vit_b --verify
    samkit export-onnx --model-type vit_b --checkpoint model.ckpt --output onnx/vit_b_int8 --precision int8

``--verify`` compares ONNX Runtime (CPU) with samkit's PyTorch model on the same weights (three image
shapes, five prompt kinds), prints a table and exits with status 1 when a figure is out of bounds.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ..errors import SamkitError
from .base import add_adapter_argument, checkpoint_or_none, run_standalone, with_adapter
from .outputs import check_not_input
from .outputs import check_output as check_writable_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ONNX export; the decoder's are those of Meta's ``scripts/export_onnx_model.py``."""
    from ..build import sam_model_registry
    from ..export.onnx import PRECISIONS

    parser.add_argument(
        "--model-type", default="vit_b", choices=list(sam_model_registry), help="default: vit_b"
    )
    parser.add_argument(
        "--checkpoint", metavar="PATH", help="weights: Meta's .pth, the seed's .ckpt or samkit's"
    )
    parser.add_argument(
        "--download", action="store_true", help="without --checkpoint, download the official weights (cached)"
    )
    add_adapter_argument(parser)
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="folder for encoder.onnx and decoder.onnx"
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="fp32 (default), fp16 or int8"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --output that holds a previous export (and nothing else)",
    )
    parser.add_argument(
        "--encoder-preprocess",
        action="store_true",
        help="the encoder takes the resized HxWx3 pixels (0-255) and normalises and pads them in the graph",
    )
    parser.add_argument(
        "--return-single-mask",
        action="store_true",
        help="the decoder returns only the best mask (Meta's flag; OnnxPredictor wants all masks)",
    )
    parser.add_argument(
        "--use-stability-score", action="store_true", help="replace predicted IoU with the stability score"
    )
    parser.add_argument(
        "--return-extra-metrics",
        action="store_true",
        help="the decoder also returns stability_scores and areas (for the web demo)",
    )
    parser.add_argument("--verify", action="store_true", help="compare with PyTorch; exit 1 if a bound fails")


def check_opset(opset: int) -> None:
    # Below 14 the exporter has no scaled_dot_product_attention; above 20 it is untested here.
    if not 14 <= opset <= 20:
        raise SamkitError(f"--opset {opset}: choose an opset from 14 to 20 (default 17)")


def run(args: argparse.Namespace) -> int:
    """Export SAM to ONNX (encoder + decoder with Meta's interface), optionally verify against PyTorch."""
    from ..build import build_model
    from ..checkpoints.download import download_checkpoint
    from ..export.onnx import MODEL_FILES, check_output, export_onnx, require_onnx

    # Every mistake is found before the model is built or anything is written.
    require_onnx()
    check_opset(args.opset)
    checkpoint = checkpoint_or_none(args)
    inputs = {"the checkpoint": checkpoint}
    check_writable_output(args.output, "--output", inputs, directory=True)
    written = [os.path.join(args.output, n + extra) for n in MODEL_FILES for extra in ("", ".data")]
    check_not_input(written, inputs, "--output")  # --overwrite replaces the folder's export files
    check_output(args.output, args.overwrite)
    if args.verify and (args.return_single_mask or args.use_stability_score or args.return_extra_metrics):
        raise SamkitError("--verify checks the default decoder: leave out the Meta decoder options to verify")
    if checkpoint is None and args.download:
        checkpoint = download_checkpoint(args.model_type)
    model = with_adapter(build_model(args.model_type, checkpoint), args).float().eval()
    if checkpoint is None:
        print(f"warning: {args.model_type} is exported with random weights", file=sys.stderr)
    try:
        paths = export_onnx(
            model,
            args.output,
            model_type=args.model_type,
            opset=args.opset,
            precision=args.precision,
            return_single_mask=args.return_single_mask,
            use_stability_score=args.use_stability_score,
            return_extra_metrics=args.return_extra_metrics,
            encoder_preprocess=args.encoder_preprocess,
            overwrite=args.overwrite,
        )
    except OSError as err:
        raise SamkitError(f"cannot write {args.output}: {err.strerror or err}") from None
    for path in paths.values():
        print(f"wrote {path}")
    if not args.verify:
        return 0
    from ..export.verify import format_table, verify_onnx

    rows = verify_onnx(model, args.output, args.precision)
    print(format_table(rows, args.precision))
    return 0 if all(r.ok for r in rows) else 1


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = "samkit export-onnx") -> int:
    """Run the export as a script: exit 0, 1 when verification fails, 2 with one ``error:`` line."""
    return run_standalone(add_arguments, run, argv, prog=prog, description=__doc__.split("\n\n")[0])


__all__ = ["add_arguments", "check_opset", "main", "run"]
