"""LoRA on the image encoder against decoder-only fine-tuning where the frozen encoder is the bottleneck.

    python benchmarks/lora_bottleneck.py --seed 4 --arms decoder_only --out /tmp/d4.json   # defaults: the headline run's
    python benchmarks/lora_bottleneck.py --data shapes --steps 1000 --alpha 2 --out /tmp/shapes.json
    python benchmarks/lora_bottleneck.py --steps 40 --out /tmp/quick.json
    python benchmarks/lora_bottleneck.py --combine a.json b.json --out c.json   # arms run side by side

A vit_tiny SAM (2-block, 64-wide encoder; 256x256 frame) with random weights is the base checkpoint.
Each arm fine-tunes that same base with samkit's training loop (``samkit.training.train.train``, box
prompts) on the same generated COCO-format pictures for the same number of steps, then scores the
held-out split with ``eval.py``'s box protocol:

- ``decoder_only``: the seed's recipe (image and prompt encoders frozen, the mask decoder trains);
- ``encoder_lora_r<R>_alpha<A>``: the same, plus LoRA (``peft``) on every linear layer of the encoder
  blocks (qkv, proj, lin1, lin2);
- ``full_encoder``: the image encoder trains in full too (what LoRA approximates).

Two kinds of pictures (``--data``): ``shapes``, tests/datagen.py's flat-coloured shapes, which the random
encoder's features already tell apart by colour (a decoder on them alone does well); ``stripes``, the
same shapes each filled with stripes (its own period, angle and phase) of two colours whose mean is the
flat background's colour, so that an object differs from the background and from its neighbours by
texture only: what tells them apart is a non-linear function of each patch (the stripes' energy and
orientation), which the encoder's MLPs can learn and the decoder, reading the frozen features mostly
linearly, hardly can.

Reported per arm: val mIoU (1024 frame and original size), trainable parameters, the size of
``sam_final.pth`` and of the adapter file, wall time; for the LoRA arm also whether the unmerged (peft)
model of the last training checkpoint and the merged plain checkpoint give the same masks on the
val images, and whether base + adapter file (``samkit.lora.apply_adapter``) is ``sam_final.pth`` bit
for bit. Runs on ``--threads`` torch threads (default 2); the host's load is recorded. ``--seed`` is the
training seed (LoRA's initial A, the batch order); the base weights and the data stay the same.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from samkit import build_model  # noqa: E402
from samkit.lora import ADAPTER_NAME, apply_adapter  # noqa: E402
from samkit.training.checkpointing import latest_checkpoint  # noqa: E402
from samkit.training.config import config_from_dict  # noqa: E402
from samkit.training.train import train  # noqa: E402
from tests.datagen import _box_area, _rle, make_coco_splits  # noqa: E402
from tests.shapes import make_shapes_image  # noqa: E402

FRAME = 256
ENCODER_TARGETS = ["encoder_qkv", "encoder_proj", "encoder_mlp"]


def stripes_image(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``make_shapes_image``'s shapes, each filled with stripes (its own period of 3-6 px, angle and
    phase) of two colours whose mean is the flat background's colour: an object differs from the
    background and from its neighbours by texture only, not by its mean colour."""
    _, masks = make_shapes_image(rng, size)
    h, w = size
    mean = rng.uniform(70, 185, 3)
    image = np.broadcast_to(mean, (h, w, 3)).copy()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    for mask in masks:
        angle, period, phase = rng.uniform(0, np.pi), rng.uniform(3, 6), rng.uniform(0, 2 * np.pi)
        wave = np.cos(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period + phase)
        offset = rng.normal(0, 1, 3)
        offset *= rng.uniform(45, 65) / np.linalg.norm(offset)
        image[mask] = mean + np.sign(wave[mask])[:, None] * offset
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    return image, masks


def make_stripes_splits(root: Path, train_images: int, val_images: int) -> dict[str, tuple[str, str]]:
    """COCO-format train (seed 1) and val (seed 2) splits of :func:`stripes_image` pictures (96x128)."""
    from PIL import Image

    splits = {}
    for split, count, seed in (("train", train_images, 1), ("val", val_images, 2)):
        rng = np.random.default_rng(seed)
        image_dir = root / split / f"{split}2017"
        image_dir.mkdir(parents=True)
        images, annotations = [], []
        for i in range(count):
            image, masks = stripes_image(rng, (96, 128))
            Image.fromarray(image).save(image_dir / f"{i:012d}.png")
            images.append({"id": i, "file_name": f"{i:012d}.png", "height": 96, "width": 128})
            for mask in masks:
                rle = _rle(mask)
                bbox, area = _box_area(rle)
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": 1,
                                    "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": 0})  # fmt: skip
        ann = root / split / "annotations" / f"instances_{split}2017.json"
        ann.parent.mkdir()
        categories = [{"id": 1, "name": "shape", "supercategory": "shape"}]
        ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        splits[split] = (str(image_dir), str(ann))
    return splits


