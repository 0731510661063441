"""Automatic mask generation: samkit against Meta's generator, same weights, same photo.

    python benchmarks/amg.py --model vit_b --trained --rounds 3 [--out results.json]

Both generators run with Meta's default thresholds, in alternation, ``--rounds`` times each, in one
process. Printed: median seconds per photo, the ratio, the record counts, how many of Meta's records
samkit's output holds identically (matched by prompt point and predicted IoU), and the share of prompts
whose mask pixels samkit computed (it skips prompts with no candidate above ``pred_iou_thresh``).
``--trained`` runs both on the vit_b whose decoder is trained briefly to segment superpixels and
calibrated (benchmarks/trained_decoder.py) so that hundreds of records survive Meta's default
thresholds on the photo. Random weights keep 0 or 1 records, whatever the thresholds: a time without
records measures neither the post-processing nor the agreement, so a run whose Meta generator keeps
fewer than ``--min-records`` (100) records stops after Meta's first call and writes nothing
(``--min-records 0`` runs it anyway; the result then says ``records_below_minimum`` and report.py
does not show it as a speed row). ``--threads`` sets torch's thread count for both. Per-round ratios
(Meta's time over samkit's in the same round) are recorded with the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

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

from samkit.amg import SamAutomaticMaskGenerator
from samkit.build import ENCODER_CONFIGS


def iou_threshold_for_share(model, image: np.ndarray, points_per_side: int, share: float) -> float:
    """The predicted-IoU threshold that the best candidate of ``share`` of the grid's prompts exceeds."""
    if not 0.0 < share <= 1.0:
        raise SystemExit(f"--prompts-passing must be in (0, 1], got {share}")
    from samkit import SamPredictor

    predictor = SamPredictor(model)
    predictor.set_image(image)
    h, w = image.shape[:2]
    grid = SamAutomaticMaskGenerator(model, points_per_side=points_per_side).point_grids[0] * [w, h]
    coords = predictor.transform.apply_coords_torch(torch.as_tensor(grid[:, None, :]), (h, w))
    labels = torch.ones(len(grid), 1, dtype=torch.int, device=model.device)
    ious = []
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder((coords.to(model.device), labels), None, None)
        pe = model.prompt_encoder.get_dense_pe()
        for s in range(0, len(grid), 64):
            _, iou = model.mask_decoder(predictor.features, pe, sparse[s : s + 64], dense[s : s + 64], True)
            ious.append(iou.float())
    best = torch.cat(ious).amax(dim=1).sort(descending=True).values
    k = max(1, round(share * len(best)))
    # Halfway between the k-th best and the next: exactly k prompts pass.
    return float(best[k - 1] + best[k]) / 2 if k < len(best) else float(best[-1]) - 1e-3


def generator_at_rev(rev: str):
    """samkit's SamAutomaticMaskGenerator class as samkit/amg.py and its helpers were at ``rev``."""
    import importlib.util
    import subprocess
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    folder = Path(tempfile.mkdtemp())
    modules = {}
    for name, rel in (("amg_utils_at_rev", "samkit/utils/amg.py"), ("amg_at_rev", "samkit/amg.py")):
        source = subprocess.run(
            ["git", "show", f"{rev}:{rel}"], cwd=root, check=True, capture_output=True, text=True
        ).stdout
        # Its helpers as they were then too (samkit/utils/amg.py of that commit), the rest as now.
        source = source.replace("from .utils.amg import", "from amg_utils_at_rev import")
        (folder / f"{name}.py").write_text(source.replace("from .", "from samkit."))
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    module = modules["amg_at_rev"]
    return module.SamAutomaticMaskGenerator


MIN_RECORDS = 100  # a benchmark row must compare at least this many of Meta's records


