"""Fine-tuning configuration: dataclasses, YAML files and ``-o key=value`` overrides, strictly checked.

The YAML is the only place configs come from; modules never see these objects (the training script
reads them and passes plain arguments). An unknown key, a missing section or a value of the wrong
type stops with one line that names the key and the file (:class:`~samkit.errors.ConfigError`).

Overrides use dotted keys and YAML values: ``-o amp=bf16 optimizer.lr=1e-4 train_data.max_objects=10``.
Two spellings of the seed's commands are accepted: ``amp_level=O0|O1|O2|O3`` (O0 = off, otherwise
bf16 on CPU and fp16 on GPUs, as the seed ran O2 in fp16) and ``network.model.<key>`` for ``model.<key>``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, NoReturn, Optional, Sequence, Union

import yaml

from ..errors import ConfigError

AMP_CHOICES = ("off", "bf16", "fp16")
PROMPT_MODES = ("box", "point", "text")  # the keys of samkit.training.modes.PROMPT_MODES (checked by a test)
EVAL_PROMPTS = ("box", "point", "text", "volume")  # EVAL_PROTOCOLS' keys, and volume (whole NIfTI scans)
DECAY_CHOICES = ("cosine", "linear", "step", "constant")
DATA_TYPES = ("coco", "sa1b", "flare", "masks", "labelme")


def _fail(key: str, message: str, source: str) -> NoReturn:
    raise ConfigError(f"config key {key} {message} in {source}")


# Each section checks the values that types cannot express in its ``validate(key, source)``: ``key``
# is where the section sits in the config (train_data and eval_data share a class), ``source`` the
# file or overrides to name. :meth:`TrainConfig.validate` runs them all.


@dataclass
class LoraConfig:
    """``model.lora``: low-rank adapters (``peft``) on the layers ``targets`` names (samkit.lora)."""

    rank: int = 4
    alpha: float = 4.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input (LoRA dropout)
    # Groups of samkit.lora.LORA_TARGETS (encoder_qkv, encoder_proj, encoder_mlp, decoder_attn,
    # decoder_mlp) or regular expressions over module names, e.g. image_encoder\.blocks\.11\.attn\.qkv.
    targets: list[str] = field(default_factory=lambda: ["encoder_qkv", "encoder_proj"])

    def validate(self, key: str, source: str) -> None:
        from ..lora import target_pattern

        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            _fail(key, f"needs rank >= 1, alpha > 0 and 0 <= dropout < 1, got {self.rank}, {self.alpha}, "
                  f"{self.dropout}", source)  # fmt: skip
        if not self.targets:
            _fail(f"{key}.targets", "must name at least one group or pattern", source)
        for target in self.targets:
            try:
                target_pattern(target)
            except ValueError as err:
                _fail(f"{key}.targets", str(err).replace("model.lora.targets ", ""), source)


@dataclass
class ModelConfig:
    type: str = "vit_b"
    # Meta's .pth, a seed .ckpt or a samkit checkpoint; null trains from random weights (tests only).
    checkpoint: Optional[str] = None
    # The encoder's square input side (a multiple of 16); null: the checkpoint's, or 1024 without one
    # (every released SAM is 1024). A smaller frame suits a model trained from scratch at that size.
    image_size: Optional[int] = None
    # Parameters whose names start with one of these prefixes are frozen ...
    freeze: list[str] = field(default_factory=lambda: ["image_encoder", "prompt_encoder"])
    # ... except those starting with one of these (e.g. "prompt_encoder.text_proj").
    unfreeze: list[str] = field(default_factory=list)
    # LoRA adapters (absent: none). The adapted layers' own weights are frozen; freeze/unfreeze still
    # choose which other parameters train in full (by default the mask decoder).
    lora: Optional[LoraConfig] = None
    # An adapter file (samkit.lora) merged into the checkpoint's weights when the model is built.
    adapter: Optional[str] = None
    # Recompute each image-encoder block in the backward pass instead of keeping its activations
    # (activation checkpointing): less memory for a trainable (LoRA or full) encoder, ~1/3 more compute.
    grad_checkpointing: bool = False

    def validate(self, key: str, source: str) -> None:
        from ..build import sam_model_registry

        if self.lora is not None:
            self.lora.validate(f"{key}.lora", source)
        if self.adapter is not None and not os.path.isfile(self.adapter):
            _fail(f"{key}.adapter", f"must be an adapter file, got {self.adapter!r}", source)

        if self.type not in sam_model_registry:
            _fail(f"{key}.type", f"must be one of {', '.join(sam_model_registry)}, got {self.type!r}", source)
        if self.image_size is not None and (self.image_size < 16 or self.image_size % 16):
            _fail(
                f"{key}.image_size",
                f"must be a positive multiple of 16 (SAM's is 1024), got {self.image_size}",
                source,
            )


@dataclass
class DataConfig:
    type: str = "coco"  # coco | sa1b | flare | masks (image + mask folders) | labelme (labelme JSON)
    data_dir: str = ""
    annotation_path: Optional[str] = None  # COCO only
    max_objects: int = 20  # a seeded random subset when an image has more
    include_crowd: bool = False  # COCO only
    box_jitter: int = 0  # outward noise on box prompts, 0..box_jitter px per side (FLARE: 20)
    # Masks below this area (original pixels) are dropped: SA-1B (default 10000), masks and labelme (default 0).
    min_area: Optional[int] = None
    max_images: Optional[int] = None  # use only the first N images (quick runs)
    num_workers: int = 2
    # masks/labelme only (samkit.data.masks, samkit.data.labelme):
    semantic: bool = False  # masks: label values are classes; their connected components are the objects
    # A seeded share of the pictures held out for validation: train_data takes the rest, eval_data (same
    # data_dir and val_fraction) takes that share. null: all pictures (a separate validation folder).
    val_fraction: Optional[float] = None
    split_seed: int = 0  # the seed of that split (not the training seed: the split stays put)
    # Pictures of more than 8 bits (16-bit, float): these percentiles map to 0 and 255 (null: / 257).
    percentiles: Optional[list[float]] = field(default_factory=lambda: [1.0, 99.0])

    def validate(self, key: str, source: str) -> None:
        if self.type not in DATA_TYPES:
            _fail(f"{key}.type", f"must be one of {', '.join(DATA_TYPES)}, got {self.type!r}", source)
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            _fail(f"{key}.val_fraction", f"must be between 0 and 1, got {self.val_fraction}", source)
        p = self.percentiles
        if p is not None and (len(p) != 2 or not 0 <= p[0] < p[1] <= 100):
            _fail(f"{key}.percentiles", f"must be two numbers 0 <= low < high <= 100, got {p}", source)
        if self.min_area is not None and self.min_area < 0:
            _fail(f"{key}.min_area", f"must not be negative, got {self.min_area}", source)
        if self.max_objects < 1:
            _fail(f"{key}.max_objects", f"must be at least 1, got {self.max_objects}", source)
        if self.box_jitter < 0 or self.num_workers < 0:
            _fail(f"{key}.box_jitter/num_workers", "must not be negative", source)
        if self.type == "coco" and not self.annotation_path:
            _fail(f"{key}.annotation_path", "is required for COCO data", source)
        if not self.data_dir:
            _fail(f"{key}.data_dir", "is required", source)


@dataclass
class OptimizerConfig:
    lr: float = 6.4e-5
    weight_decay: float = 1e-4  # decoupled (AdamW); never on norms, biases, embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 0.0  # max global gradient norm; 0 = no clipping

    def validate(self, key: str, source: str) -> None:
        if self.lr <= 0:
            _fail(f"{key}.lr", f"must be positive, got {self.lr}", source)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail(f"{key}.betas", f"must be two numbers in [0, 1), got {self.betas}", source)


@dataclass
class SchedulerConfig:
    warmup_steps: int = 250
    decay: str = "cosine"  # cosine | linear | step | constant
    min_lr_ratio: float = 0.01  # cosine/linear end at lr * min_lr_ratio
    milestones: list[float] = field(default_factory=lambda: [0.67, 0.9])  # step: fractions of training
    step_factor: float = 0.1  # step: lr multiplied by this at each milestone

    def validate(self, key: str, source: str) -> None:
        if self.decay not in DECAY_CHOICES:
            _fail(f"{key}.decay", f"must be one of {', '.join(DECAY_CHOICES)}, got {self.decay!r}", source)
        if self.warmup_steps < 0:
            _fail(f"{key}.warmup_steps", f"must not be negative, got {self.warmup_steps}", source)
        if not 0 <= self.min_lr_ratio <= 1:
            _fail(f"{key}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}", source)
        if any(not 0 < m < 1 for m in self.milestones):
            _fail(
                f"{key}.milestones", f"must be fractions of training in (0, 1), got {self.milestones}", source
            )


@dataclass
class LossConfig:
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    # Rounds that predict several masks per object: back-propagate focal + dice of the one with the
    # lowest loss (min_loss, the SAM paper) or of the one with the highest predicted IoU (best_iou, the seed).
    multimask_choice: str = "min_loss"
    # The focal term: paper (per-pixel sigmoid focal loss, alpha 0.25, gamma 2) or seed (the seed's
    # 0.8 * (1 - exp(-m))^2 * m on each mask's mean BCE m).
    focal: str = "paper"

    def validate(self, key: str, source: str) -> None:
        if self.multimask_choice not in ("min_loss", "best_iou"):
            _fail(
                f"{key}.multimask_choice",
                f"must be min_loss or best_iou, got {self.multimask_choice!r}",
                source,
            )
        if self.focal not in ("paper", "seed"):
            _fail(f"{key}.focal", f"must be paper or seed, got {self.focal!r}", source)


@dataclass
class PointConfig:
    """The simulated clicks of ``prompt_mode: point`` (samkit.training.modes.point); paper defaults."""

    num_iter: int = 11  # rounds per batch: the first prompt, then one click per round
    # Rounds that add no click (the mask input alone): round numbers, "last", "random" (one per object).
    mask_only_iter: list[str] = field(default_factory=lambda: ["random", "last"])
    first_prompt: str = "mixed"  # point (a click inside the mask) | mixed (a click or a noisy box, 50/50)
    accumulate_points: bool = True  # keep every earlier click in the prompt (false: the seed, new click only)
    box_noise: float = 0.1  # std of each box coordinate's shift, as a fraction of the box side
    max_box_noise: float = 20.0  # the shift is clipped to this many pixels (input frame)

    def validate(self, key: str, source: str) -> None:
        from .modes.point import check_schedule

        try:
            check_schedule(self.num_iter, self.mask_only_iter, self.first_prompt)
        except ValueError as err:
            _fail(key, str(err), source)
        if self.box_noise < 0 or self.max_box_noise < 0:
            _fail(f"{key}.box_noise/max_box_noise", "must not be negative", source)


@dataclass
class TextConfig:
    """The crop-feature prompts of ``prompt_mode: text`` (samkit.training.modes.text); seed defaults."""

    encoder: str = "clip"  # clip | blip2 (samkit.text.FEATURE_ENCODERS)
    model: Optional[str] = (
        None  # Hugging Face name or save_pretrained folder (default: the seed's for encoder)
    )
    feature_dim: int = 768  # the encoder's feature size (CLIP ViT-L/14: 768, BLIP-2: 256)
    min_area: int = 10000  # objects below this mask area (original pixels) are not prompted
    max_expand: float = 2.0  # the crop box is the mask's box expanded by U(1, max_expand)
    mask_background_prob: float = 0.5  # probability of zeroing the crop's background
    # Draw each object's crop from (seed, image, object) alone, the same every epoch (default: a new
    # crop every epoch); needed to cache the crop features with cache_embeddings: true.
    fixed_crops: bool = False
    # Category-name evaluation (eval_prompt: text on COCO): the prompt for a category; {} = its name
    # ("{}" alone prompts with the bare name).
    template: str = "a photo of a {}"

    def validate(self, key: str, source: str) -> None:
        if self.encoder not in ("clip", "blip2"):
            _fail(f"{key}.encoder", f"must be clip or blip2, got {self.encoder!r}", source)
        if self.template.count("{}") != 1:
            _fail(
                f"{key}.template",
                f"must hold one {{}} where the category name goes, got {self.template!r}",
                source,
            )
        if self.max_expand < 1 or not 0 <= self.mask_background_prob <= 1 or self.feature_dim < 1:
            _fail(key, "needs max_expand >= 1, 0 <= mask_background_prob <= 1 and feature_dim >= 1", source)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train_data: Optional[DataConfig] = None
    eval_data: Optional[DataConfig] = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    point: PointConfig = field(default_factory=PointConfig)
    text: TextConfig = field(default_factory=TextConfig)
    work_dir: str = "./work_dir/run"
    epochs: int = 8
    batch_size: int = 16  # global: split evenly over the processes
    max_steps: Optional[int] = (
        None  # stop after this many optimizer steps (the schedule still spans all epochs)
    )
    amp: str = "off"  # off | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N | ...
    seed: int = 42
    eval_every: int = 1  # epochs between evaluations (0 = only `python eval.py`)
    eval_batch_size: int = 1
    save_every_steps: int = 0  # also checkpoint every N steps (0 = only at epoch ends)
    keep_checkpoints: int = 2  # full training checkpoints kept in work_dir/checkpoints (0 = all)
    log_every: int = 10  # steps between log lines / TensorBoard points
    tensorboard: bool = True
    progress: bool = True  # console progress bar
    cache_embeddings: bool = False  # frozen image encoder: compute embeddings once, reuse every epoch
    cache_dir: Optional[str] = None  # default <work_dir>/embedding_cache
    resume: Optional[str] = None  # "auto" (newest checkpoint in work_dir) or a checkpoint path
    eval_output: Optional[str] = None  # eval.py's JSON (default <work_dir>/eval_<checkpoint>.json)
    prompt_mode: str = "box"  # box | point (iterative clicks, see point:) | text (crop features, see text:)
    eval_prompt: Optional[str] = None  # box | point | text | volume (eval.py) (default: the prompt_mode's)

    def validate(self, source: str = "config") -> None:
        """Every section's checks, then the run's own keys, then those that span sections; each error
        names the key and ``source``."""
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value):
                value.validate(section.name, source)
        self._validate_run_keys(source)
        _validate_across_sections(self, source)

    def _validate_run_keys(self, source: str) -> None:
        if self.amp not in AMP_CHOICES + ("auto",):
            _fail("amp", f"must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}", source)
        if self.prompt_mode not in PROMPT_MODES:
            _fail(
                "prompt_mode", f"must be one of {', '.join(PROMPT_MODES)}, got {self.prompt_mode!r}", source
            )
        if self.eval_prompt is not None and self.eval_prompt not in EVAL_PROMPTS:
            _fail(
                "eval_prompt", f"must be one of {', '.join(EVAL_PROMPTS)}, got {self.eval_prompt!r}", source
            )
        for key in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, key) < 1:
                _fail(key, f"must be at least 1, got {getattr(self, key)}", source)
        for key in ("eval_every", "save_every_steps", "keep_checkpoints"):
            if getattr(self, key) < 0:
                _fail(key, f"must not be negative, got {getattr(self, key)}", source)
        if self.max_steps is not None and self.max_steps < 1:
            _fail("max_steps", f"must be at least 1, got {self.max_steps}", source)
        if self.resume not in (None, "auto") and not os.path.isfile(self.resume):
            _fail("resume", f"must be 'auto' or an existing checkpoint file, got {self.resume!r}", source)


def _validate_across_sections(cfg: TrainConfig, source: str) -> None:
    """The checks that read more than one section."""
    if cfg.prompt_mode == "text" and cfg.cache_embeddings and not cfg.text.fixed_crops:
        _fail(
            "cache_embeddings",
            "with prompt_mode text needs text.fixed_crops: true (re-randomised crops cannot be cached)",
            source,
        )


# ---------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config, apply ``key=value`` overrides, check everything. Raises ConfigError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}") from None
    except UnicodeDecodeError:  # eval.py -c picture.png
        raise ConfigError(f"{path} is not a YAML config (not UTF-8 text)") from None
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(raw).__name__}")
    source = path
    if overrides:
        # Name what is at fault: the overrides when the file alone is a valid config, else both.
        shown = "-o " + " -o ".join(overrides)
        try:
            _build(TrainConfig, _rename_seed_keys(copy.deepcopy(raw)), prefix="", source=path).validate(path)
            source = f"{shown} (on {path})"
        except ConfigError:
            source = f"{path} with {shown}"
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(TrainConfig, _rename_seed_keys(raw), prefix="", source=source)
    cfg.validate(source)
    return cfg


def config_from_dict(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    cfg = _build(TrainConfig, _rename_seed_keys(dict(raw)), prefix="", source=source)
    cfg.validate(source)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optimizer.lr=1e-4)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    # The seed's spellings, applied here so that they beat the file's own keys.
    if key == "amp_level":
        key, value = "amp", _amp_from_level(value)
    elif key.startswith("network.model."):
        key = key[len("network.") :]
    elif key in ("network.num_iter", "network.mask_only_iter"):
        key = "point." + key[len("network.") :]
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _rename_seed_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """The seed's spellings: ``amp_level``, ``network.model.*``, ``iterative_training: true`` (= ``prompt_mode:
    point``) and ``network.num_iter`` / ``network.mask_only_iter`` (= ``point.*``)."""
    raw = dict(raw)
    if "amp_level" in raw:
        raw.setdefault("amp", _amp_from_level(raw.pop("amp_level")))
    if "iterative_training" in raw:
        iterative = raw.pop("iterative_training")
        if not isinstance(iterative, bool):
            raise ConfigError(f"config key iterative_training must be true or false, got {iterative!r}")
        if iterative:
            raw["prompt_mode"] = "point"
    network = raw.pop("network", None)
    if network is not None:
        if not isinstance(network, dict) or set(network) - {"model", "num_iter", "mask_only_iter"}:
            raise ConfigError(
                "only network.model.<key>, network.num_iter and network.mask_only_iter are understood "
                "(the seed's spellings of model.<key> and point.<key>)"
            )
        model = dict(raw.get("model") or {})
        model.update(network.get("model") or {})
        raw["model"] = model
        point = {k: v for k, v in network.items() if k != "model"}
        if point:
            raw["point"] = {**point, **(raw.get("point") or {})}  # -o network.* was already put here
    return raw


def _amp_from_level(level: Any) -> str:
    if str(level) not in ("O0", "O1", "O2", "O3"):
        raise ConfigError(f"amp_level must be O0, O1, O2 or O3, got {level!r}")
    return "off" if str(level) == "O0" else "auto"


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping in {source}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]} in {source} (valid keys here: {', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}", source) for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key, source)
    if dataclasses.is_dataclass(hint):
        return hint() if value is None else _build(hint, value, key + ".", source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key} must be a list, got {value!r} in {source}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if hint not in _SCALARS:
        raise TypeError(f"unsupported config type {hint} for {key}")  # a bug in this file, not a user mistake
    return _SCALARS[hint](value, key, source)


def _to_bool(value: Any, key: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config key {key} must be true or false, got {value!r} in {source}")
    return value


def _to_int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config key {key} must be an integer, got {value!r} in {source}")
    return value


def _to_float(value: Any, key: str, source: str) -> float:
    if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config key {key} must be a number, got {value!r} in {source}")
    if not math.isfinite(value):  # `lr: .nan` passed every range check and trained on NaN
        raise ConfigError(f"config key {key} must be a finite number, got {value!r} in {source}")
    return float(value)


def _to_str(value: Any, key: str, source: str) -> str:
    if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans: `amp: off` means "off"
        return "on" if value else "off"
    if not isinstance(value, (str, int, float)):
        raise ConfigError(f"config key {key} must be a string, got {value!r} in {source}")
    return str(value)


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def resolve_amp(amp: str, device_type: str) -> str:
    """``auto`` (from the seed's amp_level O1-O3) -> bf16 on CPUs, fp16 on GPUs."""
    if amp == "auto":
        return "bf16" if device_type == "cpu" else "fp16"
    return amp
