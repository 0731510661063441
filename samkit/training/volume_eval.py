"""``eval.py -o eval_prompt=volume``: the 3D protocol of :mod:`samkit.volume.evaluate` on a folder of
FLARE22-style NIfTI volumes (``eval_data.data_dir``: ``images/<case>_0000.nii.gz`` + ``labels/<case>.nii.gz``).

Each process takes every N-th case (torchrun), the rows of all processes are gathered, and rank 0
writes the JSON: ``dice``, ``nsd_1mm``, ``nsd_2mm`` (one box per organ, propagated) and their
``oracle_*`` twins (a box on every slice), x100, means over all (case, organ) pairs; ``gap_dice``;
``organs`` (the same per organ id) and ``cases`` (every row). Intensities: the FLARE preprocessing's
CT window (level 40, width 400 HU); slices along the axial axis of each scan's affine.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from . import distributed


def evaluate_volumes(cfg: Any, sam: torch.nn.Module, env: distributed.DistEnv) -> dict[str, Any]:
    """The metrics of the volume protocol for ``sam`` on ``cfg.eval_data`` (every process calls it)."""
    from ..data.ct_preprocess import pair_cases
    from ..predictor import SamPredictor
    from ..volume import nifti
    from ..volume.evaluate import evaluate_case, summarize
    from ..volume.intensity import DEFAULT_WINDOW, to_uint8

    cases, _ = pair_cases(cfg.eval_data.data_dir)
    if cfg.eval_data.max_images is not None:
        cases = cases[: cfg.eval_data.max_images]
    predictor = SamPredictor(sam.eval())
    rows: list[dict[str, Any]] = []
    mine = distributed.shard_indices(len(cases), env.rank, env.world_size)
    if cfg.progress and env.is_main:
        from tqdm import tqdm

        mine = tqdm(mine, desc="volumes", leave=False)
    for i in mine:
        case = cases[i]
        image, label = nifti.read_volume(case.image), nifti.read_volume(case.label)
        if image.data.shape != label.data.shape:
            raise nifti.VolumeError(
                f"{case.image} has shape {image.data.shape} but {case.label} has {label.data.shape}"
            )
        axis = nifti.axis_of(image.affine)
        slices = nifti.to_slices(to_uint8(image.data, DEFAULT_WINDOW), axis)
        ids = nifti.to_slices(label.data, axis).astype(int)
        spacing = nifti.slice_spacing(image.spacing, axis)
        for row in evaluate_case(predictor, slices, ids, spacing, batch_size=cfg.eval_batch_size):
            rows.append({"case": case.name, **row})
    if env.distributed and dist.is_initialized():
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    rows.sort(key=lambda r: (r["case"], r["organ"]))
    summary = summarize(rows)
    return {**{k: v for k, v in summary["mean"].items()}, "organs": summary["organs"], "cases": rows}


__all__ = ["evaluate_volumes"]
