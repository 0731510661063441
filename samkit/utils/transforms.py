"""Resizing images, coordinates and masks between the original image and the model-input frame."""

from __future__ import annotations

from copy import deepcopy
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class ResizeLongestSide:
    """Resize so the longest side is ``target_length`` (aspect kept, sides rounded half up).

    Coordinates are XY pixels; boxes are XYXY. Numpy methods take HxWxC uint8 images and Nx2 /
    Nx4 arrays; torch methods take BxCxHxW images and ...x2 / Bx4 tensors.
    """

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """(H, W) with the long side ``long_side_length``, rounded half up, each side at least one
        pixel (Meta's rule rounds the short side of a strip thinner than 1:2048 to 0 and fails)."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        return max(1, int(oldh * scale + 0.5)), max(1, int(oldw * scale + 0.5))

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """HxWxC uint8 -> resized HxWxC uint8 (PIL bilinear, anti-aliased when shrinking), a new writable array."""
        h, w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        # np.array, not np.asarray: an array viewing PIL's buffer is read-only, and torch.as_tensor warns on it.
        return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = deepcopy(coords).astype(float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """BxCxHxW float -> resized BxCxHxW (bilinear, anti-aliased)."""
        size = self.get_preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = coords.clone().to(torch.float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, ...]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)


def _interp_matrix(src: int, dst: int) -> torch.Tensor:
    """The dst x src matrix of 1-D bilinear resizing (align_corners=False), taken from F.interpolate.

    fp32 on purpose: the kernel computes source positions in the input's precision, and the taps
    must sit exactly where they sit for fp32 logits.
    """
    eye = torch.eye(src, dtype=torch.float32)[None, None]  # 1x1xsrc x src: rows are unit impulses
    return F.interpolate(eye, size=(dst, src), mode="bilinear", align_corners=False)[0, 0]


@lru_cache(maxsize=64)
def _resize_matrix(low: int, frame: int, crop: int, out: int) -> torch.Tensor:
    """The out x low matrix of: upsample low->frame, keep the first ``crop`` rows, resize crop->out."""
    return (_interp_matrix(crop, out).double() @ _interp_matrix(low, frame)[:crop].double()).float()


@lru_cache(maxsize=64)
def _sparse_resize(low: int, frame: int, crop: int, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same map as taps: (index, weight), each out x K, output row r = sum_k weight[r,k] * input[index[r,k]]."""
    dense = _resize_matrix(low, frame, crop, out)
    nonzero = dense != 0
    first = nonzero.float().argmax(dim=1)
    last = low - 1 - nonzero.flip(1).float().argmax(dim=1)
    taps = int((last - first).max()) + 1
    index = first[:, None] + torch.arange(taps)[None, :]
    valid = index < low
    index = index.clamp(max=low - 1)
    weight = torch.where(valid, dense.gather(1, index), torch.zeros(()))
    return index, weight


