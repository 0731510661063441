"""Losses for fine-tuning SAM: focal + dice on the mask logits, MSE on the IoU head.

Conventions: mask logits and targets are ...xHxW (targets 0/1 as bool, uint8 or float); a mask's
pixels are inside where its logit is > 0 (``Sam.mask_threshold``). Every loss is computed in float32
whatever the input dtype (bf16/fp16 logits under autocast are cast), and returns one value per mask;
:func:`sam_loss` reduces over the valid prompts of a batch.

Total = 20 * focal + 1 * dice + 1 * IoU-MSE: the SAM paper's per-pixel sigmoid focal loss, the
seed's V-Net dice and the seed's weighting.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .metrics import mask_iou

# The pixel-wise terms are computed a tile of this many pixels at a time. On a CPU a tile's float32
# temporaries (1 MB each) stay in the cache through the ~20 elementwise passes of focal, dice and
# their gradients: 3-4x faster than streaming whole 1024x1024 masks through memory. On a GPU
# larger tiles (8 masks of 1024x1024, ~32 MB per temporary) keep the kernel launches few; either
# way the temporaries stay bounded whatever the batch.
_TILE_PIXELS = 1 << 18
_TILE_PIXELS_GPU = 1 << 23


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.), averaged over the pixels of each mask.

    Per pixel: -a_t * (1 - p_t)^gamma * log(p_t), with p_t the predicted probability of the target
    class, and a_t = ``alpha`` on positive pixels, 1 - ``alpha`` on negative ones (``alpha`` < 0
    turns the weighting off). logits, targets: ...xHxW. Returns ... (one value per mask).
    """
    x, t = _fp32(logits), _fp32(targets)
    # BCE with logits is -log(p_t) computed without overflow for large |logits|.
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.mean(dim=(-2, -1))


def seed_focal_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The seed's focal form: m = BCE averaged over each mask's pixels, then 0.8 * (1 - exp(-m))^2 * m
    (alpha 0.8 and gamma 2 applied once per mask, no positive/negative balancing). logits, targets:
    ...xHxW. Returns ... (one value per mask)."""
    m = F.binary_cross_entropy_with_logits(_fp32(logits), _fp32(targets), reduction="none").mean(dim=(-2, -1))
    return 0.8 * (1 - torch.exp(-m)) ** 2 * m


FOCAL_FORMS = ("paper", "seed")


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """V-Net dice loss per mask: 1 - 2 * sum(p * g) / (sum(p^2) + sum(g^2) + eps), p = sigmoid(logits).

    logits, targets: ...xHxW. Returns ... (one value per mask).
    """
    x, t = _fp32(logits), _fp32(targets)
    p = torch.sigmoid(x)
    inter = (p * t).sum(dim=(-2, -1))
    return 1 - 2 * inter / ((p * p).sum(dim=(-2, -1)) + (t * t).sum(dim=(-2, -1)) + eps)


def iou_mse_loss(iou_pred: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared error of the IoU head: (iou_pred - IoU(logits > 0, targets))^2 per mask.

    iou_pred: ...; logits, targets: ...xHxW. The IoU target carries no gradient. Returns ... (one value per
    mask).
    """
    with torch.no_grad():
        target_iou = mask_iou(logits > 0, targets)
    return (_fp32(iou_pred) - target_iou) ** 2


