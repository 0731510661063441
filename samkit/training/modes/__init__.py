"""Prompt modes: how a training batch is prompted and scored, one small module per mode.

``PROMPT_MODES`` maps a config's ``prompt_mode`` to the class the training loop builds (with the
mode's own keyword arguments; see ``samkit.training.train.build_prompt_mode``), and
``EVAL_PROTOCOLS`` maps ``eval_prompt`` to the function that scores one evaluation batch. Both are
plain dicts written here; nothing registers itself on import. Modes: ``box`` (one box per object,
one round), ``point`` (iterative clicks, :mod:`.point`) and ``text`` (crop-feature prompts,
:mod:`.text`); protocols: ``box``, ``point`` (interactive clicks, :mod:`.point_eval`) and ``text``
(crop features).
"""

from __future__ import annotations

from typing import Callable

from . import box, point, point_eval, text
from .base import Prediction, PromptMode, Session, TrainBatch, batch_on_device, score_objects

PROMPT_MODES: dict[str, type[PromptMode]] = {
    "box": box.BoxPrompts,
    "point": point.PointPrompts,
    "text": text.TextPrompts,
}

EVAL_PROTOCOLS: dict[str, Callable[..., None]] = {
    "box": box.evaluate_batch,
    "point": point_eval.evaluate_batch,
    "text": text.evaluate_batch,
}

__all__ = [
    "EVAL_PROTOCOLS",
    "PROMPT_MODES",
    "Prediction",
    "PromptMode",
    "Session",
    "TrainBatch",
    "batch_on_device",
    "score_objects",
]
