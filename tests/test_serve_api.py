"""The JSON API of ``samkit serve`` through Starlette's TestClient: every endpoint, every bad request
(each a 4xx JSON with one message), the results equal to in-process calls, and the command line."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import urllib.request
import warnings
import zlib

import numpy as np
import pytest

pytest.importorskip("starlette", reason="samkit[serve] is part of the dev install")
from PIL import Image  # noqa: E402

with warnings.catch_warnings():  # Starlette 1.x suggests httpx2 for its TestClient; httpx still works
    warnings.simplefilter("ignore", DeprecationWarning)
    from starlette.testclient import TestClient  # noqa: E402

from samkit.amg import SamAutomaticMaskGenerator  # noqa: E402
from samkit.maskgen.output import decode_segmentation, sa1b_annotation  # noqa: E402
from samkit.predictor import SamPredictor  # noqa: E402
from samkit.serve.app import create_app  # noqa: E402
from samkit.serve.state import Limits, ModelService  # noqa: E402
from samkit.utils.amg import rle_to_mask  # noqa: E402

from .serve_helpers import serving  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
H, W = 40, 56


def picture(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def local_client(app, **kwargs) -> TestClient:
    """A test client that names the server as a browser on this machine does (``Host: 127.0.0.1``)."""
    return TestClient(app, base_url="http://127.0.0.1", **kwargs)


def bomb_png(side: int = 100_000) -> bytes:
    """A PNG whose header claims side x side pixels; its data is a few bytes (never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def service(tiny_model):
    return ModelService(tiny_model, Limits(max_upload_bytes=200_000, max_side=512, max_pixels=512 * 400))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    images = root / "images"
    images.mkdir()
    Image.fromarray(picture(1)).save(images / "one.png")
    Image.fromarray(picture(5)).save(root / "secret.png")  # outside the folder
    os.symlink(root / "secret.png", images / "link.png")
    return images


@pytest.fixture(scope="module")
def client(service, folder):
    return local_client(create_app(service, images_folder=str(folder)), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def image_id(client):
    reply = client.post("/api/images", content=png(picture()), headers={"content-type": "image/png"})
    assert reply.status_code == 200, reply.text
    return reply.json()["image_id"]


def refused(reply, status: int, words: str = "") -> str:
    """The reply is ``status`` with a JSON body of one message (containing ``words``)."""
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and "\n" not in body["error"]
    assert "Traceback" not in body["error"]
    assert words.lower() in body["error"].lower(), body["error"]
    return body["error"]


def test_health_and_page(client):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu" and health["images_folder"] is True
    page = client.get("/")
    assert page.status_code == 200 and "samkit" in page.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    assert (
        "http://" not in page.text and "https://" not in client.get("/static/app.js").text
    )  # nothing from outside


def test_upload_embeds_once_and_predict_equals_the_predictor(client, image_id, tiny_model):
    again = client.post("/api/images", files={"file": ("again.png", png(picture()), "image/png")}).json()
    assert again["image_id"] == image_id and again["cached"] is True and again["width"] == W
    body = {"image_id": image_id, "points": [[20, 15]], "labels": [1], "multimask": True}
    reply = client.post("/api/predict", json=body).json()
    predictor = SamPredictor(tiny_model)
    predictor.set_image(picture())
    masks, scores, low_res = predictor.predict(np.array([[20.0, 15.0]]), np.array([1]), multimask_output=True)
    assert [rle_to_mask(m).tolist() for m in reply["masks"]] == [m.tolist() for m in masks]
    np.testing.assert_allclose(reply["scores"], scores, rtol=1e-4, atol=1e-5)
    assert reply["areas"] == [int(m.sum()) for m in masks]
    # The previous low-res logits fed back, with a negative point and a box.
    body2 = {
        "image_id": image_id,
        "points": [[20, 15], [30, 20]],
        "labels": [1, 0],
        "box": [2, 3, 50, 35],
        "mask_input": {"logits_id": reply["logits_id"], "index": 1},
    }
    reply2 = client.post("/api/predict", json=body2).json()
    masks2, _, _ = predictor.predict(
        np.array([[20.0, 15.0], [30.0, 20.0]]),
        np.array([1, 0]),
        np.array([2, 3, 50, 35.0]),
        low_res[1:2],
        False,
    )
    assert [rle_to_mask(m).tolist() for m in reply2["masks"]] == [m.tolist() for m in masks2]
    assert reply2["decoder_ms"] > 0


def test_everything_and_exports_equal_the_library(client, image_id, tiny_model):
    settings = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    refused(
        client.post("/api/export", json={"image_id": image_id, "format": "coco", "source": "everything"}), 409
    )
    reply = client.post("/api/everything", json={"image_id": image_id, **settings}).json()
    generator = SamAutomaticMaskGenerator(tiny_model, output_mode="coco_rle", **settings)
    records = generator.generate(picture())
    assert len(reply["masks"]) == len(records) > 0
    # The same bytes opened under another name: the exports take the latest name.
    headers = {"content-type": "image/png", "x-file-name": "photo.png"}
    assert client.post("/api/images", content=png(picture()), headers=headers).json()["image_id"] == image_id
    expected = sa1b_annotation(records, 1, "photo.png", W, H)
    exported = client.post(
        "/api/export", json={"image_id": image_id, "format": "coco", "source": "everything"}
    )
    assert exported.status_code == 200
    got = exported.json()
    assert got["image"] == expected["image"] and len(got["annotations"]) == len(expected["annotations"])
    for a, b in zip(got["annotations"], expected["annotations"]):
        assert (
            decode_segmentation(a["segmentation"]).tolist() == decode_segmentation(b["segmentation"]).tolist()
        )
        assert a["area"] == b["area"] and a["bbox"] == b["bbox"]
    label_png = client.post(
        "/api/export", json={"image_id": image_id, "format": "png", "source": "everything"}
    )
    labels = np.asarray(Image.open(io.BytesIO(label_png.content)))
    assert labels.max() == len(records) or labels.max() > 0

    mask = client.post(
        "/api/predict", json={"image_id": image_id, "points": [[10, 10]], "labels": [1]}
    ).json()
    objects = [{"name": "cat", "mask": mask["masks"][0], "score": mask["scores"][0], "points": [[10, 10]]}]
    one = client.post("/api/export", json={"image_id": image_id, "format": "png", "objects": objects})
    assert one.headers["content-type"] == "image/png" and "attachment" in one.headers["content-disposition"]
    assert (np.asarray(Image.open(io.BytesIO(one.content))) > 0).tolist() == rle_to_mask(
        mask["masks"][0]
    ).tolist()
    cutout = np.asarray(
        Image.open(
            io.BytesIO(
                client.post(
                    "/api/export", json={"image_id": image_id, "format": "cutout", "objects": objects}
                ).content
            )
        )
    )
    assert cutout.shape == (H, W, 4) and (cutout[..., :3] == picture()).all()
    assert ((cutout[..., 3] > 0) == rle_to_mask(mask["masks"][0])).all()
    coco = client.post(
        "/api/export", json={"image_id": image_id, "format": "coco", "objects": objects}
    ).json()
    (annotation,) = coco["annotations"]
    assert annotation["name"] == "cat" and annotation["area"] == mask["areas"][0]
    assert decode_segmentation(annotation["segmentation"]).tolist() == rle_to_mask(mask["masks"][0]).tolist()


def test_images_folder_lists_and_opens_only_its_own_files(client, folder):
    assert client.get("/api/images").json() == {"images": ["link.png", "one.png"]}
    opened = client.post("/api/images/open", json={"name": "one.png"}).json()
    assert opened["file_name"] == "one.png" and opened["height"] == H
    assert client.get(f"/api/images/{opened['image_id']}/pixels").content == png(picture(1))
    for name in ("../secret.png", str(folder.parent / "secret.png"), "/etc/passwd", "one.png/..", "", 3):
        refused(client.post("/api/images/open", json={"name": name}), 404)
    refused(client.post("/api/images/open", json={"name": "link.png"}), 403, "outside")
    refused(client.get("/static/../state.py"), 404)
    refused(client.get("/static/%2e%2e/state.py"), 404)


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"image_id": "nope", "points": [[1, 1]], "labels": [1]}, 404, "unknown image id"),
        ({"image_id": 7, "points": [[1, 1]], "labels": [1]}, 400, "image_id"),
        ({"points": [[1, 1]], "labels": [1]}, 400, "image_id"),
        ({"points": [[W + 1, 1]], "labels": [1]}, 400, "outside"),
        ({"points": [[-1, 1]], "labels": [1]}, 400, "outside"),
        ({"points": [[1, 1]], "labels": [1, 0]}, 400, "labels"),
        ({"points": [[1, 1]], "labels": [2]}, 400, "labels[0]"),
        ({"points": [[1]], "labels": [1]}, 400, "[x, y]"),
        ({"points": [["a", 1]], "labels": [1]}, 400, "number"),
        ({"points": "x", "labels": [1]}, 400, "points"),
        ({"points": [], "labels": []}, 400, "at least one point or a box"),
        ({"box": [10, 10, 5, 20]}, 400, "x0 < x1"),
        ({"box": [0, 0, W + 5, 10]}, 400, "inside"),
        ({"box": [0, 0, 1]}, 400, "box"),
        ({"points": [[1, 1]], "labels": [1], "multimask": "yes"}, 400, "multimask"),
        ({"points": [[1, 1]], "labels": [1], "mask_input": {"logits_id": "gone"}}, 404, "mask_input"),
        ({"points": [[1, 1]], "labels": [1], "mask_input": [[0.0]]}, 400, "mask_input"),
        ({"points": [[1, 1]] * 65, "labels": [1] * 65}, 400, "limit"),
    ],
)
def test_bad_predict_requests(client, image_id, body, status, words):
    full = dict(body)
    if "image_id" not in full and words != "image_id":
        full["image_id"] = image_id
    refused(client.post("/api/predict", json=full), status, words)


