"""Transforms and image conversion: equal to Meta's where Meta has them, documented rules otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide as MetaResize

from samkit import ImageError
from samkit.utils.image import load_image, to_rgb_uint8
from samkit.utils.transforms import ResizeLongestSide, greater, upscale_masks


@pytest.mark.parametrize("hw", [(512, 512), (427, 640), (1, 1), (3000, 17), (1024, 1024), (1500, 2000)])
def test_resize_longest_side_matches_meta(hw):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    ours, meta = ResizeLongestSide(1024), MetaResize(1024)
    assert np.array_equal(ours.apply_image(image), meta.apply_image(image))
    coords = rng.uniform(0, 500, size=(7, 2))
    boxes = rng.uniform(0, 500, size=(5, 4))
    np.testing.assert_array_equal(ours.apply_coords(coords, hw), meta.apply_coords(coords, hw))
    np.testing.assert_array_equal(ours.apply_boxes(boxes, hw), meta.apply_boxes(boxes, hw))
    tc = torch.as_tensor(coords)
    torch.testing.assert_close(ours.apply_coords_torch(tc, hw), meta.apply_coords_torch(tc, hw))
    torch.testing.assert_close(
        ours.apply_boxes_torch(torch.as_tensor(boxes), hw), meta.apply_boxes_torch(torch.as_tensor(boxes), hw)
    )
    # Meta's apply_image_torch sizes the output from the B and C axes (a bug in 1.0); ours uses H, W.
    timg = torch.as_tensor(image).permute(2, 0, 1)[None].float()
    expected = F.interpolate(timg, ours.apply_image(image).shape[:2], mode="bilinear", antialias=True)
    torch.testing.assert_close(ours.apply_image_torch(timg), expected)


@pytest.mark.parametrize("original", [(427, 640), (1, 1), (2000, 1500), (1024, 1024), (300, 7)])
def test_upscale_masks_equals_interpolate_crop_interpolate(original):
    low = torch.randn(2, 3, 256, 256) * 5
    input_size = ResizeLongestSide.get_preprocess_shape(*original, 1024)
    ref = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)
    ref = ref[..., : input_size[0], : input_size[1]]
    ref = F.interpolate(ref, original, mode="bilinear", align_corners=False)
    got = upscale_masks(low, 1024, input_size, original)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    assert ((got > 0) == (ref > 0)).float().mean() > 0.9999


@pytest.mark.parametrize("count", [1, 3, 13])
def test_upscale_masks_in_groups_and_thresholded_equal_the_one_pass_logits(count, monkeypatch):
    """Outside autograd the masks go through in groups (buffers reused): the logits equal the
    autograd path's (one pass over all masks) bit for bit, and ``threshold`` gives exactly
    ``logits > threshold``, for counts that do and do not fill the last group."""
    import samkit.utils.transforms as transforms

    monkeypatch.setattr(transforms, "_UPSCALE_GROUP_BYTES", 5 * 427 * 256 * 4)  # 5 masks a group
    low = torch.randn(count, 256, 256, generator=torch.Generator().manual_seed(count)) * 5
    input_size, original = (683, 1024), (427, 640)
    one_pass = upscale_masks(low.clone().requires_grad_(), 1024, input_size, original).detach()
    grouped = upscale_masks(low, 1024, input_size, original)
    assert torch.equal(grouped, one_pass)
    for t in (0.0, 1.5):
        masks = upscale_masks(low, 1024, input_size, original, threshold=t)
        assert masks.dtype == torch.bool and torch.equal(masks, one_pass > t)
    assert upscale_masks(low[None], 1024, input_size, original, threshold=0.0).shape == (1, count, *original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_greater_equals_torch_gt(dtype):
    """NumPy's comparison on the CPU gives torch's bools: thresholds that float32 cannot hold (0.1:
    values between the float32 and the float64 0.1), NaN, infinities, into ``out`` and not; other
    layouts and devices go to torch.gt itself."""
    t = 0.1
    near = torch.tensor([0.1, 0.1 + 1e-9, 0.1 - 1e-9, np.nextafter(np.float32(0.1), 1), 0.0], dtype=dtype)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    x = torch.cat([near, special, torch.randn(5991, dtype=dtype)]).view(-1, 10)
    for threshold in (t, 0.0, -1.5, 2):
        assert torch.equal(greater(x, threshold), x > threshold)
        out = torch.empty(x.shape, dtype=torch.bool)
        assert greater(x, threshold, out=out) is out and torch.equal(out, x > threshold)
    assert torch.equal(greater(x.t(), t), x.t() > t)  # not contiguous
    grad = x.clone().requires_grad_()
    assert torch.equal(greater(grad, t), x > t)


def test_image_conversion_rules():
    rgb = np.random.default_rng(0).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    assert np.array_equal(to_rgb_uint8(rgb), rgb)
    assert np.array_equal(to_rgb_uint8(rgb[..., ::-1], "BGR"), rgb)
    gray = rgb[..., 0]
    assert np.array_equal(to_rgb_uint8(gray), np.stack([gray] * 3, -1))
    assert np.array_equal(to_rgb_uint8(gray[..., None]), np.stack([gray] * 3, -1))
    rgba = np.concatenate([rgb, np.full((4, 5, 1), 7, np.uint8)], -1)
    assert np.array_equal(to_rgb_uint8(rgba), rgb)
    assert np.array_equal(to_rgb_uint8(rgba[..., [2, 1, 0, 3]], "BGR"), rgb)
    sixteen = rgb.astype(np.uint16) * 257
    assert np.array_equal(to_rgb_uint8(sixteen), rgb)
    assert to_rgb_uint8(np.array([[65535, 0, 128]], np.uint16)).tolist() == [[[255] * 3, [0] * 3, [0] * 3]]


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((4, 4, 3), np.float32), "dtype"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((4, 4), bool), "dtype"),
        ([[1, 2], [3, 4]], "numpy array"),
    ],
)
def test_bad_arrays_raise(bad, match):
    with pytest.raises(ImageError, match=match):
        to_rgb_uint8(bad)


def test_load_image_formats(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(1).integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), rgb)
    Image.fromarray(np.concatenate([rgb, np.zeros((6, 7, 1), np.uint8)], -1)).save(tmp_path / "rgba.png")
    assert np.array_equal(load_image(tmp_path / "rgba.png"), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png").shape == (6, 7, 3)
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert np.array_equal(load_image(tmp_path / "g16.png")[..., 0], rgb[..., 0])
    (tmp_path / "t.png").write_text("hello")
    with pytest.raises(ImageError, match="t.png"):
        load_image(tmp_path / "t.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_apply_image_returns_a_writable_array():
    """Meta's notebooks wrap it with torch.as_tensor, which warns on a read-only array."""
    import warnings

    resized = ResizeLongestSide(64).apply_image(np.zeros((30, 40, 3), np.uint8))
    assert resized.flags.writeable and resized.shape == (48, 64, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.as_tensor(resized).add_(1)
    resized[0, 0] = 255


@pytest.mark.parametrize("hw", [(1, 5000), (3000, 1)])
def test_strips_thinner_than_1_to_2048_keep_one_pixel(tiny_model, hw):
    """Meta's rule rounds such a strip's short side to 0 pixels and the resize fails; samkit keeps
    one, in the predictor, the ONNX predictor and the exported graph's size computation alike, and
    returns masks at the strip's size."""
    from samkit import SamPredictor
    from samkit.onnx.predictor import preprocess_shape
    from samkit.utils.onnx import SamOnnxModel

    short = tuple(1 if s < 100 else 1024 for s in hw)
    assert ResizeLongestSide.get_preprocess_shape(*hw, 1024) == short == preprocess_shape(*hw, 1024)
    assert SamOnnxModel.resize_longest_image_size(torch.tensor(hw), 1024).tolist() == list(short)
    predictor = SamPredictor(tiny_model)
    predictor.set_image(np.full((*hw, 3), 128, np.uint8))
    masks, _, _ = predictor.predict(point_coords=np.array([[0.0, 0.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, *hw)
