"""Training checkpoints: written atomically, found again for ``resume=auto``, pruned.

A training checkpoint is a plain dict saved with ``torch.save`` and readable with
``weights_only=True``: ``model`` (the full SAM state dict, Meta's names, so the file also loads with
``sam_model_registry[...](checkpoint=...)``), ``optimizer``, ``scaler``, ``rng``, ``epoch`` (the epoch
in progress), ``step_in_epoch`` (optimizer steps already done in it), ``step`` (total steps done) and
``config`` (the resolved config as a dict).
"""

from __future__ import annotations

import os
import random
import re
from typing import Any

import torch

from ..errors import CheckpointError
from ..utils.files import atomic_write

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_dir(work_dir: str) -> str:
    return os.path.join(work_dir, "checkpoints")


def checkpoint_path(work_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(work_dir), f"step_{step:08d}.pt")


def save_atomically(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename: a kill at any moment
    leaves either the old file or the complete new one."""
    with atomic_write(path, fsync=True, make_parents=True) as f:
        torch.save(obj, f)


def list_checkpoints(work_dir: str) -> list[str]:
    """Training checkpoints in ``work_dir/checkpoints``, oldest first."""
    folder = checkpoint_dir(work_dir)
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if _NAME.match(n))
    return [os.path.join(folder, n) for n in names]


def latest_checkpoint(work_dir: str) -> str | None:
    found = list_checkpoints(work_dir)
    return found[-1] if found else None


def prune_checkpoints(work_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` training checkpoints (keep=0 keeps everything)."""
    if keep <= 0:
        return
    for path in list_checkpoints(work_dir)[:-keep]:
        os.remove(path)


def load_training_checkpoint(path: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read training checkpoint {path}: {str(err).splitlines()[0]}") from None
    needed = {"model", "optimizer", "step", "epoch", "step_in_epoch"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise CheckpointError(
            f"{path} is not a samkit training checkpoint (resume needs model, optimizer and step; "
            "to start from plain weights use model.checkpoint=PATH)"
        )
    return state


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(value: Any) -> tuple:
    # torch.save keeps tuples, but be lenient with lists (e.g. after a JSON round trip).
    version, internal, gauss = value
    return (version, tuple(internal), gauss)
