"""requirements.txt agrees with pyproject.toml: it is generated from it (scripts/write_requirements.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_lines() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def by_name(requirements: list[str]) -> dict[str, tuple]:
    """name (normalised as pip does) -> (extras, version range, environment marker) of each requirement."""
    parsed = [Requirement(r) for r in requirements]
    names = [canonicalize_name(r.name) for r in parsed]
    assert len(set(names)) == len(names), f"a package is listed twice: {requirements}"
    return {n: (sorted(r.extras), r.specifier, str(r.marker)) for n, r in zip(names, parsed)}


def test_requirements_txt_lists_the_runtime_dependencies_with_the_same_ranges():
    declared = by_name(pyproject()["project"]["dependencies"])
    listed = by_name(requirement_lines())
    missing = sorted(set(declared) - set(listed))
    extra = sorted(set(listed) - set(declared))
    changed = sorted(n for n in set(declared) & set(listed) if declared[n] != listed[n])
    assert not (missing or extra or changed), (
        f"requirements.txt has drifted from pyproject.toml (missing {missing}, not declared {extra}, "
        f"other ranges {changed}): run `make requirements`"
    )


def test_requirements_txt_is_exactly_what_the_script_writes():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "write_requirements.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_the_header_says_it_is_generated_and_names_every_extra():
    text = (ROOT / "requirements.txt").read_text()
    assert text.startswith("# Generated from pyproject.toml")
    for extra in pyproject()["project"]["optional-dependencies"]:
        assert f"samkit[{extra}]" in text
