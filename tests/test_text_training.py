"""Text-mode training and evaluation beyond one process (issue 12): two gloo processes equal one
(training and both evaluation protocols), the crop-feature cache with fixed crops gives the same
losses as computing the crops, and the category-name evaluation on generated COCO data (its keys,
ranges, determinism, and a hand-checked case).

Tiny vit_tiny SAMs and the tiny random CLIP of tests/test_text_mode.py (its fixtures are imported).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import Subset

from samkit import build_model
from samkit.errors import ConfigError
from samkit.training.config import config_to_dict
from samkit.training.evaluate import evaluate
from samkit.training.metrics import MiouAccumulator, mask_dice, mask_iou
from samkit.training.modes.base import TrainBatch
from samkit.training.modes.text import TextPrompts, category_pairs, score_categories
from samkit.training.train import train

from .conftest import SMALL_FRAME
from .datagen import make_coco_splits
from .test_text_mode import text_config, tiny_clip_dir  # noqa: F401  (a fixture)
from .test_train import SUMMATION_ATOL, assert_same_weights, final_state, losses_of, run_cli, torchrun

CATEGORY_KEYS = [
    f"{m}_{frame}_category_{kind}"
    for m in ("miou", "dice")
    for frame in ("1024", "original")
    for kind in ("best", "union")
]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco_splits(tmp_path_factory.mktemp("text_training_coco"), train_images=6, val_images=5)


def eval_section(coco) -> dict:
    return {
        "type": "coco", "data_dir": coco["val"][0], "annotation_path": coco["val"][1],
        "max_objects": 10, "num_workers": 0,
    }  # fmt: skip


def config(coco, work_dir, clip_dir, checkpoint, text=None, **overrides):
    """tests/test_text_mode.text_config on this module's data, with an eval set (category names)."""
    text = {"encoder": "clip", "model": str(clip_dir), "feature_dim": 12, "min_area": 100, **(text or {})}
    return text_config(
        coco["train"], work_dir, clip_dir, checkpoint, eval_data=eval_section(coco), text=text, **overrides
    )


def pairs_in(annotation_path: str) -> int:
    """(image, category) pairs with a usable (non-crowd, non-empty) instance, read from the JSON."""
    data = json.loads(Path(annotation_path).read_text())
    pairs = {
        (a["image_id"], a["category_id"])
        for a in data["annotations"]
        if not a["iscrowd"] and a["area"] > 0 and a["bbox"][2] > 0 and a["bbox"][3] > 0
    }
    return len(pairs)


# ---------------------------------------------------------------------------------------------------
# Category ids reach the batch; the config keys.


def test_category_ids_reach_the_batch_without_crowds(coco):
    from samkit.data import collate
    from samkit.training.config import DataConfig
    from samkit.training.modes import batch_on_device
    from samkit.training.setup import build_data

    dataset = build_data(DataConfig(**eval_section(coco)), image_size=256, seed=0, for_eval=True)
    assert dataset.categories == {1: "a", 2: "b", 3: "c"}
    data = json.loads(Path(coco["val"][1]).read_text())
    first_id = dataset.image_info(0)["image_id"]  # image 0 has a crowd region: not an instance
    expected = [
        a["category_id"] for a in data["annotations"] if a["image_id"] == first_id and not a["iscrowd"]
    ]
    sample = dataset[0]
    k = int(sample["valid"].sum())
    assert sample["category_ids"][:k].tolist() == expected and (sample["category_ids"][k:] == -1).all()
    batch = batch_on_device(collate([dataset[0], dataset[1]]), torch.device("cpu"))
    assert batch.extra["category_ids"].shape == (2, 10)
    batch.extra["category_names"] = dataset.categories
    pairs = category_pairs(batch)
    assert [p[0] for p in pairs] == sorted(p[0] for p in pairs)
    assert {(b, c, n) for b, c, n in pairs} >= {(0, c, dataset.categories[c]) for c in expected}


