"""Issue 12's learning demonstrations on generated named-shape images (tests/text_models.py; the models are
trained once and cached by tests/trained_models.py):

- a tiny CLIP trained on crops of shapes and their names ("a red circle") aligns its image and text
  features (held-out crop -> caption retrieval well above chance);
- a tiny text-prompt SAM (vit_tiny at a 256 frame) trained from random weights by samkit's own loop in
  text mode, prompted with that CLIP's crop features, segments held-out objects from their crop
  features far better than the untrained model and than always answering with the largest object;
- end to end, words -> masks: the same SAM prompted with the CLIP's text features of a shape's name
  segments the named shape, not the others.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

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
HELD_OUT_IMAGES = 24


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


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A COCO dataset of named-shape images that training never saw: (image folder, annotation file)."""
    return write_coco(tmp_path_factory.mktemp("text_held_out"), HELD_OUT_IMAGES, HELD_OUT_SEED)


def evaluate(data, checkpoint, clip_dir, work_dir) -> dict:
    """samkit's evaluation (eval.py's ``run``) of ``checkpoint`` (None: random weights) with
    ``eval_prompt: text`` on ``data``: the crop-feature and the category-name protocols."""
    from samkit.training.config import config_from_dict
    from samkit.training.evaluate import run

    cfg = text_train_config(
        data, work_dir, clip_dir, checkpoint, eval_prompt="text", eval_output=str(work_dir / "eval.json"),
        eval_data={"type": "coco", "data_dir": str(data[0]), "annotation_path": str(data[1]), "max_objects": 20,
                   "num_workers": 0},
    )  # fmt: skip
    return run(config_from_dict(cfg))


def largest_object_miou(ann_path: Path) -> tuple[float, int]:
    """Mean IoU (x100) over objects when every object of an image is "predicted" as the image's largest."""
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
def scores(text_sam_model, held_out, tmp_path_factory) -> dict[str, float]:
    """Held-out mIoU (original resolution) of the trained text SAM, of the untrained model (the same
    random weights training started from) and of always predicting the image's largest object."""
    work = tmp_path_factory.mktemp("text_eval")
    clip = text_sam_model / "clip"
    tuned = evaluate(held_out, text_sam_model / "model.pt", clip, work / "tuned")
    untrained = evaluate(held_out, None, clip, work / "untrained")
    largest, objects = largest_object_miou(held_out[1])
    assert tuned["objects_original"] == untrained["objects_original"] == objects  # every object prompted
    result = {
        "tuned": tuned["miou_original"],
        "untrained": untrained["miou_original"],
        "largest": largest,
        "words_best": tuned["miou_original_category_best"],
        "words_untrained": untrained["miou_original_category_best"],
    }
    print(
        f"held-out mIoU (original resolution, {HELD_OUT_IMAGES} images, {objects} objects): crop prompts: trained "
        f"{result['tuned']:.1f}, untrained {result['untrained']:.1f}, always the largest object {largest:.1f}; "
        f"category names as text: trained {result['words_best']:.1f}, untrained {result['words_untrained']:.1f}"
    )
    return result


def test_text_training_lifts_crop_prompt_miou_over_the_untrained_model(scores):
    # Measured (24 held-out images): see the closing note of issue 12 and the print above.
    assert scores["tuned"] >= scores["untrained"] + 40


def test_text_training_beats_always_predicting_the_largest_object(scores):
    assert scores["tuned"] >= scores["largest"] + 25


def test_category_names_prompt_the_right_objects_through_eval(scores):
    # eval.py's category-name protocol: each category present is prompted with "a photo of a {name}".
    assert scores["words_best"] >= scores["largest"] + 15
    assert scores["words_best"] >= scores["words_untrained"] + 40


# ---------------------------------------------------------------------------------------------------
# End to end: words -> masks


def test_text_prompts_segment_the_named_shape(text_sam_model):
    from samkit import SamPredictor, build_model
    from samkit.text import ClipFeatureEncoder

    model = build_model("vit_tiny", text_sam_model / "model.pt", text_feature_dim=CLIP_DIM)
    assert model.image_encoder.img_size == 256  # the frame it was trained at, read from the checkpoint
    encoder = ClipFeatureEncoder.from_pretrained(text_sam_model / "clip")
    predictor = SamPredictor(model, text_encoder=encoder)
    rng = np.random.default_rng(HELD_OUT_SEED + 1)
    named, best_other, hits = [], [], []
    for _ in range(HELD_OUT_IMAGES):
        image, masks, names = make_named_shapes_image(rng)
        predictor.set_image(image)
        pred, _, _ = predictor.predict(
            text=[caption(n) for n in names], multimask_output=False
        )  # "a red circle"
        for k in range(len(names)):
            got = [iou(pred[k, 0], m) for m in masks]
            others = got[:k] + got[k + 1 :]
            named.append(got[k])
            best_other.append(max(others))
            hits.append(got[k] > max(others))
    named_miou, other_miou, hit_rate = 100 * np.mean(named), 100 * np.mean(best_other), np.mean(hits)
    print(
        f"text prompts on {HELD_OUT_IMAGES} held-out images ({len(named)} prompts): mean IoU with the named "
        f"shape {named_miou:.1f}, with the best-matching other shape {other_miou:.1f}; the named shape is "
        f"the best match in {100 * hit_rate:.0f}% of prompts"
    )
    assert named_miou >= other_miou + 40
    assert hit_rate >= 0.85


def test_text_command_segments_the_named_shapes(text_sam_model, tmp_path, capsys):
    """``samkit text`` (text_inference.py) with the trained checkpoint: the frame comes from the
    checkpoint, and each prompt's mask in the .npz is its named shape."""
    from PIL import Image

    from samkit.commands.main import main

    image, masks, names = make_named_shapes_image(np.random.default_rng(HELD_OUT_SEED + 2))
    path = tmp_path / "shapes.png"
    Image.fromarray(image).save(path)
    prompts = [caption(n) for n in reversed(names)]  # another order than the shapes were drawn in
    argv = ["text", "--image-path", str(path), "--checkpoint", str(text_sam_model / "model.pt"), "--model-type",
            "vit_tiny", "--text-model-type", "clip", "--text-model", str(text_sam_model / "clip"),
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    for p in prompts:
        argv += ["--text-prompt", p]
    assert main(argv) == 0
    assert "random" not in capsys.readouterr().err
    with np.load(tmp_path / "out" / "shapes_masks.npz") as saved:
        got, saved_prompts = saved["masks"], list(saved["prompts"])
    assert saved_prompts == prompts and got.shape == (len(names), *image.shape[:2])
    assert (tmp_path / "out" / "shapes_infer.png").is_file()
    for mask, prompt in zip(got, prompts):
        scores = [iou(mask, m) for m in masks]
        assert caption(names[int(np.argmax(scores))]) == prompt, (prompt, scores)
        assert max(scores) >= 0.5, (prompt, scores)
