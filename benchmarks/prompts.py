"""Prompt latency after ``set_image``: one point, and 64 boxes in one call; samkit against Meta's predictor.

    python benchmarks/prompts.py --model vit_b [--dtype bfloat16] [--rounds 5] [--out results.json]

Each predictor embeds the photo (``skimage.data.coffee()``, 400x600) once; then the prompt calls run
in alternation between the implementations, one warm-up and ``--rounds`` timed calls each, in one
process, with the same random weights:

(a) one point, the usual call: ``predict(point_coords=[[x, y]], point_labels=[1], multimask_output=True)``
    -> 3 masks at the photo's resolution (the whole call is timed);
(b) 64 seeded boxes spread over the photo in one ``predict_torch(boxes=transform.apply_boxes_torch(...),
    multimask_output=False)`` call (the box transform is inside the timing).

Each turn of (a) is one call after the other implementation's (the table's median, the issue's
target) followed by ``--in-a-row`` more calls of the same implementation, as a user's clicks on one
image follow each other: their median is reported next to it. A call of a few milliseconds right
after the other implementation's finds its weights and buffers out of the CPU caches; the calls in
a row do not (both implementations alike).

Printed: medians in ms, speed-ups against Meta, the issue's targets, and agreement (fp32 masks equal
to Meta's pixel for pixel; with ``--dtype bfloat16`` samkit also runs in bf16 and its masks are
compared by IoU with samkit's fp32 masks).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
from common import (
    add_common_flags,
    apply_common_flags,
    command_line,
    host_speed,
    machine,
    samkit_sam,
    shared_random_weights,
    write_result,
)
from report import host_speed_text

from samkit import SamPredictor
from samkit.build import ENCODER_CONFIGS

# The targets for samkit on the 2-core CPU, by task and samkit dtype (none for one point in fp32).
TARGETS_MS = {"one_point": {"bf16": 15.0}, "boxes_64": {"bf16": 500.0, "fp32": 800.0}}


def target_ms(task: str, implementation: str) -> float | None:
    """The target for an implementation named like "samkit bf16" (None: no target)."""
    return TARGETS_MS[task].get(implementation.split()[-1]) if implementation.startswith("samkit") else None


def spread_boxes(count: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """``count`` XYXY boxes with centres spread uniformly over an HxW image and sides of 5-40% of it."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform([0, 0], [w, h], size=(count, 2))
    half = rng.uniform(0.025, 0.2, size=(count, 2)) * [w, h]
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    return np.clip(boxes, 0, [w - 1, h - 1, w - 1, h - 1]).round()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b", choices=list(ENCODER_CONFIGS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="samkit's dtype")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--in-a-row",
        type=int,
        default=10,
        help="one-point calls made after each timed one, by the same implementation (0: none)",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--note", help="a remark kept with the results (e.g. the state of a shared machine)")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    if args.in_a_row < 0:
        raise SystemExit(f"--in-a-row must be 0 or more, got {args.in_a_row}")
    apply_common_flags(args)

    from segment_anything import SamPredictor as MetaPredictor
    from skimage import data

    meta, state = shared_random_weights(args.model)
    predictors = {
        "meta fp32": MetaPredictor(meta),
        "samkit fp32": SamPredictor(samkit_sam(args.model, state)),
    }
    if args.dtype == "bfloat16":
        predictors["samkit bf16"] = SamPredictor(samkit_sam(args.model, state, torch.bfloat16))
    image = data.coffee()  # 400x600 photo shipped with scikit-image
    h, w = image.shape[:2]
    set_image_s = {}
    for name, pred in predictors.items():
        start = time.perf_counter()
        pred.set_image(image)
        set_image_s[name] = time.perf_counter() - start

    point = np.array([[0.5 * w, 0.5 * h]])
    boxes = spread_boxes(64, h, w)

    def one_point(pred) -> np.ndarray:
        masks, _, _ = pred.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True)
        return masks

    def many_boxes(pred) -> np.ndarray:
        tb = pred.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), (h, w))
        masks, _, _ = pred.predict_torch(
            point_coords=None, point_labels=None, boxes=tb, multimask_output=False
        )
        return masks

    tasks = {"one_point": one_point, "boxes_64": many_boxes}
    gauge_before = host_speed()
    times: dict[str, dict[str, list[float]]] = {t: {k: [] for k in predictors} for t in tasks}
    in_a_row: dict[str, list[float]] = {k: [] for k in predictors}  # one point, calls in a row
    masks: dict[str, dict[str, np.ndarray]] = {t: {} for t in tasks}
    for task, fn in tasks.items():
        for r in range(args.rounds + 1):  # round 0 is the warm-up
            for name, pred in predictors.items():
                start = time.perf_counter()
                out = fn(pred)
                elapsed = time.perf_counter() - start
                if r:
                    times[task][name].append(elapsed)
                masks[task][name] = np.asarray(out.cpu() if torch.is_tensor(out) else out)
                for _ in range(args.in_a_row if task == "one_point" else 0):
                    start = time.perf_counter()
                    fn(pred)
                    if r:
                        in_a_row[name].append(time.perf_counter() - start)

    gauge_after = host_speed()
    med_ms = {t: {k: 1000 * statistics.median(v) for k, v in times[t].items()} for t in tasks}
    row_ms = {k: 1000 * statistics.median(v) for k, v in in_a_row.items() if v}
    speedup = {t: {k: med_ms[t]["meta fp32"] / v for k, v in med_ms[t].items()} for t in tasks}
    agreement = {
        t: float((masks[t]["meta fp32"] == masks[t]["samkit fp32"]).mean()) for t in tasks
    }  # fraction of equal pixels over all masks of the call
    bf16_iou = None
    if "samkit bf16" in predictors:
        bf16_iou = {}
        for t in tasks:
            ref, got = (m.reshape(-1, h, w) for m in (masks[t]["samkit fp32"], masks[t]["samkit bf16"]))
            ious = [iou(a, b) for a, b in zip(ref, got)]
            bf16_iou[t] = {"mean": float(np.mean(ious)), "min": float(np.min(ious)), "masks": len(ious)}
    result = {
        "machine": machine(),
        "command": command_line("prompts.py", argv),
        "model": args.model,
        "samkit_dtype": args.dtype,
        "image": f"skimage.data.coffee() {h}x{w}",
        "point": point[0].tolist(),
        "boxes": len(boxes),
        "rounds": args.rounds,
        **({"note": args.note} if args.note else {}),
        "host_speed": {"before": gauge_before, "after": gauge_after},
        "set_image_s": set_image_s,
        "median_ms": med_ms,
        "speedup_vs_meta": speedup,
        "targets_ms": TARGETS_MS,
        "targets_met": {
            t: {k: v <= target_ms(t, k) for k, v in med_ms[t].items() if target_ms(t, k) is not None}
            for t in tasks
        },
        **(
            {
                "one_point_in_a_row": {
                    "calls_per_turn": args.in_a_row,
                    "median_ms": row_ms,
                    "speedup_vs_meta": {k: row_ms["meta fp32"] / v for k, v in row_ms.items()},
                    "targets_met": {
                        k: v <= target_ms("one_point", k)
                        for k, v in row_ms.items()
                        if target_ms("one_point", k) is not None
                    },
                }
            }
            if row_ms
            else {}
        ),
        "fp32_mask_pixel_agreement_vs_meta": agreement,
        "bf16_mask_iou_vs_fp32": bf16_iou,
    }
    labels = {"one_point": "one point, 3 masks", "boxes_64": f"{len(boxes)} boxes, one call"}
    print(f"{args.model} prompts on {result['image']}, {result['machine']}, {args.rounds} rounds, medians:")
    for t in tasks:
        print(
            f"  {labels[t]} (targets: "
            + ", ".join(f"{d} <= {v:g} ms" for d, v in TARGETS_MS[t].items())
            + "):"
        )
        for k in predictors:
            goal = target_ms(t, k)
            met = "" if goal is None else ("  meets target" if med_ms[t][k] <= goal else "  MISSES target")
            print(f"    {k:12s} {med_ms[t][k]:9.1f} ms   x{speedup[t][k]:.2f} vs Meta fp32{met}")
        line = f"    fp32 masks: {agreement[t]:.6f} of pixels equal to Meta's"
        if bf16_iou:
            line += f"; bf16 IoU vs fp32: mean {bf16_iou[t]['mean']:.4f}, min {bf16_iou[t]['min']:.4f}"
        print(line)
    if row_ms:
        print(
            f"  one point, {args.in_a_row} calls in a row after each: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in row_ms.items())
        )
    print("  set_image (once each): " + ", ".join(f"{k} {v:.2f} s" for k, v in set_image_s.items()))
    print("  host gauge before / after the rounds: " + host_speed_text(gauge_before, gauge_after))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
