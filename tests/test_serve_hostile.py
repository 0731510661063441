"""``samkit serve`` against hostile and unusual requests: deep JSON, odd file names, 16-bit images,
another image's logits, foreign Host headers (DNS rebinding) and cross-origin writes. Each case is
refused with a 4xx (or handled right) and the server keeps serving."""

from __future__ import annotations

import io
import urllib.parse

import numpy as np
import pytest

pytest.importorskip("starlette", reason="samkit[serve] is part of the dev install")
import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from samkit.commands.main import main  # noqa: E402
from samkit.serve.app import create_app  # noqa: E402
from samkit.serve.guard import Access  # noqa: E402
from samkit.serve.state import Limits, ModelService  # noqa: E402
from samkit.utils.image import load_image  # noqa: E402

from .serve_helpers import serving  # noqa: E402
from .test_serve_api import local_client, picture, png, refused  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
RUSSIAN = "\u0444\u043e\u0442\u043e.png"  # "фото.png"


@pytest.fixture(scope="module")
def service(tiny_model):
    return ModelService(tiny_model, Limits(max_upload_bytes=200_000, max_side=512, max_pixels=512 * 400))


@pytest.fixture(scope="module")
def client(service):
    return local_client(create_app(service), raise_server_exceptions=False)


def upload(client, data: bytes, name: str = "a.png", **headers) -> httpx.Response:
    headers = {"content-type": "image/png", "x-file-name": urllib.parse.quote(name), **headers}
    return client.post("/api/images", content=data, headers=headers)


def export_png(client, image_id: str) -> httpx.Response:
    mask = client.post("/api/predict", json={"image_id": image_id, "points": [[5, 5]], "labels": [1]}).json()
    objects = [{"name": "x", "mask": mask["masks"][0], "score": mask["scores"][0]}]
    return client.post("/api/export", json={"image_id": image_id, "format": "png", "objects": objects})


def deep(depth: int) -> bytes:
    return b'{"image_id": "x", "points": ' + b"[" * depth + b"]" * depth + b', "labels": [1]}'


@pytest.mark.parametrize("depth", [100_000, 900, 17])
def test_deeply_nested_json_is_a_400(client, depth):
    headers = {"content-type": "application/json"}
    for path in ("/api/predict", "/api/everything", "/api/export"):
        refused(client.post(path, content=deep(depth), headers=headers), 400, "nests deeper")
    # A number nested deep where a coordinate goes was echoed in the error (json.dumps recursed).
    body = b'{"image_id": "x", "points": [[' + b"[" * 950 + b"]" * 950 + b", 1]], " + b'"labels": [1]}'
    refused(client.post("/api/predict", content=body, headers=headers), 400, "nests deeper")


def test_a_non_ascii_upload_name_exports_under_that_name(client):
    reply = upload(client, png(picture(30)), RUSSIAN)
    assert reply.json()["file_name"] == RUSSIAN
    exported = export_png(client, reply.json()["image_id"])
    assert exported.status_code == 200, exported.text
    disposition = exported.headers["content-disposition"]
    assert f"filename*=UTF-8''{urllib.parse.quote(RUSSIAN[:-4] + '_mask.png')}" in disposition
    assert 'filename="_____mask.png"' in disposition  # the ASCII fallback


def test_control_characters_leave_upload_names(client):
    reply = upload(client, png(picture(31)), "a\r\nX-Injected: 1.png").json()
    assert reply["file_name"] == "aX-Injected: 1.png"
    assert upload(client, png(picture(32)), "c\td\x00.png").json()["file_name"] == "cd.png"
    multipart = client.post(
        "/api/images", files={"file": ("b\u202egnp.exe.png", png(picture(32)), "image/png")}
    ).json()
    assert multipart["file_name"] == "bgnp.exe.png"  # the bidi override is gone
    exported = export_png(client, reply["image_id"])
    assert "x-injected" not in exported.headers and "\r" not in exported.headers["content-disposition"]


