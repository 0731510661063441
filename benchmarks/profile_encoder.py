"""Profile one image-encoder forward with torch.profiler and print the most expensive operators.

python benchmarks/profile_encoder.py --model vit_b --dtype bfloat16 --batch 1 [--device cuda]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from samkit.build import build_model
from samkit.fast import accelerate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    encoder = accelerate(build_model(args.model)).image_encoder.to(dev, dtype).eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(args.batch, 3, 1024, 1024, device=dev, dtype=dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.inference_mode():
        encoder(x)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            encoder(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
