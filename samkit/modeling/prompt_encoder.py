"""Prompt encoder: points, boxes and (optionally) text features become sparse tokens, a low-res mask
becomes a dense embedding."""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (a fixed Gaussian 2xF matrix)."""

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """coords in [0, 1], ...x2 (x, y) -> ...x(2F)."""
        gaussian = self.positional_encoding_gaussian_matrix
        # Positions are kept in fp32 even in a bf16 model: sin/cos of 2*pi*large arguments lose
        # every digit in bf16.
        proj = (2 * math.pi) * ((2 * coords.float() - 1) @ gaussian.float())
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an HxW grid: CxHxW."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode pixel coordinates BxNx2 (x, y) in an image of size (H, W): BxNxC, fp32."""
        coords = coords_input.float().clone()
        coords[..., 0] = coords[..., 0] / image_size[1]
        coords[..., 1] = coords[..., 1] / image_size[0]
        return self._encode(coords)


class PromptEncoder(nn.Module):
    """Embeds prompts for the mask decoder.

    Points are BxNx2 pixel coordinates (x, y) in the padded model-input frame with labels BxN
    (1 foreground, 0 background, -1 padding); boxes are Bx4 (x0, y0, x1, y1); masks are Bx1xHxW
    logits at 4x the embedding resolution (256x256 for SAM).

    With ``text_feature_dim`` set, it also embeds BxD text (or image-crop) features, e.g. L2-normalised
    CLIP or BLIP-2 features, as one sparse token per prompt: ``text_proj(feature) + text_embeddings``
    (the seed's text-prompt SAM). Without it the module is Meta's, with no text parameters.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
        *,
        text_feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: background point, 1: foreground point, 2: box top-left corner, 3: box bottom-right corner.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        self.text_feature_dim = text_feature_dim
        if text_feature_dim is not None:
            self.text_proj = nn.Linear(text_feature_dim, embed_dim)
            self.text_embeddings = nn.Embedding(1, embed_dim)
            # Features arrive L2-normalised: with N(0, 1) weights a feature's projection starts with a
            # norm ~sqrt(embed_dim), the scale of the learned embeddings and of a point's positional
            # encoding. nn.Linear's default (uniform +-1/sqrt(D)) gives ~0.3 beside text_embeddings'
            # ~16: every prompt would start as nearly the same token, and the decoder would first learn
            # one average mask for all of them (measured on the tests' named shapes).
            nn.init.normal_(self.text_proj.weight)
            nn.init.zeros_(self.text_proj.bias)

    @property
    def _dtype(self) -> torch.dtype:
        return self.no_mask_embed.weight.dtype

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: 1xCxHxW in the model's dtype."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0).to(self._dtype)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points.float() + 0.5  # shift to the pixel centre
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size).to(self._dtype)
        labels = labels[..., None]
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, pe)
        emb = emb + torch.where(labels == 0, self.point_embeddings[0].weight, 0.0)
        emb = emb + torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = boxes.float().reshape(-1, 2, 2) + 0.5
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size).to(self._dtype)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return pe + corner_embed

    def _embed_text(self, text: torch.Tensor) -> torch.Tensor:
        if self.text_feature_dim is None:
            raise ValueError(
                "this prompt encoder has no text branch: build the model with text_feature_dim=<feature size>"
            )
        if text.ndim != 2 or text.shape[1] != self.text_feature_dim:
            raise ValueError(f"text features must be Bx{self.text_feature_dim}, got {tuple(text.shape)}")
        token = self.text_proj(text.to(self._dtype)) + self.text_embeddings.weight
        return token[:, None, :]

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        return self.mask_downscaling(masks.to(self._dtype))

    @staticmethod
    def _batch_size(
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        text: torch.Tensor | None = None,
    ) -> int:
        if text is not None:
            return text.shape[0]
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        text: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse embeddings BxNxC and dense embeddings BxCxHxW (H, W = image_embedding_size).

        ``text`` (BxD features, models built with ``text_feature_dim=D``) adds one token per prompt
        after the point and box tokens.
        """
        bs = self._batch_size(points, boxes, masks, text)
        device = self.no_mask_embed.weight.device
        parts = []
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if text is not None:
            parts.append(self._embed_text(text))
        sparse = (
            torch.cat(parts, dim=1)
            if parts
            else torch.empty(bs, 0, self.embed_dim, device=device, dtype=self._dtype)
        )
        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense
