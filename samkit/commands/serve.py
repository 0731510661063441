"""``samkit serve``: a web page on this machine to click, box and 'segment everything' with one model.

    samkit serve --checkpoint sam_vit_b_01ec64.pth --model-type vit_b [--device cuda] [--dtype bfloat16]
                 [--host 127.0.0.1] [--port 8000] [--images FOLDER] [--token SECRET]
                 [--allow-host NAME ...] [--allow-origin URL ...]
                 [--web-runtime DIR] [--decoder-cache DIR] [--server-decoding]

Binds to 127.0.0.1 unless ``--host`` says otherwise (then it warns; give ``--token`` so that the API
asks for it in the ``X-Samkit-Token`` header). Requests whose Host header is not 127.0.0.1, localhost,
::1, the ``--host`` value or an ``--allow-host`` name are refused (DNS rebinding), and so are writes
from pages of other origins unless ``--allow-origin`` names them. One model in one process: no workers
are forked, and requests that run the model take turns.

The page can decode masks itself (hover and click without a round trip) when onnxruntime-web is found
(``make web-runtime``, or ``--web-runtime DIR``) and the model's decoder exports to ONNX (once per set of
weights, into ``--decoder-cache``); it then times its first decodes in the browser and on the server and
keeps the faster path, re-checking as it goes (``?decode=browser|server`` in the address forces one).
Otherwise, or with ``--server-decoding``, it asks the server.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import SamkitError
from .base import add_model_arguments, check_device, checkpoint_or_none, with_adapter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the server: the model's, where to listen, what to offer and the request limits."""
    add_model_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="default: 8000 (0 picks a free port)")
    parser.add_argument("--images", metavar="FOLDER", help="a folder whose images the page offers to open")
    parser.add_argument("--token", help="a secret the API requires in the X-Samkit-Token header")
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name the server answers to in the Host header (repeatable; '*' for any); "
        "default: 127.0.0.1, localhost, ::1 and --host",
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="URL",
        help="a web origin (http://host:port) whose pages may call the API (repeatable; '*' for any)",
    )
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (default 20 MB)")
    parser.add_argument(
        "--max-side", type=int, default=4096, help="longest image side accepted (default 4096)"
    )
    parser.add_argument("--cache-images", type=int, default=8, help="embeddings kept in memory (default 8)")
    parser.add_argument(
        "--embeddings",
        metavar="DIR",
        help="embeddings written by samkit embed with this model: opening one of those images skips the encoder",
    )
    parser.add_argument(
        "--web-runtime",
        metavar="DIR",
        help="onnxruntime-web's dist folder, for decoding in the browser (default: the one make web-runtime "
        "installs into samkit/serve/static/vendor/onnxruntime-web)",
    )
    parser.add_argument(
        "--decoder-cache",
        metavar="DIR",
        help="where the ONNX decoder the page runs is exported, once per model (default ~/.cache/samkit/web-decoders)",
    )
    parser.add_argument(
        "--server-decoding",
        action="store_true",
        help="decode every prompt on the server (no ONNX export, no runtime sent to the page)",
    )


