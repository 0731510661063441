"""Evaluation of a fine-tuned (or zero-shot) SAM on a dataset, by the protocol of a prompt mode.

    python eval.py -c configs/coco_box_finetune.yaml -o model.checkpoint=work_dir/coco/sam_final.pth
    torchrun --nproc_per_node 4 eval.py -c ... -o model.checkpoint=...      # same numbers, faster

The loop here is the same for every protocol: each process takes every N-th image, embeds a batch
once, lets the protocol (``eval_prompt``, a key of :data:`samkit.training.modes.EVAL_PROTOCOLS`)
prompt and score it into a :class:`~samkit.training.metrics.MiouAccumulator`, and the sums of all
processes are added at the end. Box protocol: each valid object's ground-truth box, mask token 0
thresholded at logits > 0; reported (x100, means over objects of the whole dataset, not per image):
``miou_1024`` / ``dice_1024`` at the padded 1024x1024 input frame (the seed's number) and
``miou_original`` / ``dice_original`` at the original image resolution. Box jitter (FLARE) and the
object subset are seeded per image, so a checkpoint always gets the same score. Point protocol
(``eval_prompt: point``, :mod:`samkit.training.modes.point_eval`): up to 20 simulated clicks per
object, deterministic; ``miou_*_click{1,3,5,10}``, ``miou_*_click1_oracle``, ``noc85``, ``noc90``.
Text protocol (``eval_prompt: text``, :mod:`samkit.training.modes.text`): the crop-feature protocol
(``miou_1024``/``miou_original``, any dataset) and, on COCO, the category-name protocol (each category
of an image prompted with ``text.template`` filled with its name: ``miou_*_category_best`` and
``miou_*_category_union``, means over (image, category) pairs). Volume protocol (``eval_prompt: volume``,
:mod:`samkit.training.volume_eval`): NIfTI volumes, one box per organ propagated through the scan
against a box on every slice; 3D Dice and NSD at 1 and 2 mm.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..utils.files import atomic_write
from . import distributed
from .config import TrainConfig, resolve_amp
from .metrics import MiouAccumulator
from .modes import EVAL_PROTOCOLS, PromptMode, batch_on_device
from .numerics import flush_subnormals
from .setup import autocast, build_data, build_prompt_mode, build_sam


@torch.no_grad()
def evaluate(
    mode: PromptMode,
    dataset: Dataset,
    *,
    protocol: str = "box",
    device: torch.device,
    amp: str = "off",
    batch_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    env: Optional[distributed.DistEnv] = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The metrics of ``protocol`` for ``mode.sam`` on ``dataset`` (samples with ``original_masks``)."""
    from ..data import collate

    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"unknown eval protocol {protocol!r}; choose one of {', '.join(EVAL_PROTOCOLS)}")
    score_batch = EVAL_PROTOCOLS[protocol]
    env = env or distributed.DistEnv(device=device)
    indices = distributed.shard_indices(len(dataset), env.rank, env.world_size)
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    loader: Any = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate)
    was_training = mode.training
    mode.eval()
    names = category_names(dataset)
    if hasattr(mode, "prepare_eval"):  # e.g. text: every category name's text feature, once
        mode.prepare_eval(names)
    acc = MiouAccumulator()
    if progress and env.is_main:
        from tqdm import tqdm

        loader = tqdm(loader, desc="eval", leave=False)
    with flush_subnormals(device):
        for raw in loader:
            batch = batch_on_device(raw, device, seed=seed)
            if names:
                batch.extra["category_names"] = names
            with autocast(device, amp):
                embeddings = mode.sam.image_encoder(batch.images)
                score_batch(mode, batch, embeddings, acc)
    acc.all_reduce()
    if was_training:
        mode.train()
    return acc.compute()


def category_names(dataset: Dataset) -> dict[int, str]:
    """The category id -> name mapping of ``dataset`` or of a dataset it wraps (COCO); {} if none."""
    inner: Any = dataset
    while inner is not None and not hasattr(inner, "categories"):
        inner = getattr(inner, "dataset", None)
    return dict(inner.categories) if inner is not None else {}


def run(cfg: TrainConfig) -> dict[str, Any]:
    """eval.py: build the model from ``model.*`` (any checkpoint samkit reads), evaluate ``eval_data``
    by ``eval_prompt``, write the metrics as JSON (rank 0) and return them."""
    from ..errors import ConfigError

    if cfg.eval_data is None:
        raise ConfigError("the config has no eval_data section to evaluate on")
    env = distributed.setup(cfg.device)
    try:
        amp = resolve_amp(cfg.amp, env.device.type)
        torch.manual_seed(
            cfg.seed
        )  # a text branch new to a plain checkpoint: the same in every process and run
        sam = build_sam(cfg).to(env.device)  # with the text branch when prompt_mode is text
        protocol = cfg.eval_prompt or cfg.prompt_mode
        if protocol == "volume":  # whole NIfTI volumes, not a dataset of slices
            from .volume_eval import evaluate_volumes

            with autocast(env.device, amp):
                metrics = evaluate_volumes(cfg, sam, env)
        else:
            dataset = build_data(
                cfg.eval_data, image_size=sam.image_encoder.img_size, seed=cfg.seed, for_eval=True
            )
            metrics = evaluate(
                build_prompt_mode(cfg, sam),
                dataset,
                protocol=protocol,
                device=env.device,
                amp=amp,
                batch_size=cfg.eval_batch_size,
                num_workers=cfg.eval_data.num_workers,
                seed=cfg.seed,
                env=env,
                progress=cfg.progress,
            )
        metrics.update(
            checkpoint=cfg.model.checkpoint,
            model_type=cfg.model.type,
            data=cfg.eval_data.data_dir,
            eval_prompt=protocol,
            amp=amp,
            processes=env.world_size,
        )
        if env.is_main:
            out = output_path(cfg)
            write_json(metrics, out)
            metrics["output"] = out
        distributed.finish()
        return metrics
    finally:
        distributed.cleanup()


def output_path(cfg: TrainConfig) -> str:
    """Where the metrics go: ``eval_output``, else ``<work_dir>/eval_<checkpoint stem>.json``."""
    return cfg.eval_output or os.path.join(cfg.work_dir, f"eval_{_stem(cfg.model.checkpoint)}.json")


def _stem(path: Optional[str]) -> str:
    if path is None:
        return "random_weights"
    return os.path.splitext(os.path.basename(path))[0]


def write_json(obj: dict[str, Any], path: str) -> None:
    """Write ``obj`` as indented JSON, atomically (a temporary file renamed into place).

    A NaN or infinite number (a metric over no objects) is written as null: Python's ``NaN`` is not
    JSON, and strict readers (jq, browsers, most languages) refuse the whole file."""
    with atomic_write(path, "w", encoding="utf-8", make_parents=True) as f:
        json.dump(_strict_json(obj), f, indent=2, allow_nan=False)
        f.write("\n")


def _strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) inside dicts, lists and tuples made None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value
