"""What the prompt calls on one image share: owned by the object that holds the image (the predictor).

A :class:`DecoderSession` keeps, for as long as its owner keeps one image (``SamPredictor`` makes a
new one in ``set_image`` and drops it in ``reset_image``):

- the positional encoding of the embedding grid;
- the decoder's work on the image alone (the image tokens plus the "no mask" embedding, their
  token-major layout, their sum with the positional encoding and the first layer's projections),
  valid while the image embedding, the positional encoding and the dense prompt embedding are the
  same tensors with the same contents;
- fp32 copies of the 16-bit token-side weights, for the fp32 token stream of bf16 CPU inference
  (:func:`samkit.fast.decoder.fp32_tokens`).

Every entry is keyed by the tensor it was made from: the same object, at the same memory, with no
in-place change since (its version counter: a state-dict load or an optimizer step bumps it), so a
changed or replaced parameter is never served a stale copy. A layer wrapped by an adapter is not a
plain ``nn.Linear``: the fast modules then call it and the session has no part in it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modeling.prompt_encoder import PositionEmbeddingRandom


def _version(t: torch.Tensor) -> tuple[Any, ...] | None:
    """What identifies ``t``'s contents: memory, version, layout. None for an inference tensor (made
    under ``torch.inference_mode``), which counts no versions and so is never kept."""
    if t.is_inference():
        return None
    return (t.data_ptr(), t._version, t.dtype, t.device, t.shape, t.stride())


class DecoderSession:
    """The decoder's shared work on one image and fp32 copies of token-side weights (see the module)."""

    def __init__(self) -> None:
        self._copies: dict[int, tuple[torch.Tensor, tuple[Any, ...], torch.Tensor]] = {}
        self._image_key: tuple[Any, ...] | None = None
        self._image_refs: tuple[torch.Tensor, ...] = ()
        self._image_work: dict = {}
        self._pe: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor] | None = None

    def fp32(self, t: torch.Tensor) -> torch.Tensor:
        """``t.float()``, kept while ``t`` is the same tensor with the same contents."""
        if t.dtype == torch.float32:
            return t
        key = _version(t)
        if key is None:
            return t.float()
        kept = self._copies.get(id(t))
        if kept is None or kept[0] is not t or kept[1] != key:
            kept = (t, key, t.float())  # the reference keeps id(t) from being reused
            self._copies[id(t)] = kept
        return kept[2]

    def weights(self, layer: nn.Linear | nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A plain layer's weight and bias in fp32."""
        bias = None if layer.bias is None else self.fp32(layer.bias)
        return self.fp32(layer.weight), bias

    def dense_pe(self, prompt_encoder: nn.Module) -> torch.Tensor:
        """``prompt_encoder.get_dense_pe()`` (1xCxHxW), kept while what it is computed from is unchanged:
        the random-Fourier matrix (same memory and version), the grid size and the model's dtype."""
        pe_layer = prompt_encoder.pe_layer
        matrix = pe_layer.positional_encoding_gaussian_matrix
        version = _version(matrix)
        if type(pe_layer) is not PositionEmbeddingRandom or version is None:
            return prompt_encoder.get_dense_pe()
        key = (version, tuple(prompt_encoder.image_embedding_size), prompt_encoder.no_mask_embed.weight.dtype)
        if self._pe is None or self._pe[0] != key:
            self._pe = (key, matrix, prompt_encoder.get_dense_pe())
        return self._pe[2]

    def image_work(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
    ) -> dict | None:
        """The work dict for one image (1xCxHxW embedding), its PE and a dense prompt embedding that
        is the same for every pixel (the "no mask" embedding): the one of the previous call when all
        three are unchanged (the same memory, layout and version; any view of it), else a new empty
        one. None when they are not of that kind."""
        if image_embeddings.shape[0] != 1 or dense.stride()[-2:] != (0, 0):
            return None
        keys = (_version(image_embeddings), _version(image_pe), _version(dense))
        if any(k is None for k in keys):
            return None
        column = dense[:1, :, :1, :1]
        same = (
            self._image_key is not None
            and self._image_key[:2] == keys[:2]
            and torch.equal(self._image_refs[2], column)
        )
        if not same:
            # The references keep the memory the keys name from being reused while they are kept.
            self._image_key, self._image_refs = keys, (image_embeddings, image_pe, column.clone())
            self._image_work = {}
        return self._image_work
