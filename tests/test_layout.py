"""The package's rooms: every module imports on its own, no two modules import each other (directly
or in a circle, lazy imports inside functions included), files stay small, each says what it is for."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "samkit"
MAX_LINES = 550  # house style: past ~500 lines, split by concern


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """samkit modules that ``name`` imports anywhere in its source (top level or inside functions).

    ``from . import x`` counts as importing the submodule ``x`` when there is one, else the package.
    """
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(anchor + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [
                f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("samkit") and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    """Edges between modules; a package's ``__init__`` re-exporting its own submodules is how a
    package shows its public names, so edges from a package into its own subtree are left out."""
    graph = {}
    for name, path in MODULES.items():
        targets = imported_modules(name, path)
        if path.name == "__init__.py":
            targets = {t for t in targets if not t.startswith(name + ".")}
        graph[name] = targets
    return graph


def test_no_import_cycles_inside_samkit():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_every_module_imports_on_its_own():
    """Each module in a fresh interpreter (an import that only works after another module was
    imported first would hide a cycle or a missing import)."""
    names = sorted(n for n in MODULES if not n.endswith("__main__"))
    code = (
        "import importlib, sys\n"
        "bad = []\n"
        "for name in sys.argv[1:]:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('samkit')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        bad.append(f'{name}: {err!r}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_small_and_say_what_they_are_for(name):
    path = MODULES[name]
    source = path.read_text()
    lines = source.count("\n")
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by concern"
    assert ast.get_docstring(ast.parse(source)), f"{path.relative_to(ROOT)} has no module docstring"


def test_the_rooms_hold_what_their_names_say():
    """A newcomer's guesses: the library at the top, training, commands and helpers in their folders."""
    for name in ("build", "predictor", "amg", "errors", "modeling", "data", "training", "commands", "utils"):
        assert f"samkit.{name}" in MODULES, name
    for name in ("train", "evaluate", "losses", "metrics", "config", "checkpointing", "embedding_cache",
                 "distributed", "schedule", "modes", "modes.box"):  # fmt: skip
        assert f"samkit.training.{name}" in MODULES, name
    for name in ("main", "predict", "amg", "box", "train", "eval", "preprocess_ct"):
        assert f"samkit.commands.{name}" in MODULES, name
    for name in ("transforms", "image", "amg", "onnx", "files"):  # Meta's paths and pure helpers
        assert f"samkit.utils.{name}" in MODULES, name
    for name in ("checkpoints.mindspore", "checkpoints.download", "export.onnx", "export.verify", "maskgen.grids",
                 "maskgen.nms", "maskgen.rle", "maskgen.output", "fast.encoder", "fast.decoder"):  # fmt: skip
        assert f"samkit.{name}" in MODULES, name
    # Command modules are leaves: no library module imports a command.
    graph = import_graph()
    for name, targets in graph.items():
        if not name.startswith("samkit.commands") and name != "samkit.__main__":
            assert not [t for t in targets if t.startswith("samkit.commands")], name


def test_old_notebook_import_paths_still_work():
    for name in ("samkit.utils.transforms", "samkit.utils.amg", "samkit.predictor", "samkit.modeling"):
        importlib.import_module(name)
    from samkit.utils.transforms import ResizeLongestSide

    assert ResizeLongestSide(1024).get_preprocess_shape(512, 256, 1024) == (1024, 512)


def test_importing_samkit_or_its_onnx_runtime_does_not_import_torch():
    """The package root loads its public names on first use: samkit.onnx deploys without PyTorch."""
    code = (
        "import sys, samkit, samkit.onnx\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]\n"
        "assert samkit.SamPredictor.__name__ == 'SamPredictor' and 'torch' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


MODELING = sorted(name for name in MODULES if name.startswith("samkit.modeling"))


def test_modeling_imports_only_modeling():
    """The reference modules compute from their inputs and parameters: they import no helpers
    (utils), no speed layer (fast) and nothing else of samkit."""
    graph = import_graph()
    for name in MODELING:
        outside = sorted(t for t in graph[name] if not t.startswith("samkit.modeling"))
        assert not outside, f"{name} imports {outside}"


def _module_level_mutables(tree: ast.Module) -> list[str]:
    """Names bound at module level to a mutable value (list, dict, set, their comprehensions, or a
    call that is not a plain constructor of an immutable), and ``global`` statements anywhere."""
    found = []
    for node in tree.body:
        targets, value = [], None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        mutable = isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp))
        if isinstance(value, ast.Call):
            func = value.func
            name = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else ""
            )
            mutable = name not in {"frozenset", "tuple", "TypeVar", "namedtuple", "NamedTuple"}
        if mutable:
            found += [ast.unparse(t) for t in targets if ast.unparse(t) != "__all__"]
    found += [f"global {', '.join(n.names)}" for n in ast.walk(tree) if isinstance(n, ast.Global)]
    return found


