"""On-disk cache of image embeddings for fine-tuning with a frozen image encoder.

The encoder is most of SAM's compute; with it frozen, an image's embedding never changes, so it is
computed in the first epoch and read back afterwards. Entries are keyed by the exact input tensor
(``image_key``, hashed in the data-loader workers) and live in a folder named after a hash of the
encoder's weights, the autocast dtype and the torch version, so changing any of them never reads
stale embeddings. Files are written atomically (safe with several processes and with kills).

Disk use: 256x64x64 values per image (4 MiB in fp32, 2 MiB in bf16/fp16).

Text prompts with fixed crops (``text.fixed_crops: true``) also cache the prompted objects' crop
features, one entry per image (its objects' features, D floats each), keyed by the image, its
masks (``masks_key``, hashed in the workers too) and the crops' draws, in a folder named after a
hash of the feature encoder's weights and the crop settings (:func:`crop_feature_key`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from ..utils.files import atomic_write


def image_key(image: torch.Tensor) -> str:
    """Content hash of a preprocessed image tensor."""
    data = image.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(str((tuple(data.shape), str(data.dtype))).encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def encoder_key(encoder: nn.Module, amp: str) -> str:
    """Hash of the encoder's weights (and the precision the embeddings are computed in)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{amp}|{torch.__version__}".encode())
    _hash_weights(h, encoder)
    return h.hexdigest()


def _hash_weights(h: Any, module: nn.Module) -> None:
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 1-D: 0-d tensors (a logit scale) too
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def crop_feature_key(encoder: nn.Module, settings: str) -> str:
    """Hash of a frozen feature encoder (class, weights) and the crop ``settings`` text: the folder
    of the crop-feature cache, so another encoder or crop setting never reads stale features."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"crops|{type(encoder).__name__}|{settings}|{torch.__version__}".encode())
    _hash_weights(h, encoder)
    return "crops-" + h.hexdigest()


class KeyedDataset(Dataset):
    """Adds ``image_key`` to each sample of ``dataset`` (hashing runs in the loader workers), and
    ``masks_key`` (a hash of the sample's masks) with ``masks=True``."""

    def __init__(self, dataset: Dataset, *, masks: bool = False) -> None:
        self.dataset = dataset
        self.masks = masks

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        sample["image_key"] = image_key(sample["image"])
        if self.masks:
            sample["masks_key"] = image_key(sample["masks"])
        return sample

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class EmbeddingCache:
    """Embeddings on disk, one file per image, under a folder named by the encoder's hash."""

    def __init__(self, root: str | os.PathLike, encoder_hash: str) -> None:
        self.folder = os.path.join(os.fspath(root), encoder_hash)
        os.makedirs(self.folder, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, key[:2], key + ".pt")

    def get(self, keys: list[str], device: torch.device) -> list[torch.Tensor | None]:
        """The cached embedding of each key (on ``device``), None where there is none."""
        found: list[torch.Tensor | None] = []
        for key in keys:
            path = self._path(key)
            embedding = None
            if os.path.isfile(path):
                try:
                    embedding = torch.load(path, map_location="cpu", weights_only=True).to(device)
                except Exception:  # a damaged entry (e.g. a full disk): recompute rather than fail
                    embedding = None
            found.append(embedding)
            self.hits += embedding is not None
            self.misses += embedding is None
        return found

    def embed(
        self,
        keys: list[str],
        encode: Callable[[list[int]], torch.Tensor],
        device: torch.device,
    ) -> torch.Tensor:
        """Bx256x64x64 embeddings of a batch whose images have these ``keys``: cached ones read back
        (onto ``device``), the others computed by ``encode(rows)`` (the embeddings of those rows of the
        batch) and stored."""
        found = self.get(keys, device)
        missing = [i for i, e in enumerate(found) if e is None]
        if missing:
            computed = encode(missing)
            self.put([keys[i] for i in missing], computed)
            for i, embedding in zip(missing, computed):
                found[i] = embedding
        return torch.stack(found)  # type: ignore[arg-type]

    def put(self, keys: list[str], embeddings: torch.Tensor) -> None:
        for key, embedding in zip(keys, embeddings.detach().cpu()):
            path = self._path(key)
            if os.path.isfile(path):
                continue
            with atomic_write(path, make_parents=True) as f:
                torch.save(embedding.clone(), f)
