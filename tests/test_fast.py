"""The speed layer (samkit.fast): accelerate/restore, and every fast path against the reference modules
(samkit.modeling) holding the same weights.

Models are a vit_tiny built for a 256 frame (16x16 embedding grid: 16x cheaper than SAM's 1024 and
enough for every path), every weight perturbed. Tests copy the module-scoped reference model and
accelerate the copy; nothing here changes the session's ``tiny_model``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import samkit
from samkit import build_model, fast
from samkit.fast import decoder as fd
from samkit.fast import encoder as fe
from samkit.fast import transformer as ft
from samkit.modeling import common, image_encoder, mask_decoder, transformer
from samkit.modeling.image_encoder import Attention, window_partition, window_unpartition

from .conftest import perturbed_state

FRAME = 256  # input side: 16x16 image tokens
GRID = FRAME // 16
SAMKIT = Path(samkit.__file__).resolve().parent


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    """vit_tiny for a 256 frame with every weight perturbed, reference modules only. Do not change it:
    tests copy it (``accelerated``)."""
    torch.manual_seed(0)
    model = build_model("vit_tiny", image_size=FRAME)
    model.load_state_dict(perturbed_state(model.state_dict(), seed=0))
    return model


@pytest.fixture(scope="module")
def embedding(reference) -> torch.Tensor:
    """The reference encoder's fp32 embedding 1x256x16x16 of a random image."""
    torch.manual_seed(1)
    with torch.inference_mode():
        return reference.image_encoder(torch.rand(1, 3, FRAME, FRAME) * 4 - 2).clone()


def accelerated(model: nn.Module, dtype: torch.dtype = torch.float32, **settings) -> nn.Module:
    """An accelerated copy of ``model`` in ``dtype``."""
    return fast.accelerate(copy.deepcopy(model).to(dtype), **settings)


def random_boxes(n: int, seed: int = 0) -> torch.Tensor:
    """n XYXY boxes inside the 256 frame."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(n, 2, generator=g) * 150
    return torch.cat([corner, corner + 30 + torch.rand(n, 2, generator=g) * 70], dim=1)


def random_points(prompts: int, points: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand(prompts, points, 2, generator=g) * FRAME
    return coords, torch.ones(prompts, points, dtype=torch.int)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of the positive pixels of two logit tensors BxMxHxW, per mask (B*M)."""
    a, b = a.float().flatten(0, 1) > 0, b.float().flatten(0, 1) > 0
    return (a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1).clamp(min=1)


def decode(model: nn.Module, embedding: torch.Tensor, prompts: tuple, multimask: bool = True):
    """(mask logits, IoU) of ``model``'s decoder for prompts (points, boxes, masks), in inference."""
    dtype = model.mask_decoder.iou_token.weight.dtype
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(*prompts)
        pe = model.prompt_encoder.get_dense_pe()
        return model.mask_decoder(embedding.to(dtype), pe, sparse, dense, multimask)


# --------------------------------------------------------------------------- accelerate / restore


def _types(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in model.named_modules()]


def test_accelerate_and_restore_swap_classes_and_keep_every_parameter(reference):
    model = copy.deepcopy(reference)
    params = dict(model.named_parameters())
    state = model.state_dict()
    before = _types(model)
    assert not fast.is_accelerated(model)

    assert fast.accelerate(model) is model
    assert fast.is_accelerated(model)
    swapped = {type(m) for m in model.modules()} & set(fast.REFERENCE_MODULES)
    assert swapped == set(fast.REFERENCE_MODULES)  # every fast class is used by SAM
    assert not {type(m) for m in model.modules()} & set(fast.FAST_MODULES)
    for name, param in model.named_parameters():
        assert param is params[name], name
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert value.data_ptr() == state[key].data_ptr(), key

    # Idempotent: the same module objects, settings updated.
    modules = dict(model.named_modules())
    fast.accelerate(model, prompt_chunk=5)
    assert all(m is modules[name] for name, m in model.named_modules())
    assert model.mask_decoder.prompt_chunk == 5

    assert fast.restore(model) is model
    assert not fast.is_accelerated(model)
    assert _types(model) == before
    assert "prompt_chunk" not in model.mask_decoder.__dict__  # settings dropped
    assert "reuse_buffers" not in model.mask_decoder.transformer.__dict__
    for name, param in model.named_parameters():
        assert param is params[name], name
    assert list(model.state_dict()) == list(state)
    for key, value in model.state_dict().items():
        assert value.data_ptr() == state[key].data_ptr(), key
    model.load_state_dict(state, strict=True)  # Meta's keys load into both layouts
    fast.accelerate(model).load_state_dict(state, strict=True)


