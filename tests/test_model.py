"""Model-level checks: shapes, gradients reach every parameter, precision, builders."""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from samkit import SamPredictor, build_model, sam_model_registry
from samkit.modeling.image_encoder import Attention, relative_position_table


def test_registry_names():
    assert set(sam_model_registry) >= {"default", "vit_b", "vit_l", "vit_h"}
    with pytest.raises(ValueError, match="vit_b"):
        build_model("vit_x")


def test_every_parameter_gets_a_gradient(tiny_model):
    model = tiny_model.train()
    try:
        image = torch.rand(3, 600, 1024) * 255
        batch = [
            {
                "image": image,
                "original_size": (300, 512),
                "point_coords": torch.tensor([[[100.0, 200.0], [400.0, 300.0]]]),
                "point_labels": torch.tensor([[1, 0]]),
                "boxes": torch.tensor([[50.0, 60.0, 700.0, 500.0]]),
                "mask_inputs": torch.randn(1, 1, 256, 256),
            },
            {
                "image": image,
                "original_size": (300, 512),
                "point_coords": torch.tensor([[[10.0, 20.0]]]),
                "point_labels": torch.tensor([[1]]),
            },
        ]
        loss = 0
        for multimask in (True, False):
            for out in model.forward_train(batch, multimask_output=multimask):
                assert torch.isfinite(out["low_res_logits"]).all()
                loss = loss + out["low_res_logits"].mean() + out["iou_predictions"].mean()
        loss.backward()
        missing = [
            n
            for n, p in model.named_parameters()
            if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
        ]
        assert missing == []
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_relative_position_table_resizes():
    table = torch.randn(27, 8)
    assert relative_position_table(14, 14, table).shape == (14, 14, 8)
    # A table made for another window size is resized to 2*size-1 rows first.
    assert relative_position_table(7, 7, table).shape == (7, 7, 8)


def test_global_attention_chunking_matches_unchunked(monkeypatch):
    import samkit.modeling.image_encoder as enc

    torch.manual_seed(0)
    attn = Attention(32, 4, use_rel_pos=True, input_size=(8, 8))
    torch.nn.init.normal_(attn.rel_pos_h)
    torch.nn.init.normal_(attn.rel_pos_w)
    x = torch.randn(2, 8, 8, 32)
    full = attn(x)
    monkeypatch.setattr(enc, "_BIAS_CHUNK_ELEMENTS", 64 * 64)  # one head at a time
    torch.testing.assert_close(attn(x), full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "block", [10**9, 5 * 60, 3 * 2 * 60, 60]
)  # whole; part of a head; 2-row blocks; 1 row
def test_inference_bias_blocks_match_the_whole_bias(monkeypatch, dtype, block):
    """CPU inference builds the relative-position bias in (heads x query rows) blocks: every block size,
    remainders included, gives the whole bias's result up to the kernel's rounding, and the training
    path agrees."""
    import samkit.modeling.image_encoder as enc

    torch.manual_seed(0)
    attn = Attention(32, 4, use_rel_pos=True, input_size=(6, 10)).to(dtype)
    torch.nn.init.normal_(attn.rel_pos_h)
    torch.nn.init.normal_(attn.rel_pos_w)
    x = torch.randn(3, 6, 10, 32, dtype=dtype)
    with torch.inference_mode():
        monkeypatch.setattr(enc, "_BIAS_BLOCK_ELEMENTS", 10**12)
        whole = attn(x)
        monkeypatch.setattr(enc, "_BIAS_BLOCK_ELEMENTS", block)
        blocked = attn(x)
    tight = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(blocked, whole, atol=tight, rtol=tight)
    trained = attn(x)  # parameters require grad: the autograd path
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(trained.detach(), whole, atol=tol, rtol=tol)


