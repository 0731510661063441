"""Fast implementation of the mask decoder (same parameters as :mod:`samkit.modeling.mask_decoder`,
swapped in by :func:`samkit.fast.accelerate`).

- Many prompts on one image share the image-side work (one projection of the image for all prompts,
  see :mod:`.transformer`), decoded in chunks of prompts on the CPU so that a chunk's per-prompt image
  tokens stay within a memory budget.
- :meth:`FastMaskDecoder.forward_above_iou` upscales only the masks whose predicted IoU passes a
  threshold (automatic mask generation).
- The output upscaling runs as channels-last GEMMs over blocks of image tokens.
- Given a :class:`~.session.DecoderSession` (the predictor's, one per image), the work on the image
  alone is kept across calls, and bf16 CPU inference on a few prompt tokens runs the token side in
  fp32 (:func:`fp32_tokens`).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.common import MLP, LayerNorm2d
from ..modeling.mask_decoder import MaskDecoder
from .encoder import FastMLPBlock
from .ops import autocast_on, linear_fn, plain
from .session import DecoderSession
from .transformer import FastAttention, FastTwoWayAttentionBlock, FastTwoWayTransformer, token_linear

# CPU inference decodes this many bytes of one chunk's per-prompt image tokens at a time by default:
# under glibc's default allocator a block over its mmap threshold (at most 32 MiB) gets fresh pages
# on every call (BENCHMARKS.md, "decoder chunks").
DEFAULT_CHUNK_BYTES = 16 << 20


def cpu_prompt_chunk(bytes_per_prompt: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """How many prompts CPU inference decodes at a time, given the size of one prompt's image tokens
    (H x W x C elements; vit_b at 1024: 4 MiB in fp32, 2 MiB in bf16): 4 in fp32, 8 in bf16 by default."""
    return max(1, chunk_bytes // max(1, bytes_per_prompt))


# bf16 CPU inference on at most this many tokens (all prompts of a call, with the IoU and mask tokens:
# one or two prompts) runs them in fp32.
FP32_TOKEN_ROWS = 16


def fp32_tokens(decoder: MaskDecoder, tokens: torch.Tensor, image_embeddings: torch.Tensor) -> bool:
    """Whether the prompt tokens (``tokens``: the sparse prompt embeddings B x N x C, plus the IoU
    and mask tokens) flow through ``decoder`` in fp32 with fp32 copies of its 16-bit
    token-side weights (a :class:`~.session.DecoderSession`'s): in bf16 CPU inference on at most
    ``FP32_TOKEN_ROWS`` tokens, when every token-side module is a fast one with plain layers and no
    hooks (the fp32 path reads their weights; anything else is called as it is, in bf16).

    A bf16 GEMM on a few rows costs about twice the same fp32 GEMM on the CPU (oneDNN's per-call
    setup), and one prompt makes about 45 such token-side GEMMs, while the image side, thousands of
    rows, is where bf16 pays. The fp32 tokens round to bf16 where they meet the image tokens, so the
    token side is more precise than in bf16, not less.
    """
    if not (
        tokens.dtype == image_embeddings.dtype == torch.bfloat16
        and tokens.device.type == "cpu"
        and tokens.shape[0] * (tokens.shape[1] + 1 + decoder.num_mask_tokens) <= FP32_TOKEN_ROWS
        and not torch.is_grad_enabled()
        and not autocast_on("cpu")
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
    ):
        return False
    for module in decoder.modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return False
        if type(module) in (nn.Linear, nn.ConvTranspose2d) and not plain(module):
            return False
        if type(module) not in _TOKEN_STREAM_MODULES:
            return False
    return True


def above_iou(
    masks: torch.Tensor, iou: torch.Tensor, min_iou: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masks BxMxHxW whose IoU BxM is above ``min_iou``: (logits KxHxW, IoU K, flat index K)."""
    keep = (iou.float() > min_iou).flatten()
    index = keep.nonzero().flatten()
    return masks.flatten(0, 1)[index], iou.flatten()[index], index


def decode_above_iou(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
    multimask_output: bool,
    min_iou: float,
    session: DecoderSession | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`FastMaskDecoder.forward_above_iou` for any mask decoder (the reference one computes
    every mask, then keeps those above ``min_iou``; it takes no ``session``)."""
    args = (image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output)
    if isinstance(decoder, FastMaskDecoder):
        return decoder.forward_above_iou(*args, min_iou, session=session)
    return above_iou(*decoder(*args), min_iou)


class FastMLP(MLP):
    """:class:`MLP` with the ReLUs fused into the linear layers."""

    def forward(self, x: torch.Tensor, fp32: DecoderSession | None = None) -> torch.Tensor:
        """``fp32``: x is fp32 and the layers 16-bit: their weights come from these fp32 copies."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = token_linear(x, layer, fp32, "relu" if i < last else "none")
        return torch.sigmoid(x) if self.sigmoid_output else x


class _Decoded(NamedTuple):
    """The two-way transformer's outputs for B prompts, before any mask pixel is computed."""

    tokens: torch.Tensor  # B x (1 + num_mask_tokens + N) x C
    image_tokens: torch.Tensor  # B x HW x C (possibly a stride-0 expansion of one image)
    h: int
    w: int
    iou: torch.Tensor  # B x num_mask_tokens
    fp32: DecoderSession | None = None  # tokens in fp32 with this session's weight copies


class FastMaskDecoder(MaskDecoder):
    """:class:`MaskDecoder` with shared image work, chunks of prompts and GEMM upscaling.

    ``prompt_chunk``: prompts per CPU chunk (None: by ``DEFAULT_CHUNK_BYTES`` of image tokens), set by
    :func:`samkit.fast.accelerate`. With a transformer that is not a :class:`FastTwoWayTransformer`
    (replaced or wrapped) every call runs the reference code.
    """

    prompt_chunk: int | None = None

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        session: DecoderSession | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks for B prompts on one image.

        image_embeddings: 1xCxHxW (shared by all prompts) or BxCxHxW (one per prompt);
        image_pe: 1xCxHxW; sparse: BxNxC; dense: BxCxHxW (or 1xCxHxW, broadcast).
        Returns mask logits Bx(3 or 1)x4Hx4W and IoU predictions Bx(3 or 1). ``session``: the image
        owner's :class:`~.session.DecoderSession` (work kept across calls on the same image).
        """
        if not isinstance(self.transformer, FastTwoWayTransformer):
            return super().forward(
                image_embeddings,
                image_pe,
                sparse_prompt_embeddings,
                dense_prompt_embeddings,
                multimask_output,
            )
        sel = slice(1, None) if multimask_output else slice(0, 1)
        after = slice(None)
        if torch.is_grad_enabled():
            # Training: every mask token's hypernetwork stays in the graph (a zero gradient, not none:
            # DDP waits for every parameter, and AdamW's decay applies as before).
            sel, after = slice(None), sel
        parts = [
            (self._masks(decoded, tokens=sel)[:, after], decoded.iou[:, sel][:, after])
            for decoded in self._decode_chunks(
                image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, session
            )
        ]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def forward_above_iou(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        min_iou: float,
        session: DecoderSession | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Only the masks whose predicted IoU is above ``min_iou``, as automatic mask generation keeps.

        The IoU head needs only the transformer's tokens, so the output upscaling (about 40% of the
        decoder's multiply-adds) runs only for prompts with at least one such mask. Returns
        (logits Kx4Hx4W, IoU K, flat index K into the B x (3 or 1) outputs of ``forward``), in that
        flat order; each kept mask equals ``forward``'s.
        """
        if not isinstance(self.transformer, FastTwoWayTransformer):
            return above_iou(
                *self.forward(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                              multimask_output),
                min_iou,
            )  # fmt: skip
        sel = slice(1, None) if multimask_output else slice(0, 1)
        masks, ious, index = [], [], []
        start = 0
        for decoded in self._decode_chunks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, session
        ):
            iou = decoded.iou[:, sel]
            b, m = iou.shape
            keep = iou.float() > min_iou  # in fp32, as the unfiltered path compares
            rows = keep.any(dim=1).nonzero().flatten()
            if len(rows):
                logits = self._masks(decoded, rows, tokens=sel)
                kept = keep[rows]
                masks.append(logits[kept])
                ious.append(iou[rows][kept])
                flat = (rows[:, None] + start) * m + torch.arange(m, device=rows.device)
                index.append(flat[kept])
            start += b
        if not masks:
            dev = sparse_prompt_embeddings.device
            h, w = image_embeddings.shape[-2:]
            empty = torch.zeros(0, 4 * h, 4 * w, device=dev, dtype=self.mask_tokens.weight.dtype)
            return empty, torch.zeros(0, device=dev), torch.zeros(0, dtype=torch.long, device=dev)
        return torch.cat(masks), torch.cat(ious), torch.cat(index)

    def _decode_chunks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        session: DecoderSession | None = None,
    ) -> Iterator[_Decoded]:
        """The transformer's outputs for all prompts, in chunks of prompts on the CPU (inference).

        A chunk's image tokens live in buffers that the next chunk overwrites (the transformer's
        ``_Workspace``): a caller is done with one chunk before it asks for the next. With a
        ``session`` the shared image's work is the session's (kept for the next call on the image)."""
        b = sparse_prompt_embeddings.shape[0]
        _, c, h, w = image_embeddings.shape
        chunk = self.prompt_chunk or cpu_prompt_chunk(c * h * w * self.mask_tokens.weight.element_size())
        if torch.is_grad_enabled():
            yield self._decode(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
            return
        # The shared image's work, done in the first chunk: only when every prompt sees the same image
        # tokens (one image, no mask prompts). A chunk of one prompt has batch-1 inputs too, yet its
        # own image or mask embedding.
        dense = dense_prompt_embeddings
        shared = image_embeddings.shape[0] == 1 and (dense.shape[0] == 1 or dense.stride(0) == 0)
        cache: dict | None = None
        if shared:
            kept = None if session is None else session.image_work(image_embeddings, image_pe, dense)
            cache = {} if kept is None else kept
        fp32 = (
            session
            if session is not None and fp32_tokens(self, sparse_prompt_embeddings, image_embeddings)
            else None
        )
        if b <= chunk or image_pe.device.type != "cpu":
            yield self._decode(
                image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, cache, fp32
            )
        else:
            for s in range(0, b, chunk):
                yield self._decode(
                    image_embeddings if image_embeddings.shape[0] == 1 else image_embeddings[s : s + chunk],
                    image_pe,
                    sparse_prompt_embeddings[s : s + chunk],
                    dense_prompt_embeddings
                    if dense_prompt_embeddings.shape[0] == 1
                    else dense_prompt_embeddings[s : s + chunk],
                    cache,
                    fp32,
                )

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens: logits Bx(num_mask_tokens)x4Hx4W and IoU Bx(num_mask_tokens)."""
        if not isinstance(self.transformer, FastTwoWayTransformer):
            return super().predict_masks(
                image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
            )
        decoded = self._decode(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        return self._masks(decoded), decoded.iou

    def _decode(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        cache: dict | None = None,
        fp32: DecoderSession | None = None,
    ) -> _Decoded:
        """``fp32``: run the prompt tokens in fp32 with this session's copies of the weights."""
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        model_dtype = output_tokens.dtype
        if fp32 is not None:
            output_tokens = torch.cat([fp32.fp32(self.iou_token.weight), fp32.fp32(self.mask_tokens.weight)])
        tokens = torch.cat(
            [output_tokens.expand(b, -1, -1), sparse_prompt_embeddings.to(output_tokens.dtype)], dim=1
        )

        # Without mask prompts every prompt sees the same image tokens: keep a batch of 1 and let
        # the transformer broadcast it (its first layer projects the image once for all prompts).
        # The prompt encoder's "no mask" embedding comes expanded to B (stride 0): adding it as is
        # would copy the image B times and make every prompt pay for the shared work.
        if dense_prompt_embeddings.shape[0] > 1 and dense_prompt_embeddings.stride(0) == 0:
            dense_prompt_embeddings = dense_prompt_embeddings[:1]
        shared = cache is not None and image_embeddings.shape[0] == dense_prompt_embeddings.shape[0] == 1
        if shared and "src" in cache:  # one image for every chunk of prompts: its work is done once
            src = cache["src"]
        else:
            src = image_embeddings + dense_prompt_embeddings
            if shared:
                cache["src"] = src
        _, _, h, w = src.shape
        hs, src = self.transformer(
            src, image_pe, tokens, cache=cache.setdefault("transformer", {}) if shared else None, fp32=fp32
        )
        if fp32 is None:
            iou = self.iou_prediction_head(hs[:, 0, :])
        else:  # the IoU in the model's dtype, as ever
            iou = self.iou_prediction_head(hs[:, 0, :], fp32=fp32).to(model_dtype)
        return _Decoded(hs, src.expand(b, -1, -1), h, w, iou, fp32)

    def _masks(
        self, decoded: _Decoded, rows: torch.Tensor | None = None, tokens: slice = slice(None)
    ) -> torch.Tensor:
        """Mask logits Bx(M)x4Hx4W of the decoded prompts (only ``rows`` if given) for the mask tokens
        ``tokens`` selects (all by default): the others' hypernetworks and pixels are never computed."""
        hs, src = decoded.tokens, decoded.image_tokens
        if rows is not None and len(rows) < len(hs):  # rows are distinct: all of them need no copy
            hs, src = hs[rows], src[rows]
        b, _, c = src.shape
        h, w = decoded.h, decoded.w
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        chosen = range(self.num_mask_tokens)[tokens]
        mlps = self.output_hypernetworks_mlps
        if decoded.fp32 is None:
            hyper_in = torch.stack([mlps[i](mask_tokens_out[:, i, :]) for i in chosen], dim=1)
        else:  # fp32 tokens; the masks in the image tokens' dtype
            hyper_in = torch.stack(
                [mlps[i](mask_tokens_out[:, i, :], fp32=decoded.fp32) for i in chosen], dim=1
            )
            hyper_in = hyper_in.to(src.dtype)
        if self._upscales_as_gemms():
            return self._masks_from_tokens(src, hyper_in, h, w)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        _, c_up, h_up, w_up = upscaled.shape
        return (hyper_in.to(upscaled.dtype) @ upscaled.view(b, c_up, h_up * w_up)).view(b, -1, h_up, w_up)

    def _upscales_as_gemms(self) -> bool:
        if len(self.output_upscaling) != 5 or type(self.output_upscaling[1]) is not LayerNorm2d:
            return False
        conv1, _, act1, conv2, act2 = self.output_upscaling
        return (
            plain(conv1, conv2)
            and all(isinstance(a, nn.GELU) and a.approximate == "none" for a in (act1, act2))
            and all(
                conv.kernel_size == (2, 2)
                and conv.stride == (2, 2)
                and conv.padding == (0, 0)
                and conv.bias is not None
                for conv in (conv1, conv2)
            )
        )

    def _masks_from_tokens(self, src: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``output_upscaling`` and the hypernetwork product, computed channels-last.

        A 2x2 stride-2 transposed convolution maps each pixel on its own to a 2x2 block: it is a
        linear layer C -> 4C' on the tokens, so the two of them run as GEMMs (the second with its
        GELU fused on the CPU), the LayerNorm runs over contiguous channels, and the only layout
        change is the final B x M x 4h x 4w permutation of the (small) masks.

        CPU inference runs the chain on blocks of at most ``_UPSCALE_TOKENS`` image tokens (one
        prompt of a 64x64 grid at a time): each block's 16x larger intermediates then stay in the
        cache between the GEMMs, the LayerNorm and the GELUs instead of streaming through memory.
        """
        conv1, norm, _, conv2, _ = self.output_upscaling
        b = src.shape[0]
        c1, c2 = conv1.out_channels, conv2.out_channels
        # ConvTranspose2d weight: in x out x kh x kw -> (kh, kw, out) x in.
        w1 = conv1.weight.permute(2, 3, 1, 0).reshape(4 * c1, -1)
        w2 = conv2.weight.permute(2, 3, 1, 0).reshape(4 * c2, -1)

        in_blocks = not torch.is_grad_enabled() and src.device.type == "cpu" and b > 0

        def block(x: torch.Tensor, hyper: torch.Tensor, rows: int) -> torch.Tensor:
            n = x.shape[0]
            y = linear_fn(x, w1, conv1.bias.repeat(4)).view(n, rows * w * 4, c1)  # n x (y x i j) x c1
            y = F.gelu(F.layer_norm(y, (c1,), norm.weight, norm.bias, norm.eps))
            y = linear_fn(y, w2, conv2.bias.repeat(4), "gelu").view(
                n, rows * w * 16, c2
            )  # n x (y x i j i' j') x c2
            # Output row 4y + 2i + i', column 4x + 2j + j'.
            if not in_blocks:
                masks = torch.bmm(y, hyper.transpose(1, 2).to(y.dtype))  # n x (y x i j i' j') x M
                return masks.view(n, rows, w, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
            # Mask-major, and reordered in two copies: one permutation of this 8-d shape runs over
            # pairs of floats; moving i ahead of x first copies runs of 8 and leaves the caller's copy
            # runs of 2 along contiguous rows.
            masks = torch.bmm(hyper.to(y.dtype), y.transpose(1, 2))  # n x M x (y x i j i' j')
            masks = masks.view(n, -1, rows, w, 2, 2, 2, 2).transpose(3, 4).contiguous()  # y i x j i' j'
            return masks.view(n, -1, rows, 2, w, 2, 2, 2).permute(0, 1, 2, 3, 6, 4, 5, 7)

        m = hyper_in.shape[1]
        if not in_blocks:
            return block(src, hyper_in, h).reshape(b, m, 4 * h, 4 * w)
        out = None
        prompts = max(1, _UPSCALE_TOKENS // (h * w))  # small grids: several prompts per block
        rows = min(h, max(1, _UPSCALE_TOKENS // w))  # large grids: some rows of one prompt
        for p0 in range(0, b, prompts):
            p1 = min(b, p0 + prompts)
            for y0 in range(0, h, rows):
                y1 = min(h, y0 + rows)
                part = block(src[p0:p1, y0 * w : y1 * w], hyper_in[p0:p1], y1 - y0)
                if out is None:  # the blocks' dtype (under autocast not the tokens')
                    out = part.new_empty(b, m, 4 * h, 4 * w)
                out[p0:p1, :, 4 * y0 : 4 * y1].view(p1 - p0, m, y1 - y0, 2, 2, w, 2, 2).copy_(part)
        assert out is not None
        return out


_UPSCALE_TOKENS = 4096  # image tokens per block of the CPU mask upscaling (see _masks_from_tokens)


# What a decoder may hold for the fp32 token stream (anything else, such as an adapter's wrapper,
# is called as it is, in its own dtype).
_TOKEN_STREAM_MODULES = (
    nn.Linear, nn.LayerNorm, nn.Embedding, nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ReLU, nn.ModuleList,
    nn.Sequential, FastAttention, FastTwoWayAttentionBlock, FastTwoWayTransformer, FastMLPBlock, FastMLP,
    FastMaskDecoder,
)  # fmt: skip