def test_reference_modules_are_the_ones_accelerate_maps():
    """FAST_MODULES maps exactly SAM's reference classes, each to a subclass of it."""
    expected = {
        image_encoder.Attention,
        image_encoder.Block,
        common.MLPBlock,
        common.MLP,
        transformer.Attention,
        transformer.TwoWayAttentionBlock,
        transformer.TwoWayTransformer,
        mask_decoder.MaskDecoder,
    }
    assert set(fast.FAST_MODULES) == expected
    for ref, fast_cls in fast.FAST_MODULES.items():
        assert issubclass(fast_cls, ref) and fast_cls is not ref
    assert all(fast.REFERENCE_MODULES[f] is r for r, f in fast.FAST_MODULES.items())


def test_accelerate_leaves_subclasses_alone_and_falls_back_to_the_reference(reference, embedding):
    """A user's subclass of a reference module keeps its class; the fast parents around it then run
    the reference code, which calls it."""

    class Scaled(transformer.Attention):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return 1.5 * super().forward(q, k, v)

    def with_subclass(model: nn.Module) -> nn.Module:
        layer = model.mask_decoder.transformer.layers[1]
        old = layer.cross_attn_image_to_token
        layer.cross_attn_image_to_token = Scaled(old.embedding_dim, old.num_heads, 2)
        layer.cross_attn_image_to_token.load_state_dict(old.state_dict())
        return model

    ref = with_subclass(copy.deepcopy(reference))
    model = fast.accelerate(with_subclass(copy.deepcopy(reference)))
    layer = model.mask_decoder.transformer.layers[1]
    assert type(layer.cross_attn_image_to_token) is Scaled
    assert type(layer) is ft.FastTwoWayAttentionBlock and type(layer.self_attn) is ft.FastAttention
    prompts = (None, random_boxes(4), None)
    got, want = decode(model, embedding, prompts), decode(ref, embedding, prompts)
    base = decode(reference, embedding, prompts)
    assert not torch.allclose(want[0], base[0], atol=1e-2)  # the subclass counts
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=5e-4, rtol=1e-4)
    assert type(fast.restore(model).mask_decoder.transformer.layers[1].cross_attn_image_to_token) is Scaled


def test_forward_hooks_on_swapped_modules_survive(reference, embedding):
    """Hooks registered on a module that accelerate() swaps still run, after restore() too."""
    model = copy.deepcopy(reference)
    calls: list[str] = []
    hooked = {
        "decoder": model.mask_decoder,
        "transformer": model.mask_decoder.transformer,
        "token_to_image": model.mask_decoder.transformer.layers[0].cross_attn_token_to_image,
        "global_attention": model.image_encoder.blocks[1].attn,
        "block": model.image_encoder.blocks[0],
    }
    for name, module in hooked.items():
        module.register_forward_hook(lambda *_, name=name: calls.append(name))

    def run() -> set[str]:
        calls.clear()
        with torch.inference_mode():
            model.image_encoder(torch.zeros(1, 3, FRAME, FRAME))
        decode(model, embedding, (None, random_boxes(2), None))
        return set(calls)

    assert run() == set(hooked)
    fast.accelerate(model)
    assert type(model.mask_decoder) is fd.FastMaskDecoder
    assert run() == set(hooked)
    fast.restore(model)
    assert run() == set(hooked)


# --------------------------------------------------------------------------- fast vs reference


def test_image_encoder_matches_the_reference(reference):
    """fp32 within float rounding; bf16 (the folded bias of global attention, padded windows) as close
    to the fp32 reference as the reference's own bf16 computation."""
    torch.manual_seed(2)
    images = torch.rand(2, 3, FRAME, FRAME) * 4 - 2
    with torch.inference_mode():
        want = reference.image_encoder(images)
        got = accelerated(reference).image_encoder(images)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        ref16 = copy.deepcopy(reference).bfloat16().image_encoder(images.bfloat16()).float()
        fast16 = accelerated(reference, torch.bfloat16).image_encoder(images.bfloat16()).float()
    error, ref_error = ((x - want).norm() / want.norm() for x in (fast16, ref16))
    assert error < 0.02 and error < 1.2 * ref_error, (error, ref_error)