@pytest.mark.parametrize("block", [10**9, 2 * 60 * 60, 7 * 60])  # all heads; 2 heads; 7-row blocks
@pytest.mark.parametrize("windowed", [False, True])
def test_bf16_cpu_inference_folds_the_bias_into_the_scores(monkeypatch, block, windowed):
    """CPU bf16 inference widens queries by their bias terms and keys by one-hot row/column codes, so
    one matmul gives the biased scores: the result matches fp32 attention of the same inputs (with
    the bias added explicitly) to bf16 accuracy, for every block size and for padded windows."""
    import samkit.modeling.image_encoder as enc

    torch.manual_seed(0)
    attn = Attention(32, 4, use_rel_pos=True, input_size=(4, 4) if windowed else (6, 10))
    torch.nn.init.normal_(attn.rel_pos_h, std=0.5)
    torch.nn.init.normal_(attn.rel_pos_w, std=0.5)
    x = torch.randn(3, 6, 10, 32).bfloat16().float()
    with torch.inference_mode():
        expected = attn.forward_windowed(x, 4) if windowed else attn(x)  # fp32: bias added to the scores
        monkeypatch.setattr(enc, "_BIAS_BLOCK_ELEMENTS", block)
        calls = []
        folded = enc.Attention._attend_folded
        monkeypatch.setattr(enc.Attention, "_attend_folded", lambda *a: calls.append(1) or folded(*a))
        low = attn.to(torch.bfloat16)
        got = (low.forward_windowed(x.bfloat16(), 4) if windowed else low(x.bfloat16())).float()
    assert calls, "the bf16 CPU path did not fold the bias"
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_matches_pytorch(activation, dtype):
    from samkit.modeling.common import linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80).to(dtype)
    x = torch.randn(2, 5, 7, 48, dtype=dtype)
    act = {"none": lambda t: t, "gelu": torch.nn.functional.gelu, "relu": torch.nn.functional.relu}[
        activation
    ]
    expected = act(torch.nn.functional.linear(x, layer.weight, layer.bias))
    with torch.no_grad():
        fused = linear(x, layer, activation)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert fused.shape == expected.shape
    torch.testing.assert_close(fused, expected.detach(), atol=tol, rtol=tol)
    # With autograd the plain composition runs, and gradients reach the layer.
    linear(x, layer, activation).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


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


def test_cpu_prompt_chunk_keeps_a_chunk_of_image_tokens_within_16_mib(monkeypatch):
    """Under the default allocator: vit_b's 64x64x256 tokens are 4 prompts in fp32, 8 in bf16, more
    for small grids, at least 1; with the tuned allocator 16 whatever the size."""
    import samkit.modeling.mask_decoder as md

    monkeypatch.setattr(md, "allocator_tuned", lambda: False)
    tokens = 64 * 64 * 256
    assert [md.cpu_prompt_chunk(tokens * size) for size in (4, 2)] == [4, 8]
    assert md.cpu_prompt_chunk(16 * 16 * 256 * 4) == 64 and md.cpu_prompt_chunk(128 * 128 * 256 * 4) == 1
    monkeypatch.setattr(md, "allocator_tuned", lambda: True)
    assert md.cpu_prompt_chunk(tokens * 4) == md.cpu_prompt_chunk(tokens * 2) == 16


