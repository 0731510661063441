"""Hugging Face ``transformers`` SAM checkpoints (``SamModel``): read them into samkit's (Meta's) names,
write samkit models as folders ``SamModel.from_pretrained`` loads, and safetensors files.

An HF SAM is a folder holding ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, or
shards listed in ``model.safetensors.index.json``), with names like
``vision_encoder.layers.0.attn.qkv.weight``. :func:`hf_to_samkit_names` maps each name to Meta's
(``image_encoder.blocks.0.attn.qkv.weight``); the tensors are the same, bit for bit (the two models
compute the same functions, so no tensor is reshaped or transposed). The model size follows from the
mapped state dict (:func:`samkit.build.identify_model_size`); shapes are checked when it loads.

What differs outside the weights: ``SamProcessor`` rescales pixels to [0, 1] then normalises with
ImageNet's mean/std (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225); samkit (and Meta) normalise 0-255
values with (123.675, 116.28, 103.53) / (58.395, 57.12, 57.375). These are the same numbers, but
computed in another order, so the inputs differ in the last float bits (~1e-7), and so do the masks'
logits. Both resize the long side to 1024 (PIL bilinear) and zero-pad bottom/right after
normalising; prompts are in the resized frame in both. Compared on the same preprocessed input,
the two models give the same low-resolution masks and IoU predictions.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Mapping

import torch

from ..errors import CheckpointError

# (samkit/Meta pattern, HF pattern); {n} is a block or layer number. Order matters only for readability.
_NAME_PAIRS: tuple[tuple[str, str], ...] = (
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.blocks.{n}.norm1.", "vision_encoder.layers.{n}.layer_norm1."),
    ("image_encoder.blocks.{n}.norm2.", "vision_encoder.layers.{n}.layer_norm2."),
    ("image_encoder.blocks.{n}.attn.", "vision_encoder.layers.{n}.attn."),
    ("image_encoder.blocks.{n}.mlp.", "vision_encoder.layers.{n}.mlp."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "shared_image_embedding.positional_embedding",
    ),
    ("prompt_encoder.point_embeddings.{n}.", "prompt_encoder.point_embed.{n}."),
    ("prompt_encoder.not_a_point_embed.", "prompt_encoder.not_a_point_embed."),
    ("prompt_encoder.no_mask_embed.", "prompt_encoder.no_mask_embed."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("mask_decoder.iou_token.", "mask_decoder.iou_token."),
    ("mask_decoder.mask_tokens.", "mask_decoder.mask_tokens."),
    ("mask_decoder.transformer.layers.{n}.norm1.", "mask_decoder.transformer.layers.{n}.layer_norm1."),
    ("mask_decoder.transformer.layers.{n}.norm2.", "mask_decoder.transformer.layers.{n}.layer_norm2."),
    ("mask_decoder.transformer.layers.{n}.norm3.", "mask_decoder.transformer.layers.{n}.layer_norm3."),
    ("mask_decoder.transformer.layers.{n}.norm4.", "mask_decoder.transformer.layers.{n}.layer_norm4."),
    ("mask_decoder.transformer.layers.{n}.self_attn.", "mask_decoder.transformer.layers.{n}.self_attn."),
    (
        "mask_decoder.transformer.layers.{n}.cross_attn_token_to_image.",
        "mask_decoder.transformer.layers.{n}.cross_attn_token_to_image.",
    ),
    (
        "mask_decoder.transformer.layers.{n}.cross_attn_image_to_token.",
        "mask_decoder.transformer.layers.{n}.cross_attn_image_to_token.",
    ),
    ("mask_decoder.transformer.layers.{n}.mlp.", "mask_decoder.transformer.layers.{n}.mlp."),
    (
        "mask_decoder.transformer.final_attn_token_to_image.",
        "mask_decoder.transformer.final_attn_token_to_image.",
    ),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    (
        "mask_decoder.output_hypernetworks_mlps.{n}.layers.0.",
        "mask_decoder.output_hypernetworks_mlps.{n}.proj_in.",
    ),
    (
        "mask_decoder.output_hypernetworks_mlps.{n}.layers.1.",
        "mask_decoder.output_hypernetworks_mlps.{n}.layers.0.",
    ),
    (
        "mask_decoder.output_hypernetworks_mlps.{n}.layers.2.",
        "mask_decoder.output_hypernetworks_mlps.{n}.proj_out.",
    ),
    ("mask_decoder.iou_prediction_head.layers.0.", "mask_decoder.iou_prediction_head.proj_in."),
    ("mask_decoder.iou_prediction_head.layers.1.", "mask_decoder.iou_prediction_head.layers.0."),
    ("mask_decoder.iou_prediction_head.layers.2.", "mask_decoder.iou_prediction_head.proj_out."),
)
# HF keeps a second copy of the prompt encoder's positional matrix (tied to shared_image_embedding).
_HF_TIED_COPY = "prompt_encoder.shared_embedding.positional_embedding"
_HF_MARKERS = ("vision_encoder.", "shared_image_embedding.")


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{n\}", r"(\d+)"))


_TO_HF = [(_compile(a), b) for a, b in _NAME_PAIRS]
_FROM_HF = [(_compile(b), a) for a, b in _NAME_PAIRS]


def _rename(name: str, rules: list[tuple[re.Pattern, str]], source: str) -> str:
    for pattern, target in rules:
        m = pattern.match(name)
        if m:
            prefix = target.replace("{n}", m.group(1)) if m.groups() else target
            return prefix + name[m.end() :]
    raise CheckpointError(f"{source}: parameter {name} has no counterpart in a SAM (not a SAM checkpoint?)")


def is_hf_state_dict(state: Mapping[str, object]) -> bool:
    """True when the names are transformers' SamModel names (``vision_encoder.*``)."""
    return any(k.startswith(_HF_MARKERS) for k in state)


