"""What every benchmark shares: Meta's model and samkit's holding the same random weights."""

from __future__ import annotations

import torch

from samkit.build import ENCODER_CONFIGS, build_model
from samkit.modeling import Sam


def meta_sam(name: str):
    """Meta's ``segment_anything`` Sam of the given size (random init, eval mode)."""
    from segment_anything.build_sam import _build_sam

    dim, depth, heads, global_idx = ENCODER_CONFIGS[name]
    return _build_sam(
        encoder_embed_dim=dim,
        encoder_depth=depth,
        encoder_num_heads=heads,
        encoder_global_attn_indexes=global_idx,
    ).eval()


def shared_random_weights(name: str, seed: int = 1, scale: float = 0.02):
    """(Meta's model, its state dict) with EVERY tensor perturbed: Meta zero-initialises the position
    tables, and zeros would hide differences. Load the state into samkit models with ``samkit_sam``."""
    torch.manual_seed(0)
    meta = meta_sam(name)
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in meta.state_dict().items()}
    meta.load_state_dict(state)
    return meta, state


def samkit_sam(name: str, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Sam:
    model = build_model(name)
    model.load_state_dict(state)
    return model.to(dtype)
