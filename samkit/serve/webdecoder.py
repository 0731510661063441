"""What the page needs to decode masks itself: the model's mask decoder as ONNX and onnxruntime-web.

The decoder is samkit's own export (:func:`samkit.export.onnx.export_decoder`, Meta's interface: the
dense positional encoding is a constant of the graph) of the served model's prompt encoder and mask
decoder, converted to float32 on the CPU. It is exported once per set of weights into a cache folder,
``<cache>/<key>/decoder.onnx``, the key hashing the weights, the image size, the opset and samkit's
version; the file is written with :func:`samkit.utils.files.atomic_write`, so a reader (or a second
server) never sees half of one.

The runtime is the wasm build of onnxruntime-web: three files (:data:`RUNTIME_FILES`) in a folder, by
default ``samkit/serve/static/vendor/onnxruntime-web`` (filled by ``make web-runtime``), or any folder given
with ``samkit serve --web-runtime DIR`` (``node_modules/onnxruntime-web/dist`` of an ``npm install``).

Whatever is missing or fails, :func:`prepare_web_decoder` gives a :class:`WebDecoder` whose ``reason``
says why, and the page decodes on the server instead.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..version import __version__

# The wasm-only bundle of onnxruntime-web and the wasm module it loads (single-threaded use).
RUNTIME_FILES: tuple[str, ...] = (
    "ort.wasm.min.js",
    "ort-wasm-simd-threaded.mjs",
    "ort-wasm-simd-threaded.wasm",
)
DEFAULT_RUNTIME_DIR = Path(__file__).resolve().parent / "static" / "vendor" / "onnxruntime-web"
OPSET = 17
log = logging.getLogger("samkit.serve")


@dataclass(frozen=True)
class WebDecoder:
    """``decoder``: the exported ``decoder.onnx``; ``runtime``: the folder of :data:`RUNTIME_FILES`;
    ``reason``: why the page cannot decode itself (None when it can)."""

    decoder: Optional[Path] = None
    runtime: Optional[Path] = None
    reason: Optional[str] = "in-browser decoding is off"

    @property
    def available(self) -> bool:
        return self.reason is None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/samkit/web-decoders`` (``~/.cache/samkit/web-decoders``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "samkit" / "web-decoders"


def find_runtime(folder: Optional[str | os.PathLike] = None) -> tuple[Optional[Path], Optional[str]]:
    """(the runtime folder, None) or (None, why not): ``folder`` or the default one must hold all of
    :data:`RUNTIME_FILES`."""
    where = Path(folder) if folder is not None else DEFAULT_RUNTIME_DIR
    missing = [name for name in RUNTIME_FILES if not (where / name).is_file()]
    if missing:
        hint = "run make web-runtime" if folder is None else "give the dist folder of onnxruntime-web 1.x"
        return None, f"onnxruntime-web is not in {where} ({missing[0]} is missing: {hint})"
    return where.resolve(), None


class _EncoderStub(nn.Module):
    """Stands in for the image encoder in the decoder's export, which reads only its ``img_size``."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size


def decoder_part(model: nn.Module) -> nn.Module:
    """A float32 CPU copy of ``model``'s prompt encoder and mask decoder in a Sam (the image encoder
    left out): exporting it neither touches nor waits for the served model."""
    from ..modeling import Sam

    part = Sam(
        _EncoderStub(int(model.image_encoder.img_size)),  # type: ignore[arg-type]
        copy.deepcopy(model.prompt_encoder).to(device="cpu", dtype=torch.float32),
        copy.deepcopy(model.mask_decoder).to(device="cpu", dtype=torch.float32),
        model._mean,
        model._std,
    )
    part.mask_threshold = float(model.mask_threshold)
    return part.eval()


def decoder_key(part: nn.Module) -> str:
    """A hash of what the exported graph depends on: the weights (as float32), the image size, the
    opset and samkit's version (24 hex digits)."""
    digest = hashlib.sha256(f"{__version__}|{OPSET}|{part.image_encoder.img_size}".encode())
    for name, tensor in sorted(part.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def export_cached_decoder(model: nn.Module, cache_dir: str | os.PathLike, model_type: str) -> Path:
    """``<cache_dir>/<key>/decoder.onnx`` for ``model``, exported when not there yet (atomically).

    Returns its path; raises whatever the export raises (ImportError without onnx)."""
    from ..export.onnx import export_decoder, finish_model, model_metadata, require_onnx
    from ..utils.files import atomic_write

    part = decoder_part(model)
    target = Path(cache_dir) / decoder_key(part) / "decoder.onnx"
    if target.is_file():
        return target
    require_onnx()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".export-", dir=target.parent)
    try:
        path = os.path.join(work, "decoder.onnx")
        export_decoder(part, path, OPSET)
        metadata = model_metadata(part, model_type, "fp32", part="decoder", served_by="samkit serve")
        finish_model(path, metadata, "fp32", False)
        with open(path, "rb") as f, atomic_write(target) as out:
            shutil.copyfileobj(f, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def prepare_web_decoder(
    model: nn.Module,
    model_type: str,
    cache_dir: Optional[str | os.PathLike] = None,
    runtime_dir: Optional[str | os.PathLike] = None,
) -> WebDecoder:
    """The decoder and runtime for the page, or a :class:`WebDecoder` naming why the page must decode on
    the server (no runtime, no onnx, a failed export: logged, never raised)."""
    runtime, reason = find_runtime(runtime_dir)
    if runtime is None:
        return WebDecoder(reason=reason)
    try:
        decoder = export_cached_decoder(model, cache_dir or default_cache_dir(), model_type)
    except Exception as err:  # any failure leaves the server path, which always works
        log.warning("exporting the decoder for the page failed: %s", err)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return WebDecoder(runtime=runtime, reason=f"exporting the ONNX decoder failed: {first}")
    return WebDecoder(decoder=decoder, runtime=runtime, reason=None)


__all__ = [
    "DEFAULT_RUNTIME_DIR",
    "RUNTIME_FILES",
    "WebDecoder",
    "decoder_key",
    "decoder_part",
    "default_cache_dir",
    "export_cached_decoder",
    "find_runtime",
    "prepare_web_decoder",
]
