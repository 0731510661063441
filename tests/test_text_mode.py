"""Text-prompt SAM: the prompt encoder's text branch, checkpoints with and without it (PyTorch and the
seed's MindSpore names), and SamPredictor with text features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samkit import SamPredictor, build_model, load_checkpoint
from samkit.checkpoints.mindspore import write_mindspore_checkpoint
from samkit.checkpoints.mindspore_names import torch_to_mindspore_names
from samkit.errors import CheckpointError, PromptError, SamkitNote

from .text_helpers import WORDS, save_tiny_blip2, save_tiny_clip, save_tiny_tokenizer  # noqa: F401 (importable here)

TEXT_KEYS = {
    "prompt_encoder.text_proj.weight",
    "prompt_encoder.text_proj.bias",
    "prompt_encoder.text_embeddings.weight",
}


def text_model(dim: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    return build_model("vit_tiny", text_feature_dim=dim)


def test_plain_model_has_no_text_parameters(tiny_model):
    assert not any("text" in k for k in tiny_model.state_dict())


def test_text_branch_parameters_and_token():
    model = text_model(32)
    state = model.state_dict()
    assert TEXT_KEYS <= set(state)
    assert state["prompt_encoder.text_proj.weight"].shape == (256, 32)
    assert state["prompt_encoder.text_embeddings.weight"].shape == (1, 256)
    pe = model.prompt_encoder
    feats = torch.randn(3, 32)
    sparse, dense = pe(None, None, None, text=feats)
    assert sparse.shape == (3, 1, 256) and dense.shape == (3, 256, 64, 64)
    expected = pe.text_proj(feats) + pe.text_embeddings.weight
    torch.testing.assert_close(sparse[:, 0], expected)
    torch.testing.assert_close(dense[0, :, 0, 0], pe.no_mask_embed.weight[0])
    # After box tokens: 2 corners then the text token.
    sparse, _ = pe(None, torch.tensor([[0.0, 0, 10, 10]] * 3), None, text=feats)
    assert sparse.shape == (3, 3, 256)
    torch.testing.assert_close(sparse[:, 2], expected)


def test_text_gradients_reach_text_parameters():
    model = text_model(16)
    sparse, dense = model.prompt_encoder(None, None, None, text=torch.randn(2, 16))
    low_res, iou = model.mask_decoder(
        torch.randn(1, 256, 64, 64), model.prompt_encoder.get_dense_pe(), sparse, dense, False
    )
    (low_res.mean() + iou.mean()).backward()
    pe = model.prompt_encoder
    for p in (pe.text_proj.weight, pe.text_proj.bias, pe.text_embeddings.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_text_on_plain_model_and_wrong_size_are_clear(tiny_model):
    with pytest.raises(ValueError, match="text_feature_dim"):
        tiny_model.prompt_encoder(None, None, None, text=torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"Bx32"):
        text_model(32).prompt_encoder(None, None, None, text=torch.randn(1, 8))


def test_text_checkpoint_round_trip_pth(tmp_path):
    model = text_model(24, seed=1)
    path = tmp_path / "text.pth"
    torch.save(model.state_dict(), path)
    loaded = build_model("vit_tiny", path, text_feature_dim=24)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_text_checkpoint_into_plain_model_leaves_the_branch_out_with_a_note(tmp_path):
    model = text_model(24)
    path = tmp_path / "text.pth"
    torch.save(model.state_dict(), path)
    with pytest.warns(SamkitNote, match=r"text\.pth has a text-prompt branch \(text features of size 24\)"):
        plain = build_model("vit_tiny", path)
    state = plain.state_dict()
    assert not TEXT_KEYS & set(state)
    for k, v in state.items():
        assert torch.equal(v, model.state_dict()[k]), k
    with pytest.raises(CheckpointError, match=r"text_feature_dim=24") as info:
        build_model("vit_tiny", path, text_feature_dim=32)
    assert "\n" not in str(info.value)


def test_plain_checkpoint_into_text_model(tmp_path, tiny_model):
    path = tmp_path / "plain.pth"
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(CheckpointError, match="keep_new_text_branch=True") as info:
        build_model("vit_tiny", path, text_feature_dim=16)
    assert "\n" not in str(info.value)
    model = text_model(16, seed=3)
    text_before = {k: v.clone() for k, v in model.state_dict().items() if k in TEXT_KEYS}
    load_checkpoint(model, path, keep_new_text_branch=True)
    state = model.state_dict()
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for k, v in text_before.items():
        assert torch.equal(v, state[k]), k


def test_seed_mindspore_text_ckpt_loads(tmp_path):
    model = text_model(768, seed=2)
    ms_state = torch_to_mindspore_names(model.state_dict())
    assert "prompt_encoder.text_embeddings.embedding_table" in ms_state
    assert "prompt_encoder.text_proj.weight" in ms_state
    # The seed may also save its frozen feature encoder; SAM ignores it.
    ms_state["text_encoder.visual.proj"] = torch.zeros(4, 4)
    path = tmp_path / "sam_vitb_text.ckpt"
    write_mindspore_checkpoint(ms_state, path)
    loaded = build_model("vit_tiny", path, text_feature_dim=768)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    with pytest.warns(SamkitNote, match="text features of size 768"):
        build_model("vit_tiny", path)


def test_predictor_with_text_features():
    model = text_model(32, seed=4)
    predictor = SamPredictor(model)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    predictor.set_image(image)
    feat = torch.nn.functional.normalize(torch.randn(32), dim=0).numpy()
    masks, iou, low_res = predictor.predict(text_features=feat, multimask_output=False)
    assert masks.shape == (1, 48, 64) and iou.shape == (1,) and low_res.shape == (1, 256, 256)
    # Same as the decoder driven by hand.
    sparse, dense = model.prompt_encoder(None, None, None, text=torch.as_tensor(feat)[None])
    with torch.no_grad():
        expected, _ = model.mask_decoder(
            predictor.features, model.prompt_encoder.get_dense_pe(), sparse, dense, False
        )
    np.testing.assert_allclose(low_res, expected[0].numpy(), atol=1e-5)
    with pytest.raises(PromptError, match="32"):
        predictor.predict(text_features=np.zeros(8, np.float32))
    bad = feat.copy()
    bad[3] = np.nan
    for given in (bad, torch.as_tensor(bad)):  # NaN features gave NaN masks and scores
        with pytest.raises(PromptError, match=r"text_features must be finite numbers, got \[nan\]"):
            predictor.predict(text_features=given)
    with pytest.raises(PromptError, match="text_features must be numbers"):
        predictor.predict(text_features=["a"] * 32)


def test_predictor_text_on_plain_model_is_clear(tiny_model):
    predictor = SamPredictor(tiny_model)
    predictor.set_image(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(PromptError, match="text_feature_dim"):
        predictor.predict(text_features=np.zeros(8, np.float32))


# ---------------------------------------------------------------------------------------------------
# Feature encoders: tiny random CLIP and BLIP-2 from transformers configs, saved and loaded by path.


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def tiny_blip2_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return save_tiny_blip2(tmp_path_factory.mktemp("tiny_blip2"))


@pytest.mark.parametrize("kind, dim, size", [("clip", 12, 32), ("blip2", 8, 28)])
def test_feature_encoders_load_by_path(kind, dim, size, tiny_clip_dir, tiny_blip2_dir):
    from samkit.text import build_feature_encoder

    folder = tiny_clip_dir if kind == "clip" else tiny_blip2_dir
    encoder = build_feature_encoder(kind, folder)
    assert encoder.feature_dim == dim and encoder.image_size == size
    encoder.train()
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.parameters())
    crops = torch.rand(3, 3, size, size)
    image = encoder.image_features(crops)
    text = encoder.text_features(["a red circle", "blue square", "dog"])
    for feats in (image, text):
        assert feats.shape == (3, dim) and feats.dtype == torch.float32
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
    # Deterministic (eval mode) and per-sample (batching does not mix crops).
    torch.testing.assert_close(encoder.image_features(crops[1:2]), image[1:2], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=f"Bx3x{size}x{size}"):
        encoder.image_features(torch.rand(1, 3, size + 1, size))


@pytest.mark.parametrize("kind", ["clip", "blip2"])
def test_long_texts_are_cut_to_the_text_models_positions(kind, tiny_clip_dir, tiny_blip2_dir):
    """A text longer than the text model's position embeddings is truncated as the tokenizer would
    for a model of that length (it failed inside the model: the tiny CLIP holds 16 positions and its
    saved tokenizer has no model_max_length)."""
    from samkit.text import build_feature_encoder

    encoder = build_feature_encoder(kind, tiny_clip_dir if kind == "clip" else tiny_blip2_dir)
    text_config = encoder.model.config.text_config if kind == "clip" else encoder.model.config.qformer_config
    positions = text_config.max_position_embeddings
    long = encoder.text_features(["dog " * (positions + 300), "cat"])
    assert long.shape[0] == 2 and torch.isfinite(long).all()
    kept = encoder.tokenizer(["dog " * (positions + 300)], truncation=True, max_length=positions)[
        "input_ids"
    ][0]
    assert len(kept) == positions
    same = encoder.text_features([encoder.tokenizer.decode(kept, skip_special_tokens=True)])
    torch.testing.assert_close(long[:1], same, atol=1e-5, rtol=1e-4)


def test_missing_feature_model_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import huggingface_hub.constants

    from samkit.text import FeatureModelError, build_feature_encoder

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for kind, name in (("clip", str(tmp_path / "no-such-model")), ("blip2", "nobody/no-such-blip2")):
        with pytest.raises(FeatureModelError) as info:
            build_feature_encoder(kind, name)
        message = str(info.value)
        assert name in message and "save_pretrained" in message and "\n" not in message
    with pytest.raises(ValueError, match="clip, blip2"):
        build_feature_encoder("siglip", "x")


# ---------------------------------------------------------------------------------------------------
# Text-mode fine-tuning with crop-feature prompts on generated multi-object images.


@pytest.fixture(scope="module")
def text_coco(tmp_path_factory):
    from .datagen import make_coco_dataset

    root = tmp_path_factory.mktemp("text_coco")
    train_dir, train_json = make_coco_dataset(root / "train", num_images=4, seed=1, split="train")
    return str(train_dir), str(train_json)


def text_config(data, work_dir, clip_dir, checkpoint, image_size=None, **overrides):
    from samkit.training.config import config_from_dict

    cfg = {
        "model": {
            "type": "vit_tiny",
            "checkpoint": checkpoint,
            "freeze": ["image_encoder", "prompt_encoder"],
            "unfreeze": ["prompt_encoder.text_proj", "prompt_encoder.text_embeddings"],
        },
        "train_data": {
            "type": "coco", "data_dir": data[0], "annotation_path": data[1], "max_objects": 4, "num_workers": 0,
        },
        "prompt_mode": "text",
        "text": {"encoder": "clip", "model": str(clip_dir), "feature_dim": 12, "min_area": 100},
        "optimizer": {"lr": 1e-3},
        "scheduler": {"warmup_steps": 1, "decay": "cosine"},
        "work_dir": str(work_dir),
        "epochs": 2,
        "batch_size": 2,
        "eval_every": 0,
        "log_every": 1,
        "tensorboard": False,
        "progress": False,
        "seed": 3,
        **overrides,
    }  # fmt: skip
    if image_size is not None:
        cfg["model"]["image_size"] = image_size
    return config_from_dict(cfg)


def test_text_mode_trains_checkpoints_and_resumes(text_coco, tiny_clip_dir, tiny_checkpoint, tmp_path):
    from samkit.training.train import train

    whole = text_config(text_coco, tmp_path / "whole", tiny_clip_dir, tiny_checkpoint)
    train(whole)
    final = torch.load(tmp_path / "whole" / "sam_final.pth", weights_only=True)
    assert TEXT_KEYS <= set(final)
    start = build_model("vit_tiny", tiny_checkpoint).state_dict()
    # The text branch and the decoder trained; the image encoder and the rest of the prompt encoder did not.
    assert not torch.equal(final["mask_decoder.iou_token.weight"], start["mask_decoder.iou_token.weight"])
    assert torch.equal(final["image_encoder.pos_embed"], start["image_encoder.pos_embed"])
    assert torch.equal(
        final["prompt_encoder.no_mask_embed.weight"], start["prompt_encoder.no_mask_embed.weight"]
    )
    # The trained file loads as a text-prompt SAM.
    torch.save(final, tmp_path / "text_sam.pth")
    build_model("vit_tiny", tmp_path / "text_sam.pth", text_feature_dim=12)

    # Stopped after 2 of 4 steps, then resumed: the same final weights.
    part = text_config(text_coco, tmp_path / "part", tiny_clip_dir, tiny_checkpoint, max_steps=2)
    train(part)
    resumed = text_config(text_coco, tmp_path / "part", tiny_clip_dir, tiny_checkpoint, resume="auto")
    train(resumed)
    again = torch.load(tmp_path / "part" / "sam_final.pth", weights_only=True)
    for k in final:
        assert torch.equal(final[k], again[k]), k


def test_crop_features_are_seeded_and_filtered(text_coco, tiny_clip_dir):
    from samkit.data import collate
    from samkit.text import build_feature_encoder
    from samkit.training.config import DataConfig
    from samkit.training.modes import batch_on_device
    from samkit.training.modes.text import TextPrompts
    from samkit.training.setup import build_data

    data = DataConfig(type="coco", data_dir=text_coco[0], annotation_path=text_coco[1], max_objects=4)
    dataset = build_data(data, image_size=1024, seed=0, for_eval=False)
    raw = collate([dataset[0], dataset[1]])
    encoder = build_feature_encoder("clip", tiny_clip_dir)
    mode = TextPrompts(build_model("vit_tiny", text_feature_dim=12), feature_encoder=encoder, min_area=100)
    batch = batch_on_device(raw, torch.device("cpu"), epoch=0, seed=5)
    session = mode.session(batch)
    n = int(session.valid.sum())
    assert 0 < n and session.features.shape == (n, 12)
    torch.testing.assert_close(session.features.norm(dim=-1), torch.ones(n))
    assert bool((session.valid <= batch.valid).all())
    torch.testing.assert_close(mode.session(batch).features, session.features)  # same seed, same crops
    other = mode.session(batch_on_device(raw, torch.device("cpu"), epoch=1, seed=5)).features
    assert not torch.allclose(other, session.features)  # a new epoch draws new crops
    huge = TextPrompts(mode.sam, feature_encoder=encoder, min_area=10**9).session(batch)
    assert int(huge.valid.sum()) == 0 and huge.features.shape == (0, 12)
    pred = mode(huge, torch.zeros(2, 256, 64, 64))
    assert pred.low_res.shape[0] == 0
