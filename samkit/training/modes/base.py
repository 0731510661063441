"""What every prompt mode shares: the batch it reads, the prediction it returns, decoding per image.

A prompt mode is how a training batch is prompted and scored. The training loop asks the mode for a
:class:`Session` per batch (the prompts of one simulated interaction: one round for box and text
prompts, several for iterative point prompts), then for each round calls the mode (the module whose
gradients are averaged over processes) to decode that round's prompts into a :class:`Prediction`,
scores it with :func:`samkit.training.losses.prompt_loss`, back-propagates, and hands the prediction
back to the session (``session.feedback``) so it can prompt the next round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ...modeling import Sam
from ..metrics import MiouAccumulator


@dataclass
class TrainBatch:
    """One batch on the training device, as every prompt mode sees it (S = the model's input size).

    ``masks`` BxKxSxS uint8 0/1 ground truth in the padded input frame; ``boxes`` BxKx4 XYXY box
    prompts in that frame; ``valid`` BxK bool (False for padding rows); ``index`` B int64 dataset
    indices and ``epoch``/``seed``: what per-object randomness is seeded by; ``images`` Bx3xSxS the
    normalised model input when the loop has it (None when embeddings came from the cache; then
    ``load_images(rows)``, when set, gives those rows of it on the device, for a mode that needs
    pixels, e.g. text crops); ``extra``: any other entries of the samples (mode-specific: tensors
    on the device, lists as collated, e.g. ``image_key``; ``category_names`` the dataset's id -> name).
    """

    masks: torch.Tensor
    boxes: torch.Tensor
    valid: torch.Tensor
    index: torch.Tensor
    epoch: int = 0
    seed: int = 0
    images: Optional[torch.Tensor] = None
    extra: dict[str, Any] = field(default_factory=dict)
    load_images: Optional[Callable[[list[int]], torch.Tensor]] = None

    @property
    def targets(self) -> torch.Tensor:
        """NxSxS ground truth of the N valid objects, in batch order (image by image)."""
        return self.masks[self.valid]


@dataclass
class Prediction:
    """The decoder's output for the N valid objects of a batch, in batch order: ``low_res`` NxCxhxw
    mask logits (h = w = 256 for SAM) and ``iou`` NxC predicted IoUs, C candidate masks per object
    (1, or 3 for a multimask round)."""

    low_res: torch.Tensor
    iou: torch.Tensor


class Session:
    """The prompts of one batch over the rounds of a simulated interaction.

    ``rounds`` is how many times the loop decodes this batch; the mode reads the current round's
    prompts from the session; ``feedback(prediction)`` (called without gradient after each round)
    lets the session choose the next round's prompts. Box and text sessions have one round.
    ``valid`` (BxK bool) marks the objects that are prompted (by default every valid object; a
    mode may leave some out) and ``targets`` are their masks, in the prediction's order.
    """

    rounds: int = 1

    def __init__(self, batch: TrainBatch, valid: Optional[torch.Tensor] = None) -> None:
        self.batch = batch
        self.valid = batch.valid if valid is None else valid
        self.round = 0

    @property
    def targets(self) -> torch.Tensor:
        """NxSxS uint8 ground truth of the prompted objects, in batch order."""
        return self.batch.masks[self.valid]

    def feedback(self, prediction: Prediction) -> None:
        self.round += 1


class PromptMode(nn.Module):
    """Base of the prompt modes: holds the SAM being trained, embeds images, decodes per image.

    A frozen image encoder runs without autograd and stays in eval mode (so it matches inference).
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    @property
    def encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.sam.image_encoder.parameters())

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Bx3xSxS normalised images -> Bx256x64x64 embeddings (with autograd only if the encoder trains)."""
        if self.encoder_trainable:
            return self.sam.image_encoder(images)
        with torch.no_grad():
            return self.sam.image_encoder(images)

    def session(self, batch: TrainBatch) -> Session:
        """The prompts of ``batch``'s rounds (no gradient flows through choosing them)."""
        raise NotImplementedError

    def forward(self, session: Session, embeddings: torch.Tensor) -> Prediction:
        """Decode the current round's prompts on Bx256x64x64 ``embeddings``."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> PromptMode:
        super().train(mode)
        if not self.encoder_trainable:
            self.sam.image_encoder.eval()
        return self

    def decode(
        self,
        embeddings: torch.Tensor,
        prompts: list[Optional[tuple[torch.Tensor, torch.Tensor]]],
        multimask_output: bool,
    ) -> Prediction:
        """Decode per image: ``prompts[b]`` is image b's (sparse NbxTxC, dense NbxCxhxw) prompt
        embeddings, or None when it has no valid object. Returns the Prediction of all objects in
        batch order.

        A batch without any object still decodes one dummy prompt and returns none of it: the loss
        is then an exact zero that still reaches every decoder parameter, so the backward pass and
        the processes' gradient exchange see the same parameters every step.
        """
        decoder, image_pe = self.sam.mask_decoder, self.sam.prompt_encoder.get_dense_pe()
        logits, ious = [], []
        for b, prompt in enumerate(prompts):
            if prompt is None:
                continue
            sparse, dense = prompt
            low_res, iou = decoder(embeddings[b : b + 1], image_pe, sparse, dense, multimask_output)
            logits.append(low_res)
            ious.append(iou)
        if not logits:
            sparse, dense = self.sam.prompt_encoder(None, embeddings.new_zeros(1, 4), None)
            low_res, iou = decoder(embeddings[:1], image_pe, sparse, dense, multimask_output)
            return Prediction(low_res[:0], iou[:0])
        return Prediction(torch.cat(logits), torch.cat(ious))


def batch_on_device(
    raw: dict[str, Any], device: torch.device, *, epoch: int = 0, seed: int = 0, images: bool = True
) -> TrainBatch:
    """A collated batch (:func:`samkit.data.collate`, full or compact samples) on ``device``.

    ``images=False`` leaves the model input on the host (the loop then embeds from the cache) and
    sets ``load_images`` to bring chosen rows of it over on demand. ``original_size``,
    ``input_size``, ``original_masks`` (evaluation), ``image_key``/``masks_key`` (the cache's keys)
    and ``category_ids`` (COCO) go to ``extra``.
    """
    from ...data.common import batch_images, batch_masks

    known = {"image", "masks", "boxes", "valid", "index"}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        if key in known:
            continue
        extra[key] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
    return TrainBatch(
        masks=batch_masks(raw, device),
        boxes=raw["boxes"].to(device, non_blocking=True),
        valid=raw["valid"].to(device, non_blocking=True),
        index=raw["index"].to(device, non_blocking=True),
        epoch=epoch,
        seed=seed,
        images=batch_images(raw, device) if images else None,
        extra=extra,
        load_images=None if images else (lambda rows: batch_images(raw, device, rows)),
    )


@torch.no_grad()
def score_objects(acc: MiouAccumulator, low_res: torch.Tensor, batch: TrainBatch, key: str = "") -> None:
    """Add one prediction per valid object (``low_res`` Nxhxw logits, batch order) to ``acc``, thresholded
    at 0: at the padded input frame against ``batch.masks`` (the seed's mIoU, key ``1024``) and at
    each image's original size against ``batch.extra["original_masks"]`` (key ``original``), the
    logits resized as the predictor resizes them. ``key`` is appended to both keys (``1024_click3``).
    """
    from ...utils.transforms import greater, upscale_masks
    from ..losses import upsample_logits

    low_res = low_res.float()
    size = batch.masks.shape[-1]
    device = low_res.device
    pred = greater(upsample_logits(low_res, size), 0.0)
    ones = torch.ones(1, len(pred), dtype=torch.bool, device=device)
    acc.update(pred[None], batch.targets[None].bool(), ones, key=f"1024{key}")
    if "original_masks" not in batch.extra:
        return
    start = 0
    for b in range(len(batch.valid)):
        n = int(batch.valid[b].sum())
        if n == 0:
            continue
        h, w = (int(v) for v in batch.extra["original_size"][b])
        ih, iw = (int(v) for v in batch.extra["input_size"][b])
        masks = upscale_masks(low_res[start : start + n], size, (ih, iw), (h, w), threshold=0.0)
        target = batch.extra["original_masks"][b][: batch.valid.shape[1]][batch.valid[b].cpu()]
        acc.update(
            masks[None],
            target.to(device).bool()[None],
            torch.ones(1, n, dtype=torch.bool, device=device),
            key=f"original{key}",
        )
        start += n
