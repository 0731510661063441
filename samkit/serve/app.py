"""The ASGI app of ``samkit serve`` (Starlette): the static page at ``/`` and the JSON API under ``/api/``.

Every refused request gets a 4xx JSON body ``{"error": "<one line>"}``; anything unexpected a 500 with
the exception's type only (the traceback goes to the server's log). Model calls run in worker threads
and take the service's lock one at a time, so health and static files stay responsive meanwhile.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import math
import os
import unicodedata
import urllib.parse
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..maskgen.output import sa1b_annotation
from .guard import Access
from .state import EVERYTHING_SETTINGS, ApiError, ModelService, coco_records, object_record
from .webdecoder import RUNTIME_FILES, WebDecoder

STATIC_DIR = Path(__file__).resolve().parent / "static"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
MAX_JSON_BYTES = 64 * 1024 * 1024  # an export of many objects' RLEs is the largest JSON body
MAX_JSON_DEPTH = 16  # the API's bodies nest 4 deep; deeper ones would only feed recursion errors
TOKEN_HEADER = "x-samkit-token"
log = logging.getLogger("samkit.serve")


def folder_images(folder: Optional[str]) -> list[str]:
    """The image files directly in ``folder`` (hidden files left out), sorted; [] without a folder."""
    if not folder:
        return []
    return sorted(
        n
        for n in os.listdir(folder)
        if not n.startswith(".")
        and n.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, n))
    )


def clean_file_name(name: str) -> str:
    """A file name as the server keeps it: the last path part, no control or format characters (CR, LF,
    bidi overrides: it goes into headers and the page), at most 200 characters; "upload" if nothing is left."""
    name = os.path.basename(name.replace("\\", "/"))
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    return name[:200] or "upload"


def attachment(file_name: str) -> str:
    """A ``Content-Disposition`` value for any name: an ASCII ``filename`` for old clients and the exact
    name as ``filename*=UTF-8''...`` (RFC 6266), since header values cannot hold other characters."""
    ascii_name = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in file_name)
    quoted = urllib.parse.quote(file_name, safe="")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quoted}"


def too_deep(data: Any, limit: int) -> bool:
    """Whether JSON ``data`` nests lists and objects more than ``limit`` levels (checked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        for child in value.values() if isinstance(value, dict) else value:
            if isinstance(child, (list, dict)):
                stack.append((child, depth + 1))
    return False


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with 413 past ``limit`` bytes (checked while streaming, not after)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> dict[str, Any]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"expected Content-Type application/json, got {kind or 'none'!r}")
    body = await read_body(request, MAX_JSON_BYTES)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"malformed JSON: {str(err).splitlines()[0]}") from None
    except RecursionError:
        raise ApiError(400, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the JSON body must be an object")
    if too_deep(data, MAX_JSON_DEPTH):
        raise ApiError(400, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    return data


def number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{what} must be a finite number, got {json.dumps(value)[:60]}")
    return float(value)


def parse_prompt(data: dict[str, Any], h: int, w: int, max_points: int) -> tuple:
    """The predict body's points (Nx2), labels (N), box (4 or None), mask_input and multimask, checked."""
    points, labels = data.get("points") or [], data.get("labels") or []
    if not isinstance(points, list) or not isinstance(labels, list):
        raise ApiError(400, "points must be a list of [x, y] and labels a list of 0/1")
    if len(points) != len(labels):
        raise ApiError(400, f"{len(points)} points but {len(labels)} labels; give one label per point")
    if len(points) > max_points:
        raise ApiError(400, f"{len(points)} points; the limit is {max_points}")
    coords = []
    for i, p in enumerate(points):
        if not isinstance(p, list) or len(p) != 2:
            raise ApiError(400, f"points[{i}] must be [x, y]")
        x, y = number(p[0], f"points[{i}][0]"), number(p[1], f"points[{i}][1]")
        if not (0 <= x <= w and 0 <= y <= h):
            raise ApiError(400, f"points[{i}] ({x:g}, {y:g}) lies outside the {w}x{h} image")
        coords.append((x, y))
    for i, label in enumerate(labels):
        if label not in (0, 1) or isinstance(label, bool):
            raise ApiError(400, f"labels[{i}] must be 1 (foreground) or 0 (background)")
    box = data.get("box")
    if box is not None:
        if not isinstance(box, list) or len(box) != 4:
            raise ApiError(400, "box must be [x0, y0, x1, y1] in pixels")
        x0, y0, x1, y1 = (number(v, f"box[{i}]") for i, v in enumerate(box))
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ApiError(400, f"box {[x0, y0, x1, y1]} must have x0 < x1, y0 < y1 inside the {w}x{h} image")
        box = np.array([x0, y0, x1, y1], dtype=np.float32)
    mask_input = data.get("mask_input")
    if mask_input is not None:
        if not isinstance(mask_input, dict) or not isinstance(mask_input.get("logits_id"), str):
            raise ApiError(400, 'mask_input must be {"logits_id": "<from an earlier predict>", "index": 0}')
        index = mask_input.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool):
            raise ApiError(400, "mask_input.index must be an integer")
        mask_input = (mask_input["logits_id"], index)
    if not coords and box is None:
        raise ApiError(400, "give at least one point or a box")
    multimask = data.get("multimask", False)
    if not isinstance(multimask, bool):
        raise ApiError(400, "multimask must be true or false")
    arr = np.array(coords, dtype=np.float32).reshape(-1, 2)
    return arr, np.array(labels, dtype=np.int64), box, mask_input, multimask


def parse_settings(data: dict[str, Any]) -> dict[str, Any]:
    """'Everything' settings from the body, each in its range (defaults for the ones left out)."""
    unknown = set(data) - set(EVERYTHING_SETTINGS) - {"image_id"}
    if unknown:
        raise ApiError(
            400, f"unknown setting {sorted(unknown)[0]!r}; known: {', '.join(EVERYTHING_SETTINGS)}"
        )
    settings = {}
    for name, (kind, low, high, default) in EVERYTHING_SETTINGS.items():
        value = data.get(name, default)
        value = number(value, name)
        if kind is int and value != int(value):
            raise ApiError(400, f"{name} must be an integer, got {value:g}")
        if not low <= value <= high:
            raise ApiError(400, f"{name} must be from {low:g} to {high:g}, got {value:g}")
        settings[name] = kind(value)
    return settings


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def export(service: ModelService, data: dict[str, Any]) -> Response:
    """A mask PNG, an RGBA cut-out or SA-1B/COCO JSON of the kept objects or of the last 'everything'."""
    from ..utils.amg import rle_to_mask

    image = service.image(data.get("image_id"))
    h, w = image.pixels.shape[:2]
    fmt, source = data.get("format"), data.get("source", "objects")
    if fmt not in ("png", "cutout", "coco"):
        raise ApiError(400, "format must be 'png', 'cutout' or 'coco'")
    if source == "everything":
        if image.everything is None:
            raise ApiError(409, "no 'everything' result for this image yet: POST /api/everything first")
        records, names = image.everything, None
    elif source == "objects":
        objects = data.get("objects")
        if not isinstance(objects, list) or not objects:
            raise ApiError(400, "objects must be a non-empty list of {name, mask, score, ...}")
        records, names = [], []
        for i, obj in enumerate(objects):
            rle = obj.get("mask") if isinstance(obj, dict) else None
            if (
                not isinstance(rle, dict)
                or rle.get("size") != [h, w]
                or not isinstance(rle.get("counts"), list)
                or not all(isinstance(c, int) and c >= 0 for c in rle["counts"])
                or sum(rle["counts"]) != h * w
            ):
                raise ApiError(400, f"objects[{i}].mask must be an uncompressed RLE of size [{h}, {w}]")
            points = obj.get("points") or []
            if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 2 for p in points):
                raise ApiError(400, f"objects[{i}].points must be a list of [x, y]")
            score = number(obj.get("score", 0.0), f"objects[{i}].score")
            stability = obj.get("stability_score", 0.0)  # null: an empty mask's (see json_float)
            stability = math.nan if stability is None else number(stability, f"objects[{i}].stability_score")
            records.append(object_record(rle, score, stability, points, h, w))
            names.append(str(obj.get("name", f"object {i + 1}"))[:200])
    else:
        raise ApiError(400, "source must be 'objects' or 'everything'")
    stem = os.path.splitext(os.path.basename(image.file_name))[0] or "image"
    if fmt == "coco":
        annotation = sa1b_annotation(coco_records(records), 1, image.file_name, w, h)
        if names is not None:
            for entry, name in zip(annotation["annotations"], names):
                entry["name"] = name
        return JSONResponse(annotation, headers={"content-disposition": attachment(f"{stem}.json")})
    masks = [rle_to_mask(r["segmentation"]) for r in records]
    if fmt == "png":
        if len(masks) == 1:
            out = masks[0].astype(np.uint8) * 255
        else:
            if len(masks) > 255:
                raise ApiError(400, f"{len(masks)} masks do not fit one 8-bit label PNG (at most 255)")
            out = np.zeros((h, w), np.uint8)
            for i, m in enumerate(masks):
                out[m] = i + 1
        name = f"{stem}_mask.png"
    else:
        union = np.logical_or.reduce(masks)
        out = np.dstack([image.pixels, union.astype(np.uint8) * 255])
        name = f"{stem}_cutout.png"
    return Response(
        png_bytes(out),
        media_type="image/png",
        headers={"content-disposition": attachment(name)},
    )


