"""Speed figures are measurements: README.md's and BENCHMARKS.md's come from benchmarks/results, and an
automatic-mask benchmark that compared no records is never shown as one."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def load_script(name: str):
    """A script of benchmarks/ as a module (they import each other as top-level modules)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report():
    return load_script("report")


def test_readme_speed_figures_are_the_result_files(report):
    """README.md's figures are report.py's from the current results: run `python benchmarks/report.py`
    after a benchmark (or an edit of the figures) to bring them back in line."""
    text = (ROOT / "README.md").read_text()
    generated = report.readme_speed()
    assert text.split("\n").count(report.README_BEGIN) == 1
    assert report.readme_with_speed(text) == text, "README.md's speed figures differ from benchmarks/results"
    rows = [line for line in generated if line.startswith("| ") and "result file" not in line]
    assert len(rows) >= 10 and all(".json`, host " in row for row in rows)  # each names file and host
    assert all(re.search(r"(measured|committed) \d{4}-\d\d-\d\d", row) for row in rows)  # and a date


# Numbers with a unit of speed or a ratio: outside the generated block README.md must have none, since
# nothing would keep them in line with the results.
SPEED_FIGURE = re.compile(
    r"\b\d+(?:\.\d+)?x\b(?![\d(])"  # 6.0x (not 400x600, not 1024x1024)
    r"|\b\d+(?:\.\d+)? ?(?:ms|s|seconds|minutes)\b"
    r"|\d ?(?:images|requests)/s|GFLOP|GB/s|\btwice as\b|\btimes (?:faster|slower)\b"
)
# The test suite's own duration (a hint for contributors, not a figure of samkit's speed).
NOT_SPEED_FIGURES = (
    "about 10 minutes on 2 cores",
    # The web page's rules and the delays its test injects, not measurements.
    "a decode takes 3x that median (and 50 ms more)",
    "each in-page decode held 1 s",
    "each `/api/predict` held 1.5 s",
)


def test_readme_has_no_speed_figure_outside_the_generated_block(report):
    text = (ROOT / "README.md").read_text()
    start, end = text.index(report.README_BEGIN), text.index(report.README_END)
    outside = text[:start] + text[end:]
    for allowed in NOT_SPEED_FIGURES:
        outside = outside.replace(allowed, "")
    found = [m.group() for m in SPEED_FIGURE.finditer(outside)]
    assert not found, f"speed figures in README.md that no result file backs: {found}"
    assert SPEED_FIGURE.search("6.0x Meta's code") and SPEED_FIGURE.search("3.6 s -> 2.5 s")  # it finds them


def test_benchmarks_md_is_generated_from_the_results(report):
    assert report.benchmarks_md() == (ROOT / "BENCHMARKS.md").read_text(), "run python benchmarks/report.py"


def test_every_amg_result_compares_hundreds_of_records():
    runs = {p.name: json.loads(p.read_text()) for p in (BENCHMARKS / "results").glob("amg_vit_*.json")}
    assert runs
    for name, r in runs.items():
        assert r["records"]["meta"] >= 100, name
        matched = r["identical_records"]
        assert matched["matched"] >= 100 and matched["record"] >= 0.98 * r["records"]["meta"], name


def amg_result(records: int, identical: dict | None, upscaled: float | None) -> dict:
    return {
        "command": "python benchmarks/amg.py",
        "machine": "x86_64, a CPU, 2 threads, torch 2, default allocator",
        "date": "2026-01-01",
        "model": "vit_b",
        "samkit_dtype": "float32",
        "image": "a photo",
        "generator_kwargs": {"points_per_side": 32},
        "rounds": 1,
        "median_s": {"meta": 100.0, "samkit": 20.0},
        "speedup": 5.0,
        "records": {"meta": records, "samkit": records},
        "identical_segmentations": None if identical is None else identical["segmentation"],
        "identical_records": identical,
        "round_ratios": [5.0],
        "prompts_upscaled": upscaled,
    }


def test_an_amg_result_without_records_is_not_a_speed_row(report, monkeypatch, tmp_path):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    (tmp_path / "amg_vit_b_random.json").write_text(json.dumps(amg_result(0, None, 0.0)))
    text = "\n".join(report.amg())
    assert "| amg_vit_b_random.json" not in text and "5.00x" not in text
    assert "amg_vit_b_random.json: NOT A MEASUREMENT" in text and "Not measured yet" in text
    few = {"matched": 1, "segmentation": 1, "record": 1}
    (tmp_path / "amg_vit_b_random.json").write_text(json.dumps(amg_result(1, few, 1.0)))
    assert "| amg_vit_b_random.json" not in "\n".join(report.amg())
    many = {"matched": 300, "segmentation": 299, "record": 298}
    (tmp_path / "amg_vit_b_trained.json").write_text(json.dumps(amg_result(300, many, None)))
    rows = [line for line in report.amg() if line.startswith("| amg_")]
    assert rows == [
        "| amg_vit_b_trained.json | vit_b | float32 | default | `{'points_per_side': 32}` | 100.0 | 20.0 | "
        "5.00x | 300 / 300 | 298 of 300 | n/a |"
    ]
    assert (
        report.amg_identical_cell(amg_result(0, {"matched": 0, "segmentation": 0, "record": 0}, 0.0)) == "n/a"
    )


class KeepsNothing:
    """Meta's generator as it behaves on random weights at its default thresholds: no record."""

    def __init__(self, model, **kwargs) -> None:
        pass

    def generate(self, image) -> list[dict]:
        return []


def test_amg_benchmark_refuses_a_model_that_keeps_no_records(tiny_pair, monkeypatch, tmp_path, capsys):
    """Random weights keep no record at Meta's thresholds: the benchmark stops after Meta's first call
    and writes nothing; asked to run anyway, it records n/a and the flag, not 0 of 0 identical. (Meta's
    generator is stood in for: this checks the benchmark's bookkeeping, tests/test_amg.py the parity.)"""
    import segment_anything

    amg = load_script("amg")
    meta = tiny_pair[1]
    monkeypatch.setattr(amg, "shared_random_weights", lambda name: (meta, meta.state_dict()))
    monkeypatch.setattr(
        amg, "host_speed", lambda: {"fp32_gemm_gflops": 1.0, "bf16_gemm_gflops": 1.0, "copy_gb_s": 1.0}
    )
    monkeypatch.setattr(segment_anything, "SamAutomaticMaskGenerator", KeepsNothing)
    out = tmp_path / "amg.json"
    small = ["--model", "vit_tiny", "--points-per-side", "2", "--out", str(out)]
    assert amg.main(small) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: Meta's generator kept 0 records, fewer than --min-records 100")
        and err.count("\n") == 1
    )
    assert not out.exists()
    assert amg.main([*small, "--min-records", "0"]) == 0
    result = json.loads(out.read_text())
    assert result["records"]["meta"] == 0 and result["records_below_minimum"]
    assert result["identical_segmentations"] is None and result["identical_records"] is None
    assert result["date"]  # write_result dates every result
    assert "n/a (Meta's generator kept no record)" in capsys.readouterr().out