def run(args: argparse.Namespace) -> int:
    """Start the web page and JSON API (needs samkit[serve]) and print its address."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise SamkitError(f"samkit serve needs {err.name}: pip install 'samkit[serve]'") from None
    import torch

    from ..build import build_model
    from ..checkpoints.download import download_checkpoint
    from ..serve.app import create_app
    from ..serve.guard import LOCAL_HOSTS, Access, is_ip_address
    from ..serve.state import Limits, ModelService
    from ..serve.webdecoder import RUNTIME_FILES, WebDecoder, prepare_web_decoder

    if not 0 <= args.port <= 65535:
        raise SamkitError(f"--port {args.port}: must be from 0 to 65535")
    if args.images is not None and not os.path.isdir(args.images):
        raise SamkitError(f"--images {args.images}: not a folder")
    if args.max_upload_mb <= 0 or args.max_side < 16 or args.cache_images < 1:
        raise SamkitError("--max-upload-mb, --max-side (>= 16) and --cache-images must be positive")
    if args.token is not None and not args.token.strip():
        raise SamkitError("--token is empty")
    for name in args.allow_host:
        bare = name.strip("[]")  # an IPv6 address has colons of its own; a port or scheme has one
        if not bare or "/" in bare or " " in bare or (":" in bare and not is_ip_address(bare)):
            raise SamkitError(f"--allow-host {name!r}: give a host name or address, without scheme or port")
    for origin in args.allow_origin:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise SamkitError(
                f"--allow-origin {origin!r}: give an origin such as http://example.org:8080, or '*'"
            )
    if args.embeddings is not None and not os.path.isdir(args.embeddings):
        raise SamkitError(f"--embeddings {args.embeddings}: not a folder")
    if args.web_runtime is not None:
        if not os.path.isdir(args.web_runtime):
            raise SamkitError(f"--web-runtime {args.web_runtime}: not a folder")
        missing = [n for n in RUNTIME_FILES if not os.path.isfile(os.path.join(args.web_runtime, n))]
        if missing:
            raise SamkitError(
                f"--web-runtime {args.web_runtime}: no {missing[0]} (give onnxruntime-web 1.x's dist folder)"
            )
    if (
        args.decoder_cache is not None
        and os.path.exists(args.decoder_cache)
        and not os.path.isdir(args.decoder_cache)
    ):
        raise SamkitError(f"--decoder-cache {args.decoder_cache}: not a folder")
    device = check_device(args.device)
    checkpoint = checkpoint_or_none(args)
    if checkpoint is None and args.download:
        checkpoint = download_checkpoint(args.model_type)
    model = with_adapter(build_model(args.model_type, checkpoint), args)
    model = model.to(device=device, dtype=getattr(torch, args.dtype))
    if checkpoint is None:
        print(
            f"warning: {args.model_type} runs with random weights: its masks are meaningless", file=sys.stderr
        )
    if args.host not in LOCAL_HOSTS:
        print(
            f"warning: --host {args.host} lets other machines reach the server"
            + ("" if args.token else "; anyone who reaches it can use it (give --token)"),
            file=sys.stderr,
        )
    limits = Limits(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_side=args.max_side,
        max_pixels=args.max_side * args.max_side,
        cache_images=args.cache_images,
    )
    service = ModelService(model, limits, embeddings=args.embeddings)
    if service.embeddings is not None:
        folder = service.embeddings
        print(
            f"embeddings: {len(folder)} images in {args.embeddings}"
            + (f"; {folder.other_encoder} files of another model left out" if folder.other_encoder else "")
            + (f"; {folder.damaged} unreadable files left out" if folder.damaged else ""),
            file=sys.stderr,
        )
    if args.server_decoding:
        web = WebDecoder(reason="the server was started with --server-decoding")
    else:
        web = prepare_web_decoder(model, args.model_type, args.decoder_cache, args.web_runtime)
    print(
        "decoding: the page times the browser (onnxruntime-web) and the server and keeps the faster"
        if web.available
        else f"decoding: on the server ({web.reason})",
        file=sys.stderr,
    )
    access = Access(args.host, args.allow_host, args.allow_origin)
    app = create_app(service, images_folder=args.images, token=args.token, access=access, web=web)
    config = uvicorn.Config(app, host=args.host, port=args.port, workers=1, log_level="warning")
    server = uvicorn.Server(config)

    # The address is printed once the socket is bound (with --port 0, the port the system picked).
    original_startup = server.startup

    async def startup(sockets=None) -> None:
        await original_startup(sockets)
        port = args.port
        for s in server.servers:
            for sock in s.sockets:
                port = sock.getsockname()[1]
        host = f"[{args.host}]" if ":" in args.host else args.host
        query = f"?token={args.token}" if args.token else ""
        print(f"samkit serve: http://{host}:{port}/{query} (Ctrl-C stops)", flush=True)

    server.startup = startup  # type: ignore[method-assign]
    server.run()
    return 0


__all__ = ["add_arguments", "run"]
