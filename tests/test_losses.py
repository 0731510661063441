"""Fine-tuning losses and mIoU metrics: hand-computed values, torchvision's focal loss, the hand-written
backward of sam_loss against autograd, padding prompts, num_valid, low precision, and a two-rank
all-reduce of the metric."""

from __future__ import annotations

import json
import math
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

from samkit.training import losses
from samkit.training.losses import _MaskTerms, dice_loss, focal_loss, iou_mse_loss, prompt_loss, sam_loss
from samkit.training.metrics import MiouAccumulator, mask_dice, mask_iou

LN2 = math.log(2)


def _batch(seed: int = 0, b: int = 2, k: int = 3, h: int = 12, w: int = 10, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, k, h, w, generator=g, dtype=dtype)).requires_grad_()
    targets = torch.rand(b, k, h, w, generator=g) > 0.6
    iou_pred = torch.rand(b, k, generator=g, dtype=dtype).requires_grad_()
    valid = torch.tensor([[True, True, False], [True, False, False]])[:b, :k]
    return logits, iou_pred, targets, valid


def _reference(logits, iou_pred, targets, valid, n=None, weights=(20.0, 1.0, 1.0)):
    """sam_loss written the obvious way with the per-mask functions and plain autograd."""
    t = targets.to(logits.dtype)
    terms = [focal_loss(logits, t), dice_loss(logits, t), iou_mse_loss(iou_pred, logits, t)]
    v = valid.to(logits.dtype)
    n = v.sum().clamp_min(1) if n is None else n
    means = [(term * v).sum() / n for term in terms]
    return sum(wt * m for wt, m in zip(weights, means)), means


# ------------------------------------------------------------------ per-mask terms, by hand


def test_focal_by_hand():
    # Logit 0: p = 0.5, -log p_t = ln 2, (1 - p_t)^2 = 1/4; alpha 0.25 on the positive, 0.75 on the negative.
    logits = torch.zeros(1, 2)
    assert focal_loss(logits, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(
        (0.25 + 0.75) * 0.25 * LN2 / 2
    )
    p = 1 / (1 + math.exp(-2))
    expected = 0.25 * (1 - p) ** 2 * -math.log(p)  # a confident right positive: tiny
    assert focal_loss(torch.full((1, 1), 2.0), torch.ones(1, 1)).item() == pytest.approx(expected)
    assert focal_loss(logits, torch.tensor([[1.0, 0.0]]), alpha=-1).item() == pytest.approx(0.25 * LN2)
    assert focal_loss(logits, torch.tensor([[1.0, 0.0]]), gamma=0).item() == pytest.approx(0.5 * LN2)


def test_focal_equals_torchvision_and_is_stable():
    from torchvision.ops import sigmoid_focal_loss

    g = torch.Generator().manual_seed(1)
    logits = 10 * torch.randn(4, 3, 16, 16, generator=g)
    logits[0, 0, :2] = torch.tensor([200.0, -200.0]).repeat_interleave(8)  # log(sigmoid) would overflow
    targets = (torch.rand(4, 3, 16, 16, generator=g) > 0.5).float()
    for alpha, gamma in [(0.25, 2.0), (0.5, 1.0), (-1, 0.0)]:
        ours = focal_loss(logits, targets, alpha, gamma)
        ref = sigmoid_focal_loss(logits, targets, alpha, gamma, reduction="none").mean(dim=(-2, -1))
        assert ours.shape == (4, 3) and torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref)


def test_dice_by_hand():
    # p = (0.5, 0.5), g = (1, 0): 1 - 2 * 0.5 / (0.5 + 1 + eps).
    assert dice_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(
        1 - 1 / (1.5 + 1e-5)
    )
    assert dice_loss(torch.full((3, 4), -50.0), torch.zeros(3, 4)).item() == pytest.approx(
        1.0
    )  # empty vs empty


