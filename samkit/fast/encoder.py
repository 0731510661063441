"""Fast implementations of the image encoder's attention, block and MLP (same parameters as
:mod:`samkit.modeling.image_encoder`, swapped in by :func:`samkit.fast.accelerate`).

- Fused linear layers on the CPU (bias and GELU in oneDNN's epilogue, :func:`.ops.linear_fn`).
- Windowed attention without a padded copy of the tokens: padded tokens are zeros after the norm,
  so their q/k/v are the qkv bias, filled in directly.
- Global attention with the relative-position bias built and consumed in blocks (CPU inference), folded
  into the score matmul (CPU bf16 inference), or added inside a Triton flash-attention kernel (GPU
  inference, :mod:`.rel_pos_kernel`).
Training, autograd and torch.compile take the whole-bias path in groups of heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.common import MLPBlock
from ..modeling.image_encoder import Attention, Block, relative_position_table
from . import rel_pos_kernel
from .ops import fused_activation, linear, needs_grad

# Upper bound on the float relative-position bias materialised at once for global attention
# (elements). A 64x64-token image has 4096x4096 scores per head: 64 MiB in fp32. Chunking over
# heads keeps peak memory flat for big models and big batches.
_BIAS_CHUNK_ELEMENTS = 64 * 4096 * 4096 // 4
# Inference builds the bias in blocks of at most this many elements (16 MiB in fp32), one buffer reused.
_BIAS_BLOCK_ELEMENTS = 4 * 1024 * 1024


class FastMLPBlock(MLPBlock):
    """:class:`MLPBlock` with the activation fused into the first linear layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = fused_activation(self.act)
        if act is None:
            return super().forward(x)
        return linear(linear(x, self.lin1, act), self.lin2)


