"""What every command shares: one-line errors instead of tracebacks, running a command as a script
of its own, and the flags of commands that build a model.

Each command module has ``add_arguments(parser)`` (its flags) and ``run(args) -> int`` (the work),
raising :class:`samkit.errors.SamkitError` for anything the user got wrong; the first line of
``run``'s docstring is the command's help. Every user mistake (a SamkitError or a bad flag) ends
the command with exit status 2 and one line ``error: <message>`` on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Callable, Optional, Sequence

from ..errors import CheckpointError, SamkitError, SamkitNote

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

USAGE_ERROR = 2  # argparse's own exit status for a bad command line; used for every user mistake
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


class UsageError(SamkitError):
    """A flag is missing, unknown or malformed (argparse's message, kept to one line)."""


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def summary(run: Run) -> Optional[str]:
    """The first line of a command's docstring: its help."""
    return (run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else None


def run_standalone(
    add_arguments: AddArguments,
    run: Run,
    argv: Optional[Sequence[str]] = None,
    prog: Optional[str] = None,
    description: Optional[str] = None,
) -> int:
    """Run one command as a script of its own (``demo/inference_with_prompts.py``), same errors."""

    def dispatch() -> int:
        parser = ArgumentParser(prog=prog, description=description or (run.__doc__ or "").strip())
        add_arguments(parser)
        return run(parser.parse_args(argv))

    return guarded(dispatch)


def guarded(command: Callable[[], Optional[int]]) -> int:
    """Call ``command``; turn user mistakes into one ``error:`` line on stderr and exit status 2, and
    samkit's notes (:class:`~samkit.errors.SamkitNote` warnings) into one ``note:`` line each."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_notes_as_lines(warnings.showwarning)
            return int(command() or 0)
    except SystemExit as exit_:  # --help and --version end through SystemExit(0)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except SamkitError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _show_notes_as_lines(show: Callable[..., None]) -> Callable[..., None]:
    def show_warning(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
        if issubclass(category, SamkitNote):
            print(f"note: {one_line(message)}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)

    return show_warning


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


# ---------------------------------------------------------------------------------------------------
# Commands that build a model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every command that builds a model shares: --model-type, --checkpoint, --download,
    --device and --dtype (read by :func:`checkpoint_or_none` and :func:`check_device`)."""
    from ..build import sam_model_registry

    parser.add_argument(
        "--model-type", default="vit_b", choices=list(sam_model_registry), help="default: vit_b"
    )
    parser.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="weights: Meta's .pth, the seed's .ckpt, a Hugging Face SAM folder or .safetensors",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="without --checkpoint, download the official weights of --model-type (cached; $SAMKIT_CACHE)",
    )
    add_adapter_argument(parser)
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and compute dtype")


def add_adapter_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        metavar="PATH",
        help="a LoRA run's sam_final_adapter.safetensors, merged into the --checkpoint it was trained from",
    )


def with_adapter(model: Any, args: argparse.Namespace) -> Any:
    """``model`` (built from --checkpoint, before any dtype cast) with --adapter merged in, when given
    (:func:`samkit.lora.apply_adapter`: one error line when the base weights are not the adapter's)."""
    if getattr(args, "adapter", None) is not None:
        from ..lora import apply_adapter

        apply_adapter(model, args.adapter)
    return model


def check_device(name: str) -> Any:
    """``--device`` as a torch.device that works on this machine."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise SamkitError(f"--device {name!r}: {str(err).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SamkitError(f"--device {name!r}: CUDA is not available on this machine (use --device cpu)")
    try:
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError) as err:
        raise SamkitError(f"--device {name!r}: {str(err).strip().splitlines()[0]}") from None
    return device


def checkpoint_or_none(args: argparse.Namespace) -> str | None:
    """The --checkpoint path (checked to exist), or None when the weights are to be downloaded or random."""
    from ..checkpoints.download import ALIASES, CHECKPOINTS, checkpoint_url

    adapter = getattr(args, "adapter", None)
    if adapter is not None and not os.path.isfile(adapter):
        raise CheckpointError(
            f"--adapter {adapter}: {'a directory' if os.path.isdir(adapter) else 'not found'}"
        )
    if args.checkpoint is not None:
        from ..checkpoints.hf import is_hf_folder

        if not os.path.isfile(args.checkpoint) and not is_hf_folder(args.checkpoint):
            what = "a directory without a Hugging Face SAM" if os.path.isdir(args.checkpoint) else "not found"
            raise CheckpointError(f"--checkpoint {args.checkpoint}: {what}")
        return args.checkpoint
    downloadable = ALIASES.get(args.model_type, args.model_type) in CHECKPOINTS
    if args.download and not downloadable:
        raise SamkitError(
            f"--download: {args.model_type} has no released weights; leave out --download to run it with random "
            f"weights, or pass --checkpoint PATH"
        )
    if not args.download and downloadable:
        raise SamkitError(
            f"no weights for {args.model_type}: pass --download to fetch them, or --checkpoint PATH with the "
            f"file from {checkpoint_url(args.model_type)}"
        )
    return None  # a model without released weights (vit_tiny) runs with random ones
