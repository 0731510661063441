"""set_image (image encoder) speed: samkit fp32 and bf16 against Meta's fp32, same weights and photo.

    python benchmarks/cpu_encoder.py --model vit_b --rounds 3 [--out results.json]

The three predictors run in alternation, ``--rounds`` times each, in one process; medians and the
ratio of medians are printed. Agreement: fp32 masks are compared pixel for pixel with Meta's (a box
and a point prompt), bf16 masks by IoU against samkit's fp32 masks.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import numpy as np
import torch
from common import (
    add_common_flags,
    apply_common_flags,
    machine,
    samkit_sam,
    shared_random_weights,
    write_result,
)

from samkit import SamPredictor
from samkit.build import ENCODER_CONFIGS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b", choices=list(ENCODER_CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    add_common_flags(parser)
    args = parser.parse_args(argv)
    apply_common_flags(args)

    from segment_anything import SamPredictor as MetaPredictor
    from skimage import data

    meta, state = shared_random_weights(args.model)
    ours32 = samkit_sam(args.model, state)
    ours16 = samkit_sam(args.model, state, torch.bfloat16)
    predictors = {
        "meta fp32": MetaPredictor(meta),
        "samkit fp32": SamPredictor(ours32),
        "samkit bf16": SamPredictor(ours16),
    }
    image = data.coffee()  # 400x600 photo shipped with scikit-image
    h, w = image.shape[:2]
    prompts = [
        dict(box=np.array([0.2 * w, 0.1 * h, 0.8 * w, 0.9 * h]), multimask_output=False),
        dict(point_coords=np.array([[0.5 * w, 0.5 * h]]), point_labels=np.array([1]), multimask_output=False),
    ]
    times: dict[str, list[float]] = {k: [] for k in predictors}
    masks: dict[str, list[np.ndarray]] = {}
    for _ in range(args.rounds):
        for name, pred in predictors.items():
            start = time.perf_counter()
            pred.set_image(image)
            times[name].append(time.perf_counter() - start)
            masks[name] = [pred.predict(**p)[0] for p in prompts]
    med = {k: statistics.median(v) for k, v in times.items()}
    same = float(np.mean([(a == b).mean() for a, b in zip(masks["meta fp32"], masks["samkit fp32"])]))
    ious = [
        float((a & b).sum() / max((a | b).sum(), 1))
        for a, b in zip(masks["samkit fp32"], masks["samkit bf16"])
    ]
    result = {
        "command": "python benchmarks/cpu_encoder.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "model": args.model,
        "image": f"skimage.data.coffee() {h}x{w}",
        "rounds": args.rounds,
        "median_s": med,
        "all_s": times,
        "speedup_vs_meta": {k: med["meta fp32"] / v for k, v in med.items()},
        # Each round's Meta time over the same round's samkit time (neighbours in time), then the
        # median: less sensitive to load that comes and goes than the ratio of medians.
        "paired_speedup_median": {
            k: statistics.median(m / t for m, t in zip(times["meta fp32"], v)) for k, v in times.items()
        },
        "fp32_mask_pixel_agreement_vs_meta": same,
        "bf16_mask_iou_vs_fp32": ious,
    }
    print(f"{args.model} set_image on {result['machine']}, {args.rounds} rounds, medians:")
    for k in predictors:
        spread = f"{min(times[k]):.2f}-{max(times[k]):.2f}"
        print(
            f"  {k:12s} {med[k]:7.2f} s (range {spread})  x{result['speedup_vs_meta'][k]:.2f} vs Meta fp32"
            f" (paired rounds: x{result['paired_speedup_median'][k]:.2f})"
        )
    print(
        f"  fp32 masks: {same:.6f} of pixels equal to Meta's; bf16 mask IoU vs fp32: {', '.join(f'{i:.4f}' for i in ious)}"
    )
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
