"""Folder jobs (``samkit amg``, ``samkit embed``) spread over many processes and machines by torchrun.

Without torchrun (``WORLD_SIZE`` unset or 1) nothing here talks to anyone: one process does every
image. Under ``torchrun --nnodes N --nproc_per_node M -m samkit amg ...`` every process:

1. checks the command line (the same checks, so a mistake stops every process with the same line);
2. joins a gloo process group (CPU sockets only, whatever ``--device`` is, so GPU jobs need no NCCL);
3. tests which images are finished, each process a strided slice of the sorted list, and gathers the
   answers, so every process agrees on the pending list without racing the writers;
4. takes its share of the pending images, ``pending[rank::world_size]`` (deterministic, balanced);
5. writes each image's result atomically (hidden temporary name, then rename), so an interrupted
   run leaves finished results or nothing, and a rerun skips finished images;
6. gathers a summary to every process; rank 0 prints it once, counting each image once, and every
   process ends with the same exit status. An error on one process (an unreadable checkpoint, a
   full disk, a crash in the model) is caught, the process still reaches the summary, and rank 0
   prints ``error: rank R: ...``; no process waits for a peer that has given up.

On several machines ``--output`` must be a folder every machine sees (a shared filesystem), and
``--device cuda`` means this process's GPU (``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, Sequence

# The summary gather waits for the slowest process, which may have hours of images left.
DEFAULT_TIMEOUT_S = 7 * 24 * 3600
TIMEOUT_ENV = "SAMKIT_DIST_TIMEOUT"


@dataclass
class Workers:
    """This process's place among the processes of one folder job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (``[obj]`` for one process)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False

    def prefix(self) -> str:
        """``[rank R] `` before a line one process prints on its own (nothing for one process)."""
        return f"[rank {self.rank}] " if self.distributed else ""


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) without torchrun."""

    def number(name: str, default: int) -> int:
        text = os.environ.get(name, "")
        try:
            return int(text) if text.strip() else default
        except ValueError:
            from ..errors import SamkitError

            raise SamkitError(f"${name}={text!r} is not an integer (set by torchrun)") from None

    world_size = number("WORLD_SIZE", 1)
    return number("RANK", 0), max(world_size, 1), number("LOCAL_RANK", 0)


def join() -> Workers:
    """Join the processes torchrun started (a gloo group), or stand alone when there are none."""
    rank, world_size, local_rank = world_from_env()
    if world_size == 1:
        return Workers()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        dist.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout))
        owns = True
    return Workers(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, owns_group=owns
    )


def process_device(name: str) -> str:
    """``--device`` for this process: a bare ``cuda`` under torchrun is ``cuda:LOCAL_RANK``."""
    rank, world_size, local_rank = world_from_env()
    if world_size > 1 and name.strip() == "cuda":
        return f"cuda:{local_rank}"
    return name


def split_pending(
    items: Sequence[str], is_done: Callable[[str], bool], workers: Workers
) -> tuple[list[str], list[str]]:
    """(every pending item, this process's share of them), the same on every process.

    Process r tests ``items[r::world_size]`` with ``is_done``; the answers are gathered before any
    process writes, so all agree on the pending list. Shares are ``pending[r::world_size]``.
    """
    mine = [i for i in range(workers.rank, len(items), workers.world_size)]
    done_here = [i for i in mine if is_done(items[i])]
    done = {i for part in workers.all_gather(done_here) for i in part}
    pending = [item for i, item in enumerate(items) if i not in done]
    return pending, pending[workers.rank :: workers.world_size]


def take_share(
    items: Sequence[str], is_done: Callable[[str], bool], workers: Workers, where: str
) -> Optional[list[str]]:
    """This process's share of the pending items (:func:`split_pending`), after rank 0 says how many
    are skipped ("skipping N of M images: <where> (--overwrite redoes them)"). None when nothing is
    pending: the workers are closed then and the command has nothing to do (and on any error)."""
    try:
        pending, share = split_pending(items, is_done, workers)
    except BaseException:
        workers.close()
        raise
    skipped = len(items) - len(pending)
    if skipped and workers.is_main:
        print(f"skipping {skipped} of {len(items)} images: {where} (--overwrite redoes them)")
    if not pending:
        workers.close()
        return None
    return share


@dataclass
class Outcome:
    """What one process did: images finished, unreadable ones, and the error that stopped it."""

    done: int = 0
    unreadable: int = 0
    interrupted: Optional[str] = None  # "interrupted" / "terminated"
    error: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)


INTERRUPTED, TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM


def process_share(
    share: Sequence[str],
    work: Callable[[str], Optional[dict[str, Any]]],
    workers: Workers,
    desc: str,
    outcome: Optional[Outcome] = None,
) -> Outcome:
    """Run ``work(path)`` on each path of this process's share, with a progress bar (rank 0's only).

    ``work`` raises :class:`~samkit.errors.ImageError` for an image it cannot read (a warning; the
    image is counted as unreadable) and returns the bar's postfix. Ctrl-C and SIGTERM end the loop
    (``outcome.interrupted``). Any other error ends it too: one process re-raises it (as before
    torchrun existed); under torchrun it becomes ``outcome.error`` so that the summary still meets.
    """
    from tqdm import tqdm

    from ..errors import ImageError
    from .base import one_line

    outcome = outcome or Outcome()
    bar = tqdm(
        share, desc=desc, unit="image", file=sys.stderr, dynamic_ncols=True, disable=not workers.is_main
    )
    current = ""
    try:
        with sigterm_as_interrupt():
            for path in bar:
                current = path
                try:
                    postfix = work(path)
                except ImageError as err:
                    message = str(err) if path in str(err) else f"{path}: {err}"
                    tqdm.write(f"{workers.prefix()}warning: {message}; skipped", file=sys.stderr)
                    outcome.unreadable += 1
                    continue
                outcome.done += 1
                if postfix:
                    bar.set_postfix(**postfix, refresh=False)
    except KeyboardInterrupt as stop:
        outcome.interrupted = "terminated" if isinstance(stop, Terminated) else "interrupted"
    except Exception as err:
        if not workers.distributed:
            raise
        outcome.error = (
            f"{current}: {one_line(err)}" if current and current not in str(err) else one_line(err)
        )
    finally:
        bar.close()
    return outcome


def finish(
    outcome: Outcome, workers: Workers, share_size: int, total: int, summary: Callable[[int], str]
) -> int:
    """Gather every process's outcome, print the summary once (rank 0), return the common exit status.

    ``summary(done)`` is the line printed when the work is over; ``total`` is the number of images.
    """
    if outcome.interrupted:  # every process got the signal (Ctrl-C, torchrun's SIGTERM): no gather
        print(
            f"{workers.prefix()}error: {outcome.interrupted} after {outcome.done} of {share_size} images; "
            "their results are complete and a re-run continues with the rest",
            file=sys.stderr,
        )
        workers.close()
        return TERMINATED if outcome.interrupted == "terminated" else INTERRUPTED
    outcomes = workers.all_gather(outcome)
    workers.close()
    done = sum(o.done for o in outcomes)
    unreadable = sum(o.unreadable for o in outcomes)
    failed = [(r, o) for r, o in enumerate(outcomes) if o.error]
    if workers.is_main:
        print(summary(done))
        for r, o in failed:
            print(f"error: {f'rank {r}: ' if workers.distributed else ''}{o.error}", file=sys.stderr)
        if unreadable:
            print(f"error: {unreadable} of {total} images could not be read", file=sys.stderr)
    return 1 if failed or unreadable else 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup runs."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Outcome",
    "TIMEOUT_ENV",
    "Workers",
    "finish",
    "join",
    "process_device",
    "process_share",
    "split_pending",
    "world_from_env",
]