def test_a_16_bit_grey_png_is_scaled_as_load_image_scales_it(client, tmp_path):
    ramp = np.linspace(0, 65535, 40 * 56).reshape(40, 56).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    reply = upload(client, path.read_bytes(), "grey16.png").json()
    shown = np.asarray(Image.open(io.BytesIO(client.get(f"/api/images/{reply['image_id']}/pixels").content)))
    expected = load_image(path)
    assert abs(shown.mean() - 127.5) < 1 and (shown == expected).all()


def test_logits_of_another_image_are_refused(client):
    first = upload(client, png(picture(33))).json()["image_id"]
    second = upload(client, png(picture(34))).json()["image_id"]
    logits = client.post("/api/predict", json={"image_id": first, "points": [[5, 5]], "labels": [1]}).json()
    body = {"points": [[5, 5]], "labels": [1], "mask_input": {"logits_id": logits["logits_id"]}}
    refused(client.post("/api/predict", json={"image_id": second, **body}), 400, "another image")
    assert client.post("/api/predict", json={"image_id": first, **body}).status_code == 200


def test_the_page_has_a_favicon(client):
    assert 'rel="icon" href="/static/favicon.svg"' in client.get("/").text
    for path in ("/favicon.ico", "/static/favicon.svg"):
        reply = client.get(path)
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("image/svg+xml")


def test_the_same_bytes_under_a_new_name_take_the_new_name(client):
    data = png(picture(35))
    first = upload(client, data, "first.png").json()
    second = upload(client, data, "second.png").json()
    assert second["image_id"] == first["image_id"] and second["cached"] is True
    assert second["file_name"] == "second.png"
    assert (
        'filename="second_mask.png"' in export_png(client, second["image_id"]).headers["content-disposition"]
    )


@pytest.mark.parametrize(
    "access, host, status",
    [
        (Access(), "attacker.example", 403),
        (Access(), "attacker.example:8000", 403),
        (Access(), "127.0.0.1.attacker.example", 403),
        (Access(), "localhost:8000", 200),
        (Access(), "LOCALHOST.", 200),
        (Access(), "127.0.0.1:8000", 200),
        (Access(), "[::1]:8000", 200),
        (Access(), "192.168.1.5", 403),
        (Access(), "[::1", 403),
        (Access(bind_host="192.168.1.5"), "192.168.1.5:8000", 200),
        (Access(bind_host="0.0.0.0"), "10.0.0.7:8000", 200),  # addresses cannot be rebound
        (Access(bind_host="0.0.0.0"), "attacker.example", 403),
        (Access(allowed_hosts=["box.lan"]), "box.lan:8000", 200),
        (Access(allowed_hosts=["box.lan"]), "other.lan", 403),
        (Access(allowed_hosts=["*"]), "anything.example", 200),
    ],
)
def test_only_the_hosts_the_server_was_started_for(service, access, host, status):
    client = local_client(create_app(service, images_folder=None, access=access))
    for path in ("/api/images", "/api/health", "/"):
        reply = client.get(path, headers={"host": host})
        assert reply.status_code == status, (path, reply.text)
    if status == 403:
        refused(client.get("/api/images", headers={"host": host}), 403, "--allow-host")


def test_cross_origin_writes_are_refused_unless_allowed(service):
    data = png(picture(36))
    files = {"file": ("a.png", data, "image/png")}
    client = local_client(create_app(service))
    refused(
        client.post("/api/images", files=files, headers={"origin": "http://evil.example"}),
        403,
        "--allow-origin",
    )
    refused(client.post("/api/images", files=files, headers={"origin": "null"}), 403, "cross-origin")
    refused(
        client.post("/api/images", files=files, headers={"origin": "http://127.0.0.1:9"}), 403, "cross-origin"
    )
    assert client.post("/api/images", files=files, headers={"origin": "http://127.0.0.1"}).status_code == 200
    assert client.post("/api/images", files=files).status_code == 200  # curl and scripts send no Origin
    reply = client.get("/api/health", headers={"origin": "http://evil.example"})  # readable by no page:
    assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers  # no CORS header
    allowed = local_client(create_app(service, access=Access(allowed_origins=["http://tools.example:8080/"])))
    headers = {"origin": "http://tools.example:8080"}
    reply = allowed.post("/api/images", files=files, headers=headers)
    assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == headers["origin"]
    preflight = allowed.options(
        "/api/predict", headers={**headers, "access-control-request-method": "POST",
                                  "access-control-request-headers": "content-type"}
    )  # fmt: skip
    assert preflight.status_code == 200
    refused(allowed.post("/api/images", files=files, headers={"origin": "http://evil.example"}), 403)


