"""Short epochs with data-loader workers: wall time of whole training runs, samkit now against an older revision.

    python benchmarks/loader_epochs.py --rev 0a1b2c3 [--workers 2] [--epochs 10] [--rounds 3] [--out results.json]

Since the training DataLoader lives for the whole run (``persistent_workers``; each epoch's batches and
epoch number reach the running workers), a new epoch no longer starts new worker processes that re-read
the annotations. This benchmark measures what that saves where epochs are short: ``train()`` on 16
generated COCO images (``tests/datagen.make_coco_splits``), vit_tiny at the 1024 frame, batch 4,
``--epochs`` epochs, ``cache_embeddings: true`` (the encoder runs in the first epoch only, so later
epochs are mostly data loading and the decoder), ``--workers`` workers. Each round runs the current
tree and ``--rev`` (checked out with ``git worktree`` into a temporary folder) in alternation, each
in a fresh process; reported: the median seconds per run of each, and the median of the per-round
ratios (old / new). Both runs' losses are compared (they must be equal: the change moves no number).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_result

ROOT = Path(__file__).resolve().parent.parent


def child(tree: str, data: str, work: str, workers: int, epochs: int) -> None:
    """One training run with the samkit of ``tree`` (first on this process's PYTHONPATH)."""
    import torch

    import samkit
    from samkit.training.config import config_from_dict
    from samkit.training.train import train

    assert Path(samkit.__file__).resolve().is_relative_to(Path(tree).resolve()), samkit.__file__
    coco = json.loads(data)
    cfg = {
        "model": {"type": "vit_tiny"},
        "train_data": {"type": "coco", "data_dir": coco["train"][0], "annotation_path": coco["train"][1],
                       "max_objects": 4, "num_workers": workers},
        "optimizer": {"lr": 1e-4}, "scheduler": {"warmup_steps": 0}, "work_dir": work, "epochs": epochs,
        "batch_size": 4, "amp": "off", "eval_every": 0, "log_every": 1, "tensorboard": False, "progress": False,
        "seed": 0, "cache_embeddings": True,
    }  # fmt: skip
    torch.manual_seed(0)
    start = time.perf_counter()
    train(config_from_dict(cfg))
    print(json.dumps({"seconds": time.perf_counter() - start}))


def losses(work: Path) -> list[float]:
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the older revision to compare with")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # tree, data json, work dir
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child, workers=args.workers, epochs=args.epochs)
        return 0

    sys.path.insert(0, str(ROOT))
    from tests.datagen import make_coco_splits

    tmp = Path(tempfile.mkdtemp(prefix="loader_epochs_"))
    old_tree = tmp / "old"
    subprocess.run(
        ["git", "worktree", "add", "-q", "--detach", str(old_tree), args.rev], cwd=ROOT, check=True
    )
    try:
        data = json.dumps(make_coco_splits(tmp / "coco", train_images=16, val_images=2))
        trees = {"new": str(ROOT), f"old ({args.rev})": str(old_tree)}
        seconds: dict[str, list[float]] = {k: [] for k in trees}
        run_losses: dict[str, list[float]] = {}
        for r in range(args.rounds):
            for name, tree in trees.items():
                work = tmp / f"{name.split()[0]}_{r}"
                done = subprocess.run(
                    [sys.executable, __file__, "--workers", str(args.workers), "--epochs", str(args.epochs),
                     "--rev", args.rev, "--child", tree, data, str(work)],
                    capture_output=True, text=True, cwd=tmp, env={**os.environ, "PYTHONPATH": tree},
                )  # fmt: skip
                if done.returncode != 0:
                    raise SystemExit(f"{name} run failed:\n{done.stderr[-3000:]}")
                seconds[name].append(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
                run_losses[name] = losses(work)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, check=False)
    new, old = seconds["new"], seconds[f"old ({args.rev})"]
    ratios = [o / n for o, n in zip(old, new)]
    same = run_losses["new"] == run_losses[f"old ({args.rev})"]
    result = {
        "command": "python benchmarks/loader_epochs.py " + shlex.join(argv),
        "machine": machine(),
        "setup": f"vit_tiny 1024 frame, 16 COCO images, batch 4, {args.epochs} epochs, {args.workers} workers, "
        "cache_embeddings",
        "rounds": args.rounds,
        "median_s": {k: statistics.median(v) for k, v in seconds.items()},
        "round_s": seconds,
        "round_ratios": ratios,
        "median_round_ratio": statistics.median(ratios),
        "losses_equal": same,
        "steps": len(run_losses["new"]),
    }
    print(json.dumps(result, indent=1))
    write_result(args.out, result)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