def create_app(
    service: ModelService,
    images_folder: Optional[str] = None,
    token: Optional[str] = None,
    access: Access = Access(),
    web: WebDecoder = WebDecoder(),
) -> Starlette:
    """The app serving ``service``'s model; ``images_folder`` lists images to open, ``token`` guards /api/,
    ``access`` says which Host headers and cross-origin writes are accepted (see :mod:`.guard`), ``web``
    is the ONNX decoder and runtime the page decodes with (see :mod:`.webdecoder`; without them, or
    when they fail in the browser, the page asks ``/api/predict``)."""
    folder = os.path.realpath(images_folder) if images_folder else None

    def image_reply(image: Any, cached: bool) -> dict[str, Any]:
        h, w = image.pixels.shape[:2]
        return {
            "image_id": image.image_id,
            "file_name": image.file_name,
            "width": w,
            "height": h,
            "input_size": list(image.input_size),  # (H, W) resized so the long side is the model's size
            "cached": cached,
            "encoder_ms": 0.0 if cached else round(image.encoder_ms, 3),
        }

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    async def health(request: Request) -> Response:
        param = next(iter(service.model.parameters()))
        return JSONResponse(
            {
                "status": "ok",
                "device": str(param.device),
                "dtype": str(param.dtype).replace("torch.", ""),
                "image_size": int(service.model.image_encoder.img_size),
                "cached_images": len(service.images),
                "images_folder": folder is not None,
                "limits": vars(service.limits),
                "everything_settings": {k: v[3] for k, v in EVERYTHING_SETTINGS.items()},
                "browser_decoder": {
                    "available": web.available,
                    "reason": web.reason,
                    "decoder_url": "/api/decoder.onnx",
                    "runtime_url": "/runtime/",
                    "mask_threshold": float(service.model.mask_threshold),
                },
            }
        )

    async def decoder_model(request: Request) -> Response:
        if web.decoder is None:
            raise ApiError(404, f"no decoder for the page: {web.reason}")
        # Revalidated on every load (its ETag changes with the file): another model may serve the same URL.
        return FileResponse(
            web.decoder, media_type="application/octet-stream", headers={"cache-control": "no-cache"}
        )

    async def runtime_file(request: Request) -> Response:
        name = request.path_params["name"]
        if web.runtime is None or name not in RUNTIME_FILES:  # only the listed names: no path is joined
            raise ApiError(404, f"no runtime file {name[:80]!r}")
        kinds = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm"}
        return FileResponse(web.runtime / name, media_type=kinds[os.path.splitext(name)[1]])

    async def embedding(request: Request) -> Response:
        """The image's embedding as float32 little-endian bytes, C order; its shape in ``X-Shape``."""
        image = service.image(request.path_params["image_id"])

        def as_bytes() -> tuple[bytes, tuple[int, ...]]:
            array = image.features.detach().to(device="cpu", dtype=torch.float32).numpy()
            return array.astype("<f4", copy=False).tobytes(), array.shape

        data, shape = await run_in_threadpool(as_bytes)
        # Not kept by the browser: the same image id has another embedding once another model serves it.
        headers = {"x-shape": ",".join(map(str, shape)), "cache-control": "no-store"}
        return Response(data, media_type="application/octet-stream", headers=headers)

    async def list_images(request: Request) -> Response:
        return JSONResponse({"images": await run_in_threadpool(folder_images, folder)})

    async def upload(request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        limit = service.limits.max_upload_bytes
        if kind == "multipart/form-data":
            body = await read_body(request, limit + 64 * 1024)  # refuses oversized bodies before parsing

            async def replay() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await Request(request.scope, replay).form(max_files=1, max_fields=4)
            except Exception as err:  # python-multipart's parse errors have no common base
                raise ApiError(
                    400, f"malformed multipart body: {str(err).splitlines()[0] if str(err) else ''}"
                ) from None
            file = form.get("file")
            if file is None or isinstance(file, str):
                raise ApiError(400, "the multipart body needs a file field named 'file'")
            data, name = await file.read(), file.filename or "upload"
        elif kind.startswith("image/") or kind == "application/octet-stream":
            data = await read_body(request, limit)
            name = urllib.parse.unquote(request.headers.get("x-file-name", "upload"))
        else:
            raise ApiError(
                415,
                f"upload an image as image/*, application/octet-stream or multipart/form-data, not {kind or 'none'!r}",
            )
        image, cached = await run_in_threadpool(service.open_image, data, clean_file_name(name))
        return JSONResponse(image_reply(image, cached))

    async def open_from_folder(request: Request) -> Response:
        data = await read_json(request)
        name = data.get("name")
        if folder is None:
            raise ApiError(404, "the server was started without --images")
        # Only names the listing offers are opened: no request string is ever joined into a path.
        listed = await run_in_threadpool(folder_images, folder)
        if not isinstance(name, str) or name not in listed:
            raise ApiError(404, f"no image named {str(name)[:80]!r} in the --images folder")
        path = os.path.join(folder, name)
        if os.path.dirname(os.path.realpath(path)) != folder:
            raise ApiError(403, f"{name!r} links outside the --images folder")
        with open(path, "rb") as f:
            blob = f.read(service.limits.max_upload_bytes + 1)
        image, cached = await run_in_threadpool(service.open_image, blob, clean_file_name(name))
        return JSONResponse(image_reply(image, cached))

    async def pixels(request: Request) -> Response:
        image = service.image(request.path_params["image_id"])
        return Response(await run_in_threadpool(png_bytes, image.pixels), media_type="image/png")

    async def predict(request: Request) -> Response:
        data = await read_json(request)
        image = service.image(data.get("image_id"))
        h, w = image.pixels.shape[:2]
        prompt = parse_prompt(data, h, w, service.limits.max_points)
        return JSONResponse(await run_in_threadpool(service.predict, image, *prompt))

    async def everything(request: Request) -> Response:
        data = await read_json(request)
        image = service.image(data.get("image_id"))
        settings = parse_settings(data)
        return JSONResponse(await run_in_threadpool(service.everything, image, settings))

    async def cancel_everything(request: Request) -> Response:
        data = await read_json(request)
        image = service.image(data.get("image_id"))
        return JSONResponse({"cancelled": service.cancel_everything(image.image_id)})

    async def export_route(request: Request) -> Response:
        data = await read_json(request)
        return await run_in_threadpool(export, service, data)

    async def api_error(request: Request, err: ApiError) -> Response:
        return JSONResponse({"error": err.message}, status_code=err.status)

    async def http_error(request: Request, err: HTTPException) -> Response:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)

    async def crash(request: Request, err: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(err).__name__}); see the server's log"}, 500)

    async def favicon(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    async def guard(request: Request, call_next: Any) -> Response:
        refusal = access.host_refusal(request.headers.get("host")) or access.origin_refusal(
            request.method, request.headers.get("origin"), request.headers.get("host")
        )
        if refusal:
            return JSONResponse({"error": refusal}, 403)
        if token and request.url.path.startswith("/api/"):
            given = request.headers.get(TOKEN_HEADER) or request.headers.get(
                "authorization", ""
            ).removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse(
                    {
                        "error": "missing or wrong token: open the address samkit serve printed "
                        f"(it ends in ?token=...), or send the token in the {TOKEN_HEADER} header"
                    },
                    401,
                )
        return await call_next(request)

    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware

    routes = [
        Route("/", index),
        Route("/favicon.ico", favicon),
        Route("/api/health", health),
        Route("/api/images", list_images, methods=["GET"]),
        Route("/api/images", upload, methods=["POST"]),
        Route("/api/images/open", open_from_folder, methods=["POST"]),
        Route("/api/images/{image_id}/pixels", pixels),
        Route("/api/images/{image_id}/embedding", embedding),
        Route("/api/decoder.onnx", decoder_model),
        Route("/runtime/{name}", runtime_file),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/everything", everything, methods=["POST"]),
        Route("/api/everything/cancel", cancel_everything, methods=["POST"]),
        Route("/api/export", export_route, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    middleware = [Middleware(BaseHTTPMiddleware, dispatch=guard)]
    if access.origins or access.any_origin:  # pages of the allowed origins may read the replies too
        from starlette.middleware.cors import CORSMiddleware

        origins = ["*"] if access.any_origin else sorted(access.origins)
        headers = ["content-type", "authorization", "x-file-name", TOKEN_HEADER]
        middleware.insert(
            0,
            Middleware(
                CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"], allow_headers=headers
            ),
        )
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: crash},
    )
