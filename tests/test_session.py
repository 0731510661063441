"""The predictor's decoder session (samkit/fast/session.py): the work on one image kept across prompt
calls, fp32 copies of the token-side weights in bf16 inference; both dropped with the image and
never stale after a change to the image, the weights or a layer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from samkit import SamPredictor, build_model
from samkit.fast import decoder as fd
from samkit.fast.session import DecoderSession

from .conftest import perturbed_state

POINT = (np.array([[70.0, 50.0]]), np.array([1]))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """vit_tiny (1024 frame) with every weight perturbed; tests copy it."""
    torch.manual_seed(0)
    sam = build_model("vit_tiny")
    sam.load_state_dict(perturbed_state(sam.state_dict(), seed=3))
    return sam.eval()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)


def predictor(model: torch.nn.Module, image: np.ndarray, dtype=torch.float32, **kw) -> SamPredictor:
    p = SamPredictor(copy.deepcopy(model).to(dtype), **kw)
    p.set_image(image)
    return p


def predict(p: SamPredictor, prompt=POINT):
    return p.predict(point_coords=prompt[0], point_labels=prompt[1], return_logits=True)


def test_work_is_kept_across_calls_and_dropped_with_the_image(model, image):
    p = predictor(model, image)
    first = predict(p)
    session, work = p.decoder_session, p.decoder_session._image_work
    assert work  # the image-only work of the first call is kept ...
    again = predict(p)
    assert p.decoder_session is session and p.decoder_session._image_work is work  # ... and reused
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    p.set_image(image[::-1].copy())
    assert p.decoder_session is not session  # a new image: a new session
    p.reset_image()
    assert p.decoder_session is not session and not p.decoder_session._image_work


def test_an_edited_embedding_or_mask_prompt_is_never_served_old_work(model, image):
    p = predictor(model, image)
    predict(p)
    with torch.no_grad():
        p.features.mul_(0.5)  # in place: the same tensor, a new version
    fresh = predictor(model, image)
    fresh.features = p.features.clone()
    for a, b in zip(predict(p), predict(fresh)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # A mask prompt's dense embedding differs per pixel: no kept work for it, and the next plain
    # call still gets the plain result.
    logits = predict(p)[2][:1]
    p.predict(point_coords=POINT[0], point_labels=POINT[1], mask_input=logits)
    for a, b in zip(predict(p), predict(fresh)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_bf16_one_point_runs_its_tokens_in_fp32_close_to_the_fp32_model(model, image):
    ref = predictor(model, image, accelerate=False)
    p = predictor(model, image, torch.bfloat16)
    p.features = ref.features.to(torch.bfloat16)  # the same embedding: compare the decoders only
    sparse, _ = p.model.prompt_encoder((torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.int)), None, None)
    with torch.no_grad():
        assert fd.fp32_tokens(p.model.mask_decoder, sparse, p.features)
        assert not fd.fp32_tokens(p.model.mask_decoder, sparse.expand(8, -1, -1), p.features)  # 8 prompts
    got, want = predict(p), predict(ref)
    assert p.decoder_session._copies  # fp32 copies of the token-side weights were made
    bf16_only = p.model.mask_decoder(
        p.features, p.dense_pe(), *p.model.prompt_encoder(
            (torch.as_tensor(p.transform.apply_coords(POINT[0], p.original_size))[None].float(),
             torch.ones(1, 1, dtype=torch.int)), None, None), True,
    )[0].detach().float().numpy()  # fmt: skip
    err_fp32_tokens = np.abs(got[2] - want[2]).max()
    assert err_fp32_tokens < np.abs(bf16_only - want[2]).max()  # closer to fp32 than all-bf16
    np.testing.assert_allclose(got[1], want[1], atol=0.05, rtol=0.02)
    assert ((got[0] > 0) == (want[0] > 0)).mean() > 0.99


def test_changed_weights_are_never_served_stale_fp32_copies(model, image):
    p = predictor(model, image, torch.bfloat16)
    predict(p)
    assert p.decoder_session._copies
    other = perturbed_state(model.state_dict(), seed=9)
    p.model.load_state_dict({k: v.to(torch.bfloat16) for k, v in other.items()})  # in place: new versions
    fresh = predictor(model, image, torch.bfloat16)
    fresh.model.load_state_dict({k: v.to(torch.bfloat16) for k, v in other.items()})
    fresh.features = p.features.clone()
    for a, b in zip(predict(p), predict(fresh)):
        np.testing.assert_array_equal(a, b)


def test_an_adapter_added_after_the_first_call_is_applied(model, image):
    """peft wraps a decoder layer once the session holds copies of it: the wrapped layer is called."""
    import peft

    p = predictor(model, image, torch.bfloat16)
    before = predict(p)
    torch.manual_seed(4)
    config = peft.LoraConfig(
        target_modules=r".*mask_decoder.*_proj$", r=4, lora_alpha=8, init_lora_weights=False
    )
    peft.inject_adapter_in_model(config, p.model)
    p.model.to(torch.bfloat16)
    after = predict(p)
    assert not np.allclose(after[2], before[2], atol=1e-2)
    reference = SamPredictor(p.model, accelerate=False)  # the same (adapted) modules ...
    reference.features, reference.is_image_set = p.features, True
    reference.original_size, reference.input_size = p.original_size, p.input_size
    fd_model = copy.deepcopy(p.model)
    from samkit import fast

    fast.restore(fd_model)  # ... as reference modules
    reference.model = fd_model
    want = predict(reference)
    np.testing.assert_allclose(after[1], want[1], atol=0.05, rtol=0.02)
    assert ((after[0] > 0) == (want[0] > 0)).mean() > 0.99


def test_session_fp32_copies_follow_the_tensor():
    session = DecoderSession()
    w = torch.nn.Parameter(torch.randn(4, 4).to(torch.bfloat16))
    first = session.fp32(w)
    assert session.fp32(w) is first and first.dtype == torch.float32
    with torch.no_grad():
        w.add_(1)
    assert torch.equal(session.fp32(w), w.float())
    w.data = torch.zeros(4, 4, dtype=torch.bfloat16)  # new memory, same object
    assert torch.equal(session.fp32(w), torch.zeros(4, 4))
    with torch.inference_mode():
        t = torch.ones(2, dtype=torch.bfloat16)
    assert torch.equal(session.fp32(t), torch.ones(2)) and id(t) not in session._copies
