"""Precomputed image embeddings on disk: what ``samkit embed`` writes, and how samkit reads them back.

Format (version 1): one file ``<stem>.pt`` per image, written by ``torch.save`` under a hidden
temporary name and renamed into place. It holds a dict of plain values (loadable with
``torch.load(path, weights_only=True)``):

=======================  =====================================================================
``format``               ``"samkit.image_embedding"``
``version``              ``1``
``embedding``            1x256x64x64 tensor (the image encoder's output, in the model's dtype)
``original_size``        ``[H, W]`` of the image as read (EXIF orientation applied)
``input_size``           ``[h, w]`` of the image resized for the encoder (longest side 1024)
``model_type``           ``"vit_b"``, ``"vit_h"``, ...
``dtype``                ``"float32"``, ``"bfloat16"`` or ``"float16"``
``encoder_fingerprint``  blake2b of the image encoder's weights, as used (see :func:`encoder_fingerprint`)
``checkpoint``           file name of the weights (``None`` for random ones); informative only
``image``                the image's file name; ``image_sha256``: sha256 of its bytes
``samkit_version``       the samkit that wrote it
=======================  =====================================================================

Readers: :func:`set_embedding` puts a file into a :class:`~samkit.predictor.SamPredictor` (then
``predict`` works as after ``set_image``), and ``samkit serve --embeddings DIR`` finds the file of
an opened image by ``image_sha256`` (the id the page gives an image). Both refuse, with one line, a
file computed by another encoder (other weights or dtype): its masks would be wrong.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from ..errors import SamkitError
from .files import atomic_write

FORMAT = "samkit.image_embedding"
VERSION = 1
SUFFIX = ".pt"


class EmbeddingError(SamkitError, ValueError):
    """An embedding file is unreadable, of another format, or was computed by another encoder."""


def version_key(t: torch.Tensor) -> tuple | None:
    """What tells whether ``t`` still holds the data it held: its memory and its version counter (an
    in-place change bumps it). None for an inference tensor (made under ``torch.inference_mode``),
    which counts no versions: a cache must not keep anything of it."""
    if t.is_inference():
        return None
    return (t.data_ptr(), t._version, t.dtype, t.device, t.shape, t.stride())


def encoder_fingerprint(model: torch.nn.Module) -> str:
    """Hash (hex, 24 characters) of the image encoder's weights and buffers in their current dtype.

    ``model`` is a Sam (its ``image_encoder`` is hashed) or an image encoder. Cached per module and
    recomputed when any parameter changed (in-place updates bump a tensor's version counter).
    """
    encoder = getattr(model, "image_encoder", model)
    state = encoder.state_dict()
    stamp = tuple((name, version_key(t)) for name, t in state.items())
    cached = _FINGERPRINTS.get(encoder)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    h = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    if all(key is not None for _, key in stamp):  # inference tensors count no versions: not kept
        _FINGERPRINTS[encoder] = (stamp, digest)
    return digest


_FINGERPRINTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, str]] = weakref.WeakKeyDictionary()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ImageEmbedding:
    """One image's embedding and what is needed to prompt it."""

    embedding: torch.Tensor  # 1x256x64x64
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    model_type: str
    dtype: str
    encoder_fingerprint: str
    checkpoint: Optional[str] = None
    image: Optional[str] = None
    image_sha256: Optional[str] = None
    samkit_version: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "embedding": self.embedding.detach().cpu().contiguous().clone(),
            "original_size": [int(s) for s in self.original_size],
            "input_size": [int(s) for s in self.input_size],
            "model_type": self.model_type,
            "dtype": self.dtype,
            "encoder_fingerprint": self.encoder_fingerprint,
            "checkpoint": self.checkpoint,
            "image": self.image,
            "image_sha256": self.image_sha256,
            "samkit_version": self.samkit_version,
        }

    def check_model(self, model: torch.nn.Module, where: str = "") -> None:
        """Raise :class:`EmbeddingError` unless ``model``'s image encoder is the one that computed this."""
        ours = encoder_fingerprint(model)
        if ours != self.encoder_fingerprint:
            dtype = str(next(model.parameters()).dtype).replace("torch.", "")
            raise EmbeddingError(
                f"{where or 'the embedding'} was computed by another image encoder ({self.model_type} "
                f"{self.dtype}, weights {self.checkpoint or 'random'}, fingerprint "
                f"{self.encoder_fingerprint}; this model: {dtype}, fingerprint {ours}): recompute it with "
                "samkit embed and this model's --model-type/--checkpoint/--dtype"
            )


def save_embedding(path: str | os.PathLike, record: ImageEmbedding) -> None:
    """Write ``record`` to ``path`` atomically (hidden temporary sibling, then rename)."""
    with atomic_write(path) as f:
        torch.save(record.to_dict(), f)


