"""Tiny random CLIP and BLIP-2 models from ``transformers`` configs, saved with ``save_pretrained`` and
a word-level tokenizer, so that samkit's feature encoders load them by path (no downloads in tests)."""

from __future__ import annotations

from typing import Sequence

import torch

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "photo", "of", "red", "blue", "circle", "square", "dog"]


def save_tiny_tokenizer(folder, words: Sequence[str] = WORDS) -> None:
    """A word-level tokenizer over ``words`` ("[CLS] a red circle [SEP]"; the first four must be
    [PAD], [UNK], [CLS], [SEP]), saved with save_pretrained into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.save_pretrained(folder)


def tiny_clip_config(
    vocab_size: int, width: int = 16, vision_layers: int = 1, image_size: int = 32, projection_dim: int = 12
):
    """A ``transformers.CLIPConfig`` of a tiny CLIP: 2 heads, 1 text block, 8-pixel patches, MLPs of
    twice the width, the tokenizer's [PAD]=0/[CLS]=2/[SEP]=3 ids (tests and benchmarks)."""
    import transformers

    return transformers.CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=vision_layers,
            num_attention_heads=2, image_size=image_size, patch_size=8,
        ),
        projection_dim=projection_dim,
    )  # fmt: skip


def save_tiny_clip(folder):
    """A random CLIP (12-d projections, 32x32 images) and its tokenizer in ``folder``; returns it."""
    import transformers

    torch.manual_seed(0)
    transformers.CLIPModel(tiny_clip_config(len(WORDS))).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


def save_tiny_blip2(folder):
    """A random BLIP-2 retrieval model (8-d features, 28x28 images) and its tokenizer in ``folder``."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Blip2Config(
        vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=28, patch_size=14,
        ),
        qformer_config=dict(
            vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, encoder_hidden_size=16, max_position_embeddings=32, pad_token_id=0,
            use_qformer_text_input=True,
        ),
        num_query_tokens=4,
        image_text_hidden_size=8,
    )  # fmt: skip
    transformers.Blip2ForImageTextRetrieval(config).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return folder


def optimizer_step(optimizer, schedule, loss) -> None:
    """One step of a test model's training loop: gradients of ``loss``, the update, the schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
