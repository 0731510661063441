"""The server's model side: one model, a lock around every call of it, and bounded LRU caches of images,
their embeddings, low-res logits and 'everything' results, all keyed by ids the API hands out.

Image ids are the sha256 of the decoded pixels' file bytes, so re-opening an image finds its embedding.
Every user mistake raises :class:`ApiError` (an HTTP status and one line), never anything else.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..amg import SamAutomaticMaskGenerator
from ..maskgen.output import json_float
from ..predictor import SamPredictor
from ..utils.amg import area_from_rle, calculate_stability_score, coco_encode_rle, mask_to_rle


class ApiError(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: upload bytes, image side and pixels, and the caches' sizes."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_side: int = 4096
    max_pixels: int = 4096 * 4096
    max_points: int = 64
    cache_images: int = 8
    cache_logits: int = 128


# What 'Segment everything' lets a request set, with its range: (type, low, high, default).
EVERYTHING_SETTINGS: dict[str, tuple[type, float, float, Any]] = {
    "points_per_side": (int, 1, 64, 16),
    "pred_iou_thresh": (float, 0.0, 1.0, 0.88),
    "stability_score_thresh": (float, 0.0, 1.0, 0.95),
    "box_nms_thresh": (float, 0.0, 1.0, 0.7),
    "crop_n_layers": (int, 0, 2, 0),
    "min_mask_region_area": (int, 0, 100000, 0),
}


@dataclass
class OpenImage:
    """An image the server holds: pixels HxWx3 uint8, its embedding and the last 'everything' records."""

    image_id: str
    file_name: str
    pixels: np.ndarray
    features: Optional[torch.Tensor] = None
    input_size: tuple[int, int] = (0, 0)
    encoder_ms: float = 0.0
    everything: Optional[list[dict[str, Any]]] = None
    everything_settings: dict[str, Any] = field(default_factory=dict)
    precomputed: bool = False  # the embedding came from a samkit embed file


class LRU(OrderedDict):
    """An OrderedDict that forgets its least recently used entry past ``capacity`` entries."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = max(1, int(capacity))

    def get_recent(self, key: str) -> Any:
        value = self[key]
        self.move_to_end(key)
        return value

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """Uploaded file bytes -> HxWx3 uint8 RGB, refusing oversized, bomb and corrupt files (ApiError 4xx)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from ..utils.image import pil_to_array, to_rgb_uint8

    if not data:
        raise ApiError(400, "the upload is empty")
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, f"the upload has {len(data)} bytes; the limit is {limits.max_upload_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                # The header's size is checked before any pixel is decoded: a bomb never unpacks.
                w, h = img.size
                if max(w, h) > limits.max_side or w * h > limits.max_pixels:
                    raise ApiError(
                        413,
                        f"the image is {w}x{h}; the limits are {limits.max_side} pixels a side and "
                        f"{limits.max_pixels} pixels in all",
                    )
                img.load()
                img = ImageOps.exif_transpose(img)
                try:  # the same conversion as load_image: 16-bit grey is scaled, not clipped to white
                    array = pil_to_array(img)
                except ValueError as err:
                    raise ApiError(415, f"unsupported image: {err}") from None
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "the image is a decompression bomb (too many pixels); refused") from None
    except UnidentifiedImageError:
        raise ApiError(415, "the upload is not an image file Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ApiError(400, f"the image is corrupt: {reason}") from None
    try:
        return to_rgb_uint8(array)
    except ValueError as err:
        raise ApiError(415, f"unsupported image: {err}") from None


class CachedImagePredictor(SamPredictor):
    """A predictor that takes ``image``'s cached embedding when asked to embed that whole image: the
    server's 'everything' then runs the encoder only for the smaller crops (``crop_n_layers`` > 0)."""

    def __init__(self, model: torch.nn.Module, image: OpenImage) -> None:
        super().__init__(model)
        self.cached = image

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        cached = self.cached
        if cached.features is None or tuple(image.shape[:2]) != cached.pixels.shape[:2]:
            super().set_image(image, image_format)  # a crop: smaller than the image, so never the cached one
            return
        h, w = cached.pixels.shape[:2]
        self.reset_image()
        self.features, self.is_image_set = cached.features, True
        self.original_size, self.input_size = (h, w), cached.input_size
        self.original_sizes, self.input_sizes = [(h, w)], [cached.input_size]


class Cancelled(Exception):
    """Raised inside a running 'everything' whose cancel event was set."""


