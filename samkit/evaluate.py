"""mIoU evaluation of box prompts, as the seed defines it and at the original resolution.

    python eval.py -c configs/coco_box_finetune.yaml -o model.checkpoint=work_dir/coco/sam_final.pth
    torchrun --nproc_per_node 4 eval.py -c ... -o model.checkpoint=...      # same numbers, faster

Each valid object's ground-truth box is the prompt; the prediction is mask token 0 thresholded at
logits > 0. Reported (all x100, means over objects of the whole dataset, not per image):
- ``miou_1024`` / ``dice_1024``: at the padded 1024x1024 model-input frame (the seed's number);
- ``miou_original`` / ``dice_original``: at the original image resolution (logits resized as the
  predictor does), which is what a user of the masks sees.
Box jitter (FLARE) and the object subset are seeded per image, so a checkpoint always gets the same
score; several processes each take every N-th image and their sums are added.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from . import distributed
from .build import build_model
from .config import TrainConfig, load_config, resolve_amp
from .errors import ConfigError
from .finetune import BoxPromptSam, upsample_logits
from .metrics import MiouAccumulator
from .utils.transforms import upscale_masks


@torch.no_grad()
def evaluate(
    net: BoxPromptSam,
    dataset: Dataset,
    *,
    device: torch.device,
    amp: str = "off",
    batch_size: int = 1,
    num_workers: int = 0,
    env: distributed.DistEnv | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """mIoU and Dice of ``net`` on ``dataset`` (samples with ``original_masks``)."""
    from .data import collate
    from .data.common import batch_images, batch_masks
    from .train import autocast

    env = env or distributed.DistEnv(device=device)
    indices = distributed.shard_indices(len(dataset), env.rank, env.world_size)
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate)
    was_training = net.training
    net.eval()
    size = net.sam.image_encoder.img_size
    acc = MiouAccumulator()
    if progress and env.is_main:
        from tqdm import tqdm

        loader = tqdm(loader, desc="eval", leave=False)
    for batch in loader:
        boxes, valid = batch["boxes"].to(device), batch["valid"].to(device)
        with autocast(device, amp):
            low_res, _ = net(boxes, valid, images=batch_images(batch, device))
        low_res = low_res.float()
        # The seed's frame: logits upsampled to the padded input, compared with the padded masks.
        masks = batch_masks(batch, device)
        pred = upsample_logits(low_res, size) > 0
        acc.update(
            pred[None], masks[valid][None].bool(), torch.ones(1, len(pred), dtype=torch.bool, device=device)
        )
        # The user's frame: each image's logits resized to its original size.
        start = 0
        for b in range(len(valid)):
            n = int(valid[b].sum())
            if n == 0:
                continue
            h, w = (int(v) for v in batch["original_size"][b])
            ih, iw = (int(v) for v in batch["input_size"][b])
            logits = upscale_masks(low_res[start : start + n], size, (ih, iw), (h, w))
            target = batch["original_masks"][b][: valid.shape[1]][valid[b].cpu()].to(device).bool()
            acc.update(
                (logits > 0)[None],
                target[None],
                torch.ones(1, n, dtype=torch.bool, device=device),
                key="original",
            )
            start += n
    acc.all_reduce()
    if was_training:
        net.train()
    return acc.compute()


def run(cfg: TrainConfig) -> dict[str, Any]:
    """eval.py: build the model from ``model.*`` (any checkpoint samkit reads), evaluate ``eval_data``."""
    if cfg.eval_data is None:
        raise ConfigError("the config has no eval_data section to evaluate on")
    env = distributed.setup(cfg.device)
    try:
        amp = resolve_amp(cfg.amp, env.device.type)
        sam = build_model(cfg.model.type, cfg.model.checkpoint).to(env.device)
        from .train import build_data

        dataset = build_data(
            cfg.eval_data, image_size=sam.image_encoder.img_size, seed=cfg.seed, for_eval=True
        )
        metrics = evaluate(
            BoxPromptSam(sam),
            dataset,
            device=env.device,
            amp=amp,
            batch_size=cfg.eval_batch_size,
            num_workers=cfg.eval_data.num_workers,
            env=env,
            progress=cfg.progress,
        )
        metrics.update(
            checkpoint=cfg.model.checkpoint,
            model_type=cfg.model.type,
            data=cfg.eval_data.data_dir,
            amp=amp,
            processes=env.world_size,
        )
        if env.is_main:
            out = cfg.eval_output or os.path.join(cfg.work_dir, f"eval_{_stem(cfg.model.checkpoint)}.json")
            _write_json(metrics, out)
            metrics["output"] = out
        return metrics
    finally:
        distributed.cleanup()


def _stem(path: str | None) -> str:
    if path is None:
        return "random_weights"
    return os.path.splitext(os.path.basename(path))[0]


def _write_json(obj: dict[str, Any], path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run_command(args: argparse.Namespace) -> int:
    """Evaluate box-prompt mIoU (zero-shot or fine-tuned) on a config's eval_data."""
    metrics = run(load_config(args.config, args.override_cfg))
    if "output" in metrics:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{shown} over {metrics.get('objects_1024', '?')} objects -> {metrics['output']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import run_standalone
    from .train import add_arguments

    return run_standalone(add_arguments, run_command, argv, prog="eval.py")


if __name__ == "__main__":
    sys.exit(main())