def test_the_allow_flags_are_checked_on_the_command_line(capsys):
    for flags in (
        ["--allow-host", "http://box.lan"],
        ["--allow-host", "box.lan:80"],
        ["--allow-origin", "box.lan"],
    ):
        assert main(["serve", "--model-type", "vit_tiny", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flags[0]}") and "Traceback" not in err


@pytest.fixture(scope="module")
def real_server(service):
    """The app on a real uvicorn socket (header encoding and connection drops happen only there)."""
    with serving(create_app(service), log_level="critical") as port:
        yield f"http://127.0.0.1:{port}"


def test_a_hostile_request_list_gets_4xx_and_the_server_keeps_serving(real_server):
    http = httpx.Client(base_url=real_server, timeout=60)
    json_headers = {"content-type": "application/json"}
    mine = http.post("/api/images", content=png(picture(40)), headers={"content-type": "image/png"}).json()
    other = http.post("/api/images", content=png(picture(41)), headers={"content-type": "image/png"}).json()
    logits = http.post(
        "/api/predict", json={"image_id": other["image_id"], "points": [[3, 3]], "labels": [1]}
    )
    names = ["a%0D%0AX-Injected%3A%201.png", "%D1%84%D0%BE%D1%82%D0%BE.png", "..%2F..%2Fetc%2Fpasswd", "%00"]
    hostile = [
        ("POST", "/api/predict", {**json_headers}, deep(100_000)),
        ("POST", "/api/export", {**json_headers}, deep(5_000)),
        ("GET", "/api/images", {"host": "attacker.example"}, None),
        ("GET", f"/api/images/{mine['image_id']}/pixels", {"host": "attacker.example:80"}, None),
        (
            "POST",
            "/api/images",
            {"origin": "http://evil.example", "content-type": "image/png"},
            png(picture(42)),
        ),
        ("POST", "/api/predict", {**json_headers, "origin": "null"}, b"{}"),
        (
            "POST",
            "/api/predict",
            json_headers,
            httpx.Request(
                "POST",
                "/",
                json={
                    "image_id": mine["image_id"],
                    "points": [[3, 3]],
                    "labels": [1],
                    "mask_input": {"logits_id": logits.json()["logits_id"]},
                },
            ).read(),
        ),  # fmt: skip
    ]
    for method, path, headers, body in hostile:
        reply = http.request(method, path, headers=headers, content=body)
        assert 400 <= reply.status_code < 500 and "error" in reply.json(), (path, headers, reply.text[:200])
    for name in names:  # odd names are cleaned on upload; their exports answer, with a clean header
        reply = http.post(
            "/api/images",
            content=png(picture(43)),
            headers={"content-type": "image/png", "x-file-name": name},
        )
        assert reply.status_code == 200
        file_name = reply.json()["file_name"]
        assert "/" not in file_name and not any(ord(c) < 32 for c in file_name)
        exported = export_png(http, reply.json()["image_id"])
        assert exported.status_code == 200 and "x-injected" not in exported.headers
    assert http.get("/api/health").json()["status"] == "ok"
    again = http.post("/api/predict", json={"image_id": mine["image_id"], "points": [[3, 3]], "labels": [1]})
    assert again.status_code == 200
