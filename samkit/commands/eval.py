"""``samkit eval`` and the seed's ``python eval.py -c CONFIG -o model.checkpoint=PATH`` (also under
torchrun): evaluate a checkpoint on a config's ``eval_data`` (:func:`samkit.training.evaluate.run`)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import ConfigError
from .base import run_standalone
from .outputs import check_output
from .train import add_arguments as add_arguments
from .train import config_inputs, overrides


def run(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint (zero-shot or fine-tuned) on a config's eval_data: box, point (click) or text
    (crop features; on COCO also category names) protocol, or volume (NIfTI scans: one box per organ propagated)."""
    from ..training.config import load_config
    from ..training.evaluate import output_path
    from ..training.evaluate import run as evaluate_config

    cfg = load_config(args.config, overrides(args))
    if cfg.eval_data is None:
        raise ConfigError(f"{args.config} has no eval_data section to evaluate on")
    # Checked before the model loads: the metrics must not land on an input, nor somewhere unwritable.
    flag = "eval_output" if cfg.eval_output else "work_dir"
    check_output(output_path(cfg), flag, config_inputs(cfg, args.config), directory=False)
    metrics = evaluate_config(cfg)
    if "output" in metrics and metrics.get("eval_prompt") == "volume":
        from ..volume.evaluate import table

        print(table({"mean": metrics, "organs": metrics["organs"]}))
        print(f"{len(metrics['cases'])} (case, organ) pairs -> {metrics['output']}")
    elif "output" in metrics:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))
        objects = next((v for k, v in sorted(metrics.items()) if k.startswith("objects_1024")), "?")
        pairs = metrics.get("objects_1024_category_best")
        also = f" and {pairs} (image, category) pairs" if pairs is not None else ""
        print(f"{shown} over {objects} objects{also} -> {metrics['output']}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_standalone(add_arguments, run, argv, prog="eval.py")


if __name__ == "__main__":
    sys.exit(main())
