"""The ``samkit`` console script: one subcommand per command module, dispatched by name.

To add a command, write ``samkit/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int`` (see :mod:`samkit.commands.base`) and add a line to ``COMMANDS``.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..version import __version__
from . import (
    amg,
    box,
    convert,
    embed,
    export_onnx,
    merge,
    point,
    predict,
    preprocess_ct,
    serve,
    text,
    train,
    volume,
)
from . import eval as eval_command
from .base import AddArguments, ArgumentParser, Run, guarded, summary

COMMANDS: dict[str, tuple[AddArguments, Run]] = {
    "predict": (predict.add_arguments, predict.run),
    "amg": (amg.add_arguments, amg.run),
    "box": (box.add_arguments, box.run),
    "point": (point.add_arguments, point.run),
    "text": (text.add_arguments, text.run),
    "train": (train.add_arguments, train.run),
    "eval": (eval_command.add_arguments, eval_command.run),
    "preprocess-ct": (preprocess_ct.add_arguments, preprocess_ct.run),
    "export-onnx": (export_onnx.add_arguments, export_onnx.run),
    "serve": (serve.add_arguments, serve.run),
    "embed": (embed.add_arguments, embed.run),
    "convert": (convert.add_arguments, convert.run),
    "volume": (volume.add_arguments, volume.run),
    "merge": (merge.add_arguments, merge.run),
}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="samkit", description="Segment Anything on PyTorch.")
    parser.add_argument("--version", action="version", version=f"samkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_arguments, run) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=summary(run), description=summary(run)))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``samkit`` console script; returns the exit status."""

    def dispatch() -> int:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command][1](args)

    return guarded(dispatch)


if __name__ == "__main__":
    sys.exit(main())
