"""Point prompts: iterative click training (the SAM paper's schedule, or the seed's) for the training loop.

Every valid object of a batch goes through a simulated interactive session of ``num_iter`` rounds:

- round 0: one positive point drawn uniformly inside the ground-truth mask, or (``first_prompt="mixed"``,
  the paper) a point or a noisy box with equal probability (each box coordinate moves by a normal
  draw with std ``box_noise`` x the box's side, clipped to ``max_box_noise`` px); this single prompt
  predicts 3 masks;
- each next round adds one click drawn uniformly from the error region between the previous
  prediction (logits > 0, at the padded SxS input frame) and the ground truth: label 1 on a false
  negative pixel, 0 on a false positive one; no error left, no new click;
- the previous round's unthresholded 256x256 logits are the next round's ``mask_input`` (without
  gradient); out of 3 masks, the one with the highest predicted IoU is fed back and sampled from;
- ``mask_only_iter`` rounds add no click: integers are round numbers, ``"last"`` is the last round,
  ``"random"`` one round drawn per object among the others (the paper: ``[random, last]``);
- ``accumulate_points`` keeps every earlier click in the prompt (the paper) or feeds only the new one
  (the seed; the mask input then carries the history).

Coordinates are XY pixels (column, row) in the padded SxS frame; boxes XYXY there. All draws come from
numpy generators seeded by (seed, epoch, dataset index, object slot, round), so a resumed run and N
processes under torchrun draw exactly what one uninterrupted process draws. The interactive evaluation
protocol is :mod:`samkit.training.modes.point_eval`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from .base import Prediction, PromptMode, Session, TrainBatch

Click = tuple[int, int, int]  # x (column), y (row), label (1 foreground, 0 background)
Box = tuple[float, float, float, float]
FIRST_PROMPTS = ("point", "mixed")
# What a generator is drawn for: part of its seed, so that no two draws share a stream.
_FIRST, _CLICK, _MASK_ONLY = 0, 1, 2


def object_rng(
    seed: int, epoch: int, index: int, slot: int, round_: int, purpose: int
) -> np.random.Generator:
    """The generator of one draw: seeded by (seed, epoch, dataset index, object slot, round, purpose)."""
    return np.random.default_rng([int(v) % (1 << 32) for v in (seed, epoch, index, slot, round_, purpose)])


def random_pixel(region: torch.Tensor, rng: np.random.Generator) -> Optional[tuple[int, int]]:
    """(x, y) of a pixel drawn uniformly from the True pixels of an HxW mask; None when it has none.

    The k-th True pixel in row-major order, k drawn by ``rng.integers(count)``: found from the per-row
    counts and one row's pixels (listing every True pixel of a 1024x1024 mask cost ~2 ms)."""
    region = region.reshape(-1, region.shape[-1])
    per_row = region.sum(dim=1)
    ends = per_row.cumsum(0)
    count = int(ends[-1]) if len(ends) else 0
    if count == 0:
        return None
    k = int(rng.integers(count))
    y = int(torch.searchsorted(ends, k, right=True))
    before = k - (int(ends[y - 1]) if y > 0 else 0)
    x = int(region[y].nonzero()[before, 0])
    return x, y


def sample_click(target: torch.Tensor, pred: torch.Tensor, rng: np.random.Generator) -> Optional[Click]:
    """One correction click drawn uniformly from the error region of HxW bool masks: (x, y, 1) on a
    false negative pixel (target and not pred), (x, y, 0) on a false positive one; None without error."""
    error = target ^ pred
    xy = random_pixel(error, rng)
    if xy is None:
        return None
    x, y = xy
    return x, y, int(bool(target[y, x]))


def noisy_box(target: torch.Tensor, rng: np.random.Generator, noise: float, max_noise: float) -> Box:
    """The tight XYXY box of an HxW mask (pixel edges), each coordinate moved by N(0, noise x side),
    clipped to +-``max_noise`` px and to the frame; x1 > x0 and y1 > y0 are kept."""
    rows = target.any(dim=1).nonzero().squeeze(1)
    cols = target.any(dim=0).nonzero().squeeze(1)
    x0, x1 = float(cols[0]), float(cols[-1]) + 1
    y0, y1 = float(rows[0]), float(rows[-1]) + 1
    w, h = x1 - x0, y1 - y0
    std = np.array([w, h, w, h]) * noise
    shift = np.clip(rng.normal(0.0, 1.0, 4) * std, -max_noise, max_noise)
    height, width = target.shape
    bx0, by0, bx1, by1 = (float(v) for v in np.array([x0, y0, x1, y1]) + shift)
    bx0, bx1 = min(max(bx0, 0.0), width - 1.0), min(max(bx1, 1.0), float(width))
    by0, by1 = min(max(by0, 0.0), height - 1.0), min(max(by1, 1.0), float(height))
    return bx0, by0, max(bx1, bx0 + 1), max(by1, by0 + 1)


