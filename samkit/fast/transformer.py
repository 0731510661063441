"""Fast implementations of the decoder's two-way transformer (same parameters as
:mod:`samkit.modeling.transformer`, swapped in by :func:`samkit.fast.accelerate`).

- Between a few prompt tokens and thousands of image tokens the image side is never projected per
  prompt: the projections are folded into the few tokens (same function, about half the multiply-adds).
- A shared image (batch 1, no mask prompts) is projected once for all prompts, and once for every
  chunk of prompts of one call (``cache``).
- Per-prompt image tokens are written to reused buffers in CPU inference (``_Workspace``).
- bf16 CPU inference on a few prompt tokens can run the token side in fp32 (``fp32``: a
  :class:`~.session.DecoderSession` that holds fp32 copies of the token-side weights).
Attention modules whose projections are not plain ``nn.Linear`` (an adapter-wrapped layer) run the
reference code, which calls them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from .ops import autocast_on as _autocast_on
from .ops import flush_subnormal_probs, linear, linear_fn, plain
from .session import DecoderSession


class FastAttention(Attention):
    """:class:`Attention` with folded projections and shared image work."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        reuse_residual: bool = False,
        kv_cache: dict | None = None,
        q_pe: torch.Tensor | None = None,
        k_pe: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        fp32: DecoderSession | None = None,
    ) -> torch.Tensor:
        """q: BxNqxC, k and v: BxNkxC -> BxNqxC, plus ``residual`` (BxNqxC or 1xNqxC) when given.
        ``q_pe`` / ``k_pe`` (1xNxC): the queries / keys are ``q + q_pe`` / ``k + k_pe`` (see
        ``pe_apart``); the sum is then never formed where the folded path can take the PE's part
        as one GEMM for all prompts.
        A batch of 1 broadcasts against B. ``reuse_residual``: the caller no longer needs
        ``residual``, so in inference its memory may hold the result (one B x Nq x C pass less).
        ``kv_cache``: a dict that holds this k and v's projections across calls with the same k and v
        (the decoder's chunks of prompts on one image); empty at first. ``out``: a BxNqxC tensor the
        result may be written to (inference with a shared residual; see ``_Workspace``). ``fp32``: the
        prompt tokens are fp32 and the layers 16-bit: their weights come from these fp32 copies (the
        image tokens stay 16-bit).

        Between a few prompt tokens and thousands of image tokens the image side is never projected
        per prompt: the projections are folded into the few tokens instead (same function, about half
        the multiply-adds of the decoder). A shared (batch 1) image is projected once for all prompts.
        """
        bq, bk = q.shape[0], k.shape[0]
        if not plain(self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            q = q if q_pe is None else q + q_pe
            k = k if k_pe is None else k + k_pe
            out = super().forward(q, k, v)
            return out if residual is None else residual + out
        # Folding pays when heads x (the short side) is below the projection width.
        folds = self.num_heads * min(q.shape[1], k.shape[1]) < self.internal_dim and v.shape[0] == bk
        if folds and k.shape[1] > q.shape[1] and bk == bq and q_pe is None:
            return self._few_queries(q, k, v, residual, k_pe, fp32)
        if folds and q.shape[1] > k.shape[1] and bq in (1, bk) and k_pe is None:
            return self._many_queries(q, k, v, residual, reuse_residual, q_pe, out, fp32)
        q = q if q_pe is None else q + q_pe
        k = k if k_pe is None else k + k_pe
        if fp32 is not None and not q.dtype == k.dtype == v.dtype == torch.float32:
            # fp32 tokens against 16-bit image tokens without folding (many tokens): in 16 bits.
            low = self.q_proj.weight.dtype
            q, k, v, fp32 = q.to(low), k.to(low), v.to(low), None
        # q before k and v, as always: the order the graph is built in fixes the order in which
        # autograd sums the gradients of a tensor used twice (self-attention's q and k), so it is
        # part of what makes training reproducible.
        qh = self._heads(token_linear(q, self.q_proj, fp32))
        if kv_cache is not None and "kv" in kv_cache:
            kh, vh = kv_cache["kv"]
        else:
            kh, vh = (
                self._heads(token_linear(k, self.k_proj, fp32)),
                self._heads(token_linear(v, self.v_proj, fp32)),
            )
            if kv_cache is not None:
                kv_cache["kv"] = kh, vh
        bv = vh.shape[0]
        if bq > 1 and bk == 1 and bv == 1:
            # Many prompts' tokens attend to the same image: one attention over all their queries.
            heads, nq, d = qh.shape[1:]
            out = F.scaled_dot_product_attention(qh.transpose(0, 1).reshape(1, heads, bq * nq, d), kh, vh)
            out = out.view(heads, bq, nq, d).transpose(0, 1)
        else:
            b = max(bq, bk, bv)
            qh, kh, vh = (t.expand(b, -1, -1, -1) if t.shape[0] != b else t for t in (qh, kh, vh))
            out = F.scaled_dot_product_attention(qh, kh, vh)
        b, _, n, _ = out.shape
        out = token_linear(out.transpose(1, 2).reshape(b, n, self.internal_dim), self.out_proj, fp32)
        return out if residual is None else residual + out

    def _per_head(
        self, layer: nn.Linear, fp32: DecoderSession | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A projection's weight as heads x head_dim x C and bias as heads x head_dim (fp32 copies
        from ``fp32`` when given)."""
        d = self.internal_dim // self.num_heads
        weight, bias = (layer.weight, layer.bias) if fp32 is None else fp32.weights(layer)
        return weight.view(self.num_heads, d, -1), bias.view(self.num_heads, d)

    def _few_queries(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        residual: torch.Tensor | None = None,
        k_pe: torch.Tensor | None = None,
        fp32: DecoderSession | None = None,
    ) -> torch.Tensor:
        """Few tokens attend to many per-prompt image tokens, without projecting the image tokens.

        q·(W_k x + b_k) = (W_k^T q)·x + q·b_k, where q·b_k is the same for every key of a query: the
        softmax does not see it. Since attention rows sum to one, attn @ (W_v x + b_v) = W_v (attn @ x) + b_v.
        In inference the scale rides in the few folded queries: no pass over the B x (h Nq) x Nk scores
        but the softmax.
        """
        b, nk, c = k.shape
        heads, d = self.num_heads, self.internal_dim // self.num_heads
        qh = self._heads(token_linear(q, self.q_proj, fp32)).expand(b, -1, -1, -1)  # B x h x Nq x d
        wk, bk = self._per_head(self.k_proj, fp32)
        wv, bv = self._per_head(self.v_proj, fp32)
        if k_pe is not None and (torch.is_grad_enabled() or _autocast_on(q.device.type)):
            k, k_pe = k + k_pe, None
        if torch.is_grad_enabled() or _autocast_on(q.device.type):
            # Training keeps q·b_k: its gradient is zero, but DDP waits for one for every parameter.
            # Autocast too: its bf16 bmm rounds by batch size, the baddbmm does not (chunks equal
            # one batch).
            q_folded = torch.einsum("bhqd,hdc->bhqc", qh, wk).reshape(b, -1, c)
            q_bias = torch.einsum("bhqd,hd->bhq", qh, bk).reshape(b, -1, 1)
            scores = torch.baddbmm(q_bias, q_folded, k.transpose(1, 2)) * d**-0.5
        else:
            q_folded = torch.einsum("bhqd,hdc->bhqc", qh * d**-0.5, wk).reshape(b, -1, c)  # B x (h Nq) x C
            q_folded = q_folded.to(k.dtype)  # (fp32 tokens meet the 16-bit image tokens here)
            if k_pe is None:
                scores = torch.bmm(q_folded, k.transpose(1, 2))  # B x (h Nq) x Nk
            else:  # the PE's part: one GEMM for all prompts
                pe_scores = (q_folded.reshape(-1, c) @ k_pe[0].t()).view(b, -1, nk)
                scores = torch.baddbmm(pe_scores, q_folded, k.transpose(1, 2))
        if scores.dtype == v.dtype == torch.bfloat16 and not torch.is_grad_enabled():
            # bf16 inference: one kernel that computes in fp32 and rounds once, bit for bit the fp32
            # softmax and cast below, and faster (BENCHMARKS.md has the decoder's figures).
            attn = scores.softmax(dim=-1)
        else:
            attn = scores.softmax(dim=-1, dtype=torch.float32)
            # Inference only (training keeps its exact computation); 16-bit GEMMs treat subnormal
            # inputs as zero themselves.
            if v.dtype == torch.float32 and not torch.is_grad_enabled():
                attn = flush_subnormal_probs(attn)
            attn = attn.to(v.dtype)
        pooled = (attn @ v).view(b, heads, -1, c)  # B x h x Nq x C
        if fp32 is not None:
            pooled = pooled.float()  # back to the fp32 tokens
        out = torch.einsum("bhqc,hdc->bhqd", pooled, wv) + bv[None, :, None, :]
        nq = out.shape[2]
        out = token_linear(out.transpose(1, 2).reshape(b, nq, self.internal_dim), self.out_proj, fp32)
        return out if residual is None else residual + out

    def _many_queries(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        residual: torch.Tensor | None = None,
        reuse_residual: bool = False,
        q_pe: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        fp32: DecoderSession | None = None,
    ) -> torch.Tensor:
        """Many image tokens (shared, batch 1, or per prompt) attend to each prompt's few tokens.

        (W_q x + b_q)·k = x·(W_q^T k) + b_q·k, and out_proj(concat_h attn_h @ v_h) is
        sum_h attn_h @ (v_h W_o,h^T) + b_o: the image side only meets the few folded tokens.
        The residual enters the final GEMM as its accumulator, so the B x Nq x C result is written
        once; in inference also in place of a per-prompt residual the caller gives up, with b_o riding
        in the folded values (each head's attention row sums to one, so adding b_o / heads to every
        folded value adds b_o to every output).
        """
        b, nk, c = k.shape
        heads, d = self.num_heads, self.internal_dim // self.num_heads
        kh = self._heads(token_linear(k, self.k_proj, fp32))  # B x h x Nk x d
        vh = self._heads(token_linear(v, self.v_proj, fp32))
        wq, bq = self._per_head(self.q_proj, fp32)
        k_folded = torch.einsum("bhkd,hdc->bhkc", kh, wq).reshape(b, heads * nk, c)
        k_bias = torch.einsum("bhkd,hd->bhk", kh, bq).reshape(b, 1, heads * nk)
        wo = self.out_proj.weight if fp32 is None else fp32.fp32(self.out_proj.weight)
        v_folded = torch.einsum("bhkd,chd->bhkc", vh, wo.view(c, heads, d)).reshape(b, heads * nk, c)
        nq = q.shape[1]
        image_major = _autocast_on(q.device.type)
        attn_dtype = v.dtype
        if fp32 is not None:  # fp32 tokens: the image side runs in the image tokens' dtype
            k_folded, k_bias, v_folded = (t.to(q.dtype) for t in (k_folded, k_bias, v_folded))
            attn_dtype = q.dtype
        if q_pe is not None and (image_major or q.shape[0] == 1):
            q, q_pe = q + q_pe, None
        if image_major:
            attn = self._image_major_attention(q, k_folded, k_bias).to(attn_dtype)
        elif q_pe is not None:  # per-prompt image tokens plus the shared PE's part, one GEMM for all
            pe_scores = torch.addmm(k_bias.view(-1, 1), k_folded.reshape(-1, c), q_pe[0].t())
            scores = torch.baddbmm(pe_scores.view(b, -1, nq), k_folded, q.transpose(1, 2))
            attn = _softmax_keys(scores.view(b, heads, nk, nq), d**-0.5).to(attn_dtype)
            attn = attn.view(b, heads * nk, nq).transpose(1, 2)
        else:
            # Scores key-major, B x (h Nk) x Nq: each head's softmax over its Nk keys then runs over
            # rows of Nq contiguous image tokens (vectorized), not over runs of Nk (~7) floats.
            if q.shape[0] == 1 and b > 1:
                # One image for all prompts: a single GEMM against every prompt's folded tokens.
                scores = torch.addmm(k_bias.view(-1, 1), k_folded.reshape(-1, c), q[0].t())
            else:
                scores = torch.baddbmm(k_bias.view(b, -1, 1), k_folded, q.expand(b, -1, -1).transpose(1, 2))
            attn = _softmax_keys(scores.view(b, heads, nk, nq), d**-0.5).to(attn_dtype)
            attn = attn.view(b, heads * nk, nq).transpose(1, 2)  # B x Nq x (h Nk)
        if residual is None:
            return torch.baddbmm(self.out_proj.bias.view(1, 1, c), attn, v_folded)
        if torch.is_grad_enabled():  # training: the plain sum (no in-place ops on the graph's tensors)
            return torch.baddbmm(residual + self.out_proj.bias, attn, v_folded)
        v_folded = v_folded + self.out_proj.bias / heads
        # In place only where out-of-place would give the same result: equal dtypes, no autocast
        # (which would run the out-of-place product in low precision).
        same_dtype = residual.dtype == attn.dtype == v_folded.dtype
        if (
            reuse_residual
            and same_dtype
            and residual.shape[0] == b
            and not _autocast_on(residual.device.type)
        ):
            return residual.baddbmm_(attn, v_folded)
        if out is not None and same_dtype and not _autocast_on(residual.device.type):
            return torch.baddbmm(residual, attn, v_folded, out=out[:b])
        return torch.baddbmm(residual, attn, v_folded)

    def _image_major_attention(
        self, q: torch.Tensor, k_folded: torch.Tensor, k_bias: torch.Tensor
    ) -> torch.Tensor:
        """``_many_queries``' attention B x Nq x (h Nk) with image-major scores, under autocast (there
        the GEMMs run in bf16, and oneDNN rounds a bf16 product by the shape of its operands; in this
        layout chunks of prompts give one batch's result)."""
        b, hk, c = k_folded.shape
        heads, d = self.num_heads, self.internal_dim // self.num_heads
        if q.shape[0] == 1 and b > 1:
            scores = (q[0] @ k_folded.reshape(-1, c).t()).view(-1, b, hk).transpose(0, 1)
        else:
            scores = q.expand(b, -1, -1) @ k_folded.transpose(1, 2)
        scores = (scores + k_bias.view(b, 1, hk)) * d**-0.5  # B x Nq x (h Nk)
        nq = scores.shape[1]
        # The softmax runs key-major (each head's Nk keys over rows of Nq contiguous image tokens): over
        # runs of Nk (~7) floats the CPU's softmax costs far more than the copy this costs.
        x = scores.view(b, nq, heads, hk // heads).permute(0, 2, 3, 1).contiguous()
        return _softmax_keys(x, 1.0).view(b, hk, nq).transpose(1, 2)


def token_linear(
    x: torch.Tensor, layer: nn.Module, fp32: DecoderSession | None, activation: str = "none"
) -> torch.Tensor:
    """``activation(layer(x))``; with ``fp32``, x is fp32 and the (plain) layer's weights are taken as
    fp32 copies."""
    if fp32 is None:
        return linear(x, layer, activation)
    weight, bias = fp32.weights(layer)
    return linear_fn(x, weight, bias, activation)


def token_norm(x: torch.Tensor, norm: nn.Module, fp32: DecoderSession | None) -> torch.Tensor:
    """``norm(x)`` on prompt tokens; with ``fp32``, on fp32 tokens with fp32 copies of its weights."""
    if fp32 is None:
        return norm(x)
    weight, bias = fp32.weights(norm)
    return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


def token_mlp(x: torch.Tensor, mlp: nn.Module, fp32: DecoderSession | None) -> torch.Tensor:
    """``mlp(x)`` (an MLPBlock) on prompt tokens; with ``fp32``, as :func:`token_norm`."""
    if fp32 is None:
        return mlp(x)
    return token_linear(mlp.act(token_linear(x, mlp.lin1, fp32)), mlp.lin2, fp32)


def pe_apart(keys: torch.Tensor, key_pe: torch.Tensor) -> bool:
    """Whether attention on ``keys + key_pe`` takes the PE's part apart (``q_pe`` / ``k_pe``):
    in 16-bit CPU inference on per-prompt image tokens. There the element-wise sum of B x HW x C
    tokens costs more than one GEMM of every prompt's few folded tokens against the shared PE; in
    fp32 it does not pay."""
    return (
        keys.shape[0] > 1
        and key_pe.shape[0] == 1
        and keys.dtype in (torch.bfloat16, torch.float16)
        and keys.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not _autocast_on(keys.device.type)
    )


class _Workspace:
    """The B x HW x C buffers that per-prompt image tokens are written to in one decoder call's CPU
    inference, reused by every chunk of prompts (the sums with the PE and the first residual sum;
    the layer norms then run in place, see ``_norm``).

    Each chunk otherwise allocates five such tensors (16 MiB for 4 prompts in fp32) and frees them;
    glibc's default allocator hands the freed top of its heap back to the system and the next chunk
    faults every page in again. With the allocator tuned (``samkit.commands.allocator``) freed memory
    is reused as it is, and ``accelerate(..., tuned_allocator=True)`` turns the workspace off. A result is written
    to a buffer that holds none of the tensors still in use; the chunk's final image tokens stay in
    theirs until the next chunk starts, so a caller finishes with one chunk's outputs (the masks are
    computed from them) before asking for the next.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []

    def buffer(self, like: torch.Tensor, batch: int, *live: torch.Tensor) -> torch.Tensor:
        """A ``batch`` x like.shape[1:] tensor of ``like``'s dtype and device sharing no memory with ``live``."""
        taken = {t.untyped_storage().data_ptr() for t in live}
        for buf in self._buffers:
            if (
                buf.shape[0] >= batch
                and buf.shape[1:] == like.shape[1:]
                and buf.dtype == like.dtype
                and buf.device == like.device
                and buf.untyped_storage().data_ptr() not in taken
            ):
                return buf[:batch]
        buf = like.new_empty((batch, *like.shape[1:]))
        self._buffers.append(buf)
        return buf


def _add(keys: torch.Tensor, key_pe: torch.Tensor, work: _Workspace | None) -> torch.Tensor:
    """``keys + key_pe``, into a workspace buffer when there is one."""
    if work is None or keys.dtype != key_pe.dtype:
        return keys + key_pe
    return torch.add(keys, key_pe, out=work.buffer(keys, keys.shape[0], keys))


def _norm(x: torch.Tensor, norm: nn.LayerNorm, work: _Workspace | None) -> torch.Tensor:
    """``norm(x)``; with a workspace in place, over blocks of rows: each block's result is copied
    back while it is in the cache (no kernel writes a layer norm into a given tensor, and a new
    B x HW x C result would be a fresh allocation per chunk). Same kernel, same values."""
    if work is None or not x.is_contiguous() or type(norm) is not nn.LayerNorm:
        return norm(x)
    flat = x.view(-1, x.shape[-1])
    for r0 in range(0, flat.shape[0], _NORM_ROWS):
        block = flat[r0 : r0 + _NORM_ROWS]
        block.copy_(F.layer_norm(block, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
    return x


_NORM_ROWS = 1024  # rows per block of _norm's in-place layer norm (1 MiB of vit_b's tokens in fp32)


def _softmax_keys(x: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(x * scale) over dim 2 (a few keys) of B x h x Nk x Nq scores, in fp32 (in place
    where nothing needs its gradient)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return (x.float() * scale if scale != 1.0 else x.float()).softmax(dim=2)
    if scale == 1.0:
        x = x.float() if x.dtype != torch.float32 else x
    else:
        x = x.float().mul_(scale) if x.dtype == torch.float32 else x.float() * scale
    e = x.sub_(x.amax(dim=2, keepdim=True)).exp_()
    return e.div_(e.sum(dim=2, keepdim=True))


class FastTwoWayAttentionBlock(TwoWayAttentionBlock):
    """:class:`TwoWayAttentionBlock` with the image side's sums and projections shared and reused."""

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        *,
        own_keys: bool = False,
        cache: dict | None = None,
        work: _Workspace | None = None,
        fp32: DecoderSession | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``own_keys``: ``keys`` is the previous block's output, free to be overwritten in inference.
        ``cache``: a dict kept across calls on the same image (chunks of prompts): with one image
        for all prompts (keys of batch 1) the image side's sums and projections are computed once.
        ``work``: where per-prompt image tokens are written (CPU inference on chunks of prompts).
        ``fp32``: fp32 prompt tokens with 16-bit layers (see :class:`FastAttention`)."""
        attentions = (self.self_attn, self.cross_attn_token_to_image, self.cross_attn_image_to_token)
        if not all(isinstance(a, FastAttention) for a in attentions):
            return super().forward(queries, keys, query_pe, key_pe)
        if self.skip_first_layer_pe:
            # The first layer's tokens already are the prompt embeddings: no residual, no PE.
            queries = self.self_attn(queries, queries, queries, fp32=fp32)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, fp32=fp32)
        queries = token_norm(queries, self.norm1, fp32)

        if pe_apart(keys, key_pe):
            # 16-bit per-prompt image tokens: the PE's part of the attention as GEMMs, no sum.
            attn = self.cross_attn_token_to_image(queries + query_pe, keys, keys, k_pe=key_pe, fp32=fp32)
            queries = token_norm(queries + attn, self.norm2, fp32)
            queries = token_norm(queries + token_mlp(queries, self.mlp, fp32), self.norm3, fp32)
            attn = self.cross_attn_image_to_token(
                keys,
                queries + query_pe,
                queries,
                residual=keys,
                reuse_residual=own_keys,
                q_pe=key_pe,
                fp32=fp32,
            )
            return queries, _norm(attn, self.norm4, work)
        if cache is None or keys.shape[0] != 1:
            cache = None
            keys_pe = _add(keys, key_pe, work)
        elif "keys_pe" in cache:
            keys_pe = cache["keys_pe"]
        else:
            keys_pe = cache["keys_pe"] = keys + key_pe
        attn = self.cross_attn_token_to_image(queries + query_pe, keys_pe, keys, kv_cache=cache, fp32=fp32)
        queries = token_norm(queries + attn, self.norm2, fp32)
        queries = token_norm(queries + token_mlp(queries, self.mlp, fp32), self.norm3, fp32)
        # A shared (batch 1) residual: the per-prompt sum goes to a workspace buffer.
        b = queries.shape[0]
        out = work.buffer(keys, b, keys, keys_pe) if work is not None and keys.shape[0] == 1 < b else None
        attn = self.cross_attn_image_to_token(
            keys_pe, queries + query_pe, queries, residual=keys, reuse_residual=own_keys, out=out, fp32=fp32
        )
        return queries, _norm(attn, self.norm4, work)


class FastTwoWayTransformer(TwoWayTransformer):
    """:class:`TwoWayTransformer` that keeps a shared image's work across chunks of prompts (``cache``).
    ``reuse_buffers``: write per-prompt image tokens to reused buffers in CPU inference (set by
    :func:`samkit.fast.accelerate`; pays under glibc's default allocator)."""

    reuse_buffers: bool = True

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        *,
        cache: dict | None = None,
        fp32: DecoderSession | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding, image_pe: BxCxHxW; point_embedding: BxNxC.

        Returns the processed tokens BxNxC and image tokens Bx(HW)xC. ``cache``: a dict to pass
        again with the same image and PE (chunks of prompts on one image) so that the work on the
        shared image is done once; empty at first. ``fp32``: the prompt tokens are fp32 and the layers
        16-bit (see :class:`FastAttention`).
        """
        if not all(isinstance(layer, FastTwoWayAttentionBlock) for layer in self.layers) or not isinstance(
            self.final_attn_token_to_image, FastAttention
        ):
            hs, keys = super().forward(image_embedding, image_pe, point_embedding)
            return hs, keys
        # Token-major and contiguous: every element-wise pass over the image tokens (residuals,
        # layer norms) then reads and writes them in order.
        if cache is not None and "keys" in cache:
            keys, key_pe = cache["keys"], cache["key_pe"]
        else:
            keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
            key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
            if cache is not None:
                cache["keys"], cache["key_pe"] = keys, key_pe
        queries = point_embedding
        work = None
        if (
            cache is not None
            and self.reuse_buffers
            and queries.shape[0] > 1
            and keys.device.type == "cpu"
            and not torch.is_grad_enabled()
            and not _autocast_on("cpu")
        ):
            work = cache.setdefault("workspace", _Workspace())
        for i, layer in enumerate(self.layers):
            # Only the first layer's keys are the shared image: later layers' are each chunk's own
            # (a chunk of one prompt has keys of batch 1 too, and must not meet the previous chunk's).
            layer_cache = None if cache is None or i > 0 else cache.setdefault(i, {})
            queries, keys = layer(
                queries,
                keys,
                point_embedding,
                key_pe,
                own_keys=i > 0,
                cache=layer_cache,
                work=work,
                fp32=fp32,
            )
        final = self.final_attn_token_to_image
        if pe_apart(keys, key_pe):
            attn = final(queries + point_embedding, keys, keys, k_pe=key_pe, fp32=fp32)
        else:
            attn = final(queries + point_embedding, _add(keys, key_pe, work), keys, fp32=fp32)
        return token_norm(queries + attn, self.norm_final_attn, fp32), keys
