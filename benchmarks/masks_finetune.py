"""Box fine-tuning on a generated mask folder: val mIoU before and after (README "Fine-tuning on your own data").

The tests' shapes-trained vit_tiny (tests/shapes.py; its weights are in pytest's cache after a test run,
``.pytest_cache/d/samkit-trained-models/shapes_model/<key>/model.pt``) is fine-tuned with box prompts on a
15-picture mask folder (tests/owndata.py, 192x256 pictures, 16-bit label PNGs) of which ``val_fraction``
holds out 5, with the recipe of tests/test_train.py's COCO fine-tuning test (24 epochs, batch 2, lr 1e-3,
bf16, cached embeddings). Writes ``benchmarks/results/masks_finetune_<pictures>.json``.

    python benchmarks/masks_finetune.py --checkpoint .pytest_cache/d/.../model.pt --pictures png
    python benchmarks/masks_finetune.py --checkpoint ... --pictures tif16   # 16-bit grey TIFFs
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="the shapes-trained vit_tiny (model.pt)")
    parser.add_argument(
        "--pictures", default="png", help="picture format of tests/owndata.py (png, tif16, ...)"
    )
    parser.add_argument("--epochs", type=int, default=24)
    args = parser.parse_args()

    import torch

    from samkit.training.config import config_from_dict
    from samkit.training.evaluate import run as run_eval
    from samkit.training.train import train
    from tests.owndata import make_mask_folder

    torch.set_num_threads(2)  # as the trained test models are built
    tmp = Path(tempfile.mkdtemp(prefix="masks_finetune_"))
    root, _ = make_mask_folder(
        tmp / "data", 15, seed=1, size=(192, 256), image_format=args.pictures, label_format="png16"
    )
    data = {"type": "masks", "data_dir": str(root), "val_fraction": 1 / 3, "max_objects": 2, "num_workers": 0}
    cfg = {
        "model": {"type": "vit_tiny", "checkpoint": args.checkpoint},
        "train_data": data,
        "eval_data": {**data, "max_objects": 8},
        "optimizer": {"lr": 1e-3, "weight_decay": 1e-4},
        "scheduler": {"warmup_steps": 3, "decay": "cosine"},
        "work_dir": str(tmp / "run"),
        "epochs": args.epochs,
        "batch_size": 2,
        "amp": "bf16",
        "cache_embeddings": True,
        "eval_every": 0,
        "log_every": 4,
        "tensorboard": False,
        "progress": False,
        "seed": 7,
    }
    start = time.time()
    zero = run_eval(config_from_dict({**cfg, "work_dir": str(tmp / "zero")}))
    train(config_from_dict(cfg))
    final = str(tmp / "run" / "sam_final.pth")
    tuned = run_eval(config_from_dict({**cfg, "model": {"type": "vit_tiny", "checkpoint": final}}))
    keys = ("miou_1024", "miou_original", "dice_1024", "dice_original", "objects_1024")
    result = {
        "pictures": args.pictures,
        "epochs": args.epochs,
        "zero_shot": {k: zero[k] for k in keys},
        "fine_tuned": {k: tuned[k] for k in keys},
        "seconds": round(time.time() - start, 1),
        "host": platform.node(),
        "load_average": os.getloadavg(),
    }
    out = ROOT / "benchmarks" / "results" / f"masks_finetune_{args.pictures}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
