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

Read from :func:`_train` down: the setup (``_setup_model``, ``_setup_data``, ``_resume``), then the
epoch loop (``_run_epochs``), one epoch (``_train_epoch``) and one optimizer step (``_train_step``).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.common import batch_images, collate
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
    add_lora_adapters,
    autocast,
    build_data,
    build_prompt_mode,
    build_sam,
    checkpoint_encoder_blocks,
    describe_dataset,
    set_epoch,
)

if TYPE_CHECKING:
    from ..modeling import Sam
    from .modes import PromptMode, Session, TrainBatch

LOSS_TERMS = ("loss", "focal", "dice", "iou")


class _StopRequest:
    """SIGTERM (e.g. a scheduler pre-empting the job): finish the step, save, exit."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True


@dataclass
class _Model:
    """What trains: the SAM, the prompt mode around it, its trainable parameters, AdamW, the fp16 loss
    scaler, the autocast precision and (``cache_embeddings``) the image-embedding cache."""

    sam: Sam
    mode: PromptMode
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: str  # off | bf16 | fp16
    trainable: int  # trainable parameters, for the log
    cache: Optional[EmbeddingCache] = None
    base_sha256: Optional[str] = None  # model.lora: the base weights' identity, for the adapter file


@dataclass
class _Data:
    """The training set and its run-long loader, the epoch's length, the evaluation set."""

    train_set: Dataset
    loader: DataLoader
    sampler: EpochBatches
    steps_per_epoch: int
    total_steps: int  # the LR schedule spans all epochs (even with max_steps)
    eval_set: Optional[Dataset]
    crops_cached: bool  # text mode with fixed crops and cache_embeddings: crop features cached too


