"""Write BENCHMARKS.md from the JSON files the benchmark scripts leave in benchmarks/results/.

    python benchmarks/report.py            # regenerate BENCHMARKS.md and README.md's speed figures

Each table says which script and command produced it; missing results are listed as not yet measured.
README.md's speed figures (between the README_BEGIN and README_END lines) come from here too, each
with its result file, host and date; tests/test_figures.py checks that README.md and the results agree.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
README = ROOT.parent / "README.md"
README_BEGIN = (
    "<!-- speed figures: written by `python benchmarks/report.py` from benchmarks/results; do not edit -->"
)
README_END = "<!-- end of the generated speed figures -->"
# An AMG row must compare at least this many of Meta's records (benchmarks/amg.py MIN_RECORDS): random
# weights keep 0 or 1, and a time without records measures no post-processing and no agreement.
MIN_AMG_RECORDS = 100


def host(r: dict) -> str:
    """The machine a CPU result ran on, without the allocator (stated on its own where it matters)."""
    return r["machine"].replace(", tuned allocator", "").replace(", default allocator", "")


def when(r: dict) -> str:
    """The day a result was measured (``date``, written by the scripts), or, for older files without
    one, the day the file was committed (``committed``, added from git history)."""
    if r.get("date"):
        return f"measured {r['date']}"
    return f"result committed {r['committed']}" if r.get("committed") else "date not recorded"


def host_speed_text(before: dict[str, float], after: dict[str, float]) -> str:
    """The gauges of ``host_speed`` before / after a benchmark's rounds, in words."""
    parts = [("fp32 GEMM", "fp32_gemm_gflops", "GFLOP/s"), ("bf16 GEMM", "bf16_gemm_gflops", "GFLOP/s"),
             ("copy", "copy_gb_s", "GB/s")]  # fmt: skip
    return ", ".join(f"{name} {before[k]:g} / {after[k]:g} {unit}" for name, k, unit in parts)


def _identical(result: dict) -> str:
    """ ", N identical" from an AMG result's record matching (same point, IoU, mask, box, area, stability)."""
    matched = result.get("identical_records")
    return f", {matched['record']} of Meta's identical in samkit's output" if matched else ""


def amg_identical_cell(r: dict) -> str:
    """ "N of M": Meta's records that samkit's output holds identically (matched by point and predicted
    IoU: same mask, box, area, crop box, stability), or n/a when nothing was compared."""
    matched = r.get("identical_records")
    if not matched or not r["records"]["meta"]:
        return "n/a"
    return f"{matched['record']} of {r['records']['meta']}"


def _trained_recipe(info: dict) -> str:
    """How the benchmark decoder was trained, from its recorded settings."""
    settings = info["settings"]
    if "segments" in settings:
        return (
            f"decoder trained {settings['steps']} steps on SLIC superpixels of {len(settings['photos'])} "
            f"scikit-image photos, training IoU {' / '.join(f'{v:.2f}' for v in info['train_iou_last_100'])}"
        )
    return "decoder trained on generated shapes"


def _prompt_target(targets: float | dict[str, float], implementation: str) -> float:
    """A prompt target in ms: one figure (older results) or one per samkit dtype ("bf16", "fp32")."""
    return targets if isinstance(targets, (int, float)) else targets[implementation.split()[-1]]


def load(pattern: str) -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(RESULTS.glob(pattern))]


def not_measured(title: str, message: str) -> list[str]:
    """The section of a benchmark without results: its title and how to measure it."""
    return [title, "", message, ""]


def cpu_encoder() -> list[str]:
    title = "## Image encoder (`set_image`) on the CPU"
    runs = load("cpu_encoder_*.json")
    if not runs:
        return not_measured(
            title,
            "Not measured yet: `python benchmarks/cpu_encoder.py --model vit_b --rounds 3 --out benchmarks/results/cpu_encoder_vit_b.json`.",
        )
    lines = [title, ""]
    for name, r in runs:
        command = (
            r.get("command")
            or f"python benchmarks/cpu_encoder.py --model {r['model']} --rounds {r['rounds']}"
        )
        lines += [
            f"`{command}` ({name}); machine: {r['machine']};",
            f"image: {r['image']}; medians of {r['rounds']} alternating runs, same random weights.",
            "",
            "| implementation | median s | range s | speed-up vs Meta fp32 (ratio of medians) | median of per-round ratios |",
            "|---|---|---|---|---|",
        ]
        for impl, sec in r["median_s"].items():
            spread = f"{min(r['all_s'][impl]):.2f}-{max(r['all_s'][impl]):.2f}" if "all_s" in r else ""
            paired = f"{r['paired_speedup_median'][impl]:.2f}x" if "paired_speedup_median" in r else ""
            lines.append(f"| {impl} | {sec:.2f} | {spread} | {r['speedup_vs_meta'][impl]:.2f}x | {paired} |")
        ious = ", ".join(f"{v:.4f}" for v in r["bf16_mask_iou_vs_fp32"])
        lines += [
            "",
            f"Agreement: samkit fp32 masks equal Meta's on {r['fp32_mask_pixel_agreement_vs_meta']:.6f} of pixels; "
            f"bf16 mask IoU against fp32: {ious}.",
            "",
            *([f"Note: {r['note']}.", ""] if r.get("note") else []),
        ]
    return lines


GPU_ENCODER_TARGET = 300.0  # images/s, vit_b on an H100 (the target)
GPU_TRAIN_TARGET = 60.0  # images/s, vit_b box fine-tuning on an H100


