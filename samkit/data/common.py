"""What every box-prompt dataset shares: the sample contract, image and mask preparation, collate.

A sample (``BoxPromptDataset.__getitem__``) is a dict, with S = ``image_size`` and K = ``max_objects``:

- ``image``: float32 3xSxS, the image resized so its long side is S (PIL bilinear, as
  ``ResizeLongestSide.apply_image``), normalised with SAM's pixel mean/std on 0-255 values, and
  zero-padded bottom/right: bit for bit what ``Sam.preprocess`` gives the image encoder at inference.
- ``boxes``: float32 Kx4 XYXY box prompts in pixels of the resized frame (the SxS input; the image
  occupies [0, w] x [0, h] of it). Rows past the real objects are zeros.
- ``masks``: uint8 KxSxS 0/1 ground truth in the same frame (see :func:`prepare_masks`); rows past
  the real objects are zeros.
- ``valid``: bool K, True for the real objects (a prefix).
- ``original_size``: int64 [H, W]; ``input_size``: int64 [h, w], the resized size before padding.
- ``index``: int, the dataset index.
- ``original_masks`` (only with ``return_original_masks=True``): uint8 KxHxW at the original size,
  same object order, padded rows zero.
- ``category_ids`` (only datasets with named categories, COCO): int64 K, each object's category id
  (-1 for padded rows); the dataset's ``categories`` maps ids to names (the evaluation loop hands
  that mapping to the category-name text protocol with each batch, ``samkit.training.evaluate``).

With ``compact=True`` (what ``train.py`` and ``eval.py`` use) ``image`` is the resized, zero-padded
uint8 3xSxS picture and ``masks`` the masks with 8 pixels per byte (uint8 KxSx(S/8), see
:func:`pack_masks`): a sample is 4x and 16x smaller on its way from the loader workers to the GPU,
and :func:`batch_images` / :func:`batch_masks` rebuild, on the device, exactly the tensors above.

Randomness (which objects are kept when there are more than K, box jitter) comes only from
``np.random.default_rng([seed, epoch, index])``: the same (seed, epoch, index) gives the same
sample in any process, so training resumes exactly and evaluation is repeatable.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..utils.transforms import ResizeLongestSide
from .prompts import choose_objects, jitter_boxes

# Sam's defaults (samkit.modeling.Sam): one normalisation for training and inference.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def resize_and_pad(image: np.ndarray, image_size: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """HxWx3 uint8 RGB -> (uint8 3xSxS: resized so the long side is S, zero-padded bottom/right,
    (h, w) resized size before padding)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = tuple(image.shape) if isinstance(image, np.ndarray) else type(image).__name__
        dtype = getattr(image, "dtype", None)
        raise ValueError(f"expected an HxWx3 uint8 image, got {shape} {dtype}")
    resized = ResizeLongestSide(image_size).apply_image(image)
    h, w = resized.shape[:2]
    out = torch.zeros((3, image_size, image_size), dtype=torch.uint8)
    out.numpy()[:, :h, :w] = np.asarray(resized).transpose(2, 0, 1)  # PIL's buffer is read-only
    return out, (h, w)


