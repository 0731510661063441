"""``samkit serve``'s app on a real uvicorn socket, for the tests that need one (headers, connection drops,
a browser): started in a daemon thread of the test process, stopped afterwards."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any, Iterator


@contextlib.contextmanager
def serving(app: Any, host: str = "127.0.0.1", log_level: str = "warning") -> Iterator[int]:
    """Run ``app`` on a free port of ``host`` until the block ends; yields the port."""
    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def page_server(app: Any, service: Any, token: str) -> Iterator[SimpleNamespace]:
    """:func:`serving` on 127.0.0.1 for the page: ``url``, ``service`` and ``api`` (an httpx client that
    sends ``token``)."""
    import httpx

    with serving(app) as port:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=120, headers={"X-Samkit-Token": token}) as api:
            yield SimpleNamespace(url=url, service=service, api=api)
