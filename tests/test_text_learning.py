"""Issue 12's text-prompt groundwork on generated named-shape images (tests/text_models.py; the model is
trained once and cached by tests/trained_models.py): a tiny CLIP trained on crops of shapes and their
names ("a red circle") aligns its image and text features (held-out crop -> caption retrieval well above
chance), the feature model a text-mode fine-tuning of a tiny SAM needs for a words-to-masks test.

Not here yet (issue 12 stays open): a tiny SAM fine-tuned in text mode with this CLIP that beats "always
the largest object" on crop prompts and segments the named shape from words. A first attempt (commit
26d7bd6: 64 single-image steps of samkit's loop from shapes_model) reached crop-prompt mIoU 34.0 against
36.4 for the largest object, and named shapes were not picked out; it was removed rather than kept as
expected failures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from .text_models import (  # noqa: E402
    CLIP_DIM,
    NAMES,
    caption,
    crop_pool,
)

HELD_OUT_SEED = 2024  # training used seed 0 (images and crops); these images are new


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