def test_text_config_keys(coco, tiny_clip_dir, tiny_checkpoint, tmp_path):  # noqa: F811
    cfg = config(coco, tmp_path, tiny_clip_dir, tiny_checkpoint)
    assert cfg.text.template == "a photo of a {}" and cfg.text.fixed_crops is False
    with pytest.raises(ConfigError, match="text.fixed_crops") as info:
        config(coco, tmp_path, tiny_clip_dir, tiny_checkpoint, cache_embeddings=True)
    assert "\n" not in str(info.value)
    cached = config(
        coco, tmp_path, tiny_clip_dir, tiny_checkpoint, text={"fixed_crops": True}, cache_embeddings=True
    )
    assert cached.cache_embeddings and cached.text.fixed_crops
    for bad in ("a photo", "{} and {}"):
        with pytest.raises(ConfigError, match="text.template"):
            config(coco, tmp_path, tiny_clip_dir, tiny_checkpoint, text={"template": bad})
    assert (
        config(coco, tmp_path, tiny_clip_dir, tiny_checkpoint, text={"template": "{}"}).text.template == "{}"
    )


# ---------------------------------------------------------------------------------------------------
# Category-name evaluation


def text_mode(clip_dir, template="a photo of a {}", seed=0):
    from samkit.text import build_feature_encoder

    torch.manual_seed(seed)
    sam = build_model("vit_tiny", text_feature_dim=12)
    return TextPrompts(
        sam, feature_encoder=build_feature_encoder("clip", clip_dir), min_area=100, template=template
    )


def eval_set(coco, image_size=1024):
    from samkit.training.config import DataConfig
    from samkit.training.setup import build_data

    return build_data(DataConfig(**eval_section(coco)), image_size=image_size, seed=0, for_eval=True)


def test_category_eval_keys_ranges_and_determinism(coco, tiny_clip_dir):  # noqa: F811
    mode = text_mode(tiny_clip_dir)
    calls = []
    encode = mode.feature_encoder.text_features
    mode.feature_encoder.text_features = lambda texts: calls.append(list(texts)) or encode(texts)
    dataset = eval_set(coco)
    first = evaluate(mode, dataset, protocol="text", device=torch.device("cpu"), batch_size=2, seed=3)
    second = evaluate(mode, dataset, protocol="text", device=torch.device("cpu"), batch_size=1, seed=3)
    # The text of every category name was encoded once, in one batch, for both evaluations.
    assert calls == [["a photo of a a", "a photo of a b", "a photo of a c"]]
    for key in CATEGORY_KEYS + ["miou_1024", "miou_original", "dice_1024", "dice_original"]:
        assert 0.0 <= first[key] <= 100.0 and not math.isnan(first[key]), key
        assert first[key] == pytest.approx(second[key], abs=1e-9), key
    pairs = pairs_in(coco["val"][1])
    for frame in ("1024", "original"):
        for kind in ("best", "union"):
            assert first[f"objects_{frame}_category_{kind}"] == pairs
    assert first["objects_1024"] > 0  # the crop-feature protocol still reports
    # The bare name: the names alone are encoded.
    bare = text_mode(tiny_clip_dir, template="{}")
    calls.clear()
    encode = bare.feature_encoder.text_features
    bare.feature_encoder.text_features = lambda texts: calls.append(list(texts)) or encode(texts)
    other = evaluate(bare, Subset(dataset, [0]), protocol="text", device=torch.device("cpu"), seed=3)
    assert calls == [["a", "b", "c"]] and other["objects_1024_category_best"] > 0


