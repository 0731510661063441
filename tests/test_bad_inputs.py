"""The same battery of bad inputs on every command line, as a new user would type them.

Every case must end with exit status 2, exactly one line ``error: ...`` on stderr naming the culprit
(file, flag or config key), no traceback, no new file or folder anywhere (output folders included),
and every input byte-identical afterwards. One test per kind of mistake, parametrised over the
commands; the command lines all run in one subprocess (tests/cli_battery.py runs each through its
real entry point, ``python box_inference.py ...`` or ``python -m samkit amg ...``), since a process
start with torch costs seconds here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from samkit import build_model
from samkit.checkpoints.mindspore import write_mindspore_checkpoint
from samkit.checkpoints.mindspore_names import torch_to_mindspore_names

from .datagen import make_coco_dataset
from .text_helpers import save_tiny_clip

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
COMMANDS = ("predict", "point", "box", "text", "amg-file", "amg-folder", "embed", "export-onnx", "eval")
# Commands whose only file-system risk is their output folder: in the output kinds of the battery.
OUTPUT_ONLY_COMMANDS = ("train", "preprocess-ct")
OUTPUT_FLAGS = {
    "predict": "--output-dir",
    "point": "--output-dir",
    "box": "--output-dir",
    "text": "--output-dir",
    "eval": "eval_output",
    "train": "work_dir",
    "preprocess-ct": "--output-dir",
}
CLIP_DIM = 12  # tests/text_helpers.py's tiny CLIP
# Results named after the image (photo.png) or fixed: a checkpoint there under that name is an input.
CLASHES = {
    "point": "photo_masks.npz",
    "box": "photo_masks.npz",
    "text": "photo_masks.npz",
    "embed": "photo.pt",
    "export-onnx": "encoder.onnx",
}


class _RunsCode:
    """Unpickling this creates ``marker``: a stand-in for a checkpoint carrying malicious code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _read_only_folder(root: Path) -> Path:
    """A folder nothing can be created in. chmod does not stop root, so root gets a folder of a
    file system that refuses new files (/sys); the test is skipped where there is none."""
    if os.geteuid() != 0:
        folder = root / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            (candidate / ".samkit-probe").open("x").close()
        except OSError:
            return candidate
        os.unlink(candidate / ".samkit-probe")
    pytest.skip("no read-only folder on this machine for root")


