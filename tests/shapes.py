"""Generated shape images and a tiny SAM trained on them: a test model whose masks depend on the prompt.

A randomly initialised SAM gives roughly one blob wherever it is prompted, so the automatic mask
generator's NMS, crops and small-region cleanup have nothing to do. ``train_tiny_shapes_model``
trains the ``vit_tiny`` configuration (2-block 64-wide encoder, the real mask decoder) for a fixed
number of steps on ``make_shapes_image`` pictures with one-point prompts, so that a point inside a
shape gives that shape's mask and the IoU head scores it. The trained weights are cached on disk,
keyed by the seed, the step count, this file's source and the torch version.
"""

from __future__ import annotations

import colorsys
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from skimage import draw

from samkit import build_model
from samkit.modeling import Sam
from samkit.utils.transforms import ResizeLongestSide

# Steps of train_tiny_shapes_model. WORK IN PROGRESS: not yet used by any test; the step count and the
# masks it reaches are not yet measured (see the closing note of session 1, issue 3).
TRAIN_STEPS = 40
PROMPTS_PER_IMAGE = 8
# Share of prompts put on the background (whose target is everything that is not a shape).
BACKGROUND_PROMPTS = 0.15
FRAME = 1024  # the encoder's input frame
LOW_RES = 256  # the decoder's mask frame


# ---------------------------------------------------------------------------------------------------
# Images


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A greyish texture: a smooth gradient between two dull colours, blotches and pixel noise."""
    a, b = (
        np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.25, 0.75))) * 255
        for _ in range(2)
    )
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h) / 2 + 0.5
    image = a + (b - a) * t[..., None]
    coarse = rng.normal(0, 1, (h // 32 + 2, w // 32 + 2, 1))
    blotches = torch.nn.functional.interpolate(
        torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(h, w), mode="bicubic", align_corners=False
    )[0, 0].numpy()
    image = image + rng.uniform(6, 14) * blotches[..., None]
    return image + rng.normal(0, rng.uniform(6, 14), (h, w, 3))


def _shape_mask(rng: np.random.Generator, h: int, w: int, radius: float, kind: str) -> np.ndarray:
    """One filled shape of about ``radius`` pixels, centred at random so that it stays in the image."""
    mask = np.zeros((h, w), bool)
    cy, cx = rng.uniform(radius, h - radius), rng.uniform(radius, w - radius)
    if kind in ("ellipse", "ring"):
        ry, rx = radius * rng.uniform(0.6, 1.0), radius * rng.uniform(0.6, 1.0)
        rotation = rng.uniform(-np.pi, np.pi)
        mask[draw.ellipse(cy, cx, ry, rx, shape=(h, w), rotation=rotation)] = True
        if kind == "ring":
            f = rng.uniform(0.4, 0.6)
            mask[draw.ellipse(cy, cx, ry * f, rx * f, shape=(h, w), rotation=rotation)] = False
        return mask
    if kind == "rectangle":
        angle = rng.uniform(0, np.pi)
        half = radius * np.array([rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)])
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pts = corners @ rot.T
    else:  # triangle or polygon: vertices at jittered angles and radii
        n = 3 if kind == "triangle" else int(rng.integers(5, 9))
        angles = np.sort(
            rng.uniform(0, 2 * np.pi) + (np.arange(n) + rng.uniform(-0.2, 0.2, n)) * 2 * np.pi / n
        )
        radii = radius * (rng.uniform(0.8, 1.0, n) if kind == "triangle" else rng.uniform(0.5, 1.0, n))
        pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    mask[draw.polygon(cy + pts[:, 1], cx + pts[:, 0], shape=(h, w))] = True
    return mask


def make_shapes_image(
    rng: np.random.Generator, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A picture of 3 to 6 filled shapes on a textured background, and the shapes' visible masks.

    Shapes are rectangles, ellipses, triangles and polygons, some of them rings (a hole showing
    the background) and some small, each in its own saturated colour. Later shapes occlude earlier
    ones, but never hide more than a third of one; the masks are the visible parts. ``size`` is
    (H, W); by default each side is drawn from 256 to 512. Returns the HxWx3 uint8 image and KxHxW
    bool masks (K from 3 to 6), in drawing order.
    """
    h, w = size if size is not None else (int(rng.integers(256, 513)), int(rng.integers(256, 513)))
    short = min(h, w)
    count = int(rng.integers(3, 7))
    n_small = int(rng.integers(1, 3))
    hue0 = rng.random()
    hues = (hue0 + rng.permutation(count) / count + rng.uniform(-0.2, 0.2) / count) % 1.0
    masks: list[np.ndarray] = []
    colours: list[np.ndarray] = []
    for i in range(count):
        small = i >= count - n_small  # small shapes last: they sit on top
        for _ in range(50):
            radius = short * (rng.uniform(0.04, 0.07) if small else rng.uniform(0.1, 0.22))
            kind = str(rng.choice(["rectangle", "ellipse", "triangle", "polygon", "ring"]))
            if small and kind == "ring":
                kind = "ellipse"
            shape = _shape_mask(rng, h, w, radius, kind)
            area = shape.sum()
            if area < 40:
                continue
            # Keep shapes mostly apart: an overlap may hide at most a third of an earlier shape.
            if all((m & shape).sum() <= m.sum() / 3 for m in masks) and (
                rng.random() < 0.3 or not any((m & shape).any() for m in masks)
            ):
                break
        else:
            continue
        for m in masks:
            m &= ~shape
        masks.append(shape)
        rgb = colorsys.hsv_to_rgb(hues[i], rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0))
        colours.append(np.array(rgb) * 255)
    image = _background(rng, h, w)
    for m, c in zip(masks, colours):
        image[m] = c + rng.normal(0, 4, (int(m.sum()), 3))
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    return image, np.stack(masks)


