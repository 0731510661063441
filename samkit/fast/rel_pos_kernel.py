"""Fused attention with SAM's decomposed relative-position bias, as one Triton kernel (GPU inference).

The image encoder's global layers add ``q·Rh[y_q, y_k] + q·Rw[x_q, x_k]`` to every attention score.
Handing that to ``scaled_dot_product_attention`` as an additive mask materialises an
L x L bias per head (L = 4096 tokens for a 1024 image: 32 MiB per head in bf16) and reads it back,
which makes the global layers memory-bound. Here the two small factors ``rel_h`` (L x gh) and
``rel_w`` (L x gw) go to a flash-attention kernel that adds ``rel_h[i, y_j] + rel_w[i, x_j]`` to each
score tile as it is computed (what segment-anything-fast does), so no bias tensor exists.

:func:`available` says whether the kernel can run (Triton importable and a CUDA tensor, or Triton's
interpreter, ``TRITON_INTERPRET=1``, which runs it on CPU tensors for tests). The encoder uses it for
inference only; training and machines without Triton take the dense-bias path.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["ENABLED", "available", "rel_pos_attention"]

# Set to False to make the encoder use the dense-bias path everywhere (e.g. to compare the two).
ENABLED = True


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        import triton
        import triton.language as tl
    except ImportError:  # pragma: no cover - depends on the installation
        return None
    return triton, tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(q: torch.Tensor) -> bool:
    """Whether :func:`rel_pos_attention` can run on tensors like ``q`` (and is enabled)."""
    if not ENABLED or not (q.device.type == "cuda" or (_interpreting() and q.device.type == "cpu")):
        return False
    return _triton() is not None


@functools.lru_cache(maxsize=1)
def _kernel():
    triton, tl = _triton()  # type: ignore[misc]

    @triton.jit
    def fused_rel_pos_attention(
        Q, K, V, RH, RW, Out,
        sm_scale,
        length, head_dim, grid_w, grid_h,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_M query rows of one (batch, head). Q, K, V, O: (BH, L, D) contiguous;
        # RH: (BH, L, grid_h), RW: (BH, L, grid_w) contiguous, added to the scaled scores as they are.
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < length
        d_ok = offs_d < head_dim
        base = bh * length * head_dim
        q = tl.load(
            Q + base + offs_m[:, None] * head_dim + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        rh_base = RH + bh * length * grid_h + offs_m[:, None] * grid_h
        rw_base = RW + bh * length * grid_w + offs_m[:, None] * grid_w
        for start_n in range(0, length, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < length
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(K + base + offs_n[:, None] * head_dim + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k)) * sm_scale
            tile_ok = row_ok[:, None] & col_ok[None, :]
            bias_h = tl.load(rh_base + (offs_n // grid_w)[None, :], mask=tile_ok, other=0.0)
            bias_w = tl.load(rw_base + (offs_n % grid_w)[None, :], mask=tile_ok, other=0.0)
            s = s + bias_h.to(tl.float32) + bias_w.to(tl.float32)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + base + offs_n[:, None] * head_dim + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(
            Out + base + offs_m[:, None] * head_dim + offs_d[None, :],
            acc.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )

    return triton, fused_rel_pos_attention


@functools.lru_cache(maxsize=1)
def _op():
    """The kernel as a PyTorch operator (registered on first use), so torch.compile keeps it whole."""

    @torch.library.custom_op("samkit::rel_pos_attention", mutates_args=())
    def op(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rel_h: torch.Tensor,
        rel_w: torch.Tensor,
        grid_h: int,
        grid_w: int,
        scale: float,
    ) -> torch.Tensor:
        triton, kernel = _kernel()
        n, length, d = q.shape
        q, k, v = (t.contiguous() for t in (q, k, v))
        rel_h, rel_w = rel_h.contiguous(), rel_w.contiguous()
        out = torch.empty_like(q)
        block_d = max(16, triton.next_power_of_2(d))
        block_m, block_n = (64, 64) if block_d <= 64 else (64, 32)
        launch = (triton.cdiv(length, block_m), n)
        kernel[launch](
            q, k, v, rel_h, rel_w, out,
            scale, length, d, grid_w, grid_h,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
        return out

    @op.register_fake
    def _(q, k, v, rel_h, rel_w, grid_h, grid_w, scale):  # noqa: ANN001, ANN202
        return torch.empty_like(q)

    return op


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    grid: tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """``softmax(q·kᵀ·scale + rel_h[i, y_j] + rel_w[i, x_j]) @ v`` without a bias tensor.

    q, k, v: NxLxD (N = batch x heads, L = gh*gw tokens in row-major order); rel_h: NxLxgh and
    rel_w: NxLxgw (the decomposed bias of each query, unscaled). Returns NxLxD in q's dtype.
    Inference only (no autograd).
    """
    gh, gw = grid
    n, length, d = q.shape
    if length != gh * gw or rel_h.shape != (n, length, gh) or rel_w.shape != (n, length, gw):
        raise ValueError(
            f"rel_pos_attention: q {tuple(q.shape)}, rel_h {tuple(rel_h.shape)}, rel_w {tuple(rel_w.shape)} "
            f"do not fit a {gh}x{gw} grid"
        )
    return _op()(q, k, v, rel_h, rel_w, gh, gw, float(scale))