def test_bad_mask_input_index_and_non_finite_numbers(client, image_id):
    first = client.post("/api/predict", json={"image_id": image_id, "points": [[1, 1]], "labels": [1]}).json()
    refused(
        client.post(
            "/api/predict",
            json={
                "image_id": image_id,
                "points": [[1, 1]],
                "labels": [1],
                "mask_input": {"logits_id": first["logits_id"], "index": 3},
            },
        ),
        400,
        "out of range",
    )
    text = json.dumps({"image_id": image_id, "points": [[1, 1]], "labels": [1]}).replace(
        "[[1, 1]]", "[[NaN, 1]]"
    )
    refused(
        client.post("/api/predict", content=text, headers={"content-type": "application/json"}), 400, "finite"
    )


def test_malformed_bodies_and_content_types(client, image_id):
    for path in ("/api/predict", "/api/everything", "/api/export", "/api/images/open"):
        refused(
            client.post(path, content=b"{not json", headers={"content-type": "application/json"}),
            400,
            "malformed JSON",
        )
        refused(
            client.post(path, content=b"[1, 2]", headers={"content-type": "application/json"}), 400, "object"
        )
        refused(
            client.post(path, content=b"{}", headers={"content-type": "text/plain"}), 415, "application/json"
        )
        refused(
            client.post(path, content=b"\xff\xfe", headers={"content-type": "application/json"}),
            400,
            "malformed",
        )
    refused(client.get("/api/nothing"), 404)
    refused(client.delete("/api/predict"), 405)


