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
    compute tens of times slower (a 512x512 GEMM with subnormal inputs: ~200 ms instead of ~1).
    ``train.py`` on the text-prompt tests' recipe (vit_tiny at 256, 6 epochs): 145 -> 74 s, its
    epochs no longer slowing from ~23 to ~10 images/s, the same losses to the printed digits.
    Values that small add nothing beside the normal terms of the same sums.

    The setting is per thread, and torch's worker threads take it from the thread that creates
    them: the full gain comes where the block opens before the process's first parallel op
    (``train.py``, which builds the model inside it). In a process whose thread pool already runs
    (``eval.py``, a notebook), only the calling thread flushes. Worker threads created inside the
    block keep flushing after it.
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
