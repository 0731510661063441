"""Peak CPU memory of ``set_image`` (the image encoder): Meta's fp32 against samkit's fp32 and bf16.

    python benchmarks/encoder_memory.py --model vit_b [--out benchmarks/results/encoder_memory_vit_b.json]

Each implementation runs in a fresh subprocess (the peak resident set size of a process only grows, so
sharing one would hide the later runs): it builds the model with random weights, reads its resident
size, embeds ``skimage.data.coffee()`` once, and reports the growth of the peak resident size over that
baseline: the memory the encoder needs on top of the weights for one image. Also the weights' own size.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys

from common import machine, write_result

CHILD = r"""
import json, resource, sys
import torch
impl, model_name = sys.argv[1], sys.argv[2]

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

from skimage import data
image = data.coffee()
torch.manual_seed(0)
if impl == "meta fp32":
    from common import meta_sam
    from segment_anything import SamPredictor
    predictor = SamPredictor(meta_sam(model_name))
else:
    from samkit import SamPredictor, build_model
    dtype = torch.bfloat16 if impl.endswith("bf16") else torch.float32
    predictor = SamPredictor(build_model(model_name).to(dtype).eval())
weights = sum(p.numel() * p.element_size() for p in predictor.model.parameters()) / 2**20
with torch.no_grad():
    predictor.model.prompt_encoder.get_dense_pe()  # small lazily built buffers out of the way
base = rss_mib()
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
predictor.set_image(image)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"weights_mib": weights, "baseline_rss_mib": base, "peak_rss_mib": peak,
                  "peak_before_mib": peak_before, "encoder_peak_mib": peak - max(base, 0.0)}))
"""

IMPLEMENTATIONS = ("meta fp32", "samkit fp32", "samkit bf16")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    here = __file__.rsplit("/", 1)[0] or "."
    results = {}
    for impl in IMPLEMENTATIONS:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, impl, args.model],
            capture_output=True, text=True, check=True, cwd=here,
        )  # fmt: skip
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[impl]
        print(
            f"  {impl:12s} weights {r['weights_mib']:7.1f} MiB, peak RSS growth during set_image "
            f"{r['encoder_peak_mib']:7.1f} MiB"
        )
    result = {
        "command": "python benchmarks/encoder_memory.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "model": args.model,
        "image": "skimage.data.coffee() 400x600",
        "results": results,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
