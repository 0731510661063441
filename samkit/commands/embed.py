"""``samkit embed``: precompute the image embeddings of an image or of a folder of images.

Each image ``<stem>.<ext>`` gets ``DIR/<stem>.pt`` in the format of :mod:`samkit.utils.embeddings`
(the encoder's 1x256x64x64 output, the original and input sizes, the model type, dtype and a
fingerprint of the encoder's weights, the image's sha256). Files are written under a hidden
temporary name and renamed into place; a re-run skips images whose file exists (``--overwrite``
redoes them). ``SamPredictor`` reads them back with :func:`samkit.utils.embeddings.set_embedding`,
and ``samkit serve --embeddings DIR`` opens those images without running the encoder.

Under ``torchrun --nnodes N --nproc_per_node M -m samkit embed ...`` the processes share the images
(:mod:`samkit.commands.folder_jobs`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..errors import SamkitError
from . import folder_jobs
from .amg import IMAGE_EXTENSIONS, check_unique_stems, folder_images, image_stem
from .base import add_model_arguments, check_device, checkpoint_or_none, one_line, with_adapter
from .outputs import check_not_input, check_output, make_dirs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``samkit embed``: input, output directory, the model's, --overwrite."""
    parser.add_argument(
        "--input",
        required=True,
        metavar="FILE_OR_FOLDER",
        help=f"an image file, or a folder whose images ({' '.join(IMAGE_EXTENSIONS)}) are all embedded",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="directory that gets DIR/<stem>.pt per image (see samkit.utils.embeddings for the format)",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--overwrite", action="store_true", help="redo images whose embedding exists (by default skipped)"
    )


def plan(input_path: str, output: str, checkpoint: str | None = None) -> list[str]:
    """The images to embed, sorted; raises :class:`SamkitError` for a bad --input/--output."""
    if not os.path.exists(input_path):
        raise SamkitError(f"--input {input_path}: not found")
    given = {"the input": input_path, "the checkpoint": checkpoint}
    check_output(output, "--output", given, directory=True)
    inputs = folder_images(input_path) if os.path.isdir(input_path) else [input_path]
    check_unique_stems(inputs, lambda path: os.path.basename(embedding_path(output, path)))
    check_not_input([embedding_path(output, path) for path in inputs], given, "--output")
    return inputs


def embedding_path(output: str, image_path: str) -> str:
    from ..utils.embeddings import SUFFIX

    return os.path.join(output, image_stem(image_path) + SUFFIX)


def run(args: argparse.Namespace) -> int:
    """Precompute image embeddings (DIR/<stem>.pt per image) for prompting without the encoder."""
    import torch

    from ..utils.image import load_image

    checkpoint = checkpoint_or_none(args)
    inputs = plan(args.input, args.output, checkpoint)
    device = check_device(folder_jobs.process_device(args.device))
    dtype = getattr(torch, args.dtype)
    # A single image file is read now, as samkit amg does (unreadable: a user mistake, exit 2); a
    # folder's images one by one later (each unreadable one a warning).
    if not os.path.isdir(args.input):
        load_image(args.input)

    workers = folder_jobs.join()
    share = folder_jobs.take_share(
        inputs,
        lambda p: not args.overwrite and os.path.lexists(embedding_path(args.output, p)),
        workers,
        f"their embeddings are in {args.output}",
    )
    if share is None:
        return 0

    outcome = folder_jobs.Outcome()
    embedder = None
    try:
        if share:
            embedder = _Embedder(args, checkpoint, device, dtype, workers)
    except Exception as err:
        if not workers.distributed:
            raise
        outcome.error = f"cannot start: {one_line(err)}"
    if outcome.error is None and embedder is not None:
        folder_jobs.process_share(share, embedder, workers, "embed", outcome)
    return folder_jobs.finish(
        outcome,
        workers,
        len(share),
        len(inputs),
        lambda done: f"wrote the embeddings of {done} images to {args.output}",
    )


class _Embedder:
    """Embeds one image and writes its file; called once per image of this process's share."""

    def __init__(
        self, args: argparse.Namespace, checkpoint: Any, device: Any, dtype: Any, workers: folder_jobs.Workers
    ) -> None:
        from ..build import build_model
        from ..checkpoints.download import download_checkpoint
        from ..predictor import SamPredictor
        from ..utils.embeddings import encoder_fingerprint
        from ..version import __version__

        if checkpoint is None and args.download:
            checkpoint = download_checkpoint(args.model_type)
        model = with_adapter(build_model(args.model_type, checkpoint), args)
        model = model.to(device=device, dtype=dtype).eval()
        if checkpoint is None and workers.is_main:
            print(
                f"warning: {args.model_type} runs with random weights: its embeddings are meaningless",
                file=sys.stderr,
            )
        self.args = args
        self.predictor = SamPredictor(model)
        self.fingerprint = encoder_fingerprint(model)
        self.checkpoint = os.path.basename(checkpoint) if checkpoint else None
        self.version = __version__

    def __call__(self, path: str) -> dict[str, Any]:
        from ..utils.embeddings import ImageEmbedding, file_sha256, save_embedding
        from ..utils.image import load_image

        image = load_image(path)
        try:
            sha = file_sha256(path)
        except OSError as err:
            raise SamkitError(f"cannot read {path}: {err.strerror or err}") from None
        self.predictor.set_image(image)
        record = ImageEmbedding(
            embedding=self.predictor.features,
            original_size=tuple(self.predictor.original_size),  # type: ignore[arg-type]
            input_size=tuple(self.predictor.input_size),  # type: ignore[arg-type]
            model_type=self.args.model_type,
            dtype=self.args.dtype,
            encoder_fingerprint=self.fingerprint,
            checkpoint=self.checkpoint,
            image=os.path.basename(path),
            image_sha256=sha,
            samkit_version=self.version,
        )
        self.predictor.reset_image()
        target = embedding_path(self.args.output, path)
        make_dirs(self.args.output, "--output")  # only now: unreadable images leave no empty folder behind
        try:
            save_embedding(target, record)
        except OSError as err:
            raise SamkitError(f"cannot write {target}: {err.strerror or err}") from None
        return {}


__all__ = ["add_arguments", "embedding_path", "plan", "run"]
