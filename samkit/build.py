"""Model builders (one per size), the name -> builder dict, and checkpoint loading."""

from __future__ import annotations

import os
import re
import warnings
from functools import partial
from typing import Callable, Mapping

import torch
from torch import nn

from .errors import CheckpointError, SamkitNote
from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

PROMPT_EMBED_DIM = 256
IMAGE_SIZE = 1024
PATCH_SIZE = 16

# Encoder hyper-parameters of each size: (embed_dim, depth, num_heads, global_attn_indexes).
ENCODER_CONFIGS: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    # Untrained, for tests and examples only: a 2-block encoder with the real decoder.
    "vit_tiny": (64, 2, 2, (1,)),
}


def _build_sam(
    *,
    encoder_embed_dim: int,
    encoder_depth: int,
    encoder_num_heads: int,
    encoder_global_attn_indexes: tuple[int, ...],
    checkpoint: str | os.PathLike | None = None,
    text_feature_dim: int | None = None,
    image_size: int = IMAGE_SIZE,
) -> Sam:
    check_image_size(image_size)
    grid = image_size // PATCH_SIZE
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=PATCH_SIZE,
            embed_dim=encoder_embed_dim,
            depth=encoder_depth,
            num_heads=encoder_num_heads,
            mlp_ratio=4.0,
            out_chans=PROMPT_EMBED_DIM,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=14,
            global_attn_indexes=encoder_global_attn_indexes,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
            text_feature_dim=text_feature_dim,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=PROMPT_EMBED_DIM,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    sam.eval()
    if checkpoint is not None:
        load_checkpoint(sam, checkpoint)
    return sam


def check_image_size(image_size: int) -> None:
    """The encoder's input side must be a positive multiple of the 16-pixel patch."""
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or image_size < PATCH_SIZE
        or image_size % PATCH_SIZE
    ):
        raise ValueError(
            f"image_size must be a positive multiple of {PATCH_SIZE} (SAM's is 1024), got {image_size!r}"
        )


def _build_named(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    text_feature_dim: int | None = None,
    image_size: int = IMAGE_SIZE,
) -> Sam:
    dim, depth, heads, global_idx = ENCODER_CONFIGS[name]
    return _build_sam(
        encoder_embed_dim=dim,
        encoder_depth=depth,
        encoder_num_heads=heads,
        encoder_global_attn_indexes=global_idx,
        checkpoint=checkpoint,
        text_feature_dim=text_feature_dim,
        image_size=image_size,
    )


def build_sam_vit_h(
    checkpoint: str | os.PathLike | None = None,
    *,
    text_feature_dim: int | None = None,
    image_size: int = IMAGE_SIZE,
) -> Sam:
    """ViT-H SAM (636M parameters); Meta's file: sam_vit_h_4b8939.pth."""
    return _build_named("vit_h", checkpoint, text_feature_dim, image_size)


def build_sam_vit_l(
    checkpoint: str | os.PathLike | None = None,
    *,
    text_feature_dim: int | None = None,
    image_size: int = IMAGE_SIZE,
) -> Sam:
    """ViT-L SAM (308M parameters); Meta's file: sam_vit_l_0b3195.pth."""
    return _build_named("vit_l", checkpoint, text_feature_dim, image_size)


def build_sam_vit_b(
    checkpoint: str | os.PathLike | None = None,
    *,
    text_feature_dim: int | None = None,
    image_size: int = IMAGE_SIZE,
) -> Sam:
    """ViT-B SAM (94M parameters); Meta's file: sam_vit_b_01ec64.pth."""
    return _build_named("vit_b", checkpoint, text_feature_dim, image_size)


def build_sam_vit_tiny(
    checkpoint: str | os.PathLike | None = None,
    *,
    text_feature_dim: int | None = None,
    image_size: int = IMAGE_SIZE,
) -> Sam:
    """A tiny, untrained SAM (2-block 64-wide encoder, full decoder) for tests and examples.

    It has no released weights: its masks are meaningless until it is trained.
    """
    return _build_named("vit_tiny", checkpoint, text_feature_dim, image_size)


build_sam = build_sam_vit_h

sam_model_registry: dict[str, Callable[..., Sam]] = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "vit_tiny": build_sam_vit_tiny,
}


