"""CPU float settings for training and evaluation: subnormal floats flushed to zero."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def flushing_subnormals() -> bool:
    """Whether this thread flushes subnormal floats (``torch.set_flush_denormal``): torch has no
    getter, so multiply a subnormal and look at the result."""
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal (below 1.18e-38), or 0 when flushed
    return bool((tiny * 1.0).item() == 0.0)


@contextlib.contextmanager
def flush_subnormals(device: torch.device) -> Iterator[None]:
    """On a CPU, flush subnormal floats to zero inside the block; restore the caller's setting after.

    As a model trains its small gradients, Adam's second moments and the loss's saturated terms
    (sigmoid tails, exp(-large)) fall below float32's smallest normal (1.2e-38), where x86 CPUs
    compute tens of times slower: the text-prompt test model's steps slowed from ~23 to ~10 images/s
    between its first and fourth epochs, and ran at ~28 throughout with this on (the same losses to
    the printed digits). Values that small add nothing beside the normal terms of the same sums.
    Other devices: nothing to do (GPUs flush in their fast paths, or are fast either way).
    """
    if device.type != "cpu":
        yield
        return
    before = flushing_subnormals()
    torch.set_flush_denormal(True)  # False on CPUs without the control bits: then nothing changes
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
