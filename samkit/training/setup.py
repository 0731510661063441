"""Config -> objects, in one place: the datasets, the prompt mode and the autocast context that the
training and evaluation loops use (modules below never see a config)."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Any, ContextManager, Iterator, Optional

import torch
from torch.utils.data import Dataset, Subset

from ..errors import ConfigError
from ..modeling import Sam
from .config import DataConfig, TrainConfig
from .modes import PROMPT_MODES, PromptMode

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_data(data: DataConfig, *, image_size: int, seed: int, for_eval: bool) -> Dataset:
    """The dataset a config section describes (paths checked by the dataset itself)."""
    from ..data import build_dataset

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
            kwargs["min_area"] = 10000 if data.min_area is None else data.min_area
    if data.type in ("masks", "labelme"):
        kwargs.update(min_area=data.min_area or 0, percentiles=data.percentiles, split_seed=data.split_seed)
        kwargs.update(val_fraction=data.val_fraction, subset=_subset(data, for_eval))
        if data.type == "masks":
            kwargs["semantic"] = data.semantic
    dataset = build_dataset(data.type, **kwargs)
    if data.max_images is not None and data.max_images < len(dataset):
        dataset = Subset(dataset, range(data.max_images))
    return dataset


def _subset(data: DataConfig, for_eval: bool) -> str:
    """With ``val_fraction`` the training data is the rest of the folder, the evaluation data that share."""
    if data.val_fraction is None:
        return "all"
    return "val" if for_eval else "train"


def build_sam(cfg: TrainConfig) -> Sam:
    """The model to train: ``model.type`` from ``model.checkpoint``; in text mode with the text branch
    (``text.feature_dim``), whose parameters start fresh when the checkpoint is a plain SAM. With
    samkit's fast modules (:func:`samkit.fast.accelerate`: same parameters and state-dict keys)."""
    from ..fast import accelerate

    sam = _build_sam(cfg)
    if cfg.model.adapter is not None:
        from ..lora import apply_adapter

        apply_adapter(sam, cfg.model.adapter)
    return accelerate(sam)


def _build_sam(cfg: TrainConfig) -> Sam:
    from ..build import (
        IMAGE_SIZE,
        build_model,
        check_checkpoint_size,
        checkpoint_image_size,
        load_checkpoint,
        read_checkpoint,
    )

    size, checkpoint = cfg.model.image_size, cfg.model.checkpoint
    if cfg.prompt_mode != "text":
        return build_model(cfg.model.type, checkpoint, image_size=size)
    state = None if checkpoint is None else read_checkpoint(checkpoint)
    if state is not None:
        check_checkpoint_size(state, cfg.model.type, str(checkpoint))
    if size is None:
        size = (state is not None and checkpoint_image_size(state)) or IMAGE_SIZE
    sam = build_model(cfg.model.type, text_feature_dim=cfg.text.feature_dim, image_size=size)
    if state is not None:
        load_checkpoint(sam, state, keep_new_text_branch=True, source=checkpoint)
    return sam


def add_lora_adapters(cfg: TrainConfig, sam: Sam) -> Optional[str]:
    """``model.lora``: wrap the targeted layers with LoRA layers (their own weights frozen; the other
    parameters train as freeze/unfreeze chose). Returns the base weights' identity that the adapter file
    records (:func:`samkit.lora.base_identity`), or None without ``model.lora``."""
    lora = cfg.model.lora
    if lora is None:
        return None
    from ..lora import add_lora, base_identity, base_state_dict, trained_names

    try:
        add_lora(sam, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return base_identity(base_state_dict(sam), skip=trained_names(sam))


def checkpoint_encoder_blocks(sam: Sam) -> None:
    """``model.grad_checkpointing``: each image-encoder block, when autograd records it, keeps only its
    input and recomputes its activations in the backward pass (``torch.utils.checkpoint``, non-reentrant:
    the random state and autocast are replayed, so the gradients are the same). The blocks' forward is
    wrapped on the instance: no module or state-dict key changes."""
    from torch.utils.checkpoint import checkpoint

    for block in sam.image_encoder.blocks:
        forward = block.forward

        def checkpointed(x: torch.Tensor, _forward: Any = forward) -> torch.Tensor:
            if torch.is_grad_enabled():
                return checkpoint(_forward, x, use_reentrant=False)
            return _forward(x)

        block.forward = checkpointed


def build_prompt_mode(cfg: TrainConfig, sam: Sam) -> PromptMode:
    """The ``prompt_mode`` of the config around ``sam``, with that mode's own settings."""
    if cfg.prompt_mode == "point":
        return PROMPT_MODES["point"](sam, **dataclasses.asdict(cfg.point))
    if cfg.prompt_mode == "text":
        from ..text import build_feature_encoder

        text = cfg.text
        return PROMPT_MODES["text"](
            sam,
            feature_encoder=build_feature_encoder(text.encoder, text.model),
            min_area=text.min_area,
            max_expand=text.max_expand,
            mask_background_prob=text.mask_background_prob,
            fixed_crops=text.fixed_crops,
            template=text.template,
        )
    return PROMPT_MODES[cfg.prompt_mode](sam)


def set_epoch(dataset: Dataset, epoch: int) -> None:
    """Per-sample randomness (object subsets, box jitter) is seeded by (seed, epoch, index)."""
    inner: Any = dataset
    while inner is not None:
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)
            return
        inner = getattr(inner, "dataset", None)


class EpochBatches:
    """The batch sampler of the training DataLoader, which lives for the whole run so that its worker
    processes persist across epochs (``persistent_workers``: no restart and no re-reading of the
    annotations each epoch). ``set(epoch, batches)`` gives the batches of the next pass; each index
    goes out as ``(epoch, index)``, which :class:`EpochIndexed` reads, so per-epoch randomness reaches
    workers that were started in an earlier epoch."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches: list[list[int]] = []

    def set(self, epoch: int, batches: list[list[int]]) -> None:
        self.epoch, self.batches = int(epoch), list(batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for batch in self.batches:
            yield [(epoch, int(i)) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class EpochIndexed(Dataset):
    """``dataset[(epoch, index)]`` is ``dataset[index]`` as :func:`set_epoch` (epoch) makes it, in
    whichever process reads it (see :class:`EpochBatches`)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._epoch: int | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        epoch, index = item
        if epoch != self._epoch:
            set_epoch(self.dataset, epoch)
            self._epoch = epoch
        return self.dataset[index]


def describe_dataset(dataset: Dataset) -> str:
    inner: Any = dataset
    while inner is not None and not hasattr(inner, "describe"):
        inner = getattr(inner, "dataset", None)
    return f"{len(dataset)} images" + (f" ({inner.describe()})" if inner is not None else "")  # type: ignore[arg-type]


def autocast(device: torch.device, amp: str) -> ContextManager:
    """torch.autocast for ``amp`` bf16/fp16 on ``device``; nothing for ``off``."""
    if amp == "off":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])
