"""text_inference.py / ``samkit text`` and ``SamPredictor(model, text_encoder=...).predict(text=...)`` with a
tiny random text-prompt SAM and tiny random CLIP and BLIP-2 models loaded by path (no downloads): the
outputs, the masks equal to the Python API's and to the text-features path, several prompts in one call
equal to one at a time, and user mistakes (exit 2, one line, nothing written)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samkit import SamPredictor, build_model
from samkit.errors import PromptError

from .conftest import perturbed_state
from .text_helpers import save_tiny_blip2, save_tiny_clip

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "blue square", "a photo of a dog"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    return save_tiny_blip2(tmp_path_factory.mktemp("tiny_blip2"))


def text_sam(dim: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("vit_tiny", text_feature_dim=dim)
    model.load_state_dict(perturbed_state(model.state_dict(), seed=seed))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Text-prompt vit_tiny checkpoints for the tiny CLIP (12-d) and BLIP-2 (8-d)."""
    folder = tmp_path_factory.mktemp("text_ckpt")
    paths = {}
    for kind, dim in (("clip", 12), ("blip2", 8)):
        paths[kind] = str(folder / f"sam_text_{kind}.pth")
        torch.save(text_sam(dim, seed=dim).state_dict(), paths[kind])
    return paths


@pytest.fixture(scope="module")
def astronaut_png(tmp_path_factory, photo) -> Path:
    path = tmp_path_factory.mktemp("text_inference") / "astronaut.png"
    Image.fromarray(photo).save(path)
    return path


def _args(image, out, checkpoint, kind, folder, *prompts, extra=()) -> list[str]:
    argv = ["--image-path", str(image), "--output-dir", str(out), "--model-type", "vit_tiny",
            "--checkpoint", checkpoint, "--text-model-type", kind, "--text-model", str(folder), *extra]  # fmt: skip
    for p in prompts:
        argv += ["--text-prompt", p]
    return argv


def _load(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "astronaut_masks.npz") as z:
        return dict(z)


def _predictor(kind, checkpoints, folder):
    from samkit.text import build_feature_encoder

    dim = 12 if kind == "clip" else 8
    model = build_model("vit_tiny", checkpoints[kind], text_feature_dim=dim)
    return SamPredictor(model, text_encoder=build_feature_encoder(kind, folder))


