"""The page of ``samkit serve`` in a real headless Chromium (Debian's, driven by Playwright): upload,
click, right click, box, undo, 'everything' and export, each checked against the JSON API; a phone-size
screen with touch (tap, Add/Remove mode, pinch zoom, no sideways scroll); picking, keeping and editing
masks; a cancelled 'everything'. One server and one browser serve the whole module.

Chromium is installed with apt when /usr/bin/chromium is missing (CI machines start bare and run as
root); a failed install fails the test. The screenshot is kept in outputs/test_artifacts/serve.png.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="samkit[serve] is part of the dev install")
from PIL import Image  # noqa: E402

from samkit.serve.app import create_app  # noqa: E402
from samkit.serve.state import ModelService  # noqa: E402
from samkit.serve.webdecoder import prepare_web_decoder  # noqa: E402
from samkit.utils.amg import rle_to_mask  # noqa: E402

from .serve_helpers import page_server  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parents[1] / "outputs" / "test_artifacts"
TOKEN = "t0k"


@pytest.fixture(scope="module")
def server(shapes_model, tmp_path_factory):
    """The app on 127.0.0.1 in a thread of this process (uvicorn, one model, as the command runs it),
    with a token: ``url``, ``service`` and ``api`` (an httpx client that sends the token). Its
    onnxruntime-web folder is empty, so the page decodes on the server (the masks checked below are the
    API's exactly; tests/test_serve_webdecode.py checks the page's own decoding)."""
    model, _ = shapes_model
    service = ModelService(model)
    web = prepare_web_decoder(model, "vit_tiny", runtime_dir=tmp_path_factory.mktemp("no-runtime"))
    assert not web.available and "ort.wasm.min.js is missing" in web.reason
    with page_server(create_app(service, token=TOKEN, web=web), service, TOKEN) as server:
        yield server


def watch(page) -> list[str]:
    """Page errors and console errors (a 404 for a favicon is one) collected while the test runs."""
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return errors


def open_image(page, path: Path) -> None:
    page.set_input_files("#file", str(path))
    page.wait_for_function(
        "window.samkit.state.image !== null && window.samkit.state.busy === 0", timeout=120_000
    )


def inside_point(mask: np.ndarray) -> tuple[int, int]:
    """A pixel deep inside ``mask`` (the one farthest from its edge, by repeated erosion)."""
    current = mask.copy()
    while True:
        p = np.pad(current, 1)
        eroded = current & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        if not eroded.any():
            ys, xs = np.nonzero(current)
            return int(xs[len(xs) // 2]), int(ys[len(ys) // 2])
        current = eroded


def test_the_page_in_chromium(browser, server, shapes_image, tmp_path):
    image, shapes = shapes_image
    h, w = image.shape[:2]
    path = tmp_path / "shapes.png"
    Image.fromarray(image).save(path)
    api = server.api
    order = np.argsort([-m.sum() for m in shapes])
    big, other = shapes[order[0]], shapes[order[1]]

    page = browser.new_page(viewport={"width": 1280, "height": 760}, accept_downloads=True)
    errors = watch(page)
    page.goto(server.url + f"/?token={TOKEN}")
    state = lambda expr: page.evaluate(f"() => {{ const s = window.samkit.state; return {expr}; }}")  # noqa: E731
    idle = "window.samkit.state.busy === 0"

    # Upload with the file button; the embedding is computed once.
    page.set_input_files("#file", str(path))
    page.wait_for_function(
        "window.samkit.state.image !== null && window.samkit.state.busy === 0", timeout=120_000
    )
    assert state("[s.image.width, s.image.height]") == [w, h]
    assert "encoder" in page.inner_text("#latency")
    # Without onnxruntime-web the page says it decodes on the server, and why.
    page.wait_for_function("window.samkit.state.decoding === 'server'")
    assert page.inner_text("#decoding") == "decoding on the server"
    assert "ort.wasm.min.js is missing" in page.get_attribute("#decoding", "title")
    page.uncheck("#hover")  # previews on while clicking would race the checks below

    box = page.locator("#view").bounding_box()

    def at(x: float, y: float) -> tuple[float, float]:
        return box["x"] + (x + 0.5) * box["width"] / w, box["y"] + (y + 0.5) * box["height"] / h

    def replay() -> tuple[np.ndarray, dict]:
        """The page's current prompt sent to the API again: the page's mask must be the API's."""
        result = state("s.history[s.position].result")
        reply = api.post("/api/predict", json=result["body"]).json()
        assert reply["masks"][result["selected"]] == result["masks"][result["selected"]]
        best = int(np.argmax(reply["scores"]))
        assert result["selected"] == best
        return rle_to_mask(reply["masks"][best]), result

    # 1. A left click: a mask appears, three candidates to choose from.
    page.mouse.click(*at(*inside_point(big)))
    page.wait_for_function(f"window.samkit.state.predictions === 1 && {idle}")
    first, result = replay()
    assert first.sum() > 0 and len(result["masks"]) == 3
    assert page.locator("#candidates button").count() == 3
    iou = (first & big).sum() / (first | big).sum()
    assert iou > 0.5, f"the shapes model's mask should cover the clicked shape (IoU {iou:.2f})"

    # Its PNG export equals the API's mask for the same prompt.
    page.select_option("#export-source", "current")
    page.select_option("#export-format", "png")
    with page.expect_download() as download:
        page.click("#export")
    exported = np.asarray(Image.open(io.BytesIO(Path(download.value.path()).read_bytes()))) > 0
    assert exported.shape == (h, w) and (exported == first).all()

    # The other candidates can be chosen instead of the best-scored one.
    chosen = (result["selected"] + 1) % 3
    page.click(f'#candidates button[data-candidate="{chosen}"]')
    assert state("s.history[s.position].result.selected") == chosen
    page.click(f'#candidates button[data-candidate="{result["selected"]}"]')
    assert page.locator("#candidates button.selected").count() == 1

    # 2. A right click inside the mask, away from the positive point, removes area.
    ys, xs = np.nonzero(first)
    px, py = inside_point(big)
    far = int(np.argmax((xs - px) ** 2 + (ys - py) ** 2))
    nx, ny = int(xs[far] + (px - xs[far]) * 0.15), int(ys[far] + (py - ys[far]) * 0.15)
    page.mouse.click(*at(nx, ny), button="right")
    page.wait_for_function(f"window.samkit.state.predictions === 2 && {idle}")
    second, result = replay()
    assert state("s.history[s.position].labels") == [1, 0]
    assert "mask_input" in result["body"]  # the previous logits were fed back
    assert second.sum() < first.sum()

    # 3. A drag draws a box around another shape.
    ys, xs = np.nonzero(other)
    page.mouse.move(*at(max(xs.min() - 3, 0), max(ys.min() - 3, 0)))
    page.mouse.down()
    page.mouse.move(*at(min(xs.max() + 3, w - 1), min(ys.max() + 3, h - 1)), steps=8)
    page.mouse.up()
    page.wait_for_function(f"window.samkit.state.predictions === 3 && {idle}")
    third, result = replay()
    assert result["body"]["box"] is not None and third.sum() > 0

    # 4. Undo goes back to the two points and their mask; redo forward again.
    page.click("#undo")
    assert state("s.history[s.position].box") is None
    assert (
        rle_to_mask(state("s.history[s.position].result.masks[s.history[s.position].result.selected]"))
        == second
    ).all()
    page.click("#redo")
    assert state("s.history[s.position].box") is not None
    # Shift+click is a negative point too.
    page.keyboard.down("Shift")
    page.mouse.click(*at(*inside_point(big)))
    page.keyboard.up("Shift")
    page.wait_for_function(f"window.samkit.state.predictions === 4 && {idle}")
    assert state("s.history[s.position].labels") == [1, 0, 0]
    replay()
    page.fill("#name", "boxed shape")
    page.click("#keep")
    page.wait_for_function(idle)
    assert page.inner_text("#objects").startswith("boxed shape")

    # 5. 'Segment everything' shows as many masks as the API gives for the same settings.
    settings = {"points_per_side": 8, "pred_iou_thresh": 0.5, "stability_score_thresh": 0.8}
    for name, value in settings.items():
        page.fill(f"#{name}", str(value))
    page.click("#everything")
    page.wait_for_function(f"window.samkit.state.everything !== null && {idle}", timeout=120_000)
    shown = state("s.everything.masks.map((m) => m.segmentation)")
    image_id = state("s.image.image_id")
    reply = api.post(
        "/api/everything",
        json={"image_id": image_id, "box_nms_thresh": 0.7, "crop_n_layers": 0, **settings},
    )
    expected = [m["segmentation"] for m in reply.json()["masks"]]
    assert len(shown) == len(expected) > 0 and shown == expected
    n = len(expected)
    assert page.inner_text("#everything-count") == f"{n} mask{'' if n == 1 else 's'}"

    # Hover highlights the mask under the pointer (the smallest covering it) and names it.
    owners = np.array(state("Array.from(s.everything.owner)")).reshape(h, w)
    covered = np.bincount(owners[owners >= 0])
    target = int(np.argmax(covered))  # the mask that owns the most pixels
    page.mouse.move(*at(*inside_point(owners == target)))
    page.wait_for_function(f"document.getElementById('info').textContent.startsWith('mask {target}:')")
    assert state("s.everything.masks.length") > target
    if (owners < 0).any():  # a pixel no mask covers clears the line
        page.mouse.move(*at(*inside_point(owners < 0)))
        page.wait_for_function("document.getElementById('info').textContent === ''")
    # The hover preview follows the pointer.
    page.check("#hover")
    page.mouse.move(*at(*inside_point(other)))
    page.wait_for_function("window.samkit.state.hover !== null", timeout=60_000)
    page.wait_for_function(idle)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve.png"))
    # Dropping the same file again re-opens it from the embedding cache (no encoder run).
    encoded = base64.b64encode(path.read_bytes()).decode()
    page.evaluate(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            window.samkit.state.image = null;
            document.getElementById("stage").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer }));
        }""",
        encoded,
    )
    page.wait_for_function(f"window.samkit.state.image !== null && {idle}", timeout=60_000)
    assert state("[s.image.image_id, s.image.cached, s.objects.length]") == [image_id, True, 0]
    assert page.inner_text("#latency") == "encoder: cached"
    assert errors == [], errors
    page.close()


def touch(cdp, kind: str, points: list[tuple[float, float]]) -> None:
    """One touch event with these fingers (viewport CSS pixels), as a touch screen sends it."""
    fingers = [{"x": x, "y": y, "id": i} for i, (x, y) in enumerate(points)]
    cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": fingers})


def test_the_page_on_a_phone(browser, server, shapes_image, tmp_path):
    """390 px wide with touch: the token hint, disabled buttons before an image, taps in Add and Remove
    mode, a pinch that zooms the image (not the page: no sideways scroll) and a tap that still hits."""
    image, shapes = shapes_image
    h, w = image.shape[:2]
    path = tmp_path / "phone.png"
    Image.fromarray(image).save(path)
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    errors = watch(page)
    state = lambda expr: page.evaluate(f"() => {{ const s = window.samkit.state; return {expr}; }}")  # noqa: E731
    idle = "window.samkit.state.busy === 0"

    page.goto(server.url + "/")  # without ?token=: the page says what to do
    page.wait_for_function("document.getElementById('error').textContent.includes('open the full address')")
    errors.clear()  # the 401 itself is logged as a console error
    for button in ("undo", "redo", "clear", "keep", "everything", "export", "zoom-in"):
        assert page.is_disabled(f"#{button}"), button

    page.goto(server.url + f"/?token={TOKEN}")
    open_image(page, path)
    page.uncheck("#hover")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.is_enabled("#undo") is False and page.is_enabled("#everything")

    def at(x: float, y: float) -> tuple[float, float]:
        box = page.locator("#view").bounding_box()
        return box["x"] + (x + 0.5) * box["width"] / w, box["y"] + (y + 0.5) * box["height"] / h

    big = shapes[int(np.argmax([m.sum() for m in shapes]))]
    x, y = inside_point(big)
    page.touchscreen.tap(*at(x, y))
    page.wait_for_function(f"window.samkit.state.predictions === 1 && {idle}")
    assert state("s.history[s.position].labels") == [1]
    tapped = state("s.history[s.position].points[0]")
    scale = w / page.locator("#view").bounding_box()["width"]  # image pixels per CSS pixel
    assert abs(tapped[0] - x - 0.5) <= scale and abs(tapped[1] - y - 0.5) <= scale
    page.tap("#mode-remove")
    page.touchscreen.tap(*at(3, 3))
    page.wait_for_function(f"window.samkit.state.predictions === 2 && {idle}")
    assert state("s.history[s.position].labels") == [1, 0]
    page.tap("#mode-add")

    # Two fingers spread apart zoom in about their middle; the stage scrolls, the page does not.
    width = page.locator("#view").bounding_box()["width"]
    cdp = context.new_cdp_session(page)
    cx, cy = at(w / 2, h / 2)
    touch(cdp, "touchStart", [(cx - 20, cy), (cx + 20, cy)])
    for k in range(1, 7):
        touch(cdp, "touchMove", [(cx - 20 - 15 * k, cy), (cx + 20 + 15 * k, cy)])
    touch(cdp, "touchEnd", [])
    assert state("s.zoom") > 2.5 and page.locator("#view").bounding_box()["width"] > 2.5 * width
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert (
        state("s.predictions") == 2 and len(state("s.history[s.position].points")) == 2
    )  # a pinch is no tap
    # The middle pixel stayed under the fingers' middle; a tap there lands on it.
    page.touchscreen.tap(cx, cy)
    page.wait_for_function(f"window.samkit.state.predictions === 3 && {idle}")
    px, py = state("s.history[s.position].points[2]")
    assert abs(px - (w / 2 + 0.5)) <= 2 and abs(py - (h / 2 + 0.5)) <= 2
    page.tap("#zoom-fit")
    assert abs(page.locator("#view").bounding_box()["width"] - width) <= 1
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_phone.png"))
    assert errors == [], errors
    context.close()


def test_everything_pick_keep_edit_and_cancel(browser, server, shapes_image, tmp_path):
    image, shapes = shapes_image
    h, w = image.shape[:2]
    path = tmp_path / "pick.png"
    Image.fromarray(image).save(path)
    page = browser.new_page(viewport={"width": 1280, "height": 760}, accept_downloads=True)
    errors = watch(page)
    page.goto(server.url + f"/?token={TOKEN}")
    state = lambda expr: page.evaluate(f"() => {{ const s = window.samkit.state; return {expr}; }}")  # noqa: E731
    idle = "window.samkit.state.busy === 0"
    open_image(page, path)
    page.uncheck("#hover")
    assert page.is_disabled("#mode-pick") and page.is_disabled("#keep-picked")

    def at(x: float, y: float) -> tuple[float, float]:
        box = page.locator("#view").bounding_box()
        return box["x"] + (x + 0.5) * box["width"] / w, box["y"] + (y + 0.5) * box["height"] / h

    def run_everything(**settings) -> None:
        for name, value in settings.items():
            page.fill(f"#{name}", str(value))
        page.click("#everything")
        page.wait_for_function(f"window.samkit.state.everything !== null && {idle}", timeout=120_000)

    # The wheel zooms about the pointer; a middle-button drag pans; Fit goes back.
    page.mouse.move(*at(w // 2, h // 2))
    page.mouse.wheel(0, -400)
    page.wait_for_function("window.samkit.state.zoom > 2")
    left = page.evaluate("document.getElementById('stage').scrollLeft")
    page.mouse.down(button="middle")
    page.mouse.move(*at(w // 2 - 20, h // 2), steps=4)
    page.mouse.up(button="middle")
    assert page.evaluate("document.getElementById('stage').scrollLeft") > left
    assert state("s.predictions") == 0 and state("s.history.length") == 1  # neither prompted anything
    page.click("#zoom-fit")
    assert state("s.zoom") == 1

    # Nothing passes impossible thresholds: "0 masks" and a hint what to change.
    run_everything(points_per_side=4, pred_iou_thresh=1, stability_score_thresh=1)
    assert page.inner_text("#everything-count") == "0 masks" and page.is_visible("#everything-hint")

    # A long run shows its elapsed time and stops on Cancel (the model is held busy meanwhile).
    with server.service.lock:
        page.click("#everything")
        page.wait_for_function(
            "/everything… [0-9.]+ s/.test(document.getElementById('progress-text').textContent)"
        )
        assert page.is_visible("#cancel")
        first = float(page.inner_text("#progress-text").split()[-2])
        page.wait_for_function(
            f"parseFloat(document.getElementById('progress-text').textContent.split(' ').at(-2)) > {first + 0.3}"
        )
        page.click("#cancel")
        page.wait_for_function(idle)
    assert page.inner_text("#everything-count") == "cancelled" and page.is_hidden("#cancel")
    deadline = time.time() + 30
    while server.service.cancels:  # the server side saw the cancel too
        assert time.time() < deadline
        time.sleep(0.05)

    # Pick masks one by one (a second tap unpicks), keep them, export them.
    run_everything(points_per_side=8, pred_iou_thresh=0.5, stability_score_thresh=0.8)
    masks = state("s.everything.masks.map((m) => m.segmentation)")
    assert len(masks) >= 2 and page.is_hidden("#everything-hint")
    owners = np.array(state("Array.from(s.everything.owner)")).reshape(h, w)
    first_pick, second_pick = np.argsort(-np.bincount(owners[owners >= 0]))[:2]
    page.click("#mode-pick")
    for index in (first_pick, second_pick, second_pick):
        page.mouse.click(*at(*inside_point(owners == index)))
    assert state("s.picked") == [int(first_pick)] and page.inner_text("#picked-count") == "1 picked mask"
    page.mouse.click(*at(*inside_point(owners == second_pick)))
    assert state("s.picked") == [int(first_pick), int(second_pick)]
    assert state("s.predictions") == 0  # picking prompts nothing
    page.select_option("#export-source", "picked")
    page.select_option("#export-format", "png")
    with page.expect_download() as download:
        page.click("#export")
    labels = np.asarray(Image.open(io.BytesIO(Path(download.value.path()).read_bytes())))
    first_mask, second_mask = rle_to_mask(masks[first_pick]), rle_to_mask(masks[second_pick])
    assert ((labels == 1) == (first_mask & ~second_mask)).all()  # a later label wins where masks overlap
    assert ((labels == 2) == second_mask).all() and second_mask.any()
    page.click("#keep-picked")
    assert state("s.objects.map((o) => o.name)") == [f"mask {first_pick}", f"mask {second_pick}"]

    # A kept object is edited again: its mask comes back as the current one, a click refines it.
    page.click("#mode-add")
    page.click("#objects li:nth-child(1) button.edit")
    assert page.input_value("#name") == f"mask {first_pick}"
    assert page.inner_text("#objects li:nth-child(1)").count("editing") == 1
    current = state("s.history[s.position].result")
    assert current["masks"][current["selected"]] == masks[first_pick]
    page.mouse.click(*at(*inside_point(owners == first_pick)))
    page.wait_for_function(f"window.samkit.state.predictions === 1 && {idle}")
    assert state("s.history[s.position].points.length") == 1
    page.click("#keep")
    page.wait_for_function(idle)
    assert state("s.objects.map((o) => o.name)") == [f"mask {first_pick}", f"mask {second_pick}"]
    assert state("s.editing") is None and "editing" not in page.inner_text("#objects")
    kept = state("s.objects[0].mask")
    assert kept == state("s.history[s.position - 1].result.masks[s.history[s.position - 1].result.selected]")
    # An object kept from clicks comes back with its points; the next click adds to them.
    page.click("#objects li:nth-child(1) button.edit")
    assert len(state("s.history[s.position].points")) == 1
    page.mouse.click(*at(2, 2), button="right")
    page.wait_for_function(f"window.samkit.state.predictions === 2 && {idle}")
    assert state("s.history[s.position].labels") == [1, 0]
    assert "mask_input" in state("s.history[s.position].result.body")
    assert errors == [], errors
    page.close()
