"""Text-prompt inference on one image: one mask per ``--text-prompt``, saved as a picture and a ``.npz``.

The library side of the seed's ``text_inference.py`` (a thin script at the repository's root):

    python text_inference.py --image-path room.jpg --checkpoint sam_vitb_text_clip.pth --text-prompt floor
    python text_inference.py --image-path photo.jpg --checkpoint sam_vitb_text_blip2.pth \
        --text-model-type blip2 --text-prompt "a dog" --text-prompt "a ball"

The SAM must be text-fine-tuned (``train.py -c configs/sa1b_text_finetune_clip.yaml``, or the seed's
text ``.ckpt``); its text feature size must be the feature model's (768 for the default CLIP, 256 for
BLIP-2). Every prompt is encoded by the frozen feature model (``--text-model-type clip|blip2``,
``--text-model`` a Hugging Face name from the cache or a local ``save_pretrained`` folder) and all of
them are decoded in one call on one image embedding, one mask each (``--multimask``: the best of 3 by
predicted IoU). The results go to ``<output-dir>/<image stem>_infer.png`` (each mask in its colour with
its prompt written by it) and ``<output-dir>/<image stem>_masks.npz`` with ``masks`` KxHxW bool at the
image's own size, ``iou`` K and ``prompts`` K strings.

Precision: ``--dtype``, or the seed's ``--amp-level``/``--amp_level`` O0 (float32) or O1/O2 (bfloat16 on
CPU, float16 on other devices); it applies to SAM, the feature model runs in float32.
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import numpy as np

from ..errors import CheckpointError, PromptError, SamkitError
from . import single_image as si

TEXT_MODEL_TYPES: tuple[str, ...] = ("clip", "blip2")
TEXT_PROJ_WEIGHT = "prompt_encoder.text_proj.weight"


def predict_texts(
    predictor: Any, image: np.ndarray, prompts: Sequence[str], multimask: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Embed ``image`` (HxWx3 uint8 RGB) once and decode every text prompt in one call, with the
    predictor's text encoder. Returns masks KxHxW bool at the image's size and IoU predictions K float32
    (with ``multimask``, each prompt's best of 3 by predicted IoU)."""
    predictor.set_image(image)
    masks, iou, _ = predictor.predict(text=list(prompts), multimask_output=multimask)
    best = iou.argmax(axis=1)
    rows = np.arange(len(prompts))
    return masks[rows, best].astype(bool), iou[rows, best].astype(np.float32)


def text_feature_dim(state: dict, source: str) -> int:
    """The text feature size a checkpoint's state dict takes; a plain SAM is one error line."""
    weight = state.get(TEXT_PROJ_WEIGHT)
    if weight is None:
        raise CheckpointError(
            f"{source} has no text-prompt parameters: text inference needs a text-fine-tuned SAM "
            "(train.py -c configs/sa1b_text_finetune_clip.yaml, or the seed's text .ckpt)"
        )
    return int(weight.shape[1])


def adapter_text_branch(path: str) -> Any:
    """The text projection weight an adapter file carries (a text-mode LoRA run trains the text branch in
    full), or None; the file's own errors (missing, not an adapter) are one line each."""
    from ..lora import read_adapter

    return read_adapter(path).tensors.get(TEXT_PROJ_WEIGHT)


