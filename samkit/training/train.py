"""Fine-tuning SAM: one linear loop, like a recipe.

    python train.py -c configs/coco_box_finetune.yaml -o amp=bf16 work_dir=./work_dir/coco
    torchrun --nproc_per_node 8 train.py -c configs/coco_box_finetune.yaml
    python train.py -c configs/coco_box_finetune.yaml -o resume=auto       # continue a run

How each object of a batch is prompted is the config's ``prompt_mode`` (:mod:`samkit.training.modes`):
the mode turns the batch into one or more rounds of prompts and decodes them; each round's loss
(20 x focal + dice + IoU-MSE at the padded 1024 frame) is back-propagated before the next round is
prompted. Checkpoints (full state) go to ``<work_dir>/checkpoints`` at every epoch end (and every
``save_every_steps``); the final weights alone go to ``<work_dir>/sam_final.pth``. See the README
for every config key.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data.common import batch_images
from ..errors import ConfigError
from . import distributed
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
from .config import TrainConfig, config_to_dict, resolve_amp
from .embedding_cache import EmbeddingCache, KeyedDataset, crop_feature_key, encoder_key
from .logger import TrainLogger
from .losses import prompt_loss
from .modes import batch_on_device
from .numerics import flush_subnormals
from .params import build_optimizer, freeze_parameters
from .schedule import lr_at
from .setup import (
    EpochBatches,
    EpochIndexed,
    autocast,
    build_data,
    build_prompt_mode,
    build_sam,
    describe_dataset,
    set_epoch,
)

LOSS_TERMS = ("loss", "focal", "dice", "iou")


class _StopRequest:
    """SIGTERM (e.g. a scheduler pre-empting the job): finish the step, save, exit."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) the training a config describes; returns ``step``, the last ``eval`` metrics,
    ``interrupted`` after SIGTERM and the embedding ``cache`` hit counts (text mode with fixed crops:
    ``crop_cache`` too)."""
    env = distributed.setup(cfg.device)
    previous_handler = signal.getsignal(signal.SIGTERM)
    log = TrainLogger(cfg, env.is_main)
    try:
        with flush_subnormals(env.device):
            result = _train(cfg, env, log)
        distributed.finish()
        return result
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        log.close()
        distributed.cleanup()


def _train(cfg: TrainConfig, env: distributed.DistEnv, log: TrainLogger) -> dict[str, Any]:
    device = env.device
    amp = resolve_amp(cfg.amp, device.type)
    if cfg.train_data is None:
        raise ConfigError("the config has no train_data section")
    torch.manual_seed(cfg.seed)

    # ---- model: what trains, how each batch is prompted, optimizer, loss scaling.
    # Everything a run can refuse is checked before anything is written to work_dir.
    sam = build_sam(cfg)  # with the text branch in text mode
    try:
        trainable = freeze_parameters(sam, cfg.model.freeze, cfg.model.unfreeze)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    sam.to(device)
    distributed.broadcast_parameters(sam)
    mode = build_prompt_mode(cfg, sam).to(device)
    if cfg.cache_embeddings and mode.encoder_trainable:
        raise ConfigError(
            "cache_embeddings needs a frozen image encoder (model.freeze: [image_encoder, ...])"
        )
    params = [p for p in sam.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        sam,
        device,
        lr=cfg.optimizer.lr,
        betas=tuple(cfg.optimizer.betas),
        eps=cfg.optimizer.eps,
        weight_decay=cfg.optimizer.weight_decay,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    # ---- data: every process knows the whole epoch's order and takes its slice of each batch
    image_size = sam.image_encoder.img_size
    train_set = build_data(cfg.train_data, image_size=image_size, seed=cfg.seed, for_eval=False)
    crops_cached = cfg.cache_embeddings and hasattr(mode, "feature_cache")  # text mode, fixed crops
    if cfg.cache_embeddings:
        train_set = KeyedDataset(train_set, masks=crops_cached)
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
    if cfg.resume is None and list_checkpoints(cfg.work_dir):
        raise ConfigError(
            f"work_dir {cfg.work_dir} already holds checkpoints: pass -o resume=auto to continue that run "
            "or choose another work_dir"
        )
    resume_from = latest_checkpoint(cfg.work_dir) if cfg.resume == "auto" else cfg.resume
    if resume_from is not None:
        state = load_training_checkpoint(resume_from)
        sam.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        epoch, step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["step"]

    # ---- every check passed: from here on the run writes to work_dir
    log.open()
    if cfg.model.checkpoint is None:
        log.line(f"warning: model.checkpoint is not set, training {cfg.model.type} from random weights")
    if resume_from is not None:
        log.line(f"resumed from {resume_from}: epoch {epoch + 1}, step {step}")
    cache = None
    if cfg.cache_embeddings:
        root = cfg.cache_dir or os.path.join(cfg.work_dir, "embedding_cache")
        cache = EmbeddingCache(root, encoder_key(sam.image_encoder, amp))
        if crops_cached:  # the objects' crop features too (computed outside autocast)
            crop_key = crop_feature_key(mode.feature_encoder, mode.crop_settings())
            mode.feature_cache = EmbeddingCache(root, crop_key)

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
    signal.signal(signal.SIGTERM, stop)
    log.line(
        f"training {cfg.model.type} with {cfg.prompt_mode} prompts ({trainable / 1e6:.2f}M trainable parameters) "
        f"on {describe_dataset(train_set)}; {env.world_size} process(es) on {device}, amp {amp}, "
        f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs"
    )
    result: dict[str, Any] = {"step": step}
    interrupted = False
    # One loader for the run: its workers persist across epochs; each epoch's batches are set on the
    # sampler, and every index travels with its epoch (EpochIndexed), so workers started in an earlier
    # epoch draw this epoch's object subsets and jitter.
    sampler = EpochBatches()
    loader = DataLoader(
        EpochIndexed(train_set),
        batch_sampler=sampler,
        num_workers=cfg.train_data.num_workers,
        collate_fn=_collate(),
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.train_data.num_workers > 0,
    )
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
        sampler.set(epoch, batches[step_in_epoch:])
        mode.train()
        log.start_epoch(epoch, step_in_epoch, steps_per_epoch)
        for raw in loader:
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
            batch = batch_on_device(raw, device, epoch=epoch, seed=cfg.seed, images=cache is None)
            with autocast(device, amp):
                if cache is not None:
                    embeddings = cache.embed(
                        raw["image_key"],
                        lambda rows, r=raw: mode.embed(batch_images(r, device, rows)),
                        device,
                    )
                else:
                    embeddings = mode.embed(batch.images)
            # The rounds decode from a detached copy; a trainable encoder gets their summed gradient
            # in one backward pass after the last round (instead of keeping its graph per round).
            features = embeddings.detach().requires_grad_(mode.encoder_trainable)
            session = mode.session(batch)
            # Losses are normalised by the prompted objects of the GLOBAL batch (per process: global /
            # world size), so averaging gradients over processes equals one process running the whole
            # batch. The same reduction tells every process whether one of them got SIGTERM.
            shared = torch.tensor([float(session.valid.sum()), float(stop.requested)], device=device)
            shared = distributed.all_reduce_sum(shared)
            count, stop_now = (shared[0] / env.world_size).clamp(min=1e-6), bool(shared[1] > 0)
            optimizer.zero_grad(set_to_none=True)
            losses = {k: torch.zeros((), device=device) for k in LOSS_TERMS}
            for _ in range(session.rounds):
                with autocast(device, amp):
                    pred = mode(session, features)
                round_losses = prompt_loss(
                    pred.low_res,
                    pred.iou,
                    session.targets,
                    focal_weight=cfg.loss.focal_weight,
                    dice_weight=cfg.loss.dice_weight,
                    iou_weight=cfg.loss.iou_weight,
                    num_valid=count,
                    multimask_choice=cfg.loss.multimask_choice,
                    focal=cfg.loss.focal,
                )
                scaler.scale(round_losses["loss"] / session.rounds).backward()
                for k in LOSS_TERMS:
                    losses[k] += round_losses[k].detach().float() / session.rounds
                with torch.no_grad():
                    session.feedback(pred)
            if features.grad is not None:
                embeddings.backward(features.grad)
            distributed.average_gradients(params)
            if cfg.optimizer.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.optimizer.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            step_in_epoch += 1
            if env.distributed:  # each process holds its share of the batch's loss: add them
                parts = distributed.all_reduce_sum(torch.stack([losses[k] for k in LOSS_TERMS]))
                losses = dict(zip(LOSS_TERMS, parts / env.world_size))
            log.step(step, step_in_epoch, lr, losses, cfg.batch_size)
            if step_in_epoch < steps_per_epoch and cfg.save_every_steps and step % cfg.save_every_steps == 0:
                save(epoch, step_in_epoch)
            interrupted = stop_now  # agreed by all processes, so they leave the loop together
            if interrupted or (cfg.max_steps is not None and step >= cfg.max_steps):
                break
        log.end_epoch()
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        save(epoch, step_in_epoch)
        if interrupted:
            log.line(f"SIGTERM: saved {checkpoint_path(cfg.work_dir, step)}; continue with -o resume=auto")
            result["interrupted"] = True
            break
        if eval_set is not None and step_in_epoch == 0 and epoch % cfg.eval_every == 0:
            from .evaluate import evaluate

            metrics = evaluate(
                mode,
                eval_set,
                protocol=cfg.eval_prompt or cfg.prompt_mode,
                device=device,
                amp=amp,
                batch_size=cfg.eval_batch_size,
                seed=cfg.seed,
                env=env,
            )
            log.eval(epoch, step, metrics)
            result["eval"] = metrics
            mode.train()
    if env.is_main and not result.get("interrupted"):
        save_atomically(sam.state_dict(), os.path.join(cfg.work_dir, "sam_final.pth"))
    if cache is not None:
        result["cache"] = {"hits": cache.hits, "misses": cache.misses}
        crops = mode.feature_cache if crops_cached else None
        if crops is not None:
            result["crop_cache"] = {"hits": crops.hits, "misses": crops.misses}
            mode.feature_cache = None
    result["step"] = step
    return result


def _collate():
    from ..data import collate

    return collate
