"""Text prompts (the seed's CLIP/BLIP-2 text fine-tuning, SAM paper section 7.5): no text labels needed.

Training prompts each object with the L2-normalised image feature of a crop around it, from a frozen
feature encoder (:mod:`samkit.text`); at inference the text feature of a prompt replaces it. An object
is prompted when its mask covers at least ``min_area`` pixels of the original image. Its crop is taken
as the seed takes it: the mask's box expanded by a factor U(1, ``max_expand``) about its centre and
clipped to the image, a centred square of side min(width, height) of that box, resized to the
encoder's input size (bilinear ``roi_align``), its background zeroed with probability
``mask_background_prob``. Randomness is seeded by (seed, epoch, image index, object), so a resumed run
and any number of processes draw the same crops. Crops are cut from the batch's resized model input
on the device and encoded in one batch.

One round, mask token 0 (``multimask_output=False``). Evaluation (:func:`evaluate_batch`, protocol
``text``): the crop-feature protocol, each prompted object scored against its own mask.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torchvision.ops import roi_align

from ..metrics import MiouAccumulator
from .base import Prediction, PromptMode, Session, TrainBatch, score_objects


class TextSession(Session):
    """One round; ``features`` NxD are the prompted objects' crop features, in batch order."""

    def __init__(self, batch: TrainBatch, valid: torch.Tensor, features: torch.Tensor) -> None:
        super().__init__(batch, valid=valid)
        self.features = features


class TextPrompts(PromptMode):
    """Crop-feature prompts for a SAM built with ``text_feature_dim`` = the encoder's feature size."""

    def __init__(
        self,
        sam,
        *,
        feature_encoder,
        min_area: int = 10000,
        max_expand: float = 2.0,
        mask_background_prob: float = 0.5,
    ) -> None:
        super().__init__(sam)
        dim = getattr(sam.prompt_encoder, "text_feature_dim", None)
        if dim != feature_encoder.feature_dim:
            raise ValueError(
                f"the text encoder gives {feature_encoder.feature_dim}-d features but the SAM was built with "
                f"text_feature_dim={dim}"
            )
        self.feature_encoder = feature_encoder
        self.min_area = min_area
        self.max_expand = max_expand
        self.mask_background_prob = mask_background_prob

    def session(self, batch: TrainBatch) -> TextSession:
        if batch.images is None:
            raise ValueError("text prompts crop the model input: they cannot run from cached embeddings yet")
        valid = batch.valid & self._large_enough(batch)
        return TextSession(batch, valid, self.crop_features(batch, valid))

    def forward(self, session: TextSession, embeddings: torch.Tensor) -> Prediction:
        encoder = self.sam.prompt_encoder
        prompts, start = [], 0
        for b in range(embeddings.shape[0]):
            n = int(session.valid[b].sum())
            feats = session.features[start : start + n]
            start += n
            prompts.append(encoder(None, None, None, text=feats) if n else None)
        return self.decode(embeddings, prompts, multimask_output=False)

    def _large_enough(self, batch: TrainBatch) -> torch.Tensor:
        """BxK: mask area at the original resolution >= min_area."""
        area = batch.masks.flatten(2).sum(-1, dtype=torch.float64)
        orig = batch.extra["original_size"].to(area.device, torch.float64)
        inp = batch.extra["input_size"].to(area.device, torch.float64)
        scale = (orig[:, 0] * orig[:, 1]) / (inp[:, 0] * inp[:, 1])
        return area * scale[:, None] >= self.min_area

    def _draws(self, batch: TrainBatch, valid: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Per prompted object: the expansion factor and whether the background is zeroed."""
        factors, blackout = [], []
        for b, k in valid.nonzero().tolist():
            rng = np.random.default_rng([batch.seed, batch.epoch, int(batch.index[b]), k, 0x7E47])
            u = rng.random(2)
            factors.append(1.0 + (self.max_expand - 1.0) * u[0])
            blackout.append(u[1] < self.mask_background_prob)
        return np.asarray(factors, np.float64), np.asarray(blackout, bool)

    @torch.no_grad()
    def crop_features(self, batch: TrainBatch, valid: torch.Tensor) -> torch.Tensor:
        """NxD L2-normalised features of the prompted objects' crops (N = valid.sum())."""
        enc = self.feature_encoder
        dim = enc.feature_dim
        device = batch.masks.device
        idx = valid.nonzero()
        if len(idx) == 0:
            return torch.zeros(0, dim, device=device)
        masks = batch.masks[valid].float()  # NxSxS
        factors, blackout = self._draws(batch, valid)
        cols, rows = masks.amax(1) > 0, masks.amax(2) > 0  # NxS: any pixel in each column / row
        size = masks.shape[-1]
        ar = torch.arange(size, device=device, dtype=torch.float64)
        big = torch.full_like(ar, size)
        x0 = torch.where(cols, ar, big).amin(1)
        x1 = torch.where(cols, ar, -big).amax(1) + 1
        y0 = torch.where(rows, ar, big).amin(1)
        y1 = torch.where(rows, ar, -big).amax(1) + 1
        inp = batch.extra["input_size"].to(device, torch.float64)[idx[:, 0]]  # Nx2 (h, w)
        f = torch.as_tensor(factors, device=device)
        cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * f, (y1 - y0) * f
        ex0, ex1 = (cx - w / 2).clamp(min=0), torch.minimum(cx + w / 2, inp[:, 1])
        ey0, ey1 = (cy - h / 2).clamp(min=0), torch.minimum(cy + h / 2, inp[:, 0])
        side = torch.minimum(ex1 - ex0, ey1 - ey0)
        cx, cy = (ex0 + ex1) / 2, (ey0 + ey1) / 2
        rois = torch.stack(
            [idx[:, 0].double(), cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=1
        ).float()
        out = (enc.image_size, enc.image_size)
        mean = torch.tensor(self.sam._mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.sam._std, device=device).view(1, 3, 1, 1)
        pixels = (batch.images.float() * std + mean) / 255.0  # the model input back to RGB in [0, 1]
        crops = roi_align(pixels, rois, out, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        mask_rois = rois.clone()
        mask_rois[:, 0] = torch.arange(len(rois), device=device, dtype=torch.float32)
        mask_crops = roi_align(
            masks[:, None], mask_rois, out, spatial_scale=1.0, sampling_ratio=2, aligned=True
        )
        keep = torch.as_tensor(~blackout, device=device).view(-1, 1, 1, 1)
        crops = torch.where(keep, crops, crops * (mask_crops > 0.5)).clamp(0, 1)
        return enc.image_features(crops).to(device)


@torch.no_grad()
def evaluate_batch(
    mode: TextPrompts, batch: TrainBatch, embeddings: torch.Tensor, acc: MiouAccumulator
) -> None:
    """Crop-feature protocol: each object of at least ``min_area`` is prompted with its own crop
    feature and scored against its mask (``miou_1024``/``miou_original``; seeded crops)."""
    session = mode.session(batch)
    pred = mode(session, embeddings)
    score_objects(acc, pred.low_res[:, 0], dataclasses.replace(batch, valid=session.valid))
