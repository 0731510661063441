"""The automatic mask generator's command: ``demo/inference_with_amg.py`` and ``samkit amg``.

One argument setup and one runner serve both commands. What ``--output`` means depends on the input:

- a single image and an ``--output`` named like a picture (``.png``, ``.jpg``, ...; the seed's
  default ``./amg_test.jpg``): one overlay picture of all the masks, each in its own colour;
- otherwise ``--output`` is a directory that gets one result per image (a folder of images is
  processed in sorted order, each image at most once): by default Meta's ``scripts/amg.py`` layout,
  ``DIR/<stem>/0.png, 1.png, ...`` (uint8 0/255, one per mask) and ``DIR/<stem>/metadata.csv``; with
  ``--convert-to-rle`` one ``DIR/<stem>.json`` in SA-1B's annotation format (COCO RLE masks); with
  ``--overlay`` also the picture ``DIR/<stem>_overlay.png``.

Every result appears complete or not at all: files are written under a hidden temporary name and
renamed into place, so an interrupted run can be re-run and skips what is done (``--overwrite``
redoes it). An image that cannot be read is skipped with a warning and the run ends with status 1.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import SamkitError
from ..maskgen.output import (
    METADATA_HEADER,
    decode_segmentation,
    distinct_colors,
    metadata_rows,
    overlay_masks,
    sa1b_annotation,
    save_image,
    write_json,
    write_mask_folder,
)
from . import folder_jobs
from .base import add_model_arguments, check_device, checkpoint_or_none, with_adapter
from .outputs import check_output, make_dirs

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_PICTURE = "./amg_test.jpg"  # the seed's --output
INTERRUPTED, TERMINATED = folder_jobs.INTERRUPTED, folder_jobs.TERMINATED

# ---------------------------------------------------------------------------------------------------
# Flags and their checks


def _parser_type(name: str, convert: Callable[[str], Any], check: Callable[[Any], Optional[str]]):
    """An argparse ``type`` that converts, then checks; argparse prefixes its message with the flag."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    parse.__name__ = name
    return parse


_positive_int = _parser_type("an integer", int, lambda v: None if v >= 1 else "must be at least 1")
_non_negative_int = _parser_type("an integer", int, lambda v: None if v >= 0 else "must be at least 0")
_fraction = _parser_type("a number", float, lambda v: None if 0 <= v <= 1 else "must be between 0 and 1")
_non_negative_float = _parser_type("a number", float, lambda v: None if v >= 0 else "must be at least 0")

# SamAutomaticMaskGenerator's arguments that have a flag (the seed's names): (name, parse, help).
GENERATOR_FLAGS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("points_per_side", _positive_int, "grid points per image side: points_per_side**2 prompts"),
    ("points_per_batch", _positive_int, "prompts decoded at once (more is faster and uses more memory)"),
    ("pred_iou_thresh", _fraction, "keep masks whose predicted IoU is above this (0 keeps all)"),
    ("stability_score_thresh", _fraction, "keep masks whose stability score is at least this (0 keeps all)"),
    ("stability_score_offset", _non_negative_float, "logit offset of the stability score"),
    ("box_nms_thresh", _fraction, "box IoU above which NMS drops the lower-scored mask, within a crop"),
    ("crop_n_layers", _non_negative_int, "extra layers of crops: layer i has 2^i x 2^i crops"),
    ("crop_nms_thresh", _fraction, "box IoU above which NMS drops duplicate masks across crops"),
    ("crop_overlap_ratio", _fraction, "overlap of neighbouring crops, as a fraction of the short side"),
    ("crop_n_points_downscale_factor", _positive_int, "crop layer i has points_per_side / factor**i"),
    ("min_mask_region_area", _non_negative_int, "fill holes and drop islands smaller than this (pixels)"),
)


