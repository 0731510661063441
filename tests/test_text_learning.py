"""Issue 12's learning demonstrations for text prompts, on generated named-shape images
(tests/text_models.py; the models are trained once and cached by tests/trained_models.py):

- a tiny CLIP trained on crops of shapes and their names ("a red circle") aligns its image and text
  features (held-out crop -> caption retrieval well above chance);
- text-mode fine-tuning (samkit's training loop, crop-feature prompts of that CLIP) lifts held-out
  crop-prompt mIoU (samkit's evaluation, ``eval_prompt: text``) well above the same weights with a
  fresh text branch; above always predicting the image's largest object: NOT YET (xfail, measured
  figures in the marks);
- end to end, words to masks: prompted with the text feature of a shape's name, the fine-tuned SAM
  should segment the named shape clearly better than the other shapes: NOT YET (xfail).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from samkit import SamPredictor, build_model  # noqa: E402

from .text_models import (  # noqa: E402
    CLIP_DIM,
    NAMES,
    caption,
    crop_pool,
    make_named_shapes_image,
    text_train_config,
    write_coco,
)

HELD_OUT_SEED = 2024  # training used seed 0 (images and crops); these images are new
HELD_OUT_IMAGES = 16


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


# ---------------------------------------------------------------------------------------------------
# The tiny CLIP


def test_tiny_clip_aligns_shape_crops_with_their_names(text_clip_model):
    from samkit.text import ClipFeatureEncoder

    encoder = ClipFeatureEncoder.from_pretrained(text_clip_model)
    assert encoder.feature_dim == CLIP_DIM
    texts = encoder.text_features([caption(n) for n in NAMES])  # 12 captions
    per_name = 10
    pool = crop_pool(np.random.default_rng(HELD_OUT_SEED), per_name)
    right = colour_right = kind_right = total = 0
    for i, name in enumerate(NAMES):
        feats = encoder.image_features(torch.stack(pool[name][:per_name]))
        guess = (feats @ texts.T).argmax(1).tolist()
        right += sum(g == i for g in guess)
        colour_right += sum(NAMES[g].split()[0] == name.split()[0] for g in guess)
        kind_right += sum(NAMES[g].split()[1] == name.split()[1] for g in guess)
        total += len(guess)
    accuracy, colour, kind = right / total, colour_right / total, kind_right / total
    print(f"held-out crop -> caption retrieval: {accuracy:.2f} (chance {1 / len(NAMES):.2f}), "
          f"colour {colour:.2f} (chance 0.25), kind {kind:.2f} (chance 0.33)")  # fmt: skip
    # Measured: 0.49 of 120 held-out crops get their exact caption among 12 (chance 0.08); the
    # colour is always right, the kind (harder at 32x32 with half the crops' backgrounds kept) ~half.
    assert accuracy >= 0.3
    assert colour >= 0.9
    assert kind >= 0.45


# ---------------------------------------------------------------------------------------------------
# Text-mode fine-tuning: crop-feature prompts


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A COCO dataset of named-shape images that training never saw: (image folder, annotation file)."""
    return write_coco(tmp_path_factory.mktemp("text_held_out"), HELD_OUT_IMAGES, HELD_OUT_SEED)


def crop_prompt_miou(data, checkpoint, clip_dir, work_dir) -> dict:
    """samkit's evaluation (eval.py) of ``checkpoint`` with ``eval_prompt: text`` on ``data``."""
    from samkit.training.config import config_from_dict
    from samkit.training.evaluate import run

    cfg = text_train_config(
        data, work_dir, clip_dir, checkpoint, eval_prompt="text", eval_output=str(work_dir / "eval.json"),
        eval_data={"type": "coco", "data_dir": str(data[0]), "annotation_path": str(data[1]), "max_objects": 20,
                   "num_workers": 0},
    )  # fmt: skip
    torch.manual_seed(0)  # a plain checkpoint gets a fresh text branch: the same one every run
    return run(config_from_dict(cfg))