def _load_dict(path: str, mmap: bool = False) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise EmbeddingError(f"{path}: not found") from None
    except Exception as err:  # truncated, not a torch file, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EmbeddingError(f"{path}: not a readable embedding file ({reason[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EmbeddingError(f"{path}: not a samkit embedding file (written by samkit embed)")
    if data.get("version") != VERSION:
        raise EmbeddingError(
            f"{path}: embedding format version {data.get('version')!r}; this samkit reads version {VERSION}"
        )
    return data


def load_embedding(
    path: str | os.PathLike, model: Optional[torch.nn.Module] = None, *, mmap: bool = False
) -> ImageEmbedding:
    """Read a file written by ``samkit embed``; with ``model``, refuse one computed by another encoder."""
    path = os.fspath(path)
    data = _load_dict(path, mmap=mmap)
    try:
        record = ImageEmbedding(
            embedding=data["embedding"],
            original_size=tuple(int(s) for s in data["original_size"]),  # type: ignore[arg-type]
            input_size=tuple(int(s) for s in data["input_size"]),  # type: ignore[arg-type]
            model_type=str(data["model_type"]),
            dtype=str(data["dtype"]),
            encoder_fingerprint=str(data["encoder_fingerprint"]),
            checkpoint=data.get("checkpoint"),
            image=data.get("image"),
            image_sha256=data.get("image_sha256"),
            samkit_version=data.get("samkit_version"),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise EmbeddingError(f"{path}: damaged embedding file ({type(err).__name__}: {err})") from None
    if not isinstance(record.embedding, torch.Tensor) or record.embedding.dim() != 4:
        raise EmbeddingError(f"{path}: damaged embedding file (embedding is not a 1xCxHxW tensor)")
    if model is not None:
        record.check_model(model, where=path)
    return record


def set_embedding(predictor: Any, source: str | os.PathLike | ImageEmbedding) -> ImageEmbedding:
    """Make ``predictor`` (a SamPredictor) ready to ``predict`` on a precomputed embedding.

    Same state as after ``predictor.set_image(image)`` on the image ``samkit embed`` read: the same
    masks. Refuses (:class:`EmbeddingError`, one line) an embedding of another encoder.
    """
    record = source if isinstance(source, ImageEmbedding) else load_embedding(source)
    model = predictor.model
    record.check_model(model, where=os.fspath(source) if not isinstance(source, ImageEmbedding) else "")
    param = next(model.parameters())
    predictor.reset_image()
    predictor.features = record.embedding.to(device=param.device, dtype=param.dtype)
    predictor.original_size = tuple(record.original_size)
    predictor.input_size = tuple(record.input_size)
    predictor.original_sizes = [predictor.original_size]
    predictor.input_sizes = [predictor.input_size]
    predictor.is_image_set = True
    return record


def embedding_files(folder: str | os.PathLike) -> Iterator[str]:
    """The embedding files directly in ``folder`` (hidden temporary files left out), sorted."""
    folder = os.fspath(folder)
    for name in sorted(os.listdir(folder)):
        if name.endswith(SUFFIX) and not name.startswith("."):
            yield os.path.join(folder, name)


class EmbeddingFolder:
    """The embeddings of a folder written by ``samkit embed``, found by the sha256 of the image bytes.

    Files of another encoder are left out (counted in ``other_encoder``); damaged ones in ``damaged``.
    The index reads only each file's small fields (memory-mapped); tensors are read on use.
    """

    def __init__(self, folder: str | os.PathLike, model: torch.nn.Module) -> None:
        self.folder = os.fspath(folder)
        if not os.path.isdir(self.folder):
            raise EmbeddingError(f"{self.folder}: not a folder")
        self.fingerprint = encoder_fingerprint(model)
        self.by_sha256: dict[str, str] = {}
        self.other_encoder = 0
        self.damaged = 0
        for path in embedding_files(self.folder):
            try:
                data = _load_dict(path, mmap=True)
            except EmbeddingError:
                self.damaged += 1
                continue
            if data.get("encoder_fingerprint") != self.fingerprint:
                self.other_encoder += 1
                continue
            sha = data.get("image_sha256")
            if isinstance(sha, str):
                self.by_sha256[sha] = path

    def __len__(self) -> int:
        return len(self.by_sha256)

    def find(self, image_sha256: str, model: torch.nn.Module) -> Optional[ImageEmbedding]:
        """The embedding of the image with these bytes, or None (no file, or it went bad since)."""
        path = self.by_sha256.get(image_sha256)
        if path is None:
            return None
        try:
            return load_embedding(path, model)
        except EmbeddingError:
            return None


__all__ = [
    "EmbeddingError",
    "EmbeddingFolder",
    "FORMAT",
    "ImageEmbedding",
    "SUFFIX",
    "VERSION",
    "embedding_files",
    "encoder_fingerprint",
    "file_sha256",
    "load_embedding",
    "save_embedding",
    "set_embedding",
]