def arm_config(name: str, data: dict, work: Path, checkpoint: str, args: argparse.Namespace) -> dict:
    # datagen's shapes: the last two images have no usable object; every stripes image has objects
    usable = args.train_images - (2 if args.data == "shapes" else 0)
    steps_per_epoch = usable // args.batch_size
    epochs = max(1, -(-args.steps // steps_per_epoch))
    cfg: dict = {
        "model": {"type": "vit_tiny", "checkpoint": checkpoint, "image_size": FRAME},
        "train_data": {"type": "coco", "data_dir": data["train"][0], "annotation_path": data["train"][1],
                       "max_objects": 8, "num_workers": 0},
        "eval_data": {"type": "coco", "data_dir": data["val"][0], "annotation_path": data["val"][1],
                      "max_objects": 20, "num_workers": 0},
        "optimizer": {"lr": args.lr, "weight_decay": 1e-4},
        "scheduler": {"warmup_steps": 10, "decay": "cosine"},
        "work_dir": str(work / name),
        "epochs": epochs,
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "eval_every": 0,
        "log_every": 10,
        "tensorboard": False,
        "progress": False,
        "seed": args.seed,
    }  # fmt: skip
    if name.startswith("encoder_lora"):
        cfg["model"]["lora"] = {"rank": args.rank, "alpha": args.alpha, "targets": ENCODER_TARGETS}
    elif name == "full_encoder":
        cfg["model"]["freeze"] = ["prompt_encoder"]
    return cfg


def evaluate_checkpoint(cfg: dict, checkpoint: str) -> dict:
    from samkit.training.evaluate import run

    eval_cfg = {**cfg, "model": {"type": "vit_tiny", "checkpoint": checkpoint, "image_size": FRAME}}
    eval_cfg["eval_output"] = str(Path(cfg["work_dir"]) / "eval.json")
    eval_cfg["progress"] = False
    return run(config_from_dict(eval_cfg))


def merged_equals_unmerged(cfg: dict, work: Path, data: dict) -> dict:
    """The unmerged peft model (last training checkpoint) against sam_final.pth on the val images' boxes."""
    from samkit.predictor import SamPredictor
    from samkit.training.setup import add_lora_adapters
    from samkit.utils.image import load_image

    unmerged = build_model("vit_tiny", image_size=FRAME)
    add_lora_adapters(config_from_dict(cfg), unmerged)
    unmerged.load_state_dict(torch.load(latest_checkpoint(str(work)), weights_only=True)["model"])
    merged = build_model("vit_tiny", str(work / "sam_final.pth"))
    annotations = json.loads(Path(data["val"][1]).read_text())
    names = {im["id"]: im["file_name"] for im in annotations["images"]}
    pixels = same = 0
    max_logit_diff = 0.0
    for image_id, file_name in names.items():
        boxes = [
            a["bbox"] for a in annotations["annotations"] if a["image_id"] == image_id and not a["iscrowd"]
        ]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in boxes if w > 0 and h > 0]
        if not boxes:
            continue
        image = load_image(os.path.join(data["val"][0], file_name))
        logits = []
        for sam in (unmerged, merged):
            predictor = SamPredictor(sam.eval())
            predictor.set_image(image)
            box_t = predictor.transform.apply_boxes_torch(
                torch.tensor(boxes, dtype=torch.float32), image.shape[:2]
            )
            out, _, _ = predictor.predict_torch(
                None, None, boxes=box_t, multimask_output=False, return_logits=True
            )
            logits.append(out)
        pixels += logits[0].numel()
        same += int(((logits[0] > 0) == (logits[1] > 0)).sum())
        max_logit_diff = max(max_logit_diff, float((logits[0] - logits[1]).abs().max()))
    return {"mask_pixels": pixels, "same_mask_pixels": same, "max_abs_logit_diff": max_logit_diff}


def combine(paths: list[str], out: str) -> int:
    """One result from several runs of this script (arms run as separate processes side by side, on
    the same generated data and base weights: both are seeded); each arm keeps its own command."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    result = {k: v for k, v in runs[0].items() if k not in ("arms", "settings", "command")}
    result["command"] = " ; ".join(r["command"] for r in runs)
    result["load_before"] = [max(r["load_before"][i] for r in runs) for i in range(3)]
    result["load_after"] = [max(r["load_after"][i] for r in runs) for i in range(3)]
    result["arms"] = {}
    several_seeds = len({r["settings"]["seed"] for r in runs}) > 1
    for r in runs:
        for arm, row in r["arms"].items():
            settings = r["settings"]
            if (
                arm.startswith("encoder_lora") and "_alpha" not in arm
            ):  # results from before --alpha (2 x rank)
                settings = {**settings, "alpha": settings.get("alpha", 2.0 * settings["rank"])}
                arm = f"{arm}_alpha{settings['alpha']:g}"
            if several_seeds:
                arm = f"{arm} seed {settings['seed']}"
            result["arms"][arm] = {**row, "settings": settings}
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=202)
    parser.add_argument("--val-images", type=int, default=22)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--alpha", type=float, default=8.0, help="LoRA alpha: the adapters' output x alpha / rank"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--data", choices=["shapes", "stripes"], default="stripes",
        help="shapes: tests/datagen.py's flat-coloured shapes; stripes: the same shapes told apart by texture only",
    )  # fmt: skip
    parser.add_argument("--arms", default="decoder_only,encoder_lora,full_encoder")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_bottleneck.json"))
    parser.add_argument(
        "--base", help="start every arm from this vit_tiny checkpoint (default: random weights)"
    )
    parser.add_argument(
        "--combine", nargs="+", metavar="JSON", help="join the arms of results of this script"
    )
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="lora_bottleneck_"))
    make = make_coco_splits if args.data == "shapes" else make_stripes_splits
    data = make(tmp / "data", train_images=args.train_images, val_images=args.val_images)
    torch.manual_seed(0)
    base = tmp / "random_vit_tiny_256.pth"
    torch.save(build_model("vit_tiny", image_size=FRAME).state_dict(), base)
    if args.base is not None:  # e.g. the decoder_only arm's sam_final.pth: its encoder is still random
        base = Path(args.base)

    arms: dict[str, dict] = {}
    for arm in args.arms.split(","):
        name = f"encoder_lora_r{args.rank}_alpha{args.alpha:g}" if arm == "encoder_lora" else arm
        cfg = arm_config(name, data, tmp, str(base), args)
        start = time.perf_counter()
        result = train(config_from_dict(cfg))
        seconds = time.perf_counter() - start
        work = Path(cfg["work_dir"])
        metrics = evaluate_checkpoint(cfg, str(work / "sam_final.pth"))
        sam = build_model("vit_tiny", str(base))
        from samkit.training.params import freeze_parameters
        from samkit.training.setup import add_lora_adapters

        freeze_parameters(sam, config_from_dict(cfg).model.freeze)
        add_lora_adapters(config_from_dict(cfg), sam)
        row = {
            "steps": result["step"],
            "val_miou_1024": metrics["miou_1024"],
            "val_miou_original": metrics["miou_original"],
            "val_objects": metrics.get("objects_1024"),
            "trainable_parameters": sum(p.numel() for p in sam.parameters() if p.requires_grad),
            "sam_final_bytes": (work / "sam_final.pth").stat().st_size,
            "train_seconds": round(seconds, 1),
        }
        if (work / ADAPTER_NAME).exists():
            row["adapter_bytes"] = (work / ADAPTER_NAME).stat().st_size
            lora_params = sum(p.numel() for n, p in sam.named_parameters() if ".lora_" in n)
            row["lora_parameters"] = lora_params
            merged = build_model("vit_tiny", str(base))
            apply_adapter(merged, work / ADAPTER_NAME)
            final = torch.load(work / "sam_final.pth", weights_only=True)
            row["base_plus_adapter_is_sam_final"] = all(
                torch.equal(final[k], v) for k, v in merged.state_dict().items()
            )
            row["merged_vs_unmerged"] = merged_equals_unmerged(cfg, work, data)
        arms[name] = row
        print(name, json.dumps(row), flush=True)

    out = {
        "command": "python benchmarks/lora_bottleneck.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
        "date": time.strftime("%Y-%m-%d"),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "model": f"vit_tiny, random weights (seed 0), {FRAME} frame"
        + (f"; every arm starts from {args.base}" if args.base else ""),
        "data": (
            f"generated COCO shapes: {args.train_images} train / {args.val_images} val images (tests/datagen.py)"
            if args.data == "shapes"
            else f"generated COCO striped shapes (told apart by texture only, not by mean colour): "
            f"{args.train_images} train / {args.val_images} val images (stripes_image)"
        ),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "arms": arms,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
