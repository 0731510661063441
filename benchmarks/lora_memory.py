"""Peak memory and images/s of fine-tuning vit_b at 1024: decoder-only, encoder LoRA, full encoder.

    python benchmarks/lora_memory.py [--model vit_b] [--batch-size 2] [--steps 3] [--amp bf16] \\
        [--arms decoder_only,lora_r4,lora_r4_gc,lora_r16,lora_r16_gc,full,full_gc] [--out results.json]

Each arm runs ``samkit.training.train.train`` in a fresh subprocess (random weights, box prompts,
generated COCO shapes at 480x640, ``--steps`` optimizer steps of ``--batch-size`` images, no data-loader
workers, no evaluation): ``decoder_only`` is the seed's recipe (image and prompt encoders frozen);
``lora_r<R>`` adds LoRA of rank R on the encoder blocks' qkv and proj (``model.lora``);
``full`` trains the image encoder in full (freeze: [prompt_encoder]); ``_gc`` adds
``model.grad_checkpointing`` (the encoder blocks' activations recomputed in the backward pass).
Reported per arm: trainable parameters, the peak resident set of the process (``ru_maxrss``
from ``wait4``, so the child's own peak) and that peak minus the peak of a process that only built the
model (the training's own memory), and images/s: the median over the steps after the first (each
step's figure from ``metrics.jsonl``). The host's load (``os.getloadavg``) is recorded before and after:
the project's 2-core machine is shared, so absolute times vary; memory does not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARMS = {
    "decoder_only": {},
    "lora_r4": {"lora": 4},
    "lora_r4_gc": {"lora": 4, "gc": True},
    "lora_r16": {"lora": 16},
    "lora_r16_gc": {"lora": 16, "gc": True},
    "full": {"full": True},
    "full_gc": {"full": True, "gc": True},
}

CHILD = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from samkit.training.config import config_from_dict
cfg = json.loads({cfg!r})
if cfg.get("build_only"):
    from samkit import build_model
    from samkit.fast import accelerate
    accelerate(build_model(cfg["model"]["type"]))
else:
    from samkit.training.train import train
    train(config_from_dict(cfg))
"""


def run_child(cfg: dict, threads: int) -> int:
    """Run one arm in a subprocess; returns its peak resident set in KiB."""
    code = CHILD.format(root=str(ROOT), threads=threads, cfg=json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(
            f"exit status {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}"
        )
    return usage.ru_maxrss


def arm_config(name: str, spec: dict, data: tuple[str, str], work: Path, args: argparse.Namespace) -> dict:
    from common import QUIET_TRAINING  # benchmarks/ is on sys.path (main)

    model: dict = {"type": args.model, "checkpoint": None, "freeze": ["image_encoder", "prompt_encoder"]}
    if spec.get("lora"):
        model["lora"] = {
            "rank": spec["lora"],
            "alpha": float(spec["lora"]),
            "targets": ["encoder_qkv", "encoder_proj"],
        }
    if spec.get("full"):
        model["freeze"] = ["prompt_encoder"]
    model["grad_checkpointing"] = bool(spec.get("gc"))
    return {
        "model": model,
        "train_data": {"type": "coco", "data_dir": data[0], "annotation_path": data[1], "max_objects": 8, "num_workers": 0},
        "work_dir": str(work / name),
        "epochs": 1,
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "amp": args.amp,
        **QUIET_TRAINING,
        "seed": 0,
    }  # fmt: skip


def trainable_parameters(cfg: dict) -> int:
    from samkit.build import build_model
    from samkit.training.config import config_from_dict
    from samkit.training.params import freeze_parameters
    from samkit.training.setup import add_lora_adapters

    parsed = config_from_dict(cfg)
    sam = build_model(parsed.model.type)
    freeze_parameters(sam, parsed.model.freeze)
    add_lora_adapters(parsed, sam)
    return sum(p.numel() for p in sam.parameters() if p.requires_grad)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import command_line, machine, write_result

    from tests.datagen import make_coco_dataset

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--amp", default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="lora_memory_"))
    image_dir, ann = make_coco_dataset(
        tmp / "data", num_images=args.batch_size * args.steps + 2, seed=0, size=(480, 640)
    )
    data = (str(image_dir), str(ann))
    load_before = os.getloadavg()
    base_kib = run_child({"build_only": True, "model": {"type": args.model}}, args.threads)
    rows = {}
    for name in args.arms.split(","):
        cfg = arm_config(name, ARMS[name], data, tmp, args)
        try:
            peak_kib = run_child(cfg, args.threads)
        except RuntimeError as err:  # e.g. killed for memory: recorded, the other arms still run
            rows[name] = {"trainable_parameters": trainable_parameters(cfg), "error": str(err)}
            print(name, rows[name], flush=True)
            continue
        lines = (tmp / name / "metrics.jsonl").read_text().splitlines()
        speeds = [r["images_per_s"] for r in map(json.loads, lines) if r["kind"] == "train"]
        rows[name] = {
            "trainable_parameters": trainable_parameters(cfg),
            "peak_rss_mib": round(peak_kib / 1024, 1),
            "peak_over_built_model_mib": round((peak_kib - base_kib) / 1024, 1),
            "images_per_s_median": round(statistics.median(speeds[1:] or speeds), 3),
            "images_per_s_steps": [round(s, 3) for s in speeds],
        }
        print(name, json.dumps(rows[name]), flush=True)
    result = {
        "command": command_line("lora_memory.py", argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "model": f"{args.model}, random weights, 1024 frame",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "amp": args.amp,
        "built_model_peak_rss_mib": round(base_kib / 1024, 1),
        "rows": rows,
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
