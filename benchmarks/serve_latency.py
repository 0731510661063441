"""Decoder round trips through ``samkit serve``'s HTTP API against the in-process call, and a bounded load test.

    python benchmarks/serve_latency.py [--model vit_b] [--clients 8] [--requests 50] [--out results.json]

The server runs in a child process (uvicorn on 127.0.0.1, one model with random weights: the decoder,
which is what is timed here, is the same network for every model size). The photo is
``skimage.data.coffee()`` (400x600), embedded once. Then, with seeded random single-point prompts
(``multimask: true``, the page's first click):

(a) in process: ``SamPredictor.predict`` on the same model and photo, ``--requests`` calls, timed in
    the main thread and in a worker thread (where the server runs it; on a loaded machine the two differ);
(b) one client: the same prompts as POST /api/predict (HTTP + JSON + RLE overhead), each right after
    its in-process twin, so that the machine's other load falls on (a) and (b) alike;
(c) load: ``--clients`` concurrent clients x ``--requests`` requests each; every reply must be 200.

Printed and written: p50/p95 latency in ms of each, the server's own decoder time, throughput, errors.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from common import machine, write_result

from samkit.build import build_model


def percentiles(values: list[float]) -> dict[str, float]:
    q = np.percentile(np.asarray(values), [50, 95])
    return {"p50_ms": round(float(q[0]), 2), "p95_ms": round(float(q[1]), 2), "n": len(values)}


def serve_child(model: str, dtype: str) -> None:
    """The server process: print the port, then serve until killed."""
    import uvicorn

    from samkit.serve.app import create_app
    from samkit.serve.state import ModelService

    torch.manual_seed(0)
    sam = build_model(model).to(dtype=getattr(torch, dtype))
    config = uvicorn.Config(create_app(ModelService(sam)), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    original = server.startup

    async def startup(sockets=None) -> None:
        await original(sockets)
        port = server.servers[0].sockets[0].getsockname()[1]
        print(f"port {port}", flush=True)

    server.startup = startup  # type: ignore[method-assign]
    server.run()


def prompts(n: int, h: int, w: int, seed: int) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    return [[float(rng.uniform(0, w - 1)), float(rng.uniform(0, h - 1))] for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--out")
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child:
        serve_child(args.model, args.dtype)
        return

    import io

    import httpx
    from PIL import Image
    from skimage import data

    from samkit.predictor import SamPredictor

    photo = data.coffee()
    h, w = photo.shape[:2]
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")

    child = subprocess.Popen(
        [sys.executable, __file__, "--serve-child", "--model", args.model, "--dtype", args.dtype],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(child.stdout.readline().split()[1])
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=600) as client:
            start = time.perf_counter()
            reply = client.post(
                "/api/images", content=buffer.getvalue(), headers={"content-type": "image/png"}
            )
            reply.raise_for_status()
            upload_ms = (time.perf_counter() - start) * 1000
            image_id = reply.json()["image_id"]

            def ask(c: httpx.Client, point: list[float]) -> tuple[float, float, int]:
                body = {"image_id": image_id, "points": [point], "labels": [1], "multimask": True}
                start = time.perf_counter()
                r = c.post("/api/predict", json=body)
                took = (time.perf_counter() - start) * 1000
                return took, (r.json().get("decoder_ms", 0.0) if r.status_code == 200 else 0.0), r.status_code

            # (a) and (b) alternate, call by call, so that the machine's other load falls on both alike.
            torch.manual_seed(0)
            predictor = SamPredictor(build_model(args.model).to(dtype=getattr(torch, args.dtype)).eval())
            predictor.set_image(photo)

            def call(point: list[float]) -> float:
                start = time.perf_counter()
                predictor.predict(np.array([point]), np.array([1]), multimask_output=True)
                return (time.perf_counter() - start) * 1000

            # The server runs the model in a worker thread; the in-process call is timed both in this
            # (main) thread and in a worker thread, as the two differ on a loaded machine.
            worker_pool = ThreadPoolExecutor(1)
            in_process, in_worker, single = [], [], []
            for point in prompts(args.requests + 1, h, w, seed=0):
                in_process.append(call(point))
                in_worker.append(worker_pool.submit(call, point).result())
                single.append(ask(client, point))
            worker_pool.shutdown()
            in_process, in_worker, single = in_process[1:], in_worker[1:], single[1:]  # warm-up calls

        # (c) load
        results: list[tuple[float, float, int]] = []
        lock = threading.Lock()

        def worker(k: int) -> None:
            with httpx.Client(base_url=base, timeout=600) as c:
                for p in prompts(args.requests, h, w, seed=100 + k):
                    outcome = ask(c, p)
                    with lock:
                        results.append(outcome)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        load_s = time.perf_counter() - start
    finally:
        child.terminate()
        child.wait(timeout=30)

    errors = sum(1 for _, _, status in results if status != 200) + sum(1 for _, _, s in single if s != 200)
    result = {
        "benchmark": "serve_latency",
        "machine": machine(),
        "model": args.model,
        "dtype": args.dtype,
        "image": f"skimage coffee {h}x{w}",
        "prompt": "one random point, multimask_output=True",
        "upload_and_embed_ms": round(upload_ms, 1),
        "in_process": percentiles(in_process),
        "in_process_worker_thread": percentiles(in_worker),
        "http_one_client": {
            **percentiles([s[0] for s in single]),
            "server_decoder": percentiles([s[1] for s in single]),
        },
        "http_load": {
            "clients": args.clients,
            "requests_per_client": args.requests,
            **percentiles([r[0] for r in results]),
            "server_decoder": percentiles([r[1] for r in results]),
            "throughput_rps": round(len(results) / load_s, 2),
            "errors": errors,
        },
    }
    print(
        f"in process p50 {result['in_process']['p50_ms']} ms (in a worker thread "
        f"{result['in_process_worker_thread']['p50_ms']} ms); HTTP one client p50 "
        f"{result['http_one_client']['p50_ms']} ms (p95 {result['http_one_client']['p95_ms']}); "
        f"{args.clients}x{args.requests} load p50 {result['http_load']['p50_ms']} ms, p95 "
        f"{result['http_load']['p95_ms']} ms, {result['http_load']['throughput_rps']} req/s, {errors} errors"
    )
    print(f"median server decoder time under load: {statistics.median(r[1] for r in results):.1f} ms")
    write_result(args.out, result)
    if errors:
        raise SystemExit(f"{errors} requests failed")


if __name__ == "__main__":
    main()