def test_mask_iou_and_dice_by_hand():
    pred = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[1, 0, 1, 0]]], dtype=torch.bool)
    target = torch.tensor([[[0, 1, 1, 0]], [[0, 0, 0, 0]], [[1, 0, 1, 0]]], dtype=torch.uint8)
    torch.testing.assert_close(mask_iou(pred, target), torch.tensor([1 / 3, 0.0, 1.0]))  # both empty: 0
    torch.testing.assert_close(mask_dice(pred, target.float()), torch.tensor([0.5, 0.0, 1.0]))
    with pytest.raises(ValueError, match="differ in shape"):
        mask_iou(pred, target[:, :, :3])


@pytest.mark.parametrize("hw", [(8, 8), (256, 256), (300, 401)])
def test_mask_iou_of_large_masks_counts_exactly(hw):
    """Masks of 65536 pixels or more are counted through NumPy on the CPU: the same counts, with any
    leading shape, for non-contiguous views and non-bool masks."""
    g = torch.Generator().manual_seed(hw[0])
    pred = torch.rand(2, 3, *hw, generator=g) > 0.6
    target = (torch.rand(2, 3, *hw, generator=g) > 0.3).float()
    inter = (pred & (target > 0.5)).double().sum((-2, -1))
    union = pred.double().sum((-2, -1)) + (target > 0.5).double().sum((-2, -1)) - inter
    torch.testing.assert_close(mask_iou(pred, target), (inter / (union + 1e-7)).float())
    view = pred.transpose(-2, -1)
    flipped = target.transpose(-2, -1)
    torch.testing.assert_close(mask_iou(view, flipped), mask_iou(pred, target))
    torch.testing.assert_close(mask_iou(pred[0], target[0]), mask_iou(pred, target)[0])


def test_iou_mse_by_hand_and_without_gradient_to_logits():
    logits = torch.tensor([[[3.0, 1.0, -2.0, -1.0]]], requires_grad=True)  # inside: the first two pixels
    targets = torch.tensor([[[0, 1, 1, 0]]], dtype=torch.uint8)
    iou_pred = torch.tensor([0.5], requires_grad=True)
    loss = iou_mse_loss(iou_pred, logits, targets)
    assert loss.item() == pytest.approx((0.5 - 1 / 3) ** 2)
    loss.sum().backward()
    assert iou_pred.grad.item() == pytest.approx(2 * (0.5 - 1 / 3))
    assert logits.grad is None


def test_perfect_prediction_costs_almost_nothing():
    targets = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5
    logits = 30.0 * (2 * targets.float() - 1)
    assert focal_loss(logits, targets).max() < 1e-12
    assert dice_loss(logits, targets).max() < 1e-6
    out = sam_loss(logits, torch.ones(2, 3), targets, torch.ones(2, 3, dtype=torch.bool))
    assert out["loss"].item() < 1e-6 and out["iou"].item() == 0


# ------------------------------------------------------------------ sam_loss


def test_sam_loss_matches_the_per_mask_terms_and_their_gradients():
    logits, iou_pred, targets, valid = _batch()
    out = sam_loss(logits, iou_pred, targets, valid)
    assert set(out) == {"loss", "focal", "dice", "iou"}
    assert all(not out[k].requires_grad for k in ("focal", "dice", "iou")) and out["loss"].requires_grad
    ours = torch.autograd.grad(out["loss"], (logits, iou_pred))

    ref_loss, ref_terms = _reference(logits, iou_pred, targets, valid)
    ref = torch.autograd.grad(ref_loss, (logits, iou_pred))
    torch.testing.assert_close(out["loss"], ref_loss)
    for name, value in zip(("focal", "dice", "iou"), ref_terms):
        torch.testing.assert_close(out[name], value.detach())
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    assert ours[0][valid].abs().amax(dim=(-2, -1)).min() > 0 and ours[1][valid].abs().min() > 0


