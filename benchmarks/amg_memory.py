"""Peak memory (RSS) of automatic mask generation on a large image with crop layers.

Each case runs in a fresh child process, which reports its resident set size after building the model
and reading the image (``base``) and its peak after the run (``peak``, VmHWM reset at ``base``): ``peak - base``
is what AMG itself needed. Cases: the generator returning RLEs (the library), the same with
``min_mask_region_area`` (hole/island clean-up, which decodes masks), and ``samkit amg`` writing
Meta's PNG folder with the overlay picture (the command line). The filters are relaxed
(``pred_iou_thresh 0, stability_score_thresh 0, box_nms_thresh 1``) so that most candidate masks
survive: memory that grows with the number of masks x H x W shows. The model: vit_tiny with random
weights (which keep almost no masks), ``--checkpoint`` vit_tiny weights, or ``--trained``: vit_b with
the briefly trained benchmark decoder (what ``make bench`` runs; a few hundred records).

    python benchmarks/amg_memory.py --trained             # 4000x3000, crop_n_layers 1, 8x8 points
    python benchmarks/amg_memory.py --width 2000 --height 1500 --tag small

Writes ``benchmarks/results/amg_memory[_TAG].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CASES = ("generator_rle", "generator_min_region", "cli_png_overlay")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    """The resident set now; also restarts the peak (VmHWM) from here where Linux allows it, so that
    loading the model (vit_b: its state dict and its parameters at once) does not hide AMG's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mib("VmRSS")


def peak_mib() -> float:
    """The peak resident set since ``rss_mib`` (or since the start where it could not be reset)."""
    peak = _status_mib("VmHWM")
    return peak if peak == peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_image(width: int, height: int, seed: int = 0):
    """A photo-sized picture: noise with a few dozen flat shapes (rectangles and discs)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image = (rng.random((height, width, 3)) * 50).astype(np.uint8)
    ys, xs = np.ogrid[:height, :width]
    for _ in range(40):
        color = rng.integers(60, 256, 3)
        cx, cy = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(min(width, height) // 30, min(width, height) // 6))
        if rng.random() < 0.5:
            image[(xs - cx) ** 2 + (ys - cy) ** 2 < r * r] = color
        else:
            image[max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + r] = color
    return image


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One case, in this (fresh) process."""
    import numpy as np
    import torch

    from samkit.build import build_model

    torch.manual_seed(0)
    image = make_image(args.width, args.height)
    settings = dict(
        points_per_side=args.points_per_side,
        points_per_batch=64,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
        crop_n_layers=args.crop_n_layers,
    )
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, model_type = args.checkpoint, "vit_tiny"
        if args.trained:
            from trained_decoder import trained_state

            checkpoint, model_type = os.path.join(tmp, "vit_b_trained.pth"), "vit_b"
            torch.save(trained_state(verbose=False)[0], checkpoint)
        elif checkpoint is None:
            checkpoint = os.path.join(tmp, "tiny.pth")
            torch.save(build_model("vit_tiny").state_dict(), checkpoint)
        if args.case == "cli_png_overlay":
            from PIL import Image

            from samkit.commands.main import main

            folder = os.path.join(tmp, "in")
            os.mkdir(folder)
            Image.fromarray(image).save(os.path.join(folder, "big.png"))
            del image
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
            import samkit.amg  # noqa: F401  (imports done before the baseline)
            import samkit.commands.amg as amg_command

            build = amg_command._build_generator
            measured: dict[str, float] = {}

            def built(*a: Any, **k: Any) -> Any:
                # The command loads the model itself: the baseline is taken once it has (vit_b's
                # weights would otherwise count as AMG's memory).
                generator = build(*a, **k)
                measured["base"] = rss_mib()
                return generator

            amg_command._build_generator = built
            start = time.perf_counter()
            argv = ["amg", "--input", folder, "--output", os.path.join(tmp, "out"), "--overlay"]
            rc = main([*argv, "--model-type", model_type, "--checkpoint", checkpoint, *flags])
            seconds = time.perf_counter() - start
            base = measured.get("base", float("nan"))
            out = os.path.join(tmp, "out", "big")
            records = len([n for n in os.listdir(out) if n.endswith(".png")]) if rc == 0 else -1
        else:
            from samkit.amg import SamAutomaticMaskGenerator

            model = build_model(model_type, checkpoint).eval()
            if args.case == "generator_min_region":
                settings["min_mask_region_area"] = 400
            generator = SamAutomaticMaskGenerator(model, output_mode="uncompressed_rle", **settings)
            base = rss_mib()
            start = time.perf_counter()
            result = generator.generate(image)
            seconds = time.perf_counter() - start
            records = len(result)
            del result
    peak = peak_mib()
    return {
        "case": args.case,
        "base_mib": round(base, 1),
        "peak_mib": round(peak, 1),
        "amg_mib": round(peak - base, 1),
        "records": records,
        "seconds": round(seconds, 1),
        "full_res_mask_mib": round(args.width * args.height / 2**20, 1),
        "_np": np.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--points-per-side", type=int, default=8)
    parser.add_argument("--crop-n-layers", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--tag", default="", help="suffix of the results file")
    parser.add_argument(
        "--checkpoint",
        help="vit_tiny weights (default: random). The tests' shapes-trained vit_tiny "
        "(.pytest_cache/d/samkit-trained-models/shapes_model/*/model.pt) keeps many more masks",
    )
    parser.add_argument(
        "--trained",
        action="store_true",
        help="vit_b with the briefly trained benchmark decoder (benchmarks/trained_decoder.py, cached): "
        "random weights keep almost no masks, so memory that grows with the masks would not show",
    )
    parser.add_argument("--code", help="what code was measured (e.g. a commit), recorded in the results")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child's case
    args = parser.parse_args()
    if args.case:
        print(json.dumps(child(args)))
        return

    import torch

    rows = []
    for case in args.cases:
        command = [
            sys.executable, __file__, "--case", case, "--width", str(args.width), "--height", str(args.height),
            "--points-per-side", str(args.points_per_side), "--crop-n-layers", str(args.crop_n_layers),
        ] + (["--checkpoint", args.checkpoint] if args.checkpoint else []) + (["--trained"] if args.trained else [])  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{case} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row.pop("_np", None)
        rows.append(row)
        print(
            f"{case:22s} records {row['records']:5d}  base {row['base_mib']:7.1f} MiB  peak {row['peak_mib']:7.1f} "
            f"MiB  AMG +{row['amg_mib']:7.1f} MiB  ({row['seconds']} s)",
            flush=True,
        )
    result = {
        "benchmark": "amg_memory",
        "image": f"{args.width}x{args.height}",
        "points_per_side": args.points_per_side,
        "crop_n_layers": args.crop_n_layers,
        "model": (
            "vit_b, briefly trained decoder (benchmarks/trained_decoder.py), filters relaxed"
            if args.trained
            else f"vit_tiny, {'weights ' + args.checkpoint if args.checkpoint else 'random weights'}, filters relaxed"
        ),
        "code": args.code or "",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"amg_memory{'_' + args.tag if args.tag else ''}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