def build_model(
    model_type: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    text_feature_dim: int | None = None,
    image_size: int | None = None,
) -> Sam:
    """Build by name, with a clear error for an unknown name.

    ``text_feature_dim`` (e.g. 768 for CLIP ViT-L/14, 256 for BLIP-2) adds the text-prompt branch
    (``prompt_encoder.text_proj`` and ``prompt_encoder.text_embeddings``). ``image_size`` is the side
    of the encoder's square input, a multiple of 16: 1024 for every released SAM; a smaller frame
    suits a model trained from scratch at that size (the tests' tiny models), which costs far less
    per image and per prompt. By default it is the checkpoint's (:func:`checkpoint_image_size`), or
    1024 without one; a checkpoint loads only into a model of its own size.
    """
    if model_type not in sam_model_registry:
        raise ValueError(f"unknown model type {model_type!r}; choose one of {', '.join(sam_model_registry)}")
    builder = sam_model_registry[model_type]
    if checkpoint is None:
        size = IMAGE_SIZE if image_size is None else image_size
        return builder(text_feature_dim=text_feature_dim, image_size=size)
    state = read_checkpoint(checkpoint)  # read once: for its sizes, then to load
    check_checkpoint_size(state, model_type, os.fspath(checkpoint))
    size = image_size if image_size is not None else (checkpoint_image_size(state) or IMAGE_SIZE)
    sam = builder(text_feature_dim=text_feature_dim, image_size=size)
    load_checkpoint(sam, state, source=os.fspath(checkpoint))
    return sam


def check_checkpoint_size(state: Mapping[str, torch.Tensor], model_type: str, source: str) -> None:
    """Refuse a state dict of another model size than ``model_type`` before that model is built
    (a random vit_h takes seconds to build): one line naming both sizes and ``source``."""
    ckpt_size = identify_model_size(state)
    wanted = "vit_h" if model_type == "default" else model_type
    if ckpt_size != wanted and ckpt_size is not None:
        raise CheckpointError(f"checkpoint is {ckpt_size}, model is {wanted}: {source}")


# ---------------------------------------------------------------------------------------------------
# Checkpoint loading

_WRAPPER_KEYS = ("model", "state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")
# The seed's text-prompt checkpoints may hold the frozen feature encoder; SAM never loads it.
_IGNORED_PREFIXES = ("text_encoder.",)
_TEXT_PROJ_WEIGHT = "prompt_encoder.text_proj.weight"
_TEXT_BRANCH_PREFIXES = ("prompt_encoder.text_proj.", "prompt_encoder.text_embeddings.")


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes wherever they appear."""
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value
    return out


def identify_model_size(state: Mapping[str, torch.Tensor]) -> str | None:
    """The size name a SAM state dict belongs to (by encoder width and depth), or None."""
    pos = state.get("image_encoder.pos_embed")
    if pos is None or pos.ndim != 4:
        return None
    dim = pos.shape[-1]
    depth = len({m.group(1) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    for name, (d, n, _, _) in ENCODER_CONFIGS.items():
        if d == dim and n == depth:
            return name
    return f"an unknown size (width {dim}, depth {depth})"


def checkpoint_image_size(state: Mapping[str, torch.Tensor]) -> int | None:
    """The encoder input side a SAM state dict was built for (its position-embedding grid x 16), or None."""
    pos = state.get("image_encoder.pos_embed")
    if pos is None or pos.ndim != 4 or pos.shape[1] != pos.shape[2]:
        return None
    return int(pos.shape[1]) * PATCH_SIZE


def model_size_name(model: nn.Module) -> str | None:
    return identify_model_size(
        {k: v for k, v in model.state_dict().items() if k.startswith("image_encoder.")}
    )


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``name -> tensor`` dict with Meta's parameter names.

    Accepts Meta's ``.pth`` (also wrapped as ``{"model": state_dict}`` and with ``module.`` or
    ``_orig_mod.`` prefixes), samkit's training checkpoints, the seed's MindSpore ``.ckpt``, and
    Hugging Face SAMs (a folder, ``model.safetensors``, ``pytorch_model.bin``: :mod:`samkit.checkpoints.hf`).
    Pickled code never runs (``weights_only=True``).
    """
    from .checkpoints.mindspore import (
        looks_like_mindspore_checkpoint,
        mindspore_to_torch_names,
        read_mindspore_checkpoint,
    )

    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith((".safetensors", ".bin", ".json")):
        from .checkpoints.hf import hf_to_samkit_names, is_hf_state_dict, read_hf_weights

        # A Hugging Face SAM folder or file, or samkit's own .safetensors.
        state = clean_state_dict(read_hf_weights(path))
        return hf_to_samkit_names(state, path) if is_hf_state_dict(state) else state
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if looks_like_mindspore_checkpoint(path):
        state = mindspore_to_torch_names(read_mindspore_checkpoint(path))
    else:
        _check_torch_file(path)
        try:
            # torch warns about pickle protocols and TorchScript archives: the error below says it all.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for bad files; all mean the same to a user
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "weights_only" in str(err) or "Unsupported global" in str(err):
                reason = (
                    "it contains pickled code or objects, which samkit refuses to run (weights_only=True)"
                )
            raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    for _ in range(2):  # {"model": {...}} or {"state_dict": {"model": ...}}
        if isinstance(state, Mapping) and not _is_tensor_dict(state):
            inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
            if inner is not None:
                state = inner
    if not isinstance(state, Mapping) or not _is_tensor_dict(state):
        raise CheckpointError(f"{path} is not a SAM checkpoint (no tensor state dict found)")
    return clean_state_dict(state)


