"""ViT image encoder (ViTDet style): windowed and global attention with decomposed relative positions,
followed by a convolutional neck that maps to the 256-channel image embedding.

Parameter names follow Meta's release so its checkpoints load with ``strict=True``; the classes and
functions take Meta's arguments with Meta's defaults (``window_partition``, ``get_rel_pos`` and
``add_decomposed_rel_pos`` are the reference forms: the encoder itself fuses them into its attention).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import rel_pos_attention as fused_attention
from .common import LayerNorm2d, MLPBlock, linear

# Upper bound on the float relative-position bias materialised at once for global attention
# (elements). A 64x64-token image has 4096x4096 scores per head: 64 MiB in fp32. Chunking over
# heads keeps peak memory flat for big models and big batches.
_BIAS_CHUNK_ELEMENTS = 64 * 4096 * 4096 // 4
# Inference builds the bias in blocks of at most this many elements (16 MiB in fp32), one buffer reused.
_BIAS_BLOCK_ELEMENTS = 4 * 1024 * 1024


class PatchEmbed(nn.Module):
    """Bx(in_chans)xHxW images -> BxH'xW'x(embed_dim) tokens by one convolution (patches when the
    stride equals the kernel)."""

    def __init__(
        self,
        kernel_size: tuple[int, int] = (16, 16),
        stride: tuple[int, int] = (16, 16),
        padding: tuple[int, int] = (0, 0),
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather the (q_size, k_size, C) table of relative-position embeddings.

    ``rel_pos`` holds one embedding per relative offset (2*max(q,k)-1 rows); a table of another
    length is linearly resized first, as for checkpoints trained at another resolution.
    """
    span = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != span:
        rel_pos = F.interpolate(rel_pos.t()[None].float(), size=span, mode="linear")[0].t().to(rel_pos.dtype)
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    offsets = (q_coords - k_coords) + (k_size - 1) * k_scale
    return rel_pos[offsets.long()]


get_rel_pos = relative_position_table  # Meta's name


def add_decomposed_rel_pos(
    attn: torch.Tensor,
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> torch.Tensor:
    """Attention logits Bx(qh*qw)x(kh*kw) plus the decomposed relative-position bias of the queries
    q: Bx(qh*qw)xC, ``q·Rh[y_q, y_k] + q·Rw[x_q, x_k]`` (MViTv2), as a new tensor."""
    qh, qw = q_size
    kh, kw = k_size
    rh = relative_position_table(qh, kh, rel_pos_h)
    rw = relative_position_table(qw, kw, rel_pos_w)
    grid_q = q.reshape(q.shape[0], qh, qw, -1)
    rel_h = torch.einsum("byxd,ykd->byxk", grid_q, rh)
    rel_w = torch.einsum("byxd,xkd->byxk", grid_q, rw)
    bias = rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)  # B x qh x qw x kh x kw
    return (attn.view(-1, qh, qw, kh, kw) + bias).view(-1, qh * qw, kh * kw)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """BxHxWxC tokens -> (B*windows)x(window)x(window)xC, windows in row-major order, after zero-padding
    H and W up to multiples of ``window_size``; also returns the padded size (Hp, Wp)."""
    b, h, w, c = x.shape
    ph, pw = -h % window_size, -w % window_size
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    tiles = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c).transpose(2, 3)
    return tiles.reshape(-1, window_size, window_size, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """The inverse of :func:`window_partition`: windows -> BxHxWxC with the padding (Hp, Wp) -> (H, W)
    removed."""
    hp, wp = pad_hw
    h, w = hw
    nh, nw = hp // window_size, wp // window_size
    b = windows.shape[0] // (nh * nw)
    x = windows.view(b, nh, nw, window_size, window_size, -1).transpose(2, 3).reshape(b, hp, wp, -1)
    return x[:, :h, :w].contiguous() if hp > h or wp > w else x


class Attention(nn.Module):
    """Multi-head self-attention over a grid of tokens with decomposed relative-position bias.

    The bias ``q·Rh[y_q, y_k] + q·Rw[x_q, x_k]`` is computed from the unscaled queries and handed to
    ``scaled_dot_product_attention`` as an additive mask, so the fused kernel does the softmax.
    ``input_size`` (H, W) sizes the relative-position tables (required with ``use_rel_pos``); they
    start at zero, or from a truncated normal (std 0.02, as in ViTDet) with ``rel_pos_zero_init=False``
    (Meta's accepts that flag but always starts at zero).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos is True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

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
        differentiable = torch.is_grad_enabled() and (q.requires_grad or rh.requires_grad)
        if not differentiable and q.dtype in (torch.float16, torch.bfloat16) and fused_attention.available(q):
            # GPU inference with Triton: the bias is added inside a flash-attention kernel.
            grid_q = q.reshape(n * heads, gh, gw, d)
            rel_h = torch.einsum("byxd,ykd->byxk", grid_q, rh).reshape(n * heads, length, gh)
            rel_w = torch.einsum("byxd,xkd->byxk", grid_q, rw).reshape(n * heads, length, gw)
            out = fused_attention.rel_pos_attention(qf[0], kf[0], vf[0], rel_h, rel_w, grid, self.scale)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Global attention over x: BxHxWxC."""
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
        qkv = linear(x, self.qkv)
        if ph or pw:
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


class Block(nn.Module):
    """Pre-norm transformer block over BxHxWxC tokens; ``window_size`` 0 means global attention.

    ``norm_layer(dim)`` builds the two norms (SAM passes LayerNorm with eps 1e-6) and ``act_layer`` is
    the MLP's activation; ``input_size`` (H, W) sizes a global block's relative-position tables.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        attn_size = (window_size, window_size) if window_size > 0 else input_size
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=attn_size,
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        y = self.attn.forward_windowed(y, self.window_size) if self.window_size > 0 else self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """Bx(in_chans)xSxS normalised, padded images -> Bx(out_chans)x(S/patch)x(S/patch) embeddings.

    Meta's arguments and defaults (global attention in every block, no relative positions); the SAM
    sizes in ``samkit.build`` pass window 14, relative positions, global blocks at
    ``global_attn_indexes`` and ``norm_layer=partial(nn.LayerNorm, eps=1e-6)``.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        global_attn_indexes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(
            kernel_size=(patch_size, patch_size),
            stride=(patch_size, patch_size),
            in_chans=in_chans,
            embed_dim=embed_dim,
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim)) if use_abs_pos else None
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                rel_pos_zero_init=rel_pos_zero_init,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The patch embedding is a permuted (channels-last view of a channels-first) tensor: made
        # contiguous once here, or every residual add and norm of every block runs on strided memory.
        x = self.patch_embed(x).contiguous()
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


def count_encoder_flops(encoder: ImageEncoderViT) -> float:
    """Multiply-adds x2 of one forward pass (linear layers and attention; norms ignored)."""
    grid = encoder.img_size // encoder.patch_embed.proj.stride[0]
    tokens = grid * grid
    dim = encoder.patch_embed.proj.out_channels
    flops = 2.0 * tokens * dim * 3 * encoder.patch_embed.proj.kernel_size[0] ** 2
    for blk in encoder.blocks:
        hidden = blk.mlp.lin1.out_features
        flops += 2.0 * tokens * dim * (3 * dim + dim + 2 * hidden)
        win = blk.window_size
        length = win * win if win else tokens
        n_windows = math.ceil(grid / win) ** 2 if win else 1
        flops += 2.0 * 2 * n_windows * length * length * dim
    out = encoder.neck[0].out_channels
    flops += 2.0 * tokens * (dim * out + out * out * 9)
    return flops
