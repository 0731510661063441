"""Configs: every shipped YAML loads; unknown keys and wrong types fail with the key's name; the
learning-rate schedule, the data order over processes and the checkpoint helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from samkit.errors import ConfigError
from samkit.training.checkpointing import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    save_atomically,
)
from samkit.training.config import TrainConfig, load_config
from samkit.training.distributed import epoch_batches, shard_indices
from samkit.training.params import freeze_parameters, parameter_groups
from samkit.training.schedule import lr_at

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"coco_box_finetune.yaml", "flare_box_finetune.yaml", "sa1b_box_finetune.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.type == "vit_b"
    assert cfg.train_data is not None
    assert set(cfg.model.freeze) >= {"image_encoder", "prompt_encoder"}


def test_seed_recipes():
    coco = load_config(ROOT / "configs/coco_box_finetune.yaml")
    flare = load_config(ROOT / "configs/flare_box_finetune.yaml")
    sa1b = load_config(ROOT / "configs/sa1b_box_finetune.yaml")
    assert (coco.batch_size, coco.epochs, coco.optimizer.lr) == (16, 8, 6.4e-5)
    assert (flare.batch_size, flare.epochs, flare.optimizer.lr) == (16, 20, 1.28e-4)
    assert (sa1b.batch_size, sa1b.epochs, sa1b.optimizer.lr) == (16, 8, 8e-6)
    assert coco.eval_data.max_objects == 40 and coco.train_data.max_objects == 20
    assert flare.train_data.box_jitter == 20 and flare.eval_data.box_jitter == 20
    assert sa1b.train_data.min_area == 10000 and sa1b.eval_data is None


def test_overrides():
    cfg = load_config(
        ROOT / "configs/coco_box_finetune.yaml",
        [
            "amp=fp16",
            "optimizer.lr=1e-4",
            "train_data.max_objects=5",
            "resume=auto",
            "model.freeze=[image_encoder]",
        ],
    )
    assert cfg.amp == "fp16" and cfg.optimizer.lr == 1e-4 and cfg.train_data.max_objects == 5
    assert cfg.resume == "auto" and cfg.model.freeze == ["image_encoder"]


def test_amp_off_is_not_a_boolean(tmp_path):
    assert load_config(ROOT / "configs/coco_box_finetune.yaml", ["amp=off"]).amp == "off"
    with pytest.raises(ConfigError, match="amp"):
        load_config(ROOT / "configs/coco_box_finetune.yaml", ["amp=on"])


def test_seed_spellings():
    cfg = load_config(
        ROOT / "configs/coco_box_finetune.yaml", ["amp_level=O0", "network.model.checkpoint=/x/sam.ckpt"]
    )
    assert cfg.amp == "off" and cfg.model.checkpoint == "/x/sam.ckpt"
    cfg = load_config(ROOT / "configs/coco_box_finetune.yaml", ["amp_level=O2", "amp=auto"])
    assert cfg.amp == "auto"


@pytest.mark.parametrize(
    "override, key",
    [
        ("optimizer.lrr=1", "optimizer.lrr"),
        ("epochz=3", "epochz"),
        ("epochs=three", "epochs"),
        ("epochs=2.5", "epochs"),
        ("batch_size=0", "batch_size"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("tensorboard=maybe", "tensorboard"),
        ("amp=fp8", "amp"),
        ("scheduler.decay=exp", "scheduler.decay"),
        ("train_data.type=voc", "train_data.type"),
        ("optimizer.betas=0.9", "optimizer.betas"),
        ("model=vit_b", "model"),
        ("resume=/no/such/file.pt", "resume"),
        ("amp_level=O9", "amp_level"),
        ("optimizer.lr=nan", "optimizer.lr"),  # NaN passed `lr > 0` checks' negation and trained on NaN
        ("optimizer.weight_decay=.inf", "optimizer.weight_decay"),
        ("loss.focal_weight=-.inf", "loss.focal_weight"),
        ("model.type=vit_q", "model.type"),  # a traceback from build_model before
    ],
)
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/coco_box_finetune.yaml", [override])
    message = str(err.value)
    assert key in message and "\n" not in message


def test_errors_name_the_override_or_the_file_at_fault(tmp_path):
    """A valid file with a bad ``-o``: the message names the override (the file does not hold the
    value); a bad file: the file, and the overrides given with it."""
    coco = ROOT / "configs/coco_box_finetune.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(coco, ["amp=bf16", "epochs=-1"])
    assert (
        str(err.value)
        == f"config key epochs must be at least 1, got -1 in -o amp=bf16 -o epochs=-1 (on {coco})"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(coco.read_text() + "batch_size: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, ["epochs=-1"])
    assert str(err.value).endswith(f"in {bad} with -o epochs=-1")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value) == f"config key batch_size must be at least 1, got 0 in {bad}"


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  type: vit_b\n  chekpoint: x.pth\n")
    with pytest.raises(ConfigError, match=r"model\.chekpoint .*unknown.yaml"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ROOT / "configs/coco_box_finetune.yaml", ["amp"])


def test_lr_schedule_warms_up_and_decays():
    kw = dict(warmup_steps=10, min_lr_ratio=0.01)
    lrs = [lr_at(s, 100, 1.0, decay="cosine", **kw) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.01)
    linear = [lr_at(s, 100, 1.0, decay="linear", **kw) for s in range(100)]
    assert linear[-1] == pytest.approx(0.01) and linear[54] == pytest.approx((1 + 0.01) / 2, abs=0.02)
    step = [
        lr_at(s, 100, 1.0, decay="step", warmup_steps=0, milestones=[0.5, 0.8], step_factor=0.1)
        for s in range(100)
    ]
    assert step[49] == 1.0 and step[50] == pytest.approx(0.1) and step[80] == pytest.approx(0.01)
    assert lr_at(99, 100, 1.0, decay="constant", warmup_steps=0) == 1.0


def test_epoch_batches_split_the_global_batch():
    one = epoch_batches(23, 4, seed=1, epoch=0)
    assert len(one) == 5 and len({i for b in one for i in b}) == 20
    two = [epoch_batches(23, 4, seed=1, epoch=0, rank=r, world_size=2) for r in range(2)]
    for s in range(5):
        assert two[0][s] + two[1][s] == one[s]
    assert epoch_batches(23, 4, seed=1, epoch=1) != one
    assert epoch_batches(23, 4, seed=1, epoch=0) == one
    with pytest.raises(ValueError):
        epoch_batches(23, 3, seed=1, epoch=0, world_size=2)
    assert sorted(shard_indices(7, 0, 2) + shard_indices(7, 1, 2)) == list(range(7))


def test_freezing_and_parameter_groups(tiny_model):
    trainable = freeze_parameters(tiny_model, ["image_encoder", "prompt_encoder"])
    decoder = sum(p.numel() for p in tiny_model.mask_decoder.parameters())
    assert trainable == decoder
    assert not any(p.requires_grad for p in tiny_model.image_encoder.parameters())
    groups = parameter_groups(tiny_model, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in tiny_model.named_parameters() if id(p) in decayed}
    assert names and all(n.endswith("weight") for n in names)
    assert not any("norm" in n or "token" in n for n in names)
    freeze_parameters(tiny_model, ["image_encoder"], ["image_encoder.neck"])
    assert all(p.requires_grad for p in tiny_model.image_encoder.neck.parameters())
    with pytest.raises(ValueError, match="image_encodr"):
        freeze_parameters(tiny_model, ["image_encodr"])
    for p in tiny_model.parameters():
        p.requires_grad_(True)


def test_checkpoint_files(tmp_path):
    work = str(tmp_path)
    for step in (3, 10, 7):
        save_atomically({"step": step}, checkpoint_path(work, step))
    assert [Path(p).name for p in list_checkpoints(work)] == [
        "step_00000003.pt",
        "step_00000007.pt",
        "step_00000010.pt",
    ]
    assert latest_checkpoint(work).endswith("step_00000010.pt")
    prune_checkpoints(work, 2)
    assert len(list_checkpoints(work)) == 2
    assert torch.load(latest_checkpoint(work), weights_only=True)["step"] == 10
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_a_batch_without_objects_still_gives_every_decoder_parameter_a_gradient(tiny_model):
    """Every process exchanges the same set of gradients every step, objects or not."""
    import copy

    from samkit.training.losses import prompt_loss
    from samkit.training.modes import TrainBatch
    from samkit.training.modes.box import BoxPrompts

    model = copy.deepcopy(tiny_model)
    freeze_parameters(model, ["image_encoder", "prompt_encoder"])
    mode = BoxPrompts(model).train()
    embeddings = torch.randn(2, 256, 64, 64)
    batch = TrainBatch(
        masks=torch.zeros(2, 3, 1024, 1024, dtype=torch.uint8),
        boxes=torch.zeros(2, 3, 4),
        valid=torch.zeros(2, 3, dtype=torch.bool),
        index=torch.arange(2),
    )
    session = mode.session(batch)
    pred = mode(session, embeddings)
    assert pred.low_res.shape == (0, 1, 256, 256) and pred.iou.shape == (0, 1)
    loss = prompt_loss(pred.low_res, pred.iou, session.targets)
    loss["loss"].backward()
    assert float(loss["loss"].detach()) == 0.0
    grads = [p.grad for p in model.mask_decoder.parameters()]
    assert all(g is not None and not g.any() for g in grads)


def test_the_optimizer_is_fused_where_torch_has_it_and_steps_like_the_plain_one(tiny_model):
    from samkit.training.params import build_optimizer, fused_adamw_supported

    cpu = torch.device("cpu")
    decoder = tiny_model.mask_decoder
    start = {k: v.clone() for k, v in decoder.state_dict().items()}
    settings = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
    results = []
    for fused in (fused_adamw_supported(cpu), False):
        decoder.load_state_dict(start)
        if fused:
            opt = build_optimizer(decoder, cpu, **settings)
            assert all(group["fused"] for group in opt.param_groups)
        else:
            opt = torch.optim.AdamW(parameter_groups(decoder, 0.1), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
        for step in range(3):
            for i, p in enumerate(decoder.parameters()):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 1000 + i))
            opt.step()
        results.append({k: v.clone() for k, v in decoder.state_dict().items()})
    decoder.load_state_dict(start)
    for k in start:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(results[0][k], start[k]) for k in start)
