"""The ``samkit`` console script: thin subcommands over library functions.

Each subcommand is a pair of functions that live next to the library code they drive:
``add_arguments(parser)`` declares its flags and ``run(args) -> int`` does the work, raising
:class:`samkit.errors.SamkitError` for anything the user got wrong. The first line of ``run``'s
docstring is the subcommand's help. To add one, add a line to ``COMMANDS``.

Every user mistake (a SamkitError or a bad flag) ends the command with exit status 2 and one line
``error: <message>`` on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from . import __version__, amg_cli, box_inference, evaluate, prompt_demo, train
from .data import ct_preprocess
from .errors import SamkitError
from .utils.allocator import tune_cpu_allocator

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

COMMANDS: dict[str, tuple[AddArguments, Run]] = {
    "predict": (prompt_demo.add_arguments, prompt_demo.run),
    "amg": (amg_cli.add_arguments, amg_cli.run),
    "box": (box_inference.add_arguments, box_inference.run),
    "train": (train.add_arguments, train.run),
    "eval": (train.add_arguments, evaluate.run_command),
    "preprocess-ct": (ct_preprocess.add_arguments, ct_preprocess.run),
}

USAGE_ERROR = 2  # argparse's own exit status for a bad command line; used for every user mistake


class UsageError(SamkitError):
    """A flag is missing, unknown or malformed (argparse's message, kept to one line)."""


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="samkit", description="Segment Anything on PyTorch.")
    parser.add_argument("--version", action="version", version=f"samkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_arguments, run) in COMMANDS.items():
        summary = (run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else None
        add_arguments(sub.add_parser(name, help=summary, description=summary))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``samkit`` console script; returns the exit status."""

    def dispatch() -> int:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command][1](args)

    return guarded(dispatch)


def run_standalone(
    add_arguments: AddArguments,
    run: Run,
    argv: Optional[Sequence[str]] = None,
    prog: Optional[str] = None,
    description: Optional[str] = None,
) -> int:
    """Run one subcommand as a script of its own (``demo/inference_with_prompts.py``), same errors."""

    def dispatch() -> int:
        parser = ArgumentParser(prog=prog, description=description or (run.__doc__ or "").strip())
        add_arguments(parser)
        return run(parser.parse_args(argv))

    return guarded(dispatch)


def guarded(command: Callable[[], Optional[int]]) -> int:
    """Call ``command``; turn user mistakes into one ``error:`` line on stderr and exit status 2."""
    tune_cpu_allocator()
    try:
        return int(command() or 0)
    except SystemExit as exit_:  # --help and --version end through SystemExit(0)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except SamkitError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
