"""Models built for another input frame than SAM's 1024 (``build_model(..., image_size=S)``): same outputs as
Meta's classes built for that frame, checkpoints that remember their size, and one-line errors."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from samkit import SamPredictor, build_model
from samkit.build import ENCODER_CONFIGS, checkpoint_image_size, load_checkpoint
from samkit.errors import CheckpointError

from .conftest import perturbed_state


def meta_sam(name: str, image_size: int):
    """Meta's Sam built from its own modules for an ``image_size`` frame (its builders fix 1024)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    dim, depth, heads, global_idx = ENCODER_CONFIGS[name]
    grid = image_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=dim, img_size=image_size, mlp_ratio=4, num_heads=heads, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_idx, window_size=14, out_chans=256,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("image_size", [256, 400, 1280])
def test_other_frame_matches_meta(photo, image_size):
    """256/400: several prompts' tokens per block of the CPU mask upscaling; 1280 (80x80 tokens): rows
    of one prompt per block."""
    from segment_anything import SamPredictor as MetaPredictor

    torch.manual_seed(5)
    meta = meta_sam("vit_tiny", image_size)
    state = perturbed_state(meta.state_dict(), seed=5)
    meta.load_state_dict(state)
    ours = build_model("vit_tiny", image_size=image_size)
    ours.load_state_dict(state)
    grid = image_size // 16
    image = photo[40:340, 10:460]  # 300x450: not square, so the padding matters
    a, b = SamPredictor(ours), MetaPredictor(meta)
    a.set_image(image)
    b.set_image(image)
    assert a.features.shape == b.features.shape == (1, 256, grid, grid)
    torch.testing.assert_close(a.features, b.features, atol=1e-4, rtol=1e-4)
    prompt = dict(
        point_coords=np.array([[200.0, 120.0]]), point_labels=np.array([1]), box=np.array([150, 60, 330, 240])
    )
    masks_a, iou_a, low_a = a.predict(**prompt)
    masks_b, iou_b, low_b = b.predict(**prompt)
    assert masks_a.shape == (3, 300, 450) and low_a.shape == (3, 4 * grid, 4 * grid)
    np.testing.assert_allclose(low_a, low_b, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(iou_a, iou_b, atol=1e-4)
    assert (masks_a == masks_b).mean() > 0.999


def test_checkpoints_remember_their_frame(tmp_path):
    torch.manual_seed(0)
    small = build_model("vit_tiny", image_size=256)
    path = tmp_path / "tiny256.pth"
    torch.save(small.state_dict(), path)
    assert checkpoint_image_size(small.state_dict()) == 256
    assert checkpoint_image_size(build_model("vit_tiny").state_dict()) == 1024
    loaded = build_model("vit_tiny", path)  # the size comes from the checkpoint
    assert loaded.image_encoder.img_size == 256 and loaded.prompt_encoder.image_embedding_size == (16, 16)
    for key, value in small.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(CheckpointError) as err:
        build_model("vit_tiny", path, image_size=1024)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "image_size=256" in message
    with pytest.raises(CheckpointError, match="image_size=256"):
        load_checkpoint(build_model("vit_tiny"), path)


@pytest.mark.parametrize("bad", [0, 8, 100, 1000, -16, 256.0, True])
def test_bad_image_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 16"):
        build_model("vit_tiny", image_size=bad)


def test_config_checks_model_image_size():
    from samkit.training.config import ConfigError, config_from_dict

    assert config_from_dict({"model": {"type": "vit_tiny"}}).model.image_size is None
    assert config_from_dict({"model": {"type": "vit_tiny", "image_size": 256}}).model.image_size == 256
    with pytest.raises(ConfigError, match="model.image_size"):
        config_from_dict({"model": {"type": "vit_tiny", "image_size": 250}})


def test_onnx_export_of_a_small_frame_model_verifies(tmp_path):
    """The exported pair carries the frame; the torch-free predictor sizes its inputs (mask_input is
    4x the embedding grid) from it, and verification against samkit passes on every case."""
    pytest.importorskip("onnxruntime")
    from samkit.export.onnx import export_onnx
    from samkit.export.verify import verify_onnx
    from samkit.onnx import OnnxPredictor

    torch.manual_seed(1)
    model = build_model("vit_tiny", image_size=256)
    model.load_state_dict(perturbed_state(model.state_dict(), seed=1))
    export_onnx(model, tmp_path / "onnx", model_type="vit_tiny")
    predictor = OnnxPredictor(tmp_path / "onnx")
    assert predictor.image_size == 256 and predictor.mask_size == (64, 64)
    rows = verify_onnx(model, tmp_path / "onnx")
    assert rows and all(row.ok for row in rows), [row for row in rows if not row.ok]