@pytest.mark.parametrize("name", MODELING)
def test_modeling_keeps_no_module_level_state(name):
    """No caches or flags at module level, no ``global`` and no private torch ops in samkit.modeling."""
    source = MODULES[name].read_text()
    tree = ast.parse(source)
    assert not _module_level_mutables(tree), f"{name}: {_module_level_mutables(tree)}"
    for banned in ("torch.ops.", "_version", "data_ptr", "weakref", "__getstate__", "is_grad_enabled",
                   "is_compiling", "is_autocast", "__dict__"):  # fmt: skip
        assert banned not in source, f"{name} uses {banned}: process or memory state belongs in samkit.fast"


def test_the_state_check_finds_state():
    tree = ast.parse("A = {}\nB = (1, 2)\nC = list()\nD: dict = dict()\ndef f():\n    global E\n")
    assert _module_level_mutables(tree) == ["A", "C", "D", "global E"]


def mccabe_complexity(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """McCabe complexity as ruff's C901 counts it: 1 + each if/elif, loop, except clause, match case
    and nested function (boolean operators and comprehensions do not count)."""

    def branches(body: list[ast.stmt]) -> int:
        count = 0
        for node in body:
            if isinstance(node, ast.If):
                count += 1 + branches(node.body)
                rest = node.orelse
                while len(rest) == 1 and isinstance(rest[0], ast.If):  # elif
                    count += 1 + branches(rest[0].body)
                    rest = rest[0].orelse
                count += branches(rest)
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
                count += 1 + branches(node.body) + branches(node.orelse)
            elif isinstance(node, (ast.With, ast.AsyncWith, ast.ClassDef)):
                count += branches(node.body)
            elif isinstance(node, ast.Try):
                count += branches(node.body) + branches(node.orelse) + branches(node.finalbody)
                count += sum(1 + branches(handler.body) for handler in node.handlers)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count += mccabe_complexity(node)
            elif sys.version_info >= (3, 10) and isinstance(node, ast.Match):
                count += sum(1 + branches(case.body) for case in node.cases)
        return count

    return 1 + branches(function.body)


def test_the_complexity_measure_counts_like_ruff():
    source = (
        "def f(x):\n"
        "    if x and x > 1:\n        pass\n    elif x:\n        pass\n    else:\n        pass\n"
        "    for i in range(3):\n        while i:\n            i -= 1\n"
        "    try:\n        pass\n    except ValueError:\n        pass\n    except TypeError:\n        pass\n"
        "    with open(x):\n        if x:\n            pass\n"
        "    return [i for i in x if i]\n"
    )
    (function,) = ast.parse(source).body
    assert mccabe_complexity(function) == 8  # ruff check --select C901: "f is too complex (8 > ...)"


# The training loop was one 237-line function and config validation one of 91 (complexity 34 each);
# split along their seams, they stay readable at a glance (pyproject's ruff C901 checks the same).
SHORT_FUNCTION_FILES = ("samkit/training/train.py", "samkit/training/config.py")
MAX_FUNCTION_LINES = 50
MAX_COMPLEXITY = 12


@pytest.mark.parametrize("relative", SHORT_FUNCTION_FILES)
def test_training_loop_and_config_functions_are_short(relative):
    path = ROOT / relative
    too_long = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            complexity = mccabe_complexity(node)
            if lines > MAX_FUNCTION_LINES or complexity > MAX_COMPLEXITY:
                too_long.append(f"{node.name}: {lines} lines, complexity {complexity}")
    assert not too_long, f"{relative}: split " + "; ".join(too_long)