@pytest.mark.parametrize("mask_inputs", [False, True])
def test_cpu_inference_decodes_prompts_in_chunks_with_the_same_result(tiny_model, monkeypatch, mask_inputs):
    """CPU inference splits a big prompt batch into chunks (memory reuse; the shared image's work done
    once for all chunks): same masks and IoU as one batch and as one prompt at a time, and the
    caller's tensors untouched (the decoder overwrites only its own intermediates)."""
    import samkit.modeling.mask_decoder as md

    torch.manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64)
    boxes = torch.rand(11, 2) * 800
    boxes = torch.cat([boxes, boxes + 150], dim=1)
    masks = torch.randn(11, 1, 256, 256) if mask_inputs else None
    pe = tiny_model.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = tiny_model.prompt_encoder(None, boxes, masks)
        inputs = [t.clone() for t in (embedding, pe, sparse, dense)]
        monkeypatch.setattr(md, "cpu_prompt_chunk", lambda *_: 4)  # 4 + 4 + 3
        chunked = tiny_model.mask_decoder(embedding, pe, sparse, dense, True)
        monkeypatch.setattr(md, "cpu_prompt_chunk", lambda *_: 1000)
        whole = tiny_model.mask_decoder(embedding, pe, sparse, dense, True)
        single = [
            tiny_model.mask_decoder(
                embedding, pe, sparse[i : i + 1], dense[i : i + 1] if mask_inputs else dense, True
            )
            for i in range(len(boxes))
        ]
        for before, after in zip(inputs, (embedding, pe, sparse, dense)):
            assert torch.equal(before, after)
    for a, b, c in zip(chunked, whole, zip(*single)):
        assert a.shape == b.shape
        # Other batch shapes may take other GEMM kernels (another summation order): ~1e-4 on logits.
        torch.testing.assert_close(a, b, atol=5e-4, rtol=1e-4)
        torch.testing.assert_close(a, torch.cat(c), atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("points, mask_inputs", [(1, False), (12, False), (2, True)])
def test_cpu_chunks_of_one_prompt_each_get_their_own_result(tiny_model, monkeypatch, points, mask_inputs):
    """Chunks of a single prompt (a frame above ~1400 pixels in fp32 makes cpu_prompt_chunk 1): a
    chunk's inputs then have batch 1 like a shared image, yet the image tokens after the first layer,
    and with mask prompts the image tokens from the start, are that prompt's own. Every prompt's
    masks and IoU equal a call with that prompt alone (once the second and later prompts got the
    first one's layer-2 keys, and with mask prompts its whole image side). 12 points: 17 tokens,
    the unfolded attention with its key/value projections."""
    import samkit.modeling.mask_decoder as md

    torch.manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64)
    coords = torch.rand(3, points, 2) * 1000
    labels = torch.ones(3, points, dtype=torch.int)
    masks_in = torch.randn(3, 1, 256, 256) * 5 if mask_inputs else None
    pe = tiny_model.prompt_encoder.get_dense_pe()
    monkeypatch.setattr(md, "cpu_prompt_chunk", lambda *_: 1)
    with torch.inference_mode():
        sparse, dense = tiny_model.prompt_encoder((coords, labels), None, masks_in)
        masks, iou = tiny_model.mask_decoder(embedding, pe, sparse, dense, True)
        for i in range(3):
            alone = tiny_model.mask_decoder(embedding, pe, sparse[i : i + 1], dense[i : i + 1], True)
            assert torch.equal(masks[i : i + 1], alone[0]) and torch.equal(iou[i : i + 1], alone[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_chunks_write_image_tokens_to_two_reused_buffers_with_the_same_values(
    tiny_model, monkeypatch, dtype
):
    """CPU inference in chunks writes the per-prompt image tokens (PE sums, residual sums, layer
    norms in place) to at most two buffers reused by every chunk: bit for bit the result of fresh
    tensors everywhere, with the last, smaller chunk in views of the buffers."""
    import samkit.modeling.mask_decoder as md
    import samkit.modeling.transformer as tr

    model = copy.deepcopy(tiny_model).to(dtype)
    torch.manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64, dtype=dtype)
    points = torch.rand(11, 1, 2) * 1000
    labels = torch.ones(11, 1, dtype=torch.int)
    pe = model.prompt_encoder.get_dense_pe()
    monkeypatch.setattr(md, "cpu_prompt_chunk", lambda *_: 4)  # 4 + 4 + 3
    monkeypatch.setattr(tr, "allocator_tuned", lambda: False)  # (a tuned allocator needs no workspace)
    made = []
    real_buffer = tr._Workspace.buffer

    def counted(self, like, batch, *live):
        out = real_buffer(self, like, batch, *live)
        made.append(out.untyped_storage().data_ptr())
        return out

    with torch.inference_mode():
        sparse, dense = model.prompt_encoder((points, labels), None, None)
        monkeypatch.setattr(tr._Workspace, "buffer", counted)
        reused = model.mask_decoder(embedding, pe, sparse, dense, True)
        monkeypatch.setattr(
            tr._Workspace, "buffer", lambda self, like, batch, *live: like.new_empty(batch, *like.shape[1:])
        )
        monkeypatch.setattr(tr, "_norm", lambda x, norm, work: norm(x))
        fresh = model.mask_decoder(embedding, pe, sparse, dense, True)
    # fp32: the first residual sum and the PE sums (9 results, 2 buffers); bf16 takes the PE apart
    # (the first residual sum only, 1 buffer).
    assert (len(made), len(set(made))) == ((9, 2) if dtype == torch.float32 else (3, 1))
    for a, b in zip(reused, fresh):
        assert torch.equal(a, b)


def test_cpu_inference_in_chunks_runs_under_bf16_autocast(tiny_model, monkeypatch):
    """fp32 weights under CPU bf16 autocast (evaluation with amp): chunked decoding (shared image work,
    residuals reused only where dtypes match, blocked upscaling) gives one batch's result and dtype."""
    import samkit.modeling.mask_decoder as md

    torch.manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64)
    boxes = torch.rand(11, 2) * 800
    boxes = torch.cat([boxes, boxes + 150], dim=1)
    pe = tiny_model.prompt_encoder.get_dense_pe()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sparse, dense = tiny_model.prompt_encoder(None, boxes, None)
        monkeypatch.setattr(md, "cpu_prompt_chunk", lambda *_: 4)
        chunked = tiny_model.mask_decoder(embedding, pe, sparse, dense, True)
        monkeypatch.setattr(md, "cpu_prompt_chunk", lambda *_: 1000)
        whole = tiny_model.mask_decoder(embedding, pe, sparse, dense, True)
    for a, b in zip(chunked, whole):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("multimask", [True, False])