def mask_only_rounds(spec: Sequence[Union[int, str]], num_iter: int, rng: np.random.Generator) -> set[int]:
    """The rounds (1 .. num_iter-1) that add no click: integers as given, ``"last"`` = num_iter - 1,
    ``"random"`` = one more round drawn uniformly among the remaining ones (none left: nothing)."""
    rounds: set[int] = set()
    for item in spec:
        if str(item) == "last":
            rounds.add(num_iter - 1)
        elif str(item) != "random":
            rounds.add(int(item))
    for item in spec:
        if str(item) == "random":
            free = [r for r in range(1, num_iter) if r not in rounds]
            if free:
                rounds.add(free[int(rng.integers(len(free)))])
    return {r for r in rounds if 0 < r < num_iter}


def check_schedule(num_iter: int, mask_only_iter: Sequence[Union[int, str]], first_prompt: str) -> None:
    """Raise ValueError naming what is wrong with a point schedule."""
    if num_iter < 1:
        raise ValueError(f"num_iter must be at least 1, got {num_iter}")
    if first_prompt not in FIRST_PROMPTS:
        raise ValueError(f"first_prompt must be one of {', '.join(FIRST_PROMPTS)}, got {first_prompt!r}")
    for item in mask_only_iter:
        if str(item) in ("random", "last"):
            continue
        try:
            value = int(item)
        except ValueError:
            raise ValueError(
                f"mask_only_iter entries must be random, last or a round number, got {item!r}"
            ) from None
        if not 0 < value < num_iter:
            raise ValueError(f"mask_only_iter round {value} is outside 1..{num_iter - 1}")


class PointSession(Session):
    """The clicks of one batch over ``num_iter`` rounds (see the module docstring).

    ``objects`` lists the (image, slot) of the N valid objects in batch order; per object,
    ``clicks`` holds every click so far and ``box`` the first prompt's box (or None); ``mask_input``
    is Nx1xhxw logits fed back (None in round 0); ``multimask`` is True in round 0.
    """

    def __init__(
        self,
        batch: TrainBatch,
        *,
        num_iter: int,
        mask_only_iter: Sequence[Union[int, str]] = (),
        first_prompt: str = "point",
        accumulate_points: bool = True,
        box_noise: float = 0.1,
        max_box_noise: float = 20.0,
    ) -> None:
        super().__init__(batch)
        check_schedule(num_iter, mask_only_iter, first_prompt)
        self.rounds = num_iter
        self.accumulate_points = accumulate_points
        image_ids, slots = (t.tolist() for t in batch.valid.nonzero(as_tuple=True))
        indices = batch.index.tolist()
        self.objects = list(zip(image_ids, slots))
        self._keys = [(batch.seed, batch.epoch, indices[b], k) for b, k in self.objects]
        self._targets = self.targets.bool()
        self.clicks: list[list[Click]] = [[] for _ in self.objects]
        self.box: list[Optional[Box]] = [None] * len(self.objects)
        self.new_click: list[Optional[Click]] = [None] * len(self.objects)
        self.mask_input: Optional[torch.Tensor] = None
        self.mask_only = [
            mask_only_rounds(mask_only_iter, num_iter, object_rng(*key, 0, _MASK_ONLY)) for key in self._keys
        ]
        for i, key in enumerate(self._keys):
            rng = object_rng(*key, 0, _FIRST)
            if first_prompt == "mixed" and rng.random() < 0.5:
                if self._targets[i].any():  # an empty mask (the datasets drop them) gets no prompt
                    self.box[i] = noisy_box(self._targets[i], rng, box_noise, max_box_noise)
                continue
            xy = random_pixel(self._targets[i], rng)
            if xy is not None:
                self._add(i, (xy[0], xy[1], 1))

    @property
    def multimask(self) -> bool:
        return self.round == 0

    def _add(self, i: int, click: Click) -> None:
        self.clicks[i].append(click)
        self.new_click[i] = click

    def prompt_clicks(self, i: int) -> list[Click]:
        """The clicks object ``i`` is prompted with in the current round."""
        if self.accumulate_points:
            return self.clicks[i]
        return [self.new_click[i]] if self.new_click[i] is not None else []

    @torch.no_grad()
    def feedback(self, prediction: Prediction) -> None:
        """Feed back the best-by-predicted-IoU logits; draw each object's next click from its errors."""
        from ...utils.transforms import greater
        from ..losses import upsample_logits

        logits = prediction.low_res
        if logits.shape[1] > 1:
            best = prediction.iou.argmax(dim=1)
            logits = logits[torch.arange(len(logits), device=logits.device), best]
        else:
            logits = logits[:, 0]
        self.mask_input = logits.detach()[:, None]
        self.round += 1
        self.new_click = [None] * len(self.objects)
        if self.round >= self.rounds:
            return
        size = self._targets.shape[-1]
        for i, key in enumerate(self._keys):
            if self.round in self.mask_only[i]:
                continue
            pred = greater(upsample_logits(logits[i : i + 1], size)[0], 0.0)
            click = sample_click(self._targets[i], pred, object_rng(*key, self.round, _CLICK))
            if click is not None:
                self._add(i, click)


