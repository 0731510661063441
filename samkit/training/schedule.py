"""The learning-rate schedule: a pure function of the optimizer step (warmup, then a decay that fits the run)."""

from __future__ import annotations

import math
from typing import Sequence


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
