"""The page of ``samkit serve`` decoding in headless Chromium with onnxruntime-web (wasm) and the ONNX decoder
the server exported: with ``?decode=browser``, click, exclude, box (each fed the previous low-res logits) and
hover give the masks the server's PyTorch decoder gives for the same prompts, with no /api/predict request;
by default ("auto") the page times both paths and keeps the faster one (a slowed browser path leaves it on the
server, a server that then slows down hands it to the browser); when the wasm does not load, the page says so
and decodes on the server. One server and one browser serve the module. The screenshot (docs/serve.png is a
copy) is kept in outputs/test_artifacts/serve_browser_decoding.png.

The runtime is the one ``make web-runtime`` installs (package-lock.json, into
samkit/serve/static/vendor/onnxruntime-web); nothing is downloaded here. Tolerances are those
:mod:`samkit.export.verify` holds fp32 ONNX exports to: >= 99.9% of each mask's pixels equal, IoU
predictions within 2e-3; the selected candidate's low-res logits within 1e-3 of the largest logit.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

pytest.importorskip("starlette", reason="samkit[serve] is part of the dev install")
pytest.importorskip("onnx", reason="samkit[onnx] is part of the dev install")
from PIL import Image  # noqa: E402

from samkit.export.verify import BOUNDS  # noqa: E402
from samkit.serve.app import create_app  # noqa: E402
from samkit.serve.state import ModelService  # noqa: E402
from samkit.serve.webdecoder import find_runtime, prepare_web_decoder  # noqa: E402
from samkit.utils.amg import rle_to_mask  # noqa: E402

from .serve_helpers import page_server  # noqa: E402
from .test_serve_browser import (  # noqa: E402
    ARTIFACTS,
    inside_point,
    open_image,
    watch,
)

TOKEN = "w3b"
FP32 = BOUNDS["fp32"]


@pytest.fixture(scope="module")
def server(shapes_model, tmp_path_factory):
    """The app with the decoder exported into a fresh cache and the installed runtime, on 127.0.0.1."""
    runtime, reason = find_runtime()
    if runtime is None:
        pytest.fail(f"{reason}: the in-browser decoding tests need it (make web-runtime installs it)")
    model, _ = shapes_model
    web = prepare_web_decoder(model, "vit_tiny", tmp_path_factory.mktemp("decoders"))
    assert web.available, web.reason
    service = ModelService(model)
    with page_server(create_app(service, token=TOKEN, web=web), service, TOKEN) as server:
        yield server


def same_masks(page_reply: dict, page_low: list, server_reply: dict, service: ModelService) -> None:
    """The page's decode and the server's for one prompt agree (bounds in the module docstring)."""
    assert len(page_reply["masks"]) == len(server_reply["masks"])
    for ours, theirs in zip(page_reply["masks"], server_reply["masks"]):
        a, b = rle_to_mask(ours), rle_to_mask(theirs)
        assert (a == b).mean() >= FP32.mask_agreement, (a == b).mean()
    assert np.abs(np.subtract(page_reply["scores"], server_reply["scores"])).max() <= FP32.iou_abs
    assert page_reply["areas"] == pytest.approx(server_reply["areas"], rel=1e-2, abs=10)
    _, stored = service.logits[server_reply["logits_id"]]  # Cx1x256x256: the server's low-res logits
    best = int(np.argmax(server_reply["scores"]))
    low = np.asarray(page_low, dtype=np.float32).reshape(stored.shape[-2:])
    assert np.abs(low - stored[best, 0]).max() <= 1e-3 * max(1.0, float(np.abs(stored[best, 0]).max()))


def test_the_page_decodes_in_the_browser_as_the_server_does(browser, server, shapes_image, tmp_path):
    image, shapes = shapes_image
    h, w = image.shape[:2]
    path = tmp_path / "shapes.png"
    Image.fromarray(image).save(path)
    order = np.argsort([-m.sum() for m in shapes])
    big, other = shapes[order[0]], shapes[order[1]]
    page = browser.new_page(viewport={"width": 1280, "height": 760})
    errors = watch(page)
    predicts: list[str] = []
    page.on("request", lambda r: predicts.append(r.url) if r.url.endswith("/api/predict") else None)
    page.goto(server.url + f"/?decode=browser&token={TOKEN}")
    page.wait_for_function("window.samkit.state.decoding !== 'starting'", timeout=60_000)
    state = lambda expr: page.evaluate(f"() => {{ const s = window.samkit.state; return {expr}; }}")  # noqa: E731
    assert state("s.decoding") == "browser" and page.inner_text("#decoding") == "decoding in the browser"
    open_image(page, path)
    page.uncheck("#hover")
    image_id = state("s.image.image_id")
    idle = "window.samkit.state.busy === 0"

    def at(x: float, y: float) -> tuple[float, float]:
        box = page.locator("#view").bounding_box()
        return box["x"] + (x + 0.5) * box["width"] / w, box["y"] + (y + 0.5) * box["height"] / h

    def page_result() -> tuple[dict, list]:
        result = state("(({lowRes, ...r}) => r)(s.history[s.position].result)")
        low = state("Array.from(s.history[s.position].result.lowRes[s.history[s.position].result.selected])")
        return result, low

    def server_predict(result: dict, previous: dict | None) -> dict:
        body = {k: result["body"][k] for k in ("image_id", "points", "labels", "box", "multimask")}
        if previous is not None:  # the server's logits of the previous prompt, where the page used its own
            body["mask_input"] = {
                "logits_id": previous["logits_id"],
                "index": int(np.argmax(previous["scores"])),
            }
        reply = server.api.post("/api/predict", json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()

    # A click: three candidates, decoded in the page, as the server decodes them.
    page.mouse.click(*at(*inside_point(big)))
    page.wait_for_function(f"window.samkit.state.predictions === 1 && {idle}")
    first, low = page_result()
    assert first["local"] and len(first["masks"]) == 3 and "decoder" in page.inner_text("#latency")
    theirs = server_predict(first, None)
    same_masks(first, low, theirs, server.service)
    assert first["selected"] == int(np.argmax(theirs["scores"]))
    mask = rle_to_mask(first["masks"][first["selected"]])
    assert (mask & big).sum() / (mask | big).sum() > 0.5

    # An exclude point (the first mask's low-res logits fed back), then a box around another shape.
    page.mouse.click(*at(3, 3), button="right")
    page.wait_for_function(f"window.samkit.state.predictions === 2 && {idle}")
    second, low = page_result()
    assert second["body"]["labels"] == [1, 0]
    previous = theirs
    theirs = server_predict(second, previous)
    same_masks(second, low, theirs, server.service)
    ys, xs = np.nonzero(other)
    page.mouse.move(*at(max(xs.min() - 3, 0), max(ys.min() - 3, 0)))
    page.mouse.down()
    page.mouse.move(*at(min(xs.max() + 3, w - 1), min(ys.max() + 3, h - 1)), steps=6)
    page.mouse.up()
    page.wait_for_function(f"window.samkit.state.predictions === 3 && {idle}")
    third, low = page_result()
    assert third["body"]["box"] is not None
    same_masks(third, low, server_predict(third, theirs), server.service)
    # The page's RLE exports as the server's masks do.
    page.click("#keep")
    page.wait_for_function(idle)
    kept = state("s.objects[0].mask")
    reply = server.api.post(
        "/api/export", json={"image_id": image_id, "format": "png", "objects": [{"mask": kept}]}
    )
    assert reply.status_code == 200

    # Hover: the single-mask output for the points so far plus the pointer, no request either.
    page.check("#hover")
    page.mouse.move(*at(*inside_point(other)))
    page.wait_for_function("window.samkit.state.hover !== null")
    hover = state("(({lowRes, ...r}) => r)(s.hover)")
    low = state("Array.from(s.hover.lowRes[0])")
    body = {"image_id": image_id, **hover["prompt"], "multimask": False}
    assert len(body["points"]) == 1 and body["labels"] == [1]
    same_masks(hover, low, server.api.post("/api/predict", json=body).json(), server.service)
    assert state("s.hoverTimes.length") >= 1
    assert predicts == [], predicts  # every mask came from the page's own decoder
    # The screenshot (docs/serve.png is a copy): a fresh click's mask and a hover preview on another shape.
    page.mouse.click(*at(*inside_point(big)))  # the prompt was cleared when the object was kept
    page.wait_for_function(f"window.samkit.state.predictions === 4 && {idle}")
    hovers = state("s.hoverTimes.length")
    page.mouse.move(*at(*inside_point(shapes[order[2]])))
    page.wait_for_function(f"window.samkit.state.hoverTimes.length > {hovers}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_browser_decoding.png"))
    assert predicts == [], predicts
    assert errors == [], errors
    page.close()


def goto_decoding_on_the_server(page, url: str, because: str) -> None:
    """Open the page at ``url``; it must settle on server decoding, its header saying so and why."""
    page.goto(url)
    page.wait_for_function("window.samkit.state.decoding !== 'starting'", timeout=60_000)
    assert page.evaluate("window.samkit.state.decoding") == "server"
    assert page.inner_text("#decoding") == "decoding on the server"
    assert because in page.get_attribute("#decoding", "title")


def test_the_page_decodes_on_the_server_when_the_wasm_does_not_load(browser, server, shapes_image, tmp_path):
    image, shapes = shapes_image
    path = tmp_path / "fallback.png"
    Image.fromarray(image).save(path)
    page = browser.new_page(viewport={"width": 1280, "height": 760})
    page.route("**/runtime/ort-wasm-simd-threaded.wasm", lambda route: route.abort())
    goto_decoding_on_the_server(page, server.url + f"/?token={TOKEN}", because="onnxruntime-web failed")
    open_image(page, path)
    page.uncheck("#hover")
    box = page.locator("#view").bounding_box()
    x, y = inside_point(shapes[0])
    h, w = image.shape[:2]
    with page.expect_request("**/api/predict"):
        page.mouse.click(box["x"] + (x + 0.5) * box["width"] / w, box["y"] + (y + 0.5) * box["height"] / h)
    page.wait_for_function("window.samkit.state.predictions === 1 && window.samkit.state.busy === 0")
    result = page.evaluate("window.samkit.state.history[1].result")
    assert result.get("local") is None and result["logits_id"]  # the server's reply
    page.close()


def test_auto_keeps_the_faster_path_and_moves_to_the_browser_when_the_server_slows(
    browser, server, shapes_image, tmp_path
):
    """Auto (the default): the first hovers alternate between the paths, 3 each; with every in-page decode
    made 1 s slower the page stays on the server; once each /api/predict is held 1.5 s (a busy server) and the
    browser is no longer slowed, the first slow reply starts a re-check that moves the page to the browser."""
    image, shapes = shapes_image
    h, w = image.shape[:2]
    path = tmp_path / "auto.png"
    Image.fromarray(image).save(path)
    page = browser.new_page(viewport={"width": 1280, "height": 760})
    errors = watch(page)
    predicts: list[str] = []
    page.on("request", lambda r: predicts.append(r.url) if r.url.endswith("/api/predict") else None)
    page.goto(server.url + f"/?token={TOKEN}")
    # The browser path made slow: each in-page decode waits window.slowBrowser ms first (and is counted).
    page.evaluate(
        """() => {
        const web = window.SamkitWebDecoder, decode = web.decode;
        window.slowBrowser = 1000; window.browserDecodes = 0;
        web.decode = async (...args) => {
            window.browserDecodes++;
            await new Promise((done) => setTimeout(done, window.slowBrowser));
            return decode(...args);
        };
    }"""
    )
    page.wait_for_function("window.samkit.state.decoding !== 'starting'", timeout=60_000)
    state = lambda expr: page.evaluate(f"() => {{ const s = window.samkit.state; return {expr}; }}")  # noqa: E731
    assert state("s.decoding") == "timing" and page.inner_text("#decoding") == "decoding: timing both paths"
    open_image(page, path)
    box = page.locator("#view").bounding_box()
    at = lambda x, y: (box["x"] + (x + 0.5) * box["width"] / w, box["y"] + (y + 0.5) * box["height"] / h)  # noqa: E731
    moves = iter(range(1, 1000))

    def hover() -> None:  # one pointer move to a new pixel, then its preview drawn (one decode)
        k, n = next(moves), state("s.hoverTimes.length")
        page.mouse.move(*at((7 * k) % (w - 2) + 1, (5 * k) % (h - 2) + 1))
        page.wait_for_function(f"window.samkit.state.hoverTimes.length > {n}", timeout=60_000)

    for _ in range(6):
        hover()
    medians = state("s.paths.medians")
    assert state("s.decoding") == "server", medians
    assert (page.evaluate("window.browserDecodes"), len(predicts)) == (3, 3)
    assert medians["browser"] >= 1000 > medians["server"]
    assert page.inner_text("#decoding") == "decoding on the server (auto)"
    title = page.get_attribute("#decoding", "title")
    shown = re.search(r"median (\d+) ms in the browser, (\d+) ms on the server", title)
    assert shown and np.allclose(
        [int(g) for g in shown.groups()], [medians["browser"], medians["server"]], atol=1
    )
    hover()
    hover()
    # The choice holds (were a hover 3x slower than the median, the re-check would keep the server too).
    assert state("s.decoding") == "server"
    # A click (its mask is refined below, once the browser is chosen).
    page.uncheck("#hover")
    page.mouse.click(*at(*inside_point(shapes[0])))
    page.wait_for_function("window.samkit.state.predictions === 1 && window.samkit.state.busy === 0")
    clicked_in_browser = state("s.history[1].result.local === true")  # no: on the server, unless re-checking
    page.check("#hover")
    counts = lambda: (page.evaluate("window.browserDecodes"), len(predicts))  # noqa: E731
    before = counts()

    # The server becomes busy: each /api/predict is held 1.5 s; the browser is no longer slowed.
    def busy(route) -> None:
        time.sleep(1.5)
        route.continue_()

    page.route("**/api/predict", busy)
    page.evaluate("window.slowBrowser = 0")
    for _ in range(10):
        hover()
        if state("s.decoding") == "browser":
            break
    medians = state("s.paths.medians")
    assert state("s.decoding") == "browser", medians
    assert medians["server"] >= 1500 > medians["browser"]
    assert page.inner_text("#decoding") == "decoding in the browser (auto)"
    # A slow reply started the re-check: 3 decodes timed on each path (that reply included).
    browser_decodes, server_decodes = np.subtract(counts(), before)
    assert browser_decodes >= 3 and server_decodes >= 3 and state("s.paths.rounds") >= 2
    page.unroute("**/api/predict")
    # An exclude point refines the click's mask: it stays on the path that made it, which holds its logits
    # (the server, as a rule: there the browser is chosen now).
    page.uncheck("#hover")
    before = counts()
    page.mouse.click(*at(3, 3), button="right")
    page.wait_for_function("window.samkit.state.predictions === 2 && window.samkit.state.busy === 0")
    refined = state("(({lowRes, ...r}) => r)(s.history[2].result)")
    if clicked_in_browser:
        assert tuple(np.subtract(counts(), before)) == (1, 0) and refined["local"]
    else:
        assert tuple(np.subtract(counts(), before)) == (0, 1) and refined["body"]["mask_input"] is not None
    assert errors == [], errors
    page.close()


def test_decode_server_in_the_address_loads_no_wasm(browser, server, shapes_image, tmp_path):
    """?decode=server forces the server path: the page fetches neither the runtime, the decoder nor the
    embedding, and its header says why."""
    image, _ = shapes_image
    path = tmp_path / "forced.png"
    Image.fromarray(image).save(path)
    page = browser.new_page(viewport={"width": 1280, "height": 760})
    wasm = ("/runtime/", "/api/decoder.onnx", "/embedding")
    fetched: list[str] = []
    page.on("request", lambda r: fetched.append(r.url) if any(k in r.url for k in wasm) else None)
    goto_decoding_on_the_server(page, server.url + f"/?decode=server&token={TOKEN}", because="?decode=server")
    open_image(page, path)
    assert fetched == [] and page.evaluate("window.ort === undefined")
    page.close()