def test_script_writes_picture_and_masks(tmp_path, astronaut_png, checkpoints, clip_dir, photo):
    out = tmp_path / "out"
    argv = _args(
        astronaut_png, out, checkpoints["clip"], "clip", clip_dir, *PROMPTS[:2], extra=["--amp_level=O0"]
    )
    argv[0] = "--image_path"  # the seed's spelling
    result = subprocess.run(
        [sys.executable, str(REPO / "text_inference.py"), *argv], capture_output=True, text=True, cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["astronaut_infer.png", "astronaut_masks.npz"]  # no temporary left
    assert f"wrote {out / 'astronaut_infer.png'}" in result.stdout
    assert "text 'a red circle': predicted IoU" in result.stdout
    with Image.open(out / "astronaut_infer.png") as picture:
        assert picture.format == "PNG" and min(picture.size) > 100
    saved = _load(out)
    assert saved["masks"].shape == (2, *photo.shape[:2]) and saved["masks"].dtype == bool
    assert saved["iou"].shape == (2,) and saved["iou"].dtype == np.float32
    assert list(saved["prompts"]) == PROMPTS[:2]


def test_help_from_the_repo_root():
    result = subprocess.run(
        [sys.executable, "text_inference.py", "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--image_path", "--text-prompt", "--text-model-type", "--text-model", "--amp_level"):
        assert flag in result.stdout


@pytest.mark.parametrize("kind", ["clip", "blip2"])
def test_masks_equal_the_api_and_the_text_features_path(
    kind, tmp_path, astronaut_png, checkpoints, clip_dir, blip2_dir, photo, capsys
):
    from samkit.commands.main import main as samkit_main

    folder = clip_dir if kind == "clip" else blip2_dir
    assert (
        samkit_main(["text", *_args(astronaut_png, tmp_path, checkpoints[kind], kind, folder, *PROMPTS)]) == 0
    )
    assert capsys.readouterr().err == ""
    saved = _load(tmp_path)
    assert saved["masks"].shape == (3, 512, 512) and list(saved["prompts"]) == PROMPTS
    assert saved["masks"].any(axis=(1, 2)).all()  # real masks, not empty ones
    assert not saved["masks"].all(axis=(1, 2)).any()

    predictor = _predictor(kind, checkpoints, folder)
    predictor.set_image(photo)
    # The API with all prompts at once: the same call the command makes.
    masks, iou, low_res = predictor.predict(text=PROMPTS, multimask_output=False)
    assert masks.shape == (3, 1, 512, 512) and iou.shape == (3, 1) and low_res.shape == (3, 1, 256, 256)
    np.testing.assert_array_equal(saved["masks"], masks[:, 0])
    np.testing.assert_allclose(saved["iou"], iou[:, 0], rtol=1e-6)
    features = predictor.text_encoder.text_features(PROMPTS)
    for k, prompt in enumerate(PROMPTS):
        # One prompt at a time, by text and by its text features: the same masks as the batched call.
        one, one_iou, one_low = predictor.predict(text=prompt, multimask_output=False)
        by_feat, _, feat_low = predictor.predict(text_features=features[k].numpy(), multimask_output=False)
        assert one.shape == (1, 512, 512)
        np.testing.assert_allclose(one_low[0], low_res[k, 0], atol=1e-4)
        np.testing.assert_allclose(feat_low, one_low, atol=1e-4)  # padded batch vs alone
        np.testing.assert_allclose(one_iou[0], saved["iou"][k], atol=1e-5)
        for mask in (one[0], by_feat[0]):
            assert (mask != saved["masks"][k]).mean() < 1e-4, prompt  # a pixel may flip at the threshold
    # Different prompts, different masks: the text reaches the decoder.
    assert not np.array_equal(saved["masks"][0], saved["masks"][1])


def test_multimask_keeps_the_best_of_three(tmp_path, astronaut_png, checkpoints, clip_dir, photo):
    from samkit.commands.text import main

    argv = _args(
        astronaut_png, tmp_path, checkpoints["clip"], "clip", clip_dir, *PROMPTS, extra=["--multimask"]
    )
    assert main(argv) == 0
    saved = _load(tmp_path)
    predictor = _predictor("clip", checkpoints, clip_dir)
    predictor.set_image(photo)
    masks, iou, _ = predictor.predict(text=PROMPTS, multimask_output=True)
    assert masks.shape == (3, 3, 512, 512)
    best = iou.argmax(axis=1)
    np.testing.assert_array_equal(saved["masks"], masks[np.arange(3), best])
    np.testing.assert_allclose(saved["iou"], iou.max(axis=1), rtol=1e-6)


def test_text_with_a_box_and_api_errors(checkpoints, clip_dir, blip2_dir, tiny_model, photo):
    from samkit.text import build_feature_encoder

    predictor = _predictor("clip", checkpoints, clip_dir)
    predictor.set_image(photo)
    box = np.array([10, 20, 300, 400])
    masks, iou, _ = predictor.predict(box=box, text=PROMPTS[:2], multimask_output=False)
    assert masks.shape == (2, 1, 512, 512)
    one, _, _ = predictor.predict(box=box, text=PROMPTS[1], multimask_output=False)
    assert (one[0] != masks[1, 0]).mean() < 1e-4
    with pytest.raises(PromptError, match="not both"):
        predictor.predict(text="dog", text_features=np.zeros(12, np.float32))
    with pytest.raises(PromptError, match="non-empty list of strings"):
        predictor.predict(text=[])
    # A text-prompt model without an encoder, a plain model, and an encoder of another feature size.
    bare = SamPredictor(predictor.model)
    bare.set_image(photo)
    with pytest.raises(PromptError, match="text_encoder=") as info:
        bare.predict(text="a dog")
    assert "\n" not in str(info.value)
    plain = SamPredictor(tiny_model, text_encoder=predictor.text_encoder)
    plain.set_image(photo)
    with pytest.raises(PromptError, match="text-prompt model"):
        plain.predict(text="a dog")
    other = SamPredictor(predictor.model, text_encoder=build_feature_encoder("blip2", blip2_dir))
    other.set_image(photo)
    with pytest.raises(PromptError, match="8-d features.*takes 12-d"):
        other.predict(text="a dog")


def _fails(argv, out, capsys, *culprits):
    from samkit.commands.text import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for culprit in culprits:
        assert culprit in err, err
    assert not out.exists()


def test_missing_feature_model_is_one_line(tmp_path, astronaut_png, checkpoints, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    for kind, name in (("clip", "nobody/no-such-clip"), ("blip2", str(tmp_path / "no-such-folder"))):
        argv = _args(astronaut_png, out, checkpoints["clip"], kind, name, "a dog")
        _fails(argv, out, capsys, name, "save_pretrained")


def test_user_mistakes(tmp_path, astronaut_png, checkpoints, clip_dir, blip2_dir, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    # The checkpoint's text feature size (12, CLIP) is not the encoder's (8, BLIP-2): both named.
    argv = _args(astronaut_png, out, checkpoints["clip"], "blip2", blip2_dir, "a dog")
    _fails(argv, out, capsys, "size 12", "gives 8", str(blip2_dir))
    _fails(_args(tmp_path / "nope.png", out, checkpoints["clip"], "clip", clip_dir, "a dog"), out, capsys,
           f"image not found: {tmp_path / 'nope.png'}")  # fmt: skip
    _fails(_args(astronaut_png, out, tiny_checkpoint, "clip", clip_dir, "a dog"), out, capsys,
           "no text-prompt parameters")  # fmt: skip
    _fails(_args(astronaut_png, out, checkpoints["clip"], "clip", clip_dir, "  "), out, capsys, "empty")
    _fails(_args(astronaut_png, out, checkpoints["clip"], "clip", clip_dir), out, capsys, "--text-prompt")
    _fails(_args(astronaut_png, out, checkpoints["clip"], "siglip", clip_dir, "a dog"), out, capsys, "siglip")
    argv = _args(astronaut_png, out, str(tmp_path / "none.pth"), "clip", clip_dir, "a dog")
    _fails(argv, out, capsys, "none.pth: not found")
    argv = _args(astronaut_png, out, checkpoints["clip"], "clip", clip_dir, "a dog", extra=["--download"])
    _fails(argv, out, capsys, "--download", "no text branch")


def test_picture_labels_each_mask_and_lists_empty_ones(tmp_path, photo):
    from samkit.commands.text import draw_prompts, label_anchor

    masks = np.zeros((3, 512, 512), bool)
    masks[0, 100:300, 50:250] = True
    masks[1, :, 400:] = True
    assert label_anchor(masks[0]) == pytest.approx((150, 200), abs=2)
    assert 400 <= label_anchor(masks[1])[0] < 512
    assert label_anchor(masks[2]) is None
    ring = np.zeros((64, 64), bool)
    ring[8:56, 8:56], ring[16:48, 16:48] = True, False
    x, y = label_anchor(ring)
    assert ring[int(y), int(x)]  # the centroid is outside a ring: the nearest mask pixel instead
    path = tmp_path / "labels.png"
    draw_prompts(photo, masks, np.array([0.9, 0.8, 0.1]), ["a dog", "blue square", "nothing"])(str(path))
    with Image.open(path) as picture:
        assert picture.format == "PNG"
    assert os.listdir(tmp_path) == ["labels.png"]