def sam_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    *,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    num_valid: Optional[Union[float, torch.Tensor]] = None,
    focal: str = "paper",
) -> dict[str, torch.Tensor]:
    """The box fine-tuning loss of a batch of B images with K prompts each.

    logits: BxKxHxW mask logits at the full padded input frame (1024x1024); iou_pred: BxK;
    targets: BxKxHxW 0/1; valid: BxK bool, False for the padding prompts of images with fewer
    than K objects.

    Each term is reduced as sum(term * valid) / N, N = ``num_valid`` when given, else the number of
    valid prompts (at least 1). In data-parallel training pass the number of valid prompts of the
    whole global batch divided by the world size: gradient averaging across ranks then equals one
    process over the whole batch. A ``num_valid`` <= 0 (no object anywhere) counts as 1; the loss
    is then 0.

    Padding prompts are never read: their logits and IoU predictions may hold anything (NaN
    included) and receive zero gradient. Only the valid masks are processed, a few at a time, and
    the backward pass recomputes what it needs instead of keeping pixel-wise intermediates, so the
    loss adds little memory beyond a gradient the size of ``logits``.

    ``focal`` is the focal term's form: ``"paper"`` (per-pixel, :func:`focal_loss`) or ``"seed"``
    (:func:`seed_focal_loss`).

    Returns ``loss`` (weighted total, differentiable) and the detached terms ``focal``, ``dice``
    and ``iou`` (the same reductions, unweighted), all float32 scalars (float64 for float64 logits).
    """
    if logits.ndim != 4 or targets.shape != logits.shape:
        raise ValueError(
            f"logits and targets must both be BxKxHxW, got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if tuple(iou_pred.shape) != tuple(logits.shape[:2]) or tuple(valid.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"iou_pred and valid must be BxK = {tuple(logits.shape[:2])}, "
            f"got {tuple(iou_pred.shape)} and {tuple(valid.shape)}"
        )
    b, k, h, w = logits.shape
    rows = valid.to(device=logits.device, dtype=torch.bool).reshape(-1).nonzero().squeeze(1)
    # The SAM paper's focal alpha 0.25 and gamma 2 (or the seed's form), the seed's dice eps 1e-5.
    focal, dice, target_iou = _MaskTerms.apply(
        logits.reshape(b * k, h, w), targets.reshape(b * k, h, w), rows, *_focal_args(focal), 1e-5
    )
    iou = (_fp32(iou_pred).reshape(-1)[rows] - target_iou) ** 2

    return _reduce(focal, dice, iou, rows.numel(), num_valid, (focal_weight, dice_weight, iou_weight))


def _reduce(
    focal: torch.Tensor,
    dice: torch.Tensor,
    iou: torch.Tensor,
    count: int,
    num_valid: Optional[Union[float, torch.Tensor]],
    weights: tuple[float, float, float],
) -> dict[str, torch.Tensor]:
    """Per-object terms -> the loss dict: each term summed and divided by ``num_valid`` (``count``,
    at least 1, when None; a ``num_valid`` <= 0 counts as 1), then weighted into ``loss``."""
    device = focal.device
    if num_valid is None:
        n = torch.tensor(max(count, 1), dtype=torch.float32, device=device)
    else:
        n = torch.as_tensor(num_valid, dtype=torch.float32, device=device)
        n = torch.where(n > 0, n, torch.ones_like(n))
    terms = {"focal": focal.sum() / n, "dice": dice.sum() / n, "iou": iou.sum() / n}
    loss = weights[0] * terms["focal"] + weights[1] * terms["dice"] + weights[2] * terms["iou"]
    return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}


def _focal_args(form: str) -> tuple[float, float]:
    """(alpha, gamma) for _MaskTerms; gamma < 0 marks the seed's per-mask form."""
    if form not in FOCAL_FORMS:
        raise ValueError(f"focal must be one of {FOCAL_FORMS}, got {form!r}")
    return (0.25, 2.0) if form == "paper" else (0.8, -1.0)