def test_decoding_only_masks_above_an_iou_keeps_exactly_those_masks(tiny_model, monkeypatch, multimask):
    """forward_above_iou (automatic mask generation) returns exactly the masks of forward whose IoU is
    above the threshold, in forward's flat order, across prompt chunks, and nothing for a threshold
    no mask reaches."""
    import samkit.modeling.mask_decoder as md

    torch.manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64)
    points = torch.rand(11, 1, 2) * 1000
    labels = torch.ones(11, 1, dtype=torch.int)
    pe = tiny_model.prompt_encoder.get_dense_pe()
    monkeypatch.setattr(md, "cpu_prompt_chunk", lambda *_: 4)
    with torch.inference_mode():
        sparse, dense = tiny_model.prompt_encoder((points, labels), None, None)
        masks, iou = tiny_model.mask_decoder(embedding, pe, sparse, dense, multimask)
        threshold = float(iou.flatten().median())  # keeps about half: some prompts lose every mask
        kept, kept_iou, index = tiny_model.mask_decoder.forward_above_iou(
            embedding, pe, sparse, dense, multimask, threshold
        )
        none = tiny_model.mask_decoder.forward_above_iou(embedding, pe, sparse, dense, multimask, 1e9)
    expected = (iou.flatten() > threshold).nonzero().flatten()
    assert 0 < len(expected) < iou.numel()
    assert torch.equal(index, expected)
    assert torch.equal(kept_iou, iou.flatten()[expected])
    torch.testing.assert_close(kept, masks.flatten(0, 1)[expected], atol=1e-5, rtol=1e-5)
    assert [t.shape[0] for t in none] == [0, 0, 0] and none[0].shape[1:] == masks.shape[2:]


def test_tune_cpu_allocator_is_on_by_default_and_can_be_turned_off():
    code = "from samkit import tune_cpu_allocator as t; print(t(), t())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    env = {**os.environ, "SAMKIT_TUNE_MALLOC": "0"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert off.stdout.split() == ["False", "False"]
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert on.stdout.split() == ["True", "True"]


def _sam_batch(model):
    p = SamPredictor(model)
    image = torch.from_numpy(p.transform.apply_image(np.full((300, 400, 3), 90, np.uint8))).permute(2, 0, 1)
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


