"""``samkit train`` and the seed's ``python train.py -c CONFIG -o KEY=VALUE ...`` (also under torchrun):
fine-tune SAM from a YAML config (the loop is :func:`samkit.training.train.train`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from .base import run_standalone
from .outputs import Inputs, check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``-c/--config`` and ``-o/--override-cfg``, the seed's flags (``eval.py`` takes the same)."""
    parser.add_argument("-c", "--config", default="configs/coco_box_finetune.yaml", help="YAML config file")
    parser.add_argument(
        "-o",
        "--override-cfg",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. -o amp=bf16 optimizer.lr=1e-4 resume=auto",
    )
    parser.add_argument(
        "--adapter",
        metavar="PATH",
        help="a LoRA adapter file merged into model.checkpoint (= -o model.adapter=PATH)",
    )


def overrides(args: argparse.Namespace) -> list[str]:
    """``-o`` items, with ``--adapter`` as ``model.adapter``."""
    extra = [f"model.adapter={args.adapter}"] if getattr(args, "adapter", None) is not None else []
    return list(args.override_cfg) + extra


def run(args: argparse.Namespace) -> int:
    """Fine-tune SAM (box or point prompts) from a YAML config (also under torchrun)."""
    from ..training.config import load_config
    from ..training.train import train

    cfg = load_config(args.config, overrides(args))
    check_output(cfg.work_dir, "work_dir", config_inputs(cfg, args.config), directory=True)
    result = train(cfg)
    return 143 if result.get("interrupted") else 0


def config_inputs(cfg: Any, config_path: str) -> Inputs:
    """The files and folders a config's run reads, labelled as an error line names them."""
    inputs: dict[str, Optional[str]] = {
        "the config (-c)": config_path,
        "the checkpoint (model.checkpoint)": cfg.model.checkpoint,
        "the adapter (model.adapter)": cfg.model.adapter,
    }
    for section in ("train_data", "eval_data"):
        data = getattr(cfg, section, None)
        if data is not None:
            inputs[f"the annotation file ({section}.annotation_path)"] = data.annotation_path
            inputs[f"the data folder ({section}.data_dir)"] = data.data_dir or None
    return inputs


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_standalone(add_arguments, run, argv, prog="train.py")


if __name__ == "__main__":
    sys.exit(main())