def gpu_encoder() -> list[str]:
    title = "## Image encoder on a GPU"
    runs = load("gpu_encoder_*.json")
    if not runs:
        return not_measured(title, "Not measured yet.")
    lines = [title, ""]
    for name, r in runs:
        command = r.get("command", "python benchmarks/gpu_encoder.py")
        lines += [
            f"`{command}` ({name}); device: {r['device']}, torch {r['torch']}; medians with CUDA events;",
            "x Meta fp32 at the same batch, else at Meta's first measured batch; first call: the untimed call",
            "before the warm-up (for the compiled encoder, the compilation).",
            "",
            *([f"Note: {r['note']}.", ""] if r.get("note") else []),
            "| model | implementation | batch | images/s | x Meta fp32 | first call s | peak GiB | rel. diff. vs Meta fp32 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        rows = r["rows"]
        for row in rows:
            base = next(
                (
                    b
                    for b in rows
                    if b["model"] == row["model"] and b["impl"] == "meta fp32" and b["batch"] == row["batch"]
                ),
                None,
            )
            base = base or next(b for b in rows if b["model"] == row["model"] and b["impl"] == "meta fp32")
            agree = row.get("agreement_vs_meta_fp32")
            first = row.get("first_call_s")
            lines.append(
                f"| {row['model']} | {row['impl']} | {row['batch']} | {row['images_per_s']:.1f} | "
                f"{row['images_per_s'] / base['images_per_s']:.2f}x | {'' if first is None else f'{first:.1f}'} | "
                f"{row['peak_gib']:.1f} | {'' if agree is None else f'{agree:.1e}'} |"
            )
        lines.append("")
        vit_b = [row["images_per_s"] for row in rows if row["model"] == "vit_b" and "bf16" in row["impl"]]
        if "H100" in r["device"] and vit_b:
            verdict = "met" if max(vit_b) >= GPU_ENCODER_TARGET else "missed"
            lines += [
                f"Target (the issue's, H100): vit_b encoder >= {GPU_ENCODER_TARGET:g} images/s: best {max(vit_b):.1f} ({verdict}).",
                "",
            ]
    return lines


def amg_measured(r: dict) -> bool:
    """Whether an AMG result measures automatic mask generation: Meta's generator kept enough records."""
    return r["records"]["meta"] >= MIN_AMG_RECORDS


def amg() -> list[str]:
    title = "## Automatic mask generation"
    every = [(name, r) for name, r in load("amg_*.json") if "median_s" in r]  # not amg_memory*.json
    runs = [(name, r) for name, r in every if amg_measured(r)]
    lines = [title, ""]
    if not runs:
        lines += [
            "Not measured yet: `python benchmarks/amg.py --model vit_b --trained --rounds 3 --out "
            "benchmarks/results/amg_vit_b_trained.json`.",
            "",
        ]
    else:
        lines += [
            "| file | model | samkit dtype | allocator | generator arguments | Meta s | samkit s | speed-up | records (Meta / samkit) | identical records | prompts with masks computed |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for name, r in runs:
        allocator = "tuned" if "tuned allocator" in r["machine"] else "default"
        upscaled = r.get("prompts_upscaled")
        upscaled = (
            "not recorded"
            if "prompts_upscaled" not in r
            else "n/a"
            if upscaled is None
            else f"{upscaled:.0%}"
        )
        if r.get("device", "cpu") != "cpu":  # a GPU run: say which, and when it was measured
            name = f"{name} ({r['device']}{', ' + r['date'] if r.get('date') else ''})"
        lines.append(
            f"| {name} | {r['model']} | {r['samkit_dtype']} | {allocator} | `{r['generator_kwargs']}` | {r['median_s']['meta']:.1f} | "
            f"{r['median_s']['samkit']:.1f} | {r['speedup']:.2f}x | {r['records']['meta']} / {r['records']['samkit']} | "
            f"{amg_identical_cell(r)} | {upscaled} |"
        )
    # A file whose model kept too few records is named, never shown as a speed row.
    lines += [
        f"- {name}: NOT A MEASUREMENT of automatic mask generation, not shown above: Meta's generator kept "
        f"{r['records']['meta']} records (fewer than {MIN_AMG_RECORDS}), so it timed no post-processing "
        "and compared nothing."
        for name, r in every
        if not amg_measured(r)
    ]
    if not runs:
        lines.append("")
        return lines
    lines += [f"- {name}: {r['note']}" for name, r in runs if r.get("note")]
    lines += [
        f"- {name}: host gauge before / after the rounds: "
        + host_speed_text(r["host_speed"]["before"], r["host_speed"]["after"])
        for name, r in runs
        if r.get("host_speed")
    ]
    # Rows may come from different machines (re-run on another CPU): name each machine with its files.
    by_machine: dict[str, list[str]] = {}
    for name, r in runs:
        key = r["machine"].replace("tuned allocator", "").replace("default allocator", "").rstrip(", ")
        by_machine.setdefault(key, []).append(name)
    machine = (
        next(iter(by_machine))
        if len(by_machine) == 1
        else "; ".join(f"{m} ({', '.join(files)})" for m, files in by_machine.items())
    )
    lines += [
        "",
        f"Command: `python benchmarks/amg.py --model vit_b --trained [--dtype bfloat16] [--tuned-allocator] [--trained-file F] [--device cuda]`; machine: {machine}; image: {runs[0][1]['image']}.",
        "Allocator 'tuned': `--tuned-allocator`, the glibc settings of samkit.tune_cpu_allocator (samkit/fast/allocator.py; an opt-in since the commands stopped using it),",
        "applied to the whole process, so Meta's code runs under them too.",
        "Identical records: Meta's records that samkit's output holds with the same prompt point and predicted IoU",
        "(within 1e-4), mask, box, area, crop box and stability score. Prompts with masks computed: samkit decodes",
        "the IoU first and computes mask pixels only for prompts with a candidate above `pred_iou_thresh` (Meta's",
        f"code computes all). Only models that keep at least {MIN_AMG_RECORDS} records are benchmarked (random weights",
        "keep 0 or 1: `benchmarks/amg.py` stops on them). Target (the issue's): >= 5x with identical records.",
    ]
    for name, r in runs:
        if "trained_model" in r:
            before = "; ".join(
                f"samkit at {rev.split('@')[1]} in the same rounds: "
                + ", ".join(f"{x:.1f}x" for x in p["round_ratios"])
                for rev, p in r.get("previous_samkit", {}).items()
            )
            lines.append(
                f"{name}: the vit_b of benchmarks/trained_decoder.py ({_trained_recipe(r['trained_model'])}, "
                f"calibrated on the photo) keeps {r['records']['meta']} records (Meta) / {r['records']['samkit']} "
                f"(samkit) at Meta's default thresholds{_identical(r)}; per-round ratios "
                f"{', '.join(f'{x:.1f}x' for x in r['round_ratios'])} ({host(r)}, {when(r)})"
                + (f"; {before}" if before else "")
                + "."
            )
    lines.append("")
    return lines


def prompts() -> list[str]:
    title = "## Prompt latency after `set_image` (one point; 64 boxes in one call)"
    runs = load("prompts_*.json")
    if not runs:
        return not_measured(
            title,
            "Not measured yet: `python benchmarks/prompts.py --model vit_b --out benchmarks/results/prompts_vit_b.json`.",
        )
    lines = [title, ""]
    labels = {"one_point": "one point, 3 masks", "boxes_64": "64 boxes, one call"}
    for name, r in runs:
        tasks = list(r["median_ms"])
        lines += [
            f"`{r['command']}` ({name}); machine: {r['machine']}; image: {r['image']}, point {r['point']},",
            f"{r['boxes']} seeded boxes; medians of {r['rounds']} alternating calls after a warm-up, same random weights.",
            "",
            "| implementation | " + " | ".join(f"{labels[t]}: median ms | x Meta fp32" for t in tasks) + " |",
            "|---|" + "---|---|" * len(tasks),
        ]
        for impl in r["median_ms"][tasks[0]]:
            cells = [f"{r['median_ms'][t][impl]:.1f} | {r['speedup_vs_meta'][t][impl]:.2f}x" for t in tasks]
            lines.append(f"| {impl} | " + " | ".join(cells) + " |")
        targets = "; ".join(
            f"{labels[t]}: "
            + ", ".join(
                f"{impl} <= {_prompt_target(r['targets_ms'][t], impl):g} ms {'met' if ok else 'missed'}"
                for impl, ok in r["targets_met"][t].items()
            )
            for t in tasks
        )
        agree = "; ".join(
            f"{labels[t]}: samkit fp32 masks equal Meta's on {r['fp32_mask_pixel_agreement_vs_meta'][t]:.6f} of pixels"
            for t in tasks
        )
        lines += ["", f"Targets (the issue's, for this 2-core CPU): {targets}."]
        row = r.get("one_point_in_a_row")
        if row:
            timed = ", ".join(
                f"{impl} {ms:.1f} ms ({row['speedup_vs_meta'][impl]:.2f}x)"
                for impl, ms in row["median_ms"].items()
            )
            met = ", ".join(
                f"{impl} <= {_prompt_target(r['targets_ms']['one_point'], impl):g} ms {'met' if ok else 'missed'}"
                for impl, ok in row["targets_met"].items()
            )
            lines += [
                "",
                f"One point, {row['calls_per_turn']} more calls in a row after each timed one (a user's clicks on "
                f"one image; medians): {timed}; target {met}.",
            ]
        lines += ["", f"Agreement: {agree}."]
        if r.get("bf16_mask_iou_vs_fp32"):
            ious = "; ".join(
                f"{labels[t]}: mean {v['mean']:.4f}, min {v['min']:.4f} over {v['masks']} masks"
                for t, v in r["bf16_mask_iou_vs_fp32"].items()
            )
            lines.append(f"samkit bf16 mask IoU against samkit fp32: {ious}.")
        if r.get("host_speed"):
            gauge = host_speed_text(r["host_speed"]["before"], r["host_speed"]["after"])
            lines.append(
                f"Host gauge before / after the rounds (`benchmarks/common.py` host_speed): {gauge}."
            )
        if r.get("note"):
            lines.append(f"Note: {r['note']}")
        lines.append("")
    return lines


def train_step() -> list[str]:
    title = "## Fine-tuning throughput (box, point and text prompts), with and without the embedding cache"
    runs = load("train_step_*.json")
    if not runs:
        return not_measured(
            title,
            "Not measured yet: `python benchmarks/train_step.py --model vit_b --out benchmarks/results/train_step_vit_b.json`.",
        )
    lines = [title, ""]
    for name, r in runs:
        lines += [
            f"`{r['command']}` ({name}); machine: {r['machine']}, device {r['device']}; amp {r['amp']}; "
            f"prompts: {r.get('prompt_mode', 'box')};",
            f"data: {r['data']}; batch {r['batch_size']}, {r['steps_per_epoch']} steps/epoch x {r['epochs']} epochs;",
            "images/s per step from `metrics.jsonl` (data loading included), medians. Meta's `segment_anything`",
            "has no training code, so there is no Meta column.",
            "",
            "| run | epoch 1 images/s | epochs >= 2 images/s | whole run s |",
            "|---|---|---|---|",
        ]
        for run, v in r["runs"].items():
            lines.append(
                f"| {run} | {v['epoch1_median_images_per_s']:.3f} | {v['later_epochs_median_images_per_s']:.3f} | "
                f"{v['wall_s']:.1f} |"
            )
        if r["steps_per_epoch"] < 10 and r["device"] != "cpu":
            lines += [
                "",
                f"Caveat: {r['steps_per_epoch']} steps per epoch. Each loader worker builds a whole batch and the",
                "workers restart every epoch, so short epochs measure start-up and one worker's batch latency,",
                "not the steady state.",
            ]
        if r["device"] != "cpu":
            best = max(v["later_epochs_median_images_per_s"] for v in r["runs"].values())
            verdict = "met" if best >= GPU_TRAIN_TARGET else "missed"
            lines += [
                "",
                f"Target (the issue's, H100): vit_b box fine-tuning >= {GPU_TRAIN_TARGET:g} images/s: best median "
                f"{best:.1f} ({verdict}).",
            ]
        on_cpu = r["device"] == "cpu"
        box = str(r.get("prompt_mode", "box")).startswith("box")  # the 10x cache target is box mode's
        target = (
            f" (target on the CPU >= {r['target_speedup']:g}x: {'met' if r['target_met'] else 'missed'})"
            if on_cpu and box
            else ""
        )
        identical = "yes" if r["losses_identical"] else "NO"
        if not r["losses_identical"] and not on_cpu:
            worst = max(
                abs(a - b) / max(abs(a), 1e-12)
                for a, b in zip(r["runs"]["no cache"]["losses"], r["runs"]["embedding cache"]["losses"])
            )
            identical = (
                f"no, largest relative difference {worst:.1e} (GPU kernels differ with the batch's size)"
            )
        lines += [
            "",
            f"Cache speed-up: epochs >= 2 {r['later_epochs_speedup']:.2f}x{target}, epoch 1 {r['epoch1_speedup']:.2f}x. "
            f"Per-step losses identical with and without the cache: {identical}.",
            "",
        ]
        if "crop_cache_speedup" in r:
            lines[-1:] = [
                f"Crop-feature cache alone (both runs read cached image embeddings, fixed crops): epochs >= 2 "
                f"{r['crop_cache_speedup']:.2f}x.",
                "",
            ]
        if r.get("note"):
            lines[-1:] = [f"Note: {r['note']}", ""]
    return lines


def loader_epochs() -> list[str]:
    title = "## Short epochs with data-loader workers (workers persisting across epochs)"
    runs = load("loader_epochs*.json")
    if not runs:
        return not_measured(
            title,
            "Not measured yet: `python benchmarks/loader_epochs.py --rev <older commit> --out "
            "benchmarks/results/loader_epochs.json`.",
        )
    lines = [title, ""]
    for name, r in runs:
        lines += [f"`{r['command']}` ({name}); machine: {r['machine']}; {r['setup']}; {r['rounds']} rounds, each "
                  "run in a fresh process, alternating.", "",
                  "| code | median s per run | runs s |", "|---|---|---|"]  # fmt: skip
        for code, sec in r["median_s"].items():
            runs_s = ", ".join(f"{v:.1f}" for v in r["round_s"][code])
            lines.append(f"| {code} | {sec:.1f} | {runs_s} |")
        ratios = ", ".join(f"{v:.2f}x" for v in r["round_ratios"])
        lines += [
            "",
            f"Median per-round ratio (old / new): {r['median_round_ratio']:.2f}x (rounds: {ratios}); "
            f"losses of the {r['steps']} steps equal: {'yes' if r['losses_equal'] else 'no'}.",
            "",
        ]
    return lines


def onnx_cpu() -> list[str]:
    title = "## ONNX Runtime against samkit's PyTorch on the CPU"
    runs = load("onnx_cpu_*.json")
    if not runs:
        return not_measured(title, "Not measured yet: `python benchmarks/onnx_cpu.py --model vit_b`.")
    lines = [title, ""]
    for name, r in runs:
        lines += [
            f"`{r['command']}` ({name}); machine: {r['machine']}; image: {r['image']}; medians of {r['rounds']} rounds.",
            "",
            "| implementation | encoder median s | one point (3 masks, original size) median ms |",
            "|---|---|---|",
        ]
        for impl, sec in r["encoder_median_s"].items():
            lines.append(f"| {impl} | {sec:.2f} | {1000 * r['prompt_median_s'][impl]:.1f} |")
        lines += ["", "| ONNX model | embedding max abs / rel. L2 vs samkit fp32 | mask pixel agreement | mask IoU |",
                  "|---|---|---|---|"]  # fmt: skip
        for impl, a in r["agreement_vs_samkit_fp32"].items():
            agree = ", ".join(f"{v:.6f}" for v in a["mask_pixel_agreement"])
            iou = ", ".join(f"{v:.4f}" for v in a["mask_iou"])
            lines.append(
                f"| {impl} | {a['embedding_max_abs']:.2e} / {a['embedding_rel_l2']:.2e} | {agree} | {iou} |"
            )
        sizes = "; ".join(
            f"{prec}: " + ", ".join(f"{f} {b / 2**20:.1f} MiB" for f, b in sorted(files.items()))
            for prec, files in r["file_bytes"].items()
        )
        lines += ["", f"Model files: {sizes}."]
        if r.get("note"):
            lines += ["", f"Note: {r['note']}"]
        lines.append("")
    return lines


def serve_latency() -> list[str]:
    title = "## Decoder round trip through `samkit serve`"
    runs = load("serve_latency_*.json") + load("serve_latency.json")
    if not runs:
        return not_measured(title, "Not measured yet: `python benchmarks/serve_latency.py --model vit_b`.")
    lines = [title, ""]
    for name, r in runs:
        load_ = r["http_load"]
        lines += [
            f"`python benchmarks/serve_latency.py --model {r['model']}` ({name}); machine: {r['machine']};",
            f"image: {r['image']}; prompt: {r['prompt']}; dtype {r['dtype']}.",
            "",
            "| path | p50 ms | p95 ms | requests |",
            "|---|---|---|---|",
            f"| in process, main thread | {r['in_process']['p50_ms']:.1f} | {r['in_process']['p95_ms']:.1f} | {r['in_process']['n']} |",
            f"| in process, worker thread | {r['in_process_worker_thread']['p50_ms']:.1f} | "
            f"{r['in_process_worker_thread']['p95_ms']:.1f} | {r['in_process_worker_thread']['n']} |",
            f"| HTTP, one client | {r['http_one_client']['p50_ms']:.1f} | {r['http_one_client']['p95_ms']:.1f} | "
            f"{r['http_one_client']['n']} |",
            f"| HTTP, {load_['clients']} clients x {load_['requests_per_client']} requests | {load_['p50_ms']:.1f} | "
            f"{load_['p95_ms']:.1f} | {load_['n']} |",
            "",
            f"Under load: {load_['throughput_rps']:.1f} requests/s, {load_['errors']} errors (model calls are serialised "
            f"by one lock; server-side decoder p50 {load_['server_decoder']['p50_ms']:.1f} ms).",
        ]
        if r.get("note"):
            lines += ["", f"Note: {r['note']}"]
        lines.append("")
    return lines


def page_latency() -> list[str]:
    title = "## Hover to mask in the page: decoding in the browser against the server"
    runs = load("page_latency_*.json")
    if not runs:
        return not_measured(
            title,
            "Not measured yet: `python benchmarks/page_latency.py --model vit_tiny --out benchmarks/results/page_latency_vit_tiny.json`.",
        )
    lines = [
        title,
        "",
        "`samkit serve`'s page in headless Chromium, one server on 127.0.0.1 and the browser on the same machine:",
        "from the pointermove event to the preview mask drawn (decode, mask to RLE, drawing), timed by the page;",
        "the two pages take turns in blocks of 5 hovers. Server: POST /api/predict (PyTorch); browser: the ONNX",
        "decoder the server exported, run by onnxruntime-web (wasm, one thread). Decoder only: the server's",
        "`decoder_ms` / the page's session.run plus mask summary; ONNX Runtime native: the same ONNX decoder in",
        "onnxruntime's CPU provider (Python, one thread), the same process as the server.",
        "The server and browser rows force their path (`?decode=server`, `?decode=browser`). The page's default,",
        "auto, times its first decodes on both paths (alternating, 3 each), keeps the one with the lower median and",
        "re-checks every 50 decodes or when a decode takes 3x that median; its row is a third page taking turns",
        "with the other two, its first timed hovers included.",
        "",
        "| file | model | path | hover to mask median ms | p90 ms | decoder only median ms | hovers | load average before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs:
        for path in ("server", "browser", "auto"):
            if path not in r["hover_to_mask"]:
                continue
            hover, dec = r["hover_to_mask"][path], r["decoder_only"][path]
            lines.append(
                f"| {name} | {r['model']} | {path} | {hover['median_ms']:.1f} | {hover['p90_ms']:.1f} | "
                f"{dec['median_ms']:.1f} | {hover['n']} | {r['load_average_before']} -> {r['load_average_after']} |"
            )
    lines.append("")
    for name, r in runs:
        lines.append(
            f"- {name}: `{r['command']}`; machine: {r['machine']}; {r['browser']}; image: {r['image']}; "
            f"weights {r['weights']}; median hover to mask, server / browser: {r['server_over_browser_median']:.2f}; "
            f"decoder only in native ONNX Runtime: median {r['decoder_only_native_onnxruntime']['median_ms']:.1f} ms "
            f"(p90 {r['decoder_only_native_onnxruntime']['p90_ms']:.1f}); decoder export "
            f"{r['decoder_export_s']:.1f} s, {r['decoder_onnx_bytes'] / 2**20:.1f} MiB; {when(r)}."
            + (f" Note: {r['note']}" if r.get("note") else "")
            + (auto_choice(r["auto"]) if r.get("auto") else "")
        )
    lines.append("")
    return lines


def auto_choice(auto: dict) -> str:
    """The auto page's choice in a page_latency run, as a sentence."""
    ms = auto["medians"]
    by_path = auto["timed_hovers_by_path"]
    if auto["chosen"] is None:
        return " Auto had not chosen a path by the end of the run."
    return (
        f" Auto chose the {auto['chosen']} (medians of its timing: browser {ms['browser']:.0f} ms, server "
        f"{ms['server']:.0f} ms; {auto['rounds']} choice(s)); of its timed hovers {by_path['server']} were "
        f"decoded on the server and {by_path['browser']} in the browser."
    )


def memory() -> list[str]:
    """Peak CPU memory: the encoder per image (encoder_memory_*.json) and AMG on a large image
    (amg_memory*.json)."""
    lines = ["## Memory on the CPU", ""]
    for name, r in load("encoder_memory_*.json"):
        lines += [
            f"`{r['command']}` ({name}); machine: {r['machine']}; image: {r['image']}. Growth of the peak",
            "resident set during one `set_image`, over the process after building the model (each in a fresh",
            "subprocess):",
            "",
            "| implementation | weights MiB | peak growth during set_image MiB |",
            "|---|---|---|",
        ]
        for impl, row in r["results"].items():
            lines.append(f"| {impl} | {row['weights_mib']:.0f} | {row['encoder_peak_mib']:.0f} |")
        lines.append("")
    for name, r in load("amg_memory*.json"):
        if "rows" not in r:
            continue
        lines += [
            f"AMG on a {r['image']} image, crop_n_layers {r['crop_n_layers']}, {r['points_per_side']}x"
            f"{r['points_per_side']} points, {r['model']} ({name}; code {r['code']}"
            + (f"; {r['machine_note']}" if r.get("machine_note") else "")
            + "):",
            "",
            "| case | records | peak RSS growth MiB | one full-resolution mask MiB |",
            "|---|---|---|---|",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['case']} | {row['records']} | {row['amg_mib']:.0f} | {row['full_res_mask_mib']:.1f} |"
            )
        lines.append("")
    return lines


def lora() -> list[str]:
    """LoRA fine-tuning: encoder LoRA against decoder-only where the encoder is the bottleneck
    (lora_bottleneck.json), and the memory and speed of each kind of run (lora_memory_*.json)."""
    lines = ["## LoRA fine-tuning", ""]
    found = load("lora_bottleneck*.json")
    if not found:
        lines += not_measured(
            "encoder LoRA against decoder-only", "run `python benchmarks/lora_bottleneck.py`"
        )
    for name, r in found:
        lines += [
            f"`{r['command']}` ({name}; {r['machine']}; {when(r)}; load average {r['load_before'][0]:g} before,",
            f"{r['load_after'][0]:g} after). {r['model']}; {r['data']}; box prompts, every arm the same steps,",
            "data and schedule, the same training seed unless the arm names one (arms run side by side, one "
            "process each; AdamW lr "
            f"{next(iter(r['arms'].values()))['settings']['lr']:g}, batch "
            f"{next(iter(r['arms'].values()))['settings']['batch_size']}; LoRA on every linear layer of the "
            "encoder blocks: qkv, proj, lin1, lin2); val mIoU (%) by `eval.py`'s box protocol on the held-out split"
            + (f". {r['note']}:" if r.get("note") else ":"),
            "",
            "| arm | steps | val mIoU (1024) | val mIoU (original) | trainable parameters | LoRA parameters |"
            " sam_final.pth MB | adapter file MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for arm, row in r["arms"].items():
            adapter = f"{row['adapter_bytes'] / 1e6:.2f}" if "adapter_bytes" in row else "-"
            lines.append(
                f"| {arm} | {row['steps']} | {row['val_miou_1024']:.1f} | {row['val_miou_original']:.1f} | "
                f"{row['trainable_parameters']:,} | {row.get('lora_parameters', 0):,} | "
                f"{row['sam_final_bytes'] / 1e6:.2f} | {adapter} |"
            )
        lines.append("")
        lines += _lora_seed_summary(r["arms"])
        for arm, row in r["arms"].items():
            check = row.get("merged_vs_unmerged")
            if check:
                lines.append(
                    f"{arm}: the unmerged model (peft layers, last training checkpoint) and the merged "
                    f"`sam_final.pth` agree on {check['same_mask_pixels']:,} of {check['mask_pixels']:,} val mask "
                    f"pixels (largest logit difference {check['max_abs_logit_diff']:.1e}); base checkpoint + "
                    f"adapter file {'is' if row['base_plus_adapter_is_sam_final'] else 'is NOT'} `sam_final.pth` "
                    "bit for bit."
                )
        lines.append("")
    for name, r in load("lora_memory_*.json"):
        lines += [
            f"`{r['command']}` ({name}; {r['machine']}; {when(r)}; load average {r['load_before'][0]:g} before,",
            f"{r['load_after'][0]:g} after). {r['model']}, batch {r['batch_size']}, amp {r['amp']}, {r['steps']}",
            "steps, box prompts; each arm in a fresh process (`lora_rN`: LoRA of rank N, alpha N, on the encoder's",
            "qkv and proj with the decoder in full; `full`: the whole image encoder trains too; `_gc`:",
            "`model.grad_checkpointing`). Peak RSS is the process's own (`wait4`); the",
            f"built model alone peaks at {r['built_model_peak_rss_mib']:.0f} MiB. images/s: median over the steps",
            "after the first, on a shared machine (compare within the table):",
            "",
            "| arm | trainable parameters | peak RSS MiB | over the built model MiB | images/s |",
            "|---|---|---|---|---|",
        ]
        for arm, row in r["rows"].items():
            if "error" in row:
                lines.append(f"| {arm} | {row['trainable_parameters']:,} | failed: {row['error']} | | |")
                continue
            lines.append(
                f"| {arm} | {row['trainable_parameters']:,} | {row['peak_rss_mib']:.0f} | "
                f"{row['peak_over_built_model_mib']:.0f} | {row['images_per_s_median']:.3f} |"
            )
        lines.append("")
    return lines


def _lora_seed_summary(arms: dict) -> list[str]:
    """A line per arm run with several training seeds (``<arm> seed <n>``): its val mIoU per seed, mean and
    range; nothing for the arms that ran once."""
    by_arm: dict[str, list[tuple[int, float]]] = {}
    for name, row in arms.items():
        if " seed " in name:
            base, seed = name.rsplit(" seed ", 1)
            by_arm.setdefault(base, []).append((int(seed), row["val_miou_1024"]))
    by_arm = {base: rows for base, rows in by_arm.items() if len(rows) > 1}
    if not by_arm:
        return []
    lines = ["Over the training seeds (val mIoU at 1024, %):", ""]
    for base, rows in by_arm.items():
        values = [v for _, v in sorted(rows)]
        per_seed = ", ".join(f"{v:.1f} (seed {s})" for s, v in sorted(rows))
        lines.append(
            f"- {base}: mean {sum(values) / len(values):.1f}, range {min(values):.1f}-{max(values):.1f}; {per_seed}"
        )
    return lines + [""]


def _one(pattern: str) -> tuple[str, dict] | None:
    """The result file ``pattern`` names, or None when it is absent."""
    runs = load(pattern)
    return runs[0] if runs else None


def _where(r: dict) -> str:
    """The host of a result: the CPU (threads, torch), or the GPU and torch."""
    if r.get("device", "cpu") != "cpu" and "torch" in r:
        return f"{r['device']}, torch {r['torch']}"
    return host(r)


def _allocator(r: dict) -> str:
    machine = r.get("machine", "")
    return "tuned" if "tuned allocator" in machine else "default" if "default allocator" in machine else ""


class _SpeedTable:
    """README.md's table of speed figures: one row per figure, each naming its result file, host
    (lettered, spelled out under the table) and date."""

    def __init__(self) -> None:
        self.rows: list[str] = []
        self.hosts: dict[str, str] = {}

    def source(self, f: tuple[str, dict]) -> str:
        name, r = f
        letter = self.hosts.setdefault(_where(r), "ABCDEFGHIJ"[len(self.hosts)])
        return f"`{name}`, host {letter}, {when(r)}"

    def add(self, what: str, samkit: str, meta: str, ratio: float, f: tuple[str, dict]) -> None:
        self.rows.append(f"| {what} | {samkit} | {meta} | {ratio:.2f}x | {self.source(f)} |")

    def encoder(self, f: tuple[str, dict]) -> None:
        r = f[1]
        for impl in ("samkit bf16", "samkit fp32"):
            self.add(
                f"`set_image`, vit_b, {impl.split()[1]} ({_allocator(r)} allocator)",
                f"{r['median_s'][impl]:.2f} s",
                f"{r['median_s']['meta fp32']:.2f} s",
                r["speedup_vs_meta"][impl],
                f,
            )

    def prompts(self, f: tuple[str, dict]) -> None:
        r = f[1]
        labels = {"one_point": "one point (3 masks)", "boxes_64": f"{r['boxes']} boxes in one call"}
        for task, label in labels.items():
            ms = r["median_ms"][task]
            for impl in ("samkit bf16", "samkit fp32"):
                self.add(
                    f"{label}, vit_b, {impl.split()[1]} ({_allocator(r)} allocator)",
                    f"{ms[impl]:.1f} ms",
                    f"{ms['meta fp32']:.1f} ms",
                    r["speedup_vs_meta"][task][impl],
                    f,
                )

    def amg(self, f: tuple[str, dict]) -> None:
        r = f[1]
        side = r["generator_kwargs"]["points_per_side"]
        self.add(
            f"automatic masks, vit_b with the trained benchmark decoder, {side}x{side} points, "
            f"{r['samkit_dtype'].replace('float32', 'fp32').replace('bfloat16', 'bf16')}: {r['records']['meta']} "
            f"records, {amg_identical_cell(r)} identical ({_allocator(r)} allocator)",
            f"{r['median_s']['samkit']:.1f} s",
            f"{r['median_s']['meta']:.1f} s",
            r["speedup"],
            f,
        )

    def gpu(self, f: tuple[str, dict]) -> None:
        rows = f[1]["rows"]
        for model in dict.fromkeys(row["model"] for row in rows):
            mine = [row for row in rows if row["model"] == model]
            meta = max(
                (row for row in mine if row["impl"] == "meta fp32"), key=lambda row: row["images_per_s"]
            )
            for impl in ("samkit bf16", "samkit bf16 compiled"):
                got = [row for row in mine if row["impl"] == impl]
                if got:
                    best = max(got, key=lambda row: row["images_per_s"])
                    self.add(
                        f"image encoder on a GPU, {model}, bf16{' compiled' if 'compiled' in impl else ''}, "
                        f"batch {best['batch']} (Meta fp32: batch {meta['batch']})",
                        f"{best['images_per_s']:.1f} images/s",
                        f"{meta['images_per_s']:.1f} images/s",
                        best["images_per_s"] / meta["images_per_s"],
                        f,
                    )

    def lines(self) -> list[str]:
        head = [
            "| figure | samkit | Meta's code (fp32) | x Meta | result file, host, date |",
            "|---|---|---|---|---|",
        ]
        hosts = "; ".join(f"{letter}: {where}" for where, letter in self.hosts.items())
        return [*head, *self.rows, "", f"Hosts: {hosts}."]


def readme_speed() -> list[str]:
    """README.md's speed figures: each from a named result file, with its host and date."""
    table = _SpeedTable()
    for pattern in ("cpu_encoder_vit_b.json", "cpu_encoder_vit_b_tuned.json"):
        if f := _one(pattern):
            table.encoder(f)
    for pattern in ("prompts_vit_b_bf16.json", "prompts_vit_b_bf16_tuned.json"):
        if f := _one(pattern):
            table.prompts(f)
    for pattern in ("amg_vit_b_trained.json", "amg_vit_b_trained_tuned.json"):
        if (f := _one(pattern)) and amg_measured(f[1]):
            table.amg(f)
    for pattern in ("gpu_encoder_vit_b_h100_v3.json", "gpu_encoder_vit_h_h100_v3.json"):
        if f := _one(pattern):
            table.gpu(f)
    notes = []
    prompts_, encoder = _one("prompts_vit_b_bf16.json"), _one("cpu_encoder_vit_b.json")
    ious = [(f, min(v["min"] for v in f[1]["bf16_mask_iou_vs_fp32"].values())) for f in [prompts_] if f]
    ious += [(f, min(f[1]["bf16_mask_iou_vs_fp32"])) for f in [encoder] if f]
    if ious:
        notes.append(
            "samkit bf16 masks against samkit fp32: smallest IoU "
            + ", ".join(f"{iou:.4f} ({table.source(f)})" for f, iou in ious)
            + "."
        )
    agreement = [min(f[1]["fp32_mask_pixel_agreement_vs_meta"].values()) for f in [prompts_] if f]
    agreement += [f[1]["fp32_mask_pixel_agreement_vs_meta"] for f in [encoder] if f]
    if agreement:
        notes.append(
            f"samkit fp32 masks equal Meta's on {math.floor(min(agreement) * 1e6) / 1e6:.6f} of pixels or more "
            "(the same files)."
        )
    firsts = [row["first_call_s"] for pattern in ("gpu_encoder_vit_b_h100_v3.json", "gpu_encoder_vit_h_h100_v3.json")
              if (f := _one(pattern)) for row in f[1]["rows"] if "compiled" in row["impl"] and row.get("first_call_s")]  # fmt: skip
    if firsts:
        notes.append(
            f"Compiling took {min(firsts):.0f}-{max(firsts):.0f} s at the first call of each batch size (same GPU files)."
        )
    box, point = _one("train_step_vit_b.json"), _one("train_step_vit_b_point.json")
    for f, kind in ((box, "box prompts"), (point, "point prompts, 3 rounds")):
        if f:
            r = f[1]
            cached = r["runs"]["embedding cache"]["later_epochs_median_images_per_s"]
            notes.append(
                f"Fine-tuning vit_b on the CPU with `cache_embeddings: true` ({kind}, batch {r['batch_size']}, amp "
                f"{r['amp']}): {cached:.2f} images/s from epoch 2, {r['later_epochs_speedup']:.2f}x the same run "
                f"without the cache (Meta has no training code) ({table.source(f)})."
            )
    return [
        README_BEGIN,
        "Against Meta's `segment_anything` 1.0 on the same weights and inputs, in one process; medians. The",
        "tables, commands and host gauges are in [BENCHMARKS.md](BENCHMARKS.md); absolute times depend on the",
        "host and its load, compare ratios. Default / tuned allocator rows come from separate runs.",
        "",
        *table.lines(),
        "",
        *[f"- {note}" for note in notes],
        README_END,
    ]


def readme_with_speed(text: str) -> str:
    """README.md's ``text`` with the lines from README_BEGIN to README_END replaced by
    :func:`readme_speed`'s; a text without exactly one of each marker line is an error."""
    lines = text.split("\n")
    if lines.count(README_BEGIN) != 1 or lines.count(README_END) != 1:
        raise SystemExit(f"error: README.md needs one line {README_BEGIN!r} and one line {README_END!r}")
    start, end = lines.index(README_BEGIN), lines.index(README_END)
    return "\n".join(lines[:start] + readme_speed() + lines[end + 1 :])


def write_readme_speed(readme: Path = README) -> bool:
    """Write README.md's speed figures from the results; returns whether the file changed."""
    text = readme.read_text()
    new = readme_with_speed(text)
    if new != text:
        readme.write_text(new)
    return new != text


def benchmarks_md() -> str:
    """BENCHMARKS.md's text from the result files."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not edit by hand.",
        "Every script loads the same weights into Meta's `segment_anything` 1.0 and samkit (random ones, every",
        "tensor perturbed; for automatic mask generation a vit_b with a briefly trained decoder, so that hundreds",
        "of records are compared), runs the same inputs in one process, and reports medians and ratios. CPU",
        "numbers come from the project's shared 2-core machine: compare ratios, not absolute times.",
        "",
    ]
    lines += (
        cpu_encoder()
        + gpu_encoder()
        + amg()
        + prompts()
        + train_step()
        + loader_epochs()
        + onnx_cpu()
        + serve_latency()
        + page_latency()
        + memory()
        + lora()
    )
    return "\n".join(lines)


def main() -> int:
    (ROOT.parent / "BENCHMARKS.md").write_text(benchmarks_md())
    print(f"wrote {ROOT.parent / 'BENCHMARKS.md'}")
    if write_readme_speed():
        print(f"wrote the speed figures of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
