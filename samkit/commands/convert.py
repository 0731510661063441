"""``samkit convert``: users' data and weights into standard files.

- ``--to coco SOURCE OUT``: a mask folder (``images/`` + ``labels/`` or ``masks/``) or a labelme
  folder -> ``OUT/images/*.png`` + ``OUT/instances.json`` (:mod:`samkit.data.coco_export`).
- ``--to hf CHECKPOINT OUT``: any SAM checkpoint samkit reads -> a folder that
  ``transformers.SamModel.from_pretrained(OUT)`` loads (:mod:`samkit.checkpoints.hf`).
- ``--to safetensors CHECKPOINT OUT.safetensors``: the same weights with samkit's (Meta's) names.

Everything is read and checked before the first file is written; each file is written atomically.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import DatasetError, SamkitError
from .outputs import check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, choices=("coco", "hf", "safetensors"), help="what to write")
    parser.add_argument(
        "source", metavar="SOURCE", help="a mask or labelme folder (coco), a checkpoint (hf, safetensors)"
    )
    parser.add_argument("output", metavar="OUT", help="the output folder (coco, hf) or .safetensors file")
    parser.add_argument("--semantic", action="store_true", help="coco from label images: values are classes")
    parser.add_argument(
        "--min-area", type=int, default=0, metavar="PIXELS", help="coco: drop smaller objects"
    )
    parser.add_argument(
        "--percentiles",
        type=float,
        nargs=2,
        default=[1.0, 99.0],
        metavar=("LOW", "HIGH"),
        help="coco: pictures of more than 8 bits map these percentiles to 0 and 255 (default: 1 99)",
    )


def run(args: argparse.Namespace) -> int:
    """Convert a mask/labelme folder to COCO, or a SAM checkpoint to a Hugging Face folder or safetensors."""
    inputs = {"SOURCE": args.source}
    if args.to == "coco":
        check_output(args.output, "OUT", inputs, directory=True)
        if os.path.abspath(args.output) == os.path.abspath(args.source):
            raise SamkitError(f"OUT {args.output} is SOURCE; write the COCO files to another folder")
        from ..data.coco_export import write_coco

        counts = write_coco(_folder_dataset(args), args.output)
        print(
            f"{counts['images']} images, {counts['annotations']} objects -> {os.path.join(args.output, 'instances.json')}"
        )
        return 0
    state = _checked_state(args.source)
    from ..checkpoints.hf import safetensors_bytes
    from ..checkpoints.hf_write import write_hf_folder

    if args.to == "hf":
        check_output(args.output, "OUT", inputs, directory=True)
        write_hf_folder(state, args.output, args.source)
    else:
        check_output(args.output, "OUT", inputs, directory=False)
        from ..utils.files import atomic_write

        data = safetensors_bytes(state)
        with atomic_write(args.output) as f:
            f.write(data)
    print(f"{len(state)} tensors -> {args.output}")
    return 0


def _folder_dataset(args: argparse.Namespace) -> Any:
    from ..data import LabelmeDataset, MaskFolderDataset

    source = args.source
    if not os.path.isdir(source):
        raise DatasetError(
            f"SOURCE {source}: not a folder (a mask folder with images/, or labelme .json files)"
        )
    low, high = args.percentiles
    if not 0 <= low < high <= 100:
        raise SamkitError(f"--percentiles must be two numbers 0 <= LOW < HIGH <= 100, got {low:g} {high:g}")
    if args.min_area < 0:
        raise SamkitError(f"--min-area must not be negative, got {args.min_area}")
    common = {"min_area": args.min_area, "percentiles": args.percentiles}
    if os.path.isdir(os.path.join(source, "images")):
        return MaskFolderDataset(source, semantic=args.semantic, **common)
    if not any(n.lower().endswith(".json") for n in os.listdir(source)):
        raise DatasetError(
            f"SOURCE {source}: neither a mask folder (no images/) nor a labelme folder (no .json files)"
        )
    if args.semantic:
        raise SamkitError("--semantic is for label images (a folder with images/ and labels/)")
    return LabelmeDataset(source, **common)


def _checked_state(path: str) -> dict:
    """The checkpoint's SAM weights, loaded strictly into a model of their own size first (names and
    shapes checked), in their stored dtype."""
    from ..build import (
        ENCODER_CONFIGS,
        checkpoint_image_size,
        identify_model_size,
        load_checkpoint,
        read_checkpoint,
        sam_model_registry,
    )
    from ..errors import CheckpointError

    state = read_checkpoint(path)
    size = identify_model_size(state)
    if size not in ENCODER_CONFIGS:
        raise CheckpointError(
            f"{path} is not a SAM checkpoint of a known size ({size or 'no image encoder'})"
        )
    text_dim = None
    if "prompt_encoder.text_proj.weight" in state:
        text_dim = state["prompt_encoder.text_proj.weight"].shape[1]
    sam = sam_model_registry[size](text_feature_dim=text_dim, image_size=checkpoint_image_size(state) or 1024)
    load_checkpoint(sam, state, source=path)
    return {k: state[k] for k in sam.state_dict()}
