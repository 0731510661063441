"""OnnxPredictor: SamPredictor's interface on ONNX Runtime, with numpy and Pillow only (no torch).

Runs the ``encoder.onnx`` and ``decoder.onnx`` that ``samkit export-onnx`` writes (the decoder has
Meta's interface). Conventions are SamPredictor's: points Nx2 XY pixels of the original image, labels
1 foreground / 0 background, boxes XYXY pixels, masks CxHxW at the original size, low-res logits
Cx256x256, sizes (H, W).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from ..utils.image import to_rgb_uint8
from ..utils.prompt_checks import check_prompts, prompt_sets

DEFAULT_PIXEL_MEAN = (123.675, 116.28, 103.53)
DEFAULT_PIXEL_STD = (58.395, 57.12, 57.375)


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """(H, W) resized so the long side is ``long_side``, rounded half up, at least one pixel each
    (ResizeLongestSide's rule)."""
    scale = long_side * 1.0 / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def resize_image(image: np.ndarray, long_side: int) -> np.ndarray:
    """HxWx3 uint8 -> resized uint8 with the long side ``long_side`` (PIL bilinear, as SamPredictor)."""
    from PIL import Image

    h, w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def apply_coords(coords: np.ndarray, original_size: tuple[int, int], long_side: int) -> np.ndarray:
    """...x2 XY pixels of the original image -> XY pixels of the resized frame (float32)."""
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(old_h, old_w, long_side)
    out = np.array(coords, dtype=np.float64)
    out[..., 0] *= new_w / old_w
    out[..., 1] *= new_h / old_h
    return out.astype(np.float32)


def _session(path: str | os.PathLike, providers: Sequence[str] | None, options: Any = None) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("OnnxPredictor needs onnxruntime: pip install 'samkit[onnx]'") from err
    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
    return ort.InferenceSession(
        os.fspath(path), options, providers=list(providers or ["CPUExecutionProvider"])
    )


def _metadata(session: Any) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)