def normalize_padded(images: torch.Tensor, input_sizes: torch.Tensor) -> torch.Tensor:
    """uint8 (B)x3xSxS from :func:`resize_and_pad` -> float32 model input: ``(x - mean) / std`` in fp32
    (the same operations as ``Sam.preprocess``, so equal bit for bit on any device) and zeros outside
    each image's (h, w) = ``input_sizes`` ((B)x2)."""
    batched = images.dim() == 4
    x = images if batched else images[None]
    sizes = input_sizes.reshape(-1, 2).to(x.device)
    mean = torch.tensor(PIXEL_MEAN, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(PIXEL_STD, device=x.device).view(1, -1, 1, 1)
    out = (x.float() - mean) / std
    size = x.shape[-1]
    coords = torch.arange(size, device=x.device)
    inside = (coords.view(1, -1, 1) < sizes[:, 0].view(-1, 1, 1)) & (
        coords.view(1, 1, -1) < sizes[:, 1].view(-1, 1, 1)
    )
    out = torch.where(inside[:, None], out, torch.zeros((), device=x.device))
    return out if batched else out[0]


def prepare_image(image: np.ndarray, image_size: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """HxWx3 uint8 RGB -> (float32 3xSxS model input, (h, w) resized size before padding).

    Equal, bit for bit, to ``sam.preprocess(torch.as_tensor(ResizeLongestSide(S).apply_image(image))
    .permute(2, 0, 1))`` for an fp32 model with S = 1024: the same resize, the same fp32
    ``(x - mean) / std`` on 0-255 values, the same zero padding.
    """
    x, (h, w) = resize_and_pad(image, image_size)
    return normalize_padded(x, torch.tensor([h, w])), (h, w)


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """uint8 0/1 ...xS masks -> uint8 ...x ceil(S/8), 8 pixels per byte (first pixel in the high bit)."""
    return torch.from_numpy(np.packbits(masks.numpy().astype(bool), axis=-1))


def unpack_masks(packed: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of :func:`pack_masks` on any device: uint8 ...x ceil(S/8) -> uint8 0/1 ...xS."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :size]


def batch_images(
    batch: dict[str, Any], device: torch.device, rows: Sequence[int] | None = None
) -> torch.Tensor:
    """The batch's float32 Bx3xSxS model input on ``device`` (only ``rows`` if given), from full or
    compact samples alike."""
    images, sizes = batch["image"], batch["input_size"]
    if rows is not None:
        images, sizes = images[list(rows)], sizes[list(rows)]
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:  # compact samples
        images = normalize_padded(images, sizes.to(device, non_blocking=True))
    return images


def batch_masks(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The batch's uint8 BxKxSxS ground truth on ``device``, from full or compact samples alike."""
    masks = batch["masks"].to(device, non_blocking=True)
    if batch["image"].dtype == torch.uint8:  # compact samples: 8 pixels per byte
        masks = unpack_masks(masks, batch["image"].shape[-1])
    return masks


def prepare_masks(masks: np.ndarray, input_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """KxHxW 0/1 masks -> uint8 KxSxS masks in the padded model-input frame.

    Each mask is resized to ``input_size`` (h, w) by bilinear interpolation of its 0/1 values
    (align_corners=False and anti-aliased when shrinking, the geometry of the image's PIL resize,
    so mask and image stay aligned), thresholded at >= 0.5, and zero-padded bottom/right. An object
    thinner than a resized pixel could vanish under the threshold; it keeps its highest-valued
    pixel instead, so every real object has a non-empty target.
    """
    h, w = input_size
    out = torch.zeros((len(masks), image_size, image_size), dtype=torch.uint8)
    for i, mask in enumerate(masks):
        src = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
        if tuple(src.shape) == (h, w):
            out[i, :h, :w] = src >= 0.5
            continue
        # One mask at a time keeps the float copies small (a 1024 frame is 4 MB per mask).
        shrink = h < src.shape[0] or w < src.shape[1]  # anti-aliasing changes nothing when enlarging
        soft = F.interpolate(src[None, None], (h, w), mode="bilinear", align_corners=False, antialias=shrink)
        binary = soft[0, 0] >= 0.5
        if not binary.any() and bool(src.any()):
            binary.view(-1)[soft.view(-1).argmax()] = True
        out[i, :h, :w] = binary
    return out


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples: tensors are stacked (a leading B), ``index`` becomes an int64 B tensor, and
    ``original_masks`` stays a list of B KxHxW tensors (their sizes differ). A key that not every
    sample has (``category_ids`` when COCO is mixed with other data) is left out."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        if any(key not in s for s in samples[1:]):
            continue
        values = [s[key] for s in samples]
        if key == "original_masks":
            batch[key] = values
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (int, np.integer)):
            batch[key] = torch.tensor([int(v) for v in values], dtype=torch.int64)
        else:
            batch[key] = values
    return batch


class Ragged:
    """A list of 1-D arrays stored as one flat array plus offsets.

    Per-image annotation data lives in a few numpy arrays rather than millions of Python objects:
    small, and DataLoader workers forked from the main process share the pages (touching Python
    objects' reference counts would copy them).
    """

    def __init__(self, chunks: Sequence[np.ndarray | bytes], dtype: Any) -> None:
        if chunks and isinstance(chunks[0], bytes):
            parts = [np.frombuffer(c, dtype=np.uint8) for c in chunks]
        else:
            parts = [np.asarray(c).reshape(-1) for c in chunks]
        self.offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([p.size for p in parts], out=self.offsets[1:])
        self.values = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]


class BoxPromptDataset(Dataset):
    """Base class: subclasses implement ``__len__``, ``_load`` and ``describe``; this class turns
    what ``_load`` returns into the sample contract described in this module's docstring.

    ``box_jitter`` is in pixels of the ORIGINAL image: each side of each box moves outward by its
    own uniform integer in [0, box_jitter], clipped to [0, W] x [0, H], before scaling.
    """

    def __init__(
        self,
        *,
        image_size: int = 1024,
        max_objects: int = 20,
        box_jitter: int = 0,
        seed: int = 0,
        return_original_masks: bool = False,
        compact: bool = False,
    ) -> None:
        if int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if int(max_objects) < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        if int(box_jitter) < 0:
            raise ValueError(f"box_jitter must be >= 0, got {box_jitter}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.image_size = int(image_size)
        self.max_objects = int(max_objects)
        self.box_jitter = int(box_jitter)
        self.seed = int(seed)
        self.return_original_masks = bool(return_original_masks)
        self.compact = bool(compact)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's randomness. DataLoader workers hold copies of the dataset: call this
        before the loader's iterator is created (so not with ``persistent_workers=True``)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def sample_rng(self, index: int) -> np.random.Generator:
        """The generator of all randomness of sample ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def choose(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Sorted indices of the objects to keep out of ``n`` (all when ``n <= max_objects``)."""
        return choose_objects(n, self.max_objects, rng)

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """(HxWx3 uint8 image, kxHxW 0/1 masks, kx4 XYXY boxes in original pixels) of the kept
        objects, k <= max_objects, chosen with ``self.choose(n, rng)``; a dataset with named
        categories (``self.categories``: id -> name) adds a fourth item, the k category ids."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index = int(index) % n
        rng = self.sample_rng(index)
        image, masks, boxes, *categories = self._load(index, rng)
        sample = self._make_sample(index, image, masks, boxes, rng)
        if categories:
            ids = torch.full((self.max_objects,), -1, dtype=torch.int64)
            ids[: len(masks)] = torch.as_tensor(np.asarray(categories[0], dtype=np.int64))
            sample["category_ids"] = ids
        return sample

    def _make_sample(
        self, index: int, image: np.ndarray, masks: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> dict[str, Any]:
        height, width = image.shape[:2]
        k, cap, size = len(masks), self.max_objects, self.image_size
        if masks.shape[1:] != (height, width) or boxes.shape != (k, 4) or k > cap:
            raise ValueError(
                f"internal: {k} masks of shape {masks.shape[1:]} and boxes {boxes.shape} for an image "
                f"of {height}x{width} with max_objects={cap}"
            )
        # Jitter and clip in the original frame, then scale: the jitter means the same number of
        # original pixels at any image_size.
        boxes = jitter_boxes(boxes, self.box_jitter, (height, width), rng)
        x, (h, w) = resize_and_pad(image, size)
        if not self.compact:
            x = normalize_padded(x, torch.tensor([h, w]))
        out_boxes = torch.zeros((cap, 4), dtype=torch.float32)
        if k:
            scaled = ResizeLongestSide(size).apply_boxes(boxes, (height, width))
            out_boxes[:k] = torch.from_numpy(scaled).float()
        out_masks = torch.zeros((cap, size, size), dtype=torch.uint8)
        out_masks[:k] = prepare_masks(masks, (h, w), size)
        if self.compact:
            out_masks = pack_masks(out_masks)
        valid = torch.zeros(cap, dtype=torch.bool)
        valid[:k] = True
        sample: dict[str, Any] = {
            "image": x,
            "boxes": out_boxes,
            "masks": out_masks,
            "valid": valid,
            "original_size": torch.tensor([height, width], dtype=torch.int64),
            "input_size": torch.tensor([h, w], dtype=torch.int64),
            "index": index,
        }
        if self.return_original_masks:
            original = torch.zeros((cap, height, width), dtype=torch.uint8)
            original[:k] = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))
            sample["original_masks"] = original
        return sample

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.describe()}>"