def test_sam_loss_weighting():
    logits, iou_pred, targets, valid = _batch(seed=3)
    out = sam_loss(logits, iou_pred, targets, valid)
    torch.testing.assert_close(out["loss"].detach(), 20 * out["focal"] + out["dice"] + out["iou"])
    other = sam_loss(logits, iou_pred, targets, valid, focal_weight=1.0, dice_weight=0.0, iou_weight=3.0)
    torch.testing.assert_close(other["loss"].detach(), out["focal"] + 3 * out["iou"])


@pytest.mark.parametrize("gamma", [2.0, 1.0, 0.5, 0.0])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_hand_written_backward_passes_gradcheck(alpha, gamma):
    g = torch.Generator().manual_seed(4)
    logits = (2 * torch.randn(5, 4, 3, generator=g, dtype=torch.float64)).requires_grad_()
    soft_targets = torch.rand(5, 4, 3, generator=g, dtype=torch.float64)  # soft targets too
    rows = torch.tensor([0, 2, 3])
    assert torch.autograd.gradcheck(
        lambda x: _MaskTerms.apply(x, soft_targets, rows, alpha, gamma, 1e-5)[:2], logits
    )


@pytest.mark.parametrize("tile", [2 * 12 * 10, 7, 12 * 10 - 1])  # two masks; odd ranges; one mask, cut
def test_tiles_give_the_same_loss_and_gradients(monkeypatch, tile):
    logits, iou_pred, targets, valid = _batch(seed=5, b=3, k=4)
    valid = torch.rand(3, 4, generator=torch.Generator().manual_seed(6)) > 0.3
    whole = sam_loss(logits, iou_pred, targets, valid)
    grads = torch.autograd.grad(whole["loss"], (logits, iou_pred))
    monkeypatch.setattr(losses, "_TILE_PIXELS", tile)
    tiled = sam_loss(logits, iou_pred, targets, valid)
    for name in ("loss", "focal", "dice", "iou"):
        torch.testing.assert_close(tiled[name], whole[name])
    for a, b in zip(torch.autograd.grad(tiled["loss"], (logits, iou_pred)), grads):
        torch.testing.assert_close(a, b)


def test_tiles_cover_every_pixel_of_the_chosen_masks_once():
    for rows in (
        torch.tensor([0, 1, 2, 3]),
        torch.tensor([1, 3, 4]),
        torch.tensor([2]),
        torch.tensor([], dtype=torch.long),
    ):
        for pixels, size in ((120, 7), (120, 240), (120, 120), (1 << 20, 1 << 18)):
            seen = torch.zeros(5, pixels, dtype=torch.int)
            out = torch.zeros(len(rows), dtype=torch.int)
            for r, sl, c in losses._tiles(rows, pixels, torch.device("cpu"), size):
                seen[r, c] += 1
                out[sl] += 1
            expect = torch.zeros(5, pixels, dtype=torch.int)
            expect[rows] = 1
            assert torch.equal(seen, expect)
            assert (out >= 1).all()