def hf_to_samkit_names(
    state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """HF ``SamModel`` names -> samkit's (Meta's). The tensors are not copied."""
    out = {}
    for name, tensor in state.items():
        name = name[len("sam.") :] if name.startswith("sam.") else name
        if name == _HF_TIED_COPY:
            continue
        out[_rename(name, _FROM_HF, source)] = tensor
    return out


def samkit_to_hf_names(
    state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """samkit's (Meta's) names -> HF ``SamModel`` names, with HF's tied copy of the positional matrix.
    A text-prompt branch has no place in an HF SAM: CheckpointError."""
    text = [
        k for k in state if k.startswith(("prompt_encoder.text_proj.", "prompt_encoder.text_embeddings."))
    ]
    if text:
        raise CheckpointError(
            f"{source} has a text-prompt branch ({text[0]}), which an HF SamModel cannot hold"
        )
    out = {_rename(name, _TO_HF, source): tensor for name, tensor in state.items()}
    matrix = out.get("shared_image_embedding.positional_embedding")
    if matrix is not None:
        out[_HF_TIED_COPY] = matrix
    return out


# ---------------------------------------------------------------------------------------------------
# Reading


def is_hf_folder(path: str) -> bool:
    """A folder holding an HF model: config.json or a weights file."""
    names = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in names)


def read_hf_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A Hugging Face SAM folder, a ``.safetensors`` file (HF's or samkit's names) or a ``.bin`` file
    (``torch.load``, weights only) -> its flat state dict as stored (``samkit.build.read_checkpoint``
    cleans it and maps HF's names to samkit's). One-line CheckpointError for anything else (a folder without weights, another HF model type, a file that is not one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        state = _read_folder(path)
    elif not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    elif path.endswith(".safetensors"):
        state = _read_safetensors(path)
    elif path.endswith(".json"):
        raise CheckpointError(f"{path} is a JSON file; pass the folder that holds it and the weights")
    else:
        state = _read_bin(path)
    return state


def _read_folder(path: str) -> dict[str, torch.Tensor]:
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        model_type = _read_json(config).get("model_type")
        if model_type not in (None, "sam"):
            raise CheckpointError(f"{config} is a {model_type!r} model, not a SAM (model_type 'sam')")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return _read_safetensors(os.path.join(path, "model.safetensors"))
    if os.path.isfile(index):
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not files:
            raise CheckpointError(f"{index} lists no weight files")
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(_read_safetensors(os.path.join(path, name)))
        return state
    if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        return _read_bin(os.path.join(path, "pytorch_model.bin"))
    raise CheckpointError(
        f"{path} is a folder without model.safetensors or pytorch_model.bin (not an HF SAM)"
    )


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"reading {path} needs safetensors: pip install 'samkit[hf]'") from None
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read safetensors file {path}: {reason}") from None


def _read_bin(path: str) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch file, not a checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    for _ in range(2):  # {"model": {...}} or {"state_dict": {"model": ...}}, as build.read_checkpoint
        if isinstance(state, Mapping):
            state = next(
                (state[k] for k in ("model", "state_dict", "module") if isinstance(state.get(k), Mapping)),
                state,
            )
    if (
        not isinstance(state, Mapping)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise CheckpointError(f"{path} is not a SAM checkpoint (no tensor state dict found)")
    return dict(state)


# ---------------------------------------------------------------------------------------------------
# Writing


def safetensors_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict as the bytes of a ``.safetensors`` file (contiguous CPU tensors, no shared storage)."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise CheckpointError("writing safetensors needs safetensors: pip install 'samkit[hf]'") from None
    return save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()})


__all__ = [
    "hf_to_samkit_names",
    "is_hf_folder",
    "is_hf_state_dict",
    "read_hf_weights",
    "safetensors_bytes",
    "samkit_to_hf_names",
]
