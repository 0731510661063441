"""Box-prompt fine-tuning of SAM: one linear loop, like a recipe.

    python train.py -c configs/coco_box_finetune.yaml -o amp=bf16 work_dir=./work_dir/coco
    torchrun --nproc_per_node 8 train.py -c configs/coco_box_finetune.yaml
    python train.py -c configs/coco_box_finetune.yaml -o resume=auto       # continue a run

Every prompt is a ground-truth box; the decoder predicts one mask per box (mask token 0, as the seed
trains); the loss is 20 x focal + dice + IoU-MSE at the padded 1024 frame. Checkpoints (full state)
go to ``<work_dir>/checkpoints`` at every epoch end (and every ``save_every_steps``); the final
weights alone go to ``<work_dir>/sam_final.pth``. See the README for every config key.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from contextlib import nullcontext
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed
from .build import build_model
from .checkpointing import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    prune_checkpoints,
    rng_state,
    save_atomically,
    set_rng_state,
)
from .config import DataConfig, TrainConfig, config_to_dict, load_config, resolve_amp
from .data.common import batch_images, batch_masks
from .embedding_cache import EmbeddingCache, KeyedDataset, encoder_key
from .errors import ConfigError
from .finetune import BoxPromptSam, freeze_parameters, lr_at, parameter_groups, upsample_logits
from .losses import sam_loss

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_data(data: DataConfig, *, image_size: int, seed: int, for_eval: bool) -> Dataset:
    """The dataset a config section describes (paths checked by the dataset itself)."""
    from .data import build_dataset

    kwargs: dict[str, Any] = {
        "image_size": image_size,
        "max_objects": data.max_objects,
        "box_jitter": data.box_jitter,
        "seed": seed,
        "return_original_masks": for_eval,
        "compact": True,  # uint8 images and bit-packed masks to the device; rebuilt there exactly
    }
    if data.type == "coco":
        kwargs.update(image_dir=data.data_dir, annotation_path=data.annotation_path)
        kwargs["include_crowd"] = data.include_crowd
    else:
        kwargs["data_dir"] = data.data_dir
        if data.type == "sa1b":
            kwargs["min_area"] = data.min_area
    dataset = build_dataset(data.type, **kwargs)
    if data.max_images is not None and data.max_images < len(dataset):
        dataset = Subset(dataset, range(data.max_images))
    return dataset


def set_epoch(dataset: Dataset, epoch: int) -> None:
    """Per-sample randomness (object subsets, box jitter) is seeded by (seed, epoch, index)."""
    while dataset is not None:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
            return
        dataset = getattr(dataset, "dataset", None)


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


class _StopRequest:
    """SIGTERM (e.g. a scheduler pre-empting the job): finish the step, save, exit."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True


