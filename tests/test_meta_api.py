"""Meta's public API, walked: every name of ``segment_anything`` (and every parameter of its functions,
classes and methods) exists at the same module path in samkit, with the same defaults, except the
deliberate differences in ALLOW_LIST.

A module's names are the public ones that come from ``segment_anything`` (defined there or imported
from another of its modules: ``from segment_anything.predictor import Sam`` works, so it must here), and
its plain data (``sam_model_registry``). Names re-exported at another path must be the same object as
at the path Meta defines them: re-exports, not copies.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import types
from typing import Any

import pytest
import segment_anything

# Deliberate differences, path -> why (none left: utils.onnx.calculate_stability_score, an incidental
# import in Meta's utils/onnx.py, is there as well now).
ALLOW_LIST: dict[str, str] = {}

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_DATA = (dict, list, tuple, str, int, float, bool)


def meta_module_paths() -> list[str]:
    """Every module of Meta's package, relative to it ("" for the package itself)."""
    prefix = "segment_anything."
    return [""] + sorted(
        info.name[len(prefix) :] for info in pkgutil.walk_packages(segment_anything.__path__, prefix)
    )


def absolute(root: str, path: str) -> str:
    return f"{root}.{path}" if path else root


def qualified(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def is_meta_api(value: Any) -> bool:
    if isinstance(value, types.ModuleType):
        return False  # submodules are walked as modules
    if inspect.isclass(value) or inspect.isroutine(value):
        return getattr(value, "__module__", "").startswith("segment_anything")
    return isinstance(value, _DATA)


def kind(value: Any) -> str:
    if inspect.isclass(value):
        return "class"
    if inspect.isroutine(value) or (isinstance(value, types.ModuleType) and callable(value)):
        return "function"  # a callable module stands in for a function (samkit.build_sam, see below)
    return "module" if isinstance(value, types.ModuleType) else "data"


def member_kind(cls: type, name: str) -> str:
    raw = inspect.getattr_static(cls, name)
    for label, typ in (("property", property), ("staticmethod", staticmethod), ("classmethod", classmethod)):
        if isinstance(raw, typ):
            return label
    return "method" if inspect.isroutine(raw) else "data"


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) <= set(b)  # a registry may offer more names
    try:
        return a is b or bool(a == b)
    except Exception:
        return False


def signature_problems(qual: str, meta_fn: Any, our_fn: Any) -> list[tuple[str, str]]:
    """Parameters of Meta's signature that samkit's lacks, takes differently or defaults differently,
    and parameters samkit's requires that Meta's does not have."""
    meta_params = inspect.signature(meta_fn).parameters
    try:
        ours = inspect.signature(our_fn).parameters
    except (TypeError, ValueError):
        return [(qual, "has no inspectable signature")]
    meta_pos = [n for n, p in meta_params.items() if p.kind in _POSITIONAL]
    our_pos = [n for n, p in ours.items() if p.kind in _POSITIONAL]
    problems = []
    for name, p in meta_params.items():
        key = f"{qual}({name})"
        if p.kind in _VARIADIC:
            if not any(q.kind == p.kind for q in ours.values()):
                problems.append((key, f"Meta's takes {p}, samkit's does not"))
            continue
        q = ours.get(name)
        if q is None:
            problems.append((key, "parameter missing"))
            continue
        if p.kind in _POSITIONAL and q.kind not in _POSITIONAL:
            problems.append((key, "keyword-only here, positional in Meta's"))
        elif p.kind in _POSITIONAL and our_pos.index(name) != meta_pos.index(name):
            problems.append((key, f"position {our_pos.index(name)} here, {meta_pos.index(name)} in Meta's"))
        if not same_value(p.default, q.default):
            problems.append((key, f"default {q.default!r} here, {p.default!r} in Meta's"))
    for name, q in ours.items():
        if name not in meta_params and q.kind not in _VARIADIC and q.default is inspect.Parameter.empty:
            problems.append((f"{qual}({name})", "required here, absent in Meta's"))
    return problems