class _MaskTerms(torch.autograd.Function):
    """Per-mask focal loss, dice loss and IoU target of the masks ``rows`` of MxHxW logits.

    The values are those of :func:`focal_loss`, :func:`dice_loss` and :func:`mask_iou`. Autograd
    through those would keep several float32 copies of every mask for the backward pass; here
    only the inputs (and a few sums per mask) are kept, and both passes work a tile of pixels at a
    time (:func:`_tiles`): each mask's sums are accumulated over its tiles, and the backward
    recomputes sigmoid and BCE per tile. ``gamma`` < 0 selects the seed's focal form
    (:func:`seed_focal_loss`; its alpha 0.8 and gamma 2 are fixed).
    """

    @staticmethod
    def forward(ctx, logits, targets, rows, alpha, gamma, eps):  # type: ignore[override]
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        n, device = rows.numel(), logits.device
        pixels = logits.shape[-2] * logits.shape[-1]
        x_all, t_all = logits.reshape(len(logits), pixels), targets.reshape(len(targets), pixels)
        # Per mask: focal (the paper's, summed) or BCE (the seed's, summed), sum(p t), sum(p^2),
        # sum(t^2); then the exact counts behind the IoU target.
        sums = torch.zeros(4, n, dtype=dtype, device=device)
        counts = torch.zeros(3, n, dtype=torch.int64, device=device)
        for r, sl, c in _tiles(rows, pixels, device):
            x, t = _fp32(x_all[r, c]), _fp32(t_all[r, c])
            p = torch.sigmoid(x)
            ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
            if gamma < 0:
                sums[0, sl] += ce.sum(-1)
            else:
                f = ce * _focal_base(p, t) ** gamma if gamma != 0 else ce
                if alpha >= 0:
                    f = f * _alpha_t(t, alpha)
                sums[0, sl] += f.sum(-1)
            sums[1, sl] += (p * t).sum(-1)
            sums[2, sl] += (p * p).sum(-1)
            sums[3, sl] += (t * t).sum(-1)
            pred, truth = x > 0, _bool(t_all[r, c])
            counts[0, sl] += (pred & truth).sum(-1)
            counts[1, sl] += pred.sum(-1)
            counts[2, sl] += truth.sum(-1)
        if gamma < 0:
            m = sums[0] / pixels
            focal = 0.8 * (1 - torch.exp(-m)) ** 2 * m
        else:
            m = focal = sums[0] / pixels
        s = sums[2] + sums[3] + eps
        dice = 1 - 2 * sums[1] / s
        inter, pred_area, target_area = counts.float()
        iou = (inter / (pred_area + target_area - inter + 1e-7)).to(dtype)  # as mask_iou computes it
        ctx.save_for_backward(logits, targets, rows, sums[1], s, m)
        ctx.alpha, ctx.gamma = alpha, gamma
        ctx.mark_non_differentiable(iou)
        return focal, dice, iou

    @staticmethod
    def backward(ctx, grad_focal, grad_dice, _grad_iou):  # type: ignore[override]
        logits, targets, rows, inter, s, m = ctx.saved_tensors
        alpha, gamma = ctx.alpha, ctx.gamma
        pixels = logits.shape[-2] * logits.shape[-1]
        x_all, t_all = logits.reshape(len(logits), pixels), targets.reshape(len(targets), pixels)
        # Masks outside ``rows`` (padding prompts) get exactly zero, whatever their logits hold.
        grad = torch.empty_like(x_all) if rows.numel() == len(x_all) else torch.zeros_like(x_all)
        # Per mask: the focal gradient's scale, and the dice gradient dd/dx = dp * (a t + b p) with
        # d = 1 - 2I/S, I = sum(p t), S = sum(p^2) + sum(t^2) + eps: a = -2/S, b = 4I/S^2.
        gf = grad_focal / pixels
        if gamma < 0:  # seed: f = 0.8 (1 - e^-m)^2 m with m = mean BCE, and dm/dx = (p - t) / pixels
            e = torch.exp(-m)
            gf = gf * 0.8 * ((1 - e) ** 2 + 2 * (1 - e) * e * m)
        a, b = grad_dice * (-2 / s), grad_dice * (4 * inter / (s * s))
        for r, sl, c in _tiles(rows, pixels, logits.device):
            x, t = _fp32(x_all[r, c]), _fp32(t_all[r, c])
            p = torch.sigmoid(x)
            dp = p * (1 - p)  # d sigmoid / dx
            # Focal: f = a_t * q^gamma * ce with q = 1 - p_t = p + t(1 - 2p), dq/dx = (1 - 2t) dp and
            # dce/dx = p - t, so df/dx = a_t * (q^gamma (p - t) + gamma q^(gamma-1) (1 - 2t) dp ce).
            g = p - t
            if gamma > 0:
                q = _focal_base(p, t)
                # q^(gamma-1) is infinite at q = 0 for gamma < 1; the clamp keeps 0 * inf out.
                q_low = q.clamp_min(1e-12) if gamma < 1 else q
                ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
                g = g * q**gamma + gamma * q_low ** (gamma - 1) * (1 - 2 * t) * dp * ce
            if gamma >= 0 and alpha >= 0:
                g = g * _alpha_t(t, alpha)
            g = g * gf[sl, None] + dp * (a[sl, None] * t + b[sl, None] * p)
            grad[r, c] = g.to(grad.dtype)
        return grad.view_as(logits), None, None, None, None, None