def _generator_defaults() -> dict[str, Any]:
    from ..amg import SamAutomaticMaskGenerator

    params = inspect.signature(SamAutomaticMaskGenerator.__init__).parameters
    return {name: params[name].default for name, _, _ in GENERATOR_FLAGS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of automatic mask generation (the seed's flags, plus the batch ones of Meta's script)."""

    parser.add_argument(
        "--input",
        required=True,
        metavar="FILE_OR_FOLDER",
        help=f"an image file, or a folder whose images ({' '.join(IMAGE_EXTENSIONS)}) are all processed",
    )
    parser.add_argument(
        "--output",
        metavar="PATH",
        help="for a single image, a picture name (.png, .jpg, ...; default: "
        f"{DEFAULT_PICTURE}) gets the overlay of all masks; otherwise a directory that gets one result per "
        "image: DIR/<stem>/ with 0.png, 1.png, ... and metadata.csv (Meta's layout), or DIR/<stem>.json "
        "with --convert-to-rle",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--convert-to-rle",
        action="store_true",
        help="write DIR/<stem>.json in SA-1B's annotation format (COCO RLE masks; needs pycocotools) "
        "instead of mask PNGs",
    )
    parser.add_argument(
        "--overlay", action="store_true", help="with an output directory, also save DIR/<stem>_overlay.png"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="redo images whose results exist (by default a re-run skips them)",
    )
    # The seed's switch for saving the picture; it is always saved, so it is accepted and hidden.
    parser.add_argument("--enable-plt-visual", action="store_true", help=argparse.SUPPRESS)
    group = parser.add_argument_group(
        "mask generator settings", "each defaults to SamAutomaticMaskGenerator's value, shown in brackets"
    )
    defaults = _generator_defaults()
    for name, parse, text in GENERATOR_FLAGS:
        default = defaults[name]
        shown = f"{default:.4g}" if isinstance(default, float) else str(default)
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=parse,
            default=None,
            metavar="X" if isinstance(default, float) else "N",
            help=f"{text} [{shown}]",
        )


def generator_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The generator arguments given on the command line (the others keep the generator's defaults)."""
    given = {name: getattr(args, name) for name, _, _ in GENERATOR_FLAGS if getattr(args, name) is not None}
    for name, parse, _ in GENERATOR_FLAGS:  # a Namespace built in code skips argparse's checks
        if name in given:
            try:
                given[name] = parse(str(given[name]))
            except argparse.ArgumentTypeError as err:
                raise SamkitError(f"--{name.replace('_', '-')}: {err}") from None
    merged = {**_generator_defaults(), **given}
    side, factor = merged["points_per_side"], merged["crop_n_points_downscale_factor"]
    for layer in range(merged["crop_n_layers"] + 1):
        if int(side / factor**layer) < 1:
            raise SamkitError(
                f"--points-per-side {side} / --crop-n-points-downscale-factor {factor}^{layer} leaves no points "
                f"in crop layer {layer} of --crop-n-layers {merged['crop_n_layers']}: raise --points-per-side or "
                "lower the others"
            )
    return given


# ---------------------------------------------------------------------------------------------------
# What to read and where to write


@dataclass
class Job:
    """The images to process, in order, and where their results go.

    picture: the output is the single overlay picture ``output`` (else ``output`` is a directory).
    """

    inputs: list[str]
    output: str
    picture: bool

    def image_id(self, image_path: str) -> int:
        """The image's 1-based position in ``inputs``: its ``image_id`` in SA-1B annotations."""
        if not hasattr(self, "_ids"):
            self._ids = {p: i + 1 for i, p in enumerate(self.inputs)}
        return self._ids[image_path]


def list_images(folder: str) -> list[str]:
    """The image files directly in ``folder`` (by extension, hidden files left out), sorted by name."""
    names = sorted(
        n
        for n in os.listdir(folder)
        if not n.startswith(".")
        and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
        and os.path.isfile(os.path.join(folder, n))
    )
    return [os.path.join(folder, n) for n in names]


def plan_job(
    input_path: str, output: Optional[str], overlay: bool = False, checkpoint: Optional[str] = None
) -> Job:
    """Check ``--input``/``--output`` (and that no result lands on ``--input`` or ``checkpoint``) and
    decide what is written; raises :class:`SamkitError`."""
    if not os.path.exists(input_path):
        raise SamkitError(f"--input {input_path}: not found")
    inputs = {"the input image": input_path, "the checkpoint": checkpoint}
    is_folder = os.path.isdir(input_path)
    looks_like_picture = (
        output is not None
        and not os.path.isdir(output)
        and os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS
    )
    if not is_folder and (output is None or looks_like_picture):
        output = DEFAULT_PICTURE if output is None else output
        check_output(output, "--output", inputs, directory=False)
        return Job([input_path], output, picture=True)
    if output is None:
        raise SamkitError(f"--input {input_path} is a folder: give --output DIR for its results")
    if looks_like_picture:
        raise SamkitError(
            f"--output {output}: a folder input writes one result per image into a directory, not a picture"
        )
    check_output(output, "--output", inputs, directory=True)
    if is_folder:
        images = folder_images(input_path)
        if overlay and os.path.isdir(output) and os.path.samefile(output, input_path):
            raise SamkitError(
                f"--output {output} is the input folder: --overlay pictures would become inputs of the next run"
            )
    else:
        images = [input_path]
    check_unique_stems(images, lambda path: f"the results named {image_stem(path)!r}")
    return Job(images, output, picture=False)


def folder_images(input_path: str) -> list[str]:
    """The images of folder ``input_path``, sorted; none is a :class:`SamkitError` naming --input."""
    inputs = list_images(input_path)
    if not inputs:
        raise SamkitError(f"--input {input_path}: no images in this folder ({' '.join(IMAGE_EXTENSIONS)})")
    return inputs


def check_unique_stems(inputs: Sequence[str], written: Callable[[str], str]) -> None:
    """Results are named by the image's file stem: two inputs with one stem are refused, naming both
    and ``written(path)``, what both would write."""
    by_stem: dict[str, str] = {}
    for path in inputs:
        stem = image_stem(path)
        if stem in by_stem:
            raise SamkitError(
                f"{os.path.basename(by_stem[stem])} and {os.path.basename(path)} would both write "
                f"{written(path)}: rename one of them"
            )
        by_stem[stem] = path


def result_paths(job: Job, image_path: str, convert_to_rle: bool, overlay: bool) -> list[str]:
    """Where one image's results go: its mask folder or JSON, then its overlay picture if asked for."""
    stem = image_stem(image_path)
    paths = [os.path.join(job.output, stem + ".json" if convert_to_rle else stem)]
    if overlay:
        paths.append(os.path.join(job.output, f"{stem}_overlay.png"))
    return paths


def image_stem(path: str) -> str:
    """The file name without folder and extension: what an image's results are named by."""
    return os.path.splitext(os.path.basename(path))[0]


# ---------------------------------------------------------------------------------------------------
# The command


def run(args: argparse.Namespace) -> int:
    """Generate masks of everything in an image, or in each image of a folder (automatic mask generation)."""
    import torch

    from ..utils.image import load_image

    # Everything a user can get wrong is checked before the model is built or a file is written.
    settings = generator_settings(args)
    checkpoint = checkpoint_or_none(args)
    job = plan_job(args.input, args.output, args.overlay, checkpoint)
    device = check_device(folder_jobs.process_device(args.device))
    dtype = getattr(torch, args.dtype)
    # Masks stay run-length encoded until written, one at a time: memory does not grow with masks x H x W.
    output_mode = "coco_rle" if args.convert_to_rle and not job.picture else "uncompressed_rle"
    _check_packages(output_mode, settings)
    # A single image file is read now (unreadable: a user mistake); a folder's images one by one later.
    first_image = load_image(job.inputs[0]) if not os.path.isdir(args.input) else None

    # Under torchrun each process takes its share of the pending images (folder_jobs); alone, all.
    workers = folder_jobs.join()
    if job.picture:
        share = job.inputs if workers.is_main else []
    else:

        def finished(path: str) -> bool:
            paths = result_paths(job, path, args.convert_to_rle, args.overlay)
            return not args.overwrite and all(os.path.lexists(r) for r in paths)

        share = folder_jobs.take_share(job.inputs, finished, workers, f"their results are in {job.output}")
        if share is None:
            return 0

    outcome = folder_jobs.Outcome()
    generator = None
    try:
        generator = _build_generator(
            args, checkpoint, device, dtype, output_mode, settings, job, workers, share
        )
    except Exception as err:
        if not workers.distributed:
            raise
        from .base import one_line

        outcome.error = f"cannot build the model: {one_line(err)}"

    if job.picture:
        if outcome.error:
            print(f"error: {outcome.error}", file=sys.stderr)
            workers.close()
            return 1
        if generator is not None and share:
            assert first_image is not None
            records = generator.generate(first_image)
            picture = overlay_masks(first_image, _LazyMasks(records), areas=[r["area"] for r in records])
            try:
                save_image(job.output, picture)
            except OSError as err:
                raise SamkitError(f"--output {job.output}: cannot write: {err.strerror or err}") from None
            print(f"wrote {job.output} ({len(records)} masks)")
        workers.close()
        return 0
    return _run_batch(job, share, generator, args, load_image, first_image, workers, outcome)


def _build_generator(
    args: argparse.Namespace,
    checkpoint: Optional[str],
    device: Any,
    dtype: Any,
    output_mode: str,
    settings: dict[str, Any],
    job: Job,
    workers: folder_jobs.Workers,
    share: list[str],
) -> Any:
    """The mask generator (None when this process has no images), with its notes printed once."""
    from ..amg import SamAutomaticMaskGenerator
    from ..build import build_model
    from ..checkpoints.download import download_checkpoint

    if not share:
        return None
    if checkpoint is None and args.download:
        checkpoint = download_checkpoint(args.model_type)
    model = with_adapter(build_model(args.model_type, checkpoint), args).to(device=device, dtype=dtype)
    # Notes come after the last check that can fail, so that an error stays the only line on stderr.
    if workers.is_main:
        if job.picture and args.convert_to_rle:
            print(
                "note: --convert-to-rle applies to an output directory; a picture was asked for",
                file=sys.stderr,
            )
        if checkpoint is None:
            print(
                f"warning: {args.model_type} runs with random weights: its masks are meaningless",
                file=sys.stderr,
            )
    return SamAutomaticMaskGenerator(model, output_mode=output_mode, **settings)


def _run_batch(
    job: Job,
    share: list[str],
    generator: Any,
    args: argparse.Namespace,
    load_image: Callable[[str], np.ndarray],
    first_image: Optional[np.ndarray],
    workers: folder_jobs.Workers,
    outcome: folder_jobs.Outcome,
) -> int:
    def work(path: str) -> dict[str, Any]:
        image = first_image if first_image is not None else load_image(path)
        records = generator.generate(image)
        make_dirs(job.output, "--output")  # only now: unreadable images leave no empty folder behind
        try:
            write_results(job, path, image, records, args.convert_to_rle, args.overlay, args.overwrite)
        except OSError as err:
            raise SamkitError(f"cannot write the results of {path}: {err.strerror or err}") from None
        return {"masks": len(records)}

    if outcome.error is None:
        folder_jobs.process_share(share, work, workers, "amg", outcome)
    return folder_jobs.finish(
        outcome,
        workers,
        len(share),
        len(job.inputs),
        lambda done: f"wrote the results of {done} images to {job.output}",
    )


def _check_packages(output_mode: str, settings: dict[str, Any]) -> None:
    try:
        if output_mode == "coco_rle":
            import pycocotools.mask  # noqa: F401
        if settings.get("min_mask_region_area", 0) > 0:
            import cv2  # noqa: F401
    except ImportError as err:
        flag = "--convert-to-rle" if output_mode == "coco_rle" else "--min-mask-region-area"
        raise SamkitError(f"{flag} needs {err.name}: pip install 'samkit[amg]'") from None


# ---------------------------------------------------------------------------------------------------
# Writing results, each complete or not at all


def write_results(
    job: Job,
    image_path: str,
    image: np.ndarray,
    records: list[dict[str, Any]],
    convert_to_rle: bool,
    overlay: bool,
    overwrite: bool = False,
) -> None:
    """Write the results of one image that are missing (all of them with ``overwrite``)."""
    result, *picture = result_paths(job, image_path, convert_to_rle, overlay)
    if overwrite or not os.path.lexists(result):
        if convert_to_rle:
            h, w = image.shape[:2]
            write_json(
                result, sa1b_annotation(records, job.image_id(image_path), os.path.basename(image_path), w, h)
            )
        else:
            write_mask_folder(result, [_LazyRecord(r) for r in records])
    if picture and (overwrite or not os.path.lexists(picture[0])):
        save_image(picture[0], overlay_masks(image, _LazyMasks(records), areas=[r["area"] for r in records]))


def _mask_of(segmentation: Any) -> np.ndarray:
    """A record's segmentation as an HxW bool mask: binary, uncompressed RLE or COCO RLE."""
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        from ..utils.amg import rle_to_mask

        return rle_to_mask(segmentation)
    return decode_segmentation(segmentation)


class _LazyMasks(Sequence):
    """The records' masks, each decoded when it is used (one full-resolution mask in memory at a time)."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return _mask_of(self.records[i]["segmentation"])


class _LazyRecord(dict):
    """A record whose ``segmentation`` is decoded to an HxW bool mask each time it is read."""

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        return _mask_of(value) if key == "segmentation" else value


__all__ = [
    "GENERATOR_FLAGS",
    "IMAGE_EXTENSIONS",
    "METADATA_HEADER",
    "Job",
    "add_arguments",
    "distinct_colors",
    "generator_settings",
    "list_images",
    "metadata_rows",
    "overlay_masks",
    "plan_job",
    "result_paths",
    "run",
    "sa1b_annotation",
    "save_image",
    "write_json",
    "write_mask_folder",
    "write_results",
]