def test_bad_uploads(client):
    def send(data, kind="image/png"):
        return client.post("/api/images", content=data, headers={"content-type": kind})

    refused(send(b"hello", "text/plain"), 415, "multipart")
    refused(send(b""), 400, "empty")
    refused(send(b"this is not an image at all"), 415, "not an image")
    refused(send(png(picture())[:60]), 400, "corrupt")
    refused(send(b"\0" * 300_000), 413, "limit")
    refused(send(png(picture(h=600, w=20))), 413, "limits")
    refused(send(bomb_png()), 413)
    refused(send(bomb_png(30_000)), 413)  # under Pillow's own bomb limit, over the server's
    refused(
        client.post("/api/images", files={"other": ("a.png", png(picture()), "image/png")}), 400, "'file'"
    )
    refused(
        client.post(
            "/api/images",
            content=b"--x\r\nbroken",
            headers={"content-type": "multipart/form-data; boundary=x"},
        ),
        400,
    )
    assert client.get("/api/health").json()["status"] == "ok"  # still serving


@pytest.mark.parametrize(
    "settings, words",
    [
        ({"points_per_side": 0}, "points_per_side"),
        ({"points_per_side": 1000}, "points_per_side"),
        ({"points_per_side": 2.5}, "integer"),
        ({"pred_iou_thresh": 2}, "pred_iou_thresh"),
        ({"crop_n_layers": "1"}, "number"),
        ({"colour": 1}, "unknown setting"),
    ],
)
def test_bad_everything_settings(client, image_id, settings, words):
    refused(client.post("/api/everything", json={"image_id": image_id, **settings}), 400, words)


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"format": "gif", "objects": []}, 400, "format"),
        ({"format": "png", "source": "nowhere"}, 400, "source"),
        ({"format": "png", "objects": []}, 400, "non-empty"),
        ({"format": "png", "objects": [{"mask": {"size": [1, 1], "counts": [1]}}]}, 400, "RLE"),
        ({"format": "png", "objects": [{"mask": {"size": [H, W], "counts": [5]}}]}, 400, "RLE"),
        (
            {"format": "png", "objects": [{"mask": {"size": [H, W], "counts": [H * W]}, "points": 3}]},
            400,
            "points",
        ),
        (
            {"format": "png", "objects": [{"mask": {"size": [H, W], "counts": [H * W]}, "score": "x"}]},
            400,
            "score",
        ),
    ],
)
def test_bad_exports(client, image_id, body, status, words):
    refused(client.post("/api/export", json={"image_id": image_id, **body}), status, words)
    refused(client.post("/api/export", json={"image_id": "gone", **body}), 404, "unknown image id")


