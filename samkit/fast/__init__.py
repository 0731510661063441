"""The speed layer: faster implementations of SAM's modules, swapped in explicitly.

:mod:`samkit.modeling` computes SAM as Meta's code does, from its inputs and parameters only. The
modules here compute the same function faster, each a subclass of the module it replaces, with the
same parameters and state-dict keys:

========================  =====================================================================
reference module          fast module (what it does)
========================  =====================================================================
image encoder Attention   :class:`.encoder.FastAttention`: fused linear epilogues (oneDNN), the
                          relative-position bias in blocks (CPU), folded into the score matmul
                          (CPU bf16) or inside a Triton flash kernel (GPU, :mod:`.rel_pos_kernel`)
image encoder Block       :class:`.encoder.FastBlock`: windowed attention without a padded copy
MLPBlock / MLP            :class:`.encoder.FastMLPBlock`, :class:`.decoder.FastMLP`: fused activations
decoder Attention         :class:`.transformer.FastAttention`: projections folded into the few
                          prompt tokens; a shared image projected once for all prompts
TwoWayAttentionBlock /    :class:`.transformer.FastTwoWayAttentionBlock`,
TwoWayTransformer         :class:`.transformer.FastTwoWayTransformer`: shared image work, reused buffers
MaskDecoder               :class:`.decoder.FastMaskDecoder`: chunks of prompts, GEMM upscaling,
                          ``forward_above_iou`` for automatic mask generation
========================  =====================================================================

:func:`accelerate` swaps them in (in place, idempotent), :func:`restore` swaps the reference modules
back; both keep every parameter object, so optimizers and adapters see the same tensors. A fast
module whose layers are not plain ``nn.Linear`` (a ``peft`` LoRA wrapper, a quantised layer) runs
the reference code for that part, which calls the layer: an adapter is never skipped.
``SamPredictor``, the mask generator, the commands and training accelerate their model by default
(``SamPredictor(model, accelerate=False)`` keeps the reference modules).
"""

from __future__ import annotations

from torch import nn

from ..modeling import common, image_encoder, mask_decoder, transformer
from . import decoder as fast_decoder
from . import encoder as fast_encoder
from . import transformer as fast_transformer

__all__ = ["accelerate", "is_accelerated", "restore"]

# Exact reference type -> fast type (subclasses of the reference types are left alone).
FAST_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    image_encoder.Attention: fast_encoder.FastAttention,
    image_encoder.Block: fast_encoder.FastBlock,
    common.MLPBlock: fast_encoder.FastMLPBlock,
    common.MLP: fast_decoder.FastMLP,
    transformer.Attention: fast_transformer.FastAttention,
    transformer.TwoWayAttentionBlock: fast_transformer.FastTwoWayAttentionBlock,
    transformer.TwoWayTransformer: fast_transformer.FastTwoWayTransformer,
    mask_decoder.MaskDecoder: fast_decoder.FastMaskDecoder,
}
REFERENCE_MODULES = {fast: ref for ref, fast in FAST_MODULES.items()}
# Attributes of the fast modules that only tune them (dropped on restore).
_SETTINGS = ("prompt_chunk", "reuse_buffers")


def _swap(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A module of class ``cls`` holding ``module``'s state: the same parameters, buffers, children,
    hooks and attributes (the classes add no state of their own)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    # Its own table of children (an adapter wrapping a layer of one does not reach the other); the
    # hook tables stay shared, so that a hook's handle still removes it.
    new._modules = module._modules.copy()
    for name in _SETTINGS:
        new.__dict__.pop(name, None)
    return new


def _replace(module: nn.Module, mapping: dict[type[nn.Module], type[nn.Module]]) -> nn.Module:
    """``module`` with every module of a type in ``mapping`` swapped, top down: a swapped module is a
    new object (the old one keeps its children), the others are changed in place."""
    if type(module) in mapping:
        module = _swap(module, mapping[type(module)])
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = _replace(child, mapping)
    return module


def accelerate(
    model: nn.Module, *, prompt_chunk: int | None = None, tuned_allocator: bool = False
) -> nn.Module:
    """Swap the fast modules into ``model`` (a Sam or any part of one), in place; returns it.

    ``prompt_chunk``: prompts the mask decoder takes at a time on the CPU (default: as many as fit in
    16 MiB of image tokens). ``tuned_allocator``: the caller has tuned glibc's allocator
    (:func:`samkit.fast.allocator.tune_cpu_allocator`), so freed memory is reused as it is: the
    decoder then takes chunks of 16 prompts and no buffers of its own. Calling it again only updates
    these settings.
    """
    model = _replace(model, FAST_MODULES)
    for module in model.modules():
        if isinstance(module, fast_decoder.FastMaskDecoder):
            module.prompt_chunk = prompt_chunk or (16 if tuned_allocator else None)
        if isinstance(module, fast_transformer.FastTwoWayTransformer):
            module.reuse_buffers = not tuned_allocator
    return model


def restore(model: nn.Module) -> nn.Module:
    """Swap the reference modules back into ``model`` (the inverse of :func:`accelerate`); returns it."""
    return _replace(model, REFERENCE_MODULES)


def is_accelerated(model: nn.Module) -> bool:
    """Whether any fast module is in ``model``."""
    return any(type(m) in REFERENCE_MODULES for m in model.modules())
