"""Frozen image/text feature encoders for text-prompt SAM (CLIP, BLIP-2 first stage), through Hugging
Face ``transformers`` (the ``samkit[text]`` extra, imported when an encoder is built)."""

from __future__ import annotations

from .features import (
    FEATURE_ENCODERS,
    Blip2FeatureEncoder,
    ClipFeatureEncoder,
    FeatureEncoder,
    FeatureModelError,
    build_feature_encoder,
)

__all__ = [
    "FEATURE_ENCODERS",
    "Blip2FeatureEncoder",
    "ClipFeatureEncoder",
    "FeatureEncoder",
    "FeatureModelError",
    "build_feature_encoder",
]
