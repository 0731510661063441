"""Verify exported ONNX models against samkit's PyTorch model: ONNX Runtime (CPU) vs SamPredictor, same weights.

Three images that are not the tracing size (square, portrait, landscape), five prompts each (one
point, several points, box, point + box, a ``mask_input`` refinement). Compared: the image embeddings
(max abs, relative L2), the masks at the original size (pixel agreement and IoU, the worst mask of a
prompt) and the IoU predictions (max abs). Bounds per precision are in :data:`BOUNDS`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..modeling import Sam


class Bounds(NamedTuple):
    """Pass when embeddings' relative L2 <= emb_rel_l2, every mask's pixel agreement >= mask_agreement and
    IoU >= mask_iou, and IoU predictions differ by <= iou_abs."""

    emb_rel_l2: float
    mask_agreement: float
    mask_iou: float
    iou_abs: float


# fp32 is a different kernel library computing the same function; fp16 rounds every weight and
# activation to 11 bits; int8 quantises the MatMul weights (dynamic, per tensor): both are loose.
BOUNDS: dict[str, Bounds] = {
    "fp32": Bounds(emb_rel_l2=1e-3, mask_agreement=0.999, mask_iou=0.99, iou_abs=2e-3),
    "fp16": Bounds(emb_rel_l2=1e-2, mask_agreement=0.99, mask_iou=0.95, iou_abs=3e-2),
    "int8": Bounds(emb_rel_l2=1e-1, mask_agreement=0.93, mask_iou=0.75, iou_abs=0.35),
}
IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "square": (600, 600),
    "portrait": (720, 480),
    "landscape": (480, 800),
}


@dataclass
class Row:
    image: str
    case: str
    emb_max_abs: float = float("nan")
    emb_rel_l2: float = float("nan")
    mask_agreement: float = float("nan")
    mask_iou: float = float("nan")
    iou_abs: float = float("nan")
    ok: bool = True


def verification_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour field with a few flat shapes: HxWx3 uint8, deterministic."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.uniform(0, 0.7) * width, rng.uniform(0, 0.7) * height
        x1, y1 = x0 + rng.uniform(0.15, 0.3) * width, y0 + rng.uniform(0.15, 0.3) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return np.array(image)


def prompt_cases(height: int, width: int) -> dict[str, dict[str, Any]]:
    """The prompts of every image, in its original pixels (mask refinement adds its mask_input later)."""
    point = np.array([[0.5 * width, 0.45 * height]])
    box = np.array([0.2 * width, 0.25 * height, 0.7 * width, 0.8 * height])
    several = np.array(
        [[0.5 * width, 0.45 * height], [0.3 * width, 0.6 * height], [0.8 * width, 0.2 * height]]
    )
    return {
        "one point": dict(point_coords=point, point_labels=np.array([1])),
        "several points": dict(point_coords=several, point_labels=np.array([1, 1, 0])),
        "box": dict(box=box),
        "point + box": dict(point_coords=point, point_labels=np.array([1]), box=box),
        "mask_input": dict(point_coords=point, point_labels=np.array([1])),
    }


def mask_figures(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(worst pixel agreement, worst IoU) over the masks CxHxW of two predictions (empty vs empty: IoU 1)."""
    agreement = min(float((x == y).mean()) for x, y in zip(a, b))
    ious = []
    for x, y in zip(a, b):
        union = np.logical_or(x, y).sum()
        ious.append(1.0 if union == 0 else float(np.logical_and(x, y).sum() / union))
    return agreement, min(ious)


def verify_onnx(
    model: Sam,
    model_dir: str | os.PathLike,
    precision: str = "fp32",
    sizes: dict[str, tuple[int, int]] | None = None,
) -> list[Row]:
    """Compare the models in ``model_dir`` with ``model`` (fp32, CPU) on every image and prompt; each row
    carries its figures and whether they are within ``BOUNDS[precision]``."""
    from ..onnx import OnnxPredictor
    from ..predictor import SamPredictor

    bounds = BOUNDS[precision]
    onnx_predictor = OnnxPredictor(model_dir)
    torch_predictor = SamPredictor(model.float().cpu().eval())
    rows = []
    for seed, (name, (h, w)) in enumerate((sizes or IMAGE_SIZES).items()):
        image = verification_image(h, w, seed)
        onnx_predictor.set_image(image)
        torch_predictor.set_image(image)
        ours = onnx_predictor.get_image_embedding()
        ref = torch_predictor.get_image_embedding().float().numpy()
        rel = float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-12))
        rows.append(
            Row(name, "embeddings", float(np.abs(ours - ref).max()), rel, ok=rel <= bounds.emb_rel_l2)
        )
        refined_from = None
        for case, prompt in prompt_cases(h, w).items():
            multimask = True
            if case == "mask_input":
                prompt = dict(prompt, mask_input=refined_from)
                multimask = False
            masks_ref, iou_ref, low_ref = torch_predictor.predict(**prompt, multimask_output=multimask)
            masks, iou, _ = onnx_predictor.predict(**prompt, multimask_output=multimask)
            if case == "one point":
                refined_from = low_ref[int(np.argmax(iou_ref))][None]
            agreement, mask_iou = mask_figures(masks, masks_ref)
            iou_abs = float(np.abs(iou - iou_ref).max())
            ok = (
                agreement >= bounds.mask_agreement
                and mask_iou >= bounds.mask_iou
                and iou_abs <= bounds.iou_abs
            )
            rows.append(Row(name, case, mask_agreement=agreement, mask_iou=mask_iou, iou_abs=iou_abs, ok=ok))
    return rows


def format_table(rows: Sequence[Row], precision: str) -> str:
    """The verification as a text table, with the bounds it was held to."""
    b = BOUNDS[precision]

    def num(v: float, fmt: str) -> str:
        return "-" if v != v else format(v, fmt)

    lines = [
        f"ONNX Runtime (CPU) vs samkit PyTorch, {precision}; bounds: embeddings rel L2 <= {b.emb_rel_l2:g}, "
        f"mask agreement >= {b.mask_agreement:.1%}, mask IoU >= {b.mask_iou:g}, IoU predictions |diff| <= {b.iou_abs:g}",
        f"{'image':<10} {'case':<15} {'emb max abs':>11} {'emb rel L2':>10} {'mask agree':>10} {'mask IoU':>9} "
        f"{'iou |diff|':>10}  result",
    ]
    for r in rows:
        lines.append(
            f"{r.image:<10} {r.case:<15} {num(r.emb_max_abs, '.2e'):>11} {num(r.emb_rel_l2, '.2e'):>10} "
            f"{num(r.mask_agreement, '.4%'):>10} {num(r.mask_iou, '.4f'):>9} {num(r.iou_abs, '.2e'):>10}  "
            f"{'ok' if r.ok else 'FAIL'}"
        )
    failed = sum(not r.ok for r in rows)
    lines.append(
        f"{len(rows) - failed}/{len(rows)} within bounds" + ("" if not failed else f"; {failed} FAILED")
    )
    return "\n".join(lines)


__all__ = [
    "BOUNDS",
    "IMAGE_SIZES",
    "Bounds",
    "Row",
    "format_table",
    "mask_figures",
    "prompt_cases",
    "verification_image",
    "verify_onnx",
]
