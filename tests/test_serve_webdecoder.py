"""What ``samkit serve`` hands the page for in-browser decoding (no browser here): the ONNX decoder exported
once per set of weights into a cache, atomically; the runtime files and nothing else of their folder; the
image embedding as float32 bytes; the reasons the page decodes on the server; the flags; and a server
bound to 0.0.0.0 answering requests that name it by IP address."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("starlette", reason="samkit[serve] is part of the dev install")
pytest.importorskip("onnx", reason="samkit[onnx] is part of the dev install")
import httpx  # noqa: E402

from samkit.commands.main import main  # noqa: E402
from samkit.serve import webdecoder  # noqa: E402
from samkit.serve.app import create_app  # noqa: E402
from samkit.serve.guard import Access  # noqa: E402
from samkit.serve.state import ModelService  # noqa: E402
from samkit.serve.webdecoder import RUNTIME_FILES, export_cached_decoder, prepare_web_decoder  # noqa: E402

from .serve_helpers import serving  # noqa: E402
from .test_serve_api import local_client, picture, png  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    """A folder with the runtime's file names (their contents are not run here)."""
    folder = tmp_path_factory.mktemp("runtime")
    for name in RUNTIME_FILES:
        (folder / name).write_bytes(f"// {name}".encode())
    (folder / "secret.txt").write_text("not a runtime file")
    return folder


@pytest.fixture(scope="module")
def exported(tiny_model, runtime, tmp_path_factory):
    cache = tmp_path_factory.mktemp("decoders")
    return cache, prepare_web_decoder(tiny_model, "vit_tiny", cache, runtime)


def test_the_decoder_is_exported_once_per_weights_into_the_cache(tiny_model, exported, monkeypatch):
    import onnx

    cache, web = exported
    assert web.available and web.decoder.parent.parent == cache
    model = onnx.load(str(web.decoder))
    assert [i.name for i in model.graph.input][0] == "image_embeddings"
    assert {p.key: p.value for p in model.metadata_props}["model_type"] == "vit_tiny"
    stamp = os.stat(web.decoder).st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr("samkit.export.onnx.export_decoder", no_export)
    assert export_cached_decoder(tiny_model, cache, "vit_tiny") == web.decoder  # the cached file
    assert os.stat(web.decoder).st_mtime_ns == stamp
    changed = webdecoder.decoder_part(tiny_model)
    with torch.no_grad():
        changed.mask_decoder.iou_token.weight.add_(1.0)  # other weights: another key
    assert webdecoder.decoder_key(changed) != web.decoder.parent.name
    assert sorted(os.listdir(cache)) == [web.decoder.parent.name]  # no temporary folder left behind


def test_a_failed_export_leaves_nothing_and_the_server_path(tiny_model, runtime, tmp_path, monkeypatch):
    def broken(model, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise RuntimeError("tracing failed\nsecond line")

    monkeypatch.setattr("samkit.export.onnx.export_decoder", broken)
    web = prepare_web_decoder(tiny_model, "vit_tiny", tmp_path / "cache", runtime)
    assert not web.available and web.reason == "exporting the ONNX decoder failed: tracing failed"
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    missing = prepare_web_decoder(tiny_model, "vit_tiny", tmp_path / "cache", tmp_path)
    assert not missing.available and "ort.wasm.min.js is missing" in missing.reason


def test_the_app_serves_decoder_runtime_and_embedding(tiny_model, exported):
    _, web = exported
    service = ModelService(tiny_model)
    client = local_client(create_app(service, token="s", web=web), raise_server_exceptions=False)
    auth = {"x-samkit-token": "s"}
    info = client.get("/api/health", headers=auth).json()["browser_decoder"]
    assert info["available"] and info["reason"] is None and info["mask_threshold"] == 0.0
    assert client.get(info["decoder_url"]).status_code == 401  # the model is behind the token
    reply = client.get(info["decoder_url"], headers=auth)
    assert reply.content == web.decoder.read_bytes() and reply.headers["cache-control"] == "no-cache"
    for name in RUNTIME_FILES:  # the runtime is public code: no token
        reply = client.get(info["runtime_url"] + name)
        assert reply.status_code == 200 and reply.content == (web.runtime / name).read_bytes()
    assert client.get("/runtime/ort-wasm-simd-threaded.wasm").headers["content-type"] == "application/wasm"
    for name in ("secret.txt", "..%2Fsecret.txt", "%2e%2e%2fapp.py"):
        assert client.get(f"/runtime/{name}").status_code == 404, name

    opened = client.post(
        "/api/images", content=png(picture(5)), headers={"content-type": "image/png", **auth}
    ).json()
    h, w = picture(5).shape[:2]
    scale = 1024 / max(h, w)
    assert opened["input_size"] == [int(h * scale + 0.5), int(w * scale + 0.5)]
    reply = client.get(f"/api/images/{opened['image_id']}/embedding", headers=auth)
    shape = tuple(int(v) for v in reply.headers["x-shape"].split(","))
    assert (
        reply.headers["cache-control"] == "no-store"
    )  # another model gives the same image another embedding
    features = service.image(opened["image_id"]).features
    assert shape == tuple(features.shape) == (1, 256, 64, 64)
    array = np.frombuffer(reply.content, dtype="<f4").reshape(shape)
    assert np.array_equal(array, features.float().numpy())
    assert client.get("/api/images/nope/embedding", headers=auth).status_code == 404

    off = local_client(create_app(service))  # without a decoder: the reason, and no model to fetch
    info = off.get("/api/health").json()["browser_decoder"]
    assert not info["available"] and info["reason"]
    assert off.get("/api/decoder.onnx").status_code == 404
    assert off.get("/runtime/ort.wasm.min.js").status_code == 404


def test_the_web_flags_are_checked_on_the_command_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for flags, words in (
        (["--web-runtime", str(tmp_path / "none")], "not a folder"),
        (["--web-runtime", str(tmp_path)], "no ort.wasm.min.js"),
        (["--decoder-cache", str(tmp_path / "file")], "not a folder"),
    ):
        assert main(["serve", "--model-type", "vit_tiny", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flags[0]}") and words in err and "Traceback" not in err


def test_a_wildcard_bind_answers_ip_literal_hosts(tiny_model):
    """``--host 0.0.0.0``: other machines name the server by address (v4 or v6), which a rebinding attack
    cannot use; a name is still refused. A real socket on 0.0.0.0, as the command binds it."""
    app = create_app(ModelService(tiny_model), access=Access("0.0.0.0"))
    with serving(app, host="0.0.0.0", log_level="critical") as port:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for host in (f"192.168.1.20:{port}", "10.0.0.7", f"[fe80::1]:{port}", f"127.0.0.1:{port}"):
                reply = http.get("/api/health", headers={"host": host})
                assert reply.status_code == 200 and reply.json()["status"] == "ok", host
            for host in ("attacker.example", f"rebind.example:{port}", "192.168.1.20.nip.io"):
                reply = http.get("/api/images", headers={"host": host})
                assert reply.status_code == 403 and "--allow-host" in reply.json()["error"], host