def test_category_eval_equals_a_direct_computation(coco, tiny_clip_dir):  # noqa: F811
    """Per (image, category): the text feature of the template through the prompt encoder and mask
    decoder by hand, thresholded at 0, IoU with each instance and with their union."""
    from samkit.data import collate
    from samkit.training.losses import upsample_logits
    from samkit.training.modes import batch_on_device
    from samkit.utils.transforms import upscale_masks

    mode = text_mode(tiny_clip_dir, seed=4).eval()
    sam, enc = mode.sam, mode.feature_encoder
    dataset = eval_set(coco)
    best, union, best_orig, union_orig = [], [], [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        batch = batch_on_device(collate([sample]), torch.device("cpu"))
        with torch.no_grad():
            embedding = sam.image_encoder(batch.images)
        k = int(sample["valid"].sum())
        ids = sample["category_ids"][:k]
        for c in sorted(set(ids.tolist())):
            feat = enc.text_features([f"a photo of a {dataset.categories[c]}"])
            with torch.no_grad():
                sparse, dense = sam.prompt_encoder(None, None, None, text=feat)
                low, _ = sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
            pred = upsample_logits(low[:, 0], 1024)[0] > 0
            inst = batch.masks[0, :k][ids == c].bool()
            ious = [float(mask_iou(pred, m)) for m in inst]
            best.append(max(ious))
            union.append(float(mask_iou(pred, inst.any(0))))
            h, w = sample["original_size"].tolist()
            ih, iw = sample["input_size"].tolist()
            pred_o = upscale_masks(low[:, 0], 1024, (ih, iw), (h, w))[0] > 0
            inst_o = sample["original_masks"][:k][ids == c].bool()
            best_orig.append(max(float(mask_iou(pred_o, m)) for m in inst_o))
            union_orig.append(float(mask_iou(pred_o, inst_o.any(0))))
    got = evaluate(mode, dataset, protocol="text", device=torch.device("cpu"), batch_size=2)
    for key, values in (
        ("1024_category_best", best),
        ("1024_category_union", union),
        ("original_category_best", best_orig),
        ("original_category_union", union_orig),
    ):
        assert got[f"objects_{key}"] == len(values)
        assert got[f"miou_{key}"] == pytest.approx(100 * float(np.mean(values)), abs=1e-4), key


def test_category_scores_of_known_masks():
    """Two instances of category 7 (squares A and B) and one of category 9 (square C), frame 256 =
    the low-res size, so the thresholded logits are the predicted masks exactly."""
    s = 256

    def square(top, left, side):
        m = torch.zeros(s, s, dtype=torch.uint8)
        m[top : top + side, left : left + side] = 1
        return m

    a, b, c = square(10, 10, 40), square(100, 100, 60), square(200, 20, 30)
    masks = torch.stack([a, b, c, torch.zeros(s, s, dtype=torch.uint8)])[None]
    batch = TrainBatch(
        masks=masks,
        boxes=torch.zeros(1, 4, 4),
        valid=torch.tensor([[True, True, True, False]]),
        index=torch.tensor([0]),
        extra={
            "category_ids": torch.tensor([[7, 7, 9, -1]]),
            "category_names": {7: "dog", 9: "cat"},
            "original_size": torch.tensor([[s, s]]),
            "input_size": torch.tensor([[s, s]]),
            "original_masks": [masks[0].clone()],
        },
    )
    pairs = category_pairs(batch)
    assert pairs == [(0, 7, "dog"), (0, 9, "cat")]
    # Category 7 predicted as A plus half of B's rows; category 9 as a square overlapping C by half.
    pred7 = a.bool() | (b.bool() & (torch.arange(s)[:, None] < 130))
    pred9 = square(215, 20, 30).bool()
    logits = torch.where(torch.stack([pred7, pred9]), 10.0, -10.0)
    acc = MiouAccumulator()
    score_categories(acc, logits, batch, pairs)
    out = acc.compute()
    area_a, area_b, half_b = 1600, 3600, 30 * 60
    iou7_a = area_a / (area_a + half_b)  # A inside the prediction: |A| / |pred|
    iou7_b = half_b / (area_a + area_b)  # = 1800 / 5200 < iou7_a
    iou7_union = (area_a + half_b) / (area_a + area_b)
    iou9 = 450 / (900 + 900 - 450)
    dice7_a = 2 * area_a / (area_a + area_a + half_b)
    assert iou7_a > iou7_b
    for frame in ("1024", "original"):
        assert out[f"objects_{frame}_category_best"] == 2
        assert out[f"miou_{frame}_category_best"] == pytest.approx(100 * (iou7_a + iou9) / 2, abs=1e-4)
        assert out[f"miou_{frame}_category_union"] == pytest.approx(100 * (iou7_union + iou9) / 2, abs=1e-4)
        dice9 = 2 * 450 / 1800
        assert out[f"dice_{frame}_category_best"] == pytest.approx(100 * (dice7_a + dice9) / 2, abs=1e-4)
    # The same numbers through the metric functions themselves.
    torch.testing.assert_close(float(mask_iou(pred7, a.bool())), iou7_a)
    torch.testing.assert_close(float(mask_dice(pred7, a.bool())), dice7_a)


# ---------------------------------------------------------------------------------------------------
# Training: the crop-feature cache, and two processes = one.


def test_fixed_crops_do_not_change_with_the_epoch(coco, tiny_clip_dir):  # noqa: F811
    from samkit.data import collate
    from samkit.training.modes import batch_on_device

    mode = text_mode(tiny_clip_dir)
    fixed = TextPrompts(mode.sam, feature_encoder=mode.feature_encoder, min_area=100, fixed_crops=True)
    raw = collate([eval_set(coco)[0]])
    features = [
        m.session(batch_on_device(raw, torch.device("cpu"), epoch=e, seed=5)).features
        for m in (fixed, mode)
        for e in (0, 1)
    ]
    torch.testing.assert_close(features[0], features[1], rtol=0, atol=0)
    assert not torch.allclose(features[2], features[3])


def test_crop_cache_keys_name_the_encoder_and_settings(tiny_clip_dir):  # noqa: F811
    from samkit.training.embedding_cache import crop_feature_key

    mode = text_mode(tiny_clip_dir)
    key = crop_feature_key(mode.feature_encoder, mode.crop_settings())
    assert key == crop_feature_key(mode.feature_encoder, mode.crop_settings())
    assert key != crop_feature_key(mode.feature_encoder, mode.crop_settings() + "|other")
    with torch.no_grad():
        next(mode.feature_encoder.parameters()).add_(1e-3)
    assert key != crop_feature_key(mode.feature_encoder, mode.crop_settings())


def test_crop_feature_cache_gives_the_same_losses(coco, tiny_clip_dir, tiny_checkpoint, tmp_path):  # noqa: F811
    # max_objects above every image's object count: the same objects every epoch (with a subset that
    # changes per epoch, that image's entry would differ, and miss, every epoch).
    fixed = {"fixed_crops": True}
    data = {**eval_section(coco), "data_dir": coco["train"][0], "annotation_path": coco["train"][1]}
    plain = train(
        config(coco, tmp_path / "plain", tiny_clip_dir, tiny_checkpoint, text=fixed, train_data=data)
    )
    cached = train(
        config(
            coco, tmp_path / "cached", tiny_clip_dir, tiny_checkpoint, text=fixed, train_data=data,
            cache_embeddings=True,
        )
    )  # fmt: skip
    assert plain["step"] == cached["step"] == 4  # 4 usable images, batch 2, 2 epochs
    assert losses_of(tmp_path / "plain") == losses_of(tmp_path / "cached")
    assert_same_weights(final_state(tmp_path / "plain"), final_state(tmp_path / "cached"))
    assert cached["cache"] == {"hits": 4, "misses": 4}
    # Every image with a prompted object: computed in epoch 1, read in epoch 2.
    assert cached["crop_cache"] == {"hits": 4, "misses": 4}
    # A rerun in the same work_dir's cache (another run folder, same cache_dir) computes nothing.
    again = train(
        config(
            coco, tmp_path / "again", tiny_clip_dir, tiny_checkpoint, text=fixed, train_data=data, epochs=1,
            cache_embeddings=True, cache_dir=str(tmp_path / "cached" / "embedding_cache"),
        )
    )  # fmt: skip
    assert again["crop_cache"]["misses"] == 0 and again["cache"]["misses"] == 0


def write_yaml(path: Path, cfg) -> str:
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return str(path)


def test_two_processes_equal_one_in_text_mode(coco, tiny_clip_dir, small_frame_checkpoint, tmp_path):  # noqa: F811
    """torchrun with 2 gloo processes (2 images each) == one process with batch 4: weights, losses and
    the evaluation run at the end of training; eval.py (one process) on the two-process weights equals
    the two processes' evaluation (both text protocols); 256 frame."""
    # A larger Adam eps, as tests/test_train.py explains: float-noise gradients must not move weights.
    opt = {"lr": 1e-3, "eps": 1e-3}
    settings = {"epochs": 1, "batch_size": 4, "eval_every": 1, "optimizer": opt, "image_size": SMALL_FRAME}
    start = small_frame_checkpoint
    train(config(coco, tmp_path / "one", tiny_clip_dir, start, **settings))
    two_cfg = write_yaml(
        tmp_path / "two.yaml", config(coco, tmp_path / "two", tiny_clip_dir, start, **settings)
    )
    two = torchrun("train.py", "-c", two_cfg)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_weights(final_state(tmp_path / "one"), final_state(tmp_path / "two"), atol=SUMMATION_ATOL)
    assert losses_of(tmp_path / "two") == pytest.approx(losses_of(tmp_path / "one"), rel=1e-5)

    def eval_record(work_dir):
        lines = (Path(work_dir) / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "eval"][-1]

    e1, e2 = eval_record(tmp_path / "one"), eval_record(tmp_path / "two")
    for key in CATEGORY_KEYS + ["miou_1024", "miou_original"]:
        assert e1[key] == pytest.approx(e2[key], abs=1e-4), key

    out1 = tmp_path / "eval1.json"
    trained = f"model.checkpoint={tmp_path / 'two' / 'sam_final.pth'}"
    r = run_cli([sys.executable, "eval.py", "-c", two_cfg, "-o", trained, f"eval_output={out1}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(image, category) pairs" in r.stdout
    r1 = json.loads(out1.read_text())
    assert r1["processes"] == 1 and r1["eval_prompt"] == "text"
    # The same weights evaluated by two processes (the torchrun run's own evaluation after its one
    # epoch) and by eval.py in one: both text protocols gather every (image, category) pair once.
    for key in CATEGORY_KEYS + ["miou_1024", "miou_original", "objects_1024_category_best"]:
        assert r1[key] == pytest.approx(e2[key], abs=1e-9), key
    assert r1["objects_1024_category_union"] == pairs_in(coco["val"][1])


def test_lora_in_text_mode_and_the_adapter_on_samkit_text(coco, tiny_clip_dir, small_frame_checkpoint, tmp_path):  # noqa: F811  # fmt: skip
    """Text mode with LoRA on the encoder's attention, started from a plain SAM (the text branch starts
    fresh and trains in full): only the adapters and the free parameters change; the adapter file
    carries the text branch and the decoder; the plain base + the adapter file is ``sam_final.pth`` bit
    for bit; ``samkit text --checkpoint BASE --adapter FILE`` gives the masks of ``--checkpoint
    sam_final.pth`` (the text feature size read from the adapter, the base having no text branch)."""
    from PIL import Image

    from samkit.commands.main import main
    from samkit.lora import ADAPTER_NAME, apply_adapter, read_adapter

    pytest.importorskip("peft")
    plain = torch.load(small_frame_checkpoint, weights_only=True)
    assert not any("text" in k for k in plain)
    cfg = config_to_dict(config(coco, tmp_path / "run", tiny_clip_dir, small_frame_checkpoint, epochs=1,
                                image_size=SMALL_FRAME))  # fmt: skip
    cfg["model"]["lora"] = {"rank": 4, "alpha": 4.0, "targets": ["encoder_qkv", "encoder_proj"]}
    from samkit.training.config import config_from_dict

    assert train(config_from_dict(cfg))["step"] > 0
    final = final_state(tmp_path / "run")
    info = read_adapter(tmp_path / "run" / ADAPTER_NAME)
    full = {k for k in info.tensors if ".lora_" not in k}
    assert {"prompt_encoder.text_proj.weight", "prompt_encoder.text_embeddings.weight"} <= full
    assert all(k.startswith(("mask_decoder.", "prompt_encoder.text_")) for k in full)
    assert len(info.tensors) - len(full) == 2 * 2 * 2  # A and B of qkv and proj in 2 blocks
    for key, value in plain.items():  # the encoders' weights are frozen: LoRA's change is merged in
        adapted = key.endswith((".attn.qkv.weight", ".attn.proj.weight"))
        if key.startswith(("image_encoder.", "prompt_encoder.")):
            assert torch.equal(final[key], value) != adapted, key

    model = build_model("vit_tiny", text_feature_dim=12, image_size=SMALL_FRAME)
    from samkit.build import load_checkpoint

    load_checkpoint(model, plain, keep_new_text_branch=True, source=small_frame_checkpoint)
    apply_adapter(model, tmp_path / "run" / ADAPTER_NAME)
    assert_same_weights(model.state_dict(), final)

    image = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((160, 200, 3)) * 255).astype(np.uint8)).save(image)

    def text(out, checkpoint, *extra):
        return main(["text", "--model-type", "vit_tiny", "--checkpoint", checkpoint, "--image-path", str(image),
                     "--text-prompt", "a", "--text-prompt", "b", "--text-model-type", "clip",
                     "--text-model", str(tiny_clip_dir), "--output-dir", str(out), *extra])  # fmt: skip

    adapter = str(tmp_path / "run" / ADAPTER_NAME)
    assert text(tmp_path / "adapter", small_frame_checkpoint, "--adapter", adapter) == 0
    assert text(tmp_path / "merged", str(tmp_path / "run" / "sam_final.pth")) == 0
    (a,) = (tmp_path / "adapter").glob("*.npz")
    (b,) = (tmp_path / "merged").glob("*.npz")
    assert np.array_equal(np.load(a)["masks"], np.load(b)["masks"])
    assert np.array_equal(np.load(a)["iou"], np.load(b)["iou"])