def test_without_images_folder_and_with_a_token(service):
    plain = local_client(create_app(service))
    refused(plain.post("/api/images/open", json={"name": "one.png"}), 404, "--images")
    assert plain.get("/api/images").json() == {"images": []}
    guarded = local_client(create_app(service, token="s3cret"))
    refused(guarded.get("/api/health"), 401, "token")
    refused(guarded.get("/api/health", headers={"X-Samkit-Token": "wrong"}), 401, "token")
    assert guarded.get("/api/health", headers={"X-Samkit-Token": "s3cret"}).status_code == 200
    assert guarded.get("/api/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert guarded.get("/").status_code == 200  # the page itself is public; it sends ?token= along


def test_an_unexpected_error_is_a_json_500_and_the_server_goes_on(service, image_id, monkeypatch):
    client = local_client(create_app(service), raise_server_exceptions=False)

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(service, "predict", broken)
    reply = client.post("/api/predict", json={"image_id": image_id, "points": [[1, 1]], "labels": [1]})
    assert reply.status_code == 500 and reply.json() == {
        "error": "internal error (RuntimeError); see the server's log"
    }
    monkeypatch.undo()
    assert (
        client.post(
            "/api/predict", json={"image_id": image_id, "points": [[1, 1]], "labels": [1]}
        ).status_code
        == 200
    )


def test_the_embedding_cache_is_a_bounded_lru(tiny_model):
    client = local_client(create_app(ModelService(tiny_model, Limits(cache_images=2))))

    def upload(seed):
        return client.post(
            "/api/images", content=png(picture(seed)), headers={"content-type": "image/png"}
        ).json()

    first = upload(10)
    upload(11)
    assert upload(10)["cached"] is True  # 10 is now the most recent; 11 the least
    upload(12)
    refused(client.post("/api/predict", json={"image_id": "0" * 64, "points": [[1, 1]], "labels": [1]}), 404)
    assert upload(10)["cached"] is True and upload(12)["cached"] is True
    assert upload(11)["cached"] is False  # evicted, embedded again
    assert client.get("/api/health").json()["cached_images"] == 2
    assert first["encoder_ms"] > 0


def test_the_command_starts_a_server_and_prints_its_address(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "samkit",
            "serve",
            "--model-type",
            "vit_tiny",
            "--images",
            str(tmp_path / "none"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip().startswith("error: --images")
        and "Traceback" not in bad.stderr
    )
    cmd = [sys.executable, "-m", "samkit", "serve", "--model-type", "vit_tiny", "--port", "0",
           "--host", "127.0.0.2", "--token", "abc"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()
        assert line.startswith("samkit serve: http://127.0.0.2:") and line.rstrip().endswith(
            "/?token=abc (Ctrl-C stops)"
        )
        url = line.split()[2].split("?")[0]
        request = urllib.request.Request(url + "api/health", headers={"X-Samkit-Token": "abc"})
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as reply:
                    assert json.load(reply)["status"] == "ok"
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "warning: --host 127.0.0.2 lets other machines reach the server" in err


def test_a_bfloat16_model_serves_every_endpoint(tiny_model):
    import copy

    import torch

    client = local_client(create_app(ModelService(copy.deepcopy(tiny_model).to(torch.bfloat16))))
    assert client.get("/api/health").json()["dtype"] == "bfloat16"
    image_id = client.post(
        "/api/images", content=png(picture()), headers={"content-type": "image/png"}
    ).json()["image_id"]
    first = client.post(
        "/api/predict", json={"image_id": image_id, "points": [[9, 9]], "labels": [1], "multimask": True}
    )
    assert first.status_code == 200 and len(first.json()["masks"]) == 3
    body = {
        "image_id": image_id,
        "points": [[9, 9]],
        "labels": [1],
        "mask_input": {"logits_id": first.json()["logits_id"]},
    }
    assert client.post("/api/predict", json=body).status_code == 200
    settings = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    assert client.post("/api/everything", json={"image_id": image_id, **settings}).status_code == 200
    assert (
        client.post(
            "/api/export", json={"image_id": image_id, "format": "coco", "source": "everything"}
        ).status_code
        == 200
    )


def test_empty_masks_reply_and_export_strict_json(tiny_model):
    """A model whose every mask is empty even at the loose threshold: the stability score is 0/0
    (NaN, as Meta's), which strict JSON cannot hold (Starlette refused to encode it: a 500 for a
    click). Predict, 'everything' and the exports reply 200 with null there, in JSON any strict
    parser reads, and the page's objects carrying that null export too."""
    import copy

    import torch

    model = copy.deepcopy(tiny_model)
    with torch.no_grad():  # every upscaled channel GELU(10) = 10, every hypernetwork output -100
        conv2 = model.mask_decoder.output_upscaling[3]
        conv2.weight.zero_()
        conv2.bias.fill_(10.0)
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.fill_(-100.0)
    client = local_client(create_app(ModelService(model)), raise_server_exceptions=False)
    image_id = client.post(
        "/api/images", content=png(picture()), headers={"content-type": "image/png"}
    ).json()["image_id"]

    def strict(reply) -> dict:
        assert reply.status_code == 200, reply.text
        return json.loads(reply.text, parse_constant=lambda name: pytest.fail(f"{name} in the reply"))

    mask = strict(client.post("/api/predict", json={"image_id": image_id, "points": [[9, 9]], "labels": [1]}))
    assert mask["areas"] == [0] and mask["stability_scores"] == [None]
    settings = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    everything = strict(client.post("/api/everything", json={"image_id": image_id, **settings}))
    assert everything["masks"] and all(m["stability_score"] is None for m in everything["masks"])
    body = {"image_id": image_id, "format": "coco", "source": "everything"}
    annotations = strict(client.post("/api/export", json=body))["annotations"]
    assert annotations and all(a["stability_score"] is None for a in annotations)
    objects = [{"name": "nothing", "mask": mask["masks"][0], "score": 0.5, "stability_score": None}]
    (one,) = strict(
        client.post("/api/export", json={"image_id": image_id, "format": "coco", "objects": objects})
    )["annotations"]
    assert one["stability_score"] is None and one["area"] == 0


def test_lookups_stay_responsive_while_the_model_is_busy(client, service, image_id):
    with service.lock:  # as if a long 'everything' were running
        assert client.get("/api/health").status_code == 200
        assert client.get(f"/api/images/{image_id}/pixels").status_code == 200
        refused(
            client.post("/api/predict", json={"image_id": "gone", "points": [[1, 1]], "labels": [1]}), 404
        )


def test_concurrent_clients_on_a_real_server_get_their_own_masks(tiny_model):
    """4 clients x 5 prompts through uvicorn at once: every reply is the one a lone request gets."""
    import threading

    import httpx

    service = ModelService(tiny_model)
    with serving(create_app(service)) as port:
        base = f"http://127.0.0.1:{port}"
        ids = [
            httpx.post(
                base + "/api/images", content=png(picture(20 + k)), headers={"content-type": "image/png"}
            ).json()["image_id"]
            for k in range(2)
        ]
        jobs = [(ids[k % 2], [[3 + 7 * k, 4 + 5 * i]]) for k in range(4) for i in range(5)]

        def ask(job):
            body = {"image_id": job[0], "points": job[1], "labels": [1], "multimask": True}
            reply = httpx.post(base + "/api/predict", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            return reply.json()["masks"]

        alone = [ask(job) for job in jobs]
        together: list = [None] * len(jobs)

        def client(k):
            for i in range(k, len(jobs), 4):
                together[i] = ask(jobs[i])

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert together == alone


def test_everything_takes_the_cached_embedding_and_runs_the_encoder_only_for_crops(client, service, image_id):
    calls = []
    encoder = service.model.image_encoder
    hook = encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    try:
        settings = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
        assert client.post("/api/everything", json={"image_id": image_id, **settings}).status_code == 200
        assert calls == []  # the whole image: its embedding from the upload
        reply = client.post("/api/everything", json={"image_id": image_id, "crop_n_layers": 1, **settings})
        assert reply.status_code == 200 and len(calls) == 4  # the 4 crops of layer 1 only
    finally:
        hook.remove()


def test_a_waiting_or_running_everything_can_be_cancelled(client, service, image_id):
    import threading

    replies = []
    body = {"image_id": image_id, "points_per_side": 64, "pred_iou_thresh": 0.0}
    with service.lock:  # the model is busy: the run waits, then sees its cancel before its first batch
        worker = threading.Thread(target=lambda: replies.append(client.post("/api/everything", json=body)))
        worker.start()
        deadline = time.time() + 30
        while image_id not in service.cancels:
            assert time.time() < deadline
            time.sleep(0.01)
        assert client.post("/api/everything/cancel", json={"image_id": image_id}).json() == {"cancelled": 1}
    worker.join(timeout=60)
    refused(replies[0], 409, "cancelled")
    assert service.cancels == {}
    assert client.post("/api/everything/cancel", json={"image_id": image_id}).json() == {"cancelled": 0}
    refused(client.post("/api/everything/cancel", json={"image_id": "gone"}), 404)
    settings = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    assert client.post("/api/everything", json={"image_id": image_id, **settings}).status_code == 200
