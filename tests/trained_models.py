"""Trained test models: built once before any test runs, cached, keyed by the code they depend on.

Some tests need a model that has learnt something (``shapes_model``: a vit_tiny SAM trained on
generated shapes for ~80 s). Training inside a fixture would count toward the first test's
timeout, so ``tests/conftest.py`` calls :func:`build_needed` once collection is done: it builds
every model that the selected tests request (directly or through other fixtures) and prints one
line per model built. The session fixtures then only load from the cache.

Each model lives in its own folder under pytest's cache directory
(``.pytest_cache/d/samkit-trained-models/<name>/<key>/``; a temporary directory with
``-p no:cacheprovider``). The key hashes the code of the model's ``sources`` (Python files as
syntax trees without docstrings: comments, docstrings and formatting do not count), its
``settings`` and the versions of its ``packages``, so editing any code the model depends on
retrains it, and nothing else does. A folder is built under a temporary name and renamed when
complete, so an interrupted build leaves no entry; entries of the same model with another key
are removed. Sessions that need the same build at once take turns on a lock file: one builds,
the others wait and load it. A build that fails does not stop the session: the tests that need
the model error with the build's exception.

How to add a model:

1. Write a function ``build(folder: Path, **settings) -> None`` that trains the model and writes
   whatever files it needs into ``folder`` (it exists and is empty). Keep it deterministic for
   its settings; put the training code in its own file under ``tests/``.
2. Add an entry to ``TRAINED_MODELS`` below. The name is the session fixture that loads it.
   ``sources`` lists every file or package folder (relative to the repository root) whose code
   can change the weights: the training file, and the samkit modules the training calls. Too few
   and a stale model survives a code change; a missing path is an error, so a moved module is
   noticed.
3. In ``tests/conftest.py`` write the session fixture of that name: ``folder =
   trained_models.model_dir(request.config, "<name>")``, then load from ``folder``.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_NAME = "samkit-trained-models"
# Temporary folders this old are left over from interrupted builds; younger ones may be in progress.
STALE_TMP_SECONDS = 6 * 3600
# Every build trains with this many torch threads, whatever the machine's cores or the session's
# setting (pytest-xdist workers run with one thread each on 2 cores): CPU float reductions depend on
# the thread count, so the same code then gives the same weights on a 2-core and a 64-core machine,
# and the margins of the tests that check learned behaviour were measured on such builds.
BUILD_THREADS = 2


@dataclass(frozen=True)
class TrainedModel:
    """How to build one trained test model, and what its weights depend on."""

    build: Callable[..., None]  # build(folder, **settings) writes the model's files into folder
    sources: tuple[str, ...]  # files or package folders (all *.py inside), relative to the repo root
    settings: Mapping[str, Any] = field(default_factory=dict)  # passed to build, part of the key
    packages: tuple[str, ...] = ("torch",)  # distributions whose versions are part of the key
    # Build in a fresh process (``build`` must then be a module-level function): see _build_in_process.
    own_process: bool = False
    requires: tuple[str, ...] = ()  # models (TRAINED_MODELS names) ``build`` finds in the cache


# ---------------------------------------------------------------------------------------------------
# The models


def _build_shapes_model(folder: Path, *, seed: int, steps: int) -> None:
    import torch

    from .shapes import train_tiny_shapes_model

    torch.save(train_tiny_shapes_model(steps=steps, seed=seed).state_dict(), folder / "model.pt")


TRAINED_MODELS: dict[str, TrainedModel] = {
    "shapes_model": TrainedModel(
        build=_build_shapes_model,
        sources=(
            "tests/shapes.py",
            "samkit/build.py",
            "samkit/modeling",
            "samkit/fast",  # it trains on the fast modules
            "samkit/utils/transforms.py",  # ResizeLongestSide: image and point geometry
            "samkit/training/numerics.py",  # subnormals flushed while it trains
        ),
        settings={"seed": 0, "steps": 1000},
        packages=("torch", "numpy", "scikit-image"),  # scikit-image draws the shapes
        own_process=True,  # the same weights as in-process (subnormals flushed: checked bit for bit)
    ),
}


def _build_volume_box_model(folder: Path, *, seed: int, steps: int) -> None:
    import torch

    from .volume_model import train_volume_box_model

    torch.save(train_volume_box_model(steps=steps, seed=seed).state_dict(), folder / "model.pt")


# Issue 37's slice propagation: a vit_tiny trained with box prompts on generated CT-like slices.
TRAINED_MODELS["volume_box_model"] = TrainedModel(
    build=_build_volume_box_model,
    sources=(
        "tests/volume_model.py",
        "tests/shapes.py",  # its losses and attention initialisation
        "samkit/volume/synthetic.py",
        "samkit/volume/intensity.py",
        "samkit/data/ct_preprocess.py",  # the CT window
        "samkit/build.py",
        "samkit/modeling",
        "samkit/fast",
        "samkit/utils/transforms.py",
        "samkit/training/numerics.py",
    ),
    settings={"seed": 0, "steps": 500},
    packages=("torch", "numpy", "scikit-image"),
    own_process=True,
)


def _build_text_clip(folder: Path, **settings: Any) -> None:
    from .text_models import build_text_clip

    build_text_clip(folder, **settings)


# Issue 12's text-prompt groundwork (tests/text_models.py): a tiny CLIP trained on named shapes.
_TEXT_CLIP_SOURCES = ("tests/text_models.py", "tests/text_helpers.py", "tests/shapes.py", "samkit/text")
_TEXT_CLIP_SETTINGS = {"seed": 0, "steps": 300, "crops_per_name": 40}
TRAINED_MODELS["text_clip_model"] = TrainedModel(
    build=_build_text_clip,
    sources=_TEXT_CLIP_SOURCES,
    settings=_TEXT_CLIP_SETTINGS,
    packages=("torch", "numpy", "scikit-image", "transformers", "tokenizers", "torchvision"),
)


def _build_text_sam(folder: Path, **settings: Any) -> None:
    from .text_models import build_text_sam

    build_text_sam(folder, **settings)


# A tiny text-prompt SAM trained by samkit's loop with text_clip_model's features (its build finds the
# CLIP in the cache, building it if absent, so its key also covers the CLIP's sources and settings).
TRAINED_MODELS["text_sam_model"] = TrainedModel(
    build=_build_text_sam,
    sources=tuple(
        dict.fromkeys(
            _TEXT_CLIP_SOURCES
            + (
                "samkit/training",  # the loop, the text mode, losses, schedule, parameter freezing
                "samkit/data",  # COCO reading, resizing, object choice
                "samkit/modeling",
                "samkit/build.py",
                "samkit/utils/transforms.py",
                "samkit/utils/image.py",
                "samkit/errors.py",
            )
        )
    ),
    settings={
        "seed": 0,
        "num_images": 256,
        "epochs": 6,  # 4 sufficed for seeds 0, 1 and 3 but not for 2 (a phase change near 150-250 steps)
        "batch_size": 4,
        "lr": 3e-3,
        "text_clip_model": _TEXT_CLIP_SETTINGS,  # the CLIP it prompts with (key only)
    },
    packages=("torch", "numpy", "scikit-image", "transformers", "tokenizers", "torchvision", "pycocotools"),
    own_process=True,
    requires=("text_clip_model",),
)


# ---------------------------------------------------------------------------------------------------
# The cache


def source_files(model: TrainedModel, root: Path = REPO_ROOT) -> list[Path]:
    """The files behind ``model.sources``, sorted; a folder stands for every ``*.py`` under it."""
    files: set[Path] = set()
    for source in model.sources:
        path = root / source
        if path.is_dir():
            files.update(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        elif path.is_file():
            files.add(path)
        else:
            raise FileNotFoundError(
                f"trained model source {source!r} does not exist under {root}; if it moved, update "
                "its entry in tests/trained_models.py"
            )
    return sorted(files)


def code_digest(path: Path) -> bytes:
    """A hash of what a file does: for Python, its syntax tree without docstrings, so that edits to
    comments, docstrings and formatting (frequent, and harmless to the weights) do not retrain."""
    text = path.read_bytes()
    if path.suffix == ".py":
        try:
            tree = ast.parse(text)
        except SyntaxError:
            pass  # hash the bytes; the build will fail anyway
        else:
            for node in ast.walk(tree):
                body = getattr(node, "body", None)
                if (
                    isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                    and body
                    and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)
                ):
                    node.body = body[1:] or [ast.Pass()]
            text = ast.dump(tree).encode()
    return hashlib.sha256(text).digest()


def cache_key(model: TrainedModel, root: Path = REPO_ROOT) -> str:
    """16 hex digits of a hash of the sources' paths and code, the settings and package versions."""
    h = hashlib.sha256()
    for path in source_files(model, root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(code_digest(path))
    h.update(json.dumps(dict(model.settings), sort_keys=True).encode())
    for package in model.packages:
        h.update(f"{package}=={metadata.version(package)}".encode() + b"\0")
    return h.hexdigest()[:16]


def ensure_built(
    cache_root: Path, name: str, model: TrainedModel, root: Path = REPO_ROOT
) -> tuple[Path, float | None]:
    """The folder of ``name``'s current build, building it if absent.

    Returns (folder, seconds the build took, or None on a cache hit). The build runs in a temporary
    folder that is renamed into place when complete, so a failed or interrupted build leaves no
    entry. Sessions that need the same build at once take turns on a lock file: one builds, the
    others wait and load it. Other keys' entries of the same model are then removed.
    """
    for required in model.requires:  # first, so that a build in its own process finds them
        ensure_built(cache_root, required, TRAINED_MODELS[required], root)
    key = cache_key(model, root)
    model_root = Path(cache_root) / name
    folder = model_root / key
    seconds = None
    if not folder.is_dir():
        model_root.mkdir(parents=True, exist_ok=True)
        # One build at a time in the whole cache (builds use every core, see BUILD_THREADS), and
        # each model built once: sessions and pytest-xdist workers wait here, then load.
        with _build_turn(Path(cache_root)), _locked(model_root / f".lock-{key}"):
            if not folder.is_dir():  # still absent once the lock is ours
                seconds = _build(folder, name, model, key, root)
    _remove_stale(model_root, keep=key)
    return folder, seconds


def _build(folder: Path, name: str, model: TrainedModel, key: str, root: Path) -> float:
    import torch

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=folder.parent))
    threads = torch.get_num_threads()
    try:
        start = time.perf_counter()
        if model.own_process:
            _build_in_process(name, model, tmp)
        else:
            torch.set_num_threads(BUILD_THREADS)
            try:
                model.build(tmp, **model.settings)
            finally:
                torch.set_num_threads(threads)
        seconds = time.perf_counter() - start
        info = {
            "name": name,
            "key": key,
            "settings": dict(model.settings),
            "packages": {p: metadata.version(p) for p in model.packages},
            "sources": [p.relative_to(root).as_posix() for p in source_files(model, root)],
            "build_seconds": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (tmp / "key.json").write_text(json.dumps(info, indent=1) + "\n")
        try:
            os.rename(tmp, folder)  # atomic: the entry appears complete or not at all
        except OSError:
            if not folder.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a session without the lock finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return seconds


def _build_in_process(name: str, model: TrainedModel, folder: Path) -> None:
    """Run ``model.build`` in a fresh (spawned) Python process that flushes subnormal floats from its
    start: torch's worker threads take the setting when they are created, so a process whose
    thread pool already runs (this pytest session) cannot switch them over, and the late steps of a
    training slow down several times on subnormals (text_sam_model ~100 -> ~60 s). The fresh
    process also builds the same way whatever the session ran before. Its output goes to the
    session's own stdout and stderr."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(
        target=_build_child, args=(model.build, str(folder), dict(model.settings)), name=f"build-{name}"
    )
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(
            f"building trained test model {name} failed in its process (exit code {child.exitcode})"
        )


def _build_child(build: Callable[..., None], folder: str, settings: dict[str, Any]) -> None:
    import torch

    torch.set_flush_denormal(True)  # before the first parallel op: the thread pool inherits it
    torch.set_num_threads(BUILD_THREADS)
    build(Path(folder), **settings)


_TURN = threading.local()  # .depth > 0 while this thread holds the cache's build turn


@contextlib.contextmanager
def _build_turn(cache_root: Path) -> Iterator[None]:
    """The cache-wide build lock, re-entrant within a thread (text_sam_model's build ensures
    text_clip_model)."""
    depth = getattr(_TURN, "depth", 0)
    if depth:
        _TURN.depth = depth + 1
        try:
            yield
        finally:
            _TURN.depth = depth
        return
    cache_root.mkdir(parents=True, exist_ok=True)
    with _locked(cache_root / ".build-lock"):
        _TURN.depth = 1
        try:
            yield
        finally:
            _TURN.depth = 0


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` for the block (released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; a concurrent session may build the same model too
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(model_root: Path, keep: str) -> None:
    now = time.time()
    for entry in model_root.iterdir():
        if entry.name in (keep, f".lock-{keep}"):
            continue
        if entry.name.startswith(".tmp-"):
            try:
                if now - entry.stat().st_mtime < STALE_TMP_SECONDS:
                    continue  # perhaps another session's build in progress
            except FileNotFoundError:
                continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# pytest glue (called from tests/conftest.py)

_FOLDERS = pytest.StashKey[dict]()  # name -> folder, or the exception its build raised
_CACHE_ROOT = pytest.StashKey[Path]()


def cache_root(config: pytest.Config) -> Path:
    """``.pytest_cache/d/samkit-trained-models``, or a temporary folder for this session when the
    cache plugin is off (``-p no:cacheprovider``)."""
    if _CACHE_ROOT not in config.stash:
        cache = getattr(config, "cache", None)
        if cache is not None:
            config.stash[_CACHE_ROOT] = Path(cache.mkdir(CACHE_NAME))
        else:
            tmp = tempfile.mkdtemp(prefix=f"{CACHE_NAME}-")
            config.add_cleanup(lambda: shutil.rmtree(tmp, ignore_errors=True))
            config.stash[_CACHE_ROOT] = Path(tmp)
    return config.stash[_CACHE_ROOT]


def needed_models(items: Iterable[pytest.Item], registry: Mapping[str, TrainedModel]) -> list[str]:
    """Names in ``registry`` that some item requests as a fixture (directly or through another fixture)."""
    requested: set[str] = set()
    for item in items:
        requested.update(getattr(item, "fixturenames", ()))
    return [name for name in registry if name in requested]


def _resolve(config: pytest.Config, name: str, registry: Mapping[str, TrainedModel]) -> Path | Exception:
    """Build or find ``name`` once per session; a failure is kept and given to every later caller."""
    folders = config.stash.setdefault(_FOLDERS, {})
    if name not in folders:
        try:
            model = registry[name]
            root = cache_root(config)
            building = not (root / name / cache_key(model)).is_dir()
            if building:  # the line is finished when the build is: a slow build shows what it is doing
                _report(config, f"trained test model {name}: not cached, building... ", end="")
            try:
                folder, seconds = ensure_built(root, name, model)
            except Exception as exc:
                if building:
                    _report(config, f"FAILED: {type(exc).__name__}: {exc}")
                raise
            if building:
                done = f"built in {seconds:.1f} s" if seconds is not None else "built by another session"
                _report(config, f"{done} ({folder})")
            folders[name] = folder
        except Exception as exc:
            folders[name] = exc
    return folders[name]


def build_needed(
    config: pytest.Config, items: Iterable[pytest.Item], registry: Mapping[str, TrainedModel] = TRAINED_MODELS
) -> None:
    """Build (or find in the cache) every model the selected tests need, before any test runs.

    A build that fails does not stop the session: the tests that need that model error with the
    build's exception, the others run.
    """
    if config.option.collectonly:
        return
    names = needed_models(items, registry)
    if names:
        # Under pytest-xdist every worker builds what its tests need, one build at a time in the
        # cache. Worker i starts at the i-th model: it finds what the others built while it waited.
        # (make test runs no workers: on 2 cores they gained ~10% and ran the learning tests with
        # one thread each, which changes their float rounding.)
        start = _worker_index() % len(names)
        names = names[start:] + names[:start]
    for name in names:
        _resolve(config, name, registry)


def _worker_index() -> int:
    """This pytest-xdist worker's number (``gw3`` -> 3); 0 without xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


def model_dir(
    config: pytest.Config, name: str, registry: Mapping[str, TrainedModel] = TRAINED_MODELS
) -> Path:
    """The folder holding ``name``'s files; for session fixtures. :func:`build_needed` has usually
    built it already; if not (a fixture requested dynamically), it is built now, inside a test."""
    folder = _resolve(config, name, registry)
    if isinstance(folder, Path) and not folder.is_dir():
        # Removed by a concurrent session running other code: build it again.
        config.stash[_FOLDERS].pop(name)
        folder = _resolve(config, name, registry)
    if isinstance(folder, Exception):
        raise RuntimeError(
            f"building the trained test model {name!r} failed before the tests ran: {folder!r}"
        ) from folder
    return folder


def _report(config: pytest.Config, text: str, end: str = "\n") -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        print(text, end=end, flush=True)
    elif end:
        reporter.line(text)
    else:
        reporter.ensure_newline()
        reporter.write(text, flush=True)
