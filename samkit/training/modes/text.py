"""Text prompts (the seed's CLIP/BLIP-2 text fine-tuning, SAM paper section 7.5): no text labels needed.

Training prompts each object with the L2-normalised image feature of a crop around it, from a frozen
feature encoder (:mod:`samkit.text`); at inference the text feature of a prompt replaces it. An object
is prompted when its mask covers at least ``min_area`` pixels of the original image. Its crop is taken
as the seed takes it: the mask's box expanded by a factor U(1, ``max_expand``) about its centre and
clipped to the image, a centred square of side min(width, height) of that box, resized to the
encoder's input size (bilinear ``roi_align``), its background zeroed with probability
``mask_background_prob``. Randomness is seeded by (seed, epoch, image index, object), so a resumed run
and any number of processes draw the same crops; with ``fixed_crops`` by (seed, image index, object)
alone, so every epoch draws the same crop of an object, and the crop features can be cached
(``cache_embeddings: true``; :attr:`TextPrompts.feature_cache`). Crops are cut from the batch's
resized model input on the device in one batch and encoded image by image (each image's objects in one batch).

One round, mask token 0 (``multimask_output=False``). Evaluation (:func:`evaluate_batch`, protocol
``text``), thresholded at logits > 0, reported x100 like box evaluation at the padded 1024 frame and
at the original resolution:

- crop-feature protocol (any dataset): each object of at least ``min_area`` is prompted with its own
  (seeded) crop feature and scored against its mask: ``miou_1024``, ``miou_original`` (and dice,
  ``objects_*``);
- category-name protocol (datasets with named categories, COCO): each category present in an image
  is prompted ONCE with the text feature of ``template.format(name)`` (``a photo of a {}`` by
  default; ``{}`` alone prompts with the bare name) and its one mask is scored against that
  category's instances in the sample: ``miou_*_category_best`` is the IoU with the best-matching
  instance (dice with that instance), ``miou_*_category_union`` the IoU with the union of the
  instances; means over (image, category) pairs, counted in ``objects_*_category_*``. Crowd
  regions are not instances (they are left out as in training). The instances are those the
  sample holds: with more objects than ``eval_data.max_objects`` a seeded subset, so set
  ``max_objects`` above the largest instance count to score against every instance. The text
  features of all the dataset's category names are computed once (:meth:`TextPrompts.prepare_eval`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..metrics import MiouAccumulator
from .base import Prediction, PromptMode, Session, TrainBatch, score_objects


class TextSession(Session):
    """One round; ``features`` NxD are the prompted objects' crop features, in batch order."""

    def __init__(self, batch: TrainBatch, valid: torch.Tensor, features: torch.Tensor) -> None:
        super().__init__(batch, valid=valid)
        self.features = features


