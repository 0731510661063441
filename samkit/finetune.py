"""Pieces of box-prompt fine-tuning that the training and evaluation scripts share.

- :class:`BoxPromptSam`: SAM with a training forward for box prompts (the module DDP wraps);
- :func:`freeze_parameters`, :func:`parameter_groups`: what trains and what decays;
- :func:`lr_at`: the learning-rate schedule as a pure function of the step.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .modeling import Sam


class BoxPromptSam(nn.Module):
    """SAM's box-prompt forward for training and evaluation, one mask per box (mask token 0).

    ``forward(boxes, valid, images=None, embeddings=None)``: images Bx3xSxS (normalised, padded) or
    image embeddings Bx256x64x64; boxes BxKx4 XYXY in the SxS input frame; valid BxK bool. Returns
    the low-res mask logits Nx256x256 and predicted IoUs N of the N valid boxes, in batch order.
    A frozen image encoder runs without autograd (and in eval mode, so it matches inference).
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    @property
    def encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.sam.image_encoder.parameters())

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if self.encoder_trainable:
            return self.sam.image_encoder(images)
        with torch.no_grad():
            return self.sam.image_encoder(images)

    def forward(
        self,
        boxes: torch.Tensor,
        valid: torch.Tensor,
        images: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if embeddings is None:
            if images is None:
                raise ValueError("BoxPromptSam needs images or embeddings")
            embeddings = self.embed(images)
        image_pe = self.sam.prompt_encoder.get_dense_pe()
        logits, ious = [], []
        for b in range(embeddings.shape[0]):
            image_boxes = boxes[b][valid[b]]
            if image_boxes.shape[0] == 0:
                continue
            sparse, dense = self.sam.prompt_encoder(None, image_boxes, None)
            low_res, iou = self.sam.mask_decoder(
                embeddings[b : b + 1], image_pe, sparse, dense, multimask_output=False
            )
            logits.append(low_res[:, 0])
            ious.append(iou[:, 0])
        if not logits:
            # No object in this batch (e.g. a slice whose organs vanished when resized): decode a
            # dummy box and return none of it, so every decoder parameter still receives a (zero)
            # gradient; DDP's other processes wait for all of them.
            sparse, dense = self.sam.prompt_encoder(None, boxes.new_zeros(1, 4), None)
            low_res, iou = self.sam.mask_decoder(
                embeddings[:1], image_pe, sparse, dense, multimask_output=False
            )
            return low_res[:0, 0], iou[:0, 0]
        return torch.cat(logits), torch.cat(ious)

    def train(self, mode: bool = True) -> BoxPromptSam:
        super().train(mode)
        if not self.encoder_trainable:
            self.sam.image_encoder.eval()
        return self


def upsample_logits(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """Nxhxw low-res logits -> NxSxS at the padded input frame (bilinear), where the losses and the
    seed's mIoU are computed."""
    return F.interpolate(low_res[:, None].float(), (size, size), mode="bilinear", align_corners=False)[:, 0]


def freeze_parameters(model: nn.Module, freeze: Sequence[str], unfreeze: Sequence[str] = ()) -> int:
    """Freeze parameters whose names start with a ``freeze`` prefix, unless they start with an
    ``unfreeze`` prefix. Returns the number of trainable parameters. An unknown prefix is an error
    (a typo would otherwise silently train everything)."""
    names = [name for name, _ in model.named_parameters()]
    for prefix in list(freeze) + list(unfreeze):
        if not any(_matches(name, prefix) for name in names):
            raise ValueError(f"model.freeze/unfreeze prefix {prefix!r} matches no parameter")
    trainable = 0
    for name, param in model.named_parameters():
        frozen = any(_matches(name, p) for p in freeze) and not any(_matches(name, p) for p in unfreeze)
        param.requires_grad_(not frozen)
        trainable += 0 if frozen else param.numel()
    return trainable


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices and conv kernels only, not on norms, biases, embeddings
    (learned tokens) or the positional embedding."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = "embed" in name or "token" in name or "pos_embed" in name or ".rel_pos" in name
        (decay if param.ndim >= 2 and not is_embedding else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_at(
    step: int,
    total_steps: int,
    base_lr: float,
    *,
    warmup_steps: int,
    decay: str,
    min_lr_ratio: float = 0.01,
    milestones: Sequence[float] = (0.67, 0.9),
    step_factor: float = 0.1,
) -> float:
    """Learning rate of optimizer step ``step`` (0-based) in a run of ``total_steps``.

    Linear warmup from base_lr/warmup_steps over ``warmup_steps``, then ``decay`` over the rest:
    cosine or linear down to base_lr*min_lr_ratio, ``step`` (times step_factor at each milestone,
    given as fractions of the run) or constant.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if decay == "constant":
        return base_lr
    if decay == "step":
        passed = sum(step >= int(m * total_steps) for m in milestones)
        return base_lr * step_factor**passed
    span = max(total_steps - warmup_steps - 1, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    floor = base_lr * min_lr_ratio
    if decay == "linear":
        return floor + (base_lr - floor) * (1 - progress)
    if decay == "cosine":
        return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr decay {decay!r}")