# ---------------------------------------------------------------------------------------------------
# Training


def masks_to_low_res(masks: np.ndarray) -> torch.Tensor:
    """KxHxW bool masks -> Kx256x256 float targets in the decoder's frame.

    The same geometry as the predictor: resize so the long side is 1024, pad bottom/right to
    1024x1024, and average 4x4 blocks (so edge pixels get fractional targets).
    """
    h, w = masks.shape[-2:]
    nh, nw = ResizeLongestSide.get_preprocess_shape(h, w, FRAME)
    big = F.interpolate(torch.from_numpy(masks).float()[None], size=(nh, nw), mode="bilinear")[0]
    big = F.pad(big, (0, FRAME - nw, 0, FRAME - nh))
    return F.avg_pool2d(big[None], FRAME // LOW_RES)[0]


def _sample_prompts(rng: np.random.Generator, masks: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n single-point prompts: XY points (original pixels) and the KxHxW-or-background target index.

    Every shape gets a point before any gets a second; about ``BACKGROUND_PROMPTS`` of the points
    fall on the background, whose index is ``len(masks)``.
    """
    k = len(masks)
    background = ~masks.any(0)
    order = list(rng.permutation(k))
    targets = []
    for _ in range(n):
        if rng.random() < BACKGROUND_PROMPTS:
            targets.append(k)
        else:
            if not order:
                order = list(rng.permutation(k))
            targets.append(order.pop())
    points = []
    for t in targets:
        ys, xs = np.nonzero(background if t == k else masks[t])
        j = rng.integers(len(ys))
        points.append((xs[j] + rng.random(), ys[j] + rng.random()))
    return np.array(points), np.array(targets)


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per mask 1 - soft dice, over the last two axes."""
    p = logits.sigmoid()
    inter = (p * target).sum((-2, -1))
    return 1 - (2 * inter + 1) / (p.sum((-2, -1)) + target.sum((-2, -1)) + 1)


def _window(rng: np.random.Generator, box: np.ndarray, cells: int, grid: int) -> tuple[int, int]:
    """Top-left cell (y, x) of a cells x cells window of the grid that holds ``box`` (y0, x0, y1, x1
    in cells) where it fits, at a random offset."""
    out = []
    for lo, hi in ((box[0], box[2]), (box[1], box[3])):
        first = max(0, min(int(np.ceil(hi)) - cells, grid - cells))
        last = min(grid - cells, max(int(lo), 0))
        out.append(int(rng.integers(min(first, last), max(first, last) + 1)))
    return out[0], out[1]


def _train_step(
    model: Sam, rng: np.random.Generator, transform: ResizeLongestSide
) -> tuple[torch.Tensor, float]:
    image, masks = make_shapes_image(rng)
    h, w = image.shape[:2]
    background = ~masks.any(0, keepdims=True)
    targets_all = masks_to_low_res(np.concatenate([masks, background]))
    points, idx = _sample_prompts(rng, masks, PROMPTS_PER_IMAGE)
    resized = torch.from_numpy(np.array(transform.apply_image(image))).permute(2, 0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
        embedding = model.image_encoder(model.preprocess(resized)[None])
    grid = embedding.shape[-1]
    coords = torch.as_tensor(transform.apply_coords(points, (h, w)), dtype=torch.float)[:, None, :]
    labels = torch.ones(len(points), 1, dtype=torch.int)
    # The decoder is the expensive part (every prompt attends to every image token): decode each
    # prompt on a window of the embedding around its target. The upscaling and the mask head are
    # per cell, and positions keep their encodings, so this is the full decoder restricted to a crop.
    cells = WINDOW
    scale = LOW_RES // grid
    dense_pe = model.prompt_encoder.get_dense_pe()
    corners = []
    for b in range(len(points)):
        t = targets_all[idx[b]]
        ys, xs = np.nonzero(t.numpy() > 0.5)
        if len(ys) and idx[b] < len(masks):
            box = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]) / scale
        else:
            py, px = coords[b, 0, 1].item() * grid / FRAME, coords[b, 0, 0].item() * grid / FRAME
            box = np.array([py - 1, px - 1, py + 1, px + 1])
        corners.append(_window(rng, box, cells, grid))

    def crop(x: torch.Tensor, y0: int, x0: int, s: int = 1) -> torch.Tensor:
        return x[..., y0 * s : (y0 + cells) * s, x0 * s : (x0 + cells) * s]

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
        sparse, dense = model.prompt_encoder((coords, labels), None, None)
        logits, iou_pred = model.mask_decoder(
            torch.cat([crop(embedding, y0, x0) for y0, x0 in corners]),
            torch.cat([crop(dense_pe, y0, x0) for y0, x0 in corners]),
            sparse,
            torch.cat([crop(dense[b : b + 1], y0, x0) for b, (y0, x0) in enumerate(corners)]),
            multimask_output=True,
        )
    logits, iou_pred = logits.float(), iou_pred.float()
    target = torch.stack([crop(targets_all[i], y0, x0, scale) for i, (y0, x0) in zip(idx, corners)])[
        :, None
    ].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((-2, -1))
    mask_loss = bce + _dice_loss(logits, target)  # Bx3
    # SAM's rule for ambiguous prompts: only the best of the three masks learns the target.
    best = mask_loss.argmin(1)
    rows = torch.arange(len(best))
    with torch.no_grad():
        pred, tgt = logits > 0, target > 0.5
        inter = (pred & tgt).sum((-2, -1)).float()
        union = (pred | tgt).sum((-2, -1)).float()
        iou = inter / union.clamp(min=1)
    iou_loss = F.mse_loss(iou_pred, iou)
    loss = mask_loss[rows, best].mean() + iou_loss
    return loss, float(iou[rows, best].mean())


def train_tiny_shapes_model(
    steps: int = TRAIN_STEPS,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    verbose: bool = False,
) -> Sam:
    """A ``vit_tiny`` SAM trained for ``steps`` images (``PROMPTS_PER_IMAGE`` point prompts each).

    Deterministic for a seed and step count (and a thread count: CPU reductions may differ with
    it). With ``cache_dir`` the state dict is stored there, keyed by seed, steps, this file's source
    and the torch version, and loaded instead of retraining. Returns the model in eval mode.
    """
    path = None
    if cache_dir is not None:
        source = Path(__file__).read_bytes() + torch.__version__.encode()
        key = hashlib.sha256(source).hexdigest()[:16]
        path = Path(cache_dir) / f"sam_vit_tiny_shapes_seed{seed}_steps{steps}_{key}.pt"
        if path.is_file():
            model = build_model("vit_tiny")
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()

    torch.manual_seed(seed)
    model = build_model("vit_tiny")
    rng = np.random.default_rng(seed)
    transform = ResizeLongestSide(FRAME)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (1 - s / steps) ** 0.5
    )
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        loss, iou = _train_step(model, rng, transform)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if verbose:
            print(
                f"step {step:4d}  loss {loss.item():.3f}  iou {iou:.3f}  {time.perf_counter() - start:6.1f} s"
            )
    model.eval()

    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: concurrent sessions never read a half-written file
    return model


LR = 1e-3
BF16 = True
WINDOW = 32