class TextPrompts(PromptMode):
    """Crop-feature prompts for a SAM built with ``text_feature_dim`` = the encoder's feature size."""

    def __init__(
        self,
        sam,
        *,
        feature_encoder,
        min_area: int = 10000,
        max_expand: float = 2.0,
        mask_background_prob: float = 0.5,
        fixed_crops: bool = False,
        template: str = "a photo of a {}",
    ) -> None:
        super().__init__(sam)
        dim = getattr(sam.prompt_encoder, "text_feature_dim", None)
        if dim != feature_encoder.feature_dim:
            raise ValueError(
                f"the text encoder gives {feature_encoder.feature_dim}-d features but the SAM was built with "
                f"text_feature_dim={dim}"
            )
        self.feature_encoder = feature_encoder
        self.min_area = min_area
        self.max_expand = max_expand
        self.mask_background_prob = mask_background_prob
        self.fixed_crops = fixed_crops
        if template.count("{}") != 1:
            raise ValueError(f"the text template must hold one {{}} (where the name goes), got {template!r}")
        self.template = template
        # An EmbeddingCache of crop features (set by the training loop with cache_embeddings and
        # fixed_crops); text features of prompts already encoded (name -> CPU float32 D).
        self.feature_cache: Optional[Any] = None
        self._text_memo: dict[str, torch.Tensor] = {}

    def crop_settings(self) -> str:
        """What the crop features depend on besides the encoder, the image, its masks and the draws."""
        return (
            f"roi_align-v1|size={self.feature_encoder.image_size}|mean={self.sam._mean}|std={self.sam._std}"
        )

    def session(self, batch: TrainBatch) -> TextSession:
        valid = batch.valid & self._large_enough(batch)
        if self.feature_cache is None or not self.training:  # evaluation never uses the cache
            if batch.images is None and batch.load_images is None:
                raise ValueError("text prompts crop the model input: the batch has no images")
            return TextSession(batch, valid, self.crop_features(batch, valid))
        return TextSession(batch, valid, self._cached_crop_features(batch, valid))

    def _cached_crop_features(self, batch: TrainBatch, valid: torch.Tensor) -> torch.Tensor:
        """The crop features of ``crop_features``, read from ``feature_cache`` per image where present
        (keyed by the image, its masks and the draws), computed (in one batch) and stored otherwise."""
        if "image_key" not in batch.extra or "masks_key" not in batch.extra:
            raise ValueError(
                "the crop-feature cache needs samples with image_key and masks_key (KeyedDataset)"
            )
        device = batch.masks.device
        flags = valid.cpu()
        factors, blackout = self._draws(batch, valid)
        counts = flags.sum(1).tolist()
        keys: list[Optional[str]] = []
        start = 0
        for b, n in enumerate(counts):
            if n == 0:
                keys.append(None)
                continue
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{batch.extra['image_key'][b]}|{batch.extra['masks_key'][b]}|".encode())
            h.update(flags[b].numpy().tobytes())
            h.update(factors[start : start + n].tobytes())
            h.update(blackout[start : start + n].tobytes())
            keys.append(h.hexdigest())
            start += n
        rows = [b for b, k in enumerate(keys) if k is not None]
        found = dict(zip(rows, self.feature_cache.get([keys[b] for b in rows], device)))
        missing = [b for b in rows if found[b] is None]
        if missing:
            only = torch.zeros_like(valid)
            only[missing] = valid[missing]
            computed = self.crop_features(batch, only)
            start = 0
            for b in missing:
                found[b] = computed[start : start + counts[b]]
                start += counts[b]
            for b in missing:
                self.feature_cache.put([keys[b]], found[b][None])
        if not rows:
            return torch.zeros(0, self.feature_encoder.feature_dim, device=device)
        return torch.cat([found[b] for b in rows])

    def forward(self, session: TextSession, embeddings: torch.Tensor) -> Prediction:
        encoder = self.sam.prompt_encoder
        prompts, start = [], 0
        for b in range(embeddings.shape[0]):
            n = int(session.valid[b].sum())
            feats = session.features[start : start + n]
            start += n
            prompts.append(encoder(None, None, None, text=feats) if n else None)
        return self.decode(embeddings, prompts, multimask_output=False)

    def _large_enough(self, batch: TrainBatch) -> torch.Tensor:
        """BxK: mask area at the original resolution >= min_area."""
        area = batch.masks.flatten(2).sum(-1, dtype=torch.float64)
        orig = batch.extra["original_size"].to(area.device, torch.float64)
        inp = batch.extra["input_size"].to(area.device, torch.float64)
        scale = (orig[:, 0] * orig[:, 1]) / (inp[:, 0] * inp[:, 1])
        return area * scale[:, None] >= self.min_area

    def _draws(self, batch: TrainBatch, valid: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Per prompted object: the expansion factor and whether the background is zeroed."""
        factors, blackout = [], []
        for b, k in valid.nonzero().tolist():
            if self.fixed_crops:  # the same crop of an object every epoch
                rng = np.random.default_rng([batch.seed, int(batch.index[b]), k, 0x7E48])
            else:
                rng = np.random.default_rng([batch.seed, batch.epoch, int(batch.index[b]), k, 0x7E47])
            u = rng.random(2)
            factors.append(1.0 + (self.max_expand - 1.0) * u[0])
            blackout.append(u[1] < self.mask_background_prob)
        return np.asarray(factors, np.float64), np.asarray(blackout, bool)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """NxD L2-normalised text features of ``texts`` (on the SAM's device), each text encoded once
        per mode (the encoder is frozen): the rest are read from a memo."""
        new = sorted({t for t in texts if t not in self._text_memo})
        if new:
            feats = self.feature_encoder.text_features(new).float().cpu()
            self._text_memo.update(zip(new, feats))
        device = self.sam.prompt_encoder.text_proj.weight.device
        if not texts:
            return torch.zeros(0, self.feature_encoder.feature_dim, device=device)
        return torch.stack([self._text_memo[t] for t in texts]).to(device)

    def prompt_text(self, name: str) -> str:
        """The text a category named ``name`` is prompted with (``template`` with the name in it)."""
        return self.template.format(name)

    def prepare_eval(self, category_names: dict[int, str]) -> None:
        """Encode the prompt text of every category name of the evaluated dataset, in one batch."""
        if category_names:
            self.text_features([self.prompt_text(n) for n in sorted(set(category_names.values()))])

    @torch.no_grad()
    def crop_features(self, batch: TrainBatch, valid: torch.Tensor) -> torch.Tensor:
        """NxD L2-normalised features of the prompted objects' crops (N = valid.sum()). Only the rows
        of the batch with a prompted object are read (``batch.images``, else ``batch.load_images``)."""
        enc = self.feature_encoder
        dim = enc.feature_dim
        device = batch.masks.device
        idx = valid.nonzero()
        if len(idx) == 0:
            return torch.zeros(0, dim, device=device)
        masks = batch.masks[valid].float()  # NxSxS
        factors, blackout = self._draws(batch, valid)
        cols, rows = masks.amax(1) > 0, masks.amax(2) > 0  # NxS: any pixel in each column / row
        size = masks.shape[-1]
        ar = torch.arange(size, device=device, dtype=torch.float64)
        big = torch.full_like(ar, size)
        x0 = torch.where(cols, ar, big).amin(1)
        x1 = torch.where(cols, ar, -big).amax(1) + 1
        y0 = torch.where(rows, ar, big).amin(1)
        y1 = torch.where(rows, ar, -big).amax(1) + 1
        inp = batch.extra["input_size"].to(device, torch.float64)[idx[:, 0]]  # Nx2 (h, w)
        f = torch.as_tensor(factors, device=device)
        cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * f, (y1 - y0) * f
        ex0, ex1 = (cx - w / 2).clamp(min=0), torch.minimum(cx + w / 2, inp[:, 1])
        ey0, ey1 = (cy - h / 2).clamp(min=0), torch.minimum(cy + h / 2, inp[:, 0])
        side = torch.minimum(ex1 - ex0, ey1 - ey0)
        cx, cy = (ex0 + ex1) / 2, (ey0 + ey1) / 2
        rows = valid.any(1).nonzero()[:, 0]  # the images with a prompted object ...
        position = torch.full((valid.shape[0],), -1, dtype=torch.long, device=device)
        position[rows] = torch.arange(len(rows), device=device)  # ... and their place among them
        if batch.images is not None:
            images = batch.images if len(rows) == valid.shape[0] else batch.images[rows]
        else:
            images = batch.load_images(rows.tolist())
        rois = torch.stack(
            [position[idx[:, 0]].double(), cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=1
        ).float()
        out = (enc.image_size, enc.image_size)
        mean = torch.tensor(self.sam._mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.sam._std, device=device).view(1, 3, 1, 1)
        pixels = (images.float() * std + mean) / 255.0  # the model input back to RGB in [0, 1]
        from torchvision.ops import roi_align  # here: importing torchvision costs every run ~1.5 s

        crops = roi_align(pixels, rois, out, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        mask_rois = rois.clone()
        mask_rois[:, 0] = torch.arange(len(rois), device=device, dtype=torch.float32)
        mask_crops = roi_align(
            masks[:, None], mask_rois, out, spatial_scale=1.0, sampling_ratio=2, aligned=True
        )
        keep = torch.as_tensor(~blackout, device=device).view(-1, 1, 1, 1)
        crops = torch.where(keep, crops, crops * (mask_crops > 0.5)).clamp(0, 1)
        # Encoded image by image (all of an image's prompted objects in one batch): an object's feature
        # then never depends on which other images share its training batch, so features read back
        # from the cache are bit for bit those computed (kernels may round differently per batch size).
        counts = valid.sum(1)[rows].tolist()
        return torch.cat([enc.image_features(part) for part in crops.split(counts)]).to(device)


@torch.no_grad()
def evaluate_batch(
    mode: TextPrompts, batch: TrainBatch, embeddings: torch.Tensor, acc: MiouAccumulator
) -> None:
    """Crop-feature protocol: each object of at least ``min_area`` is prompted with its own crop
    feature and scored against its mask (``miou_1024``/``miou_original``; seeded crops); and, when
    the batch has category names (COCO), the category-name protocol (``miou_*_category_best`` and
    ``miou_*_category_union``, see the module's docstring)."""
    session = mode.session(batch)
    pred = mode(session, embeddings)
    score_objects(acc, pred.low_res[:, 0], dataclasses.replace(batch, valid=session.valid))
    if "category_ids" in batch.extra:
        pairs, low_res = predict_categories(mode, batch, embeddings)
        score_categories(acc, low_res, batch, pairs)


def category_pairs(batch: TrainBatch) -> list[tuple[int, int, str]]:
    """(image row, category id, name) of every category with a valid object in an image of the
    batch, row by row, ids ascending; names from ``batch.extra["category_names"]`` (id -> name, set
    by the evaluation loop; the id itself when absent)."""
    ids = batch.extra["category_ids"].cpu()
    names = batch.extra.get("category_names") or {}
    valid = batch.valid.cpu()
    pairs = []
    for b in range(valid.shape[0]):
        present = sorted({int(c) for c in ids[b][valid[b]].tolist() if c >= 0})
        pairs.extend((b, c, str(names.get(c, c))) for c in present)
    return pairs


@torch.no_grad()
def predict_categories(
    mode: TextPrompts, batch: TrainBatch, embeddings: torch.Tensor
) -> tuple[list[tuple[int, int, str]], torch.Tensor]:
    """Each (image, category) pair prompted with the text feature of its name in the template:
    (the pairs, Px256x256 low-res logits of mask token 0)."""
    pairs = category_pairs(batch)
    feats = mode.text_features([mode.prompt_text(name) for _, _, name in pairs])
    encoder = mode.sam.prompt_encoder
    prompts = []
    for b in range(embeddings.shape[0]):
        rows = [i for i, pair in enumerate(pairs) if pair[0] == b]
        prompts.append(encoder(None, None, None, text=feats[rows]) if rows else None)
    pred = mode.decode(embeddings, prompts, multimask_output=False)
    return pairs, pred.low_res[:, 0]


@torch.no_grad()
def score_categories(
    acc: MiouAccumulator, low_res: torch.Tensor, batch: TrainBatch, pairs: Sequence[tuple[int, int, Any]]
) -> None:
    """Score one mask per (image row, category) pair (``low_res`` Pxhxw logits, thresholded at 0)
    against the category's valid instances of that image: ``{1024,original}_category_best`` (IoU
    with the instance it overlaps best, dice with that instance) and ``..._category_union`` (with
    the union of the instances); at the padded input frame and at the original size (logits resized
    as the predictor resizes them), as :func:`~.base.score_objects` does."""
    from ...utils.transforms import upscale_masks
    from ..losses import upsample_logits
    from ..metrics import mask_iou

    if not pairs:
        return
    low_res = low_res.float()
    device = low_res.device
    size = batch.masks.shape[-1]
    ids = batch.extra["category_ids"].to(device)
    ones = torch.ones(1, 1, dtype=torch.bool, device=device)

    def add(pred: torch.Tensor, instances: torch.Tensor, key: str) -> None:
        instances = instances.bool()
        best = int(mask_iou(pred[None].expand_as(instances), instances).argmax())
        acc.update(pred[None, None], instances[best][None, None], ones, key=f"{key}_category_best")
        acc.update(pred[None, None], instances.any(0)[None, None], ones, key=f"{key}_category_union")

    pred_1024 = upsample_logits(low_res, size) > 0
    for i, (b, c, _) in enumerate(pairs):
        members = batch.valid[b] & (ids[b] == c)
        add(pred_1024[i], batch.masks[b][members], "1024")
        if "original_masks" not in batch.extra:
            continue
        h, w = (int(v) for v in batch.extra["original_size"][b])
        ih, iw = (int(v) for v in batch.extra["input_size"][b])
        pred = upscale_masks(low_res[i : i + 1], size, (ih, iw), (h, w))[0] > 0
        original = batch.extra["original_masks"][b][: batch.valid.shape[1]]
        add(pred, original[members.cpu()].to(device), "original")