class PointPrompts(PromptMode):
    """Iterative point-prompt training: ``session(batch)`` simulates ``num_iter`` rounds of clicks."""

    def __init__(
        self,
        sam,
        *,
        num_iter: int = 11,
        mask_only_iter: Sequence[Union[int, str]] = ("random", "last"),
        first_prompt: str = "mixed",
        accumulate_points: bool = True,
        box_noise: float = 0.1,
        max_box_noise: float = 20.0,
    ) -> None:
        super().__init__(sam)
        check_schedule(num_iter, mask_only_iter, first_prompt)
        self.schedule = dict(
            num_iter=num_iter,
            mask_only_iter=list(mask_only_iter),
            first_prompt=first_prompt,
            accumulate_points=accumulate_points,
            box_noise=box_noise,
            max_box_noise=max_box_noise,
        )

    def session(self, batch: TrainBatch) -> PointSession:
        return PointSession(batch, **self.schedule)

    def forward(self, session: PointSession, embeddings: torch.Tensor) -> Prediction:  # type: ignore[override]
        clicks = [session.prompt_clicks(i) for i in range(len(session.objects))]
        return decode_clicks(
            self, embeddings, session.objects, clicks, session.box, session.mask_input, session.multimask
        )


def decode_clicks(
    mode: PromptMode,
    embeddings: torch.Tensor,
    objects: Sequence[tuple[int, int]],
    clicks: Sequence[Sequence[Click]],
    boxes: Sequence[Optional[Box]],
    mask_input: Optional[torch.Tensor],
    multimask_output: bool,
) -> Prediction:
    """Decode N objects (``objects[i]`` = (image, slot), batch order) on Bx256x64x64 ``embeddings``.

    Object i is prompted with its ``clicks[i]`` (XY + label in the input frame), its ``boxes[i]``
    (XYXY, or None) and ``mask_input[i]`` (1xhxw logits; None: no mask). Objects of an image are
    decoded together, those with a box apart from those without; clicks are padded with label -1
    to the longest list (at least one point when there is no box, as the seed's empty round).
    """
    encoder, decoder = mode.sam.prompt_encoder, mode.sam.mask_decoder
    if not objects:
        return mode.decode(embeddings, [None] * embeddings.shape[0], multimask_output)
    device, image_pe = embeddings.device, encoder.get_dense_pe()
    order, logits, ious = [], [], []
    images = sorted({b for b, _ in objects})
    for b in images:
        rows = [i for i, (image, _) in enumerate(objects) if image == b]
        for with_box in (False, True):
            group = [i for i in rows if (boxes[i] is not None) == with_box]
            if not group:
                continue
            length = max(len(clicks[i]) for i in group)
            points = None
            if length or not with_box:
                length = max(length, 1)
                coords = torch.zeros(len(group), length, 2)
                labels = -torch.ones(len(group), length, dtype=torch.int64)
                for row, i in enumerate(group):
                    for col, (x, y, label) in enumerate(clicks[i]):
                        coords[row, col] = torch.tensor([x, y], dtype=torch.float32)
                        labels[row, col] = label
                points = (coords.to(device), labels.to(device))
            box = torch.tensor([boxes[i] for i in group], device=device) if with_box else None
            masks = mask_input[group] if mask_input is not None else None
            sparse, dense = encoder(points, box, masks)
            low_res, iou = decoder(embeddings[b : b + 1], image_pe, sparse, dense, multimask_output)
            order += group
            logits.append(low_res)
            ious.append(iou)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    inverse = inverse.to(device)
    return Prediction(torch.cat(logits)[inverse], torch.cat(ious)[inverse])


__all__ = [
    "PointPrompts",
    "PointSession",
    "check_schedule",
    "decode_clicks",
    "mask_only_rounds",
    "noisy_box",
    "object_rng",
    "random_pixel",
    "sample_click",
]