CASES = {
    "one point": lambda: (random_points(1, 1), None, None),
    "8 boxes": lambda: (None, random_boxes(8), None),
    "points and masks": lambda: (random_points(8, 2), None, torch.randn(8, 1, 4 * GRID, 4 * GRID) * 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decoder_matches_the_reference(reference, embedding, case):
    """One point, 8 boxes in chunks of 3 prompts (3 + 3 + 2: shared image work across chunks), 8
    prompts with mask inputs (per-prompt image tokens). fp32: the reference's logits and IoU within
    float rounding. bf16: masks at an IoU >= 0.98 with the fp32 reference's on average (with mask
    prompts, where the reference's own bf16 masks agree less (~0.97), no worse than those minus 0.01),
    and IoU predictions about as far from fp32 as the reference's own bf16 ones."""
    torch.manual_seed(3)
    prompts = CASES[case]()
    model = accelerated(reference, prompt_chunk=3)
    for multimask in (True, False):
        got = decode(model, embedding, prompts, multimask)
        want = decode(reference, embedding, prompts, multimask)
        assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
        torch.testing.assert_close(got[0], want[0], atol=5e-4, rtol=1e-4)
        torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)

    want = decode(reference, embedding, prompts)
    low = tuple(p.bfloat16() if p is not None and p.is_floating_point() else p for p in prompts[1:])
    prompts16 = (prompts[0], *low)
    fast16 = decode(accelerated(reference, torch.bfloat16, prompt_chunk=3), embedding, prompts16)
    ref16 = decode(copy.deepcopy(reference).bfloat16(), embedding, prompts16)
    assert fast16[0].dtype == torch.bfloat16
    iou, ref_iou = mask_iou(fast16[0], want[0]).mean(), mask_iou(ref16[0], want[0]).mean()
    assert iou >= min(0.98, ref_iou - 0.01), (iou, ref_iou)
    error, ref_error = ((out[1].float() - want[1]).abs().max() for out in (fast16, ref16))
    assert error <= 2 * ref_error + 0.05, (error, ref_error)


# --------------------------------------------------------------------------- image encoder paths


def _rel_pos_attention(dim: int, heads: int, size: tuple[int, int], std: float = 1.0) -> Attention:
    torch.manual_seed(0)
    attn = Attention(dim, heads, use_rel_pos=True, input_size=size)
    nn.init.normal_(attn.rel_pos_h, std=std)
    nn.init.normal_(attn.rel_pos_w, std=std)
    return attn


def test_global_attention_chunking_matches_unchunked(monkeypatch):
    """The autograd path (whole bias per group of heads) in groups of one head equals one group and
    the reference."""
    ref = _rel_pos_attention(32, 4, (8, 8))
    attn = fast.accelerate(copy.deepcopy(ref))
    assert type(attn) is fe.FastAttention
    x = torch.randn(2, 8, 8, 32)
    full = attn(x)
    assert full.requires_grad
    monkeypatch.setattr(fe, "_BIAS_CHUNK_ELEMENTS", 64 * 64)  # one head at a time
    torch.testing.assert_close(attn(x), full)
    torch.testing.assert_close(full, ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "block", [10**9, 5 * 60, 3 * 2 * 60, 60]
)  # whole; part of a head; 2-row blocks; 1 row
def test_inference_bias_blocks_match_the_whole_bias(monkeypatch, dtype, block):
    """CPU inference builds the relative-position bias in (heads x query rows) blocks (fp32; bf16 folds
    it into the scores in blocks): every block size, remainders included, gives the whole bias's
    result up to the kernel's rounding, and the autograd path and the reference agree."""
    ref = _rel_pos_attention(32, 4, (6, 10)).to(dtype)
    attn = fast.accelerate(copy.deepcopy(ref))
    x = torch.randn(3, 6, 10, 32, dtype=dtype)
    with torch.inference_mode():
        monkeypatch.setattr(fe, "_BIAS_BLOCK_ELEMENTS", 10**12)
        whole = attn(x)
        monkeypatch.setattr(fe, "_BIAS_BLOCK_ELEMENTS", block)
        blocked = attn(x)
        expected = ref(x)
    tight = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(blocked, whole, atol=tight, rtol=tight)
    trained = attn(x)  # parameters require grad: the autograd path
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(trained.detach(), whole, atol=tol, rtol=tol)
    if dtype == torch.float32:
        torch.testing.assert_close(blocked, expected, atol=1e-5, rtol=1e-5)
    else:  # the folded scores are rounded to bf16 once (see FastAttention._attend_folded)
        assert ((blocked.float() - expected.float()).norm() / expected.float().norm()) < 2e-2


@pytest.mark.parametrize("block", [10**9, 2 * 60 * 60, 7 * 60])  # all heads; 2 heads; 7-row blocks
@pytest.mark.parametrize("windowed", [False, True])
def test_bf16_cpu_inference_folds_the_bias_into_the_scores(monkeypatch, block, windowed):
    """CPU bf16 inference widens queries by their bias terms and keys by one-hot row/column codes, so
    one matmul gives the biased scores: the result matches the fp32 reference attention of the same
    inputs to bf16 accuracy, for every block size and for padded windows (6x10 tokens in 4x4 windows)."""
    ref = _rel_pos_attention(32, 4, (4, 4) if windowed else (6, 10), std=0.5)
    x = torch.randn(3, 6, 10, 32).bfloat16().float()

    def reference_attention(module: Attention, tokens: torch.Tensor) -> torch.Tensor:
        if not windowed:
            return module(tokens)
        windows, padded = window_partition(tokens, 4)
        return window_unpartition(module(windows), 4, padded, (6, 10))

    with torch.inference_mode():
        expected = reference_attention(ref, x)
        monkeypatch.setattr(fe, "_BIAS_BLOCK_ELEMENTS", block)
        calls = []
        folded = fe.FastAttention._attend_folded
        monkeypatch.setattr(fe.FastAttention, "_attend_folded", lambda *a: calls.append(1) or folded(*a))
        low = fast.accelerate(copy.deepcopy(ref).to(torch.bfloat16))
        got = (low.forward_windowed(x.bfloat16(), 4) if windowed else low(x.bfloat16())).float()
    assert calls, "the bf16 CPU path did not fold the bias"
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)


