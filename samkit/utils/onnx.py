"""Traceable wrappers of SAM for ONNX export: Meta's ``SamOnnxModel`` decoder interface and the image encoder.

``SamOnnxModel(model, return_single_mask, use_stability_score=False, return_extra_metrics=False)`` takes
Meta's constructor and inputs, so Meta's ``scripts/export_onnx_model.py`` runs with its imports changed
to ``samkit``. Inputs (Meta's names): ``image_embeddings`` 1x256x64x64, ``point_coords`` 1xNx2 (XY in the
resized 1024 frame, before the +0.5 pixel-centre shift), ``point_labels`` 1xN (1 foreground, 0 background,
2/3 box corners, -1 padding), ``mask_input`` 1x1x256x256, ``has_mask_input`` 1, ``orig_im_size`` 2 (H, W).
Outputs ``masks`` 1xCxHxW logits at ``orig_im_size``, ``iou_predictions`` 1xC, ``low_res_masks`` 1xCx256x256
(C = 4, or 1 with ``return_single_mask``); with ``return_extra_metrics``: masks, iou_predictions,
stability_scores, areas, low_res_masks.

The wrappers trace the reference modules (:mod:`samkit.modeling`): a model accelerated by
:func:`samkit.fast.accelerate` is restored for the trace and accelerated again after it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..fast import accelerate, is_accelerated, restore
from ..modeling import Sam
from ..modeling.common import LayerNorm2d
from .amg import calculate_stability_score  # noqa: F401  (a name Meta's module has)

DECODER_INPUT_NAMES = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
DECODER_OUTPUT_NAMES = ("masks", "iou_predictions", "low_res_masks")
EXTRA_METRICS_OUTPUT_NAMES = ("masks", "iou_predictions", "stability_scores", "areas", "low_res_masks")


class _StaticLayerNorm2d(nn.Module):
    """LayerNorm2d with its channel count fixed at construction (the exporter needs a constant
    normalised shape, where LayerNorm2d reads it from the input). Shares the original's parameters."""

    def __init__(self, norm: LayerNorm2d) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.channels = int(norm.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (self.channels,), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


@contextlib.contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """The reference modules and LayerNorm2d with a constant shape in ``model`` (a Sam), all restored
    after."""
    fast = is_accelerated(model)
    restore(model)
    swapped = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, LayerNorm2d)
    ]
    try:
        for parent, name, child in swapped:
            setattr(parent, name, _StaticLayerNorm2d(child))
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
        if fast:
            accelerate(model)


