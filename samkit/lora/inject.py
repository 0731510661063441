"""LoRA layers in a SAM, through ``peft``: which layers (:data:`LORA_TARGETS`), adding them
(:func:`add_lora`), and reading the result back as plain tensors (:func:`adapter_state`,
:func:`merged_state_dict`)."""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

# Target groups -> the module names they adapt (full matches). A target that is not a group name is a
# regular expression over module names itself (e.g. ``image_encoder\.blocks\.(10|11)\.attn\.qkv``).
LORA_TARGETS: dict[str, str] = {
    "encoder_qkv": r"image_encoder\.blocks\.\d+\.attn\.qkv",
    "encoder_proj": r"image_encoder\.blocks\.\d+\.attn\.proj",
    "encoder_mlp": r"image_encoder\.blocks\.\d+\.mlp\.lin[12]",
    "decoder_attn": r"mask_decoder\.transformer\.(layers\.\d+\.\w+|final_attn_token_to_image)\.(q|k|v|out)_proj",
    "decoder_mlp": r"mask_decoder\.transformer\.layers\.\d+\.mlp\.lin[12]",
}
ADAPTER = "default"  # peft's adapter name; one adapter per model


def target_pattern(target: str) -> str:
    """The regular expression of a target (a group of :data:`LORA_TARGETS` or a pattern); ValueError
    for a pattern that does not compile."""
    pattern = LORA_TARGETS.get(target, target)
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(
            f"model.lora.targets entry {target!r} is neither one of {', '.join(LORA_TARGETS)} nor a "
            f"regular expression ({err})"
        ) from None
    return pattern


def _linear_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The names of the plain ``nn.Linear`` layers that ``targets`` match; every target must match one."""
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    chosen: list[str] = []
    for target in targets:
        found = [name for name in linears if re.fullmatch(target_pattern(target), name)]
        if not found:
            raise ValueError(f"model.lora.targets entry {target!r} matches no linear layer of the model")
        chosen += [name for name in found if name not in chosen]
    return chosen


def add_lora(
    sam: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0, targets: Sequence[str]
) -> list[str]:
    """Wrap the linear layers ``targets`` name with ``peft`` LoRA layers (in place; ``A`` from the
    torch RNG, ``B`` zero, so the model's outputs are unchanged at first). The wrapped layers' own
    weights are frozen; every other parameter keeps its ``requires_grad``. Returns the adapted layers'
    names. ValueError when a target matches nothing."""
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs the peft package: pip install 'samkit[peft]'") from None

    names = _linear_names(sam, targets)
    trainable = {id(p): p.requires_grad for p in sam.parameters()}
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none"
    )
    peft.inject_adapter_in_model(config, sam, adapter_name=ADAPTER)
    # peft froze everything but the adapters: put back what the config's freeze/unfreeze chose.
    for param in sam.parameters():
        if id(param) in trainable:
            param.requires_grad_(trainable[id(param)])
    for layer in adapted_layers(sam).values():
        layer.base_layer.requires_grad_(False)
        for param in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight):
            param.requires_grad_(True)
    return names


def adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> the LoRA layer (``peft``'s, holding ``base_layer``, ``lora_A``, ``lora_B``) of each adapted layer."""
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "base_layer") and hasattr(m, "lora_A") and ADAPTER in getattr(m, "lora_A", {})
    }


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * B @ A`` (out x in) in ``A``'s dtype: the change an adapter makes to a weight (the same
    expression merging and :func:`samkit.lora.apply_adapter` use, so both give the same bits)."""
    return (lora_b @ lora_a) * scale


def _plain_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _is_lora(key: str) -> bool:
    return any(part.startswith("lora_") for part in key.split("."))


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` without its LoRA layers: Meta's names, the adapted layers' own
    weights as they are (not merged)."""
    return {_plain_name(k): v for k, v in model.state_dict().items() if not _is_lora(k)}


def trained_names(model: nn.Module) -> list[str]:
    """Meta's names of the parameters that train in full (not LoRA's, not the adapted weights)."""
    return [_plain_name(k) for k, p in model.named_parameters() if p.requires_grad and not _is_lora(k)]


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain SAM that ``model`` (with LoRA layers) computes: Meta's names, each
    adapted weight ``W + (alpha / rank) B A``. The model is not changed."""
    layers = adapted_layers(model)
    out = base_state_dict(model)
    with torch.no_grad():
        for name, layer in layers.items():
            weight = out[f"{name}.weight"]
            delta = lora_delta(
                layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.scaling[ADAPTER]
            )
            out[f"{name}.weight"] = weight + delta.to(weight.dtype)
    return out


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA run changes, with samkit's names: ``<layer>.lora_A.weight`` (rank x in) and
    ``<layer>.lora_B.weight`` (out x rank) of each adapted layer, and every other parameter that
    trains (Meta's names), as contiguous CPU copies."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight
        out[f"{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight
    for key, param in model.named_parameters():
        if param.requires_grad and not _is_lora(key):
            out[_plain_name(key)] = param
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}