class ServedMaskGenerator(SamAutomaticMaskGenerator):
    """Automatic masks on an opened image: its cached embedding for the whole-image crop, and a
    ``cancel`` event looked at before every batch of points (a long run stops within one batch)."""

    def __init__(self, model: torch.nn.Module, image: OpenImage, cancel: threading.Event, **settings: Any):
        super().__init__(model, output_mode="uncompressed_rle", **settings)
        self.predictor = CachedImagePredictor(model, image)
        self.cancel = cancel

    def _process_batch(self, *args: Any, **kwargs: Any) -> Any:
        if self.cancel.is_set():
            raise Cancelled
        return super()._process_batch(*args, **kwargs)


def rle_of(masks: torch.Tensor) -> list[dict[str, Any]]:
    """KxHxW bool -> uncompressed RLEs in COCO's column-major order (``size`` [H, W], ``counts``)."""
    return mask_to_rle(masks.bool())


class ModelService:
    """One model in one process; every call of it holds ``self.lock``, so requests run one at a time.

    The caches have a lock of their own (held only for a dictionary look-up), so that looking up an
    image, its pixels or the health of the server never waits for a model call.
    """

    def __init__(
        self, model: torch.nn.Module, limits: Limits = Limits(), embeddings: Optional[str] = None
    ) -> None:
        """``embeddings``: a folder written by ``samkit embed`` with this model; an opened image whose
        bytes match one of its files takes that embedding instead of running the encoder."""
        self.model = model.eval()
        self.embeddings = None
        if embeddings is not None:
            from ..utils.embeddings import EmbeddingFolder

            self.embeddings = EmbeddingFolder(embeddings, model)
        self.predictor = SamPredictor(model)
        self.limits = limits
        self.lock = threading.Lock()  # the model and the predictor's state
        self.cache_lock = threading.Lock()  # the two LRUs below
        self.images = LRU(limits.cache_images)  # image id -> OpenImage (embedding included)
        # logits id -> (image id, Cx1x256x256 low-res logits float32 CPU): logits fit only their own image
        self.logits = LRU(limits.cache_logits)
        self.cancels: dict[str, list[threading.Event]] = {}  # image id -> its waiting or running 'everything'
        self.dtype = next(model.parameters()).dtype

    # ---------------------------------------------------------------- images
    def open_image(self, data: bytes, file_name: str) -> tuple[OpenImage, bool]:
        """Decode, then embed unless the same bytes are cached. Returns the image and whether it was cached.

        The same bytes opened under another name take that name (exports are named after the latest)."""
        image_id = hashlib.sha256(data).hexdigest()
        with self.cache_lock:
            if image_id in self.images:
                cached = self.images.get_recent(image_id)
                cached.file_name = file_name
                return cached, True
        pixels = decode_image(data, self.limits)  # outside the lock: decoding needs no model
        image = OpenImage(image_id=image_id, file_name=file_name, pixels=pixels)
        with self.lock:
            with self.cache_lock:
                if image_id in self.images:  # another request embedded it meanwhile
                    cached = self.images.get_recent(image_id)
                    cached.file_name = file_name
                    return cached, True
            start = time.perf_counter()
            stored = self.embeddings.find(image_id, self.model) if self.embeddings is not None else None
            if stored is not None and tuple(stored.original_size) == tuple(pixels.shape[:2]):
                param = next(self.model.parameters())
                image.features = stored.embedding.to(device=param.device, dtype=param.dtype)
                image.input_size = tuple(stored.input_size)  # type: ignore[assignment]
                image.precomputed = True
            else:
                self.predictor.set_image(pixels)
                image.features = self.predictor.features
                image.input_size = tuple(self.predictor.input_size)  # type: ignore[assignment]
            image.encoder_ms = (time.perf_counter() - start) * 1000
            self.predictor.reset_image()
            with self.cache_lock:
                self.images.put(image_id, image)
        return image, False

    def image(self, image_id: Any) -> OpenImage:
        if not isinstance(image_id, str) or not image_id:
            raise ApiError(400, "image_id must be a non-empty string")
        with self.cache_lock:
            if image_id not in self.images:
                raise ApiError(
                    404, f"unknown image id {image_id[:80]!r} (not uploaded, or forgotten: upload again)"
                )
            return self.images.get_recent(image_id)

    # ---------------------------------------------------------------- prompts
    def predict(
        self,
        image: OpenImage,
        points: np.ndarray,
        labels: np.ndarray,
        box: Optional[np.ndarray],
        mask_input: Optional[tuple[str, int]],
        multimask: bool,
    ) -> dict[str, Any]:
        """Decode one prompt on a cached embedding. Points Nx2 and box 4 in XY pixels of the image."""
        h, w = image.pixels.shape[:2]
        previous = None
        if mask_input is not None:
            logits_id, index = mask_input
            with self.cache_lock:
                stored = self.logits.get_recent(logits_id) if logits_id in self.logits else None
            if stored is None:
                raise ApiError(404, f"unknown mask_input id {logits_id[:80]!r} (forgotten: predict again)")
            owner, stored = stored
            if owner != image.image_id:
                raise ApiError(400, "mask_input.logits_id belongs to another image than image_id")
            if not 0 <= index < len(stored):
                raise ApiError(400, f"mask_input index {index} is out of range (0..{len(stored) - 1})")
            previous = stored[index]
        with self.lock:
            start = time.perf_counter()
            p = self.predictor
            p.features, p.is_image_set = image.features, True
            p.original_size, p.input_size = (h, w), image.input_size
            p.original_sizes, p.input_sizes = [(h, w)], [image.input_size]
            try:
                masks, scores, low_res = p.predict(
                    point_coords=points if len(points) else None,
                    point_labels=labels if len(points) else None,
                    box=box,
                    mask_input=previous,
                    multimask_output=multimask,
                    return_logits=True,
                )
            finally:
                p.reset_image()
            decoder_ms = (time.perf_counter() - start) * 1000
            logits = torch.from_numpy(np.asarray(masks, dtype=np.float32))
        logits_id = secrets.token_hex(8)
        with self.cache_lock:
            self.logits.put(logits_id, (image.image_id, np.asarray(low_res, dtype=np.float32)[:, None]))
        threshold = float(self.model.mask_threshold)
        binary = logits > threshold
        stability = calculate_stability_score(logits, threshold, 1.0)
        return {
            "masks": rle_of(binary),
            "scores": [float(s) for s in scores],
            "stability_scores": [json_float(s) for s in stability],  # null for an empty mask
            "areas": [int(a) for a in binary.flatten(1).sum(1)],
            "logits_id": logits_id,
            "decoder_ms": round(decoder_ms, 3),
        }

    def everything(self, image: OpenImage, settings: dict[str, Any]) -> dict[str, Any]:
        """Run automatic mask generation on the image and keep the records. The whole image takes the
        cached embedding; :meth:`cancel_everything` stops it (ApiError 409)."""
        cancel = threading.Event()
        with self.cache_lock:
            self.cancels.setdefault(image.image_id, []).append(cancel)
        try:
            generator = ServedMaskGenerator(self.model, image, cancel, **settings)
            with self.lock:
                start = time.perf_counter()
                try:
                    records = generator.generate(image.pixels)
                except Cancelled:
                    raise ApiError(409, "'everything' was cancelled") from None
                finally:
                    generator.predictor.reset_image()
                amg_ms = (time.perf_counter() - start) * 1000
                image.everything, image.everything_settings = records, dict(settings)
        finally:
            with self.cache_lock:
                waiting = self.cancels[image.image_id]
                waiting.remove(cancel)
                if not waiting:
                    del self.cancels[image.image_id]
        return {
            "masks": [
                {
                    "segmentation": r["segmentation"],
                    "area": int(r["area"]),
                    "bbox": [float(v) for v in r["bbox"]],
                    "predicted_iou": float(r["predicted_iou"]),
                    "stability_score": json_float(r["stability_score"]),
                }
                for r in records
            ],
            "amg_ms": round(amg_ms, 3),
        }

    def cancel_everything(self, image_id: str) -> int:
        """Stop the 'everything' runs of ``image_id`` (running or waiting for the model). Returns how many."""
        with self.cache_lock:
            events = list(self.cancels.get(image_id, []))
        for event in events:
            event.set()
        return len(events)


def coco_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records with uncompressed RLE segmentations -> the same records with COCO (compressed) RLEs."""
    return [{**r, "segmentation": coco_encode_rle(r["segmentation"])} for r in records]


def object_record(rle: dict[str, Any], score: float, stability: float, points: list, h: int, w: int) -> dict:
    """A kept object as an automatic-mask record, so that it exports as the same JSON as ``samkit amg``."""
    from ..utils.amg import rle_to_mask

    mask = rle_to_mask(rle)
    ys, xs = np.nonzero(mask)
    bbox = (
        [0.0] * 4
        if not len(xs)
        else [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())]
    )
    return {
        "segmentation": rle,
        "area": area_from_rle(rle),
        "bbox": bbox,
        "predicted_iou": float(score),
        "stability_score": float(stability),
        "point_coords": [list(map(float, p)) for p in points] or [[0.0, 0.0]],
        "crop_box": [0, 0, w, h],
    }