def stability_score(masks: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``mask_threshold + offset`` and ``- offset`` (...xHxW -> ...)."""
    high = (masks > (mask_threshold + offset)).sum(-1, dtype=torch.int32).sum(-1, dtype=torch.int32)
    low = (masks > (mask_threshold - offset)).sum(-1, dtype=torch.int32).sum(-1, dtype=torch.int32)
    return high / low


class SamOnnxModel(nn.Module):
    """Prompt encoder + mask decoder + mask postprocessing in one traceable module (Meta's interface)."""

    def __init__(
        self,
        model: Sam,
        return_single_mask: bool,
        use_stability_score: bool = False,
        return_extra_metrics: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.mask_decoder = model.mask_decoder
        self.img_size = model.image_encoder.img_size
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.stability_score_offset = 1.0
        self.return_extra_metrics = return_extra_metrics

    @staticmethod
    def resize_longest_image_size(input_image_size: torch.Tensor, longest_side: int) -> torch.Tensor:
        """(H, W) of the image resized so its long side is ``longest_side`` (rounded half up, at least
        one pixel), int64."""
        size = input_image_size.to(torch.float32)
        scaled = size * (longest_side / torch.max(size))
        return torch.clamp(torch.floor(scaled + 0.5), min=1.0).to(torch.int64)

    def _embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        encoder = self.model.prompt_encoder
        coords = (point_coords + 0.5) / self.img_size  # pixel centres, as fractions of the square frame
        gaussian = encoder.pe_layer.positional_encoding_gaussian_matrix
        proj = (2 * torch.pi) * ((2 * coords - 1) @ gaussian)
        embedding = torch.cat([proj.sin(), proj.cos()], dim=-1)
        labels = point_labels.unsqueeze(-1)
        embedding = embedding * (labels != -1).to(embedding.dtype)
        embedding = embedding + encoder.not_a_point_embed.weight * (labels == -1).to(embedding.dtype)
        for i, point_embedding in enumerate(encoder.point_embeddings):
            embedding = embedding + point_embedding.weight * (labels == i).to(embedding.dtype)
        return embedding

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        encoder = self.model.prompt_encoder
        no_mask = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask_input * encoder.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """Low-res logits -> the square input frame -> crop the padding -> the original size."""
        masks = F.interpolate(
            masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False
        )
        resized = self.resize_longest_image_size(orig_im_size, self.img_size)
        masks = masks[..., : resized[0], : resized[1]]
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)

    def select_masks(
        self, masks: torch.Tensor, iou_preds: torch.Tensor, num_points: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask per prompt without control flow: the single-mask token for more than 2 points
        (one click plus its padding point takes the best of the three multimask outputs)."""
        weights = torch.zeros(1, iou_preds.shape[1], dtype=iou_preds.dtype, device=iou_preds.device)
        weights[0, 0] = 1000.0
        best = torch.argmax(iou_preds + (num_points - 2.5) * weights, dim=1)
        rows = torch.arange(masks.shape[0], device=masks.device)
        return masks[rows, best].unsqueeze(1), iou_preds[rows, best].unsqueeze(1)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        with traceable(self.model):
            outputs = self._forward(
                image_embeddings, point_coords, point_labels, mask_input, has_mask_input, orig_im_size
            )
        return tuple(t.detach() for t in outputs)

    def _forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        image_pe = self.model.prompt_encoder.get_dense_pe()
        masks, scores = self.model.mask_decoder.predict_masks(image_embeddings, image_pe, sparse, dense)
        threshold = self.model.mask_threshold
        if self.use_stability_score:
            scores = stability_score(masks, threshold, self.stability_score_offset)
        if self.return_single_mask:
            masks, scores = self.select_masks(masks, scores, point_coords.shape[1])
        upscaled = self.mask_postprocessing(masks, orig_im_size)
        if self.return_extra_metrics:
            stability = stability_score(upscaled, threshold, self.stability_score_offset)
            areas = (upscaled > threshold).sum(-1).sum(-1)
            return upscaled, scores, stability, areas, masks
        return upscaled, scores, masks


class SamOnnxEncoder(nn.Module):
    """The image encoder for export.

    Default input: ``image`` 1x3xSxS, normalised and zero-padded bottom/right (``Sam.preprocess``).
    With ``preprocess=True`` the input is ``input_image`` HxWx3 float32 RGB pixels 0-255, already resized
    so the long side is S (dynamic H, W), normalised and padded in the graph. Output ``image_embeddings``
    1x256x(S/16)x(S/16).
    """

    def __init__(self, model: Sam, preprocess: bool = False) -> None:
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.img_size = model.image_encoder.img_size
        self.register_buffer("mean", torch.tensor(model._mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model._std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        with traceable(self.model):
            if self.preprocess:
                x = (image.permute(2, 0, 1).unsqueeze(0) - self.mean) / self.std
                h, w = image.shape[0], image.shape[1]
                x = F.pad(x, (0, self.img_size - w, 0, self.img_size - h))
            else:
                x = image
            out = self.model.image_encoder(x)
        return out.detach()


__all__ = [
    "DECODER_INPUT_NAMES",
    "DECODER_OUTPUT_NAMES",
    "EXTRA_METRICS_OUTPUT_NAMES",
    "SamOnnxEncoder",
    "SamOnnxModel",
    "stability_score",
    "traceable",
]
