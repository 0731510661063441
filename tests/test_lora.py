"""LoRA fine-tuning (``model.lora``, :mod:`samkit.lora`) with the tiny model on generated COCO data.

What is checked: only the adapters and the parameters left trainable change; the run writes the merged
plain SAM and an adapter file whose merge into the base checkpoint gives the same bits, and whose
unmerged (peft) model gives the merged model's masks; ``--adapter`` on the commands and ``samkit merge``;
a base of other weights is refused in one line; ``cache_embeddings`` with an adapted encoder is refused;
point prompts under bf16 autocast resume bit-identically; activation checkpointing changes nothing;
two gloo processes equal one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from samkit import build_model
from samkit.errors import CheckpointError, ConfigError
from samkit.lora import ADAPTER_NAME, LORA_TARGETS, adapted_layers, apply_adapter, read_adapter
from samkit.training.checkpointing import latest_checkpoint
from samkit.training.config import config_from_dict, load_config
from samkit.training.train import train

from .conftest import SMALL_FRAME
from .datagen import make_coco_splits
from .test_cli import assert_one_line_error
from .test_train import (
    SUMMATION_ATOL,
    assert_same_weights,
    final_state,
    losses_of,
    make_config,
    run_cli,
    set_keys,
    torchrun,
    write_config,
)

pytest.importorskip("peft")

ENCODER_AND_DECODER = ["encoder_qkv", "encoder_proj", "decoder_mlp"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco_splits(tmp_path_factory.mktemp("coco"), train_images=8, val_images=4)


def lora_config(coco, work_dir, checkpoint, targets=ENCODER_AND_DECODER, **overrides) -> dict:
    cfg = make_config(coco, work_dir, checkpoint, epochs=1, batch_size=2, **{"model.image_size": SMALL_FRAME})
    cfg["model"]["lora"] = {"rank": 4, "alpha": 8, "targets": list(targets)}
    return set_keys(cfg, overrides)


@pytest.fixture(scope="module")
def box_run(coco, small_frame_checkpoint, tmp_path_factory):
    """(work_dir, result) of a 3-step box-prompt run with LoRA on the encoder's attention and the
    decoder's MLPs (the rest of the decoder trains in full, the prompt encoder is frozen)."""
    work = tmp_path_factory.mktemp("lora") / "run"
    result = train(config_from_dict(lora_config(coco, work, small_frame_checkpoint)))
    return work, result


