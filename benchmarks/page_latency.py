"""Hover-to-mask latency of ``samkit serve``'s page in headless Chromium: decoding on the server against
decoding in the page (onnxruntime-web, wasm, one thread, the ONNX decoder the server exported).

    python benchmarks/page_latency.py --model vit_tiny [--hovers 40] [--out benchmarks/results/page_latency_vit_tiny.json]

One server (uvicorn on 127.0.0.1 in this process, random weights, float32) and one Chromium
(/usr/bin/chromium, as tests/test_serve_browser.py drives it) with two pages on the same photo
(``skimage.data.coffee()``, 400x600): one opened with ``?decode=server`` (every hover is a POST
/api/predict, at most one in flight and one every 80 ms), one with ``?decode=browser`` (decoding in the
page), and one with the default, ``auto`` (the page times its first decodes on both paths and keeps the
faster; its 3 warm-up hovers are the first half of that timing). The pointer moves to seeded random points
of the photo, ``--hovers`` times per page (after 3 warm-up hovers), the pages taking turns in blocks of 5
so that the machine's other load falls on all alike; each move waits for its mask. For ``auto`` the path it
chose, the medians it chose by and how many timed hovers each path decoded are recorded too.

Timed by the page itself (``state.hoverTimes``): from the pointermove event to the preview mask drawn on
the canvas (decode, mask to RLE, drawing), in ms. Also recorded: the decoder's own time of each hover
(the server's ``decoder_ms`` / the page's session.run plus mask summary), the same ONNX decoder in
native ONNX Runtime (Python, one thread, the same prompt 20 times: how much of the browser's time is the
graph and how much is wasm), the export, the upload and embedding, the page's start of the runtime, and
``uptime``'s load before and after.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from common import machine, write_result

from samkit.build import ENCODER_CONFIGS, build_model

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip
BLOCK = 5
WARM_UP = 3


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def stats(values: list[float]) -> dict[str, float]:
    q = np.percentile(np.asarray(values), [50, 90])
    return {"median_ms": round(float(q[0]), 2), "p90_ms": round(float(q[1]), 2), "n": len(values)}


def start_server(app):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def repo_relative(argv: list[str]) -> list[str]:
    """The arguments with ``--out``'s path relative to the repository (as run from its root)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--out":
            out[i + 1] = os.path.relpath(os.path.abspath(out[i + 1]), root)
    return out