def label_anchor(mask: np.ndarray) -> tuple[float, float] | None:
    """Where a mask's label goes: its centroid when that lies in the mask, else the mask pixel nearest
    to it (x, y); None for an empty mask."""
    step = max(1, max(mask.shape) // 256)  # a coarse grid keeps big images cheap
    ys, xs = np.nonzero(mask[::step, ::step])
    if len(xs) == 0:
        ys, xs = np.nonzero(mask)
        step = 1
    if len(xs) == 0:
        return None
    cx, cy = xs.mean(), ys.mean()
    i = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
    return float(xs[i] * step + step / 2), float(ys[i] * step + step / 2)


def draw_prompts(image: np.ndarray, masks: np.ndarray, iou: np.ndarray, prompts: Sequence[str]) -> Any:
    """A ``draw`` for :func:`single_image.save_results`: the masks in their colours over the image, each
    prompt (with its predicted IoU) written on its mask, in the mask's colour; labels that would land on
    each other are moved down, and the prompts of empty masks are listed in the top-left corner."""

    def draw(picture_path: str) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from .visualize import Panel, _save_atomically, draw_panel, mask_color

        h, w = image.shape[:2]
        aspect = min(max(h / w, 0.25), 4.0)
        fig = Figure(figsize=(6.0, 6.0 * aspect + 0.6), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        draw_panel(ax, image, Panel(masks, None, title=si.plural(len(prompts), "text prompt")))
        line = 0.06 * h  # about one label's height
        placed: list[tuple[float, float]] = []
        corner = 0
        for k, (mask, prompt, score) in enumerate(zip(masks, prompts, iou)):
            anchor = label_anchor(mask)
            if anchor is None:
                x, y, what, ha = 0.01 * w, 0.01 * h + corner * line, f"{prompt} (no mask)", "left"
                corner += 1
            else:
                (x, y), what, ha = anchor, f"{prompt} ({score:.2f})", "center"
                while any(abs(y - py) < line and abs(x - px) < 0.3 * w for px, py in placed):
                    y += line
                placed.append((x, y))
            ax.text(
                x, y, what, fontsize=10, color="white", va="center" if ha == "center" else "top", ha=ha,
                zorder=4, clip_on=True, bbox={"facecolor": mask_color(k), "alpha": 0.85, "pad": 2, "lw": 0},
            )  # fmt: skip
        _save_atomically(fig, picture_path, 100)

    return draw


# ---------------------------------------------------------------------------------------------------
# The command: text_inference.py


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of text inference: the seed's, each settable from the command line."""
    from ..text.features import DEFAULT_MODELS

    si.add_image_argument(parser)
    parser.add_argument(
        "--text-prompt",
        "--text_prompt",
        dest="text_prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="what to segment, e.g. floor or 'a dog'; repeat for several (one mask each, one image embedding)",
    )
    parser.add_argument(
        "--text-model-type",
        "--text_model_type",
        dest="text_model_type",
        default="clip",
        choices=TEXT_MODEL_TYPES,
        help="the feature model the SAM was text-fine-tuned with (default: clip)",
    )
    defaults = ", ".join(f"{k}: {v}" for k, v in DEFAULT_MODELS.items())
    parser.add_argument(
        "--text-model",
        "--text_model",
        dest="text_model",
        metavar="NAME_OR_DIR",
        help=f"Hugging Face model name (from the cache) or local save_pretrained folder (default {defaults})",
    )
    parser.add_argument(
        "--multimask",
        action="store_true",
        help="predict 3 masks per prompt and keep the best by predicted IoU (default: one mask, as trained)",
    )
    si.add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Predict one mask per text prompt on one image; save a picture and the masks."""
    from ..build import (
        build_model,
        check_checkpoint_size,
        checkpoint_image_size,
        load_checkpoint,
        read_checkpoint,
    )
    from ..predictor import SamPredictor
    from ..text import build_feature_encoder
    from ..text.features import DEFAULT_MODELS
    from ..utils.image import load_image

    # Everything a user can get wrong is checked before the model is built or a file is written.
    prompts = [" ".join(p.split()) for p in args.text_prompt]
    for raw, prompt in zip(args.text_prompt, prompts):
        if not prompt:
            raise PromptError(f"--text-prompt {raw!r}: empty")
    if args.download:
        raise SamkitError(
            "--download: the released SAM weights have no text branch; pass --checkpoint with a "
            "text-fine-tuned SAM (train.py -c configs/sa1b_text_finetune_clip.yaml, or the seed's text .ckpt)"
        )
    device, dtype_name = si.resolve_precision(args)
    image = load_image(args.image_path)
    checkpoint, output_dir, paths = si.prepare_outputs(args)
    state = None if checkpoint is None else read_checkpoint(checkpoint)
    if state is not None:
        check_checkpoint_size(state, args.model_type, checkpoint)
    encoder = build_feature_encoder(args.text_model_type, args.text_model, device=device)
    dim = encoder.feature_dim
    # A LoRA run in text mode from a plain SAM trains the text branch in full: its adapter file holds it.
    adapter_text = adapter_text_branch(args.adapter) if getattr(args, "adapter", None) else None
    if adapter_text is not None:
        dim = int(adapter_text.shape[1])
    elif state is not None:
        dim = text_feature_dim(state, checkpoint)
    if dim != encoder.feature_dim:  # the checkpoint's or the adapter's text branch
        model_name = args.text_model or DEFAULT_MODELS[args.text_model_type]
        source = args.adapter if adapter_text is not None else checkpoint
        raise CheckpointError(
            f"{source} takes text features of size {dim}, the {args.text_model_type} feature model "
            f"{model_name} gives {encoder.feature_dim}: pass the --text-model-type/--text-model the SAM "
            "was fine-tuned with"
        )

    def build(_: Any) -> Any:
        size = None if state is None else checkpoint_image_size(state)  # the checkpoint's input frame
        model = build_model(args.model_type, text_feature_dim=dim, image_size=size)
        if state is not None:
            load_checkpoint(
                model, state, keep_new_text_branch=adapter_text is not None, source=str(checkpoint)
            )
        return model

    model = si.build_sam(args, checkpoint, device, dtype_name, build=build)
    predictor = SamPredictor(model, text_encoder=encoder)
    masks, iou = predict_texts(predictor, image, prompts, args.multimask)
    arrays = {"masks": masks, "iou": iou, "prompts": np.asarray(prompts, dtype=str)}
    lines = [f"text {prompt!r}: predicted IoU {score:.3f}" for prompt, score in zip(prompts, iou)]
    si.write_results(output_dir, paths, arrays, draw_prompts(image, masks, iou, prompts), lines)
    return 0


main = si.main_for(add_arguments, run, __doc__, "text_inference.py")


__all__ = [
    "add_arguments",
    "draw_prompts",
    "label_anchor",
    "main",
    "predict_texts",
    "run",
    "text_feature_dim",
]