@dataclass
class _Position:
    """Where the run is, as a checkpoint stores it: the epoch in progress, the optimizer steps done in
    it and in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0


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
    """The recipe, in the process :func:`train` set up: build and check everything, then loop."""
    if cfg.train_data is None:
        raise ConfigError("the config has no train_data section")
    torch.manual_seed(cfg.seed)
    # ---- setup. Everything a run can refuse is checked before anything is written to work_dir.
    model = _setup_model(cfg, env)
    data = _setup_data(cfg, env, model)
    at, resume_from = _resume(cfg, model)

    # ---- every check passed: from here on the run writes to work_dir
    log.open()
    if cfg.model.checkpoint is None:
        log.line(f"warning: model.checkpoint is not set, training {cfg.model.type} from random weights")
    if resume_from is not None:
        log.line(f"resumed from {resume_from}: epoch {at.epoch + 1}, step {at.step}")
    if cfg.cache_embeddings:
        model.cache = _open_caches(cfg, model, data.crops_cached)
    stop = _StopRequest()
    signal.signal(signal.SIGTERM, stop)
    log.line(
        f"training {cfg.model.type} with {cfg.prompt_mode} prompts ({model.trainable / 1e6:.2f}M trainable "
        f"parameters) on {describe_dataset(data.train_set)}; {env.world_size} process(es) on {env.device}, "
        f"amp {model.amp}, {data.steps_per_epoch} steps/epoch x {cfg.epochs} epochs"
    )
    result = _run_epochs(cfg, env, log, model, data, at, stop)
    if env.is_main and not result.get("interrupted"):
        _save_final(cfg, model)
    result.update(_close_caches(model, data.crops_cached))
    result["step"] = at.step
    return result


# ---------------------------------------------------------------------------------------------------
# Setup


def _setup_model(cfg: TrainConfig, env: distributed.DistEnv) -> _Model:
    """The SAM to train (the same weights in every process, frozen where the config says), how each
    batch is prompted, AdamW over what trains and the fp16 loss scaler."""
    sam = build_sam(cfg)  # with the text branch in text mode
    try:
        trainable = freeze_parameters(sam, cfg.model.freeze, cfg.model.unfreeze)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    base_sha256 = add_lora_adapters(cfg, sam)
    if cfg.model.grad_checkpointing:
        checkpoint_encoder_blocks(sam)
    sam.to(env.device)
    distributed.broadcast_parameters(sam)
    mode = build_prompt_mode(cfg, sam).to(env.device)
    if cfg.cache_embeddings and base_sha256 is not None and mode.encoder_trainable:
        raise ConfigError("cache_embeddings needs a frozen image encoder: model.lora.targets adapt it")
    if cfg.cache_embeddings and mode.encoder_trainable:
        raise ConfigError(
            "cache_embeddings needs a frozen image encoder (model.freeze: [image_encoder, ...])"
        )
    params = [p for p in sam.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = cfg.optimizer
    optimizer = build_optimizer(
        sam, env.device, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay
    )
    amp = resolve_amp(cfg.amp, env.device.type)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == "fp16")
    return _Model(sam, mode, params, optimizer, scaler, amp, trainable, base_sha256=base_sha256)


def _setup_data(cfg: TrainConfig, env: distributed.DistEnv, model: _Model) -> _Data:
    """The training set and its loader, and the evaluation set (when the run evaluates)."""
    image_size = model.sam.image_encoder.img_size
    train_set = build_data(cfg.train_data, image_size=image_size, seed=cfg.seed, for_eval=False)
    crops_cached = cfg.cache_embeddings and hasattr(model.mode, "feature_cache")  # text mode, fixed crops
    if cfg.cache_embeddings:
        train_set = KeyedDataset(train_set, masks=crops_cached)
    if cfg.batch_size % env.world_size:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {env.world_size} processes")
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is larger than the training set ({len(train_set)} images)"
        )
    eval_set = None
    if cfg.eval_data is not None and cfg.eval_every > 0:
        if cfg.eval_prompt == "volume":
            raise ConfigError(
                "eval_prompt volume scores whole NIfTI scans with eval.py; in train.py set eval_every=0 "
                "or an eval_prompt of box, point or text"
            )
        eval_set = build_data(cfg.eval_data, image_size=image_size, seed=cfg.seed, for_eval=True)
    # One loader for the run: its workers persist across epochs; each epoch's batches are set on the
    # sampler, and every index travels with its epoch (EpochIndexed), so workers started in an earlier
    # epoch draw this epoch's object subsets and jitter. (No worker starts before the first epoch.)
    sampler = EpochBatches()
    loader = DataLoader(
        EpochIndexed(train_set),
        batch_sampler=sampler,
        num_workers=cfg.train_data.num_workers,
        collate_fn=collate,
        pin_memory=env.device.type == "cuda",
        persistent_workers=cfg.train_data.num_workers > 0,
        # Each new iterator draws its workers' base seed from this generator, not from torch's global
        # RNG, which then serves the model alone (LoRA dropout): a run resumed mid-epoch draws the
        # same dropout masks as the run it continues.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    total_steps = steps_per_epoch * cfg.epochs
    return _Data(train_set, loader, sampler, steps_per_epoch, total_steps, eval_set, crops_cached)


def _resume(cfg: TrainConfig, model: _Model) -> tuple[_Position, Optional[str]]:
    """Where the run starts: at the beginning, or where the checkpoint ``resume`` names stopped (its
    weights, optimizer, loss scale and random state restored). Returns that checkpoint's path too."""
    if cfg.resume is None and list_checkpoints(cfg.work_dir):
        raise ConfigError(
            f"work_dir {cfg.work_dir} already holds checkpoints: pass -o resume=auto to continue that run "
            "or choose another work_dir"
        )
    resume_from = latest_checkpoint(cfg.work_dir) if cfg.resume == "auto" else cfg.resume
    if resume_from is None:
        return _Position(), None
    state = load_training_checkpoint(resume_from)
    model.sam.load_state_dict(state["model"])
    model.optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        model.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return _Position(state["epoch"], state["step_in_epoch"], state["step"]), resume_from


def _open_caches(cfg: TrainConfig, model: _Model, crops_cached: bool) -> EmbeddingCache:
    """The image-embedding cache of the frozen encoder; in text mode with fixed crops the objects' crop
    features get one too (computed outside autocast), which the mode keeps."""
    root = cfg.cache_dir or os.path.join(cfg.work_dir, "embedding_cache")
    cache = EmbeddingCache(root, encoder_key(model.sam.image_encoder, model.amp))
    if crops_cached:
        mode = model.mode
        mode.feature_cache = EmbeddingCache(
            root, crop_feature_key(mode.feature_encoder, mode.crop_settings())
        )
    return cache


def _close_caches(model: _Model, crops_cached: bool) -> dict[str, Any]:
    """The caches' hit counts for the run's result; the mode lets go of its crop-feature cache."""
    if model.cache is None:
        return {}
    counts: dict[str, Any] = {"cache": {"hits": model.cache.hits, "misses": model.cache.misses}}
    mode = model.mode
    crops = mode.feature_cache if crops_cached else None
    if crops is not None:
        counts["crop_cache"] = {"hits": crops.hits, "misses": crops.misses}
        mode.feature_cache = None
    return counts


# ---------------------------------------------------------------------------------------------------
# The loop