def class_problems(qual: str, meta_cls: type, our_cls: type) -> list[tuple[str, str]]:
    problems = signature_problems(f"{qual}.__init__", meta_cls.__init__, our_cls.__init__)
    names = {n for c in meta_cls.__mro__ if c.__module__.startswith("segment_anything") for n in vars(c)}
    for name in sorted(n for n in names if not n.startswith("_")):
        key = f"{qual}.{name}"
        if not hasattr(our_cls, name):
            problems.append((key, "attribute missing"))
            continue
        meta_kind, our_kind = member_kind(meta_cls, name), member_kind(our_cls, name)
        if meta_kind != our_kind:
            problems.append((key, f"a {our_kind} here, a {meta_kind} in Meta's"))
        elif meta_kind in ("method", "staticmethod", "classmethod"):
            problems += signature_problems(key, getattr(meta_cls, name), getattr(our_cls, name))
        elif meta_kind == "data" and not same_value(getattr(meta_cls, name), getattr(our_cls, name)):
            problems.append((key, f"{getattr(our_cls, name)!r} here, {getattr(meta_cls, name)!r} in Meta's"))
    return problems


def import_or_none(name: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        return None


def api_problems() -> list[tuple[str, str]]:
    """Every difference between Meta's public API and samkit's, as (qualified name, what differs)."""
    problems: list[tuple[str, str]] = []
    for path in meta_module_paths():
        meta_mod = importlib.import_module(absolute("segment_anything", path))
        our_mod = import_or_none(absolute("samkit", path))
        for name, meta_obj in sorted(vars(meta_mod).items()):
            if name.startswith("_") or not is_meta_api(meta_obj):
                continue
            qual = qualified(path, name)
            defined_here = getattr(meta_obj, "__module__", None) == meta_mod.__name__
            if our_mod is None:
                if defined_here:  # a module samkit lacks is reported through the names defined in it
                    problems.append((qual, f"missing: samkit has no module {absolute('samkit', path)}"))
                continue
            ours = getattr(our_mod, name, None)
            if ours is None:
                problems.append((qual, f"missing in {our_mod.__name__}"))
            elif kind(ours) != kind(meta_obj):
                problems.append((qual, f"a {kind(ours)} here, a {kind(meta_obj)} in Meta's"))
            elif kind(meta_obj) == "data":
                if not same_value(meta_obj, ours):
                    problems.append((qual, f"{ours!r} here, {meta_obj!r} in Meta's"))
            elif not defined_here:  # a re-export: must be samkit's object from Meta's defining path
                home = meta_obj.__module__.replace("segment_anything", "samkit", 1)
                home_mod = import_or_none(home)
                home_obj = getattr(home_mod, meta_obj.__name__, None)
                if ours is home_mod:
                    # ``samkit.build_sam`` after ``from samkit.build_sam import ...``: Python set the
                    # package attribute to the module, which is callable as the function it shadows.
                    problems += signature_problems(qual, meta_obj, ours)
                elif home_obj is not None and ours is not home_obj:
                    problems.append((qual, f"not the same object as {home}.{meta_obj.__name__}"))
            elif kind(meta_obj) == "class":
                problems += class_problems(qual, meta_obj, ours)
            else:
                problems += signature_problems(qual, meta_obj, ours)
    return problems


@pytest.fixture(scope="module")
def problems() -> list[tuple[str, str]]:
    return api_problems()


def test_every_meta_name_and_parameter_exists_in_samkit(problems):
    unexpected = [f"{key}: {what}" for key, what in problems if key not in ALLOW_LIST]
    assert not unexpected, "differences from Meta's API:\n" + "\n".join(unexpected)


def test_allow_list_is_current_and_explained(problems):
    seen = {key for key, _ in problems}
    stale = [key for key in ALLOW_LIST if key not in seen]
    assert not stale, f"ALLOW_LIST entries that no longer differ (remove them): {stale}"
    assert all(reason.strip() and "\n" not in reason for reason in ALLOW_LIST.values())


def test_the_walk_finds_differences():
    """The checker itself: a missing parameter, a changed default, keyword-only-ness, an extra required
    parameter and a method that became static are all reported."""

    def meta(a, b=1, *, c=2): ...

    def ours(a, *, b=2, d): ...

    found = [f"{key}: {what}" for key, what in signature_problems("f", meta, ours)]
    assert found == [
        "f(b): keyword-only here, positional in Meta's",
        "f(b): default 2 here, 1 in Meta's",
        "f(c): parameter missing",
        "f(d): required here, absent in Meta's",
    ]
    assert signature_problems("g", lambda x=(1, 2): 0, lambda x=[1, 2]: 0) == []

    class Meta:
        @staticmethod
        def run(x): ...

    class Ours:
        def run(self, x): ...

    Meta.__module__ = "segment_anything.fake"
    assert [k for k, _ in class_problems("C", Meta, Ours)] == ["C.run"]


# ---------------------------------------------------------------------------------------------------
# What a plain ``import`` gives, in fresh interpreters (attributes depend on what was imported before).

_ATTRIBUTES = """
import importlib, json, sys, types
root = importlib.import_module(sys.argv[1])
paths = {}
def walk(module, prefix):
    for name, value in vars(module).items():
        if isinstance(value, types.ModuleType) and value.__name__.startswith(root.__name__ + "."):
            if prefix + name not in paths:
                paths[prefix + name] = "module"
                walk(value, prefix + name + ".")
walk(root, "")
paths["build_sam"] = type(root.build_sam).__name__
print(json.dumps(paths))
"""

# After ``import samkit`` alone, each of Meta's attribute paths is reachable (samkit loads its public
# names and submodules on first use, so that samkit.onnx imports without torch).
_REACHABLE = """
import functools, json, sys, types
import samkit
found = {}
for path in json.loads(sys.argv[1]):
    try:
        value = functools.reduce(getattr, path.split("."), samkit)
    except AttributeError:
        continue
    found[path] = "module" if isinstance(value, types.ModuleType) else type(value).__name__
print(json.dumps(found))
"""


def run_python(code: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_gives_the_same_submodule_attributes_as_meta():
    import json

    meta = json.loads(run_python(_ATTRIBUTES, "segment_anything"))
    ours = json.loads(run_python(_REACHABLE, json.dumps(sorted(meta))))
    assert meta["build_sam"] == ours["build_sam"] == "function"
    missing = sorted(p for p in meta if ours.get(p) != meta[p])
    assert not missing, f"after `import samkit` these are not reachable as in Meta's package: {missing}"


def test_names_meta_modules_import_from_torchvision_are_there_too():
    """Meta's modules also hold the functions they import (torchvision's NMS and box area in
    ``automatic_mask_generator``, its ``resize`` and ``to_pil_image`` in ``utils.transforms``, ``amg``'s
    stability score in ``utils.onnx``): code written against those paths finds them in samkit's
    modules. Python's own helpers (typing.Any, functools.partial, ...) are left out. samkit's NMS
    gives torchvision's indices (tests/test_nms.py); importing the modules loads no torchvision."""
    import importlib
    import inspect
    import pkgutil

    import segment_anything
    import torch

    missing = []
    for info in pkgutil.walk_packages(segment_anything.__path__, "segment_anything."):
        meta = importlib.import_module(info.name)
        ours = importlib.import_module(info.name.replace("segment_anything", "samkit", 1))
        for name, value in vars(meta).items():
            if name.startswith("_") or not (inspect.isfunction(value) or inspect.isclass(value)):
                continue
            if value.__module__.split(".")[0] in ("typing", "functools", "itertools", "copy", "math"):
                continue
            if value is torch.Tensor:
                continue
            if not hasattr(ours, name):
                missing.append(f"{ours.__name__}.{name}")
    assert not missing
    code = """import sys
import samkit.automatic_mask_generator, samkit.utils.transforms, samkit.utils.onnx
assert "torchvision" not in sys.modules
from samkit.utils.transforms import resize, to_pil_image
import torchvision.transforms.functional as F
assert resize is F.resize and to_pil_image is F.to_pil_image
print("ok")
"""
    assert run_python(code).strip() == "ok"


@pytest.mark.parametrize(
    "first",
    ["from samkit.build_sam import build_sam_vit_b", "import samkit; import samkit.build_sam"],
    ids=["module-first", "package-first"],
)
def test_build_sam_is_both_a_module_and_the_vit_h_function(first):
    code = f"""{first}
import sys, torch, samkit
from samkit.build_sam import build_sam_vit_b, sam_model_registry
from samkit.build import build_sam_vit_h, model_size_name
assert isinstance(sys.modules["samkit.build_sam"], type(sys))
# The attribute is the vit_h builder, or (module imported first) the module, which is callable as it.
assert samkit.build_sam in (build_sam_vit_h, sys.modules["samkit.build_sam"])
assert sam_model_registry["vit_b"] is build_sam_vit_b
with torch.device("meta"):  # vit_h's structure without allocating or initialising its weights
    sam = samkit.build_sam(checkpoint=None)
assert model_size_name(sam) == "vit_h", model_size_name(sam)
print("ok")
"""
    assert run_python(code).strip() == "ok"