def make_world(root: Path, tiny_checkpoint: str) -> SimpleNamespace:
    """Good and bad inputs of every kind, in ``root/inputs`` (watched), and an empty working folder."""
    w = SimpleNamespace(root=root, inputs=root / "inputs", cwd=root / "cwd", out=root / "out")
    for d in (w.inputs, w.cwd):
        d.mkdir()
    i = w.inputs
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    w.image = i / "photo.png"
    Image.fromarray(pixels).save(w.image)
    w.folder = i / "photos"
    w.folder.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(w.image, w.folder / name)
    w.empty_folder = i / "no_photos"
    w.empty_folder.mkdir()
    w.empty = i / "empty.png"
    w.empty.write_bytes(b"")
    w.notes_png = i / "notes.png"
    w.notes_png.write_text("this is not a picture\n")
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    w.cut_png = i / "cut.png"
    w.cut_png.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    w.a_dir = i / "a_folder"
    w.a_dir.mkdir()

    w.ckpt = i / "sam_vit_tiny.pth"
    shutil.copy(tiny_checkpoint, w.ckpt)
    torch.manual_seed(0)
    w.text_ckpt = i / "sam_text.pth"
    text_sam = build_model("vit_tiny", text_feature_dim=CLIP_DIM)
    torch.save(text_sam.state_dict(), w.text_ckpt)
    # A fine-tuned file of the seed's port: MindSpore names, with the text branch every one carries.
    w.seed_ckpt = i / "sam_008_coco_box.ckpt"
    write_mindspore_checkpoint(torch_to_mindspore_names(text_sam.state_dict()), w.seed_ckpt)
    w.clip = save_tiny_clip(i / "clip")
    w.notes = i / "notes.txt"
    w.notes.write_text("model: vit_b\nlr: 0.001\n")
    w.empty_ckpt = i / "empty.pth"
    w.empty_ckpt.write_bytes(b"")
    w.random_ckpt = i / "random.pth"
    w.random_ckpt.write_bytes(rng.bytes(4096))
    good = w.ckpt.read_bytes()
    w.cut_ckpt = i / "cut.pth"
    w.cut_ckpt.write_bytes(good[: len(good) // 2])
    w.marker = root / "pickled_code_ran"
    w.code_ckpt = i / "code.pth"  # a plain pickle (protocol 4): torch warns about it before refusing
    w.code_ckpt.write_bytes(pickle.dumps({"model": _RunsCode(str(w.marker))}, protocol=4))

    image_dir, annotations = make_coco_dataset(i / "coco", num_images=2, size=(48, 64), split="val")
    w.coco_images, w.annotations = image_dir, annotations
    w.config = i / "eval.yaml"
    config = {
        "model": {"type": "vit_tiny", "checkpoint": str(w.ckpt)},
        "eval_data": {"type": "coco", "data_dir": str(image_dir), "annotation_path": str(annotations)},
        "work_dir": str(w.out / "work"),
        "amp": "off",
        "progress": False,
    }
    w.config.write_text(yaml.safe_dump(config))
    w.train_config = i / "train.yaml"
    w.train_config.write_text(yaml.safe_dump({**config, "train_data": config["eval_data"], "epochs": 1}))
    w.empty_config = i / "empty.yaml"
    w.empty_config.write_text("")
    w.read_only = _read_only_folder(root)
    # A checkpoint named like a result, in the folder given as output: "output is an input".
    (i / "clash_predict").mkdir()
    shutil.copy(w.image, i / "clash_predict" / "box.png")
    for command, name in CLASHES.items():
        (i / f"clash_{command}").mkdir()
        shutil.copy(w.text_ckpt if command == "text" else w.ckpt, i / f"clash_{command}" / name)
    return w


# ---------------------------------------------------------------------------------------------------
# Each command's line, with one slot changed per case


def command_line(
    command: str,
    w: SimpleNamespace,
    *,
    image: Optional[object] = None,
    checkpoint: Optional[object] = None,
    output: Optional[object] = None,
    model_type: str = "vit_tiny",
    extra: tuple = (),
) -> list[str]:
    """``command``'s line on good inputs, with ``image`` (its main input), ``checkpoint``, ``output`` or
    ``model_type`` replaced, and ``extra`` flags added."""
    out = w.out / command
    if command in ("point", "box", "text"):
        flags = {
            "point": ["point_inference.py", "--point", "10,10"],
            "box": ["box_inference.py", "--box", "5,5,40,30"],
            "text": ["text_inference.py", "--text-prompt", "a red circle", "--text-model", str(w.clip)],
        }[command]
        ckpt = w.text_ckpt if command == "text" else w.ckpt
        line = [*flags, "--image-path", image or w.image, "--output-dir", output or out]
    elif command == "predict":
        line = ["-m", "samkit", "predict", "--prompt-type", "box", "--input", image or w.image]
        line += ["--output-dir", output or out]
        ckpt = w.ckpt
    elif command in ("amg-file", "amg-folder", "embed"):
        name = "embed" if command == "embed" else "amg"
        default_input = w.folder if command == "amg-folder" else w.image
        default_output = out / "picture.png" if command == "amg-file" else out
        line = ["-m", "samkit", name, "--input", image or default_input, "--output", output or default_output]
        line += ["--points-per-side", "2"] if name == "amg" else []
        ckpt = w.ckpt
    elif command == "export-onnx":
        line = ["-m", "samkit", "export-onnx", "--output", output or out]
        ckpt = w.ckpt
    elif command == "train":
        return [str(a) for a in [REPO / "train.py", "-c", w.train_config, "-o", f"work_dir={output or out}"]]
    elif command == "preprocess-ct":
        return [
            str(a)
            for a in ["-m", "samkit", "preprocess-ct", "--input-dir", w.a_dir, "--output-dir", output or out]
        ]
    elif command == "eval":
        overrides = [f"model.type={model_type}", f"eval_output={output or out / 'metrics.json'}"]
        if checkpoint is not None:
            overrides.append(f"model.checkpoint={checkpoint}")
        return [str(a) for a in [REPO / "eval.py", "-c", image or w.config, "-o", *overrides, *extra]]
    else:
        raise ValueError(command)
    if line[0].endswith(".py"):
        line[0] = str(REPO / line[0])
    line += ["--model-type", model_type, "--checkpoint", checkpoint or ckpt, *extra]
    return [str(a) for a in line]


def cases(w: SimpleNamespace) -> dict[str, dict[str, tuple[list[str], list[str]]]]:
    """kind -> command -> (command line, what the one error line must contain)."""
    image_commands = ("predict", "point", "box", "text", "amg-file", "embed")
    kinds: dict[str, dict[str, tuple[list[str], list[str]]]] = {}

    def each(kind: str, make, also: tuple[str, ...] = ()) -> None:
        kinds[kind] = {}
        for command in COMMANDS + also:
            made = make(command)
            if made is not None:
                kinds[kind][command] = made

    # The main input (image, image folder, or eval's config; export's is its checkpoint) missing,
    # empty, not what it is named, truncated, a folder where a file goes.
    def main_input(command: str, image_kind, folder_kind, ckpt_kind, config_kind):
        if command in image_commands:
            path, culprit = image_kind
            return command_line(command, w, image=path), culprit
        if command == "amg-folder":
            path, culprit = folder_kind
            return command_line(command, w, image=path), culprit
        if command == "export-onnx":
            path, culprit = ckpt_kind
            return command_line(command, w, checkpoint=path), culprit
        path, culprit = config_kind
        return command_line(command, w, image=path), culprit

    missing = w.inputs / "missing.png"
    each(
        "missing",
        lambda c: main_input(
            c,
            (missing, [str(missing)]),
            (w.inputs / "missing_folder", [str(w.inputs / "missing_folder"), "not found"]),
            (w.inputs / "missing.pth", [str(w.inputs / "missing.pth"), "not found"]),
            (w.inputs / "missing.yaml", [str(w.inputs / "missing.yaml"), "not found"]),
        ),
    )
    each(
        "empty",
        lambda c: main_input(
            c,
            (w.empty, [str(w.empty)]),
            (w.empty_folder, [str(w.empty_folder), "no images"]),
            (w.empty_ckpt, [str(w.empty_ckpt), "empty"]),
            (w.empty_config, [str(w.empty_config), "no eval_data"]),
        ),
    )
    each(
        "corrupt",
        lambda c: main_input(
            c,
            (w.notes_png, [str(w.notes_png), "not an image"]),
            (w.empty_folder, [str(w.empty_folder)]),  # a folder's unreadable images: test_folder_contract
            (w.random_ckpt, [str(w.random_ckpt), "not a PyTorch (.pth) or MindSpore (.ckpt) file"]),
            (w.image, [str(w.image), "not a YAML config"]),  # eval.py -c picture.png
        ),
    )
    each(
        "truncated",
        lambda c: main_input(
            c,
            (w.cut_png, [f"cannot read image {w.cut_png}"]),
            (w.empty_folder, [str(w.empty_folder)]),
            (w.cut_ckpt, [f"cannot read checkpoint {w.cut_ckpt}"]),
            (w.cut_ckpt, [f"cannot read checkpoint {w.cut_ckpt}"]),  # as model.checkpoint, below
        ),
    )
    kinds["truncated"]["eval"] = (
        command_line("eval", w, checkpoint=w.cut_ckpt),
        [f"cannot read checkpoint {w.cut_ckpt}"],
    )
    del kinds["truncated"]["amg-folder"], kinds["corrupt"]["amg-folder"]  # see test_folder_contract

    def directory_for_file(command: str):
        if command in ("predict", "point", "box", "text"):
            return command_line(command, w, image=w.a_dir), [str(w.a_dir), "directory"]
        if command == "eval":
            return command_line(command, w, image=w.a_dir), [str(w.a_dir)]
        # amg and embed take a folder as --input: the file slot is --checkpoint
        return command_line(command, w, checkpoint=w.a_dir), [f"--checkpoint {w.a_dir}: a directory"]

    each("directory for a file", directory_for_file)
    each(
        "checkpoint of another size",
        lambda c: (
            command_line(c, w, model_type="vit_b"),
            ["checkpoint is vit_tiny, model is vit_b", str(w.text_ckpt if c == "text" else w.ckpt)],
        ),
    )
    each(
        "text file as checkpoint",
        lambda c: (
            command_line(c, w, checkpoint=w.notes),
            [str(w.notes), "it is a text file, not a checkpoint"],
        ),
    )
    each(
        "pickled code",
        lambda c: (
            command_line(c, w, checkpoint=w.code_ckpt),
            [str(w.code_ckpt), "pickled code or objects, which samkit refuses to run"],
        ),
    )

    # A result that would land on an input. Results are named after the image (<stem>_masks.npz,
    # <stem>.pt, encoder.onnx): a checkpoint that happens to sit there under that name is refused.
    def output_is_input(command: str):
        folder = w.inputs / f"clash_{command}"
        if command == "amg-file":
            return command_line(command, w, output=w.image), [f"--output: {w.image} is the input image"]
        if command == "predict":  # box.png, its picture, is the image
            image = folder / "box.png"
            return command_line(command, w, image=image, output=folder), [
                f"--output-dir: {image} is the input image"
            ]
        elif command == "amg-folder":
            line = command_line(command, w, output=w.folder, extra=("--overlay",))
            return line, [f"--output {w.folder} is the input folder"]
        elif command == "eval":
            return None  # its four inputs are cases of their own, below
        flag = "--output-dir" if command in ("point", "box", "text") else "--output"
        clash = folder / CLASHES[command]
        line = command_line(command, w, checkpoint=clash, output=folder)
        line += ["--overwrite"] if command == "export-onnx" else []
        return line, [f"{flag}: {clash} is the checkpoint"]

    each("output is an input", output_is_input)
    for label, slot in (
        ("config", "config"),
        ("checkpoint", "ckpt"),
        ("annotation file", "annotations"),
        ("data folder", "coco_images"),
    ):
        path = getattr(w, slot)
        culprit = (
            [f"eval_output: {path} is the {label}"] if slot != "coco_images" else [str(path), "directory"]
        )
        kinds["output is an input"][f"eval ({label})"] = (command_line("eval", w, output=path), culprit)

    def output_under_file(command: str):
        target = (
            w.image / "sub" / ("x.png" if command == "amg-file" else "x.json" if command == "eval" else "d")
        )
        flag = OUTPUT_FLAGS.get(command, "--output")
        return command_line(command, w, output=target), [f"{flag} {target}", f"{w.image} is a file"]

    each("output under a file", output_under_file, OUTPUT_ONLY_COMMANDS)

    def read_only_output(command: str):
        target = (
            w.read_only
            / "samkit_out"
            / ("x.png" if command == "amg-file" else "x.json" if command == "eval" else "d")
        )
        return command_line(command, w, output=target), [str(target), "cannot write in"]

    each("read-only output", read_only_output, OUTPUT_ONLY_COMMANDS)

    def file_where_folder_goes(command: str):
        if command == "eval":
            return command_line(command, w, output=w.a_dir), [f"eval_output {w.a_dir}: is a directory"]
        if command == "amg-file":
            return None  # an --output without a picture extension is its results folder
        return command_line(command, w, output=w.notes), [str(w.notes), "exists and is not a directory"]

    each("file where a folder goes", file_where_folder_goes, OUTPUT_ONLY_COMMANDS)
    each(
        "unknown flag",
        lambda c: (command_line(c, w, extra=("--colour", "red")), ["unrecognized arguments: --colour red"]),
    )
    kinds["text model of another kind"] = {
        "text": (
            command_line("text", w, extra=("--text-model-type", "blip2")),
            [f"{w.clip} holds a 'clip' model (text model type clip), not a BLIP-2 one"],
        )
    }
    return kinds


def tree_hashes(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def battery(tmp_path_factory, tiny_checkpoint):
    """Every case of every command, run once in one subprocess: (world, cases, results, hashes before)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    w = make_world(root, tiny_checkpoint)
    kinds = cases(w)
    spec_cases = [
        {"id": f"{kind}|{command}", "argv": line}
        for kind, by_command in kinds.items()
        for command, (line, _) in by_command.items()
    ]
    spec_cases += folder_contract_cases(w) + seed_checkpoint_cases(w)
    spec = {"repo": str(REPO), "cwd": str(w.cwd), "watch": [str(root)], "cases": spec_cases}
    spec_path, results_path = (
        root.parent / f"{root.name}_spec.json",
        root.parent / f"{root.name}_results.json",
    )
    spec_path.write_text(json.dumps(spec))
    before = tree_hashes(w.inputs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [PY, str(REPO / "tests" / "cli_battery.py"), str(spec_path), str(results_path)],
        cwd=w.cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(results_path.read_text())
    return SimpleNamespace(world=w, kinds=kinds, results=results, before=before)


def check_refused(battery, kind: str, command: str) -> None:
    line, culprits = battery.kinds[kind][command]
    result = battery.results[f"{kind}|{command}"]
    err = result["stderr"]
    assert "Traceback" not in err, err
    assert result["rc"] == 2, (line, result["rc"], err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (line, err)
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    assert result["stdout"] == "", result["stdout"]
    new = sorted(set(result["after"]) - set(result["before"]))
    gone = sorted(set(result["before"]) - set(result["after"]))
    changed = sorted(
        p for p in result["before"] if p in result["after"] and result["after"][p] != result["before"][p]
    )
    assert (new, gone, changed) == ([], [], []), (line, new, gone, changed)
    assert not battery.world.marker.exists()


KINDS = (
    "missing",
    "empty",
    "corrupt",
    "truncated",
    "directory for a file",
    "checkpoint of another size",
    "text file as checkpoint",
    "pickled code",
    "output is an input",
    "output under a file",
    "read-only output",
    "file where a folder goes",
    "unknown flag",
    "text model of another kind",
)


def _ids(kind: str) -> list[str]:
    # The case lists are built from the world's paths; their command keys do not depend on them.
    by_kind = {
        "corrupt": [c for c in COMMANDS if c != "amg-folder"],
        "truncated": [c for c in COMMANDS if c != "amg-folder"],
        "output is an input": [c for c in COMMANDS if c != "eval"]
        + [f"eval ({x})" for x in ("config", "checkpoint", "annotation file", "data folder")],
        "output under a file": list(COMMANDS + OUTPUT_ONLY_COMMANDS),
        "read-only output": list(COMMANDS + OUTPUT_ONLY_COMMANDS),
        "file where a folder goes": [c for c in COMMANDS + OUTPUT_ONLY_COMMANDS if c != "amg-file"],
        "text model of another kind": ["text"],
    }
    return by_kind.get(kind, list(COMMANDS))


@pytest.mark.parametrize("command", _ids("missing"))
def test_missing_input(battery, command):
    check_refused(battery, "missing", command)


@pytest.mark.parametrize("command", _ids("empty"))
def test_empty_input(battery, command):
    check_refused(battery, "empty", command)


@pytest.mark.parametrize("command", _ids("corrupt"))
def test_corrupt_input(battery, command):
    check_refused(battery, "corrupt", command)


@pytest.mark.parametrize("command", _ids("truncated"))
def test_truncated_input(battery, command):
    check_refused(battery, "truncated", command)


@pytest.mark.parametrize("command", _ids("directory for a file"))
def test_directory_for_a_file(battery, command):
    check_refused(battery, "directory for a file", command)


@pytest.mark.parametrize("command", _ids("checkpoint of another size"))
def test_checkpoint_of_another_size_names_the_file(battery, command):
    check_refused(battery, "checkpoint of another size", command)


@pytest.mark.parametrize("command", _ids("text file as checkpoint"))
def test_text_file_as_checkpoint_is_not_a_checkpoint(battery, command):
    check_refused(battery, "text file as checkpoint", command)


@pytest.mark.parametrize("command", _ids("pickled code"))
def test_pickled_code_is_refused_without_library_warnings(battery, command):
    check_refused(battery, "pickled code", command)


@pytest.mark.parametrize("command", _ids("output is an input"))
def test_output_is_an_input(battery, command):
    check_refused(battery, "output is an input", command)


@pytest.mark.parametrize("command", _ids("output under a file"))
def test_output_under_a_file(battery, command):
    check_refused(battery, "output under a file", command)


@pytest.mark.parametrize("command", _ids("read-only output"))
def test_read_only_output(battery, command):
    check_refused(battery, "read-only output", command)


@pytest.mark.parametrize("command", _ids("file where a folder goes"))
def test_file_where_a_folder_goes(battery, command):
    check_refused(battery, "file where a folder goes", command)


@pytest.mark.parametrize("command", _ids("unknown flag"))
def test_unknown_flag(battery, command):
    check_refused(battery, "unknown flag", command)


def test_text_model_of_another_kind(battery):
    check_refused(battery, "text model of another kind", "text")


def test_battery_covers_every_kind_and_command(battery):
    assert set(battery.kinds) == set(KINDS)
    for kind, by_command in battery.kinds.items():
        assert sorted(by_command) == sorted(_ids(kind)), kind


def test_inputs_are_byte_identical_after_the_whole_battery(battery):
    assert tree_hashes(battery.world.inputs) == battery.before
    assert not list(battery.world.cwd.iterdir()) and not battery.world.out.exists()


# ---------------------------------------------------------------------------------------------------
# Folders: each unreadable image is a warning naming it, the run ends with status 1, nothing is created


def folder_contract_cases(w: SimpleNamespace) -> list[dict]:
    bad = w.inputs / "unreadable_photos"
    bad.mkdir()
    shutil.copy(w.cut_png, bad / "cut.png")
    shutil.copy(w.notes_png, bad / "notes.png")
    (bad / "empty.png").write_bytes(b"")
    return [
        {"id": f"folder|{command}", "argv": command_line(command, w, image=bad)}
        for command in ("amg-folder", "embed")
    ]


@pytest.mark.parametrize("command", ["amg-folder", "embed"])
def test_folder_of_unreadable_images_leaves_no_folder(battery, command):
    result = battery.results[f"folder|{command}"]
    err = result["stderr"]
    assert result["rc"] == 1 and "Traceback" not in err, err
    for name in ("cut.png", "notes.png", "empty.png"):
        assert any(name in line and line.startswith("warning: ") for line in err.splitlines()), (name, err)
    assert err.splitlines()[-1] == "error: 3 of 3 images could not be read", err
    assert not (battery.world.out / command).exists()
    assert set(result["after"]) == set(result["before"])


# ---------------------------------------------------------------------------------------------------
# The seed's fine-tuned .ckpt files (text branch in every one) work in the plain and the text commands


def seed_checkpoint_cases(w: SimpleNamespace) -> list[dict]:
    return [
        {
            "id": f"seed|{command}",
            "argv": command_line(command, w, checkpoint=w.seed_ckpt, output=w.root / "ok" / command),
        }
        for command in ("box", "text")
    ]


def test_seed_checkpoint_runs_in_a_plain_command_with_one_note(battery):
    result = battery.results["seed|box"]
    assert result["rc"] == 0, result["stderr"]
    assert result["stderr"].splitlines() == [
        f"note: {battery.world.seed_ckpt} has a text-prompt branch (text features of size {CLIP_DIM}); this "
        f"plain SAM leaves it out (text prompts: text_inference.py, or build_model(..., "
        f"text_feature_dim={CLIP_DIM}))"
    ]
    assert sorted(os.listdir(battery.world.root / "ok" / "box")) == ["photo_infer.png", "photo_masks.npz"]


def test_seed_checkpoint_gives_the_text_command_its_text_branch(battery):
    result = battery.results["seed|text"]
    assert result["rc"] == 0 and result["stderr"] == "", result["stderr"]
    assert sorted(os.listdir(battery.world.root / "ok" / "text")) == ["photo_infer.png", "photo_masks.npz"]
