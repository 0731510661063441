"""3D evaluation of slice propagation on labelled volumes: one box per organ against a box on every slice.

Per organ of a case (each non-zero label id present): the organ's tight box on the slice where its
area is largest (the lowest such slice on a tie) is the one prompt, propagated through the volume
(:func:`samkit.volume.segment_volume_objects`, each organ on its own); the slice-wise oracle prompts
every slice that holds the organ with that slice's tight box, and stacks the masks. Both are scored
against the organ's 3D mask: Dice and normalised surface Dice at 1 and 2 mm (voxel spacing of the
scan, :mod:`samkit.volume.metrics`). Nothing is random: the same model gives the same numbers.
Boxes are XYXY with X1, Y1 one past the last column and row.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .metrics import dice, normalized_surface_dice
from .propagate import Propagator, SlicePrompt, segment_volume_objects
from .slices import SliceEmbeddings

TOLERANCES_MM = (1.0, 2.0)


def tight_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """XYXY box of a non-empty HxW mask, X1/Y1 one past the last column/row."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def score(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], prefix: str = ""
) -> dict[str, float]:
    """``dice`` and ``nsd_<t>mm`` (t in :data:`TOLERANCES_MM`) of two 3D boolean masks, x100."""
    out = {f"{prefix}dice": 100.0 * dice(pred, truth)}
    for t in TOLERANCES_MM:
        out[f"{prefix}nsd_{t:g}mm"] = 100.0 * normalized_surface_dice(pred, truth, spacing, t)
    return out


def evaluate_case(
    predictor: Any,
    slices: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    *,
    batch_size: int = 4,
    embeddings: SliceEmbeddings | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """One row per organ of a case: ``organ``, ``slices`` (that hold it), ``prompt_slice``, then
    :func:`score` of the propagation from one box and, prefixed ``oracle_``, of the slice-wise oracle.

    ``slices``: ZxHxW uint8 grey levels; ``labels``: ZxHxW integer ids; ``spacing``: (z, y, x) mm;
    ``options``: :class:`~samkit.volume.propagate.Propagator`'s thresholds. The slices are embedded
    once for all organs and both protocols (``embeddings``: those of these slices, to reuse).
    """
    if embeddings is None:
        embeddings = SliceEmbeddings(predictor, slices, batch_size=batch_size)
    oracle = Propagator(embeddings, **options)
    rows = []
    for organ in (int(v) for v in np.unique(labels) if v != 0):
        truth = labels == organ
        areas = truth.reshape(len(truth), -1).sum(1)
        z = int(np.argmax(areas))
        prompt = SlicePrompt(slice=z, box=tight_box(truth[z]), label=1)
        _, results = segment_volume_objects(predictor, slices, [prompt], embeddings=embeddings, **options)
        pred = np.zeros_like(truth)
        for k, mask in results[0].masks.items():
            pred[k] = mask
        stacked = np.zeros_like(truth)
        for k in np.flatnonzero(areas):
            box = tight_box(truth[k])
            stacked[k] = oracle.prompt_slice(int(k), [SlicePrompt(slice=int(k), box=box)])[0]
        row: dict[str, Any] = {"organ": organ, "slices": int((areas > 0).sum()), "prompt_slice": z}
        row["propagated_slices"] = len(results[0].masks)
        row.update(score(pred, truth, spacing))
        row.update(score(stacked, truth, spacing, "oracle_"))
        rows.append(row)
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over all (case, organ) rows and per organ: ``{"mean": {...}, "organs": {id: {...}}}``,
    each with ``count`` and the mean of every metric, plus ``gap_dice`` (oracle minus one box)."""
    metrics = [k for k in rows[0] if k.startswith(("dice", "nsd", "oracle_"))] if rows else []

    def means(group: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"count": len(group)}
        for k in metrics:
            out[k] = float(np.mean([r[k] for r in group]))
        if group:
            out["gap_dice"] = out["oracle_dice"] - out["dice"]
        return out

    organs = sorted({int(r["organ"]) for r in rows})
    return {
        "mean": means(rows),
        "organs": {str(o): means([r for r in rows if int(r["organ"]) == o]) for o in organs},
    }


def table(summary: dict[str, Any], names: dict[int, str] | None = None) -> str:
    """The per-organ table of :func:`summarize` as text (one line per organ, then the mean)."""
    cols = ("dice", "nsd_1mm", "nsd_2mm", "oracle_dice", "oracle_nsd_1mm", "oracle_nsd_2mm", "gap_dice")
    header = f"{'organ':<14}{'n':>4}" + "".join(f"{c:>16}" for c in cols)
    lines = [header]
    entries = [(f"{o} {(names or {}).get(int(o), '')}".strip(), s) for o, s in summary["organs"].items()]
    for name, s in entries + [("mean", summary["mean"])]:
        if s["count"]:
            lines.append(f"{name:<14}{s['count']:>4}" + "".join(f"{s[c]:>16.2f}" for c in cols))
    return "\n".join(lines)


__all__ = ["TOLERANCES_MM", "evaluate_case", "score", "summarize", "table", "tight_box"]
