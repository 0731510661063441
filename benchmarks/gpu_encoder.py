"""Image-encoder throughput on a GPU: samkit (bf16, eager and torch.compile) against Meta's fp32.

    python benchmarks/gpu_encoder.py --models vit_b,vit_h --batches 1,8,32 [--out results.json]

Both implementations get the SAME random weights (every tensor perturbed) and the same inputs;
each configuration is warmed up, then timed with CUDA events; medians are reported with the
agreement of samkit's embeddings against Meta's fp32 ones (relative L2 difference).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from common import command_line, meta_sam, write_result

from samkit.build import build_model
from samkit.fast import accelerate


def meta_encoder(name: str):
    return meta_sam(name).image_encoder


class DenseBias(torch.nn.Module):
    """Runs the encoder with the fused relative-position attention kernel switched off."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from samkit.fast import rel_pos_kernel as rel_pos_attention

        saved, rel_pos_attention.ENABLED = rel_pos_attention.ENABLED, False
        try:
            return self.encoder(x)
        finally:
            rel_pos_attention.ENABLED = saved


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, x, iters: int, budget_s: float) -> list[float]:
    """Per-call seconds of ``fn(x)`` (after two warm-up calls), at most ``iters`` or ``budget_s``; CUDA
    events on a GPU (``--device cpu`` only checks that the script runs, with wall-clock times)."""
    dev = x.device
    for _ in range(2):
        fn(x)
    sync(dev)
    times = []
    start_all = time.perf_counter()
    while len(times) < iters and (time.perf_counter() - start_all < budget_s or len(times) < 3):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return times


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_b,vit_h")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--meta-batches", default="1,8")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timing per configuration")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile(samkit encoder)",
    )
    parser.add_argument(
        "--compile-batches", default=None, help="batches for the compiled encoder (default: --batches)"
    )
    parser.add_argument(
        "--dense-bias",
        action="store_true",
        help="also time samkit bf16 with the fused Triton attention switched off (the dense-bias path)",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--note", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    rows: list[dict] = []
    name_gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})"
    print(f"device: {name_gpu}, torch {torch.__version__}", flush=True)
    result = {
        "device": name_gpu,
        "torch": torch.__version__,
        "command": command_line("gpu_encoder.py", argv),
        "rows": rows,
    }
    if args.note:
        result["note"] = args.note
    batches = [int(b) for b in args.batches.split(",")]
    compile_batches = [int(b) for b in (args.compile_batches or args.batches).split(",")]
    for name in args.models.split(","):
        torch.manual_seed(0)
        meta = meta_encoder(name).to(dev).eval()
        g = torch.Generator(device=dev).manual_seed(1)
        with torch.no_grad():
            for p in meta.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g, device=dev))
        state = {f"image_encoder.{k}": v for k, v in meta.state_dict().items()}
        sam = accelerate(build_model(name).to(dev))
        sam.load_state_dict({**sam.state_dict(), **state})
        ours32 = sam.image_encoder.eval()
        ours16 = accelerate(build_model(name)).image_encoder.to(dev).eval()
        ours16.load_state_dict(ours32.state_dict())
        ours16.to(torch.bfloat16)
        x1 = torch.randn(1, 3, 1024, 1024, device=dev, generator=g)
        with torch.inference_mode():
            ref = meta(x1)
            agree = {
                "samkit fp32": rel(ours32(x1), ref),
                "samkit bf16": rel(ours16(x1.bfloat16()), ref),
            }
        print(f"{name}: rel. difference vs Meta fp32: {agree}", flush=True)
        plan = [("meta fp32", meta, torch.float32, int(b)) for b in args.meta_batches.split(",")]
        plan += [("samkit fp32", ours32, torch.float32, int(b)) for b in args.meta_batches.split(",")]
        plan += [("samkit bf16", ours16, torch.bfloat16, b) for b in batches]
        if args.dense_bias:
            plan += [("samkit bf16 dense bias", DenseBias(ours16), torch.bfloat16, b) for b in batches]
        if args.compile:
            compiled = torch.compile(ours16, dynamic=False)
            plan += [("samkit bf16 compiled", compiled, torch.bfloat16, b) for b in compile_batches]
        for label, module, dtype, batch in plan:
            x = torch.randn(batch, 3, 1024, 1024, device=dev, generator=g).to(dtype)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            try:
                with torch.inference_mode():
                    start = time.perf_counter()
                    module(x)
                    sync(dev)
                    first_s = time.perf_counter() - start
                    t = timed(module, x, args.iters, args.budget)
                    if label.startswith("samkit bf16 compiled") and label not in agree:
                        agree[label] = rel(module(x1.bfloat16()), ref) if batch == 1 else None
            except torch.cuda.OutOfMemoryError:
                print(f"{name} {label} batch {batch}: out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
            except Exception as e:  # a compiler failure must not lose the rows already measured
                print(f"{name} {label} batch {batch}: FAILED {type(e).__name__}: {str(e)[:500]}", flush=True)
                continue
            med = statistics.median(t)
            row = {
                "model": name,
                "impl": label,
                "batch": batch,
                "median_s": med,
                "images_per_s": batch / med,
                "runs": len(t),
                "first_call_s": first_s,
                "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0,
                "device": name_gpu,
            }
            rows.append(row)
            write_result(args.out, result)  # after each row: a run stopped later keeps what it measured
            print(
                f"{name:6s} {label:32s} batch {batch:3d}: {row['images_per_s']:8.1f} img/s "
                f"(median {med * 1000:.1f} ms over {len(t)} runs, first call {first_s:.1f} s, "
                f"peak {row['peak_gib']:.1f} GiB)",
                flush=True,
            )
            del x
        for r in rows:
            if r["model"] == name:
                r["agreement_vs_meta_fp32"] = agree.get(r["impl"], agree.get(r["impl"].split(" compiled")[0]))
        print(f"{name}: rel. difference vs Meta fp32: {agree}", flush=True)
        del meta, ours32, ours16, sam, plan
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        write_result(args.out, result)
    print("\nmodel  impl                             batch   img/s   x Meta fp32 (same batch)")
    for r in rows:
        base = next(
            (
                b
                for b in rows
                if b["model"] == r["model"] and b["impl"] == "meta fp32" and b["batch"] == r["batch"]
            ),
            None,
        )
        base = base or next(b for b in rows if b["model"] == r["model"] and b["impl"] == "meta fp32")
        print(
            f"{r['model']:6s} {r['impl']:32s} {r['batch']:5d} {r['images_per_s']:7.1f}   {r['images_per_s'] / base['images_per_s']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
