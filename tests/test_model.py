"""Model-level checks: shapes, gradients reach every parameter, precision, builders. (The fast modules
against the reference ones: tests/test_fast.py.)"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from samkit import SamPredictor, build_model, fast, sam_model_registry
from samkit.modeling.image_encoder import relative_position_table
from samkit.utils.transforms import ResizeLongestSide

from .conftest import perturbed_state


def test_registry_names():
    assert set(sam_model_registry) >= {"default", "vit_b", "vit_l", "vit_h"}
    with pytest.raises(ValueError, match="vit_b"):
        build_model("vit_x")


def test_every_parameter_gets_a_gradient_in_the_reference_and_the_accelerated_model():
    """forward_train reaches every parameter with a finite, non-zero gradient, through the reference
    modules and through the fast ones (whose training paths keep every mask token's hypernetwork and
    q·b_k in the graph), with the same gradients. A 256 frame (16x16 tokens: windows padded, one
    global block) keeps it cheap; prompts: points, a box and a mask on one image, two point prompts
    sharing the other (the shared-image path), one point."""
    torch.manual_seed(0)
    reference = build_model("vit_tiny", image_size=256)
    reference.load_state_dict(perturbed_state(reference.state_dict(), seed=0))
    accelerated = fast.accelerate(copy.deepcopy(reference))
    image = torch.rand(3, 150, 256) * 255
    batch = [
        {
            "image": image,
            "original_size": (300, 512),
            "point_coords": torch.tensor([[[25.0, 50.0], [100.0, 75.0]]]),
            "point_labels": torch.tensor([[1, 0]]),
            "boxes": torch.tensor([[12.0, 15.0, 175.0, 125.0]]),
            "mask_inputs": torch.randn(1, 1, 64, 64),
        },
        {
            "image": image.flip(-1),
            "original_size": (300, 512),
            "point_coords": torch.tensor([[[100.0, 50.0]], [[30.0, 10.0]]]),
            "point_labels": torch.tensor([[1], [1]]),
        },
        {
            "image": image,
            "original_size": (300, 512),
            "point_coords": torch.tensor([[[2.5, 5.0]]]),
            "point_labels": torch.tensor([[1]]),
        },
    ]
    grads = []
    for model in (reference, accelerated):
        model.train()
        loss = 0
        for multimask in (True, False):
            for out in model.forward_train(batch, multimask_output=multimask):
                assert out["low_res_logits"].requires_grad and out["iou_predictions"].requires_grad
                assert torch.isfinite(out["low_res_logits"]).all()
                loss = loss + out["low_res_logits"].mean() + out["iou_predictions"].mean()
        loss.backward()
        missing = [
            n
            for n, p in model.named_parameters()
            if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
        ]
        assert missing == []
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert fast.is_accelerated(accelerated) and not fast.is_accelerated(reference)
    # Per tensor, relative to its norm (other summation orders move single elements by ~1e-5); the key
    # projections' biases have a zero gradient in exact arithmetic (~1e-7 per element in floats).
    far = [n for n, g in grads[0].items() if (grads[1][n] - g).norm() > 1e-4 * g.norm() + 5e-5]
    assert far == []


def test_relative_position_table_resizes():
    table = torch.randn(27, 8)
    assert relative_position_table(14, 14, table).shape == (14, 14, 8)
    # A table made for another window size is resized to 2*size-1 rows first.
    assert relative_position_table(7, 7, table).shape == (7, 7, 8)


def test_bfloat16_predictor(tiny_model, photo):
    ref = SamPredictor(tiny_model)
    ref.set_image(photo)
    model16 = build_model("vit_tiny")
    model16.load_state_dict(tiny_model.state_dict())
    model16.to(torch.bfloat16)
    p16 = SamPredictor(model16)
    p16.set_image(photo)
    assert p16.features.dtype == torch.bfloat16
    kwargs = dict(
        point_coords=np.array([[200, 150]]), point_labels=np.array([1]), box=np.array([50, 60, 400, 450])
    )
    m32, s32, l32 = ref.predict(**kwargs, multimask_output=False)
    m16, s16, l16 = p16.predict(**kwargs, multimask_output=False)
    assert m16.dtype == bool and s16.dtype == np.float32 and l16.dtype == np.float32
    iou = (m16 & m32).sum() / max((m16 | m32).sum(), 1)
    assert iou > 0.9
    # Prompts are encoded in fp32 before the cast: sin/cos of large arguments need it.
    assert np.abs(s16 - s32).max() < 0.1 * max(1.0, np.abs(s32).max())


def _sam_batch(model):
    resize = ResizeLongestSide(model.image_encoder.img_size)
    image = torch.from_numpy(resize.apply_image(np.full((300, 400, 3), 90, np.uint8))).permute(2, 0, 1)
    return [
        {
            "image": image.float(),
            "original_size": (300, 400),
            "point_coords": torch.tensor([[[100.0, 200.0]], [[300.0, 50.0]]]),
            "point_labels": torch.tensor([[1], [1]]),
        },
        {"image": image.float(), "original_size": (300, 400), "boxes": torch.tensor([[50.0, 60, 700, 500]])},
    ]


def test_forward_runs_without_autograd_as_meta(tiny_model):
    """Sam.forward is inference (Meta's notebooks call .numpy() on its outputs); forward_train equals it."""
    batch = _sam_batch(tiny_model)
    outputs = tiny_model(batch, multimask_output=True)
    trained = tiny_model.forward_train(batch, multimask_output=True)
    for out, ref in zip(outputs, trained):
        for key, value in out.items():
            assert not value.requires_grad and value.grad_fn is None
            value.numpy()  # raises for a tensor that requires grad
            if key == "masks":  # the inference kernels round differently from the autograd ones
                assert (value == ref[key]).float().mean() > 0.999
            else:
                torch.testing.assert_close(value, ref[key].detach(), atol=1e-4, rtol=1e-4)
        assert out["masks"].shape == (len(out["iou_predictions"]), 3, 300, 400)


def test_predictor_outputs_are_ordinary_tensors(tiny_model, photo):
    """Meta's predictor returns tensors that can be edited in place; inference-mode tensors refuse."""
    predictor = SamPredictor(tiny_model)
    predictor.set_image(photo)
    point = predictor.transform.apply_coords_torch(torch.tensor([[[200.0, 150.0]]]), photo.shape[:2])
    outputs = predictor.predict_torch(point, torch.tensor([[1]]))
    for tensor in (*outputs, predictor.get_image_embedding()):
        assert not tensor.is_inference() and not tensor.requires_grad
        tensor.zero_()
        assert not tensor.any()
    predictor.set_image_batch([photo, photo[:100]])
    predictor.get_image_embedding().mul_(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_built_under_inference_mode_predicts_like_any_other(tiny_model, photo, dtype):
    """Inference tensors count no versions: what is keyed by weight versions (the encoder fingerprint)
    skips them instead of failing ("Inference tensors do not track version counter"), and the
    predictions equal a normally built model's."""
    from samkit.utils.embeddings import encoder_fingerprint

    normal = copy.deepcopy(tiny_model).to(dtype)
    with torch.inference_mode():
        frozen = build_model("vit_tiny")
        frozen.load_state_dict(tiny_model.state_dict())
        frozen.to(dtype)
    assert frozen.mask_decoder.mask_tokens.weight.is_inference()
    kwargs = dict(point_coords=np.array([[200, 150]]), point_labels=np.array([1]))
    results = []
    for model in (normal, frozen, frozen):  # the second call of the frozen one: nothing kept
        predictor = SamPredictor(model)
        predictor.set_image(photo)
        results.append(predictor.predict(**kwargs))
    for got in results[1:]:
        for a, b in zip(results[0], got):
            assert np.array_equal(a, b)
    assert encoder_fingerprint(frozen) == encoder_fingerprint(normal)
