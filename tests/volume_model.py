"""A tiny SAM trained with box prompts on generated CT-like slices: the test model of slice propagation.

``samkit.volume.synthetic`` draws abdominal-looking volumes (Hounsfield units, four organs, one of
them splitting in two across slices). ``train_volume_box_model`` trains a ``vit_tiny`` the way
``tests/shapes.py`` trains its point model (random frozen encoder, prompt encoder and mask decoder
trained on pooled embeddings of a few dozen slices embedded once; balanced BCE + dice, IoU head
regressed) but with box prompts of the kind propagation gives: the box of an organ on the same
slice or on a neighbouring one (up to 2 slices away, widened by 0-25%), whose target is the organ's
mask on this slice (empty past the organ's end: the model learns to answer "nothing here", which is
what stops propagation). The volumes it trains on (seeds from 1000) are not those the tests
segment (seeds 0..99).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from samkit import build_model
from samkit.fast import accelerate
from samkit.modeling import Sam
from samkit.training.numerics import flush_subnormals
from samkit.utils.transforms import ResizeLongestSide
from samkit.volume.intensity import to_uint8
from samkit.volume.synthetic import synthetic_volume

from .shapes import _balanced_bce, _dice_loss, _tie_cross_attention, decoder_optimizer, masks_to_low_res

TRAIN_SEED0 = 1000
TRAIN_VOLUMES = 6
SLICES_PER_VOLUME = 8
PROMPTS_PER_STEP = 4
COARSE_FRACTION = 0.8
LR = 1e-3
FRAME = 1024


def _embed(model: Sam, seed: int) -> list[dict]:
    transform = ResizeLongestSide(FRAME)
    rng = np.random.default_rng(seed)
    data = []
    with torch.no_grad():
        for v in range(TRAIN_VOLUMES):
            ct, label = synthetic_volume(TRAIN_SEED0 + seed * 100 + v)
            grey = to_uint8(ct, "abdomen")
            zs = np.sort(rng.choice(len(ct), size=SLICES_PER_VOLUME, replace=False))
            for z in zs:
                image = np.repeat(grey[z][:, :, None], 3, axis=2)
                x = torch.from_numpy(np.array(transform.apply_image(image))).permute(2, 0, 1)
                embedding = model.image_encoder(model.preprocess(x)[None])
                targets = masks_to_low_res(np.stack([label[z] == o for o in range(1, 5)]))
                data.append(
                    {
                        "size": image.shape[:2],
                        "z": int(z),
                        "label": label,
                        4: (F.avg_pool2d(embedding, 4), F.avg_pool2d(targets[None], 4)[0]),
                        2: (F.avg_pool2d(embedding, 2), F.avg_pool2d(targets[None], 2)[0]),
                    }
                )
    return data


def _sample_box(rng: np.random.Generator, record: dict) -> tuple[np.ndarray, int] | None:
    """A box of an organ on slice z or up to 2 slices away (widened), and the organ's index (0..3)."""
    label, z = record["label"], record["z"]
    offset = 0 if rng.random() < 0.4 else int(rng.choice([-2, -1, 1, 2]))
    source = z + offset
    if not 0 <= source < len(label):
        return None
    present = [o for o in range(1, 5) if (label[source] == o).any()]
    if not present:
        return None
    organ = int(rng.choice(present))
    rows, cols = np.nonzero(label[source] == organ)
    x0, x1, y0, y1 = cols.min(), cols.max() + 1, rows.min(), rows.max() + 1
    mx, my = rng.uniform(0, 0.25, 2) * (x1 - x0, y1 - y0) + rng.uniform(0, 2, 2)
    h, w = label.shape[1:]
    box = np.array([max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)])
    return box, organ - 1


def _train_step(model: Sam, rng: np.random.Generator, data: list[dict], pool: int) -> torch.Tensor:
    transform = ResizeLongestSide(FRAME)
    embeddings, targets, boxes = [], [], []
    while len(boxes) < PROMPTS_PER_STEP:
        record = data[int(rng.integers(len(data)))]
        sampled = _sample_box(rng, record)
        if sampled is None:
            continue
        box, organ = sampled
        embedding, target = record[pool]
        embeddings.append(embedding)
        targets.append(target[organ])
        boxes.append(torch.as_tensor(transform.apply_boxes(box[None], record["size"]), dtype=torch.float))
    grid = embeddings[0].shape[-1]
    sparse, dense = model.prompt_encoder(None, torch.cat(boxes), None)
    logits, iou_pred = model.mask_decoder(
        torch.cat(embeddings),
        model.prompt_encoder.pe_layer((grid, grid))[None],
        sparse,
        dense[..., :grid, :grid],
        multimask_output=False,
    )
    target = torch.stack(targets)[:, None]
    mask_loss = _balanced_bce(logits, target) + _dice_loss(logits, target)
    with torch.no_grad():
        pred, truth = logits > 0, target > 0.5
        union = (pred | truth).sum((-2, -1)).float()
        # An empty target answered with an empty mask is right: IoU 1.
        iou = torch.where(union > 0, (pred & truth).sum((-2, -1)).float() / union.clamp(min=1), 1.0)
    return mask_loss.mean() + F.mse_loss(iou_pred, iou)


def train_volume_box_model(steps: int = 500, seed: int = 0, verbose: bool = False) -> Sam:
    """The trained ``vit_tiny`` (eval mode); deterministic for a seed and step count on one machine."""
    torch.manual_seed(seed)
    model = accelerate(build_model("vit_tiny"))
    rng = np.random.default_rng(seed)
    _tie_cross_attention(model)
    data = _embed(model, seed)
    optimizer, schedule = decoder_optimizer(model, steps, LR)
    coarse = round(steps * COARSE_FRACTION)
    model.image_encoder.requires_grad_(False)
    try:
        with flush_subnormals(torch.device("cpu")):
            for step in range(steps):
                loss = _train_step(model, rng, data, 4 if step < coarse else 2)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if verbose and (step + 1) % 50 == 0:
                    print(f"step {step + 1}: loss {loss.item():.3f}", flush=True)
    finally:
        model.image_encoder.requires_grad_(True)
    return model.eval()
