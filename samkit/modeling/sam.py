"""The Segment Anything model: image encoder + prompt encoder + mask decoder."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder


class Sam(nn.Module):
    """SAM: ``image_encoder`` embeds images, ``prompt_encoder`` embeds prompts, ``mask_decoder`` predicts
    masks. ``pixel_mean``/``pixel_std`` normalise RGB 0-255 pixels."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Not part of the state dict, as in Meta's checkpoints. The tuples keep fp32 values for
        # preprocess() after the model is cast to bf16/fp16 (123.675 is 123.5 in bf16).
        self._mean = tuple(float(v) for v in pixel_mean)
        self._std = tuple(float(v) for v in pixel_std)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (the model computes in it)."""
        return self.mask_decoder.iou_token.weight.dtype

    @torch.no_grad()
    def forward(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """End-to-end prediction for inference, under ``torch.no_grad()`` as Meta's (train with
        :meth:`forward_train`, same inputs and outputs).

        Each input dict holds ``image`` (3xHxW, already resized so the long side is the encoder's
        input size, pixel values 0-255), ``original_size`` (H, W) and optionally ``point_coords``
        (BxNx2, XY in the resized frame), ``point_labels`` (BxN), ``boxes`` (Bx4 XYXY) and
        ``mask_inputs`` (Bx1x256x256 logits), and on a text-prompt model ``text_features`` (BxD). Each output dict holds ``masks`` (BxCxHxW bool at the
        original size), ``iou_predictions`` (BxC) and ``low_res_logits`` (BxCx256x256).
        """
        return self._predict(batched_input, multimask_output)

    def forward_train(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """:meth:`forward` with autograd: ``iou_predictions`` and ``low_res_logits`` carry gradients to
        every parameter they depend on (``masks`` is thresholded, so it has none). Autograd follows the
        caller's grad mode (on unless disabled); run the model in ``train()`` mode for training.
        """
        return self._predict(batched_input, multimask_output)

    def _predict(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        images = torch.stack([self.preprocess(x["image"]) for x in batched_input])
        embeddings = self.image_encoder(images)
        outputs = []
        for record, embedding in zip(batched_input, embeddings):
            points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
            sparse, dense = self.prompt_encoder(
                points, record.get("boxes"), record.get("mask_inputs"), text=record.get("text_features")
            )
            low_res, iou = self.mask_decoder(
                embedding.unsqueeze(0), self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output
            )
            masks = self.postprocess_masks(low_res, record["image"].shape[-2:], record["original_size"])
            outputs.append(
                {"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res}
            )
        return outputs

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """Low-res logits BxCxhxw -> logits BxCxHxW at the original image size.

        Upsample to the padded input frame, drop the padding, then resize to the original size.
        """
        size = self.image_encoder.img_size
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(
            masks, tuple(int(s) for s in original_size), mode="bilinear", align_corners=False
        )

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise 3xHxW (or Bx3xHxW) 0-255 pixels and pad bottom/right to a square input."""
        mean = torch.tensor(self._mean, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self._std, device=x.device).view(-1, 1, 1)
        x = (x.float() - mean) / std
        size = self.image_encoder.img_size
        h, w = x.shape[-2:]
        return F.pad(x, (0, size - w, 0, size - h)).to(self.dtype)
