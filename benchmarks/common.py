"""What every benchmark shares: Meta's model and samkit's holding the same random weights."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from samkit.build import ENCODER_CONFIGS, build_model
from samkit.fast import accelerate
from samkit.fast.allocator import allocator_tuned, tune_cpu_allocator
from samkit.modeling import Sam

# The training loop's settings for a timed run: no evaluation, no TensorBoard, no progress bar, a log
# line every step (the benchmarks read the step times from metrics.jsonl).
QUIET_TRAINING: dict[str, Any] = {"eval_every": 0, "log_every": 1, "tensorboard": False, "progress": False}


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tuned-allocator",
        action="store_true",
        help="keep freed memory for reuse (samkit.tune_cpu_allocator, an opt-in since the commands stopped tuning it) for the "
        "whole process: Meta's code runs under it too, so the ratio compares the libraries alone",
    )


def apply_common_flags(args: argparse.Namespace) -> None:
    if args.tuned_allocator and not tune_cpu_allocator():
        raise SystemExit("--tuned-allocator: mallopt is not available here (needs Linux with glibc)")


def cpu_name() -> str:
    """The CPU's model name and its matrix/bf16 units (from /proc/cpuinfo where there is one): CPU
    benchmark rows from different machines differ most by these."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in info.splitlines()) if v
    )
    flags = set(fields.get("flags", "").split())
    units = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 bf16")) if flag in flags]
    name = fields.get("model name", platform.machine())
    return f"{name} ({', '.join(units)})" if units else name


def machine() -> str:
    allocator = "tuned allocator" if allocator_tuned() else "default allocator"
    return (
        f"{platform.machine()}, {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{allocator}"
    )


def host_speed() -> dict[str, float]:
    """A gauge of how fast this shared host runs right now (about half a second): fp32 and bf16
    GEMM throughput (1024^3, GFLOP/s) and memory copy bandwidth (64 MiB, GB/s read + write), medians
    of short repeats. Benchmarks record it before and after their rounds: absolute times from runs
    whose gauges differ are not comparable (the same code ran 15-30% slower on this machine from one
    hour to the next), ratios within one run are."""
    import statistics
    import time

    def median_s(fn, repeats: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    gauge = {}
    for dtype, key in ((torch.float32, "fp32_gemm_gflops"), (torch.bfloat16, "bf16_gemm_gflops")):
        a = torch.randn(1024, 1024).to(dtype)
        b = torch.randn(1024, 1024).to(dtype)
        gauge[key] = round(2 * 1024**3 / median_s(lambda a=a, b=b: a @ b, 15) / 1e9, 1)
    src = torch.empty(16 << 20)  # 64 MiB of fp32
    dst = torch.empty_like(src)
    src.fill_(1.0)
    gauge["copy_gb_s"] = round(2 * src.numel() * 4 / median_s(lambda: dst.copy_(src), 10) / 1e9, 1)
    return gauge


def meta_sam(name: str):
    """Meta's ``segment_anything`` Sam of the given size (random init, eval mode)."""
    from segment_anything.build_sam import _build_sam

    dim, depth, heads, global_idx = ENCODER_CONFIGS[name]
    return _build_sam(
        encoder_embed_dim=dim,
        encoder_depth=depth,
        encoder_num_heads=heads,
        encoder_global_attn_indexes=global_idx,
    ).eval()


def shared_random_weights(name: str, seed: int = 1, scale: float = 0.02):
    """(Meta's model, its state dict) with EVERY tensor perturbed: Meta zero-initialises the position
    tables, and zeros would hide differences. Load the state into samkit models with ``samkit_sam``."""
    torch.manual_seed(0)
    meta = meta_sam(name)
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in meta.state_dict().items()}
    meta.load_state_dict(state)
    return meta, state


def samkit_sam(name: str, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Sam:
    """samkit's model with ``state``, accelerated as SamPredictor does (with the tuned allocator's
    decoder settings under ``--tuned-allocator``)."""
    model = build_model(name)
    model.load_state_dict(state)
    return accelerate(model.to(dtype), tuned_allocator=allocator_tuned())


def command_line(script: str, argv: list[str]) -> str:
    """The command a result was made with, for BENCHMARKS.md: ``--note`` left out (the note is
    recorded, and shown, on its own)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif not arg.startswith("--note="):
            kept.append(arg)
    return f"python benchmarks/{script} " + shlex.join(kept)


def write_result(path: str | None, result: dict[str, Any]) -> None:
    """Write a benchmark's result JSON (nothing when ``path`` is None), atomically: a benchmark stopped
    midway never leaves a truncated file for report.py to read. The day of the run is kept as
    ``date`` (when the script did not set one): figures quoted from a result say when they were measured."""
    if not path:
        return
    result = {**result, "date": result.get("date") or time.strftime("%Y-%m-%d")}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise
