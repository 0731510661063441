"""Export a SAM model to ``encoder.onnx`` + ``decoder.onnx`` (Meta's decoder interface), atomically, fp32/fp16/int8.

The models are written into a temporary folder beside ``output_dir`` and renamed into place only when
both are complete and pass ``onnx.checker``: ``output_dir`` never holds a half-written model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import warnings
from typing import Any

import torch

from ..errors import SamkitError
from ..modeling import Sam
from ..utils.onnx import (
    DECODER_INPUT_NAMES,
    DECODER_OUTPUT_NAMES,
    EXTRA_METRICS_OUTPUT_NAMES,
    SamOnnxEncoder,
    SamOnnxModel,
)
from ..version import __version__

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
MODEL_FILES: tuple[str, ...] = ("encoder.onnx", "decoder.onnx")
# protobuf cannot serialise a model of 2 GiB or more: bigger ones keep their weights in one file beside it.
EXTERNAL_DATA_BYTES = 2**31 - 2**26


def require_onnx() -> tuple[Any, Any]:
    """(onnx, onnxruntime), or a SamkitError that names the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise SamkitError(
            f"ONNX export needs onnx and onnxruntime ({err.name} is missing): pip install 'samkit[onnx]'"
        ) from None
    return onnx, onnxruntime


def model_metadata(model: Sam, model_type: str, precision: str, **extra: Any) -> dict[str, str]:
    """What a deployment needs to know besides the graph (stored as ``metadata_props``)."""
    return {
        "model_type": model_type,
        "image_size": str(model.image_encoder.img_size),
        "pixel_mean": ",".join(repr(float(v)) for v in model._mean),
        "pixel_std": ",".join(repr(float(v)) for v in model._std),
        "mask_threshold": repr(float(model.mask_threshold)),
        "precision": precision,
        "samkit_version": __version__,
        **{k: str(v) for k, v in extra.items()},
    }


def _export(module: torch.nn.Module, args: tuple, path: str, opset: int, **kwargs: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints: the shapes they fix are static
        torch.onnx.export(
            module, args, path, opset_version=opset, do_constant_folding=True, dynamo=False, **kwargs
        )


def export_encoder(model: Sam, path: str, opset: int = 17, preprocess: bool = False) -> None:
    """Trace the image encoder to ``path``: input ``image`` 1x3xSxS normalised + padded, or with
    ``preprocess`` ``input_image`` HxWx3 float RGB 0-255 resized to long side S (dynamic H, W)."""
    size = model.image_encoder.img_size
    if preprocess:
        dummy = torch.randint(0, 255, (size, size * 3 // 4, 3)).float()
        names, axes = ["input_image"], {"input_image": {0: "height", 1: "width"}}
    else:
        dummy = torch.randn(1, 3, size, size)
        names, axes = ["image"], None
    encoder = SamOnnxEncoder(model, preprocess=preprocess).eval()
    _export(
        encoder,
        (dummy,),
        path,
        opset,
        input_names=names,
        output_names=["image_embeddings"],
        dynamic_axes=axes,
    )


def export_decoder(
    model: Sam,
    path: str,
    opset: int = 17,
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
) -> None:
    """Trace prompt encoder + mask decoder + postprocessing with Meta's inputs/outputs (dynamic points)."""
    decoder = SamOnnxModel(model, return_single_mask, use_stability_score, return_extra_metrics).eval()
    embed_dim = model.prompt_encoder.embed_dim
    grid = model.prompt_encoder.image_embedding_size
    mask_size = model.prompt_encoder.mask_input_size
    dummy = (
        torch.randn(1, embed_dim, *grid),
        torch.randint(0, model.image_encoder.img_size, (1, 5, 2)).float(),
        torch.randint(0, 4, (1, 5)).float(),
        torch.randn(1, 1, *mask_size),
        torch.tensor([1.0]),
        torch.tensor([1500.0, 2250.0]),
    )
    outputs = EXTRA_METRICS_OUTPUT_NAMES if return_extra_metrics else DECODER_OUTPUT_NAMES
    axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    _export(
        decoder,
        dummy,
        path,
        opset,
        input_names=list(DECODER_INPUT_NAMES),
        output_names=list(outputs),
        dynamic_axes=axes,
    )


def _weights_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * 4 for p in module.parameters())


def finish_model(path: str, metadata: dict[str, str], precision: str, external: bool) -> None:
    """Convert the model at ``path`` (alone in its folder) to ``precision``, store ``metadata`` and run the
    checker on the path (the checker reads external data beside the model; an in-memory check of a
    model over 2 GB cannot)."""
    import onnx

    folder = os.path.dirname(path)
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Into a folder of its own: with external data (vit_h) the quantiser writes its data file
        # beside its output, and the model is read back from there.
        quantised_dir = f"{folder}.int8"
        os.makedirs(quantised_dir)
        quantised = os.path.join(quantised_dir, os.path.basename(path))
        logging.disable(logging.WARNING)  # its advice to run its pre-processing first: noise
        try:
            quantize_dynamic(
                path,
                quantised,
                weight_type=QuantType.QUInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
                use_external_data_format=external,
            )
        finally:
            logging.disable(logging.NOTSET)
        model = onnx.load(quantised)
        shutil.rmtree(quantised_dir)
    else:
        model = onnx.load(path)  # with any external data the exporter wrote beside it
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel

        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
        # The converter appends the input casts after the nodes that read them; the checker wants order.
        OnnxModel(model).topological_sort()
    onnx.helper.set_model_props(model, metadata)
    _clear(folder)
    if external and precision == "fp32":  # fp16 halves vit_h's 2.5 GB encoder, int8 quarters it
        location = os.path.basename(path) + ".data"
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=location,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, path)
    onnx.checker.check_model(path)


def _clear(folder: str) -> None:
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))


def check_output(output_dir: str, overwrite: bool) -> None:
    """Refuse, before any work, an output that exists (without ``overwrite``) or cannot be written."""
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise SamkitError(f"--output {output_dir}: exists and is not a directory")
        names = os.listdir(output_dir)
        if names and not overwrite:
            raise SamkitError(
                f"--output {output_dir}: exists and is not empty (pass --overwrite to replace it)"
            )
        # The folder is replaced as a whole: only a previous export's files may go with it (not, say,
        # the checkpoint being exported, kept beside it).
        ours = set(MODEL_FILES) | {f"{name}.data" for name in MODEL_FILES}
        foreign = sorted(n for n in names if n not in ours)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise SamkitError(
                f"--output {output_dir}: holds files other than a previous export's ({shown}); --overwrite "
                "replaces the folder as a whole, so give a new or empty folder"
            )
    parent = os.path.dirname(output_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise SamkitError(f"--output {output_dir}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SamkitError(f"--output {output_dir}: cannot write in {parent}")


def export_onnx(
    model: Sam,
    output_dir: str | os.PathLike,
    *,
    model_type: str,
    opset: int = 17,
    precision: str = "fp32",
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
    encoder_preprocess: bool = False,
    overwrite: bool = False,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
) -> dict[str, str]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` for ``model`` into ``output_dir`` (created; replaced as a
    whole with ``overwrite``). Returns ``{"encoder": path, "decoder": path}``.

    ``precision``: fp32; fp16 (weights and compute, fp32 inputs/outputs); int8 (dynamic quantisation of
    the MatMul/Gemm weights of both models). Models whose fp32 weights pass ``external_data_bytes`` keep
    their weights in ``<model>.onnx.data`` beside the model.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if model.dtype != torch.float32 or model.device.type != "cpu":
        raise ValueError(
            f"export a float32 model on the CPU (got {model.dtype} on {model.device}): "
            "precision='fp16' converts the exported model"
        )
    require_onnx()
    output_dir = os.path.abspath(os.fspath(output_dir))
    check_output(output_dir, overwrite)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(output_dir)}.{secrets.token_hex(4)}.part")
    model = model.eval()
    try:
        os.makedirs(os.path.join(tmp, "enc"))
        os.makedirs(os.path.join(tmp, "dec"))
        encoder_path = os.path.join(tmp, "enc", "encoder.onnx")
        decoder_path = os.path.join(tmp, "dec", "decoder.onnx")
        export_encoder(model, encoder_path, opset, preprocess=encoder_preprocess)
        export_decoder(
            model, decoder_path, opset, return_single_mask, use_stability_score, return_extra_metrics
        )
        common = dict(model_type=model_type, precision=precision, opset=opset)
        finish_model(
            encoder_path,
            model_metadata(
                model,
                part="encoder",
                encoder_input="resized_pixels" if encoder_preprocess else "normalised_padded",
                **common,
            ),
            precision,
            _weights_bytes(model.image_encoder) >= external_data_bytes,
        )
        finish_model(
            decoder_path,
            model_metadata(
                model,
                part="decoder",
                return_single_mask=return_single_mask,
                use_stability_score=use_stability_score,
                return_extra_metrics=return_extra_metrics,
                **common,
            ),
            precision,
            False,
        )
        final = os.path.join(tmp, "final")
        os.makedirs(final)
        for sub in ("enc", "dec"):
            for name in os.listdir(os.path.join(tmp, sub)):
                os.replace(os.path.join(tmp, sub, name), os.path.join(final, name))
        _move_into_place(final, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "encoder": os.path.join(output_dir, "encoder.onnx"),
        "decoder": os.path.join(output_dir, "decoder.onnx"),
    }


def _move_into_place(final: str, output_dir: str) -> None:
    """Rename the finished folder to ``output_dir``; an existing one is moved aside first and removed after."""
    old = None
    if os.path.exists(output_dir):
        old = f"{final}.old"
        os.replace(output_dir, old)
    try:
        os.replace(final, output_dir)
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                os.replace(old, output_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "EXTERNAL_DATA_BYTES",
    "MODEL_FILES",
    "PRECISIONS",
    "check_output",
    "export_decoder",
    "export_encoder",
    "export_onnx",
    "finish_model",
    "model_metadata",
    "require_onnx",
]