def largest_object_miou(ann_path: Path) -> tuple[float, int]:
    """Mean IoU over objects when every object of an image is "predicted" as the image's largest."""
    from pycocotools import mask as mask_utils

    data = json.loads(Path(ann_path).read_text())
    by_image: dict[int, list[np.ndarray]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(mask_utils.decode(ann["segmentation"]).astype(bool))
    scores = []
    for masks in by_image.values():
        largest = max(masks, key=lambda m: m.sum())
        scores += [iou(largest, m) for m in masks]
    return 100 * float(np.mean(scores)), len(scores)


@pytest.fixture(scope="module")
def crop_prompt_scores(text_sam_model, held_out, tmp_path_factory) -> dict[str, float]:
    """Held-out crop-prompt mIoU (original resolution) of the fine-tuned model, of the weights it
    started from with a fresh text branch, and of always predicting the image's largest object."""
    work = tmp_path_factory.mktemp("text_eval")
    clip = text_sam_model / "clip"
    tuned = crop_prompt_miou(held_out, text_sam_model / "model.pt", clip, work / "tuned")
    # The weights fine-tuning started from (no text branch: evaluation builds a fresh one).
    untrained = crop_prompt_miou(held_out, text_sam_model / "start.pt", clip, work / "untrained")
    largest, objects = largest_object_miou(held_out[1])
    assert tuned["objects_original"] == untrained["objects_original"] == objects  # every object prompted
    scores = {"tuned": tuned["miou_original"], "untrained": untrained["miou_original"], "largest": largest}
    print(
        f"held-out crop-prompt mIoU (original resolution, {objects} objects): fine-tuned {scores['tuned']:.1f}, "
        f"untrained text branch {scores['untrained']:.1f}, largest object {largest:.1f}"
    )
    return scores


def test_text_finetuning_lifts_crop_prompt_miou_over_the_untrained_model(crop_prompt_scores):
    # Measured (16 held-out images, 44 objects): fine-tuned 34.0, untrained text branch 0.0 (the
    # fresh text token gives empty masks).
    assert crop_prompt_scores["tuned"] >= crop_prompt_scores["untrained"] + 25


@pytest.mark.xfail(
    reason="not reached yet: measured fine-tuned 34.0 vs largest object 36.4 (the model learnt to "
    "segment a shape, not yet which one the crop feature names); see tests/text_models.py",
    strict=False,
)
def test_text_finetuning_beats_always_predicting_the_largest_object(crop_prompt_scores):
    assert crop_prompt_scores["tuned"] >= crop_prompt_scores["largest"] + 10


# ---------------------------------------------------------------------------------------------------
# End to end: words -> masks


@pytest.mark.xfail(
    reason="not reached yet: measured mean IoU 38.3 with the named shape vs 45.2 with the best other "
    "shape, named shape best in 42% of 38 prompts; see tests/text_models.py",
    strict=False,
)
def test_text_prompts_segment_the_named_shape(text_sam_model):
    from samkit.text import ClipFeatureEncoder

    model = build_model("vit_tiny", text_sam_model / "model.pt", text_feature_dim=CLIP_DIM).eval()
    predictor = SamPredictor(model)
    encoder = ClipFeatureEncoder.from_pretrained(text_sam_model / "clip")
    rng = np.random.default_rng(HELD_OUT_SEED + 1)
    named, best_other, hits = [], [], []
    for _ in range(HELD_OUT_IMAGES):
        image, masks, names = make_named_shapes_image(rng)
        predictor.set_image(image)
        feats = encoder.text_features([caption(n) for n in names])  # e.g. "a red circle"
        for k, feat in enumerate(feats):
            pred, _, _ = predictor.predict(text_features=feat.numpy(), multimask_output=False)
            scores = [iou(pred[0], m) for m in masks]
            others = scores[:k] + scores[k + 1 :]
            named.append(scores[k])
            best_other.append(max(others))
            hits.append(scores[k] > max(others))
    named_miou, other_miou, hit_rate = 100 * np.mean(named), 100 * np.mean(best_other), np.mean(hits)
    print(
        f"text prompts on {HELD_OUT_IMAGES} held-out images ({len(named)} prompts): mean IoU with the named "
        f"shape {named_miou:.1f}, with the best-matching other shape {other_miou:.1f}; the named shape is "
        f"the best match in {100 * hit_rate:.0f}% of prompts"
    )
    assert named_miou >= other_miou + 20
    assert hit_rate >= 0.7
