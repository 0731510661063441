"""ONNX Runtime vs samkit PyTorch on the CPU: encoder and one prompt, fp32 and int8 ONNX, same weights, same run.

    python benchmarks/onnx_cpu.py --model vit_b --rounds 3 [--out results/onnx_cpu_vit_b.json]

samkit's model (shared random weights, as the other benchmarks) is exported with ``export_onnx`` in
fp32 and int8 (dynamic quantisation) into a temporary folder; then samkit's SamPredictor (fp32) and
OnnxPredictor on each export run in alternation, ``--rounds`` times: ``set_image`` (encoder) and one
point prompt (median of ``--prompt-calls`` calls). Agreement with samkit fp32: embeddings (max abs,
relative L2) and masks (pixel agreement, IoU) for a point and a box prompt. File sizes are recorded.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from common import (
    add_common_flags,
    apply_common_flags,
    machine,
    samkit_sam,
    shared_random_weights,
    write_result,
)

from samkit import SamPredictor
from samkit.build import ENCODER_CONFIGS
from samkit.export.onnx import export_onnx
from samkit.onnx import OnnxPredictor


def session_options():
    """As many threads as torch uses, and no spinning: ONNX Runtime's idle threads otherwise keep
    the cores busy for a while after each run, and slow down the PyTorch run that follows."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def folder_bytes(path: str) -> dict[str, int]:
    return {name: os.path.getsize(os.path.join(path, name)) for name in sorted(os.listdir(path))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b", choices=list(ENCODER_CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-calls", type=int, default=10)
    parser.add_argument("--out", default=None)
    add_common_flags(parser)
    args = parser.parse_args(argv)
    apply_common_flags(args)
    tmp = tempfile.mkdtemp(prefix="onnx_cpu_")
    try:
        return run(args, argv, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the vit_b exports take ~470 MB


def run(args: argparse.Namespace, argv: list[str] | None, tmp: str) -> int:
    from skimage import data

    _, state = shared_random_weights(args.model)
    model = samkit_sam(args.model, state).eval()
    export_s, sizes, predictors = {}, {}, {"samkit fp32": SamPredictor(model)}
    for precision in ("fp32", "int8"):
        out = os.path.join(tmp, precision)
        start = time.perf_counter()
        export_onnx(model, out, model_type=args.model, precision=precision)
        export_s[precision] = time.perf_counter() - start
        sizes[precision] = folder_bytes(out)
        predictors[f"onnx {precision}"] = OnnxPredictor(out, session_options=session_options())
        print(f"exported {precision} in {export_s[precision]:.1f} s: {sizes[precision]}", flush=True)

    image = data.coffee()  # 400x600 photo shipped with scikit-image
    h, w = image.shape[:2]
    point = dict(
        point_coords=np.array([[0.5 * w, 0.5 * h]]), point_labels=np.array([1]), multimask_output=False
    )
    box = dict(box=np.array([0.2 * w, 0.1 * h, 0.8 * w, 0.9 * h]), multimask_output=False)
    encoder_s: dict[str, list[float]] = {k: [] for k in predictors}
    prompt_s: dict[str, list[float]] = {k: [] for k in predictors}
    embeddings, masks = {}, {}
    for _ in range(args.rounds):
        for name, pred in predictors.items():
            start = time.perf_counter()
            pred.set_image(image)
            encoder_s[name].append(time.perf_counter() - start)
            calls = []
            for _ in range(args.prompt_calls):
                start = time.perf_counter()
                pred.predict(**point)
                calls.append(time.perf_counter() - start)
            prompt_s[name].append(statistics.median(calls))
            emb = pred.get_image_embedding()
            embeddings[name] = emb.float().numpy() if isinstance(emb, torch.Tensor) else emb
            masks[name] = [pred.predict(**p)[0] for p in (point, box)]

    ref_emb, ref_masks = embeddings["samkit fp32"], masks["samkit fp32"]
    agreement = {}
    for name in predictors:
        if name == "samkit fp32":
            continue
        diff = embeddings[name] - ref_emb
        agreement[name] = {
            "embedding_max_abs": float(np.abs(diff).max()),
            "embedding_rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(ref_emb)),
            "mask_pixel_agreement": [float((a == b).mean()) for a, b in zip(masks[name], ref_masks)],
            "mask_iou": [
                float((a & b).sum() / max((a | b).sum(), 1)) for a, b in zip(masks[name], ref_masks)
            ],
        }
    enc_med = {k: statistics.median(v) for k, v in encoder_s.items()}
    prompt_med = {k: statistics.median(v) for k, v in prompt_s.items()}
    import onnxruntime

    result = {
        "command": "python benchmarks/onnx_cpu.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{machine()}, onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)",
        "model": args.model,
        "image": f"skimage.data.coffee() {h}x{w}",
        "rounds": args.rounds,
        "encoder_median_s": enc_med,
        "encoder_all_s": encoder_s,
        "prompt_median_s": prompt_med,
        "prompt_all_s": prompt_s,
        "export_s": export_s,
        "file_bytes": sizes,
        "agreement_vs_samkit_fp32": agreement,
    }
    print(f"{args.model} on {result['machine']}, {args.rounds} rounds, medians:")
    for k in predictors:
        print(
            f"  {k:12s} encoder {enc_med[k]:6.2f} s (x{enc_med['samkit fp32'] / enc_med[k]:.2f} vs samkit)  "
            f"one point {1000 * prompt_med[k]:7.1f} ms (x{prompt_med['samkit fp32'] / prompt_med[k]:.2f})"
        )
    for k, a in agreement.items():
        print(
            f"  {k}: embeddings max abs {a['embedding_max_abs']:.2e}, rel L2 {a['embedding_rel_l2']:.2e}; masks "
            f"(point, box) agreement {', '.join(f'{v:.4%}' for v in a['mask_pixel_agreement'])}, "
            f"IoU {', '.join(f'{v:.4f}' for v in a['mask_iou'])}"
        )
    for precision, files in sizes.items():
        print(f"  {precision} files: " + ", ".join(f"{n} {b / 2**20:.1f} MiB" for n, b in files.items()))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