def test_only_adapters_and_trainable_parameters_change(box_run, small_frame_checkpoint):
    work, result = box_run
    assert result["step"] == 3
    base = torch.load(small_frame_checkpoint, weights_only=True)
    state = torch.load(latest_checkpoint(str(work)), weights_only=True)["model"]  # peft's names: resume
    qkv = "image_encoder.blocks.0.attn.qkv"
    assert torch.equal(state[f"{qkv}.base_layer.weight"], base[f"{qkv}.weight"])  # frozen under LoRA
    assert state[f"{qkv}.lora_B.default.weight"].abs().sum() > 0  # B starts at zero: it trained
    for key, value in base.items():  # the encoders' own weights are frozen, the decoder's free ones train
        name = (
            key
            if key in state
            else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        if (
            key.startswith(("image_encoder.", "prompt_encoder."))
            or ".mlp.lin" in key
            and "transformer" in key
        ):
            assert torch.equal(state[name], value), key
    assert not torch.equal(state["mask_decoder.iou_token.weight"], base["mask_decoder.iou_token.weight"])
    log = (work / "metrics.jsonl").read_text()
    assert log  # the run logged its steps


def test_adapter_file_merges_into_the_final_checkpoint(box_run, coco, small_frame_checkpoint, tmp_path):
    """sam_final.pth is the merged plain SAM: base + adapter file gives it bit for bit; samkit merge
    writes it; the unmerged (peft) model's masks equal the merged model's."""
    work, _ = box_run
    final = final_state(work)
    info = read_adapter(work / ADAPTER_NAME)
    assert (info.rank, info.alpha, info.model_type) == (4, 8.0, "vit_tiny")
    lora_keys = [k for k in info.tensors if ".lora_" in k]
    assert len(lora_keys) == 2 * (2 * 2 + 2 * 2)  # A and B of qkv, proj (2 blocks), lin1, lin2 (2 layers)
    assert all(k.startswith("mask_decoder.") for k in info.tensors if ".lora_" not in k)
    model = build_model("vit_tiny", small_frame_checkpoint)
    apply_adapter(model, work / ADAPTER_NAME)
    assert_same_weights(model.state_dict(), final)

    merged_path = tmp_path / "merged.pth"
    from samkit.commands.main import main

    assert main(["merge", "--model-type", "vit_tiny", "--checkpoint", small_frame_checkpoint,
                 "--adapter", str(work / ADAPTER_NAME), "--output", str(merged_path)]) == 0  # fmt: skip
    assert_same_weights(torch.load(merged_path, weights_only=True), final)

    # The unmerged model of the last training checkpoint (peft layers) against the merged one.
    from samkit.predictor import SamPredictor
    from samkit.training.config import LoraConfig
    from samkit.training.setup import add_lora_adapters

    cfg = config_from_dict(lora_config(coco, tmp_path, None))
    unmerged = build_model("vit_tiny", image_size=SMALL_FRAME)
    assert isinstance(cfg.model.lora, LoraConfig)
    add_lora_adapters(cfg, unmerged)
    unmerged.load_state_dict(torch.load(latest_checkpoint(str(work)), weights_only=True)["model"])
    assert adapted_layers(unmerged)
    image = (np.random.default_rng(0).random((200, 240, 3)) * 255).astype(np.uint8)
    boxes = np.array([[20, 30, 120, 150], [100, 40, 230, 190]], dtype=np.float32)
    masks = []
    for sam in (unmerged, model):
        predictor = SamPredictor(sam.eval())
        predictor.set_image(image)
        logits, _, _ = predictor.predict_torch(
            None,
            None,
            boxes=predictor.transform.apply_boxes_torch(torch.as_tensor(boxes), image.shape[:2]),
            multimask_output=False,
            return_logits=True,
        )
        masks.append(logits)
    torch.testing.assert_close(masks[0], masks[1], atol=1e-4, rtol=1e-4)
    assert torch.equal(masks[0] > 0, masks[1] > 0)


def test_adapter_on_the_commands_and_a_wrong_base(box_run, small_frame_checkpoint, tmp_path, capsys):
    work, _ = box_run
    from samkit.commands.main import main

    image = tmp_path / "photo.png"
    from PIL import Image

    Image.fromarray((np.random.default_rng(1).random((160, 200, 3)) * 255).astype(np.uint8)).save(image)

    def box(checkpoint, out, *extra):
        return main(["box", "--model-type", "vit_tiny", "--checkpoint", checkpoint, "--image-path", str(image),
                     "--box", "20,20,150,120", "--output-dir", str(out), *extra])  # fmt: skip

    assert box(small_frame_checkpoint, tmp_path / "a", "--adapter", str(work / ADAPTER_NAME)) == 0
    assert box(str(work / "sam_final.pth"), tmp_path / "b") == 0
    capsys.readouterr()
    (a,) = (tmp_path / "a").glob("*.npz")
    (b,) = (tmp_path / "b").glob("*.npz")
    assert np.array_equal(np.load(a)["masks"], np.load(b)["masks"])

    # Another base (the run's own merged weights): one line naming the adapter and the fix.
    other = str(work / "sam_final.pth")
    assert box(other, tmp_path / "c", "--adapter", str(work / ADAPTER_NAME)) == 2
    assert_one_line_error(2, capsys.readouterr().err, "was trained on other base weights")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.npz"))
    assert box(small_frame_checkpoint, tmp_path / "d", "--adapter", str(tmp_path / "none.safetensors")) == 2
    assert_one_line_error(2, capsys.readouterr().err, "--adapter")
    assert box(small_frame_checkpoint, tmp_path / "e", "--adapter", str(image)) == 2
    assert_one_line_error(2, capsys.readouterr().err, "not a safetensors file")
    with pytest.raises(CheckpointError, match="is for vit_tiny, the model is vit_b"):
        apply_adapter(build_model("vit_b", image_size=64), work / ADAPTER_NAME)


def test_config_mistakes_and_cache_embeddings(coco, small_frame_checkpoint, tmp_path):
    cfg = load_config(write_config(tmp_path, make_config(coco, tmp_path / "w", None)), ["model.lora.rank=8"])
    assert cfg.model.lora is not None and cfg.model.lora.rank == 8 and cfg.model.lora.targets
    assert set(LORA_TARGETS) >= {"encoder_qkv", "encoder_proj", "encoder_mlp", "decoder_attn", "decoder_mlp"}
    with pytest.raises(ConfigError, match=r"model.lora.targets"):
        config_from_dict(lora_config(coco, tmp_path / "w", None, targets=["(unclosed"]))
    with pytest.raises(ConfigError, match="model.lora"):
        config_from_dict(lora_config(coco, tmp_path / "w", None, **{"model.lora.rank": 0}))
    with pytest.raises(ConfigError, match="'no_such_layer' matches no linear layer"):
        train(
            config_from_dict(
                lora_config(coco, tmp_path / "w", small_frame_checkpoint, targets=["no_such_layer"])
            )
        )
    encoder = lora_config(coco, tmp_path / "w", small_frame_checkpoint, cache_embeddings=True)
    with pytest.raises(ConfigError, match="cache_embeddings needs a frozen image encoder: model.lora"):
        train(config_from_dict(encoder))
    assert not (tmp_path / "w").exists()  # refused before anything is written
    # A decoder-only adapter keeps the encoder frozen: the cache works.
    decoder = lora_config(coco, tmp_path / "d", small_frame_checkpoint, targets=["decoder_attn"],
                          cache_embeddings=True, max_steps=1)  # fmt: skip
    assert train(config_from_dict(decoder))["cache"]["misses"] == 2


def test_point_prompts_with_bf16_resume_bit_identically(coco, small_frame_checkpoint, tmp_path):
    """Point mode (3 rounds), bf16 autocast, LoRA with dropout: stopped after 1 step and resumed
    mid-epoch, the same weights, adapter and last loss as one run of 2 steps."""
    common = {"amp": "bf16", "prompt_mode": "point", "model.lora.dropout": 0.1}
    cfg = lora_config(coco, tmp_path / "whole", small_frame_checkpoint, **common)
    cfg["point"] = {"num_iter": 3, "mask_only_iter": ["last"]}
    cfg["train_data"]["max_images"] = 4
    whole = train(config_from_dict(cfg))
    stopped = {**cfg, "work_dir": str(tmp_path / "parts"), "max_steps": 1}
    assert train(config_from_dict(stopped))["step"] == 1
    resumed = train(config_from_dict({**stopped, "max_steps": None, "resume": "auto"}))
    assert whole["step"] == resumed["step"] == 2
    assert_same_weights(final_state(tmp_path / "whole"), final_state(tmp_path / "parts"))
    assert losses_of(tmp_path / "parts")[-1] == losses_of(tmp_path / "whole")[-1]
    whole_adapter = read_adapter(tmp_path / "whole" / ADAPTER_NAME).tensors
    assert_same_weights(whole_adapter, read_adapter(tmp_path / "parts" / ADAPTER_NAME).tensors)


def test_grad_checkpointing_gives_the_same_weights(coco, small_frame_checkpoint, tmp_path):
    """Activation checkpointing of the encoder blocks: the same training step, bit for bit."""
    runs = {}
    for flag in (False, True):
        cfg = lora_config(coco, tmp_path / str(flag), small_frame_checkpoint, max_steps=1)
        cfg["model"]["grad_checkpointing"] = flag
        train(config_from_dict(cfg))
        runs[flag] = final_state(tmp_path / str(flag))
    assert_same_weights(runs[False], runs[True])


def test_two_processes_equal_one(coco, small_frame_checkpoint, tmp_path):
    """torchrun, 2 gloo processes with batch 2 each == one process with batch 4, LoRA on the encoder."""
    base = lora_config(
        coco, tmp_path / "one", small_frame_checkpoint, batch_size=4, **{"optimizer.eps": 1e-3}
    )  # fmt: skip  (see tests/test_train.py)
    train(config_from_dict(base))
    cfg = write_config(tmp_path, {**base, "work_dir": str(tmp_path / "two")})
    two = torchrun("train.py", "-c", cfg)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_weights(final_state(tmp_path / "one"), final_state(tmp_path / "two"), atol=SUMMATION_ATOL)
    one_adapter = read_adapter(tmp_path / "one" / ADAPTER_NAME)
    two_adapter = read_adapter(tmp_path / "two" / ADAPTER_NAME)
    assert one_adapter.base_sha256 == two_adapter.base_sha256
    assert_same_weights(one_adapter.tensors, two_adapter.tensors, atol=SUMMATION_ATOL)
    assert losses_of(tmp_path / "two") == pytest.approx(losses_of(tmp_path / "one"), rel=1e-5)


def test_eval_takes_an_adapter(box_run, coco, small_frame_checkpoint, tmp_path):
    """eval.py --adapter (model.adapter) scores the same model as eval.py on the merged checkpoint."""
    work, _ = box_run
    cfg = write_config(
        tmp_path, make_config(coco, tmp_path, small_frame_checkpoint, **{"model.image_size": SMALL_FRAME})
    )
    out1, out2 = tmp_path / "adapter.json", tmp_path / "merged.json"
    one = run_cli([sys.executable, "eval.py", "-c", cfg, "--adapter", str(work / ADAPTER_NAME),
                   "-o", f"eval_output={out1}"])  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = run_cli([sys.executable, "eval.py", "-c", cfg, "-o", f"model.checkpoint={work / 'sam_final.pth'}",
                   f"eval_output={out2}"])  # fmt: skip
    assert two.returncode == 0, two.stderr
    import json

    r1, r2 = json.loads(Path(out1).read_text()), json.loads(Path(out2).read_text())
    assert r1["miou_1024"] == r2["miou_1024"]
