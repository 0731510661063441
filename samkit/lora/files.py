"""Adapter files: a safetensors file with samkit's names (see :mod:`samkit.lora`) and metadata, written
atomically, read back and merged into a model built from the same base checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from ..utils.files import atomic_write
from .inject import lora_delta

ADAPTER_NAME = "sam_final_adapter.safetensors"  # beside sam_final.pth in a run's work_dir
FORMAT = "samkit-lora/1"


@dataclass
class AdapterInfo:
    """An adapter file's contents: the tensors (samkit's names), LoRA's rank and alpha, the targets it
    was trained with, the model size and the sha256 of the base weights (:func:`base_identity`)."""

    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    targets: list[str]
    model_type: str
    base_sha256: str

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def base_identity(state: Mapping[str, torch.Tensor], skip: Iterable[str] = ()) -> str:
    """sha256 (hex) of a state dict's names, dtypes, shapes and bytes, in name order, leaving out the
    ``skip`` names (the parameters an adapter file replaces). The same weights give the same value
    whichever file they were read from."""
    skipped = set(skip)
    digest = hashlib.sha256()
    for key in sorted(k for k in state if k not in skipped):
        tensor = state[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(state[key].shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("adapter files need the safetensors package: pip install 'samkit[peft]'") from None
    return safetensors.torch


def save_adapter(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    targets: list[str],
    model_type: str,
    base_sha256: str,
) -> None:
    """Write an adapter file (atomically): ``tensors`` with samkit's names, the rest as metadata."""
    metadata = {
        "format": FORMAT,
        "rank": str(rank),
        "alpha": repr(float(alpha)),
        "targets": json.dumps(list(targets)),
        "model_type": model_type,
        "base_sha256": base_sha256,
    }
    data = _safetensors().save(dict(tensors), metadata=metadata)
    with atomic_write(path, fsync=True, make_parents=True) as f:
        f.write(data)


def read_adapter(path: str | os.PathLike) -> AdapterInfo:
    """Read an adapter file; CheckpointError (one line naming the file) when it is missing or not one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"--adapter {path}: {'a directory' if os.path.isdir(path) else 'not found'}")
    st = _safetensors()
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = st.load_file(path)
    except Exception:  # safetensors raises its own error types for a file of other bytes
        raise CheckpointError(f"--adapter {path}: not a safetensors file") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"--adapter {path}: not a samkit adapter file (no {FORMAT} metadata)")
    try:
        return AdapterInfo(
            tensors=tensors,
            rank=int(metadata["rank"]),
            alpha=float(metadata["alpha"]),
            targets=json.loads(metadata["targets"]),
            model_type=metadata["model_type"],
            base_sha256=metadata["base_sha256"],
        )
    except (KeyError, ValueError):
        raise CheckpointError(f"--adapter {path}: its metadata is incomplete") from None


def apply_adapter(model: nn.Module, path: str | os.PathLike) -> AdapterInfo:
    """Merge an adapter file into ``model`` in place (a plain SAM built from the base checkpoint the
    adapter was trained on, before any dtype cast): each adapted weight gets ``(alpha / rank) B A``, each
    fully trained parameter its trained value. The result is a plain model (full speed, exportable).
    CheckpointError, one line, when the file is not an adapter, belongs to another model size or
    layout, or the model's base weights are not the ones it was trained on."""
    from ..build import model_size_name

    path = os.fspath(path)
    info = read_adapter(path)
    state = model.state_dict()
    size = model_size_name(model)
    if size != info.model_type:
        raise CheckpointError(f"--adapter {path} is for {info.model_type}, the model is {size}")
    pairs = sorted(k[: -len(".lora_A.weight")] for k in info.tensors if k.endswith(".lora_A.weight"))
    full = [k for k in info.tensors if ".lora_A." not in k and ".lora_B." not in k]
    for key in [f"{n}.weight" for n in pairs] + full:
        if key not in state:
            raise CheckpointError(f"--adapter {path} names {key}, which this model does not have")
    for key in full:
        if info.tensors[key].shape != state[key].shape:
            raise CheckpointError(f"--adapter {path}: {key} has shape {tuple(info.tensors[key].shape)}, "
                                  f"the model's is {tuple(state[key].shape)}")  # fmt: skip
    for name in pairs:
        lora_a, lora_b = info.tensors[f"{name}.lora_A.weight"], info.tensors.get(f"{name}.lora_B.weight")
        if lora_b is None or (lora_b.shape[0], lora_a.shape[1]) != tuple(state[f"{name}.weight"].shape):
            raise CheckpointError(f"--adapter {path}: the LoRA of {name} does not fit its weight")
    identity = base_identity(state, skip=full)
    if identity != info.base_sha256:
        raise CheckpointError(
            f"--adapter {path} was trained on other base weights (sha256 {info.base_sha256[:12]}, these are "
            f"{identity[:12]}): pass the --checkpoint it was trained from"
        )
    with torch.no_grad():
        for name in pairs:
            weight = state[f"{name}.weight"]
            lora_a, lora_b = info.tensors[f"{name}.lora_A.weight"], info.tensors[f"{name}.lora_B.weight"]
            delta = lora_delta(lora_a.float(), lora_b.float(), info.scale)
            weight.copy_(weight + delta.to(device=weight.device, dtype=weight.dtype))
        for key in full:
            state[key].copy_(info.tensors[key])
    return info
