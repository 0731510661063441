"""Writing files so that a reader never sees half of one: :func:`atomic_write`."""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import IO, Any, Iterator


def hidden_sibling(path: str | os.PathLike, kind: str = "tmp") -> str:
    """A hidden, unused name beside ``path``: ``.<name>.<kind>-<random>`` (two writers never collide)."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(directory, f".{name}.{kind}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike,
    mode: str = "wb",
    *,
    encoding: str | None = None,
    fsync: bool = False,
    make_parents: bool = False,
) -> Iterator[IO[Any]]:
    """Open a hidden temporary file beside ``path`` for writing (``mode`` "wb" or "w"); when the block
    ends without an exception the file is flushed (and synced to disk with ``fsync``) and renamed onto
    ``path`` in one step, replacing any old file. On any exception, KeyboardInterrupt included, it is
    removed and ``path`` is as it was. ``make_parents`` creates missing parent folders first.

    The temporary file is in the same folder (so the rename is atomic) and is created with the usual
    umask permissions."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes new files: mode 'wb' or 'w', got {mode!r}")
    target = os.path.abspath(os.fspath(path))
    if make_parents:
        os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = hidden_sibling(target)
    try:
        with open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


__all__ = ["atomic_write", "hidden_sibling"]