def _run_epochs(
    cfg: TrainConfig,
    env: distributed.DistEnv,
    log: TrainLogger,
    model: _Model,
    data: _Data,
    at: _Position,
    stop: _StopRequest,
) -> dict[str, Any]:
    """Epochs from ``at`` to the last (or to ``max_steps``): train, save, evaluate every ``eval_every``
    epochs. After SIGTERM: save and stop, ``interrupted`` in the result."""
    result: dict[str, Any] = {"step": at.step}
    while at.epoch < cfg.epochs and not _max_steps_reached(cfg, at):
        interrupted = _train_epoch(cfg, env, log, model, data, at, stop)
        log.end_epoch()
        if at.step_in_epoch >= data.steps_per_epoch:
            at.epoch, at.step_in_epoch = at.epoch + 1, 0
        _save_checkpoint(cfg, env, model, at)
        if interrupted:
            log.line(f"SIGTERM: saved {checkpoint_path(cfg.work_dir, at.step)}; continue with -o resume=auto")
            result["interrupted"] = True
            break
        if data.eval_set is not None and at.step_in_epoch == 0 and at.epoch % cfg.eval_every == 0:
            result["eval"] = _evaluate(cfg, env, model, data.eval_set)
            log.eval(at.epoch, at.step, result["eval"])
    return result


def _train_epoch(
    cfg: TrainConfig,
    env: distributed.DistEnv,
    log: TrainLogger,
    model: _Model,
    data: _Data,
    at: _Position,
    stop: _StopRequest,
) -> bool:
    """The rest of epoch ``at.epoch`` (from ``at.step_in_epoch``), or up to ``max_steps`` or SIGTERM;
    returns whether a process got SIGTERM. Every process knows the whole epoch's order and takes its
    slice of each batch."""
    set_epoch(data.train_set, at.epoch)
    batches = distributed.epoch_batches(
        len(data.train_set),
        cfg.batch_size,
        seed=cfg.seed,
        epoch=at.epoch,
        rank=env.rank,
        world_size=env.world_size,
    )
    data.sampler.set(at.epoch, batches[at.step_in_epoch :])
    model.mode.train()
    log.start_epoch(at.epoch, at.step_in_epoch, data.steps_per_epoch)
    for raw in data.loader:
        lr = _set_lr(cfg, model.optimizer, at.step, data.total_steps)
        losses, stop_now = _train_step(cfg, env, model, raw, epoch=at.epoch, stop=stop)
        at.step += 1
        at.step_in_epoch += 1
        log.step(at.step, at.step_in_epoch, lr, losses, cfg.batch_size)
        mid_epoch = at.step_in_epoch < data.steps_per_epoch
        if mid_epoch and cfg.save_every_steps and at.step % cfg.save_every_steps == 0:
            _save_checkpoint(cfg, env, model, at)
        if stop_now or _max_steps_reached(cfg, at):
            return stop_now  # agreed by all processes, so they leave the loop together
    return False


def _max_steps_reached(cfg: TrainConfig, at: _Position) -> bool:
    return cfg.max_steps is not None and at.step >= cfg.max_steps


def _set_lr(cfg: TrainConfig, optimizer: torch.optim.Optimizer, step: int, total_steps: int) -> float:
    """The schedule's learning rate for ``step`` (a pure function of it), set on every group."""
    sched = cfg.scheduler
    lr = lr_at(
        step,
        total_steps,
        cfg.optimizer.lr,
        warmup_steps=sched.warmup_steps,
        decay=sched.decay,
        min_lr_ratio=sched.min_lr_ratio,
        milestones=sched.milestones,
        step_factor=sched.step_factor,
    )
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# ---------------------------------------------------------------------------------------------------
# One step


def _train_step(
    cfg: TrainConfig,
    env: distributed.DistEnv,
    model: _Model,
    raw: dict[str, Any],
    *,
    epoch: int,
    stop: _StopRequest,
) -> tuple[dict[str, torch.Tensor], bool]:
    """One optimizer step on one batch (this process's slice of it): the image embeddings, the mode's
    rounds of prompts (forward, loss, backward each), then the gradients averaged over processes,
    clipped and applied. Returns the batch's losses (over all processes) and whether any process got
    SIGTERM."""
    device, mode = env.device, model.mode
    batch = batch_on_device(raw, device, epoch=epoch, seed=cfg.seed, images=model.cache is None)
    embeddings = _embed(model, raw, batch, device)
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
    model.optimizer.zero_grad(set_to_none=True)
    losses = _prompt_rounds(cfg, model, session, features, count)
    if features.grad is not None:
        embeddings.backward(features.grad)
    _apply_gradients(model, cfg.optimizer.grad_clip)
    if env.distributed:  # each process holds its share of the batch's loss: add them
        parts = distributed.all_reduce_sum(torch.stack([losses[k] for k in LOSS_TERMS]))
        losses = dict(zip(LOSS_TERMS, parts / env.world_size))
    return losses, stop_now