class FastAttention(Attention):
    """:class:`Attention` of the image encoder, with the fast paths described in the module docstring."""

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """q, k, v: NxHeadsxLxD with L = grid[0]*grid[1] (row-major). Returns NxHeadsxLxD."""
        if not self.use_rel_pos:
            return F.scaled_dot_product_attention(q, k, v)
        gh, gw = grid
        n, heads, length, d = q.shape
        rh = relative_position_table(gh, gh, self.rel_pos_h).to(q.dtype)
        rw = relative_position_table(gw, gw, self.rel_pos_w).to(q.dtype)
        # 4-D (1, N*heads, L, D) views: the fused GPU kernels (memory-efficient attention with a
        # bias) only take 4-D inputs; 3-D ones fall back to the unfused math path.
        qf, kf, vf = (t.reshape(1, n * heads, length, d) for t in (q, k, v))
        differentiable = needs_grad(q, rh)
        if not differentiable and q.dtype in (torch.float16, torch.bfloat16) and rel_pos_kernel.available(q):
            # GPU inference with Triton: the bias is added inside a flash-attention kernel.
            grid_q = q.reshape(n * heads, gh, gw, d)
            rel_h = torch.einsum("byxd,ykd->byxk", grid_q, rh).reshape(n * heads, length, gh)
            rel_w = torch.einsum("byxd,xkd->byxk", grid_q, rw).reshape(n * heads, length, gw)
            out = rel_pos_kernel.rel_pos_attention(qf[0], kf[0], vf[0], rel_h, rel_w, grid, self.scale)
            return out.view(n, heads, length, d)
        if differentiable or q.device.type != "cpu" or torch.compiler.is_compiling():
            out = self._attend_head_chunks(qf, kf, vf, rh, rw, grid, differentiable)
            return out.view(n, heads, length, d)
        if q.dtype == torch.bfloat16:
            return self._attend_folded(q, k, v, rh, rw, grid)
        # CPU inference: the bias is built and consumed in blocks of (heads x query rows) written into one
        # reused buffer, instead of one N*heads x L x L tensor (805 MB per global vit_b layer in fp32,
        # whose first touch alone costs more than the attention). Query rows are independent: the
        # result differs from the whole-bias call only by the kernel's rounding (~1e-7 in fp32).
        per_row = gw * length  # bias elements of one query row of one head
        head_chunk = min(n * heads, max(1, _BIAS_BLOCK_ELEMENTS // (gh * per_row)))
        rows = min(gh, max(1, _BIAS_BLOCK_ELEMENTS // (head_chunk * per_row)))
        grid_q = qf.view(n * heads, gh, gw, d)
        rel_h = torch.einsum("byxd,ykd->byxk", grid_q, rh)
        rel_w = torch.einsum("byxd,xkd->byxk", grid_q, rw)
        if head_chunk == n * heads and rows == gh:
            bias = qf.new_empty(n * heads, gh, gw, gh, gw)
            torch.add(rel_h.unsqueeze(-1), rel_w.unsqueeze(-2), out=bias)
            return F.scaled_dot_product_attention(
                qf, kf, vf, attn_mask=bias.view(1, -1, length, length)
            ).view(n, heads, length, d)
        out = torch.empty_like(qf)
        buffer = qf.new_empty(head_chunk * rows * per_row)
        for s in range(0, n * heads, head_chunk):
            e = min(s + head_chunk, n * heads)
            for y in range(0, gh, rows):
                y_end = min(y + rows, gh)
                bias = buffer[: (e - s) * (y_end - y) * per_row].view(e - s, y_end - y, gw, gh, gw)
                torch.add(rel_h[s:e, y:y_end].unsqueeze(-1), rel_w[s:e, y:y_end].unsqueeze(-2), out=bias)
                out[:, s:e, y * gw : y_end * gw] = F.scaled_dot_product_attention(
                    qf[:, s:e, y * gw : y_end * gw],
                    kf[:, s:e],
                    vf[:, s:e],
                    attn_mask=bias.view(1, e - s, (y_end - y) * gw, length),
                )
        return out.view(n, heads, length, d)

    def _attend_folded(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rh: torch.Tensor,
        rw: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """CPU bf16 inference: the relative-position bias folded into the score matmul.

        ``q·k*scale + q·Rh[y_q, y_k] + q·Rw[x_q, x_k]`` is one dot product of widened vectors: each
        query is extended by its gh + gw bias terms, each key by the one-hot codes of its row and
        column. One bf16 matmul (fp32 accumulation) then gives the biased scores without a bias
        tensor, and softmax and the value matmul follow per block of (heads x query rows). On CPUs
        with bf16 matrix units this is about twice as fast as the fused attention kernel with an
        additive bias (which computes in fp32 and is memory-bound on the bias); the scores are
        rounded to bf16 once, so the result differs from the fp32 attention a little more (relative
        error ~0.9% against ~0.6% for the kernel; the decoder's masks agree with fp32 at IoU >= 0.98).
        """
        gh, gw = grid
        n, heads, length, d = q.shape
        nh = n * heads
        grid_q = q.reshape(nh, gh, gw, d)
        rel_h = torch.einsum("byxd,ykd->byxk", grid_q, rh).reshape(nh, length, gh)
        rel_w = torch.einsum("byxd,xkd->byxk", grid_q, rw).reshape(nh, length, gw)
        wide_q = torch.cat([q.reshape(nh, length, d) * self.scale, rel_h, rel_w], dim=-1)
        rows_code = torch.eye(gh, dtype=q.dtype, device=q.device).repeat_interleave(gw, dim=0)
        cols_code = torch.eye(gw, dtype=q.dtype, device=q.device).repeat(gh, 1)
        wide_k = torch.cat(
            [k.reshape(nh, length, d), rows_code.expand(nh, -1, -1), cols_code.expand(nh, -1, -1)], dim=-1
        ).transpose(1, 2)
        values = v.reshape(nh, length, d)
        head_block = min(nh, max(1, _BIAS_BLOCK_ELEMENTS // (length * length)))
        rows = min(length, max(1, _BIAS_BLOCK_ELEMENTS // (head_block * length)))
        if head_block == nh and rows == length:
            out = torch.bmm(torch.softmax(torch.bmm(wide_q, wide_k), dim=-1), values)
            return out.view(n, heads, length, d)
        out = torch.empty_like(values)
        for s in range(0, nh, head_block):
            e = min(s + head_block, nh)
            for r in range(0, length, rows):
                r_end = min(r + rows, length)
                scores = torch.bmm(wide_q[s:e, r:r_end], wide_k[s:e])
                out[s:e, r:r_end] = torch.bmm(torch.softmax(scores, dim=-1), values[s:e])
        return out.view(n, heads, length, d)

    def _attend_head_chunks(
        self,
        qf: torch.Tensor,
        kf: torch.Tensor,
        vf: torch.Tensor,
        rh: torch.Tensor,
        rw: torch.Tensor,
        grid: tuple[int, int],
        differentiable: bool,
    ) -> torch.Tensor:
        """The same attention with the whole bias of a group of heads at once (training, GPU, compile):
        few large kernel launches, and autograd-friendly ops when gradients are needed."""
        gh, gw = grid
        _, nh, length, d = qf.shape
        chunk = max(1, _BIAS_CHUNK_ELEMENTS // (length * length))
        outs = []
        for s in range(0, nh, chunk):
            grid_q = qf[:, s : s + chunk].reshape(-1, gh, gw, d)
            rel_h = torch.einsum("byxd,ykd->byxk", grid_q, rh)
            rel_w = torch.einsum("byxd,xkd->byxk", grid_q, rw)
            if differentiable or torch.compiler.is_compiling():
                bias = rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)
            else:
                # Written straight into a contiguous buffer: a broadcast add may pick a permuted
                # output layout, and the reshape below would then copy the block's largest tensor.
                bias = qf.new_empty(grid_q.shape[0], gh, gw, gh, gw)
                torch.add(rel_h.unsqueeze(-1), rel_w.unsqueeze(-2), out=bias)
            bias = bias.reshape(1, -1, length, length)
            outs.append(
                F.scaled_dot_product_attention(
                    qf[:, s : s + chunk], kf[:, s : s + chunk], vf[:, s : s + chunk], attn_mask=bias
                )
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def forward(self, x: torch.Tensor, window: int = 0) -> torch.Tensor:
        """Attention over x: BxHxWxC, within window x window tiles when ``window`` > 0."""
        if window > 0:
            return self.forward_windowed(x, window)
        b, h, w, _ = x.shape
        qkv = linear(x, self.qkv).view(b, h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.attend(qkv[0], qkv[1], qkv[2], (h, w))
        return linear(out.transpose(1, 2).reshape(b, h, w, -1), self.proj)

    def forward_windowed(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """Attention within non-overlapping window x window tiles of x: BxHxWxC.

        The grid is padded to a multiple of the window. Padded tokens are zeros after the norm, so
        their q/k/v equal the qkv bias: they are filled in directly instead of running the linear
        layer on them, and the output projection runs on real tokens only.
        """
        b, h, w, c = x.shape
        ph, pw = -h % window, -w % window
        if (ph or pw) and type(self.qkv) is not nn.Linear:  # a wrapped layer: run it on the padding too
            qkv = linear(F.pad(x, (0, 0, 0, pw, 0, ph)), self.qkv)
        else:
            qkv = linear(x, self.qkv)
        if (ph or pw) and qkv.shape[1:3] == (h, w):
            fill = self.qkv.bias if self.qkv.bias is not None else qkv.new_zeros(3 * c)
            padded = fill.to(qkv.dtype).expand(b, h + ph, w + pw, 3 * c).clone()
            padded[:, :h, :w] = qkv
            qkv = padded
        hp, wp = h + ph, w + pw
        nh, nw = hp // window, wp // window
        qkv = (
            qkv.view(b, nh, window, nw, window, 3, self.num_heads, self.head_dim)
            .permute(5, 0, 1, 3, 6, 2, 4, 7)
            .reshape(3, b * nh * nw, self.num_heads, window * window, self.head_dim)
        )
        out = self.attend(qkv[0], qkv[1], qkv[2], (window, window))
        out = (
            out.view(b, nh, nw, self.num_heads, window, window, self.head_dim)
            .permute(0, 1, 4, 2, 5, 3, 6)
            .reshape(b, hp, wp, c)
        )
        return linear(out[:, :h, :w], self.proj)


class FastBlock(Block):
    """:class:`Block` whose windowed attention runs on the grid as it is (see ``forward_windowed``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.attn, FastAttention):
            return super().forward(x)
        y = self.norm1(x)
        y = self.attn(y, self.window_size)
        x = x + y
        return x + self.mlp(self.norm2(x))
