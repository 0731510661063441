"""Download Meta's official SAM checkpoints into a local cache, verified by size and sha256."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Union

from tqdm import tqdm

from samkit.errors import DownloadError


@dataclass(frozen=True)
class CheckpointInfo:
    """What a correct copy of one checkpoint file looks like."""

    filename: str
    size: int  # bytes
    sha256: str  # lowercase hex


DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

# The suffix in each filename is the start of the file's MD5, so it cannot be used to check a download.
# sha256 values: computational-cell-analytics/micro-sam, micro_sam/util.py (pooch registry for the same URLs);
# the same three digests appear in many other public download scripts and Dockerfiles.
# Sizes: metercai/SimpleSDXL, model_checker.py (expected byte size of each sam_vit_*.pth), agreeing with
# other public size tables (e.g. dafne-imaging's CHECKPOINT_SIZES) and a wget log ("Length: 375042383").
CHECKPOINTS: dict[str, CheckpointInfo] = {
    "vit_b": CheckpointInfo(
        "sam_vit_b_01ec64.pth",
        375_042_383,
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    "vit_l": CheckpointInfo(
        "sam_vit_l_0b3195.pth",
        1_249_524_607,
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_h": CheckpointInfo(
        "sam_vit_h_4b8939.pth",
        2_564_550_879,
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
}
ALIASES: dict[str, str] = {"default": "vit_h"}  # Meta's registry calls ViT-H "default"

_CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough for a smooth progress bar
_TIMEOUT_S = 60.0  # per socket operation, so a stalled server fails instead of hanging forever
# Errors that mean "the network or server failed", as opposed to our own disk failing.
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout)


def default_cache_dir() -> Path:
    """``$SAMKIT_CACHE`` if set and non-empty, else ``~/.cache/samkit``."""
    return Path(os.environ.get("SAMKIT_CACHE") or "~/.cache/samkit").expanduser()


def checkpoint_url(name: str) -> str:
    """The URL a checkpoint is fetched from: ``$SAMKIT_WEIGHTS_URL`` (a mirror) or Meta's server."""
    base = os.environ.get("SAMKIT_WEIGHTS_URL") or DEFAULT_BASE_URL
    return base.rstrip("/") + "/" + _lookup(name).filename


def download_checkpoint(
    name: str, cache_dir: Optional[Union[str, os.PathLike]] = None, progress: bool = True
) -> str:
    """Return the local path of SAM checkpoint ``name`` ("vit_b", "vit_l", "vit_h", "default" = "vit_h").

    A verified file already in the cache is returned without touching the network. Otherwise the file is
    streamed to a private temporary file next to its final place, checked against the known size and sha256,
    and only then renamed into place, so an interrupted or corrupt download never leaves a file that a later
    call would trust. Raises ``ValueError`` for an unknown name and ``DownloadError`` for any failure.
    """
    info = _lookup(name)
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / info.filename
    if _is_cached(target, info):
        return str(target)
    try:
        # A file of the right name that failed the check must not survive a failed download either.
        for stale in (target, _marker(target)):
            stale.unlink(missing_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot prepare cache directory {target.parent}: {_one_line(err)}") from err
    _download(checkpoint_url(name), target, info, progress)
    _write_marker(target, info)
    return str(target)


def _lookup(name: str) -> CheckpointInfo:
    key = ALIASES.get(name, name)
    if key not in CHECKPOINTS:
        valid = ", ".join(sorted(set(CHECKPOINTS) | {a for a, k in ALIASES.items() if k in CHECKPOINTS}))
        raise ValueError(f"unknown SAM checkpoint {name!r}; valid names: {valid}")
    return CHECKPOINTS[key]


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _is_cached(path: Path, info: CheckpointInfo) -> bool:
    """True if ``path`` holds the right bytes; re-hashes only when the marker does not vouch for the file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if st.st_size != info.size:
        return False
    try:
        # Hashing gigabytes takes seconds, so a marker records that this exact file (size and mtime) was verified.
        mark = json.loads(_marker(path).read_text())
        if mark == {"sha256": info.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            return True
    except (OSError, ValueError):
        pass
    if _sha256_of(path) != info.sha256:
        return False
    _write_marker(path, info)
    return True


def _write_marker(path: Path, info: CheckpointInfo) -> None:
    st = path.stat()
    try:
        _marker(path).write_text(
            json.dumps({"sha256": info.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        )
    except OSError:
        pass  # the marker only saves time; a read-only cache still works, it just re-hashes


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, target: Path, info: CheckpointInfo, progress: bool) -> None:
    # Point at Meta's URL even when a mirror failed: that is the file the user can fetch in a browser.
    official = DEFAULT_BASE_URL + info.filename
    hint = f"download {official} by hand and pass --checkpoint PATH, or set SAMKIT_WEIGHTS_URL to a mirror"
    # A random suffix keeps concurrent downloads of the same file from writing into each other's temp file;
    # the same directory makes the final os.replace an atomic rename.
    part = target.with_name(f"{target.name}.part-{secrets.token_hex(4)}")
    try:
        with part.open("xb") as out:
            received, sha256 = _fetch(url, out, info, progress, hint)
        if received != info.size:
            raise DownloadError(f"{url}: connection closed after {received} of {info.size} bytes; {hint}")
        if sha256 != info.sha256:
            raise DownloadError(
                f"{url}: sha256 is {sha256}, expected {info.sha256} (corrupt or not the official file); {hint}"
            )
        os.replace(part, target)
    except BaseException:  # includes KeyboardInterrupt: never leave a partial file behind
        part.unlink(missing_ok=True)
        raise


def _fetch(url: str, out: BinaryIO, info: CheckpointInfo, progress: bool, hint: str) -> tuple[int, str]:
    """Stream ``url`` into ``out``; return the number of bytes received and their sha256."""
    digest = hashlib.sha256()
    received = 0
    request = urllib.request.Request(url, headers={"User-Agent": "samkit"})
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) != info.size:
                raise DownloadError(f"{url}: server offers {length} bytes, expected {info.size}; {hint}")
            with tqdm(
                total=info.size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=info.filename,
                disable=not progress,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    received += len(chunk)
                    if received > info.size:  # do not fill the disk from a server that never stops
                        raise DownloadError(
                            f"{url}: server sent more than the expected {info.size} bytes; {hint}"
                        )
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url}: HTTP error {err.code} {_one_line(err.reason)}; {hint}") from err
    except _NETWORK_ERRORS as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        raise DownloadError(f"{url}: {_one_line(reason) or type(err).__name__}; {hint}") from err
    except OSError as err:
        raise DownloadError(f"cannot write {out.name}: {_one_line(err)}") from err
    return received, digest.hexdigest()


def _one_line(value: object) -> str:
    """Collapse whitespace so every DownloadError message stays on one line."""
    return " ".join(str(value).split())