def _focal_base(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """q = 1 - p_t = p + t (1 - 2p): the focal term's base (p_t the probability of the target class)."""
    return p + t * (1 - 2 * p)


def _alpha_t(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha on positive pixels, 1 - alpha on negative ones: (1 - alpha) + (2 alpha - 1) t."""
    return (1 - alpha) + (2 * alpha - 1) * t


def _bool(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.bool else t > 0.5


def upsample_logits(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """Nxhxw low-res logits -> NxSxS float32 at the padded input frame (bilinear), where the losses
    and the seed's mIoU are computed."""
    x = low_res.float() if low_res.dtype != torch.float64 else low_res
    if (
        x.requires_grad
        and x.dtype == torch.float32
        and tuple(x.shape[-2:]) == (size // 4, size // 4)
        and size % 4 == 0
    ):
        return _Upsample4x.apply(x)  # SAM's case: 256 -> 1024
    return F.interpolate(x[:, None], (size, size), mode="bilinear", align_corners=False)[:, 0]


# The adjoint of bilinear 4x upsampling (align_corners=False) along one axis: output row 4j + k
# (k = 0..3) reads input rows j - 1, j, j + 1 (the border rows repeated) with weights 3/8 5/8 0,
# 1/8 7/8 0, 0 7/8 1/8, 0 5/8 3/8, so input row m collects output rows 4m - 2 .. 4m + 5 with these.
_UP4_ADJOINT = (0.125, 0.375, 0.625, 0.875, 0.875, 0.625, 0.375, 0.125)


class _Upsample4x(torch.autograd.Function):
    """Nxhxw float32 -> Nx4hx4w, exactly ``F.interpolate(bilinear, align_corners=False)``; the
    backward is a stride-4 convolution with the separable 8x8 adjoint kernel (the border rows and
    columns fold back onto the edge) instead of the CPU's slow generic upsampling backward (~7x)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        h, w = x.shape[-2:]
        return F.interpolate(x[:, None], (4 * h, 4 * w), mode="bilinear", align_corners=False)[:, 0]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        k = torch.tensor(_UP4_ADJOINT, dtype=grad.dtype, device=grad.device)
        d = F.conv2d(grad[:, None], torch.outer(k, k)[None, None], stride=4, padding=6)[:, 0]
        d[:, 1] += d[:, 0]  # the rows and columns beyond the border are the edge repeated
        d[:, -2] += d[:, -1]
        d[:, :, 1] += d[:, :, 0]
        d[:, :, -2] += d[:, :, -1]
        return d[:, 1:-1, 1:-1]


MULTIMASK_CHOICES = ("min_loss", "best_iou")


def prompt_loss(
    low_res: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    *,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    num_valid: Optional[Union[float, torch.Tensor]] = None,
    multimask_choice: str = "min_loss",
    focal: str = "paper",
) -> dict[str, torch.Tensor]:
    """The loss of one round of prompts: N objects with C candidate masks each.

    low_res: NxCxhxw mask logits (upsampled here to the SxS frame of ``targets``); iou_pred: NxC;
    targets: NxSxS 0/1. With one candidate (C = 1) this is :func:`sam_loss` over the N objects.
    With several (a multimask round), focal and dice are taken from one candidate per object:
    the one with the lowest ``focal_weight * focal + dice_weight * dice`` (``"min_loss"``, the SAM
    paper: only that mask is back-propagated) or the one with the highest predicted IoU
    (``"best_iou"``, the seed). The IoU head is trained on every candidate with ``"min_loss"``
    (its ranking of all three is what the predictor and AMG rely on) and on the chosen one with
    ``"best_iou"`` (the seed returns only that one). Sums are divided by ``num_valid`` as in
    :func:`sam_loss`; ``focal`` is the focal term's form, as there.
    """
    if multimask_choice not in MULTIMASK_CHOICES:
        raise ValueError(f"multimask_choice must be one of {MULTIMASK_CHOICES}, got {multimask_choice!r}")
    if low_res.ndim != 4 or iou_pred.shape != low_res.shape[:2] or len(targets) != len(low_res):
        raise ValueError(
            f"expected low_res NxCxhxw, iou_pred NxC and targets NxSxS, got {tuple(low_res.shape)}, "
            f"{tuple(iou_pred.shape)} and {tuple(targets.shape)}"
        )
    n, c = iou_pred.shape
    size = targets.shape[-1]
    if c == 1:
        logits = upsample_logits(low_res[:, 0], size)
        ones = torch.ones(1, n, dtype=torch.bool, device=low_res.device)
        return sam_loss(
            logits[None], iou_pred.reshape(1, n), targets[None], ones,
            focal_weight=focal_weight, dice_weight=dice_weight, iou_weight=iou_weight, num_valid=num_valid,
            focal=focal,
        )  # fmt: skip
    logits = upsample_logits(low_res.reshape(n * c, *low_res.shape[2:]), size)
    rows = torch.arange(n * c, device=low_res.device)
    focal_args = _focal_args(focal)
    focal, dice, target_iou = _MaskTerms.apply(
        logits, targets.repeat_interleave(c, 0), rows, *focal_args, 1e-5
    )
    focal, dice, target_iou = focal.view(n, c), dice.view(n, c), target_iou.view(n, c)
    iou_sq = (_fp32(iou_pred) - target_iou) ** 2
    if multimask_choice == "min_loss":
        choice = (focal_weight * focal + dice_weight * dice).detach().argmin(dim=1, keepdim=True)
        iou_term = iou_sq.mean(dim=1)
    else:
        choice = iou_pred.detach().argmax(dim=1, keepdim=True)
        iou_term = iou_sq.gather(1, choice)[:, 0]
    focal, dice = focal.gather(1, choice)[:, 0], dice.gather(1, choice)[:, 0]
    return _reduce(focal, dice, iou_term, n, num_valid, (focal_weight, dice_weight, iou_weight))


def _tiles(rows: torch.Tensor, pixels: int, device: torch.device, size: Optional[int] = None):
    """(rows, output slice, pixel slice) tiles covering the masks ``rows`` (M masks of ``pixels``
    pixels each): whole masks together while they are small, else one mask in pixel ranges; about
    :data:`_TILE_PIXELS` (CPU) or :data:`_TILE_PIXELS_GPU` pixels per tile (``size`` when given). ``rows`` is a slice
    when the masks are consecutive (no gather), else an index tensor."""
    if size is None:
        size = _TILE_PIXELS if device.type == "cpu" else _TILE_PIXELS_GPU
    n, pixels = rows.numel(), max(pixels, 1)
    if n == 0:
        return
    first = int(rows[0])
    consecutive = int(rows[-1]) - first + 1 == n
    per = max(1, size // pixels)  # masks per tile
    width = pixels if per > 1 else min(pixels, size)
    for start in range(0, n, per):
        sl = slice(start, min(start + per, n))
        r = slice(first + sl.start, first + sl.stop) if consecutive else rows[sl]
        for col in range(0, pixels, width):
            yield r, sl, slice(col, col + width)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """bool/integer/half inputs as float32; float64 stays float64 (exact gradient checks)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


__all__ = [
    "dice_loss",
    "focal_loss",
    "iou_mse_loss",
    "prompt_loss",
    "sam_loss",
    "seed_focal_loss",
    "upsample_logits",
]
