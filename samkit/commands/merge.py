"""``samkit merge``: a base checkpoint with a LoRA adapter merged in, written as a plain checkpoint.

    samkit merge --model-type vit_b --checkpoint sam_vit_b_01ec64.pth \\
        --adapter work_dir/flare_lora/sam_final_adapter.safetensors --output flare_vit_b.pth

The output is a state dict with Meta's names (what ``sam_final.pth`` of the run holds), which the ONNX
export, the MindSpore writer, the web page and ``sam_model_registry`` read as any SAM checkpoint.
"""

from __future__ import annotations

import argparse

from ..errors import SamkitError
from .base import add_adapter_argument, checkpoint_or_none, with_adapter
from .outputs import check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..build import sam_model_registry

    parser.add_argument(
        "--model-type", default="vit_b", choices=list(sam_model_registry), help="default: vit_b"
    )
    parser.add_argument("--checkpoint", metavar="PATH", help="the base weights the adapter was trained on")
    parser.add_argument(
        "--download", action="store_true", help="without --checkpoint, download the official weights (cached)"
    )
    add_adapter_argument(parser)
    parser.add_argument("--output", required=True, metavar="PATH", help="the merged checkpoint (.pth)")


def run(args: argparse.Namespace) -> int:
    """Merge a LoRA adapter file into its base checkpoint and write a plain checkpoint."""
    from ..build import build_model
    from ..checkpoints.download import download_checkpoint
    from ..training.checkpointing import save_atomically

    if args.adapter is None:
        raise SamkitError("samkit merge needs --adapter PATH (a LoRA run's sam_final_adapter.safetensors)")
    checkpoint = checkpoint_or_none(args)
    inputs = {"the checkpoint": checkpoint, "the adapter": args.adapter}
    check_output(args.output, "--output", inputs, directory=False)
    if checkpoint is None and args.download:
        checkpoint = download_checkpoint(args.model_type)
    model = with_adapter(build_model(args.model_type, checkpoint), args)
    save_atomically(model.state_dict(), args.output)
    print(f"merged {args.adapter} into {checkpoint or 'random weights'} -> {args.output}")
    return 0