def match_records(ref: list[dict], got: list[dict]) -> dict[str, int]:
    """Counts of Meta's records with a samkit record for the same prompt point and predicted IoU
    (within 1e-4): ``matched``; of those, equal segmentation, ``segmentation``; and equal segmentation,
    bbox, area and crop box with stability score within 1e-4, ``record``."""
    by_point: dict[tuple, list[dict]] = {}
    for g in got:
        by_point.setdefault(tuple(g["point_coords"][0]), []).append(g)
    counts = {"matched": 0, "segmentation": 0, "record": 0}
    for r in ref:
        candidates = by_point.get(tuple(r["point_coords"][0]), [])
        close = [g for g in candidates if abs(g["predicted_iou"] - r["predicted_iou"]) < 1e-4]
        if not close:
            continue
        g = min(close, key=lambda g: abs(g["predicted_iou"] - r["predicted_iou"]))
        candidates.remove(g)
        counts["matched"] += 1
        if np.array_equal(g["segmentation"], r["segmentation"]):
            counts["segmentation"] += 1
            same = all(g[k] == r[k] for k in ("bbox", "area", "crop_box"))
            counts["record"] += same and abs(g["stability_score"] - r["stability_score"]) < 1e-4
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b", choices=list(ENCODER_CONFIGS))
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--relaxed", action="store_true", help="pred_iou_thresh and stability_score_thresh 0")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="samkit's dtype")
    parser.add_argument(
        "--prompts-passing",
        type=float,
        default=None,
        help="set pred_iou_thresh (for both generators) so that this share of the grid's prompts has a "
        "candidate above it, from samkit's predictions on the photo (samkit computes only those prompts' "
        "masks)",
    )
    parser.add_argument(
        "--trained",
        action="store_true",
        help="the vit_b with a briefly trained (superpixels), calibrated decoder (benchmarks/trained_decoder.py, cached)",
    )
    parser.add_argument(
        "--trained-file",
        default=None,
        help="with --trained: load this saved benchmark decoder (a file of benchmarks/.cache/trained_decoder "
        "carried to another machine) instead of looking it up or training it",
    )
    parser.add_argument("--device", default="cpu", help="run both generators on this device (e.g. cuda)")
    parser.add_argument(
        "--compare-rev",
        default=None,
        help="also run samkit's generator as it was at this git revision (samkit/amg.py and "
        "samkit/utils/amg.py of that commit, the rest of the package as now), a third generator in "
        "the same rounds",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both")
    parser.add_argument(
        "--min-records",
        type=int,
        default=MIN_RECORDS,
        help=f"stop, writing nothing, when Meta's generator keeps fewer records than this ({MIN_RECORDS}; "
        "random weights keep 0 or 1): such a time measures no post-processing and no agreement. 0 runs "
        "any model, and the result is marked records_below_minimum",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--note", help="a remark kept with the results (e.g. the state of a shared machine)")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    apply_common_flags(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    from segment_anything import SamAutomaticMaskGenerator as MetaGenerator
    from skimage import data

    meta, state = shared_random_weights(args.model)
    trained_info = None
    if args.trained_file and not args.trained:
        raise SystemExit("--trained-file goes with --trained")
    if args.trained:
        from trained_decoder import load_saved, trained_state

        if args.model != "vit_b":
            raise SystemExit("--trained: only vit_b")
        state, trained_info = load_saved(Path(args.trained_file)) if args.trained_file else trained_state()
        meta.load_state_dict(state)
    device = torch.device(args.device)
    meta.to(device)
    ours = samkit_sam(args.model, state, getattr(torch, args.dtype)).to(device)
    kwargs = dict(points_per_side=args.points_per_side)
    if args.relaxed:
        kwargs.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    image = data.coffee()  # 400x600 photo shipped with scikit-image
    if args.prompts_passing is not None:
        kwargs["pred_iou_thresh"] = iou_threshold_for_share(
            ours, image, args.points_per_side, args.prompts_passing
        )
    generators = {"meta": MetaGenerator(meta, **kwargs), "samkit": SamAutomaticMaskGenerator(ours, **kwargs)}
    if args.compare_rev:
        generators[f"samkit@{args.compare_rev}"] = generator_at_rev(args.compare_rev)(ours, **kwargs)
    # samkit computes mask pixels only for prompts with a candidate above pred_iou_thresh: count them,
    # since the saving depends on how many pass (random weights are not a trained model).
    counts = {"prompts": 0, "upscaled": 0}
    above_iou = ours.mask_decoder.forward_above_iou

    def counting(*a, **k):
        out = above_iou(*a, **k)
        counts["prompts"] += a[2].shape[0]
        counts["upscaled"] += len(torch.unique(out[2] // ours.mask_decoder.num_multimask_outputs))
        return out

    ours.mask_decoder.forward_above_iou = counting
    times: dict[str, list[float]] = {k: [] for k in generators}
    records: dict[str, list[dict]] = {}
    gauge_before = host_speed()
    for round_index in range(args.rounds):
        for name, gen in generators.items():
            start = time.perf_counter()
            records[name] = gen.generate(image)
            times[name].append(time.perf_counter() - start)
            if round_index == 0 and name == "meta" and len(records["meta"]) < args.min_records:
                if args.min_records:
                    print(
                        f"error: Meta's generator kept {len(records['meta'])} records, fewer than "
                        f"--min-records {args.min_records}: this model measures no post-processing and no "
                        "agreement (use --trained; --min-records 0 runs it anyway); nothing written",
                        file=sys.stderr,
                    )
                    return 2
    gauge_after = host_speed()
    med = {k: statistics.median(v) for k, v in times.items()}
    ref, got = records["meta"], records["samkit"]
    # Nothing compared is no agreement: None (n/a), never a count or share that reads as one.
    matched = match_records(ref, got) if ref else None
    identical = matched["segmentation"] if matched else None
    ratios = [m / s for m, s in zip(times["meta"], times["samkit"])]
    previous = {}
    for name in generators:
        if name.startswith("samkit@"):
            previous[name] = {
                "median_s": med[name],
                "round_ratios": [m / s for m, s in zip(times["meta"], times[name])],
                "records": len(records[name]),
                "identical_records": match_records(ref, records[name]) if ref else None,
            }
    result = {
        "command": command_line("amg.py", argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "samkit_dtype": args.dtype,
        "image": f"skimage.data.coffee() {image.shape[0]}x{image.shape[1]}",
        "generator_kwargs": kwargs,
        "rounds": args.rounds,
        **({"note": args.note} if args.note else {}),
        "host_speed": {"before": gauge_before, "after": gauge_after},
        "median_s": med,
        "speedup": med["meta"] / med["samkit"],
        "records": {"meta": len(ref), "samkit": len(got)},
        "identical_segmentations": identical,
        "identical_records": matched,
        "round_s": times,
        "round_ratios": ratios,
        "median_round_ratio": statistics.median(ratios),
        "prompts_upscaled": counts["upscaled"] / counts["prompts"] if counts["prompts"] else None,
        "min_records": args.min_records,
        "records_below_minimum": len(ref) < MIN_RECORDS,
    }
    print(f"AMG {args.model} {kwargs} on {result['image']}, {result['machine']}, {args.rounds} round(s):")
    print(f"  Meta   {med['meta']:7.1f} s   {len(ref)} masks")
    print(f"  samkit {med['samkit']:7.1f} s   {len(got)} masks ({args.dtype})   x{result['speedup']:.2f}")
    if matched is None:
        print("  identical segmentations: n/a (Meta's generator kept no record)")
    else:
        print(f"  identical segmentations (matched by point and IoU): {identical} of {len(ref)}; {matched}")
    upscaled = result["prompts_upscaled"]
    print(
        "  prompts whose masks samkit computed (a candidate above pred_iou_thresh): "
        + ("n/a (no prompt reached the decoder)" if upscaled is None else f"{upscaled:.1%}")
    )
    if result["records_below_minimum"]:
        print(f"  NOT A MEASUREMENT of AMG: {len(ref)} records, fewer than {MIN_RECORDS}")
    print(f"  per-round ratios {ratios}")
    if trained_info is not None:
        result["trained_model"] = trained_info
    if previous:
        result["previous_samkit"] = previous
        for name, p in previous.items():
            print(
                f"  {name}: {p['median_s']:.1f} s, {p['records']} masks, per-round ratios {p['round_ratios']}"
            )
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
