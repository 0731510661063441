"""Runs many command lines in ONE Python process, each as its own run of the real entry point.

    python tests/cli_battery.py SPEC.json RESULTS.json

A process start with torch costs 2-4 s here, so tests/test_bad_inputs.py runs its whole battery
through this driver, in a subprocess. Each command line ``[script.py, args...]`` or ``["-m", "samkit",
args...]`` runs as ``python script.py args...`` would: ``runpy`` with ``__main__`` and ``sys.argv``
set, from the spec's working directory, under the default warning filters (reset per run, so a
warning shown by one run shows again in the next), with file descriptors 1 and 2 sent to files so
that whatever writes there (print, warnings, logging handlers, tqdm, C libraries) is captured. An
exception that escapes prints its traceback and gives exit status 1, as Python does.

Per run, RESULTS holds rc, stdout, stderr and the watched trees before and after: every path with
its type, size and (for files under 4 MiB) sha256; bigger files by size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import sys
import tempfile
import traceback
import warnings
from typing import Any

SMALL = 4 << 20


def snapshot(roots: list[str]) -> dict[str, str]:
    """``path -> description`` of everything under ``roots`` (the roots included)."""
    seen: dict[str, str] = {}
    for root in roots:
        if not os.path.lexists(root):
            continue
        for folder, _dirs, files in os.walk(root):
            seen[folder] = "dir"
            for name in files:
                path = os.path.join(folder, name)
                info = os.lstat(path)
                if info.st_size < SMALL:
                    with open(path, "rb") as f:
                        seen[path] = f"file {info.st_size} {hashlib.sha256(f.read()).hexdigest()}"
                else:
                    seen[path] = f"file {info.st_size} {info.st_mtime_ns}"
    return seen


def run_one(argv: list[str], cwd: str) -> dict[str, Any]:
    """Run one command line in this process; its exit status and what it wrote on fds 1 and 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        here = os.getcwd()
        rc = 0
        try:
            os.chdir(cwd)
            with warnings.catch_warnings():
                warnings.resetwarnings()  # a new process's filters: each run shows its own warnings
                warnings.simplefilter("default")
                if argv[:2] == ["-m", "samkit"]:
                    sys.argv = ["samkit", *argv[2:]]
                    runpy.run_module("samkit", run_name="__main__", alter_sys=True)
                else:
                    sys.argv = list(argv)
                    runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code
            rc = code if isinstance(code, int) else (0 if code is None else 1)
            if not isinstance(code, (int, type(None))):
                print(code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - what Python itself does with an uncaught exception
            traceback.print_exc()
            rc = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.chdir(here)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        return {
            "rc": rc,
            "stdout": out.read().decode("utf-8", "replace"),
            "stderr": err.read().decode("utf-8", "replace"),
        }


def main(spec_path: str, results_path: str) -> int:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    sys.path.insert(0, spec["repo"])  # the scripts' own sys.path.insert does the same
    results = {}
    for case in spec["cases"]:
        before = snapshot(spec["watch"])
        result = run_one(case["argv"], spec["cwd"])
        result["before"], result["after"] = before, snapshot(spec["watch"])
        results[case["id"]] = result
    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
