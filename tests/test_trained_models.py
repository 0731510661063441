"""The trained-test-model cache (tests/trained_models.py), with fake builders that take no time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from . import trained_models
from .trained_models import TRAINED_MODELS, TrainedModel, cache_key, ensure_built, source_files


class CountingBuilder:
    """Writes ``value.txt`` into the folder and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, folder: Path, *, value: int = 0) -> None:
        self.calls += 1
        (folder / "value.txt").write_text(str(value))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fake repository root holding a dependency file and a dependency package."""
    root = tmp_path / "repo"
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "dep.py").write_text("A = 1\n")
    (root / "pkg" / "a.py").write_text("B = 2\n")
    (root / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    return root


def entries(model_root: Path) -> list[str]:
    """The names in a model's cache folder, less the lock files."""
    return sorted(p.name for p in model_root.iterdir() if not p.name.startswith(".lock-"))


def fake(builder, **settings) -> TrainedModel:
    return TrainedModel(build=builder, sources=("dep.py", "pkg"), settings=settings, packages=("pytest",))


def test_built_once_then_loaded_from_the_cache(repo, tmp_path):
    builder = CountingBuilder()
    model = fake(builder, value=7)
    folder, seconds = ensure_built(tmp_path / "cache", "fake", model, root=repo)
    assert builder.calls == 1 and seconds is not None
    assert folder == tmp_path / "cache" / "fake" / cache_key(model, repo)
    assert (folder / "value.txt").read_text() == "7"
    assert (folder / "key.json").is_file()
    again, seconds = ensure_built(tmp_path / "cache", "fake", model, root=repo)
    assert (again, seconds, builder.calls) == (folder, None, 1)