def native_ort_ms(decoder: str, image, point: tuple[float, float], calls: int = 20) -> list[float]:
    """The exported decoder in ONNX Runtime's CPU provider, one thread: one point plus the padding point,
    no mask input, at the image's size (ms per call, after 2 warm-up calls)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(decoder), options, providers=["CPUExecutionProvider"])
    h, w = image.pixels.shape[:2]
    ih, iw = image.input_size
    feeds = {
        "image_embeddings": image.features.float().numpy(),
        "point_coords": np.array([[[point[0] * iw / w, point[1] * ih / h], [0, 0]]], np.float32),
        "point_labels": np.array([[1, -1]], np.float32),
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array([h, w], np.float32),
    }
    times = []
    for i in range(calls + 2):
        start = time.perf_counter()
        session.run(None, feeds)
        if i >= 2:
            times.append((time.perf_counter() - start) * 1000)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny", choices=list(ENCODER_CONFIGS))
    parser.add_argument("--hovers", type=int, default=40, help="timed hovers per path (default 40)")
    parser.add_argument("--out")
    parser.add_argument("--note", default=None)
    args = parser.parse_args(argv)
    from PIL import Image
    from playwright.sync_api import sync_playwright
    from skimage import data

    from samkit.serve.app import create_app
    from samkit.serve.state import ModelService
    from samkit.serve.webdecoder import prepare_web_decoder

    load_before = load_average()
    torch.manual_seed(0)
    model = build_model(args.model).eval()
    cache = tempfile.mkdtemp(prefix="page_latency_")
    start = time.perf_counter()
    web = prepare_web_decoder(model, args.model, cache)
    export_s = time.perf_counter() - start
    if not web.available:
        raise SystemExit(f"no in-browser decoding: {web.reason}")
    service = ModelService(model)
    server, thread, url = start_server(create_app(service, web=web))
    photo = data.coffee()
    h, w = photo.shape[:2]
    path = os.path.join(cache, "coffee.png")
    Image.fromarray(photo).save(path)
    rng = np.random.default_rng(0)
    points = [
        (float(rng.uniform(2, w - 2)), float(rng.uniform(2, h - 2))) for _ in range(args.hovers + WARM_UP)
    ]
    result: dict = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            pages, opened = {}, {}
            for path_name, query in (
                ("server", "?decode=server"),
                ("browser", "?decode=browser"),
                ("auto", ""),
            ):
                page = browser.new_page(viewport={"width": 1280, "height": 760})
                started = time.perf_counter()
                page.goto(url + "/" + query)
                page.wait_for_function("window.samkit.state.decoding !== 'starting'", timeout=120_000)
                ready_s = time.perf_counter() - started
                expected = "timing" if path_name == "auto" else path_name
                assert page.evaluate("window.samkit.state.decoding") == expected, path_name
                started = time.perf_counter()
                page.set_input_files("#file", path)
                page.wait_for_function(
                    "window.samkit.state.image !== null && window.samkit.state.busy === 0", timeout=600_000
                )
                opened[path_name] = {
                    "page_ready_s": round(ready_s, 3),
                    "open_s": round(time.perf_counter() - started, 3),
                    "cached": page.evaluate("window.samkit.state.image.cached"),
                }
                pages[path_name] = page
            times: dict[str, list[float]] = {k: [] for k in pages}
            decoder: dict[str, list[float]] = {k: [] for k in pages}
            # The auto page's timed hovers, by the path that decoded them.
            auto_paths = {"browser": 0, "server": 0}
            order = list(range(len(points)))
            cursor = dict.fromkeys(pages, 0)
            while any(cursor[k] < len(order) for k in cursor):
                for path_name, page in pages.items():
                    box = page.locator("#view").bounding_box()
                    for _ in range(BLOCK):
                        i = cursor[path_name]
                        if i >= len(order):
                            break
                        x, y = points[i]
                        count = page.evaluate("window.samkit.state.hoverTimes.length")
                        page.mouse.move(box["x"] + x * box["width"] / w, box["y"] + y * box["height"] / h)
                        page.wait_for_function(
                            f"window.samkit.state.hoverTimes.length > {count}", timeout=60_000
                        )
                        took, decoder_ms, local = page.evaluate(
                            "[window.samkit.state.hoverTimes.at(-1), window.samkit.state.hover.decoder_ms,"
                            " window.samkit.state.hover.local === true]"
                        )
                        if i >= WARM_UP:
                            times[path_name].append(took)
                            decoder[path_name].append(decoder_ms)
                            if path_name == "auto":
                                auto_paths["browser" if local else "server"] += 1
                        cursor[path_name] += 1
                        page.wait_for_timeout(100)  # past the server path's 80 ms spacing of previews
            auto = pages["auto"].evaluate(
                "(({policy, chosen, medians, rounds}) => ({policy, chosen, medians, rounds}))(window.samkit.state.paths)"
            )
            version = browser.version
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    native = native_ort_ms(web.decoder, next(iter(service.images.values())), points[0])
    result = {
        "benchmark": "page_latency",
        "command": "python benchmarks/page_latency.py "
        + shlex.join(repo_relative(argv if argv is not None else sys.argv[1:])),
        "machine": machine(),
        "browser": f"Chromium {version} headless (/usr/bin/chromium), onnxruntime-web 1.20.1 wasm, 1 thread",
        "model": args.model,
        "weights": "random (torch.manual_seed(0)), float32",
        "image": f"skimage coffee {h}x{w}",
        "hovers": args.hovers,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "decoder_export_s": round(export_s, 2),
        "decoder_onnx_bytes": os.path.getsize(web.decoder),
        "pages": opened,
        "hover_to_mask": {k: stats(v) for k, v in times.items()},
        "decoder_only": {k: stats(v) for k, v in decoder.items()},
        "decoder_only_native_onnxruntime": stats(native),
        "auto": {**auto, "timed_hovers_by_path": auto_paths},
    }
    result["server_over_browser_median"] = round(
        result["hover_to_mask"]["server"]["median_ms"] / result["hover_to_mask"]["browser"]["median_ms"], 2
    )
    if args.note:
        result["note"] = args.note
    print(
        f"{args.model}: hover to mask median / p90: server {result['hover_to_mask']['server']['median_ms']} / "
        f"{result['hover_to_mask']['server']['p90_ms']} ms, browser {result['hover_to_mask']['browser']['median_ms']} / "
        f"{result['hover_to_mask']['browser']['p90_ms']} ms (server / browser {result['server_over_browser_median']}), "
        f"auto {result['hover_to_mask']['auto']['median_ms']} ms ({auto}, hovers {auto_paths}); "
        f"decoder only: server {statistics.median(decoder['server']):.1f} ms, browser "
        f"{statistics.median(decoder['browser']):.1f} ms, native ONNX Runtime {statistics.median(native):.1f} ms; load {load_before} -> {result['load_average_after']}"
    )
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