def test_forward_train_gives_every_decoder_parameter_a_gradient(tiny_model):
    decoder = tiny_model.mask_decoder
    try:
        batch = _sam_batch(tiny_model)
        loss = 0
        for multimask in (True, False):
            for out in tiny_model.forward_train(batch, multimask_output=multimask):
                assert out["low_res_logits"].requires_grad and out["iou_predictions"].requires_grad
                loss = loss + out["low_res_logits"].mean() + out["iou_predictions"].mean()
        loss.backward()
        missing = [n for n, p in decoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert missing == []
    finally:
        tiny_model.zero_grad(set_to_none=True)


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


def test_subnormal_attention_weights_are_flushed_without_changing_the_result():
    """The decoder zeroes subnormal softmax weights (x86 multiplies them tens of times slower): normal
    weights keep their bits, and the attention output is the same."""
    from samkit.modeling.common import flush_subnormal_probs

    torch.manual_seed(0)
    probs = (torch.randn(2, 56, 4096) * 30).softmax(dim=-1)  # sharp rows: many subnormal weights
    tiny = torch.finfo(torch.float32).tiny
    subnormal = (probs > 0) & (probs < tiny)
    assert subnormal.float().mean() > 0.05
    values = torch.randn(2, 4096, 256)
    expected = probs @ values
    flushed = flush_subnormal_probs(probs.clone())
    assert torch.equal(flushed[~subnormal], probs[~subnormal])
    assert not flushed[subnormal].any()
    torch.testing.assert_close(flushed @ values, expected, atol=0, rtol=0)
    # Under autograd: out of place (softmax's backward needs its output) and differentiable.
    scores = (torch.randn(1, 8, 512) * 30).requires_grad_()
    p = scores.softmax(dim=-1)
    out = flush_subnormal_probs(p)
    assert out is not p
    out.sum().backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()
    # Other dtypes and 16-bit GEMMs (which treat subnormal inputs as zero themselves): unchanged.
    half = probs.bfloat16()
    assert flush_subnormal_probs(half) is half


def test_decoder_reuses_the_image_work_of_the_previous_call_only_while_it_is_valid(tiny_model):
    """Prompting one image again reuses the image-only sums of the previous call (same results as a
    fresh decoder); a changed embedding, another image or a changed "no mask" embedding are seen."""
    import copy
    import pickle

    torch.manual_seed(0)
    predictor = SamPredictor(tiny_model)
    image = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    points, labels = np.array([[40, 30]]), np.array([1])

    def fresh_logits(model: torch.nn.Module) -> np.ndarray:
        other = SamPredictor(copy.deepcopy(model))
        other.set_image(image)
        return other.predict(point_coords=points, point_labels=labels, return_logits=True)[0]

    predictor.set_image(image)
    first = predictor.predict(point_coords=points, point_labels=labels, return_logits=True)[0]
    assert tiny_model.mask_decoder.__dict__.get("_kept_image_work") is not None
    again = predictor.predict(point_coords=points, point_labels=labels, return_logits=True)[0]
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(first, fresh_logits(tiny_model))
    # The embedding changed in place: recomputed.
    with torch.no_grad():
        predictor.features.mul_(1.5)
    changed = predictor.predict(point_coords=points, point_labels=labels, return_logits=True)[0]
    assert not np.array_equal(changed, first)
    other = SamPredictor(copy.deepcopy(tiny_model))
    other.set_image(image)
    with torch.no_grad():
        other.features.mul_(1.5)
    np.testing.assert_array_equal(
        changed, other.predict(point_coords=points, point_labels=labels, return_logits=True)[0]
    )
    # The "no mask" embedding changed (as an optimizer step would): recomputed.
    predictor.set_image(image)
    predictor.predict(point_coords=points, point_labels=labels, return_logits=True)
    no_mask = tiny_model.prompt_encoder.no_mask_embed.weight
    saved = no_mask.detach().clone()
    try:
        with torch.no_grad():
            no_mask.add_(0.5)
        moved = predictor.predict(point_coords=points, point_labels=labels, return_logits=True)[0]
        np.testing.assert_array_equal(moved, fresh_logits(tiny_model))
        assert not np.array_equal(moved, first)
    finally:
        with torch.no_grad():
            no_mask.copy_(saved)  # the model is shared by the session's tests
    # Mask prompts: each call's fresh dense embedding (maybe at a freed one's address) is its own.
    low_res = predictor.predict(point_coords=points, point_labels=labels, return_logits=True)[2][:1]
    reference = SamPredictor(copy.deepcopy(tiny_model))
    reference.set_image(image)
    for scale in (1.0, -3.0, 0.5):
        kwargs = dict(
            point_coords=points, point_labels=labels, mask_input=low_res * scale, return_logits=True
        )
        np.testing.assert_array_equal(predictor.predict(**kwargs)[0], reference.predict(**kwargs)[0])
    # Another image: its own result.
    predictor.set_image(image[::-1].copy())
    flipped = predictor.predict(point_coords=points, point_labels=labels, return_logits=True)[0]
    assert not np.array_equal(flipped, first)
    # The kept work is a cache: a model that holds it still pickles and copies.
    pickle.loads(pickle.dumps(tiny_model.mask_decoder))
    copy.deepcopy(tiny_model)


def test_bf16_decoder_takes_the_pe_apart_with_the_same_masks(tiny_model, monkeypatch):
    """16-bit CPU inference on per-prompt image tokens attends to keys + PE without forming the sum
    (the PE's part as GEMMs): the masks are those of the summed keys, up to bf16 rounding."""
    import copy

    import samkit.modeling.transformer as tr

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    torch.manual_seed(0)
    embedding = torch.randn(1, 256, 64, 64, dtype=torch.bfloat16)
    boxes = torch.rand(6, 2) * 800
    boxes = torch.cat([boxes, boxes + 150], dim=1)
    pe = model.prompt_encoder.get_dense_pe()
    calls = []
    real = tr.pe_apart
    monkeypatch.setattr(tr, "pe_apart", lambda *a: calls.append(real(*a)) or calls[-1])
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(None, boxes.bfloat16(), None)
        apart, apart_iou = model.mask_decoder(embedding, pe, sparse, dense, True)
        assert any(calls)
        monkeypatch.setattr(tr, "pe_apart", lambda *a: False)
        summed, summed_iou = model.mask_decoder(embedding, pe, sparse, dense, True)
    torch.testing.assert_close(apart_iou.float(), summed_iou.float(), atol=0.05, rtol=0.05)
    a, s = apart.float() > 0, summed.float() > 0
    iou = (a & s).flatten(1).sum(1) / (a | s).flatten(1).sum(1).clamp(min=1)
    assert iou.min() > 0.95, iou
    assert not tr.pe_apart(torch.zeros(2, 4, 8), torch.zeros(1, 4, 8))  # fp32: the sum pays there


@pytest.mark.parametrize(
    "prompts, points, fp32_tokens", [(1, 1, True), (2, 1, True), (1, 3, True), (1, 10, True), (3, 1, False)]
)
def test_bf16_cpu_inference_runs_a_few_tokens_in_fp32(tiny_model, monkeypatch, prompts, points, fp32_tokens):
    """bf16 CPU inference on at most 16 prompt tokens (one or two prompts) keeps the tokens in fp32
    with fp32 copies of the token-side weights, the image tokens in bf16 (10 points: 16 tokens, the
    unfolded attention, which attends in bf16): outputs in bf16 as before,
    within bf16 rounding of the all-bf16 path, and about as close to the fp32 model's mask logits.
    Three prompts (21 tokens) stay all-bf16, bit for bit the path with the fp32 tokens turned off."""
    import samkit.modeling.common as common
    import samkit.modeling.mask_decoder as md

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    torch.manual_seed(prompts * 10 + points)
    embedding = torch.randn(1, 256, 64, 64)
    coords = torch.rand(prompts, points, 2) * 1000
    labels = torch.ones(prompts, points, dtype=torch.int)
    seen = []
    real = common.token_linear
    monkeypatch.setattr(common, "token_linear", lambda x, *a: seen.append(x.dtype) or real(x, *a))

    def decode(m: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            sparse, dense = m.prompt_encoder((coords, labels), None, None)
            pe = m.prompt_encoder.get_dense_pe()
            return m.mask_decoder(embedding.to(dtype), pe, sparse, dense, True)

    mixed = decode(model, torch.bfloat16)
    assert (torch.float32 in seen) == fp32_tokens
    monkeypatch.setattr(md, "_FP32_TOKEN_ROWS", 0)
    plain = decode(model, torch.bfloat16)
    reference = decode(tiny_model, torch.float32)
    assert mixed[0].dtype == mixed[1].dtype == torch.bfloat16
    if not fp32_tokens:
        assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[1], plain[1])
        return
    for got, bf16, fp32 in zip(mixed, plain, reference):
        scale = fp32.abs().max()
        torch.testing.assert_close(got.float(), bf16.float(), atol=0.05 * scale, rtol=0.05)
    # Over the mask logits (the few IoU values are too few to rank the two paths). Over 36 random
    # models and prompts the fp32 tokens' mean error was 0.64-1.07x the all-bf16 path's (median 0.88).
    error, bf16_error = ((out[0].float() - reference[0]).abs().mean() for out in (mixed, plain))
    assert error <= 1.2 * bf16_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_built_under_inference_mode_predicts_like_any_other(tiny_model, photo, dtype):
    """Inference tensors count no versions: the caches keyed by weight versions (the dense PE, the
    fp32 token weights, the encoder fingerprint) skip them instead of failing ("Inference tensors do
    not track version counter"), and the predictions equal a normally built model's."""
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


def test_fp32_copies_of_16_bit_weights_follow_every_change(tiny_model):
    """The fp32 token stream's weight copies (common.fp32_param) are refreshed when a weight changes
    in place (load_state_dict, an optimizer step) or is replaced: the decoder's outputs then equal a
    fresh model's with the new weights."""
    from samkit.modeling.common import fp32_param

    w = torch.randn(8, 4, dtype=torch.bfloat16)
    first = fp32_param(w)
    assert fp32_param(w) is first and torch.equal(first, w.float())
    with torch.no_grad():
        w.add_(1)
    assert torch.equal(fp32_param(w), w.float())
    assert fp32_param(first) is first  # fp32 tensors are their own copy

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    torch.manual_seed(1)
    embedding = torch.randn(1, 256, 64, 64, dtype=torch.bfloat16)
    coords, labels = torch.rand(1, 1, 2) * 1000, torch.ones(1, 1, dtype=torch.int)

    def decode(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            sparse, dense = m.prompt_encoder((coords, labels), None, None)
            return m.mask_decoder(embedding, m.prompt_encoder.get_dense_pe(), sparse, dense, True)

    before = decode(model)
    other = {k: v * 1.5 if k.startswith("mask_decoder") else v for k, v in model.state_dict().items()}
    model.load_state_dict(other)
    fresh = copy.deepcopy(tiny_model).to(torch.bfloat16)
    fresh.load_state_dict(other)
    after, expected = decode(model), decode(fresh)
    assert not torch.equal(after[0], before[0])
    assert torch.equal(after[0], expected[0]) and torch.equal(after[1], expected[1])
    model.mask_decoder.iou_prediction_head.layers[0].weight = torch.nn.Parameter(
        fresh.mask_decoder.iou_prediction_head.layers[0].weight.detach() * 2
    )
    with torch.no_grad():
        fresh.mask_decoder.iou_prediction_head.layers[0].weight.mul_(2)
    assert torch.equal(decode(model)[1], decode(fresh)[1])


@pytest.mark.parametrize("grid", [16, 64, 80])
def test_cpu_mask_upscaling_in_blocks_equals_the_plain_computation(tiny_model, grid):
    """The CPU inference path of the mask upscaling (blocks of prompts or of rows, mask-major product,
    reordered in two copies) gives the plain path's fp32 logits: several prompts per block (16x16
    tokens), one prompt (64x64), rows of one prompt (80x80). Same sums in another GEMM orientation:
    bit for bit with MKL on Intel Xeons, within float32 rounding on AMD EPYC, where MKL's kernels
    change with the operands' shapes (max difference 6e-6 on logits up to 12)."""
    decoder = tiny_model.mask_decoder
    torch.manual_seed(grid)
    src = torch.randn(5, grid * grid, decoder.transformer_dim)
    hyper = torch.randn(5, 3, decoder.transformer_dim // 8)
    with torch.no_grad():
        blocked = decoder._masks_from_tokens(src, hyper, grid, grid)
    with torch.enable_grad():  # the path training takes: the whole batch at once, as Meta's layout
        plain = decoder._masks_from_tokens(src, hyper, grid, grid).detach()
    assert blocked.shape == plain.shape == (5, 3, 4 * grid, 4 * grid)
    torch.testing.assert_close(blocked, plain, rtol=1e-5, atol=2e-5)
