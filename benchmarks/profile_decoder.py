"""Where a prompt call's or automatic mask generation's time goes, stage by stage, by the wall clock.

    python benchmarks/profile_decoder.py --task amg --trained [--tuned-allocator] [--rounds 2]
    python benchmarks/profile_decoder.py --task point --dtype bfloat16 [--rounds 40]
    python benchmarks/profile_decoder.py --task boxes [--dtype bfloat16] [--rounds 5]

The tasks are those of benchmarks/amg.py (``--trained``: its benchmark decoder, hundreds of records)
and benchmarks/prompts.py (one point with 3 masks; 64 boxes in one call), on samkit only. Each stage
(the image and prompt encoders, each two-way layer's attentions and MLP, the final attention, the
mask upscaling with the hypernetworks) is wrapped with ``time.perf_counter``; printed per stage: the
median over the rounds of its time in one task, its share, and the number of calls. A layer's
"norms and sums" and the decoder's or task's "rest" are what their totals leave to the parts.

Not torch.profiler: on the decoder's chunks of 16 prompts (fp32, tuned allocator) it reported the
element-wise passes over the 16 x 4096 x 256 image tokens (the sums with the PE, the layer norms) at
25 ms a call, where they take 7-8 ms without it; its per-operator table misplaces the time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

import numpy as np
import torch
from common import (
    add_common_flags,
    apply_common_flags,
    host_speed,
    machine,
    samkit_sam,
    shared_random_weights,
)
from prompts import spread_boxes

from samkit import SamAutomaticMaskGenerator, SamPredictor


class StageClock:
    """Wall-clock time and call count per stage, for the current task call."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, owner: object, method: str, stage: str) -> None:
        """Time ``owner.method`` (an instance attribute shadows the class's method) as ``stage``."""
        inner = getattr(owner, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start
                self.calls[stage] += 1

        setattr(owner, method, timed)

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        seconds, calls = dict(self.seconds), dict(self.calls)
        self.seconds.clear()
        self.calls.clear()
        return seconds, calls


# Stages as printed: (name, indent); "rest" rows are computed from the totals above them.
def stage_rows(depth: int) -> list[tuple[str, int]]:
    rows = [("task", 0), ("image encoder", 1), ("prompt encoder", 1), ("mask decoder", 1), ("transformer", 2)]
    for i in range(depth):
        rows += [(f"layer {i}", 3)]
        rows += [
            (f"layer {i} {part}", 4)
            for part in ("self-attention", "token->image", "MLP", "image->token", "norms and sums")
        ]
    rows += [("final token->image", 3), ("transformer rest", 3), ("upscaling + hypernetworks", 2)]
    rows += [("decoder rest", 2), ("task rest", 1)]
    return rows


def instrument(model, clock: StageClock, amg: bool) -> None:
    clock.wrap(model.image_encoder, "forward", "image encoder")
    clock.wrap(model.prompt_encoder, "forward", "prompt encoder")
    decoder = model.mask_decoder
    clock.wrap(decoder, "forward_above_iou" if amg else "forward", "mask decoder")
    clock.wrap(decoder, "_masks", "upscaling + hypernetworks")
    transformer = decoder.transformer
    clock.wrap(transformer, "forward", "transformer")
    for i, layer in enumerate(transformer.layers):
        clock.wrap(layer, "forward", f"layer {i}")
        clock.wrap(layer.self_attn, "forward", f"layer {i} self-attention")
        clock.wrap(layer.cross_attn_token_to_image, "forward", f"layer {i} token->image")
        clock.wrap(layer.mlp, "forward", f"layer {i} MLP")
        clock.wrap(layer.cross_attn_image_to_token, "forward", f"layer {i} image->token")
    clock.wrap(transformer.final_attn_token_to_image, "forward", "final token->image")


def with_rests(seconds: dict[str, float], depth: int) -> dict[str, float]:
    s = defaultdict(float, seconds)
    for i in range(depth):
        parts = ("self-attention", "token->image", "MLP", "image->token")
        s[f"layer {i} norms and sums"] = s[f"layer {i}"] - sum(s[f"layer {i} {p}"] for p in parts)
    layers = sum(s[f"layer {i}"] for i in range(depth))
    s["transformer rest"] = s["transformer"] - layers - s["final token->image"]
    s["decoder rest"] = s["mask decoder"] - s["transformer"] - s["upscaling + hypernetworks"]
    s["task rest"] = s["task"] - s["image encoder"] - s["prompt encoder"] - s["mask decoder"]
    return dict(s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="amg", choices=["amg", "point", "boxes"])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--trained", action="store_true", help="amg: the benchmark decoder of amg.py --trained"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed task calls (default: 2 amg, 5 boxes, 40 point)"
    )
    add_common_flags(parser)
    args = parser.parse_args(argv)
    apply_common_flags(args)
    rounds = {"amg": 2, "boxes": 5, "point": 40}[args.task] if args.rounds is None else args.rounds
    if rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {rounds}")

    from skimage import data

    _, state = shared_random_weights(args.model)
    if args.trained:
        if args.task != "amg" or args.model != "vit_b":
            raise SystemExit("--trained: only --task amg with vit_b")
        from trained_decoder import trained_state

        state, _ = trained_state(verbose=False)
    model = samkit_sam(args.model, state, getattr(torch, args.dtype))
    image = data.coffee()  # the photo of amg.py and prompts.py, 400x600
    clock = StageClock()
    instrument(model, clock, amg=args.task == "amg")
    if args.task == "amg":
        generator = SamAutomaticMaskGenerator(model)
        what = f"automatic mask generation, 32x32 points, on a {image.shape[0]}x{image.shape[1]} photo"

        def task() -> int:
            return len(generator.generate(image))

    else:
        predictor = SamPredictor(model)
        predictor.set_image(image)
        h, w = image.shape[:2]
        if args.task == "point":
            what = "one point, 3 masks at the photo's size"

            def task() -> int:
                masks, _, _ = predictor.predict(
                    point_coords=np.array([[w * 0.4, h * 0.55]]), point_labels=np.array([1])
                )
                return len(masks)

        else:
            what = "64 boxes in one call, 1 mask each"
            boxes = torch.as_tensor(spread_boxes(64, h, w), dtype=torch.float)

            def task() -> int:
                b = predictor.transform.apply_boxes_torch(boxes, (h, w))
                masks, _, _ = predictor.predict_torch(None, None, boxes=b, multimask_output=False)
                return len(masks)

    depth = len(model.mask_decoder.transformer.layers)
    gauge_before = host_speed()
    task()  # warm-up
    clock.take()
    totals: dict[str, list[float]] = defaultdict(list)
    calls: dict[str, int] = {}
    outputs = 0
    for _ in range(rounds):
        start = time.perf_counter()
        outputs = task()
        elapsed = time.perf_counter() - start
        seconds, calls = clock.take()
        seconds["task"] = elapsed
        for stage, value in with_rests(seconds, depth).items():
            totals[stage].append(value)
    gauge_after = host_speed()
    median = {stage: statistics.median(v) for stage, v in totals.items()}
    task_s = median["task"]
    unit, scale = ("s", 1.0) if task_s >= 1.0 else ("ms", 1e3)
    print(f"{what}: samkit {args.model} {args.dtype}, {machine()}; {outputs} masks a call")
    print(
        f"medians of {rounds} timed calls after one warm-up; host gauge before {gauge_before}, after {gauge_after}"
    )
    print(f"{'stage':46s} {unit:>9s} {'share':>7s} {'calls':>6s}")
    for name, indent in stage_rows(depth):
        if name not in median or (name != "task" and abs(median[name]) < 1e-9 and name not in calls):
            continue
        label = "  " * indent + name
        print(
            f"{label:46s} {median[name] * scale:9.2f} {median[name] / task_s:7.1%} {calls.get(name, ''):>6}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
