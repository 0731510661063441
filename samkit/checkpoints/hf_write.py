"""Writing Hugging Face SAM folders (``config.json`` + ``model.safetensors``) that
``transformers.SamModel.from_pretrained`` loads, from a samkit state dict (``samkit convert --to hf``).
The names are mapped by :mod:`samkit.checkpoints.hf`; the sizes come from the state dict's tensors."""

from __future__ import annotations

import json
import os
from typing import Mapping

import torch

from ..build import ENCODER_CONFIGS, PATCH_SIZE, checkpoint_image_size, identify_model_size
from ..errors import CheckpointError
from ..utils.files import atomic_write
from .hf import safetensors_bytes, samkit_to_hf_names


def hf_config(state: Mapping[str, torch.Tensor]) -> dict:
    """The ``config.json`` of an HF SamModel for a samkit state dict (sizes read from its tensors)."""
    size = identify_model_size(state)
    if size not in ENCODER_CONFIGS:
        raise CheckpointError(f"cannot write an HF config for a SAM of {size or 'unknown size'}")
    dim, depth, heads, global_attn = ENCODER_CONFIGS[size]
    image_size = checkpoint_image_size(state) or 1024
    return {
        "architectures": ["SamModel"],
        "model_type": "sam",
        "initializer_range": 0.02,
        "vision_config": {
            "model_type": "sam_vision_model",
            "hidden_size": dim,
            "num_hidden_layers": depth,
            "num_attention_heads": heads,
            "global_attn_indexes": list(global_attn),
            "mlp_dim": dim * 4,
            "output_channels": 256,
            "image_size": image_size,
            "patch_size": PATCH_SIZE,
            "window_size": 14,
            "num_pos_feats": 128,
            "qkv_bias": True,
            "use_abs_pos": True,
            "use_rel_pos": True,
            "layer_norm_eps": 1e-6,
        },
        "prompt_encoder_config": {
            "model_type": "",
            "hidden_size": 256,
            "image_size": image_size,
            "patch_size": PATCH_SIZE,
            "mask_input_channels": 16,
            "num_point_embeddings": 4,
            "layer_norm_eps": 1e-6,
        },
        "mask_decoder_config": {
            "model_type": "",
            "hidden_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "mlp_dim": 2048,
            "attention_downsample_rate": 2,
            "num_multimask_outputs": 3,
            "iou_head_depth": 3,
            "iou_head_hidden_dim": 256,
            "layer_norm_eps": 1e-6,
        },
    }


def write_hf_folder(
    state: Mapping[str, torch.Tensor], folder: str | os.PathLike, source: str = "state dict"
) -> None:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` (each atomically) from a samkit
    state dict, for ``transformers.SamModel.from_pretrained(folder)``."""

    folder = os.fspath(folder)
    config = hf_config(state)
    data = safetensors_bytes(samkit_to_hf_names(state, source))
    with atomic_write(os.path.join(folder, "model.safetensors"), make_parents=True) as f:
        f.write(data)
    with atomic_write(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


__all__ = ["hf_config", "write_hf_folder"]
