"""Parity with Meta's segment-anything 1.0 on shared random weights (the oracle)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor as MetaPredictor

from samkit import SamPredictor

from .conftest import model_pair, perturbed_state


def rel_diff(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / a.norm())


def prompt_cases(h: int, w: int) -> dict[str, dict]:
    return {
        "point": dict(point_coords=np.array([[0.4 * w, 0.3 * h]]), point_labels=np.array([1])),
        "two_points": dict(
            point_coords=np.array([[0.4 * w, 0.3 * h], [0.7 * w, 0.8 * h]]), point_labels=np.array([1, 0])
        ),
        "box": dict(box=np.array([0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h])),
        "point_box": dict(
            point_coords=np.array([[0.3 * w, 0.5 * h]]),
            point_labels=np.array([0]),
            box=np.array([0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h]),
        ),
    }


def assert_same_prediction(a, b) -> None:
    masks_a, iou_a, low_a = a
    masks_b, iou_b, low_b = b
    assert masks_b.shape == masks_a.shape and masks_b.dtype == masks_a.dtype
    assert iou_b.dtype == np.float32 and low_b.dtype == np.float32
    assert (masks_a == masks_b).mean() >= 0.999
    np.testing.assert_allclose(iou_b, iou_a, atol=1e-3)
    assert rel_diff(low_a, low_b) < 1e-4


@pytest.fixture(scope="module")
def vit_b_predictors(photo):
    ours, meta = model_pair("vit_b", seed=11, scale=0.02)
    p_ours, p_meta = SamPredictor(ours), MetaPredictor(meta)
    p_ours.set_image(photo)
    p_meta.set_image(photo)
    return p_ours, p_meta


def test_state_dict_names_and_shapes_match_meta():
    ours, meta = model_pair("vit_b", seed=0)
    a, b = ours.state_dict(), meta.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


def test_vit_b_embedding(vit_b_predictors):
    ours, meta = vit_b_predictors
    assert ours.features.shape == (1, 256, 64, 64)
    assert rel_diff(meta.features, ours.features) < 1e-4


@pytest.mark.parametrize("case", ["point", "two_points", "box", "point_box"])
@pytest.mark.parametrize("multimask", [True, False])
def test_vit_b_prompts(vit_b_predictors, photo, case, multimask):
    ours, meta = vit_b_predictors
    kwargs = prompt_cases(*photo.shape[:2])[case]
    assert_same_prediction(
        meta.predict(**kwargs, multimask_output=multimask), ours.predict(**kwargs, multimask_output=multimask)
    )
    logits_a = meta.predict(**kwargs, multimask_output=multimask, return_logits=True)[0]
    logits_b = ours.predict(**kwargs, multimask_output=multimask, return_logits=True)[0]
    assert logits_b.dtype == np.float32
    assert rel_diff(logits_a, logits_b) < 1e-4


def test_vit_b_mask_input_refinement(vit_b_predictors, photo):
    ours, meta = vit_b_predictors
    kwargs = prompt_cases(*photo.shape[:2])["point"]
    _, scores, low = meta.predict(**kwargs)
    mask_input = low[np.argmax(scores)][None]
    follow = dict(
        point_coords=np.array([[200, 150], [300, 400]]), point_labels=np.array([1, 0]), mask_input=mask_input
    )
    assert_same_prediction(
        meta.predict(**follow, multimask_output=False), ours.predict(**follow, multimask_output=False)
    )


def test_vit_b_many_boxes_predict_torch(vit_b_predictors, photo):
    ours, meta = vit_b_predictors
    h, w = photo.shape[:2]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [w, h], size=(16, 2, 2))
    boxes = np.concatenate([xy.min(1), xy.max(1) + 5], axis=1)
    out = []
    for p in (meta, ours):
        tb = p.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), (h, w))
        out.append([t.numpy() for t in p.predict_torch(None, None, boxes=tb, multimask_output=False)])
    assert out[1][0].shape == (16, 1, h, w)
    assert_same_prediction(out[0], out[1])
    # predict_batch gives the same, from original-pixel boxes.
    masks, iou, low = ours.predict_batch([{"boxes": boxes}], multimask_output=False)[0]
    assert (masks == out[1][0]).all() and np.allclose(iou, out[1][1]) and np.allclose(low, out[1][2])


@pytest.mark.parametrize("seed", [5, 6])
def test_tiny_model_on_other_images(seed):
    """Parity on several images and sizes (portrait, landscape, tiny) with other random weights."""
    from skimage import data

    ours, meta = model_pair("vit_tiny", seed=seed)
    p_ours, p_meta = SamPredictor(ours), MetaPredictor(meta)
    images = [data.coffee(), data.chelsea()[:, :200], np.full((1, 1, 3), 200, np.uint8)]
    for image in images:
        p_ours.set_image(image)
        p_meta.set_image(image)
        assert rel_diff(p_meta.features, p_ours.features) < 1e-4
        for kwargs in prompt_cases(*image.shape[:2]).values():
            assert_same_prediction(p_meta.predict(**kwargs), p_ours.predict(**kwargs))


def test_sam_forward_and_forward_train_match_meta(tiny_pair, photo):
    ours, meta = tiny_pair
    p = SamPredictor(ours)
    x = torch.from_numpy(np.array(p.transform.apply_image(photo))).permute(2, 0, 1).float()
    boxes = p.transform.apply_boxes_torch(
        torch.tensor([[10.0, 20, 300, 400], [100, 100, 200, 250]]), photo.shape[:2]
    )
    batch = [{"image": x, "original_size": photo.shape[:2], "boxes": boxes}]
    ref = meta(batch, multimask_output=True)[0]
    inference = ours(batch, multimask_output=True)[0]  # no autograd, as Meta's
    assert rel_diff(ref["low_res_logits"], inference["low_res_logits"]) < 1e-4
    assert not inference["low_res_logits"].requires_grad
    got = ours.forward_train(batch, multimask_output=True)[0]
    assert got["low_res_logits"].requires_grad
    assert (ref["masks"] == got["masks"]).float().mean() >= 0.999
    assert rel_diff(ref["low_res_logits"], got["low_res_logits"].detach()) < 1e-4
    (got["low_res_logits"].sum() + got["iou_predictions"].sum()).backward()
    # Boxes only and multimask: the point embeddings, the mask branch and mask token 0 are unused.
    unused = (
        "prompt_encoder.point_embeddings.0.",
        "prompt_encoder.point_embeddings.1.",
        "prompt_encoder.not_a_point_embed.",
        "prompt_encoder.mask_downscaling.",
        "mask_decoder.output_hypernetworks_mlps.0.",
    )
    no_grad = [n for n, p in ours.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad and all(n.startswith(unused) for n in no_grad), no_grad
    ours.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------
# Modules built with Meta's constructor arguments, including non-default ones, compute what Meta's do.


def module_pair(meta_cls, ours_cls, seed: int, *args, **kwargs):
    """(samkit module, Meta module) built with the same arguments and holding the same random weights."""
    torch.manual_seed(seed)
    meta = meta_cls(*args, **kwargs).eval()
    ours = ours_cls(*args, **kwargs).eval()
    state = perturbed_state(meta.state_dict(), seed)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in state.items()}
    meta.load_state_dict(state)
    ours.load_state_dict(state)
    return ours, meta


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, out_chans=16),  # Meta's defaults
        dict(
            img_size=80,
            patch_size=8,
            in_chans=1,
            embed_dim=32,
            depth=3,
            num_heads=4,
            mlp_ratio=2.0,
            out_chans=16,
            qkv_bias=False,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            act_layer=torch.nn.ReLU,
            use_abs_pos=False,
            use_rel_pos=True,
            window_size=3,  # 10x10 tokens: padded windows
            global_attn_indexes=(1,),
        ),
    ],
    ids=["defaults", "every-argument"],
)
def test_image_encoder_with_meta_arguments(kwargs):
    from segment_anything.modeling import ImageEncoderViT as MetaEncoder

    from samkit.modeling import ImageEncoderViT

    ours, meta = module_pair(MetaEncoder, ImageEncoderViT, 0, **kwargs)
    x = torch.randn(2, kwargs.get("in_chans", 3), kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        assert rel_diff(meta(x), ours(x)) < 1e-5
    # rel_pos_zero_init=False draws the tables (Meta's ignores the flag and leaves them at zero).
    drawn = ImageEncoderViT(**{**kwargs, "use_rel_pos": True, "rel_pos_zero_init": False})
    assert all(blk.attn.rel_pos_h.abs().sum() > 0 for blk in drawn.blocks)


def test_decoder_modules_with_meta_arguments():
    from segment_anything.modeling import MaskDecoder as MetaDecoder
    from segment_anything.modeling import PromptEncoder as MetaPromptEncoder
    from segment_anything.modeling import TwoWayTransformer as MetaTransformer
    from segment_anything.modeling.mask_decoder import MLP as MetaMLP

    from samkit.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
    from samkit.modeling.mask_decoder import MLP

    ours, meta = module_pair(MetaMLP, MLP, 0, 8, 16, 4, 3, sigmoid_output=True)
    x = torch.randn(5, 8)
    torch.testing.assert_close(ours(x), meta(x))

    args = dict(depth=1, embedding_dim=32, num_heads=2, mlp_dim=48)
    kinds = dict(activation=torch.nn.GELU, attention_downsample_rate=1)
    ours_t, meta_t = module_pair(MetaTransformer, TwoWayTransformer, 1, **args, **kinds)
    image, pe, tokens = torch.randn(1, 32, 6, 6), torch.randn(1, 32, 6, 6), torch.randn(1, 5, 32)
    with torch.no_grad():
        for a, b in zip(ours_t(image, pe, tokens), meta_t(image, pe, tokens)):
            assert rel_diff(b, a) < 1e-5

    ours_d, meta_d = module_pair(
        lambda **kw: MetaDecoder(transformer=MetaTransformer(**args, **kinds), **kw),
        lambda **kw: MaskDecoder(transformer=TwoWayTransformer(**args, **kinds), **kw),
        2,
        transformer_dim=32,
        num_multimask_outputs=2,
        activation=torch.nn.ReLU,
        iou_head_depth=2,
        iou_head_hidden_dim=24,
    )
    sparse, dense = torch.randn(3, 4, 32), torch.randn(3, 32, 6, 6)
    with torch.no_grad():
        for multimask in (True, False):
            got, ref = (
                ours_d(image, pe, sparse, dense, multimask),
                meta_d(image, pe, sparse, dense, multimask),
            )
            assert got[0].shape == ref[0].shape and rel_diff(ref[0], got[0]) < 1e-5
            torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)

    # Meta's PromptEncoder takes its arguments by position too.
    ours_p, meta_p = module_pair(MetaPromptEncoder, PromptEncoder, 3, 32, (6, 6), (24, 24), 8, torch.nn.ReLU)
    boxes, masks = torch.tensor([[1.0, 2, 20, 17]]), torch.randn(1, 1, 24, 24)
    with torch.no_grad():
        for a, b in zip(ours_p(None, boxes, masks), meta_p(None, boxes, masks)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared_image", [False, True], ids=["image-per-prompt", "shared-image"])
def test_transformer_gradients_match_meta(shared_image):
    """Training's attention (folded projections, key-major softmax) differentiates like Meta's plain one:
    same outputs, same gradients for every weight and for the image and prompt tokens."""
    from segment_anything.modeling import TwoWayTransformer as MetaTransformer

    from samkit.modeling import TwoWayTransformer

    args = dict(depth=2, embedding_dim=32, num_heads=2, mlp_dim=48, attention_downsample_rate=2)
    ours, meta = module_pair(MetaTransformer, TwoWayTransformer, 4, **args)
    g = torch.Generator().manual_seed(5)
    image = torch.randn(1 if shared_image else 3, 32, 6, 7, generator=g)
    pe, tokens = torch.randn(1, 32, 6, 7, generator=g), torch.randn(3, 5, 32, generator=g)
    weights = [torch.randn(3, 5, 32, generator=g), torch.randn(3, 42, 32, generator=g)]
    grads = []
    for model in (ours, meta):
        model.zero_grad(set_to_none=True)
        inputs = [t.clone().requires_grad_() for t in (image, tokens)]
        # Meta's transformer takes one image per prompt.
        img = inputs[0] if not shared_image or model is ours else inputs[0].expand(3, -1, -1, -1)
        outs = model(img, pe, inputs[1])
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        grads.append(([o.detach() for o in outs], [t.grad for t in inputs], dict(model.named_parameters())))
    (out_a, in_a, par_a), (out_b, in_b, par_b) = grads
    for a, b in zip(out_a + in_a, out_b + in_b):
        assert a.shape == b.shape and rel_diff(b, a) < 1e-5
    # Some gradients are zero but for rounding (a key bias shifts every score of a softmax alike):
    # errors are measured against the largest gradient.
    scale = max(p.grad.abs().max() for p in par_b.values())
    for name, p in par_b.items():
        assert (p.grad - par_a[name].grad).abs().max() <= 1e-5 * scale, name


def test_image_encoder_helpers_match_meta():
    from segment_anything.modeling import image_encoder as meta_enc

    from samkit.modeling import image_encoder as enc

    torch.manual_seed(0)
    x = torch.randn(2, 10, 7, 6)
    for window in (3, 5, 7):
        ours, meta = enc.window_partition(x, window), meta_enc.window_partition(x, window)
        assert torch.equal(ours[0], meta[0]) and ours[1] == meta[1]
        back = enc.window_unpartition(ours[0], window, ours[1], (10, 7))
        assert torch.equal(back, meta_enc.window_unpartition(meta[0], window, meta[1], (10, 7)))
        assert torch.equal(back, x)
    for q, k, length in ((7, 7, 13), (5, 5, 13), (4, 8, 15)):
        table = torch.randn(length, 6)
        torch.testing.assert_close(enc.get_rel_pos(q, k, table), meta_enc.get_rel_pos(q, k, table))
    q, rel_h, rel_w = torch.randn(3, 4 * 5, 6), torch.randn(7, 6), torch.randn(9, 6)
    attn = torch.randn(3, 20, 20)
    torch.testing.assert_close(
        enc.add_decomposed_rel_pos(attn, q, rel_h, rel_w, (4, 5), (4, 5)),
        meta_enc.add_decomposed_rel_pos(attn, q, rel_h, rel_w, (4, 5), (4, 5)),
    )
    patches = dict(kernel_size=(4, 4), stride=(2, 2), padding=(1, 1), in_chans=2, embed_dim=8)
    ours, meta = module_pair(meta_enc.PatchEmbed, enc.PatchEmbed, 0, **patches)
    image = torch.randn(1, 2, 9, 11)
    torch.testing.assert_close(ours(image), meta(image))
