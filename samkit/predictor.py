"""SamPredictor: embed an image once, then prompt it as often as you like.

Same names, arguments, return types and shapes as Meta's ``segment_anything.SamPredictor``, plus
many prompts and many images per call (``predict_batch``, ``set_image_batch``). As in Meta's, work
runs under ``torch.no_grad()``: returned tensors and ``get_image_embedding()`` are ordinary tensors
(editable in place, usable in later autograd code), not inference-mode ones.

Conventions: points are XY pixels of the original image, boxes XYXY pixels, labels 1 (foreground)
and 0 (background); sizes are (H, W).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from . import fast
from .errors import PromptError
from .fast.decoder import FastMaskDecoder
from .fast.session import DecoderSession
from .modeling import Sam
from .utils.image import to_rgb_uint8
from .utils.prompt_checks import check_numbers, check_prompts, prompt_sets
from .utils.transforms import ResizeLongestSide, upscale_masks


class SamPredictor:
    def __init__(self, sam_model: Sam, *, text_encoder: Any = None, accelerate: bool = True) -> None:
        """``text_encoder``: a feature encoder (:func:`samkit.text.build_feature_encoder`) whose text
        features the model's text branch takes, for ``predict(text=...)`` on a text-prompt model.
        ``accelerate``: swap samkit's fast modules into the model (:func:`samkit.fast.accelerate`, in
        place; same parameters and results); False leaves the model as it is."""
        if accelerate and not fast.is_accelerated(sam_model):
            fast.accelerate(sam_model)
        self.model = sam_model
        self.text_encoder = text_encoder
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    # ------------------------------------------------------------------ images
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed one image: HxWx3 uint8 RGB (or BGR with ``image_format="BGR"``).

        Grayscale, RGBA and 16-bit arrays are converted by the rule in :mod:`samkit.utils.image`.
        """
        image = to_rgb_uint8(image, image_format)
        self.set_torch_image(self._to_input_tensor(image), image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Embed one image already resized by ``self.transform``: 1x3xHxW, pixel values 0-255."""
        self._check_input_tensor(transformed_image, batch=1)
        self.reset_image()
        self.original_size = tuple(int(s) for s in original_image_size)
        self.input_size = tuple(int(s) for s in transformed_image.shape[-2:])
        self.features = self.model.image_encoder(self.model.preprocess(transformed_image))
        self.is_image_set = True
        self.original_sizes = [self.original_size]
        self.input_sizes = [self.input_size]

    @torch.no_grad()
    def set_image_batch(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> None:
        """Embed several images in one encoder call (images may differ in size).

        Afterwards ``features`` is Bx256x64x64 and ``predict_batch`` takes one prompt set per image.
        """
        if len(images) == 0:
            raise ValueError("set_image_batch needs at least one image")
        arrays = [to_rgb_uint8(im, image_format) for im in images]
        inputs = [self._to_input_tensor(a) for a in arrays]
        self.reset_image()
        batch = torch.cat([self.model.preprocess(x) for x in inputs])
        self.features = self.model.image_encoder(batch)
        self.original_sizes = [tuple(a.shape[:2]) for a in arrays]
        self.input_sizes = [tuple(int(s) for s in x.shape[-2:]) for x in inputs]
        self.original_size, self.input_size = self.original_sizes[0], self.input_sizes[0]
        self.is_image_set = True

    def _to_input_tensor(self, image: np.ndarray) -> torch.Tensor:
        resized = self.transform.apply_image(image)
        return torch.from_numpy(resized).to(self.device).permute(2, 0, 1).contiguous()[None]

    def _check_input_tensor(self, x: torch.Tensor, batch: int) -> None:
        size = self.model.image_encoder.img_size
        if x.ndim != 4 or x.shape[0] != batch or x.shape[1] != 3 or max(x.shape[2:]) != size:
            raise ValueError(
                f"set_torch_image expects 1x3xHxW with long side {size} (use predictor.transform.apply_image), "
                f"got shape {tuple(x.shape)}"
            )

    # ------------------------------------------------------------------ prompts
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        *,
        text_features: np.ndarray | torch.Tensor | None = None,
        text: str | Sequence[str] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for one prompt on the current image.

        point_coords: Nx2 XY pixels; point_labels: N; box: 4 (XYXY); mask_input: 1x256x256 low-res
        logits from an earlier call; text_features: D (e.g. an L2-normalised CLIP text feature; only on
        a model built with ``text_feature_dim=D``; text models were trained with
        ``multimask_output=False``); text: a string, encoded by the predictor's ``text_encoder``
        (``SamPredictor(model, text_encoder=...)``) into text features. Returns masks CxHxW (bool, or
        float32 logits with ``return_logits``), IoU predictions C and low-res logits Cx256x256 (C = 3
        with ``multimask_output`` else 1).

        ``text`` may also be a list of K strings: they are decoded in one call, each with the other
        prompts given (if any), and the results gain a first axis: masks KxCxHxW, IoU KxC, low-res
        logits KxCx256x256.
        """
        self._require_image()
        coords, labels, boxes, masks = self._prompt_tensors(
            point_coords, point_labels, box, mask_input, self.original_size, batched=False
        )
        if text is not None:
            if text_features is not None:
                raise PromptError("give text or text_features, not both")
            features = self.encode_text(text)
            count = features.shape[0]
            coords, labels, boxes, masks = (
                None if t is None else t.expand(count, *t.shape[1:]) if t.shape[0] == 1 else t
                for t in (coords, labels, boxes, masks)
            )
        else:
            features = self._text_tensor(text_features)
        out = self.predict_torch(
            coords, labels, boxes, masks, multimask_output, return_logits, text_features=features
        )
        if text is not None and not isinstance(text, str):
            return tuple(t.cpu().numpy() for t in out)  # type: ignore[return-value]
        return tuple(t[0].cpu().numpy() for t in out)  # type: ignore[return-value]

    def encode_text(self, text: str | Sequence[str]) -> torch.Tensor:
        """The text features (KxD on the model's device) of a string or K strings, from the predictor's
        ``text_encoder``, checked against the model's text branch."""
        dim = getattr(self.model.prompt_encoder, "text_feature_dim", None)
        if dim is None:
            raise PromptError(
                "text prompts need a text-prompt model (a text-fine-tuned SAM, built with text_feature_dim=<size>)"
            )
        if self.text_encoder is None:
            raise PromptError(
                "text prompts need a feature encoder: SamPredictor(model, "
                "text_encoder=samkit.text.build_feature_encoder('clip' or 'blip2', name_or_folder))"
            )
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise PromptError(f"text must be a string or a non-empty list of strings, got {text!r}")
        encoder_dim = getattr(self.text_encoder, "feature_dim", None)
        if encoder_dim is not None and encoder_dim != dim:
            raise PromptError(
                f"the text encoder gives {encoder_dim}-d features, the model's text branch takes {dim}-d: "
                "use the feature model the SAM was fine-tuned with"
            )
        features = torch.as_tensor(self.text_encoder.text_features(texts))
        return self._text_tensor(features)

    def _text_tensor(self, text_features: Any) -> torch.Tensor | None:
        if text_features is None:
            return None
        dim = getattr(self.model.prompt_encoder, "text_feature_dim", None)
        if dim is None:
            raise PromptError("text_features need a text-prompt model: build it with text_feature_dim=<size>")
        if isinstance(text_features, torch.Tensor):
            t = text_features.detach().to(self.device, torch.float32)
        else:
            t = torch.as_tensor(check_numbers(text_features, "text_features", np.float32), device=self.device)
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2 or t.shape[1] != dim:
            raise PromptError(f"text_features must be {dim} values (or Bx{dim}), got {tuple(t.shape)}")
        if not torch.isfinite(t).all():  # NaN features would give NaN masks and scores without a word
            raise PromptError(
                f"text_features must be finite numbers, got {t[~torch.isfinite(t)][:4].tolist()}"
            )
        return t

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        *,
        text_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict masks for B prompts on the current image, coordinates already in the model frame.

        point_coords: BxNx2 (``transform.apply_coords_torch``); point_labels: BxN; boxes: Bx4
        (``transform.apply_boxes_torch``); mask_input: Bx1x256x256; text_features: BxD (text-prompt
        models). Returns masks BxCxHxW, IoU predictions BxC and low-res logits BxCx256x256, all on the
        model's device.
        """
        self._require_image()
        return self._decode(
            self.features if len(self.features) == 1 else self.features[:1], self.input_size, self.original_size,
            point_coords, point_labels, boxes, mask_input, multimask_output, return_logits, text_features,
        )  # fmt: skip

    def predict_batch(
        self,
        prompts: Sequence[Mapping[str, Any]],
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Many prompts on each of the images given to ``set_image_batch`` (or ``set_image``).

        ``prompts[i]`` holds image i's prompts in its original pixels, with keys (all optional)
        ``point_coords`` BxNx2, ``point_labels`` BxN, ``boxes`` Bx4 and ``mask_input`` Bx1x256x256;
        B is the number of prompts for that image (a single prompt may drop the B axis: Nx2, N, 4).
        Returns, per image, masks BxCxHxW, IoU predictions BxC and low-res logits BxCx256x256.
        """
        self._require_image()
        results = []
        for i, prompt in enumerate(prompt_sets(prompts, len(self.original_sizes))):
            coords, labels, boxes, masks = self._prompt_tensors(*prompt, self.original_sizes[i], batched=True)
            out = self._decode(
                self.features[i : i + 1], self.input_sizes[i], self.original_sizes[i],
                coords, labels, boxes, masks, multimask_output, return_logits,
            )  # fmt: skip
            results.append(tuple(t.cpu().numpy() for t in out))
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _decode(
        self,
        features: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        return_logits: bool,
        text_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if point_coords is not None and point_labels is None:
            raise PromptError("point_labels must be given with point_coords")
        points = (point_coords, point_labels) if point_coords is not None else None
        model = self.model
        if text_features is None:
            sparse, dense = model.prompt_encoder(points, boxes, mask_input)
        else:
            sparse, dense = model.prompt_encoder(points, boxes, mask_input, text=text_features)
        args = (features, self.dense_pe(), sparse, dense, multimask_output)
        if isinstance(model.mask_decoder, FastMaskDecoder):
            low_res, iou = model.mask_decoder(*args, session=self.decoder_session)
        else:
            low_res, iou = model.mask_decoder(*args)
        low_res, iou = low_res.float(), iou.float()
        threshold = None if return_logits else model.mask_threshold
        masks = upscale_masks(low_res, model.image_encoder.img_size, input_size, original_size, threshold)
        return masks, iou, low_res

    def _prompt_tensors(
        self,
        point_coords: Any,
        point_labels: Any,
        box: Any,
        mask_input: Any,
        original_size: tuple[int, ...],
        batched: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Validate prompts in original pixels (:func:`samkit.utils.prompt_checks.check_prompts`) and
        move them to the model frame as tensors."""
        dev = self.device
        coords, labels, boxes, masks = check_prompts(
            point_coords, point_labels, box, mask_input,
            batched=batched, mask_size=self.model.prompt_encoder.mask_input_size,
        )  # fmt: skip
        if coords is not None:
            coords = self.transform.apply_coords(coords, original_size)
        if boxes is not None:
            boxes = self.transform.apply_boxes(boxes, original_size)
        return (
            None if coords is None else torch.as_tensor(coords, dtype=torch.float, device=dev),
            None if labels is None else torch.as_tensor(labels, dtype=torch.int, device=dev),
            None if boxes is None else torch.as_tensor(boxes, dtype=torch.float, device=dev),
            None if masks is None else torch.as_tensor(masks, device=dev),
        )

    # ------------------------------------------------------------------ state
    def dense_pe(self) -> torch.Tensor:
        """The prompt encoder's positional encoding of the embedding grid (1xCxHxW), kept by the decoder
        session while the buffer it is computed from is unchanged."""

        return self.decoder_session.dense_pe(self.model.prompt_encoder)

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's embedding: 1x256x64x64 (Bx... after ``set_image_batch``)."""
        self._require_image()
        return self.features

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        # The fast decoder's work on this image and fp32 weight copies (samkit.fast.session).
        self.decoder_session = DecoderSession()
        self.orig_h = self.orig_w = self.input_h = self.input_w = None
        self.original_size: tuple[int, ...] | None = None
        self.input_size: tuple[int, ...] | None = None
        self.original_sizes: list[tuple[int, ...]] = []
        self.input_sizes: list[tuple[int, ...]] = []

    def _require_image(self) -> None:
        if not self.is_image_set or self.features is None:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