def _embed(model: _Model, raw: dict[str, Any], batch: TrainBatch, device: torch.device) -> torch.Tensor:
    """The batch's image embeddings (B x C x h x w): from the encoder, or from the cache (the encoder
    computes only the images it misses)."""
    with autocast(device, model.amp):
        if model.cache is None:
            return model.mode.embed(batch.images)
        return model.cache.embed(
            raw["image_key"], lambda rows: model.mode.embed(batch_images(raw, device, rows)), device
        )


def _prompt_rounds(
    cfg: TrainConfig, model: _Model, session: Session, features: torch.Tensor, count: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The session's rounds: decode, back-propagate the round's loss (``count`` objects normalise it),
    feed the prediction back to prompt the next round. Returns the losses averaged over rounds."""
    device, amp, loss = features.device, model.amp, cfg.loss
    losses = {k: torch.zeros((), device=device) for k in LOSS_TERMS}
    for _ in range(session.rounds):
        with autocast(device, amp):
            pred = model.mode(session, features)
        round_losses = prompt_loss(
            pred.low_res,
            pred.iou,
            session.targets,
            focal_weight=loss.focal_weight,
            dice_weight=loss.dice_weight,
            iou_weight=loss.iou_weight,
            num_valid=count,
            multimask_choice=loss.multimask_choice,
            focal=loss.focal,
        )
        model.scaler.scale(round_losses["loss"] / session.rounds).backward()
        for k in LOSS_TERMS:
            losses[k] += round_losses[k].detach().float() / session.rounds
        with torch.no_grad():
            session.feedback(pred)
    return losses


def _apply_gradients(model: _Model, grad_clip: float) -> None:
    """Average the gradients over processes, clip their global norm (fp16: unscaled first), step."""
    distributed.average_gradients(model.params)
    if grad_clip > 0:
        model.scaler.unscale_(model.optimizer)
        torch.nn.utils.clip_grad_norm_(model.params, grad_clip)
    model.scaler.step(model.optimizer)
    model.scaler.update()


# ---------------------------------------------------------------------------------------------------
# Saving and evaluation


def _save_checkpoint(cfg: TrainConfig, env: distributed.DistEnv, model: _Model, at: _Position) -> None:
    """Rank 0: the full training state at ``at`` (what ``resume`` needs), then prune old checkpoints."""
    if not env.is_main:
        return
    state = {
        "model": model.sam.state_dict(),
        "optimizer": model.optimizer.state_dict(),
        "scaler": model.scaler.state_dict(),
        "rng": rng_state(),
        "epoch": at.epoch,
        "step_in_epoch": at.step_in_epoch,
        "step": at.step,
        "config": config_to_dict(cfg),
    }
    save_atomically(state, checkpoint_path(cfg.work_dir, at.step))
    prune_checkpoints(cfg.work_dir, cfg.keep_checkpoints)


def _save_final(cfg: TrainConfig, model: _Model) -> None:
    """``sam_final.pth``: the weights alone (Meta's names); with ``model.lora`` the merged plain SAM, and
    the adapter file beside it (samkit.lora: the LoRA tensors, the fully trained parameters)."""
    final = os.path.join(cfg.work_dir, "sam_final.pth")
    if cfg.model.lora is None:
        save_atomically(model.sam.state_dict(), final)
        return
    from ..lora import ADAPTER_NAME, adapter_state, merged_state_dict, save_adapter

    save_atomically(merged_state_dict(model.sam), final)
    save_adapter(
        os.path.join(cfg.work_dir, ADAPTER_NAME),
        adapter_state(model.sam),
        rank=cfg.model.lora.rank,
        alpha=cfg.model.lora.alpha,
        targets=cfg.model.lora.targets,
        model_type="vit_h" if cfg.model.type == "default" else cfg.model.type,
        base_sha256=model.base_sha256 or "",
    )


def _evaluate(cfg: TrainConfig, env: distributed.DistEnv, model: _Model, eval_set: Dataset) -> dict[str, Any]:
    """The evaluation protocol (``eval_prompt``, default the prompt mode's) on the evaluation set, in
    every process; the mode goes back to training."""
    from .evaluate import evaluate

    metrics = evaluate(
        model.mode,
        eval_set,
        protocol=cfg.eval_prompt or cfg.prompt_mode,
        device=env.device,
        amp=model.amp,
        batch_size=cfg.eval_batch_size,
        seed=cfg.seed,
        env=env,
    )
    model.mode.train()
    return metrics