class OnnxPredictor:
    """Embed an image once with ``encoder.onnx``, then prompt it with ``decoder.onnx``.

    ``model_dir`` is the folder ``samkit export-onnx`` wrote (or pass ``encoder_path``/``decoder_path``).
    The image size, pixel mean/std and mask threshold come from the models' metadata. ``providers``
    (default CPU) and ``session_options`` (an ``onnxruntime.SessionOptions``) go to both sessions.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        encoder_path: str | os.PathLike | None = None,
        decoder_path: str | os.PathLike | None = None,
        providers: Sequence[str] | None = None,
        session_options: Any = None,
    ) -> None:
        if model_dir is not None:
            encoder_path = encoder_path or os.path.join(model_dir, "encoder.onnx")
            decoder_path = decoder_path or os.path.join(model_dir, "decoder.onnx")
        if encoder_path is None or decoder_path is None:
            raise ValueError("pass model_dir, or both encoder_path and decoder_path")
        self.encoder = _session(encoder_path, providers, session_options)
        self.decoder = _session(decoder_path, providers, session_options)
        meta = {**_metadata(self.decoder), **_metadata(self.encoder)}
        self.metadata = meta
        self.image_size = int(meta.get("image_size", 1024))
        self.pixel_mean = np.array(
            [float(v) for v in meta.get("pixel_mean", ",".join(map(str, DEFAULT_PIXEL_MEAN))).split(",")],
            dtype=np.float32,
        )
        self.pixel_std = np.array(
            [float(v) for v in meta.get("pixel_std", ",".join(map(str, DEFAULT_PIXEL_STD))).split(",")],
            dtype=np.float32,
        )
        self.mask_threshold = float(meta.get("mask_threshold", 0.0))
        self._encoder_input = self.encoder.get_inputs()[0]
        self.decoder_output_names = [o.name for o in self.decoder.get_outputs()]
        self.reset_image()

    # ------------------------------------------------------------------ images
    @property
    def mask_size(self) -> tuple[int, int]:
        """(H, W) of the decoder's low-res mask input and output per prompt: 4x the embedding grid
        (256x256 for SAM's 1024 frame)."""
        return (self.image_size // 4, self.image_size // 4)

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed one image: HxWx3 uint8 RGB (or BGR with ``image_format="BGR"``)."""
        self.set_image_batch([image], image_format)

    def set_image_batch(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> None:
        """Embed several images (one encoder run each); ``predict_batch`` then takes one prompt set per image."""
        if len(images) == 0:
            raise ValueError("set_image_batch needs at least one image")
        arrays = [to_rgb_uint8(im, image_format) for im in images]
        features = [self._embed(a) for a in arrays]
        self.reset_image()
        self.features = np.concatenate(features)
        self.original_sizes = [tuple(int(s) for s in a.shape[:2]) for a in arrays]
        self.input_sizes = [preprocess_shape(*s, self.image_size) for s in self.original_sizes]
        self.original_size, self.input_size = self.original_sizes[0], self.input_sizes[0]
        self.is_image_set = True

    def encoder_input(self, image: np.ndarray) -> np.ndarray:
        """The encoder's input for an HxWx3 uint8 RGB image: 1x3xSxS normalised and padded, or the resized
        HxWx3 float32 pixels for an encoder exported with the normalise + pad in its graph."""
        resized = resize_image(image, self.image_size).astype(np.float32)
        if len(self._encoder_input.shape) == 3:
            return resized
        x = (resized - self.pixel_mean) / self.pixel_std
        h, w = x.shape[:2]
        s = self.image_size
        padded = np.zeros((1, 3, s, s), dtype=np.float32)
        padded[0, :, :h, :w] = x.transpose(2, 0, 1)
        return padded

    def _embed(self, image: np.ndarray) -> np.ndarray:
        return self.encoder.run(None, {self._encoder_input.name: self.encoder_input(image)})[0]

    # ------------------------------------------------------------------ prompts
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt on the current image: point_coords Nx2, point_labels N, box 4 (XYXY), mask_input
        1x256x256. Returns masks CxHxW (bool, or float32 logits), IoU predictions C, low-res logits Cx256x256."""
        self._require_image()
        prompt = (point_coords, point_labels, box, mask_input)
        return self._decode(0, prompt, multimask_output, return_logits)

    def predict_batch(
        self,
        prompts: Sequence[Mapping[str, Any]],
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Many prompts on each image set, as SamPredictor.predict_batch: ``prompts[i]`` holds image i's
        ``point_coords`` BxNx2, ``point_labels`` BxN, ``boxes`` Bx4, ``mask_input`` Bx1x256x256 (all
        optional). Returns per image masks BxCxHxW, IoU BxC, low-res logits BxCx256x256."""
        self._require_image()
        results = []
        for i, prompt in enumerate(prompt_sets(prompts, len(self.original_sizes))):
            coords, labels, boxes, masks = check_prompts(*prompt, batched=True, mask_size=self.mask_size)
            count = next((len(a) for a in (coords, boxes, masks) if a is not None), 1)
            outs = []
            for b in range(count):
                one = [None if a is None else a[b] for a in (coords, labels, boxes, masks)]
                outs.append(self._decode(i, one, multimask_output, return_logits))
            results.append(tuple(np.stack([o[k] for o in outs]) for k in range(3)))
        return results  # type: ignore[return-value]

    def decoder_inputs(
        self,
        image_index: int,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
    ) -> dict[str, np.ndarray]:
        """Meta's decoder inputs for one prompt in original pixels: points then box corners (labels 2, 3),
        or a padding point (label -1) when there is no box; coordinates in the resized frame."""
        size = self.original_sizes[image_index]
        pc, pl, boxes, masks = check_prompts(
            point_coords, point_labels, box, mask_input, batched=False, mask_size=self.mask_size
        )
        coords = np.zeros((0, 2), dtype=np.float32)
        labels = np.zeros((0,), dtype=np.float32)
        if pc is not None:
            coords, labels = apply_coords(pc[0], size, self.image_size), pl[0].astype(np.float32)
        if boxes is not None:
            corners = apply_coords(boxes[0].reshape(2, 2), size, self.image_size)
            coords = np.concatenate([coords, corners])
            labels = np.concatenate([labels, np.array([2, 3], dtype=np.float32)])
        else:
            coords = np.concatenate([coords, np.zeros((1, 2), dtype=np.float32)])
            labels = np.concatenate([labels, np.array([-1], dtype=np.float32)])
        if masks is None:
            mask, has_mask = (
                np.zeros((1, 1, *self.mask_size), dtype=np.float32),
                np.zeros(1, dtype=np.float32),
            )
        else:
            mask, has_mask = masks[:1], np.ones(1, dtype=np.float32)
        return {
            "image_embeddings": self.features[image_index : image_index + 1],
            "point_coords": coords[None].astype(np.float32),
            "point_labels": labels[None].astype(np.float32),
            "mask_input": mask,
            "has_mask_input": has_mask,
            "orig_im_size": np.array(size, dtype=np.float32),
        }

    def _decode(
        self, image_index: int, prompt: Sequence[Any], multimask_output: bool, return_logits: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt (point_coords, point_labels, box, mask_input) decoded: masks, IoU, low-res logits."""
        inputs = self.decoder_inputs(image_index, *prompt)
        out = dict(zip(self.decoder_output_names, self.decoder.run(None, inputs)))
        masks, iou, low_res = out["masks"][0], out["iou_predictions"][0], out["low_res_masks"][0]
        if masks.shape[0] > 1:  # all mask tokens: the single-mask token first, then the multimask ones
            pick = slice(1, None) if multimask_output else slice(0, 1)
            masks, iou, low_res = masks[pick], iou[pick], low_res[pick]
        if not return_logits:
            masks = masks > self.mask_threshold
        return masks, iou, low_res

    # ------------------------------------------------------------------ state
    def get_image_embedding(self) -> np.ndarray:
        """The current image's embedding: 1x256x64x64 (Bx... after ``set_image_batch``)."""
        self._require_image()
        return self.features

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: np.ndarray | None = None
        self.original_size: tuple[int, ...] | None = None
        self.input_size: tuple[int, ...] | None = None
        self.original_sizes: list[tuple[int, ...]] = []
        self.input_sizes: list[tuple[int, ...]] = []

    def _require_image(self) -> None:
        if not self.is_image_set or self.features is None:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")


__all__ = ["OnnxPredictor", "apply_coords", "preprocess_shape", "resize_image"]
