"""Box prompts (the seed's box fine-tuning): every valid object's box is one prompt, one mask each.

Training: one round; the decoder predicts mask token 0 (``multimask_output=False``, as the seed
trains). Evaluation (:func:`evaluate_batch`): the ground-truth box of each object, mask token 0
thresholded at 0, scored at the padded input frame and at the original resolution.
"""

from __future__ import annotations

import torch

from ..metrics import MiouAccumulator
from .base import Prediction, PromptMode, Session, TrainBatch, score_objects


class BoxPrompts(PromptMode):
    """Box-prompt training: ``session(batch)`` has one round whose prompts are ``batch.boxes``."""

    def session(self, batch: TrainBatch) -> Session:
        return Session(batch)

    def forward(self, session: Session, embeddings: torch.Tensor) -> Prediction:
        return decode_boxes(self, embeddings, session.batch.boxes, session.batch.valid)


def decode_boxes(
    mode: PromptMode, embeddings: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor
) -> Prediction:
    """One mask (token 0) per valid box: boxes BxKx4 XYXY in the input frame, valid BxK."""
    encoder = mode.sam.prompt_encoder
    prompts = []
    for b in range(embeddings.shape[0]):
        image_boxes = boxes[b][valid[b]]
        prompts.append(encoder(None, image_boxes, None) if len(image_boxes) else None)
    return mode.decode(embeddings, prompts, multimask_output=False)


@torch.no_grad()
def evaluate_batch(
    mode: PromptMode, batch: TrainBatch, embeddings: torch.Tensor, acc: MiouAccumulator
) -> None:
    """Score box prompts on one batch: ``miou_1024``/``dice_1024`` and ``miou_original``/``dice_original``."""
    pred = decode_boxes(mode, embeddings, batch.boxes, batch.valid)
    score_objects(acc, pred.low_res[:, 0], batch)