def test_key_follows_the_contents_of_the_sources(repo):
    model = fake(CountingBuilder())
    key = cache_key(model, repo)
    (repo / "dep.py").write_text("A = 1\n")  # rewritten, same content
    (repo / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\1")  # not source
    (repo / "notes.txt").write_text("unrelated")
    assert cache_key(model, repo) == key
    (repo / "dep.py").write_text('"""Docs."""\n\n# A comment.\nA = (\n    1\n)\n')  # same code
    assert cache_key(model, repo) == key
    (repo / "dep.py").write_text("A = 2\n")
    changed = cache_key(model, repo)
    assert changed != key
    (repo / "pkg" / "a.py").write_text("B = 3\n")
    assert cache_key(model, repo) not in (key, changed)
    (repo / "pkg" / "a.py").write_text('def f():\n    """Docs."""\n    return 3\n')
    before = cache_key(model, repo)
    (repo / "pkg" / "a.py").write_text('def f():\n    """Other docs."""\n    return 3\n')
    assert cache_key(model, repo) == before
    (repo / "pkg" / "a.py").write_text('def f():\n    """Other docs."""\n    return "3"\n')
    assert cache_key(model, repo) != before
    (repo / "pkg" / "a.py").write_text('def f():\n    """Docs."""\n')  # a docstring-only body
    assert cache_key(model, repo) != before
    (repo / "pkg" / "sub").mkdir()
    before = cache_key(model, repo)
    (repo / "pkg" / "sub" / "c.py").write_text("")  # a new module in a package counts
    assert cache_key(model, repo) != before


def test_key_follows_settings_and_package_versions(repo, monkeypatch):
    key = cache_key(fake(CountingBuilder(), value=1), repo)
    assert cache_key(fake(CountingBuilder(), value=1), repo) == key
    assert cache_key(fake(CountingBuilder(), value=2), repo) != key
    real_version = trained_models.metadata.version
    monkeypatch.setattr(trained_models.metadata, "version", lambda name: real_version(name) + ".post1")
    assert cache_key(fake(CountingBuilder(), value=1), repo) != key


def test_a_changed_source_rebuilds_and_removes_the_stale_entry(repo, tmp_path):
    builder = CountingBuilder()
    model = fake(builder)
    old, _ = ensure_built(tmp_path / "cache", "fake", model, root=repo)
    other, _ = ensure_built(tmp_path / "cache", "other", fake(CountingBuilder()), root=repo)
    (repo / "dep.py").write_text("A = 2\n")
    new, seconds = ensure_built(tmp_path / "cache", "fake", model, root=repo)
    assert new != old and seconds is not None and builder.calls == 2
    assert entries(tmp_path / "cache" / "fake") == [new.name]
    assert other.is_dir()  # another model's entry is left alone


def test_a_failed_build_leaves_no_entry(repo, tmp_path):
    def broken(folder: Path) -> None:
        (folder / "model.pt").write_bytes(b"half a model")
        raise RuntimeError("out of patience")

    with pytest.raises(RuntimeError, match="out of patience"):
        ensure_built(tmp_path / "cache", "fake", fake(broken), root=repo)
    assert entries(tmp_path / "cache" / "fake") == []
    builder = CountingBuilder()
    folder, _ = ensure_built(tmp_path / "cache", "fake", fake(builder), root=repo)
    assert builder.calls == 1 and sorted(p.name for p in folder.iterdir()) == ["key.json", "value.txt"]


def test_leftovers_of_killed_builds_are_ignored_then_removed_when_old(repo, tmp_path):
    model = fake(CountingBuilder())
    model_root = tmp_path / "cache" / "fake"
    key = cache_key(model, repo)
    old, young = model_root / f".tmp-{key}-old", model_root / f".tmp-{key}-young"
    for leftover in (old, young):
        leftover.mkdir(parents=True)
        (leftover / "model.pt").write_bytes(b"half a model")
    long_ago = time.time() - trained_models.STALE_TMP_SECONDS - 60
    os.utime(old, (long_ago, long_ago))
    folder, seconds = ensure_built(tmp_path / "cache", "fake", model, root=repo)
    assert seconds is not None and (folder / "value.txt").is_file()
    # A young one may be another session's build in progress.
    assert entries(model_root) == sorted([key, young.name])


def test_sessions_building_at_once_take_turns(repo, tmp_path):
    builder = CountingBuilder()

    def slow(folder: Path) -> None:
        time.sleep(0.3)
        builder(folder)

    model = fake(slow)
    start = threading.Barrier(2)
    results = []

    def session() -> None:
        start.wait()
        results.append(ensure_built(tmp_path / "cache", "fake", model, root=repo))

    threads = [threading.Thread(target=session) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builder.calls == 1
    assert results[0][0] == results[1][0] and sorted(s is None for _, s in results) == [False, True]


def test_different_models_are_built_one_at_a_time(repo, tmp_path):
    """pytest-xdist workers (or sessions) needing different models build them in turn: each build
    uses BUILD_THREADS threads, and two at once on the same cores would only oversubscribe them."""
    spans = []

    def slow(folder: Path) -> None:
        begin = time.perf_counter()
        time.sleep(0.3)
        spans.append((begin, time.perf_counter()))
        (folder / "done").write_text("")

    start = threading.Barrier(2)

    def session(name: str) -> None:
        start.wait()
        ensure_built(tmp_path / "cache", name, fake(slow), root=repo)

    threads = [threading.Thread(target=session, args=(name,)) for name in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0


def test_a_build_may_build_another_model_of_the_same_cache(repo, tmp_path):
    inner = fake(CountingBuilder(), value=3)

    def outer(folder: Path) -> None:  # as text_sam_model's build ensures text_clip_model
        found, _ = ensure_built(tmp_path / "cache", "inner", inner, root=repo)
        (folder / "inner.txt").write_text((found / "value.txt").read_text())

    folder, _ = ensure_built(tmp_path / "cache", "outer", fake(outer), root=repo)
    assert (folder / "inner.txt").read_text() == "3"


def test_builds_use_build_threads_whatever_the_session_uses(repo, tmp_path):
    """Float reductions depend on the thread count: a 64-core machine and a pytest-xdist worker
    (one thread) must build the same weights as the 2-core machine the tests were tuned on."""
    import torch

    seen = []

    def build(folder: Path) -> None:
        seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(1 if trained_models.BUILD_THREADS != 1 else 3)
    try:
        session = torch.get_num_threads()
        ensure_built(tmp_path / "cache", "fake", fake(build), root=repo)
        assert seen == [trained_models.BUILD_THREADS]
        assert torch.get_num_threads() == session
    finally:
        torch.set_num_threads(before)


def test_a_missing_source_is_an_error_that_says_where_to_fix_it(repo):
    model = TrainedModel(build=CountingBuilder(), sources=("dep.py", "moved.py"))
    with pytest.raises(FileNotFoundError, match=r"'moved.py'.*tests/trained_models.py"):
        cache_key(model, repo)


@pytest.mark.parametrize("name", sorted(TRAINED_MODELS))
def test_every_registered_model_has_its_sources(name):
    files = source_files(TRAINED_MODELS[name])
    assert files and all(f.suffix == ".py" for f in files)
    assert len(cache_key(TRAINED_MODELS[name])) == 16


# ---------------------------------------------------------------------------------------------------
# The pytest hook, in pytest sessions of their own (a fake model, a fake test file)

CONFTEST = """
import os
from pathlib import Path

import pytest

from tests import trained_models

LOG = Path(__file__).parent / "log.txt"


def build(folder, *, value):
    with LOG.open("a") as f:
        f.write("build\\n")
    if os.environ.get("FAKE_BUILD_FAILS"):
        raise RuntimeError("the fake build failed")
    (folder / "value.txt").write_text(str(value))


REGISTRY = {
    "fake_model": trained_models.TrainedModel(
        build=build, sources=("tests/trained_models.py",), settings={"value": 7}, packages=()
    )
}


def pytest_collection_finish(session):
    trained_models.build_needed(session.config, session.items, REGISTRY)


def pytest_runtest_logstart(nodeid, location):
    with LOG.open("a") as f:
        f.write(f"start {nodeid}\\n")


@pytest.fixture(scope="session")
def fake_model(request):
    return trained_models.model_dir(request.config, "fake_model", REGISTRY)


@pytest.fixture
def through_another_fixture(fake_model):
    return fake_model
"""

TESTS = """
def test_plain():
    pass


def test_needs_the_model(through_another_fixture):
    assert (through_another_fixture / "value.txt").read_text() == "7"
"""


def run_pytest(folder: Path, *args: str, fails: bool = False) -> tuple[str, list[str]]:
    """(output, log lines written during the run) of a pytest session in ``folder``."""
    log = folder / "log.txt"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(trained_models.REPO_ROOT)}
    env.pop("FAKE_BUILD_FAILS", None)
    if fails:
        env["FAKE_BUILD_FAILS"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:timeout", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = log.read_text().splitlines() if log.exists() else []
    return result.stdout + result.stderr, lines


def test_the_hook_builds_what_the_selected_tests_need_before_they_run(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_fake.py").write_text(textwrap.dedent(TESTS))

    out, log = run_pytest(tmp_path, "-k", "plain")
    assert "1 passed" in out and log == ["start test_fake.py::test_plain"]  # nothing built
    out, log = run_pytest(tmp_path, "--collect-only")
    assert "2 tests collected" in out and log == []

    out, log = run_pytest(tmp_path, "--durations=0", fails=True)
    assert "1 passed, 1 error" in out and "the fake build failed" in out
    assert "fake_model: not cached, building... FAILED: RuntimeError" in out
    assert log[0] == "build" and log.count("build") == 1  # tried once, before the tests

    out, log = run_pytest(tmp_path)
    assert "2 passed" in out and re.search(r"fake_model: not cached, building\.\.\. built in \d+\.\d s", out)
    assert log[0] == "build" and log.count("build") == 1
    out, log = run_pytest(tmp_path)
    assert "2 passed" in out and "building" not in out and "build" not in log

    # Without the cache plugin: built into a temporary folder, removed at the end.
    out, log = run_pytest(tmp_path, "-p", "no:cacheprovider")
    assert "2 passed" in out and log.count("build") == 1
    folder = Path(re.search(r"built in \S+ s \((.+)\)", out).group(1))
    assert folder.name == cache_key(
        TrainedModel(build=print, sources=("tests/trained_models.py",), settings={"value": 7}, packages=())
    )
    assert not folder.exists()


def record_process(folder: Path, *, fail: bool = False) -> None:
    """A build for its own process (module level, so that a spawned process can import it)."""
    import torch

    from samkit.training.numerics import flushing_subnormals

    if fail:
        raise ValueError("this build fails")
    (folder / "process.txt").write_text(f"{os.getpid()} {flushing_subnormals()} {torch.get_num_threads()}")


def test_a_build_in_its_own_process_flushes_subnormals_and_leaves_this_process_alone(repo, tmp_path):
    from samkit.training.numerics import flushing_subnormals

    model = TrainedModel(build=record_process, sources=("dep.py",), packages=("pytest",), own_process=True)
    folder, seconds = ensure_built(tmp_path / "cache", "fake", model, root=repo)
    pid, flushing, threads = (folder / "process.txt").read_text().split()
    assert int(pid) != os.getpid() and seconds is not None
    assert (flushing, int(threads)) == ("True", trained_models.BUILD_THREADS)
    assert not flushing_subnormals()


def test_a_build_that_fails_in_its_own_process_names_the_model_and_leaves_no_entry(repo, tmp_path, capfd):
    model = TrainedModel(
        build=record_process,
        sources=("dep.py",),
        settings={"fail": True},
        packages=("pytest",),
        own_process=True,
    )
    with pytest.raises(RuntimeError, match="building trained test model broken failed in its process"):
        ensure_built(tmp_path / "cache", "broken", model, root=repo)
    assert "this build fails" in capfd.readouterr().err
    assert entries(tmp_path / "cache" / "broken") == []


def test_required_models_are_built_first(repo, tmp_path, monkeypatch):
    order: list[str] = []

    def builder(name: str):
        return lambda folder: order.append(name)

    registry = {"inner": fake(builder("inner"))}
    monkeypatch.setattr(trained_models, "TRAINED_MODELS", registry)
    outer = TrainedModel(
        build=builder("outer"), sources=("dep.py",), packages=("pytest",), requires=("inner",)
    )
    ensure_built(tmp_path / "cache", "outer", outer, root=repo)
    assert order == ["inner", "outer"]
    assert entries(tmp_path / "cache" / "inner") and entries(tmp_path / "cache" / "outer")
