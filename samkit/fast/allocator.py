"""Let the CPU memory allocator keep freed memory for reuse (glibc ``mallopt``).

SAM's CPU passes allocate and free tensors of tens to hundreds of MB many times per image (attention
biases, per-prompt image tokens, upscaled masks). glibc serves every block above 32 MB with a fresh
``mmap`` and unmaps it when freed, so each such tensor pays page faults that zero its memory first.
Raising the mmap and trim thresholds keeps those blocks in the heap. The price: the process keeps
its peak memory instead of returning it to the system. It is an opt-in for library users and the
benchmarks (``--tuned-allocator``); no samkit module reads whether it is on, and the commands leave the
allocator alone: with the decoder's own reused buffers (``samkit.fast.transformer._Workspace``) the
tuned allocator no longer gives a gain in the results of BENCHMARKS.md. After tuning, pass
``tuned_allocator=True`` to :func:`samkit.fast.accelerate` (chunks of 16 prompts, no buffers of its own).
``SAMKIT_TUNE_MALLOC=0`` in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_cpu_allocator(largest_block: int = 1 << 30) -> bool:
    """Serve blocks up to ``largest_block`` bytes from the reusable heap; True when in effect.

    Process-wide and idempotent. Does nothing (False) off Linux/glibc or with SAMKIT_TUNE_MALLOC=0.
    """
    global _tuned
    if _tuned:
        return True
    if os.environ.get("SAMKIT_TUNE_MALLOC", "1").strip() == "0":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    trim = min(2 * largest_block, 2**31 - 1)  # mallopt takes a C int
    _tuned = (
        libc.mallopt(_M_MMAP_THRESHOLD, int(largest_block)) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1
    )
    return _tuned


def allocator_tuned() -> bool:
    """Whether :func:`tune_cpu_allocator` is in effect in this process."""
    return _tuned
