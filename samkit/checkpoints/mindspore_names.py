"""Parameter names of SAM in the seed's MindSpore checkpoints and in Meta's PyTorch state dicts.

MindSpore names LayerNorm parameters ``gamma``/``beta`` and embedding tables ``embedding_table``;
everything else (module paths, LayerNorm2d, Linear, Conv, buffers) has the same name on both sides.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping

import torch

from ..errors import CheckpointError

_MS_LEAF_TO_TORCH = {"gamma": "weight", "beta": "bias", "embedding_table": "weight"}

# Modules of Meta's SAM whose weight/bias are nn.LayerNorm (MindSpore: gamma/beta). LayerNorm2d
# modules (image_encoder.neck.1/3, prompt_encoder.mask_downscaling.1/4,
# mask_decoder.output_upscaling.1) are plain Parameters named weight/bias on both sides.
_LAYERNORM_MODULES = [
    r"image_encoder\.blocks\.\d+\.norm[12]",
    r"mask_decoder\.transformer\.layers\.\d+\.norm[1-4]",
    r"mask_decoder\.transformer\.norm_final_attn",
]
# nn.Embedding modules (MindSpore nn.Embedding: embedding_table).
_EMBEDDING_MODULES = [
    r"prompt_encoder\.point_embeddings\.\d+",
    r"prompt_encoder\.not_a_point_embed",
    r"prompt_encoder\.no_mask_embed",
    r"mask_decoder\.iou_token",
    r"mask_decoder\.mask_tokens",
    r"prompt_encoder\.text_embeddings",
]
# An optional dotted prefix (e.g. "module.") is allowed in front of the SAM names.
_LAYERNORM_RE = re.compile(r"(?:.+\.)?(?:" + "|".join(_LAYERNORM_MODULES) + r")\.(weight|bias)")
_EMBEDDING_RE = re.compile(r"(?:.+\.)?(?:" + "|".join(_EMBEDDING_MODULES) + r")\.weight")


def _rename_leaves(state: Mapping[str, torch.Tensor], rename) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    source: Dict[str, str] = {}
    for key, value in state.items():
        new = rename(key)
        if new in out:
            raise CheckpointError(f"parameter names {source[new]!r} and {key!r} both map to {new!r}")
        out[new] = value
        source[new] = key
    return out


def _ms_to_torch_name(key: str) -> str:
    prefix, dot, leaf = key.rpartition(".")
    return prefix + dot + _MS_LEAF_TO_TORCH.get(leaf, leaf)


def _torch_to_ms_name(key: str) -> str:
    match = _LAYERNORM_RE.fullmatch(key)
    if match:
        return key[: match.start(1)] + ("gamma" if match.group(1) == "weight" else "beta")
    if _EMBEDDING_RE.fullmatch(key):
        return key[: -len("weight")] + "embedding_table"
    return key


def mindspore_to_torch_names(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a SAM state dict from the seed's MindSpore names to Meta's PyTorch names.

    Only the last dotted component changes: ``gamma`` -> ``weight``, ``beta`` -> ``bias``,
    ``embedding_table`` -> ``weight``. Values and order are kept.

    Raises:
        CheckpointError: two names map to the same PyTorch name.
    """
    return _rename_leaves(state, _ms_to_torch_name)


def torch_to_mindspore_names(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a SAM state dict from Meta's PyTorch names to the seed's MindSpore names.

    ``weight``/``bias`` of SAM's ``nn.LayerNorm`` modules become ``gamma``/``beta`` and the
    ``weight`` of its ``nn.Embedding`` modules becomes ``embedding_table``; everything else
    (LayerNorm2d, Linear, Conv, buffers) is unchanged. Inverse of :func:`mindspore_to_torch_names`
    on SAM state dicts. Values and order are kept.

    Raises:
        CheckpointError: two names map to the same MindSpore name.
    """
    return _rename_leaves(state, _torch_to_ms_name)