def test_padding_prompts_are_ignored_even_when_garbage():
    logits, iou_pred, targets, valid = _batch(seed=7)
    results = []
    for garbage in (0.0, float("nan"), 1e30):
        x, p = logits.detach().clone(), iou_pred.detach().clone()
        x[~valid], p[~valid] = garbage, garbage
        x.requires_grad_(), p.requires_grad_()
        out = sam_loss(x, p, targets, valid)
        out["loss"].backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(p.grad).all()
        assert (x.grad[~valid] == 0).all() and (p.grad[~valid] == 0).all()
        results.append((out["loss"].detach(), x.grad, p.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_no_valid_prompt_gives_zero_loss_that_still_backpropagates():
    logits, iou_pred, targets, _ = _batch(seed=8)
    out = sam_loss(logits, iou_pred, targets, torch.zeros(2, 3, dtype=torch.bool))
    assert out["loss"].item() == 0 and out["loss"].requires_grad
    out["loss"].backward()
    assert (logits.grad == 0).all() and (iou_pred.grad == 0).all()
    zero = sam_loss(logits, iou_pred, targets, torch.zeros(2, 3, dtype=torch.bool), num_valid=0.0)
    assert zero["loss"].item() == 0


def test_num_valid_scales_and_makes_data_parallel_equal_one_process():
    logits, iou_pred, targets, valid = _batch(seed=9, b=4, k=3)
    valid = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    own = sam_loss(logits, iou_pred, targets, valid)
    scaled = sam_loss(logits, iou_pred, targets, valid, num_valid=2.0)
    torch.testing.assert_close(scaled["loss"], own["loss"] * valid.sum() / 2)
    as_tensor = sam_loss(logits, iou_pred, targets, valid, num_valid=torch.tensor(2.0))
    torch.testing.assert_close(as_tensor["loss"], scaled["loss"])

    # Two "ranks" with unequal valid counts (4 and 2): each divides by global count / world size,
    # so the mean of their gradients (what DDP computes) is the one-process gradient.
    full = torch.autograd.grad(own["loss"], (logits, iou_pred))
    world, global_count = 2, float(valid.sum())
    rank_grads = []
    for part in (slice(0, 2), slice(2, 4)):
        out = sam_loss(
            logits[part], iou_pred[part], targets[part], valid[part], num_valid=global_count / world
        )
        rank_grads.append(torch.autograd.grad(out["loss"], (logits, iou_pred)))
    for i in range(2):
        torch.testing.assert_close((rank_grads[0][i] + rank_grads[1][i]) / world, full[i])


def test_low_precision_logits_are_computed_in_float32():
    logits, iou_pred, targets, valid = _batch(seed=10, dtype=torch.float32)
    low = logits.detach().to(torch.bfloat16).requires_grad_()
    ref = low.detach().float().requires_grad_()  # the same values in float32
    out_low = sam_loss(low, iou_pred.detach().half(), targets.to(torch.uint8), valid)
    out_ref = sam_loss(ref, iou_pred.detach().half().float(), targets.float(), valid)
    assert out_low["loss"].dtype == torch.float32
    torch.testing.assert_close(out_low["loss"], out_ref["loss"])
    out_low["loss"].backward()
    out_ref["loss"].backward()
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.float(), ref.grad, rtol=1e-2, atol=1e-6)
    assert focal_loss(low, targets).dtype == torch.float32 and dice_loss(low, targets).dtype == torch.float32


def test_sam_loss_checks_shapes():
    logits, iou_pred, targets, valid = _batch()
    with pytest.raises(ValueError, match="BxKxHxW"):
        sam_loss(logits, iou_pred, targets[..., :5], valid)
    with pytest.raises(ValueError, match="BxK"):
        sam_loss(logits, iou_pred, targets, valid[:, :2])


# ------------------------------------------------------------------ mIoU


def _eval_data(seed: int = 11):
    """Four batches of BxKxHxW predictions and targets with padding, and images of differing sizes."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(4):
        target = torch.rand(2, 3, 8, 8, generator=g) > 0.5
        pred = target ^ (torch.rand(2, 3, 8, 8, generator=g) > 0.7)
        valid = torch.rand(2, 3, generator=g) > 0.3
        sizes = [(5 + i, 7), (9, 4 + i)]
        preds = [torch.rand(3, *s, generator=g) > 0.5 for s in sizes]
        targets = [torch.rand(3, *s, generator=g) > 0.5 for s in sizes]
        batches.append((pred, target, valid, preds, targets))
    return batches


def _fill(acc: MiouAccumulator, batches, with_original: bool = True) -> MiouAccumulator:
    for pred, target, valid, preds, targets in batches:
        acc.update(pred, target, valid)
        if with_original:
            acc.update_lists(preds, targets, valid)
    return acc


def test_miou_is_a_mean_over_objects():
    pred = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool).reshape(1, 1, 1, 4).repeat(1, 2, 1, 1)
    target = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool).reshape(1, 2, 1, 4)
    acc = MiouAccumulator()
    acc.update(pred, target, torch.tensor([[True, True]]))
    acc.update(pred, target, torch.tensor([[False, True]]))  # the bad one is padding here
    acc.update(pred[:, :1], target[:, :1] | True, None)  # IoU 1/2, no flags: all valid
    result = acc.compute()
    assert result["objects_1024"] == 4
    assert result["miou_1024"] == pytest.approx(100 * (1 / 3 + 1 + 1 + 1 / 2) / 4)
    assert result["dice_1024"] == pytest.approx(100 * (0.5 + 1 + 1 + 2 / 3) / 4)


def test_miou_of_lists_and_empty_keys():
    acc = MiouAccumulator()
    acc.update_lists(
        [torch.ones(2, 3, 5, dtype=torch.bool)], [torch.ones(2, 3, 5, dtype=torch.bool)], [[1, 0]]
    )
    acc.update(
        torch.zeros(1, 2, 4, 4, dtype=torch.bool), torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, dtype=bool)
    )
    result = acc.compute()
    assert result["miou_original"] == 100 and result["objects_original"] == 1
    assert result["objects_1024"] == 0 and math.isnan(result["miou_1024"])
    acc.all_reduce()  # not distributed: nothing to do
    assert acc.compute()["objects_original"] == 1
    acc.reset()
    assert acc.compute() == {}


def _all_reduce_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        batches = _eval_data()
        # Rank 0 gets three batches and all original-size images; rank 1 one batch and no "original" key.
        if rank == 0:
            acc = _fill(MiouAccumulator(), batches[:3], with_original=False)
            for _, _, valid, preds, targets in batches:
                acc.update_lists(preds, targets, valid)
        else:
            acc = _fill(MiouAccumulator(), batches[3:], with_original=False)
        acc.all_reduce()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(acc.compute(), f)
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_ranks_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_all_reduce_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = _fill(MiouAccumulator(), _eval_data()).compute()
    assert expected["objects_original"] > 0 and expected["objects_1024"] > 0
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result.keys() == expected.keys()
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, rel=1e-12), key


def test_metric_and_loss_iou_agree():
    logits, iou_pred, targets, _ = _batch(seed=12)
    from_loss = iou_mse_loss(torch.zeros_like(iou_pred), logits, targets).sqrt()
    torch.testing.assert_close(from_loss, mask_iou(logits > 0, targets).double())


@pytest.mark.parametrize("shape", [(2, 8, 8), (2, 64, 64), (1, 1, 1)])
def test_upsampling_backward_equals_interpolates(shape):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(*shape, generator=g).requires_grad_()
    size = 4 * shape[-1]
    out = losses.upsample_logits(x, size)
    ref_x = x.detach().clone().requires_grad_()
    ref = F.interpolate(ref_x[:, None], (size, size), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(out, ref)
    grad = torch.randn(out.shape, generator=g)
    (mine,) = torch.autograd.grad(out, x, grad)
    (theirs,) = torch.autograd.grad(ref, ref_x, grad)
    torch.testing.assert_close(mine, theirs)
    if x.numel() <= 128:  # float64 takes the generic path (gradcheck's Jacobian grows as in x out)
        x64 = x.detach().double().requires_grad_()
        assert torch.autograd.gradcheck(lambda t: losses.upsample_logits(t, size), x64)
    assert losses.upsample_logits(x.detach(), 3 * shape[-1]).shape == (shape[0], 3 * shape[-1], 3 * shape[-1])


@pytest.mark.parametrize("candidates", [1, 3])
def test_a_round_without_objects_gives_zero_loss(candidates):
    low_res = torch.zeros(0, candidates, 16, 16, requires_grad=True)
    out = prompt_loss(low_res, torch.zeros(0, candidates), torch.zeros(0, 64, 64, dtype=torch.uint8))
    assert out["loss"].item() == 0
    out["loss"].backward()
    assert low_res.grad.shape == low_res.shape