# --------------------------------------------------------------------------- kernels (samkit.fast.ops)


@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_matches_pytorch(activation, dtype):
    from samkit.fast.ops import linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80).to(dtype)
    x = torch.randn(2, 5, 7, 48, dtype=dtype)  # 70 rows: the fused oneDNN call in fp32 too
    act = {"none": lambda t: t, "gelu": F.gelu, "relu": F.relu}[activation]
    expected = act(F.linear(x, layer.weight, layer.bias))
    with torch.no_grad():
        fused = linear(x, layer, activation)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert fused.shape == expected.shape
    torch.testing.assert_close(fused, expected.detach(), atol=tol, rtol=tol)
    # With autograd the plain composition runs, and gradients reach the layer.
    linear(x, layer, activation).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_subnormal_attention_weights_are_flushed_without_changing_the_result():
    """The decoder zeroes subnormal softmax weights (x86 multiplies them tens of times slower): normal
    weights keep their bits, and the attention output is the same."""
    from samkit.fast.ops import flush_subnormal_probs

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


# --------------------------------------------------------------------------- decoder paths


def test_cpu_prompt_chunk_keeps_a_chunk_of_image_tokens_within_16_mib():
    """vit_b's 64x64x256 tokens are 4 prompts in fp32, 8 in bf16, more for small grids, at least 1;
    accelerate() sets the decoder's own chunk (16 with a tuned allocator, which also turns the reused
    buffers off)."""
    tokens = 64 * 64 * 256
    assert [fd.cpu_prompt_chunk(tokens * size) for size in (4, 2)] == [4, 8]
    assert fd.cpu_prompt_chunk(16 * 16 * 256 * 4) == 64 and fd.cpu_prompt_chunk(128 * 128 * 256 * 4) == 1
    assert fd.cpu_prompt_chunk(tokens * 4, chunk_bytes=8 << 20) == 2
    two_way = transformer.TwoWayTransformer(depth=1, embedding_dim=32, num_heads=2, mlp_dim=16)
    decoder = fast.accelerate(mask_decoder.MaskDecoder(transformer_dim=32, transformer=two_way))
    assert decoder.prompt_chunk is None and decoder.transformer.reuse_buffers
    fast.accelerate(decoder, prompt_chunk=3)
    assert decoder.prompt_chunk == 3 and decoder.transformer.reuse_buffers
    fast.accelerate(decoder, tuned_allocator=True)
    assert decoder.prompt_chunk == 16 and not decoder.transformer.reuse_buffers