def _check_torch_file(path: str) -> None:
    """A file torch.load cannot be (empty, text, other bytes) is named as not a checkpoint at all,
    before torch reports it as a pickle it cannot read."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):  # torch's zip format, or a pickle
        return
    if not head:
        what = "the file is empty"
    elif b"\0" not in head and _is_text(head):
        what = "it is a text file"
    else:
        what = "not a PyTorch (.pth) or MindSpore (.ckpt) file"
    raise CheckpointError(f"cannot read checkpoint {path}: {what}, not a checkpoint")


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:  # a multi-byte character cut by the 512-byte read is still text
        return err.start >= len(head) - 3
    return True


def _is_tensor_dict(state: Mapping) -> bool:
    return len(state) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    )


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    keep_new_text_branch: bool = False,
    source: str | None = None,
) -> None:
    """Load weights strictly into ``model``; errors name the file, the sizes and the mismatched keys.

    ``keep_new_text_branch=True`` loads a plain SAM checkpoint (e.g. Meta's ``.pth``) into a text-prompt
    model and keeps the model's freshly initialised ``text_proj``/``text_embeddings`` (the start of
    text fine-tuning); everything else is still strict. A text-prompt checkpoint (the seed's fine-tuned
    ``.ckpt`` files all carry ``text_proj``/``text_embeddings``) loads into a plain model with its text
    branch left out, and a :class:`~samkit.errors.SamkitNote` warning says so.
    """
    if source is None:
        source = "state dict" if isinstance(checkpoint, Mapping) else os.fspath(checkpoint)
    state = clean_state_dict(checkpoint) if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)}
    if keep_new_text_branch and _TEXT_PROJ_WEIGHT not in state:
        state.update({k: v for k, v in expected.items() if k.startswith(_TEXT_BRANCH_PREFIXES)})
    left_out = None  # the text feature size of a text branch a plain model leaves out
    if _TEXT_PROJ_WEIGHT in state and _TEXT_PROJ_WEIGHT not in expected:
        left_out = state[_TEXT_PROJ_WEIGHT].shape[1]
        state = {k: v for k, v in state.items() if not k.startswith(_TEXT_BRANCH_PREFIXES)}
    _check_text_branch(state, expected, source)
    ckpt_size, model_size = identify_model_size(state), model_size_name(model)
    if ckpt_size != model_size and ckpt_size is not None:
        raise CheckpointError(f"checkpoint is {ckpt_size}, model is {model_size}: {source}")
    ckpt_image, model_image = checkpoint_image_size(state), checkpoint_image_size(expected)
    if ckpt_image is not None and model_image is not None and ckpt_image != model_image:
        raise CheckpointError(
            f"{source} is a SAM for {ckpt_image}x{ckpt_image} inputs, the model was built for "
            f"{model_image}x{model_image}; build it with image_size={ckpt_image}"
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"{source} does not match a {model_size} SAM ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)
    if left_out is not None:  # after the last check: an error stays the only line a command prints
        warnings.warn(
            SamkitNote(
                f"{source} has a text-prompt branch (text features of size {left_out}); this plain SAM leaves "
                f"it out (text prompts: text_inference.py, or build_model(..., text_feature_dim={left_out}))"
            ),
            stacklevel=2,
        )


def _check_text_branch(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str
) -> None:
    """A plain checkpoint and a text model, or two text feature sizes, get one line saying what to pass."""
    ckpt_dim = state[_TEXT_PROJ_WEIGHT].shape[1] if _TEXT_PROJ_WEIGHT in state else None
    model_dim = expected[_TEXT_PROJ_WEIGHT].shape[1] if _TEXT_PROJ_WEIGHT in expected else None
    if ckpt_dim is None and model_dim is not None:
        raise CheckpointError(
            f"{source} has no text-prompt parameters but the model was built with "
            f"text_feature_dim={model_dim}; build it without text_feature_dim, or pass keep_new_text_branch=True "
            "to start text fine-tuning from it"
        )
    if ckpt_dim != model_dim:
        raise CheckpointError(
            f"{source} holds text features of size {ckpt_dim}, the model was built with "
            f"text_feature_dim={model_dim}; build it with text_feature_dim={ckpt_dim}"
        )


__all__ = [
    "build_model",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_tiny",
    "check_checkpoint_size",
    "check_image_size",
    "checkpoint_image_size",
    "load_checkpoint",
    "read_checkpoint",
    "sam_model_registry",
]