def upscale_masks(
    low_res: torch.Tensor,
    frame_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    threshold: float | None = None,
) -> torch.Tensor:
    """Low-res logits ...xhxw -> logits ...xHxW at the original size, in fp32; with ``threshold``
    the bool masks ``logits > threshold`` instead (the logits never held at full size).

    Equal (up to float rounding) to bilinear upsampling to the padded frame, cropping to
    ``input_size`` and bilinear resizing to ``original_size``, without a frame-sized intermediate:
    the rows are resized with the few taps each output row depends on (a handful of multiply-adds
    over ...xHxw), the columns with matrix products against the W x w resize matrix, one per block
    of output columns over the few input columns the block reads (the matrix is banded): GEMM speed
    without multiplying the zeros (3 masks to 400x600: 2.5 -> 0.8 ms; 192: 352 -> 240 ms).

    Outside autograd the masks go through in groups whose row-resized intermediates stay small
    (``_UPSCALE_GROUP_BYTES``): reused by the allocator from group to group, in the cache, where
    ...xHxw tensors per tap for all masks at once were mapped page by page (64 masks to 400x600:
    the taps alone allocated 100 MB a call); every output value is computed as in one pass.
    """
    x = low_res.float()
    h, w = x.shape[-2:]
    ih, iw = _sparse_resize(h, frame_size, int(input_size[0]), int(original_size[0]))
    cols = _resize_matrix(w, frame_size, int(input_size[1]), int(original_size[1]))
    blocks = _column_blocks(w, frame_size, int(input_size[1]), int(original_size[1]))
    dev = x.device
    ih, iw, cols_t = ih.to(dev), iw.to(dev), cols.t().to(dev)
    big_h, big_w = ih.shape[0], cols.shape[0]
    lead = x.shape[:-2]

    def resize(part: torch.Tensor, dst: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``part`` (...xhxw) at ...xHxW, written to ``dst`` (...xHxW) when given."""
        # Rows: ... x h x w -> ... x H x w, one gathered multiply-add per tap (index_select: a
        # quarter of the time of indexing with a tensor, same values).
        rows = torch.index_select(part, -2, ih[:, 0]) * iw[:, 0, None]
        for t in range(1, ih.shape[1]):
            rows.addcmul_(torch.index_select(part, -2, ih[:, t]), iw[:, t, None])
        # Columns: ... x H x w -> ... x H x W, block by block.
        flat = rows.reshape(-1, w)
        if torch.is_grad_enabled() and flat.requires_grad:
            blocks_out = [flat[:, lo:hi] @ cols_t[lo:hi, c0:c1] for c0, c1, lo, hi in blocks]
            return torch.cat(blocks_out, dim=1).view(*rows.shape[:-1], big_w)
        # Each block's product written in place (3 masks to 400x600: 1.7 -> 1.1 ms without a cat).
        out = flat.new_empty(flat.shape[0], big_w) if dst is None else dst.view(flat.shape[0], big_w)
        for c0, c1, lo, hi in blocks:
            torch.mm(flat[:, lo:hi], cols_t[lo:hi, c0:c1], out=out[:, c0:c1])
        return out.view(*rows.shape[:-1], big_w)

    n = lead.numel()
    group = max(1, min(n, _UPSCALE_GROUP_BYTES // (big_h * w * 4)))
    if (torch.is_grad_enabled() and x.requires_grad) or n <= group:
        logits = resize(x)
        return logits if threshold is None else greater(logits, threshold)
    x = x.reshape(n, h, w)
    out = torch.empty(n, big_h, big_w, device=dev, dtype=torch.float32 if threshold is None else torch.bool)
    logits = None if threshold is None else x.new_empty(group, big_h, big_w)
    for g0 in range(0, n, group):
        part = x[g0 : g0 + group]
        g = part.shape[0]
        if logits is None:
            resize(part, out[g0 : g0 + g])
        else:
            greater(resize(part, logits[:g]), threshold, out=out[g0 : g0 + g])
    return out.view(*lead, big_h, big_w)


def greater(x: torch.Tensor, threshold: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """The bool tensor ``x > threshold`` (into ``out`` when given), with ``threshold`` rounded to
    ``x``'s dtype as torch rounds it. Contiguous CPU tensors outside autograd go through NumPy, whose
    comparison writes bools ~3.5x faster than torch's CPU kernel (3 masks of 400x600: 0.55 -> 0.14
    ms; 64 masks: 10.9 -> 4.0 ms); the same values."""
    if (
        x.device.type != "cpu"
        or x.requires_grad
        or not x.is_contiguous()
        or x.dtype not in (torch.float32, torch.float64)
        or (out is not None and not out.is_contiguous())
    ):
        return torch.gt(x, threshold) if out is None else torch.gt(x, threshold, out=out)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.bool)
    values = x.numpy()
    np.greater(values, values.dtype.type(threshold), out=out.numpy())
    return out


_UPSCALE_GROUP_BYTES = 2 << 20  # row-resized intermediates per group of masks in upscale_masks


_COLUMN_BLOCK = 64


@lru_cache(maxsize=64)
def _column_blocks(low: int, frame: int, crop: int, out: int) -> tuple[tuple[int, int, int, int], ...]:
    """(first, end) output columns and the (first, end) input columns they read, per block."""
    nonzero = _resize_matrix(low, frame, crop, out) != 0
    blocks = []
    for c0 in range(0, out, _COLUMN_BLOCK):
        c1 = min(c0 + _COLUMN_BLOCK, out)
        used = nonzero[c0:c1].any(dim=0).nonzero().flatten()
        lo, hi = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 1)
        blocks.append((c0, c1, lo, hi))
    return tuple(blocks)


def __getattr__(name: str):  # noqa: ANN202
    """``resize`` and ``to_pil_image``: the torchvision functions Meta's module imports (loaded on
    first use: importing torchvision costs seconds and samkit's own code never needs it)."""
    if name in ("resize", "to_pil_image"):
        from torchvision.transforms import functional

        return getattr(functional, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
