"""LoRA fine-tuning: low-rank adapters on SAM's linear layers (built with Hugging Face ``peft``) and
the adapter files a run saves.

Training (``model.lora`` in a config) wraps the chosen ``nn.Linear`` layers with ``peft``'s LoRA layers
(:func:`add_lora`): ``W x + (alpha / rank) B A x``, ``A`` rank x in, ``B`` out x rank (zero at the start),
the wrapped weights frozen. A run then writes two files: ``sam_final.pth``, the merged plain SAM (Meta's
names, loads anywhere), and ``sam_final_adapter.safetensors``, only what the run changed: each adapted
layer's ``<layer>.lora_A.weight`` / ``<layer>.lora_B.weight`` and every base parameter that trained in
full (the mask decoder, by default), with the base weights' identity (:func:`base_identity`) in its
metadata. :func:`apply_adapter` merges such a file into a model built from the same base checkpoint
(every command's ``--adapter PATH``; ``peft`` is not needed for it).
"""

from __future__ import annotations

from .files import ADAPTER_NAME, AdapterInfo, apply_adapter, base_identity, read_adapter, save_adapter
from .inject import (
    LORA_TARGETS,
    adapted_layers,
    adapter_state,
    add_lora,
    base_state_dict,
    merged_state_dict,
    target_pattern,
    trained_names,
)

__all__ = [
    "ADAPTER_NAME",
    "LORA_TARGETS",
    "AdapterInfo",
    "adapted_layers",
    "adapter_state",
    "add_lora",
    "apply_adapter",
    "base_identity",
    "base_state_dict",
    "merged_state_dict",
    "read_adapter",
    "save_adapter",
    "target_pattern",
    "trained_names",
]