@pytest.mark.parametrize("mask_inputs", [False, True])
def test_cpu_inference_decodes_prompts_in_chunks_with_the_same_result(reference, embedding, mask_inputs):
    """CPU inference splits a big prompt batch into chunks (memory reuse; the shared image's work done
    once for all chunks): same masks and IoU as one batch, as one prompt at a time and as the
    reference, and the caller's tensors untouched (the decoder overwrites only its own intermediates)."""
    model = accelerated(reference)
    decoder = model.mask_decoder
    torch.manual_seed(0)
    boxes = random_boxes(11)
    masks = torch.randn(11, 1, 4 * GRID, 4 * GRID) if mask_inputs else None
    pe = model.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(None, boxes, masks)
        inputs = [t.clone() for t in (embedding, pe, sparse, dense)]
        decoder.prompt_chunk = 4  # 4 + 4 + 3
        chunked = decoder(embedding, pe, sparse, dense, True)
        decoder.prompt_chunk = 1000
        whole = decoder(embedding, pe, sparse, dense, True)
        single = [
            decoder(embedding, pe, sparse[i : i + 1], dense[i : i + 1] if mask_inputs else dense, True)
            for i in range(len(boxes))
        ]
        for before, after in zip(inputs, (embedding, pe, sparse, dense)):
            assert torch.equal(before, after)
        expected = reference.mask_decoder(embedding, pe, sparse, dense, True)
    for a, b, c, d in zip(chunked, whole, zip(*single), expected):
        assert a.shape == b.shape == d.shape
        # Other batch shapes may take other GEMM kernels (another summation order): ~1e-4 on logits.
        torch.testing.assert_close(a, b, atol=5e-4, rtol=1e-4)
        torch.testing.assert_close(a, torch.cat(c), atol=5e-4, rtol=1e-4)
        torch.testing.assert_close(a, d, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("points, mask_inputs", [(1, False), (12, False), (2, True)])
def test_cpu_chunks_of_one_prompt_each_get_their_own_result(reference, embedding, points, mask_inputs):
    """Chunks of a single prompt (a large frame makes cpu_prompt_chunk 1): a chunk's inputs then have
    batch 1 like a shared image, yet the image tokens after the first layer, and with mask prompts the
    image tokens from the start, are that prompt's own. Every prompt's masks and IoU equal a call with
    that prompt alone. 12 points: 17 tokens, the unfolded attention with its key/value projections."""
    model = accelerated(reference, prompt_chunk=1)
    coords, labels = random_points(3, points)
    masks_in = torch.randn(3, 1, 4 * GRID, 4 * GRID) * 5 if mask_inputs else None
    pe = model.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder((coords, labels), None, masks_in)
        masks, iou = model.mask_decoder(embedding, pe, sparse, dense, True)
        for i in range(3):
            alone = model.mask_decoder(embedding, pe, sparse[i : i + 1], dense[i : i + 1], True)
            assert torch.equal(masks[i : i + 1], alone[0]) and torch.equal(iou[i : i + 1], alone[1])
        expected = reference.mask_decoder(embedding, pe, sparse, dense, True)
    torch.testing.assert_close(masks, expected[0], atol=5e-4, rtol=1e-4)
    torch.testing.assert_close(iou, expected[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_chunks_write_image_tokens_to_two_reused_buffers_with_the_same_values(
    reference, embedding, monkeypatch, dtype
):
    """CPU inference in chunks writes the per-prompt image tokens (PE sums, residual sums, layer
    norms in place) to at most two buffers reused by every chunk: bit for bit the result of fresh
    tensors everywhere, with the last, smaller chunk in views of the buffers; reuse_buffers=False
    (a tuned allocator) takes none; fp32 gives the reference's masks."""
    model = accelerated(reference, dtype, prompt_chunk=4)  # 4 + 4 + 3
    assert model.mask_decoder.transformer.reuse_buffers
    points, labels = random_points(11, 1)
    pe = model.prompt_encoder.get_dense_pe()
    made = []
    real_buffer = ft._Workspace.buffer

    def counted(self, like, batch, *live):
        out = real_buffer(self, like, batch, *live)
        made.append(out.untyped_storage().data_ptr())
        return out

    image = embedding.to(dtype)
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder((points, labels), None, None)
        monkeypatch.setattr(ft._Workspace, "buffer", counted)
        reused = model.mask_decoder(image, pe, sparse, dense, True)
        # fp32: the first residual sum and the PE sums (9 results, 2 buffers); bf16 takes the PE apart
        # (the first residual sum only, 1 buffer).
        assert (len(made), len(set(made))) == ((9, 2) if dtype == torch.float32 else (3, 1))
        made.clear()
        fast.accelerate(model, prompt_chunk=4, tuned_allocator=True)
        unbuffered = model.mask_decoder(image, pe, sparse, dense, True)
        assert made == []
        monkeypatch.setattr(
            ft._Workspace, "buffer", lambda self, like, batch, *live: like.new_empty(batch, *like.shape[1:])
        )
        monkeypatch.setattr(ft, "_norm", lambda x, norm, work: norm(x))
        fast.accelerate(model, prompt_chunk=4)
        fresh = model.mask_decoder(image, pe, sparse, dense, True)
    for a, b, c in zip(reused, fresh, unbuffered):
        assert torch.equal(a, b) and torch.equal(a, c)
    if dtype == torch.float32:
        expected = decode(reference, embedding, ((points, labels), None, None))
        torch.testing.assert_close(reused[0], expected[0], atol=5e-4, rtol=1e-4)
        torch.testing.assert_close(reused[1], expected[1], atol=1e-4, rtol=1e-4)


def test_cpu_inference_in_chunks_runs_under_bf16_autocast(reference, embedding):
    """fp32 weights under CPU bf16 autocast (evaluation with amp): chunked decoding (shared image work,
    residuals reused only where dtypes match, blocked upscaling) gives one batch's dtype and, to bf16
    rounding, its result: as close to the fp32 masks as the reference's under the same autocast.
    (bf16 GEMMs round by operand shape: here the reference's one prompt at a time and its batch of
    11 differ by 0.25 on logits up to ~20, chunks of 4 and one batch by ~0.6.)"""
    model = accelerated(reference)
    boxes = random_boxes(11)
    pe = model.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(None, boxes, None)
        fp32 = reference.mask_decoder(embedding, pe, sparse, dense, True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.mask_decoder.prompt_chunk = 4
            chunked = model.mask_decoder(embedding, pe, sparse, dense, True)
            model.mask_decoder.prompt_chunk = 1000
            whole = model.mask_decoder(embedding, pe, sparse, dense, True)
            expected = reference.mask_decoder(embedding, pe, sparse, dense, True)
    scale = fp32[0].abs().max()
    for a, b, c in zip(chunked, whole, expected):
        assert a.shape == b.shape == c.shape and a.dtype == b.dtype == c.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=0.05 * scale, rtol=0.05)
    torch.testing.assert_close(chunked[1].float(), fp32[1], atol=0.05, rtol=0.05)
    for got in (chunked, whole):
        assert mask_iou(got[0], fp32[0]).mean() >= mask_iou(expected[0], fp32[0]).mean() - 0.01


@pytest.mark.parametrize("multimask", [True, False])
def test_decoding_only_masks_above_an_iou_keeps_exactly_those_masks(reference, embedding, multimask):
    """forward_above_iou (automatic mask generation) returns exactly the masks of forward whose IoU is
    above the threshold, in forward's flat order, across prompt chunks, and nothing for a threshold
    no mask reaches; decode_above_iou gives the same with the reference decoder."""
    model = accelerated(reference, prompt_chunk=4)
    points, labels = random_points(11, 1)
    pe = model.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder((points, labels), None, None)
        masks, iou = model.mask_decoder(embedding, pe, sparse, dense, multimask)
        # About half kept (some prompts lose every mask), at the widest gap between the middle IoUs:
        # the reference decoder's IoU (within float rounding) falls on the same side.
        ranked = iou.flatten().sort().values
        middle = range(len(ranked) // 4, 3 * len(ranked) // 4)
        k = max(middle, key=lambda i: ranked[i + 1] - ranked[i])
        threshold = float(ranked[k] + ranked[k + 1]) / 2
        kept, kept_iou, index = model.mask_decoder.forward_above_iou(
            embedding, pe, sparse, dense, multimask, threshold
        )
        none = model.mask_decoder.forward_above_iou(embedding, pe, sparse, dense, multimask, 1e9)
        ref_kept, ref_iou, ref_index = fd.decode_above_iou(
            reference.mask_decoder, embedding, pe, sparse, dense, multimask, threshold
        )
    expected = (iou.flatten() > threshold).nonzero().flatten()
    assert 0 < len(expected) < iou.numel()
    assert torch.equal(index, expected)
    assert torch.equal(kept_iou, iou.flatten()[expected])
    torch.testing.assert_close(kept, masks.flatten(0, 1)[expected], atol=1e-5, rtol=1e-5)
    assert [t.shape[0] for t in none] == [0, 0, 0] and none[0].shape[1:] == masks.shape[2:]
    assert torch.equal(ref_index, index)
    torch.testing.assert_close(ref_kept, kept, atol=5e-4, rtol=1e-4)
    torch.testing.assert_close(ref_iou, kept_iou, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grid", [16, 64, 80])
def test_cpu_mask_upscaling_in_blocks_equals_the_plain_computation(reference, grid):
    """The CPU inference path of the mask upscaling (blocks of prompts or of rows, mask-major product,
    reordered in two copies) gives the plain path's fp32 logits and the reference convolutions':
    several prompts per block (5 of 16x16 tokens), one prompt (2 of 64x64), rows of one prompt (2 of
    80x80). Same sums in another GEMM orientation: bit for bit with MKL on Intel Xeons, within float32
    rounding on AMD EPYC, where MKL's kernels change with the operands' shapes (max difference 6e-6 on
    logits up to 12)."""
    decoder = fast.accelerate(copy.deepcopy(reference.mask_decoder))
    torch.manual_seed(grid)
    b = 5 if grid == 16 else 2
    src = torch.randn(b, grid * grid, decoder.transformer_dim)
    hyper = torch.randn(b, 3, decoder.transformer_dim // 8)
    with torch.no_grad():
        blocked = decoder._masks_from_tokens(src, hyper, grid, grid)
        upscaled = reference.mask_decoder.output_upscaling(src.transpose(1, 2).reshape(b, -1, grid, grid))
        expected = (hyper @ upscaled.flatten(2)).view(b, 3, 4 * grid, 4 * grid)
    with torch.enable_grad():  # the path training takes: the whole batch at once, as Meta's layout
        plain = decoder._masks_from_tokens(src, hyper, grid, grid).detach()
    assert blocked.shape == plain.shape == (b, 3, 4 * grid, 4 * grid)
    torch.testing.assert_close(blocked, plain, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(blocked, expected, rtol=1e-4, atol=1e-4)


def test_bf16_decoder_takes_the_pe_apart_with_the_same_masks(reference, embedding, monkeypatch):
    """16-bit CPU inference on per-prompt image tokens attends to keys + PE without forming the sum
    (the PE's part as GEMMs): the masks are those of the summed keys, up to bf16 rounding."""
    model = accelerated(reference, torch.bfloat16)
    boxes = random_boxes(6).bfloat16()
    calls = []
    real = ft.pe_apart
    monkeypatch.setattr(ft, "pe_apart", lambda *a: calls.append(real(*a)) or calls[-1])
    apart, apart_iou = decode(model, embedding, (None, boxes, None))
    assert any(calls)
    monkeypatch.setattr(ft, "pe_apart", lambda *a: False)
    summed, summed_iou = decode(model, embedding, (None, boxes, None))
    torch.testing.assert_close(apart_iou.float(), summed_iou.float(), atol=0.05, rtol=0.05)
    iou = mask_iou(apart, summed)
    assert iou.min() > 0.95, iou
    expected = decode(copy.deepcopy(reference).bfloat16(), embedding, (None, boxes, None))
    assert mask_iou(apart, expected[0]).mean() > 0.97
    assert not real(torch.zeros(2, 4, 8), torch.zeros(1, 4, 8))  # fp32: the sum pays there


# --------------------------------------------------------------------------- the allocator


def test_no_samkit_module_reads_allocator_tuned_and_the_commands_leave_the_allocator_alone(
    monkeypatch, capsys, tmp_path
):
    """Only samkit/fast/allocator.py mentions allocator_tuned, nothing calls tune_cpu_allocator but
    its own definition, and a command (through main(), guarded()) never reaches glibc's mallopt."""
    from samkit.commands.main import main
    from samkit.fast import allocator

    sources = {path: path.read_text(encoding="utf-8") for path in SAMKIT.rglob("*.py")}
    mentions = sorted(str(p.relative_to(SAMKIT)) for p, text in sources.items() if "allocator_tuned" in text)
    assert mentions == ["fast/allocator.py"]
    calls = [
        f"{p.relative_to(SAMKIT)}: {line.strip()}"
        for p, text in sources.items()
        for line in text.splitlines()
        if re.search(r"\btune_cpu_allocator\(", line) and not line.lstrip().startswith("def ")
    ]
    assert calls == []

    opened: list[str] = []

    class FakeCtypes:
        @staticmethod
        def CDLL(name: str):
            opened.append(name)
            raise OSError("the test stands in for libc")

    monkeypatch.setattr(allocator, "ctypes", FakeCtypes)
    monkeypatch.setattr(allocator, "_tuned", False)
    monkeypatch.delenv("SAMKIT_TUNE_MALLOC", raising=False)
    assert main(["predict", "--help"]) == 0
    assert main(["predict", "--input", str(tmp_path / "missing.png"), "--output-dir", str(tmp_path)]) == 2
    capsys.readouterr()
    assert opened == []
    if allocator.sys.platform.startswith("linux") and allocator.platform.libc_ver()[0] == "glibc":
        assert allocator.tune_cpu_allocator() is False and opened == ["libc.so.6"]  # the fake is reached


# --------------------------------------------------------------------------- LoRA adapters (peft)

LORA_TARGETS = r".*(\.attn\.(qkv|proj)|_proj|\.lin1|\.lin2)$"


def lora(model: nn.Module) -> nn.Module:
    """``model`` with peft LoRA adapters (rank 4, random non-zero B) on the decoder's attention
    projections and MLPs and the encoder's qkv / proj / MLPs."""
    import peft  # the dev extra's; imported here, as it takes seconds (it imports transformers)

    torch.manual_seed(4)
    config = peft.LoraConfig(target_modules=LORA_TARGETS, r=4, lora_alpha=8, init_lora_weights=False)
    return peft.inject_adapter_in_model(config, model).eval()


def test_lora_adapters_run_in_the_accelerated_model(reference, embedding):
    """peft's LoRA layers wrap nn.Linear: the fast modules see layers that are not plain and call them,
    so an adapted model gives the reference adapted model's outputs (image encoder; decoder with 1 and
    with 8 prompts in chunks), and the adapters change them. Adapting after accelerate() works too."""
    adapted = lora(copy.deepcopy(reference))
    from peft.tuners.lora import LoraLayer

    wrapped = [name for name, m in adapted.named_modules() if isinstance(m, LoraLayer)]
    assert "image_encoder.blocks.0.attn.qkv" in wrapped and "image_encoder.patch_embed.proj" not in wrapped
    assert "mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj" in wrapped
    assert len(wrapped) == 2 * 4 + 2 * (4 * 3 + 2) + 4  # encoder blocks, decoder layers, final attention
    fast_adapted = fast.accelerate(copy.deepcopy(adapted), prompt_chunk=3)
    adapted_late = lora(accelerated(reference, prompt_chunk=3))  # same seed: the same adapter weights
    assert fast.is_accelerated(fast_adapted) and fast.is_accelerated(adapted_late)

    torch.manual_seed(5)
    image = torch.rand(1, 3, FRAME, FRAME) * 4 - 2
    with torch.inference_mode():
        base = reference.image_encoder(image)
        want = adapted.image_encoder(image)
        assert not torch.allclose(want, base, atol=1e-2)
        for model in (fast_adapted, adapted_late):
            torch.testing.assert_close(model.image_encoder(image), want, atol=1e-4, rtol=1e-4)
    for prompts in ((random_points(1, 1), None, None), (None, random_boxes(8), None)):
        base = decode(reference, embedding, prompts)
        want = decode(adapted, embedding, prompts)
        assert not torch.allclose(want[0], base[0], atol=1e-2)
        for model in (fast_adapted, adapted_late):
            got = decode(model, embedding, prompts)
            torch.testing.assert_close(got[0], want[0], atol=5e-4, rtol=1e-4)
            torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- known faults (samkit bugs)


def test_hooks_on_windowed_encoder_attention_run_after_accelerate(reference):
    model = accelerated(reference)
    calls = []
    model.image_encoder.blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        model.image_encoder(torch.zeros(1, 3, FRAME, FRAME))
    assert calls


def test_hooks_on_plain_layers_run_in_the_accelerated_model(reference, embedding):
    model = accelerated(reference)
    calls = []
    model.image_encoder.blocks[0].mlp.lin1.register_forward_hook(lambda *_: calls.append("lin1"))
    model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.q_proj.register_forward_hook(
        lambda *_: calls.append("q_proj")
    )
    with torch.inference_mode():
        model.image_encoder(torch.zeros(1, 3, FRAME, FRAME))
    decode(model, embedding, (None, random_boxes(2), None))
    assert sorted(set(calls)) == ["lin1", "q_proj"]


def test_a_hook_handle_removes_its_hook_after_accelerate(reference, embedding):
    model = copy.deepcopy(reference)
    calls = []
    handle = model.mask_decoder.register_forward_hook(lambda *_: calls.append(1))
    fast.accelerate(model)
    handle.remove()
    decode(model, embedding, (None, random_boxes(2), None))
    assert calls == []
