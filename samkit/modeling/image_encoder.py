"""ViT image encoder (ViTDet style): windowed and global attention with decomposed relative positions,
followed by a convolutional neck that maps to the 256-channel image embedding.

Parameter names follow Meta's release so its checkpoints load with ``strict=True``; the classes and
functions take Meta's arguments with Meta's defaults. This is the reference computation; the faster
implementations of the same modules live in :mod:`samkit.fast`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock


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


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> torch.Tensor:
    """The decomposed relative-position bias ``q·Rh[y_q, y_k] + q·Rw[x_q, x_k]`` (MViTv2) of the
    queries q: Bx(qh*qw)xC, as Bx(qh*qw)x(kh*kw)."""
    qh, qw = q_size
    kh, kw = k_size
    rh = relative_position_table(qh, kh, rel_pos_h)
    rw = relative_position_table(qw, kw, rel_pos_w)
    grid_q = q.reshape(q.shape[0], qh, qw, -1)
    rel_h = torch.einsum("byxd,ykd->byxk", grid_q, rh)
    rel_w = torch.einsum("byxd,xkd->byxk", grid_q, rw)
    return (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).reshape(q.shape[0], qh * qw, kh * kw)


def add_decomposed_rel_pos(
    attn: torch.Tensor,
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> torch.Tensor:
    """Attention logits Bx(qh*qw)x(kh*kw) plus :func:`decomposed_rel_pos_bias` (Meta's function)."""
    return attn + decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, q_size, k_size)


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
    ``scaled_dot_product_attention`` as an additive mask. ``input_size`` (H, W) sizes the
    relative-position tables (required with ``use_rel_pos``); they start at zero, or from a truncated
    normal (std 0.02, as in ViTDet) with ``rel_pos_zero_init=False`` (Meta's accepts that flag but
    always starts at zero).
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over all tokens of x: BxHxWxC -> BxHxWxC."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B x heads x L x d
        bias = None
        if self.use_rel_pos:
            flat_q = q.reshape(b * self.num_heads, h * w, self.head_dim)
            bias = decomposed_rel_pos_bias(flat_q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            bias = bias.view(b, self.num_heads, h * w, h * w).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


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
        """x: BxHxWxC tokens."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, pad_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
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
