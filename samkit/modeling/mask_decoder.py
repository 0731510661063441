"""Mask decoder: a two-way transformer and hypernetwork heads that turn prompt tokens into masks."""

from __future__ import annotations

import weakref
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.allocator import allocator_tuned
from .common import MLP, LayerNorm2d, linear_fn
from .transformer import _autocast_on


def cpu_prompt_chunk(bytes_per_prompt: int = 4 << 20) -> int:
    """How many prompts CPU inference decodes at a time, given the size of one prompt's image tokens
    (H x W x C elements; vit_b at 1024: 4 MiB in fp32, 2 MiB in bf16).

    Under glibc's default allocator a block over its mmap threshold (at most 32 MiB) gets fresh
    pages on every call, so a chunk's per-prompt tensors are kept to 16 MiB: 4 prompts in fp32,
    8 in bf16 (vit_b, 64 boxes in one call, 2 threads, median of 5: fp32 chunks of 2/4/8/16 ->
    836/803/925/1056 ms; bf16 527/485/463/508 ms). With the allocator tuned
    (utils/allocator.py) freed memory is reused whatever its size: 16 prompts keep the GEMMs
    efficient (fp32: 2.5 s in one batch, 2.0 s in chunks of 8-16).
    """
    if allocator_tuned():
        return 16
    return max(1, (16 << 20) // max(1, bytes_per_prompt))


def _image_work_key(
    image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
) -> tuple | None:
    """What the decoder's image-only work depends on besides its inputs' owners (``_owners``); None
    for inference-mode tensors, which change in place without a version count."""
    if dense.shape[0] > 1 and dense.stride(0) == 0:
        dense = dense[:1]
    if any(t.is_inference() for t in (image_embeddings, image_pe, dense)):
        return None
    return tuple(
        (t.data_ptr(), t._version, t.shape, t.stride(), t.dtype, t.device)
        for t in (image_embeddings, image_pe, dense)
    )


def _owners(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors these are views of (or themselves): while an owner lives, its memory holds the same
    data up to in-place changes, which bump the version counter it shares with its views. (A fresh
    tensor, such as a mask prompt's dense embedding, may reuse a freed one's address: only the
    owner's identity tells them apart.)"""
    return tuple(t if t._base is None else t._base for t in tensors)


class _Decoded(NamedTuple):
    """The two-way transformer's outputs for B prompts, before any mask pixel is computed."""

    tokens: torch.Tensor  # B x (1 + num_mask_tokens + N) x C
    image_tokens: torch.Tensor  # B x HW x C (possibly a stride-0 expansion of one image)
    h: int
    w: int
    iou: torch.Tensor  # B x num_mask_tokens


class MaskDecoder(nn.Module):
    """Predicts ``num_multimask_outputs + 1`` mask logits (at 4x the embedding resolution) and their IoU."""

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks for B prompts on one image.

        image_embeddings: 1xCxHxW (shared by all prompts) or BxCxHxW (one per prompt);
        image_pe: 1xCxHxW; sparse: BxNxC; dense: BxCxHxW (or 1xCxHxW, broadcast).
        Returns mask logits Bx(3 or 1)x4Hx4W and IoU predictions Bx(3 or 1).
        """
        sel = slice(1, None) if multimask_output else slice(0, 1)
        after = slice(None)
        if torch.is_grad_enabled():
            # Training: every mask token's hypernetwork stays in the graph (a zero gradient, not none:
            # DDP waits for every parameter, and AdamW's decay applies as before).
            sel, after = slice(None), sel
        parts = [
            (self._masks(decoded, tokens=sel)[:, after], decoded.iou[:, sel][:, after])
            for decoded in self._decode_chunks(
                image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Only the masks whose predicted IoU is above ``min_iou``, as automatic mask generation keeps.

        The IoU head needs only the transformer's tokens, so the output upscaling (about 40% of the
        decoder's multiply-adds) runs only for prompts with at least one such mask. Returns
        (logits Kx4Hx4W, IoU K, flat index K into the B x (3 or 1) outputs of ``forward``), in that
        flat order; each kept mask equals ``forward``'s.
        """
        sel = slice(1, None) if multimask_output else slice(0, 1)
        masks, ious, index = [], [], []
        start = 0
        for decoded in self._decode_chunks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
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
    ) -> Iterator[_Decoded]:
        """The transformer's outputs for all prompts, in chunks of prompts on the CPU (inference).

        A chunk's image tokens live in buffers that the next chunk overwrites (the transformer's
        ``_Workspace``): a caller is done with one chunk before it asks for the next."""
        b = sparse_prompt_embeddings.shape[0]
        _, c, h, w = image_embeddings.shape
        chunk = cpu_prompt_chunk(c * h * w * self.mask_tokens.weight.element_size())
        if torch.is_grad_enabled():
            yield self._decode(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
            return
        # The shared image's work, done in the first chunk (or kept from the previous call): only
        # when every prompt sees the same image tokens (one image, no mask prompts). A chunk of one
        # prompt has batch-1 inputs too, yet its own image or mask embedding.
        dense = dense_prompt_embeddings
        shared = image_embeddings.shape[0] == 1 and (dense.shape[0] == 1 or dense.stride(0) == 0)
        cache = self._image_work(image_embeddings, image_pe, dense) if shared else None
        if b <= chunk or image_pe.device.type != "cpu":
            yield self._decode(
                image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, cache=cache
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
                    cache=cache,
                )
        if cache is not None:
            self._keep_image_work(image_embeddings, image_pe, dense_prompt_embeddings, cache)

    def _image_work(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
    ) -> dict:
        """A new cache for one call's shared-image work (see ``_decode``), holding the previous call's
        image-only tensors when it decoded the same image: interactive use prompts one image many
        times, and each call would otherwise redo the same sums and copies of its 64x64x256 tokens
        (about a millisecond of a one-point call on a 2-core CPU). These tensors depend on no
        decoder weight: the image embedding (a view of the same live tensor, such as the predictor's
        ``features[:1]``, same memory, unmodified), the image PE and the dense embedding (views of the
        same live tensors: the "no mask" embedding's weight; a mask prompt's fresh embedding never
        matches), each unmodified: an optimizer step or a state-dict load bumps their version."""
        kept = self.__dict__.get("_kept_image_work")
        owners = _owners(image_embeddings, image_pe, dense)
        if kept is None or any(ref() is not owner for ref, owner in zip(kept[0], owners)):
            return {}
        key = _image_work_key(image_embeddings, image_pe, dense)
        if key is None or kept[1] != key:
            return {}
        work = kept[2]
        layer0 = {"keys_pe": work["keys_pe"]} if "keys_pe" in work else {}
        return {
            "src": work["src"],
            "transformer": {"keys": work["keys"], "key_pe": work["key_pe"], 0: layer0},
        }

    def _keep_image_work(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor, cache: dict
    ) -> None:
        """Keep ``cache``'s image-only tensors for the next call (see ``_image_work``)."""
        self.__dict__["_kept_image_work"] = None
        transformer = cache.get("transformer", {})
        if "src" not in cache or "keys" not in transformer:
            return
        work = {"src": cache["src"], "keys": transformer["keys"], "key_pe": transformer["key_pe"]}
        if "keys_pe" in transformer.get(0, {}):
            work["keys_pe"] = transformer[0]["keys_pe"]
        key = _image_work_key(image_embeddings, image_pe, dense)
        if key is None:
            return
        refs = tuple(weakref.ref(owner) for owner in _owners(image_embeddings, image_pe, dense))
        self.__dict__["_kept_image_work"] = (refs, key, work)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_kept_image_work", None)  # a weak reference: not picklable, and only a cache
        return state

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens: logits Bx(num_mask_tokens)x4Hx4W and IoU Bx(num_mask_tokens)."""
        decoded = self._decode(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        return self._masks(decoded), decoded.iou

    def _decode(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        cache: dict | None = None,
    ) -> _Decoded:
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [output_tokens.expand(b, -1, -1), sparse_prompt_embeddings.to(output_tokens.dtype)], dim=1
        )
        model_dtype = tokens.dtype
        tokens = tokens.to(self._token_dtype(tokens, image_embeddings))

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
            src, image_pe, tokens, cache=cache.setdefault("transformer", {}) if shared else None
        )
        iou = self.iou_prediction_head(hs[:, 0, :])
        if tokens.dtype != model_dtype:  # fp32 tokens: the IoU in the model's dtype, as ever
            iou = iou.to(model_dtype)
        return _Decoded(hs, src.expand(b, -1, -1), h, w, iou)

    def _token_dtype(self, tokens: torch.Tensor, image_embeddings: torch.Tensor) -> torch.dtype:
        """The dtype the prompt tokens flow in through the decoder: the model's, except in bf16 CPU
        inference on a few tokens (one or two prompts), where it is fp32 with fp32 copies of the
        token-side weights (``common.fp32_param``), while the image tokens stay bf16.

        oneDNN's bf16 GEMM costs ~50 us a call on a few rows, whatever their size, against ~20 us for
        the same fp32 GEMM (a 7 x 256 x 256 linear), and a one-point prediction makes ~45 token-side
        GEMMs; the image side, thousands of rows, is where bf16 pays. The fp32 tokens round to bf16
        where they meet the image tokens (the folded queries, keys and values), so the token side is
        more precise than in bf16, not less. Calls with more tokens keep bf16 (there the bf16 GEMMs
        are the faster ones: 56 rows, 55 against 82 us)."""
        dtype = tokens.dtype
        if (
            dtype == torch.bfloat16
            and image_embeddings.dtype == dtype
            and tokens.device.type == "cpu"
            and tokens.shape[0] * tokens.shape[1] <= _FP32_TOKEN_ROWS
            and not torch.is_grad_enabled()
            and not _autocast_on("cpu")
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        ):
            return torch.float32
        return dtype

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
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in chosen], dim=1
        )
        if self._upscales_as_gemms():
            return self._masks_from_tokens(src, hyper_in, h, w)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        _, c_up, h_up, w_up = upscaled.shape
        return (hyper_in.to(upscaled.dtype) @ upscaled.view(b, c_up, h_up * w_up)).view(b, -1, h_up, w_up)

    def _upscales_as_gemms(self) -> bool:
        conv1, _, act1, conv2, act2 = self.output_upscaling
        return all(isinstance(a, nn.GELU) and a.approximate == "none" for a in (act1, act2)) and all(
            conv.kernel_size == (2, 2)
            and conv.stride == (2, 2)
            and conv.padding == (0, 0)
            and conv.bias is not None
            for conv in (conv1, conv2)
        )

    def _masks_from_tokens(self, src: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``output_upscaling`` and the hypernetwork product, computed channels-last.

        A 2x2 stride-2 transposed convolution maps each pixel on its own to a 2x2 block: it is a
        linear layer C -> 4C' on the tokens, so the two of them run as GEMMs (the second with its
        GELU fused on the CPU), the LayerNorm runs over contiguous channels, and the only layout
        change is the final B x M x 4h x 4w permutation of the (small) masks.

        CPU inference runs the chain on blocks of at most ``_UPSCALE_TOKENS`` image tokens (one
        prompt of a 64x64 grid at a time): each block's 16x larger intermediates then stay in the
        cache between the GEMMs, the LayerNorm and the GELUs instead of streaming through memory
        (vit_b, 4 prompts x 3 masks, fp32: 28-33 -> 14-15 ms).
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
            # pairs of floats (0.46 ms for 3 masks of 256x256); moving i ahead of x first copies runs
            # of 8 and leaves the caller's copy runs of 2 along contiguous rows (0.11 ms).
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
_FP32_TOKEN_ROWS = 16  # bf16 CPU inference on at most this many prompt tokens runs them in fp32
