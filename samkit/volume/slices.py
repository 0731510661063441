"""The image embeddings of a volume's slices: computed in batches on first use, kept, and cacheable on
disk in ``samkit embed``'s format (:mod:`samkit.utils.embeddings`).

A cache folder holds one file per slice, named by the sha256 of the slice's grey levels (its uint8
bytes and shape): the same slice of the same scan under the same window is found again by any later
run, whatever the volume's file name, and a file of another encoder (other weights or dtype) is
recomputed, never used.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

import numpy as np
import torch

from ..utils.embeddings import (
    SUFFIX,
    EmbeddingError,
    ImageEmbedding,
    encoder_fingerprint,
    load_embedding,
    save_embedding,
    set_embedding,
)


def slice_sha256(image: np.ndarray) -> str:
    """sha256 (hex) of a uint8 slice's shape and bytes: the id of its cache file."""
    h = hashlib.sha256(f"{image.shape}|{image.dtype}|".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


class SliceEmbeddings:
    """The embeddings of the slices of ``slices`` (ZxHxW uint8), for one predictor.

    :meth:`use` puts slice ``z``'s embedding into the predictor (as ``set_image`` on that slice
    would); a missing embedding is computed together with the next ``batch_size - 1`` slices not yet
    embedded in the direction of travel (propagation visits them next), in one encoder call.
    ``cache_dir``: a folder (created on first write) where each embedding is also stored and looked
    up first. ``computed`` and ``loaded`` count the slices embedded by the encoder and read from disk.
    """

    def __init__(
        self,
        predictor: Any,
        slices: np.ndarray,
        *,
        batch_size: int = 4,
        cache_dir: Optional[str | os.PathLike] = None,
        model_type: str = "unknown",
        name: str = "volume",
    ) -> None:
        if slices.ndim != 3 or slices.dtype != np.uint8:
            raise ValueError(f"slices must be a ZxHxW uint8 array, got {slices.dtype} {slices.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.predictor = predictor
        self.slices = slices
        self.batch_size = int(batch_size)
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.model_type = model_type
        self.name = name
        self.records: dict[int, ImageEmbedding] = {}
        self.computed = 0
        self.loaded = 0
        model = predictor.model
        self.fingerprint = encoder_fingerprint(model)
        self.dtype = str(next(model.parameters()).dtype).replace("torch.", "")

    def __len__(self) -> int:
        return len(self.slices)

    def use(self, z: int, direction: int = 1) -> None:
        """Make the predictor ready to prompt slice ``z`` (``direction`` +1 or -1: where to batch)."""
        if z not in self.records:
            self._fill(z, direction)
        set_embedding(self.predictor, self.records[z])

    def _fill(self, z: int, direction: int) -> None:
        wanted = []
        k = z
        while len(wanted) < self.batch_size and 0 <= k < len(self.slices):
            if k not in self.records:
                wanted.append(k)
            k += 1 if direction >= 0 else -1
        todo = [k for k in wanted if not self._load(k)]
        if todo:
            self._compute(todo)

    def _cache_path(self, z: int) -> Optional[str]:
        if self.cache_dir is None:
            return None
        return os.path.join(self.cache_dir, f"slice-{slice_sha256(self.slices[z])[:32]}{SUFFIX}")

    def _load(self, z: int) -> bool:
        path = self._cache_path(z)
        if path is None or not os.path.isfile(path):
            return False
        try:
            record = load_embedding(path, self.predictor.model)
        except EmbeddingError:  # damaged, or of another encoder: recomputed (and replaced)
            return False
        if record.image_sha256 != slice_sha256(self.slices[z]):
            return False
        self.records[z] = record
        self.loaded += 1
        return True

    @torch.no_grad()
    def _compute(self, zs: list[int]) -> None:
        predictor = self.predictor
        predictor.set_image_batch([self.slices[k] for k in zs])
        for i, k in enumerate(zs):
            record = ImageEmbedding(
                embedding=predictor.features[i : i + 1].clone(),
                original_size=tuple(predictor.original_sizes[i]),  # type: ignore[arg-type]
                input_size=tuple(predictor.input_sizes[i]),  # type: ignore[arg-type]
                model_type=self.model_type,
                dtype=self.dtype,
                encoder_fingerprint=self.fingerprint,
                image=f"{self.name} slice {k}",
                image_sha256=slice_sha256(self.slices[k]),
            )
            self.records[k] = record
            path = self._cache_path(k)
            if path is not None:
                os.makedirs(self.cache_dir, exist_ok=True)  # type: ignore[arg-type]
                save_embedding(path, record)
        predictor.reset_image()
        self.computed += len(zs)


__all__ = ["SliceEmbeddings", "slice_sha256"]