def train(cfg: TrainConfig) -> dict[str, Any]:
    env = distributed.setup(cfg.device)
    device = env.device
    amp = resolve_amp(cfg.amp, device.type)
    if cfg.train_data is None:
        raise ConfigError("the config has no train_data section")
    torch.manual_seed(cfg.seed)
    log = _Logger(cfg, env.is_main)

    # ---- model: frozen parts, optimizer, loss scaling
    sam = build_model(cfg.model.type, cfg.model.checkpoint)
    if cfg.model.checkpoint is None:
        log.line(f"warning: model.checkpoint is not set, training {cfg.model.type} from random weights")
    try:
        trainable = freeze_parameters(sam, cfg.model.freeze, cfg.model.unfreeze)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    sam.to(device)
    net = BoxPromptSam(sam)
    if cfg.cache_embeddings and net.encoder_trainable:
        raise ConfigError(
            "cache_embeddings needs a frozen image encoder (model.freeze: [image_encoder, ...])"
        )
    optimizer = torch.optim.AdamW(
        parameter_groups(sam, cfg.optimizer.weight_decay),
        lr=cfg.optimizer.lr,
        betas=tuple(cfg.optimizer.betas),
        eps=cfg.optimizer.eps,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    # ---- data: every process knows the whole epoch's order and takes its slice of each batch
    image_size = sam.image_encoder.img_size
    train_set = build_data(cfg.train_data, image_size=image_size, seed=cfg.seed, for_eval=False)
    if cfg.cache_embeddings:
        train_set = KeyedDataset(train_set)
    if cfg.batch_size % env.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {env.world_size} processes")
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is larger than the training set ({len(train_set)} images)"
        )
    total_steps = steps_per_epoch * cfg.epochs
    eval_set = None
    if cfg.eval_data is not None and cfg.eval_every > 0:
        eval_set = build_data(cfg.eval_data, image_size=image_size, seed=cfg.seed, for_eval=True)

    # ---- resume
    epoch, step_in_epoch, step = 0, 0, 0
    resume_from = latest_checkpoint(cfg.work_dir) if cfg.resume == "auto" else cfg.resume
    if cfg.resume is None and list_checkpoints(cfg.work_dir):
        raise ConfigError(
            f"work_dir {cfg.work_dir} already holds checkpoints: pass -o resume=auto to continue that run "
            "or choose another work_dir"
        )
    if resume_from is not None:
        state = load_training_checkpoint(resume_from)
        sam.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        epoch, step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["step"]
        log.line(f"resumed from {resume_from}: epoch {epoch + 1}, step {step}")

    model: torch.nn.Module = net
    if env.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    cache = None
    if cfg.cache_embeddings:
        root = cfg.cache_dir or os.path.join(cfg.work_dir, "embedding_cache")
        cache = EmbeddingCache(root, encoder_key(sam.image_encoder, amp))

    def save(epoch_: int, step_in_epoch_: int) -> None:
        if env.is_main:
            state = {
                "model": sam.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_state(),
                "epoch": epoch_,
                "step_in_epoch": step_in_epoch_,
                "step": step,
                "config": config_to_dict(cfg),
            }
            save_atomically(state, checkpoint_path(cfg.work_dir, step))
            prune_checkpoints(cfg.work_dir, cfg.keep_checkpoints)

    stop = _StopRequest()
    previous_handler = signal.signal(signal.SIGTERM, stop)
    log.line(
        f"training {cfg.model.type} ({trainable / 1e6:.2f}M trainable parameters) on {train_set_description(train_set)}; "
        f"{env.world_size} process(es) on {device}, amp {amp}, {steps_per_epoch} steps/epoch x {cfg.epochs} epochs"
    )
    result: dict[str, Any] = {"step": step}
    interrupted = False
    try:
        while epoch < cfg.epochs and not (cfg.max_steps is not None and step >= cfg.max_steps):
            set_epoch(train_set, epoch)
            batches = distributed.epoch_batches(
                len(train_set),
                cfg.batch_size,
                seed=cfg.seed,
                epoch=epoch,
                rank=env.rank,
                world_size=env.world_size,
            )
            loader = DataLoader(
                train_set,
                batch_sampler=batches[step_in_epoch:],
                num_workers=cfg.train_data.num_workers,
                collate_fn=_collate(),
                pin_memory=device.type == "cuda",
            )
            net.train()
            log.start_epoch(epoch, step_in_epoch, steps_per_epoch)
            for batch in loader:
                lr = lr_at(
                    step,
                    total_steps,
                    cfg.optimizer.lr,
                    warmup_steps=cfg.scheduler.warmup_steps,
                    decay=cfg.scheduler.decay,
                    min_lr_ratio=cfg.scheduler.min_lr_ratio,
                    milestones=cfg.scheduler.milestones,
                    step_factor=cfg.scheduler.step_factor,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                boxes = batch["boxes"].to(device, non_blocking=True)
                valid = batch["valid"].to(device, non_blocking=True)
                masks = batch_masks(batch, device)
                with autocast(device, amp):
                    embeddings = None
                    if cache is not None:
                        embeddings = cache.embed(
                            batch["image_key"],
                            lambda rows, b=batch: net.embed(batch_images(b, device, rows)),
                            device,
                        )
                    images = None if embeddings is not None else batch_images(batch, device)
                    low_res, iou_pred = model(boxes, valid, images=images, embeddings=embeddings)
                logits = upsample_logits(low_res, image_size)
                # Normalise by the valid prompts of the GLOBAL batch (per process: global / world size):
                # DDP's gradient mean then equals one process running the whole batch. The same
                # reduction tells every process whether one of them got SIGTERM, so they stop together.
                shared = torch.tensor([float(valid.sum()), float(stop.requested)], device=device)
                shared = distributed.all_reduce_sum(shared)
                count, stop_now = shared[0] / env.world_size, bool(shared[1] > 0)
                losses = sam_loss(
                    logits[None],
                    iou_pred[None],
                    masks[valid][None],
                    torch.ones_like(iou_pred, dtype=torch.bool)[None],
                    focal_weight=cfg.loss.focal_weight,
                    dice_weight=cfg.loss.dice_weight,
                    iou_weight=cfg.loss.iou_weight,
                    num_valid=count.clamp(min=1e-6),
                )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses["loss"]).backward()
                if cfg.optimizer.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(sam.parameters(), cfg.optimizer.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                step += 1
                step_in_epoch += 1
                if env.distributed:  # each process holds its share of the batch's loss: add them
                    parts = torch.stack(
                        [losses[k].detach().float() for k in ("loss", "focal", "dice", "iou")]
                    )
                    parts = distributed.all_reduce_sum(parts) / env.world_size
                    losses = dict(zip(("loss", "focal", "dice", "iou"), parts))
                log.step(step, step_in_epoch, lr, losses, cfg.batch_size)
                if (
                    step_in_epoch < steps_per_epoch
                    and cfg.save_every_steps
                    and step % cfg.save_every_steps == 0
                ):
                    save(epoch, step_in_epoch)
                interrupted = stop_now  # agreed by all processes, so they leave the loop together
                if interrupted or (cfg.max_steps is not None and step >= cfg.max_steps):
                    break
            log.end_epoch()
            if step_in_epoch >= steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
            save(epoch, step_in_epoch)
            if interrupted:
                log.line(
                    f"SIGTERM: saved {checkpoint_path(cfg.work_dir, step)}; continue with -o resume=auto"
                )
                result["interrupted"] = True
                break
            if eval_set is not None and step_in_epoch == 0 and epoch % cfg.eval_every == 0:
                from .evaluate import evaluate

                metrics = evaluate(
                    net, eval_set, device=device, amp=amp, batch_size=cfg.eval_batch_size, env=env
                )
                log.eval(epoch, step, metrics)
                result["eval"] = metrics
                net.train()
        if env.is_main and not result.get("interrupted"):
            save_atomically(sam.state_dict(), os.path.join(cfg.work_dir, "sam_final.pth"))
        if cache is not None:
            result["cache"] = {"hits": cache.hits, "misses": cache.misses}
        result["step"] = step
        return result
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        log.close()
        distributed.cleanup()


def train_set_description(dataset: Dataset) -> str:
    inner = dataset
    while inner is not None and not hasattr(inner, "describe"):
        inner = getattr(inner, "dataset", None)
    return f"{len(dataset)} images" + (f" ({inner.describe()})" if inner is not None else "")


def _collate():
    from .data import collate

    return collate


class _Logger:
    """Rank 0 only: a progress bar, a line every ``log_every`` steps, metrics.jsonl, TensorBoard."""

    def __init__(self, cfg: TrainConfig, enabled: bool) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.bar = None
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(cfg.work_dir, exist_ok=True)
        self.jsonl = open(os.path.join(cfg.work_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(cfg.work_dir, "tensorboard"))
            except ImportError:
                self.line(
                    "warning: tensorboard is not installed (pip install samkit[train]); scalars go to metrics.jsonl only"
                )
        self._sums: dict[str, Any] = {}
        self._count = 0
        self._t0 = time.perf_counter()
        self._images = 0

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def start_epoch(self, epoch: int, done: int, total: int) -> None:
        if not self.enabled:
            return
        self.epoch = epoch
        if self.cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=done, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False
            )
        self._t0, self._images = time.perf_counter(), 0

    def step(self, step: int, in_epoch: int, lr: float, losses: dict[str, torch.Tensor], batch: int) -> None:
        if not self.enabled:
            return
        for key in ("loss", "focal", "dice", "iou"):  # tensors: no device sync until a log line
            self._sums[key] = self._sums.get(key, 0.0) + losses[key].detach().float()
        self._count += 1
        self._images += batch
        if self.bar is not None:
            self.bar.update(1)
        if step % self.cfg.log_every:
            return
        elapsed = time.perf_counter() - self._t0
        record = {k: float(v) / self._count for k, v in self._sums.items()}
        record.update(step=step, epoch=self.epoch + 1, lr=lr, images_per_s=self._images / max(elapsed, 1e-9))
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{record['images_per_s']:.1f}"
            )
        else:
            self.line(
                f"epoch {self.epoch + 1} step {step}: loss {record['loss']:.4f} (focal {record['focal']:.4f}, "
                f"dice {record['dice']:.4f}, iou {record['iou']:.4f}) lr {lr:.3g} {record['images_per_s']:.2f} img/s"
            )
        self._write(record, "train")
        self._sums, self._count = {}, 0
        self._t0, self._images = time.perf_counter(), 0

    def eval(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))
        self.line(f"eval after epoch {epoch}: {shown}")
        self._write({**metrics, "step": step, "epoch": epoch}, "eval")

    def _write(self, record: dict[str, Any], kind: str) -> None:
        assert self.jsonl is not None
        self.jsonl.write(json.dumps({"kind": kind, **record}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, record["step"])

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.end_epoch()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="configs/coco_box_finetune.yaml", help="YAML config file")
    parser.add_argument(
        "-o",
        "--override-cfg",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. -o amp=bf16 optimizer.lr=1e-4 resume=auto",
    )


def run(args: argparse.Namespace) -> int:
    """Fine-tune SAM with box prompts from a YAML config (also under torchrun)."""
    result = train(load_config(args.config, args.override_cfg))
    return 143 if result.get("interrupted") else 0


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import run_standalone

    return run_standalone(add_arguments, run, argv, prog="train.py")


if __name__ == "__main__":
    sys.exit(main())
