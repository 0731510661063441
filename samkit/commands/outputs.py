"""Where a command may write: the one place every command asks, before any work, whether an output path
is one of the run's inputs and whether it can be written at all.

A command names its inputs (``{"the checkpoint": path, ...}``, each labelled as the error line should
name it) and checks each output:

    inputs = {"the input image": args.input, "the checkpoint": checkpoint}
    check_output(args.output, "--output", inputs, directory=True)     # the folder itself
    check_not_input(result_paths, inputs, "--output")                 # the files it will get

Refused, each with one line naming the flag and the path: a folder where a file goes (or the reverse),
an output that is one of the inputs (writing there would lose it), an output under a file
(``photo.png/sub/x.json``) and one in a folder where nothing can be written (read-only, no permission).
Folders are created only when there is something to write (:func:`make_dirs`).
"""

from __future__ import annotations

import os
import tempfile
from typing import Mapping, Optional, Sequence

from ..errors import SamkitError

Inputs = Mapping[str, Optional[str]]


def check_output(path: str, flag: str, inputs: Inputs, *, directory: bool) -> str:
    """Refuse an output ``path`` (a folder with ``directory``, else a file) that cannot take the result;
    returns ``path``. Nothing is created: a probe file in the nearest existing folder is removed at once."""
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise SamkitError(f"{flag} {path}: exists and is not a directory")
    if not directory and os.path.isdir(path):
        raise SamkitError(f"{flag} {path}: is a directory; give a file name")
    if not directory:
        check_not_input([path], inputs, flag)
    check_writable(path, flag, directory=directory)
    return path


def check_not_input(outputs: Sequence[str], inputs: Inputs, flag: str) -> None:
    """Refuse to write a result over one of the run's inputs (``samkit amg --input a.png --output a.png``,
    ``eval.py -o eval_output=<the annotation file>``, a picture named like the input in the output
    folder): the input would be lost."""
    for path in outputs:
        for label, source in inputs.items():
            if source and _same(path, source):
                raise SamkitError(f"{flag}: {path} is {label}; writing the result there would overwrite it")


def check_writable(path: str, flag: str, *, directory: bool) -> None:
    """Refuse a path under a file, or in a folder where a file cannot be created (tried, not guessed:
    ``os.access`` says yes to root on read-only file systems)."""
    folder = os.path.abspath(path if directory else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise SamkitError(f"{flag} {path}: {folder} is a file, not a directory")
    try:
        handle, probe = tempfile.mkstemp(prefix=".samkit-write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise SamkitError(f"{flag} {path}: cannot write in {folder}: {err.strerror or err}") from None


def make_dirs(folder: str, flag: str) -> None:
    """Create an output folder when the first result is about to be written (never an empty one)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise SamkitError(f"{flag} {folder}: cannot create: {err.strerror or err}") from None


def _same(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


__all__ = ["Inputs", "check_not_input", "check_output", "check_writable", "make_dirs"]
