"""samkit.utils.files.atomic_write: the old file or the whole new one, never half of one."""

from __future__ import annotations

import os

import pytest

from samkit.utils.files import atomic_write


def test_atomic_write_replaces_the_file_in_one_step(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("new")
        assert path.read_text() == "old"  # nothing visible until the block ends
    assert path.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(error):
        with atomic_write(path) as f:
            f.write(b"half")
            raise error()
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_parents_are_made_only_when_asked(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_write(tmp_path / "a" / "b.bin") as f:
            f.write(b"x")
    assert not (tmp_path / "a").exists()
    with atomic_write(tmp_path / "a" / "b.bin", fsync=True, make_parents=True) as f:
        f.write(b"x")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"x"


def test_only_new_files_are_written():
    with pytest.raises(ValueError, match="mode"):
        with atomic_write("x", "ab"):
            pass


def test_no_module_renames_temporary_files_of_its_own():
    """One helper writes files atomically: os.replace appears only where folders are swapped or a
    download resumes (checkpoints/download.py, export/onnx.py) and in files.py."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "samkit"
    allowed = {"utils/files.py", "checkpoints/download.py", "export/onnx.py"}
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if "os.replace(" in p.read_text())
    assert set(found) <= allowed, found
