"""The torch-free prompt checks and AMG helpers that SamPredictor / SamAutomaticMaskGenerator and their
ONNX Runtime counterparts share: same prompts accepted, same errors, same grids and crops (no model
needed: the predictors run on stand-ins for the model and the ONNX decoder)."""

from __future__ import annotations

import itertools
import types

import numpy as np
import pytest
import torch

from samkit.errors import PromptError
from samkit.maskgen.grids import generator_point_grids
from samkit.onnx import OnnxAutomaticMaskGenerator, OnnxPredictor
from samkit.onnx import amg as onnx_amg
from samkit.predictor import SamPredictor
from samkit.utils import amg as torch_amg
from samkit.utils.prompt_checks import check_prompts, prompt_sets
from samkit.utils.transforms import ResizeLongestSide

SIZES = [(30, 45), (20, 10)]


class FakeDecoder:
    """Meta's decoder interface: masks 1x4xHxW, IoU 1x4, low-res 1x4x256x256, from the inputs."""

    def __init__(self) -> None:
        self.calls: list[dict[str, np.ndarray]] = []

    def run(self, _: object, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.calls.append(inputs)
        h, w = (int(x) for x in inputs["orig_im_size"])
        s = float(inputs["point_coords"].sum() + inputs["mask_input"].sum())
        masks = np.full((1, 4, h, w), s, dtype=np.float32)
        return [masks, np.arange(4, dtype=np.float32)[None] + s, np.full((1, 4, 256, 256), s, np.float32)]


def onnx_predictor() -> OnnxPredictor:
    p = object.__new__(OnnxPredictor)
    p.image_size, p.mask_threshold = 1024, 0.0
    p.decoder_output_names = ["masks", "iou_predictions", "low_res_masks"]
    p.decoder = FakeDecoder()
    p.reset_image()
    p.features = np.zeros((2, 1, 1, 1), np.float32)
    p.original_sizes = list(SIZES)
    p.input_sizes = [(683, 1024), (1024, 512)]
    p.original_size, p.input_size = p.original_sizes[0], p.input_sizes[0]
    p.is_image_set = True
    return p


def torch_predictor() -> SamPredictor:
    p = object.__new__(SamPredictor)
    encoder = types.SimpleNamespace(mask_input_size=(256, 256))
    p.model = types.SimpleNamespace(device=torch.device("cpu"), prompt_encoder=encoder)
    p.transform = ResizeLongestSide(1024)
    p.reset_image()
    return p


POINTS = {
    "none": (None, None),
    "Nx2": ([[10, 5], [20, 7]], [1, 0]),
    "Nx2, labels Nx1": ([[10, 5], [20, 7]], [[1], [0]]),
    "1xNx2": ([[[10, 5], [20, 7]]], [[1, 0]]),
    "BxNx2": ([[[10, 5]], [[20, 7]]], [[1], [0]]),
    "BxNx2, labels flat": ([[[10, 5]], [[20, 7]]], [1, 0]),
    "3 values": ([10, 5, 3], [1, 1, 1]),
    "Nx3": ([[10, 5, 1]], [1]),
    "labels short": ([[10, 5], [20, 7]], [1]),
    "no labels": ([[10, 5]], None),
    "box corner and padding labels": ([[10, 5], [20, 7], [0, 0]], [2, 3, -1]),
    "NaN coordinate": ([[np.nan, 5]], [1]),
    "label 7": ([[10, 5]], [7]),
    "label 0.5": ([[10, 5]], [0.5]),
    "text labels": ([[10, 5]], ["1"]),
}
BOXES = {"none": None, "4": [1, 2, 30, 20], "1x4": [[1, 2, 30, 20]], "2x4": [[1, 2, 30, 20], [0, 0, 5, 5]],
         "2x2": [[1, 2], [30, 20]], "6": [1, 2, 3, 4, 5, 6], "infinite": [0, 0, np.inf, 5],
         "text": ["a", 0, 1, 2]}  # fmt: skip
_M = np.random.default_rng(0).normal(size=(2, 1, 256, 256)).astype(np.float32)
MASKS = {"none": None, "1xHxW": _M[0], "1x1xHxW": _M[:1], "HxW": _M[0, 0], "2x1xHxW": _M,
         "flat": _M[0].reshape(-1), "1x128x128": np.zeros((1, 128, 128)),
         "NaN": np.full((1, 256, 256), np.nan, np.float32)}  # fmt: skip
CASES = list(itertools.product(POINTS, BOXES, MASKS))


def outcome(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the outcome is what is compared
        return type(err).__name__, str(err)
    return "ok"


@pytest.mark.parametrize("batched", [False, True])
def test_onnx_predictor_accepts_and_refuses_what_sam_predictor_does(batched):
    """For every combination of good and bad points, boxes and masks: OnnxPredictor.predict (or
    predict_batch) succeeds exactly where SamPredictor's prompt check does, else with the same error."""
    differ, good = [], 0
    for pk, bk, mk in CASES:
        pc, pl, box, mask = *POINTS[pk], BOXES[bk], MASKS[mk]
        ref = outcome(torch_predictor()._prompt_tensors, pc, pl, box, mask, SIZES[0], batched=batched)
        if batched:
            given = {"point_coords": pc, "point_labels": pl, "boxes": box, "mask_input": mask}
            prompt = {k: v for k, v in given.items() if v is not None}
            ours = outcome(onnx_predictor().predict_batch, [prompt, {}])
        else:
            ours = outcome(onnx_predictor().predict, pc, pl, box, mask)
        good += ours == "ok"
        if ours != ref:
            differ.append(f"{pk} / {bk} / {mk}: ONNX {ours}, torch {ref}")
    assert not differ, "\n".join(differ)
    assert good >= 20  # the table has good cases too


def test_errors_keep_their_types_and_messages():
    with pytest.raises(PromptError, match="^point_labels must be given with point_coords$"):
        check_prompts([[1, 2]], None, None, None, batched=False, mask_size=(256, 256))
    with pytest.raises(PromptError, match=r"^point_coords must be Nx2 or BxNx2 with matching point_labels, got \(2, 2\) and \(1,\)$"):  # fmt: skip
        check_prompts([[1, 2], [3, 4]], [1], None, None, batched=True, mask_size=(256, 256))
    with pytest.raises(PromptError, match=r"^box must be 4 values \(XYXY\), got \(2, 2\)$"):
        onnx_predictor().predict(box=np.zeros((2, 2)))
    with pytest.raises(PromptError, match=r"^mask_input must be 1x64x64 per prompt, got \(1, 1, 32, 32\)$"):
        check_prompts(None, None, None, np.zeros((1, 32, 32)), batched=False, mask_size=(64, 64))
    with pytest.raises(PromptError, match=r"disagree on the number of prompts: \[1, 2\]$"):
        check_prompts(None, None, [1, 2, 3, 4], np.zeros((2, 1, 8, 8)), batched=True, mask_size=(8, 8))
    with pytest.raises(PromptError, match=r"^point_coords must be finite numbers, got \[nan\]$"):
        check_prompts([[np.nan, 2]], [1], None, None, batched=False, mask_size=(8, 8))
    with pytest.raises(PromptError, match=r"^point_labels must be 1 \(foreground\), 0 \(background\), -1 \(padding\) or 2/3 \(box corners\), got \[5\]$"):  # fmt: skip
        check_prompts([[1, 2]], [5], None, None, batched=False, mask_size=(8, 8))
    with pytest.raises(PromptError, match=r"^box must be numbers, got \['a', 0, 1, 2\]$"):
        check_prompts(None, None, ["a", 0, 1, 2], None, batched=False, mask_size=(8, 8))
    with pytest.raises(PromptError, match=r"^mask_input must be finite numbers, got \[inf\]$"):
        check_prompts(None, None, None, np.pad([[[np.inf]]], ((0, 0), (0, 7), (0, 7))), batched=False, mask_size=(8, 8))  # fmt: skip
    with pytest.raises(ValueError, match="^got prompts for 1 images, but 2 are set$"):
        prompt_sets([{}], 2)
    sets = prompt_sets([{"boxes": 1}, {"points": 2}], 2)
    assert next(sets) == (None, None, 1, None)  # the first image's prompts come before the second's check
    with pytest.raises(ValueError, match=r"^unknown prompt keys \['points'\] for image 1$"):
        next(sets)
    for predictor in (onnx_predictor(), torch_predictor()):
        predictor.original_sizes = list(SIZES)
        predictor.is_image_set, predictor.features = True, np.zeros(1)
        with pytest.raises(ValueError, match="^got prompts for 1 images, but 2 are set$"):
            predictor.predict_batch([{}])


def test_checked_prompts_have_a_prompt_axis():
    coords, labels, boxes, masks = check_prompts(
        [[1, 2]], [1], [0, 0, 4, 4], np.zeros((1, 8, 8)), batched=False, mask_size=(8, 8)
    )
    assert coords.shape == (1, 1, 2) and coords.dtype == np.float64 and labels.shape == (1, 1)
    assert boxes.shape == (1, 4) and boxes.dtype == np.float64
    assert masks.shape == (1, 1, 8, 8) and masks.dtype == np.float32
    assert check_prompts(None, None, None, None, batched=True, mask_size=(8, 8)) == (None,) * 4


def test_onnx_decoder_inputs_in_meta_layout():
    p = onnx_predictor()
    inputs = p.decoder_inputs(0, np.array([[45, 30]]), np.array([1]), np.array([0, 0, 45, 30]), _M[0])
    np.testing.assert_allclose(inputs["point_coords"], [[[1024, 683], [0, 0], [1024, 683]]], rtol=1e-5)
    np.testing.assert_array_equal(inputs["point_labels"], [[1, 2, 3]])
    assert inputs["mask_input"].shape == (1, 1, 256, 256) and inputs["has_mask_input"].tolist() == [1]
    inputs = p.decoder_inputs(1, None, None, None, None)
    np.testing.assert_array_equal(inputs["point_labels"], [[-1]])
    assert inputs["has_mask_input"].tolist() == [0] and inputs["orig_im_size"].tolist() == [20, 10]


def test_grids_and_crops_are_one_implementation():
    assert onnx_amg.point_grid is torch_amg.build_point_grid
    assert onnx_amg.crop_boxes is torch_amg.generate_crop_boxes
    assert onnx_amg.rle_to_mask is torch_amg.rle_to_mask
    boxes, layers = onnx_amg.crop_boxes((100, 37), 2, 0.3)
    assert boxes[:2] == [[0, 0, 37, 100], [0, 0, 24, 56]] and layers == [0] + [1] * 4 + [2] * 16
    np.testing.assert_allclose(
        onnx_amg.point_grid(2), [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    )


def test_generator_argument_checks():
    grids = generator_point_grids(8, None, 2, 2, "binary_mask")
    assert [len(g) for g in grids] == [64, 16, 4]
    given = [np.zeros((4, 2))]
    assert generator_point_grids(None, given, 0, 1, "coco_rle") is given
    for kwargs, message in [
        (dict(points_per_side=None), "^give exactly one of points_per_side and point_grids$"),
        (dict(output_mode="png"), "^output_mode must be one of binary_mask, uncompressed_rle, coco_rle, got 'png'$"),
        (dict(points_per_side=None, point_grids=given, crop_n_layers=1), r"^point_grids needs one grid per crop layer \(2\), got 1$"),
        (dict(points_per_side=0), "^a point grid needs at least 1 point per side, got 0$"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            OnnxAutomaticMaskGenerator(onnx_predictor(), **kwargs)
