"""Offline tests for samkit.checkpoints.download against a throwaway HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from samkit.checkpoints import download
from samkit.checkpoints.download import CheckpointInfo, download_checkpoint
from samkit.errors import DownloadError

DATA = random.Random(0).randbytes(300_000)
SHA = hashlib.sha256(DATA).hexdigest()
FILENAME = "sam_test_b.pth"


class _Handler(BaseHTTPRequestHandler):
    """Serves DATA under /good/, half of it (with the full Content-Length) under /drop/, 404 elsewhere."""

    def do_GET(self) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        if self.path == f"/good/{FILENAME}":
            body = DATA
        elif self.path == f"/drop/{FILENAME}":
            body = DATA[: len(DATA) // 2]  # HTTP/1.0: returning closes the connection mid-file
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output quiet


class _Server:
    def __init__(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.requests = []  # type: ignore[attr-defined]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests  # type: ignore[attr-defined]

    def url(self, route: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{route}"


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(timeout=5)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache dir (via $SAMKIT_CACHE) and a checkpoint table describing DATA."""
    monkeypatch.setattr(download, "CHECKPOINTS", {"vit_b": CheckpointInfo(FILENAME, len(DATA), SHA)})
    monkeypatch.setattr(download, "ALIASES", {"default": "vit_b"})
    monkeypatch.delenv("SAMKIT_WEIGHTS_URL", raising=False)
    directory = tmp_path / "cache"
    monkeypatch.setenv("SAMKIT_CACHE", str(directory))
    return directory


def assert_nothing_left(directory: Path) -> None:
    left = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
    assert left == [], f"cache should be empty, holds {left}"


def assert_one_line(err: pytest.ExceptionInfo[DownloadError]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_download_verifies_and_writes_marker(
    server: _Server, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAMKIT_WEIGHTS_URL", server.url("good/"))  # trailing slash is tolerated
    path = download_checkpoint("vit_b", progress=True)
    assert Path(path) == cache / FILENAME
    assert Path(path).read_bytes() == DATA
    assert server.requests == [f"/good/{FILENAME}"]
    assert sorted(p.name for p in cache.iterdir()) == [FILENAME, FILENAME + ".sha256"]


def test_second_call_is_a_cache_hit(server: _Server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAMKIT_WEIGHTS_URL", server.url("good"))
    first = download_checkpoint("vit_b", progress=False)
    assert download_checkpoint("default", progress=False) == first
    # Without the marker the file is re-hashed, still without any request.
    (cache / (FILENAME + ".sha256")).unlink()
    assert download_checkpoint("vit_b", progress=False) == first
    assert (cache / (FILENAME + ".sha256")).exists()
    assert len(server.requests) == 1


def test_explicit_cache_dir_overrides_env(server: _Server, cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SAMKIT_WEIGHTS_URL", server.url("good"))
    other = tmp_path / "elsewhere"
    assert download_checkpoint("vit_b", cache_dir=other, progress=False) == str(other / FILENAME)
    assert not cache.exists()


def test_wrong_sha256_leaves_nothing(server: _Server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "CHECKPOINTS", {"vit_b": CheckpointInfo(FILENAME, len(DATA), "0" * 64)})
    monkeypatch.setenv("SAMKIT_WEIGHTS_URL", server.url("good"))
    with pytest.raises(DownloadError) as err:
        download_checkpoint("vit_b", progress=False)
    message = assert_one_line(err)
    assert server.url(f"good/{FILENAME}") in message and "sha256" in message
    assert_nothing_left(cache)


def test_connection_dropped_mid_file(server: _Server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAMKIT_WEIGHTS_URL", server.url("drop"))
    with pytest.raises(DownloadError) as err:
        download_checkpoint("vit_b", progress=False)
    message = assert_one_line(err)
    assert f"after {len(DATA) // 2} of {len(DATA)} bytes" in message
    assert "--checkpoint" in message and "SAMKIT_WEIGHTS_URL" in message
    assert_nothing_left(cache)


def test_http_404_names_the_url(server: _Server, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAMKIT_WEIGHTS_URL", server.url("missing"))
    with pytest.raises(DownloadError) as err:
        download_checkpoint("vit_b", progress=False)
    message = assert_one_line(err)
    assert server.url(f"missing/{FILENAME}") in message and "404" in message
    assert "--checkpoint" in message
    assert_nothing_left(cache)


def test_unreachable_server(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # grab a free port, then close it so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SAMKIT_WEIGHTS_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(DownloadError) as err:
        download_checkpoint("vit_b", progress=False)
    message = assert_one_line(err)
    assert f"http://127.0.0.1:{port}/{FILENAME}" in message and "SAMKIT_WEIGHTS_URL" in message
    assert_nothing_left(cache)


def test_corrupted_cache_is_redownloaded(
    server: _Server, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAMKIT_WEIGHTS_URL", server.url("good"))
    path = Path(download_checkpoint("vit_b", progress=False))
    # Same size, different bytes. Bump the mtime explicitly: a coarse filesystem clock could otherwise
    # leave it unchanged, and a marker matching size+mtime is trusted by design.
    mtime = path.stat().st_mtime_ns
    path.write_bytes(bytes(len(DATA)))
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert download_checkpoint("vit_b", progress=False) == str(path)
    assert path.read_bytes() == DATA
    # A truncated file is caught by its size alone.
    path.write_bytes(DATA[:1000])
    download_checkpoint("vit_b", progress=False)
    assert path.read_bytes() == DATA
    assert len(server.requests) == 3


def test_corrupted_cache_and_failed_download_leaves_nothing(cache: Path, monkeypatch) -> None:
    cache.mkdir()
    (cache / FILENAME).write_bytes(b"junk")
    monkeypatch.setenv("SAMKIT_WEIGHTS_URL", (cache / "no-such-mirror").as_uri())
    with pytest.raises(DownloadError):
        download_checkpoint("vit_b", progress=False)
    assert_nothing_left(cache)


def test_file_url_mirror(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / FILENAME).write_bytes(DATA)
    monkeypatch.setenv("SAMKIT_WEIGHTS_URL", mirror.as_uri())
    assert Path(download_checkpoint("vit_b", progress=False)).read_bytes() == DATA


def test_keyboard_interrupt_removes_partial_file(server: _Server, cache: Path, monkeypatch) -> None:
    class InterruptingBar:
        def __init__(self, **kwargs: object) -> None:
            pass

        def __enter__(self) -> InterruptingBar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: int) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(download, "tqdm", InterruptingBar)
    monkeypatch.setenv("SAMKIT_WEIGHTS_URL", server.url("good"))
    with pytest.raises(KeyboardInterrupt):
        download_checkpoint("vit_b")
    assert_nothing_left(cache)


def test_unknown_name_lists_valid_names(cache: Path) -> None:
    with pytest.raises(ValueError, match="vit_x.*default, vit_b"):
        download_checkpoint("vit_x")


def test_real_table_is_complete() -> None:
    # Checked against the real table, not the monkeypatched one used above.
    assert set(download.CHECKPOINTS) == {"vit_b", "vit_l", "vit_h"}
    assert download.ALIASES["default"] == "vit_h"
    for info in download.CHECKPOINTS.values():
        assert len(info.sha256) == 64 and int(info.sha256, 16) >= 0
        assert info.size > 100_000_000
