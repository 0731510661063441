"""Image-crop and text features of frozen CLIP and BLIP-2 models, L2-normalised.

Text-prompt SAM trains on the image features of object crops and is prompted at inference with the
text features of the same (aligned) model. Both wrappers take crops as Bx3xSxS float RGB in [0, 1]
(S = ``image_size``, already resized; normalisation with the model's mean/std happens here, on the
model's device) and texts as a list of strings (tokenised with the tokenizer saved with the model).

- CLIP (``ClipFeatureEncoder``): ``get_image_features`` / ``get_text_features``; 768-d for the seed's
  ``openai/clip-vit-large-patch14-336``.
- BLIP-2 first stage (``Blip2FeatureEncoder``, ``transformers.Blip2ForImageTextRetrieval``, e.g.
  ``Salesforce/blip2-itm-vit-g``): the Q-Former's image projection of query token 0 (as the seed takes
  it) and the text projection of the CLS token; 256-d.

Weights come from the Hugging Face cache (downloaded there once with network access) or from a local
folder written by ``save_pretrained``. The models are frozen and kept in eval mode.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SamkitError

# The normalisation of CLIP's image processor, also used by BLIP-2's.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FeatureModelError(SamkitError, RuntimeError):
    """A feature model (or the transformers package) that cannot be loaded."""


def _transformers():
    try:
        import transformers
    except ImportError:
        raise FeatureModelError(
            "text prompts need Hugging Face transformers: pip install 'samkit[text]'"
        ) from None
    return transformers


def _load(cls, name: str, what: str):
    """``cls.from_pretrained(name)`` with one-line errors for a model that is neither cached nor a folder,
    without transformers' progress bars (the commands' stderr is for errors and warnings)."""
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(os.fspath(name))
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FeatureModelError(
            f"cannot load {what} {name!r} ({first[:200]}); it must be in the Hugging Face cache "
            f"(download it once with network access: huggingface-cli download {name}) or be a local "
            "folder written by save_pretrained"
        ) from None
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


class FeatureEncoder(nn.Module):
    """Base: a frozen model giving L2-normalised ``feature_dim``-d features of crops and texts.

    A subclass names its ``transformers`` class (``model_class``), the config key of its feature size
    (``feature_dim_key``) and computes the raw features in ``_image_embeds``/``_text_embeds``; loading,
    normalisation and the checks of crops and texts are shared.
    """

    feature_dim: int
    image_size: int
    model_class: str  # the transformers class loaded by from_pretrained
    feature_dim_key: str  # the model config's key of the feature size
    text_config_key: str  # the model config's sub-config of the text side (its max_position_embeddings)
    label: str  # how errors name the model
    config_model_types: tuple[str, ...]  # the model_type of its config.json

    def __init__(self, model: nn.Module, tokenizer=None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.feature_dim = int(getattr(model.config, self.feature_dim_key))
        self.image_size = int(model.config.vision_config.image_size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike) -> FeatureEncoder:
        tf = _transformers()
        cls._check_model_type(name)
        model = _load(getattr(tf, cls.model_class), name, f"{cls.label} model")
        return cls(model, _load(tf.AutoTokenizer, name, f"{cls.label} tokenizer"))

    @classmethod
    def _check_model_type(cls, name: str | os.PathLike) -> None:
        """A local folder of another kind of model (a CLIP folder loaded as BLIP-2) is one error line
        before transformers tries, fails and logs a page of mismatched weights."""
        import json

        config = os.path.join(os.fspath(name), "config.json")
        if not os.path.isfile(config):
            return
        try:
            with open(config, encoding="utf-8") as f:
                found = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError):
            return  # transformers names an unreadable config itself
        if isinstance(found, str) and found not in cls.config_model_types:
            kind = next((k for k, c in FEATURE_ENCODERS.items() if found in c.config_model_types), None)
            hint = f" (text model type {kind})" if kind else ""
            raise FeatureModelError(f"{os.fspath(name)} holds a {found!r} model{hint}, not a {cls.label} one")

    def train(self, mode: bool = True) -> FeatureEncoder:
        # Frozen: dropout and the like stay off even inside a model put in train mode.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def _pixels(self, crops: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if crops.ndim != 4 or crops.shape[1] != 3 or tuple(crops.shape[2:]) != (s, s):
            raise ValueError(f"crops must be Bx3x{s}x{s} floats in [0, 1], got {tuple(crops.shape)}")
        dtype = next(self.model.parameters()).dtype
        return ((crops.to(self.device, torch.float32) - self.mean) / self.std).to(dtype)

    def _tokens(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise FeatureModelError(
                "this feature model was loaded without a tokenizer: texts cannot be encoded"
            )
        if isinstance(texts, str):
            texts = [texts]
        # Truncate to what the text model's position embeddings hold: a tokenizer saved without a
        # model_max_length (or a larger one) let a long text through to an IndexError in the model.
        extra = {}
        positions = getattr(
            getattr(self.model.config, self.text_config_key, None), "max_position_embeddings", None
        )
        most = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(positions, int) and positions > 0 and not (isinstance(most, int) and most <= positions):
            extra["max_length"] = positions
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt", **extra)
        return {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def image_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Crops Bx3xSxS (RGB in [0, 1]) -> BxD float32, unit L2 norm."""
        return F.normalize(self._image_embeds(self._pixels(crops)).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts (B strings) -> BxD float32, unit L2 norm."""
        return F.normalize(self._text_embeds(self._tokens(texts)).float(), dim=-1)

    def _image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_embeds(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def _pooled(out) -> torch.Tensor:
    # transformers < 5 returns the projected features as a tensor, 5 as an output with pooler_output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipFeatureEncoder(FeatureEncoder):
    """CLIP's projected image and text features (``get_image_features``/``get_text_features``)."""

    model_class = "CLIPModel"
    feature_dim_key = "projection_dim"
    text_config_key = "text_config"
    label = "CLIP"
    config_model_types = ("clip",)

    def _image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def _text_embeds(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return _pooled(self.model.get_text_features(**tokens))


class Blip2FeatureEncoder(FeatureEncoder):
    """BLIP-2 first stage (``Blip2ForImageTextRetrieval``): Q-Former image projection of query token 0
    and text projection of the CLS token, as the seed's ``blip2_stage1_classification``."""

    model_class = "Blip2ForImageTextRetrieval"
    feature_dim_key = "image_text_hidden_size"
    text_config_key = "qformer_config"
    label = "BLIP-2"
    config_model_types = ("blip-2", "blip_2")

    def _image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        m = self.model
        image_embeds = m.vision_model(pixel_values=pixels)[0]
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = m.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask)
        return m.vision_projection(out[0].to(m.vision_projection.weight.dtype)[:, 0])

    def _text_embeds(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        m = self.model
        if not getattr(m.config.qformer_config, "use_qformer_text_input", True):
            raise FeatureModelError("this BLIP-2 Q-Former has no text input (use_qformer_text_input is off)")
        embeds = m.embeddings(input_ids=tokens["input_ids"])
        out = m.qformer(query_embeds=embeds, query_length=0, attention_mask=tokens.get("attention_mask"))
        return m.text_projection(out[0].to(m.text_projection.weight.dtype)[:, 0])


FEATURE_ENCODERS: dict[str, type[FeatureEncoder]] = {
    "clip": ClipFeatureEncoder,
    "blip2": Blip2FeatureEncoder,
}

DEFAULT_MODELS: dict[str, str] = {
    "clip": "openai/clip-vit-large-patch14-336",
    "blip2": "Salesforce/blip2-itm-vit-g",
}


def build_feature_encoder(
    kind: str, name: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> FeatureEncoder:
    """``kind`` clip|blip2; ``name`` a Hugging Face model name (from the cache) or a local folder
    (default: the seed's model of that kind). Frozen, in eval mode, on ``device``."""
    if kind not in FEATURE_ENCODERS:
        raise ValueError(f"unknown text model type {kind!r}; choose one of {', '.join(FEATURE_ENCODERS)}")
    encoder = FEATURE_ENCODERS[kind].from_pretrained(name or DEFAULT_MODELS[kind])
    return encoder.to(device)
