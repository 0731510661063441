"""The training loop's seam and its guarantees: prompt modes, rounds, gradient exchange, refusals.

- a refused run writes nothing (no work_dir, no metrics.jsonl, no TensorBoard file in a finished run);
- two gloo processes equal one even when the prompt encoder and the image encoder train (box prompts
  leave point and mask embeddings without gradients; DDP used to stop at step 2 there);
- the detached-embedding rounds give the image encoder the same gradient as one backward pass;
- ``prompt_loss`` picks the lowest-loss or the highest-IoU candidate of a multimask round.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from samkit.errors import SamkitError
from samkit.training import config as config_module
from samkit.training import modes
from samkit.training.config import config_from_dict
from samkit.training.losses import prompt_loss, sam_loss, upsample_logits
from samkit.training.modes import TrainBatch
from samkit.training.modes.box import BoxPrompts
from samkit.training.params import freeze_parameters
from samkit.training.train import train

from .conftest import SMALL_FRAME
from .datagen import make_coco_dataset
from .test_train import (
    assert_same_weights,
    final_state,
    losses_of,
    make_config,
    set_keys,
    torchrun,
    write_config,
)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_loop")
    train_dir, train_json = make_coco_dataset(root / "train", num_images=6, seed=3, split="train")
    return {"train": (str(train_dir), str(train_json)), "val": (str(train_dir), str(train_json))}


def test_config_names_the_modes_the_loop_has():
    assert config_module.PROMPT_MODES == tuple(modes.PROMPT_MODES)
    assert config_module.EVAL_PROMPTS == (*modes.EVAL_PROTOCOLS, "volume")  # volume: whole scans, eval.py


def snapshot(folder: Path) -> dict[str, int]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


def test_a_refused_run_writes_nothing(coco, tiny_checkpoint, tmp_path):
    """Every refusal after the config parses happens before work_dir is touched."""
    run = tmp_path / "run"
    good = make_config(coco, run, tiny_checkpoint, epochs=1, tensorboard=True)
    broken_json = tmp_path / "truncated.json"
    broken_json.write_text(Path(coco["train"][1]).read_text()[:200])
    images = tmp_path / "images"
    images.mkdir()
    # An annotation file naming an image that is not on disk.
    annotations = json.loads(Path(coco["train"][1]).read_text())
    annotations["images"][0]["file_name"] = "missing.jpg"
    missing_json = tmp_path / "missing.json"
    missing_json.write_text(json.dumps(annotations))
    cases = {
        "data_dir absent": {"train_data.data_dir": str(tmp_path / "nowhere")},
        "truncated annotations": {"train_data.annotation_path": str(broken_json)},
        "batch larger than the data": {"batch_size": 64},
        "image missing on disk": {"train_data.annotation_path": str(missing_json)},
        "unknown freeze prefix": {"model.freeze": ["image_encodr"]},
    }
    for name, overrides in cases.items():
        cfg = set_keys(copy.deepcopy(good), overrides)
        with pytest.raises(SamkitError):
            train(config_from_dict(cfg))
        assert not run.exists(), name
    # A finished run's folder: restarting into it is refused and adds nothing (no TensorBoard file).
    train(config_from_dict(good))
    before = snapshot(run)
    assert any("tensorboard" in p for p in before)
    with pytest.raises(SamkitError, match="resume=auto"):
        train(config_from_dict(good))
    assert snapshot(run) == before


def test_two_processes_equal_one_with_every_encoder_training(coco, small_frame_checkpoint, tmp_path):
    """freeze: [] trains the image encoder (through the detached-embedding path) and the prompt
    encoder, whose point/mask parts box prompts never use: torchrun with 2 gloo processes finishes
    and equals one process with the same global batch (256 frame).

    AdamW's eps is 1: the update is then about lr x gradient, so float noise in the gradient sums
    (another order in 2 processes) stays noise (max 1e-6 on the Xeon with AMX), where eps 1e-3 turned
    the noise in gradients near zero into updates of up to 1.6e-4 (first step lr 5e-4) and failed
    there; a wrongly reduced gradient still moves most weights by > 1e-5 (62% of them change by more)."""
    tiny_checkpoint = small_frame_checkpoint
    overrides = {"optimizer.eps": 1.0, "model.freeze": [], "model.image_size": SMALL_FRAME}
    base = make_config(coco, tmp_path / "one", tiny_checkpoint, epochs=1, **overrides)
    train(config_from_dict(base))
    cfg = write_config(tmp_path, {**base, "work_dir": str(tmp_path / "two")})
    two = torchrun("train.py", "-c", cfg)
    assert two.returncode == 0, two.stderr[-3000:]
    one_state, two_state = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert_same_weights(one_state, two_state, atol=1e-5)
    start = torch.load(tiny_checkpoint, weights_only=True)
    for prefix in ("image_encoder.", "prompt_encoder.point_embeddings.2", "mask_decoder."):
        assert any(not torch.equal(start[k], one_state[k]) for k in start if k.startswith(prefix)), prefix
    # Box prompts never reach the point embeddings of labels 0/1: no gradient, no AdamW update.
    for key in ("prompt_encoder.point_embeddings.0.weight", "prompt_encoder.point_embeddings.1.weight"):
        assert torch.equal(start[key], one_state[key]) and torch.equal(start[key], two_state[key])
    assert losses_of(tmp_path / "two") == pytest.approx(losses_of(tmp_path / "one"), rel=1e-5)


def test_detached_rounds_give_the_encoder_the_same_gradient(tiny_model):
    """The loop decodes from a detached copy of the embeddings and back-propagates into the encoder
    once: the same gradients as back-propagating through everything in one pass."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 1024, 1024)
    batch = TrainBatch(
        masks=(torch.rand(2, 2, 1024, 1024) > 0.5).to(torch.uint8),
        boxes=torch.tensor([[[10.0, 20, 300, 400], [500, 500, 900, 1000]]] * 2),
        valid=torch.tensor([[True, True], [True, False]]),
        index=torch.arange(2),
    )
    grads = []
    for detached in (False, True):
        model = copy.deepcopy(tiny_model)
        freeze_parameters(model, [])
        mode = BoxPrompts(model).train()
        embeddings = mode.embed(images)
        features = embeddings.detach().requires_grad_() if detached else embeddings
        session = mode.session(batch)
        pred = mode(session, features)
        prompt_loss(pred.low_res, pred.iou, session.targets)["loss"].backward()
        if detached:
            embeddings.backward(features.grad)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("image_encoder.") for k in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_prompt_loss_chooses_a_candidate_per_object():
    torch.manual_seed(1)
    blocks = (torch.rand(3, 16, 16) > 0.5).float()
    targets = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2).to(torch.uint8)  # 3x64x64
    low_res = torch.randn(3, 3, 16, 16)
    # Object 0's second candidate is (nearly) its target; object 1's third; object 2's first.
    for obj, cand in ((0, 1), (1, 2), (2, 0)):
        low_res[obj, cand] = (blocks[obj] - 0.5) * 40
    iou = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.8, 0.1], [0.1, 0.2, 0.7]])
    low_res.requires_grad_()
    best = prompt_loss(low_res, iou, targets, multimask_choice="min_loss")
    best["loss"].backward()
    touched = low_res.grad.abs().sum(dim=(2, 3)) > 0
    assert touched.tolist() == [[False, True, False], [False, False, True], [True, False, False]]
    by_iou = prompt_loss(low_res.detach(), iou, targets, multimask_choice="best_iou")
    assert by_iou["focal"] > best["focal"]  # the IoU head's choice is worse here by construction
    # One candidate: exactly sam_loss over the objects.
    single = prompt_loss(low_res.detach()[:, :1], iou[:, :1], targets)
    ref = sam_loss(upsample_logits(low_res.detach()[:, 0], 64)[None], iou[None, :, 0], targets[None],
                   torch.ones(1, 3, dtype=torch.bool))  # fmt: skip
    for key in ("loss", "focal", "dice", "iou"):
        assert torch.equal(single[key], ref[key]), key
    with pytest.raises(ValueError, match="multimask_choice"):
        prompt_loss(low_res.detach(), iou, targets, multimask_choice="best")


def test_training_runs_with_the_mode_from_the_config(coco, tiny_checkpoint, tmp_path):
    cfg = make_config(coco, tmp_path / "run", tiny_checkpoint, epochs=1, prompt_mode="box", eval_every=1)
    result = train(config_from_dict(cfg))
    assert result["step"] == 1 and result["eval"]["objects_1024"] > 0
    assert os.path.exists(tmp_path / "run" / "sam_final.pth")
    with pytest.raises(SamkitError, match="prompt_mode"):
        config_from_dict({**cfg, "prompt_mode": "scribble"})


def test_evaluation_json_holds_a_nan_metric_as_null(tmp_path):
    """A metric over no objects is NaN; the evaluation file must stay strict JSON (null there)."""
    from samkit.training.evaluate import write_json

    path = tmp_path / "eval.json"
    write_json({"miou_1024": float("nan"), "per_category": {"cat": [1.5, float("inf")]}, "n": 3}, str(path))

    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "miou_1024": None,
        "per_category": {"cat": [1.5, None]},
        "n": 3,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]
