"""`samkit predict` and demo/inference_with_prompts.py end to end, offline, with the tiny model.

Every user mistake must end with exit status 2, exactly one `error: ...` line on stderr that names the
culprit, no traceback, and no output directory.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from samkit.commands.main import COMMANDS, main
from samkit.commands.predict import PROMPT_TYPES

REPO = Path(__file__).resolve().parents[1]
ALL_PICTURES = sorted(["point_followup.png"] + [f"{t}.png" for t in PROMPT_TYPES])


@pytest.fixture(scope="session")
def files(tmp_path_factory, photo, tiny_checkpoint):
    """Images (good and bad) and checkpoints (good and bad), written once."""
    from skimage import data

    d = tmp_path_factory.mktemp("cli_files")
    f = SimpleNamespace(dir=d, checkpoint=tiny_checkpoint)
    f.astronaut = d / "astronaut.png"
    Image.fromarray(photo).save(f.astronaut)
    f.camera = d / "camera.png"  # 8-bit grayscale
    Image.fromarray(data.camera()).save(f.camera)
    f.rgba = d / "rgba.png"
    alpha = np.linspace(0, 255, photo.shape[1], dtype=np.uint8)[None, :, None].repeat(photo.shape[0], 0)
    Image.fromarray(np.concatenate([photo, alpha], axis=2), "RGBA").save(f.rgba)
    f.gray16 = d / "gray16.png"
    Image.fromarray(data.camera().astype(np.uint16) * 257).save(f.gray16)
    f.pixel = d / "pixel.png"
    Image.fromarray(np.array([[[200, 30, 40]]], np.uint8)).save(f.pixel)

    f.text_png = d / "notes.png"
    f.text_png.write_text("this is not a picture\n")
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.fromarray(photo).save(png, format="PNG")
    Image.fromarray(photo).save(jpeg, format="JPEG")
    f.truncated_png, f.truncated_jpeg = d / "cut.png", d / "cut.jpg"
    f.truncated_png.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    f.truncated_jpeg.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])

    Image.new("1", (20000, 20000)).save(d / "huge.png")  # 50 kB on disk, 400 megapixels: a decompression bomb
    good = Path(tiny_checkpoint).read_bytes()
    f.truncated_ckpt = d / "cut.pth"
    f.truncated_ckpt.write_bytes(good[: len(good) // 2])
    f.random_ckpt = d / "random.pth"
    f.random_ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    state["image_encoder.patch_embed.proj.bias"] = state["image_encoder.patch_embed.proj.bias"].reshape(8, 8)
    f.reshaped_ckpt = d / "reshaped.pth"
    torch.save(state, f.reshaped_ckpt)
    f.code_marker = d / "pickled_code_ran"
    f.code_ckpt = d / "code.pth"
    torch.save({"model": _RunsCode(str(f.code_marker))}, f.code_ckpt)
    return f


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): a stand-in for a checkpoint carrying malicious code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def predict(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["predict", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, culprit: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert culprit in lines[0], (culprit, lines[0])


def base_args(f, out, **override) -> list[str]:
    args = {
        "--model-type": "vit_tiny",
        "--checkpoint": f.checkpoint,
        "--input": f.astronaut,
        "--output-dir": out,
    }
    args.update(override)
    return [str(x) for kv in args.items() if kv[1] is not None for x in kv]


# ------------------------------------------------------------------ success


@pytest.mark.parametrize("image", ["astronaut", "camera", "rgba", "gray16", "pixel"])
def test_all_prompt_types_on_one_image(files, tmp_path, capsys, image):
    out = tmp_path / "out"
    rc, stdout, err = predict(
        capsys, "--prompt-type", "all", *base_args(files, out, **{"--input": getattr(files, image)})
    )
    assert rc == 0, err
    assert err == ""
    assert sorted(os.listdir(out)) == ALL_PICTURES
    assert stdout.count("wrote ") == len(ALL_PICTURES)
    for name in ALL_PICTURES:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 100


def test_given_points_and_boxes(files, tmp_path, capsys):
    out = tmp_path / "out"
    prompts = [
        "--point",
        "200,120",
        "--point",
        "380,420,1",
        "--box",
        "20,10,360,512",
        "--box",
        "280,340,512,512",
    ]
    rc, _, err = predict(capsys, "--prompt-type", "batch_point_box", *prompts, *base_args(files, out))
    assert rc == 0 and err == ""
    assert os.listdir(out) == ["batch_point_box.png"]
    rc, _, err = predict(capsys, "--prompt-type", "box", *prompts, *base_args(files, out))
    assert rc == 0
    assert err.splitlines() == [
        "note: --point is not used by --prompt-type box",
        "note: --prompt-type box uses only the first of 2 boxes",
    ]


def test_all_with_points_only(files, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = predict(
        capsys, "--prompt-type", "all", "--point", "200,120", "--point", "380,420,0", *base_args(files, out)
    )
    assert rc == 0
    assert err.splitlines() == [
        "note: batch_point_box pairs each --point with a --box; without --box it runs its default prompts"
    ]
    assert sorted(os.listdir(out)) == ALL_PICTURES


def test_tiny_model_runs_without_weights_with_a_warning(files, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = predict(
        capsys,
        "--prompt-type",
        "box",
        *base_args(files, out, **{"--checkpoint": None}),
        "--dtype",
        "bfloat16",
    )
    assert rc == 0
    assert err.splitlines() == ["warning: vit_tiny runs with random weights: its masks are meaningless"]
    assert os.listdir(out) == ["box.png"]


# ------------------------------------------------------------------ user mistakes

BAD_INPUTS = {
    # case: (flags replaced or added, text the one error line must contain)
    "missing file": ({"--input": "{dir}/missing.png"}, "image not found: {dir}/missing.png"),
    "directory": ({"--input": "{dir}"}, "got a directory: {dir}"),
    "text named .png": ({"--input": "{dir}/notes.png"}, "{dir}/notes.png: not an image file"),
    "truncated png": ({"--input": "{dir}/cut.png"}, "cannot read image {dir}/cut.png"),
    "truncated jpeg": ({"--input": "{dir}/cut.jpg"}, "cannot read image {dir}/cut.jpg"),
    "decompression bomb": ({"--input": "{dir}/huge.png"}, "cannot read image {dir}/huge.png: Image size"),
    "point outside": ({"--point": "600,20"}, "point 600,20 is outside the image (width 512, height 512"),
    "negative point": ({"--point": "10,-1"}, "point 10,-1 is outside"),
    "box x1<=x0": ({"--box": "50,10,50,90"}, "box 50,10,50,90: x1 (50) must be greater than x0 (50)"),
    "box y1<=y0": ({"--box": "10,90,50,20"}, "box 10,90,50,20: y1 (20) must be greater than y0 (90)"),
    "box outside": ({"--box": "10,10,600,90"}, "box 10,10,600,90 is outside"),
    "malformed point": ({"--point": "1,2,3,4"}, "--point '1,2,3,4': expected X,Y or X,Y,LABEL"),
    "point label": ({"--point": "1,2,7"}, "--point '1,2,7': label must be 0 (background) or 1"),
    "malformed box": ({"--box": "1,2,3"}, "--box '1,2,3': expected X0,Y0,X1,Y1"),
    "box not numbers": ({"--box": "1,2,x,4"}, "--box '1,2,x,4': 'x' is not a number"),
    "reshaped checkpoint": (
        {"--checkpoint": "{dir}/reshaped.pth"},
        "wrong shape: image_encoder.patch_embed.proj.bias",
    ),
    "truncated checkpoint": ({"--checkpoint": "{dir}/cut.pth"}, "cannot read checkpoint {dir}/cut.pth"),
    "random-bytes checkpoint": (
        {"--checkpoint": "{dir}/random.pth"},
        "cannot read checkpoint {dir}/random.pth",
    ),
    "pickled-code checkpoint": (
        {"--checkpoint": "{dir}/code.pth"},
        "{dir}/code.pth: it contains pickled code",
    ),
    "missing checkpoint": ({"--checkpoint": "{dir}/nope.pth"}, "--checkpoint {dir}/nope.pth: not found"),
    "checkpoint of another size": ({"--model-type": "vit_b"}, "checkpoint is vit_tiny, model is vit_b"),
    "unknown prompt type": ({"--prompt-type": "lasso"}, "argument --prompt-type: invalid choice: 'lasso'"),
    "unknown model type": ({"--model-type": "vit_x"}, "argument --model-type: invalid choice: 'vit_x'"),
    "unknown flag": ({"--colour": "red"}, "unrecognized arguments: --colour red"),
    "bad device": ({"--device": "gpu7"}, "--device 'gpu7'"),
    "pairs disagree": (
        {"--prompt-type": "batch_point_box", "--box": "1,1,9,9"},
        "pairs the i-th --box with the i-th --point: got 1 boxes and 2 points",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_user_mistakes_give_one_line_and_no_files(files, tmp_path, capsys, case):
    flags, culprit = BAD_INPUTS[case]
    flags = {k: v.format(dir=files.dir) for k, v in flags.items()}
    extra = ["--point", "5,5", "--point", "6,6"] if case == "pairs disagree" else []
    out = tmp_path / "out"
    rc, stdout, err = predict(capsys, *base_args(files, out, **flags), *extra)
    assert_one_line_error(rc, err, culprit.format(dir=files.dir))
    assert not out.exists() and stdout == ""
    assert not files.code_marker.exists()


def test_missing_input_flag(capsys):
    rc, _, err = predict(capsys, "--model-type", "vit_tiny")
    assert_one_line_error(rc, err, "the following arguments are required: --input")


def test_no_weights_tells_how_to_get_them(files, tmp_path, capsys):
    rc, _, err = predict(
        capsys, *base_args(files, tmp_path / "out", **{"--model-type": "vit_b", "--checkpoint": None})
    )
    assert_one_line_error(rc, err, "--download")
    assert (
        "--checkpoint PATH" in err
        and "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in err
    )
    assert not (tmp_path / "out").exists()


def test_download_offline_fails_with_one_line(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAMKIT_WEIGHTS_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("SAMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    args = base_args(files, tmp_path / "out", **{"--model-type": "vit_b", "--checkpoint": None})
    rc, _, err = predict(capsys, *args, "--download")
    assert_one_line_error(rc, err, "http://127.0.0.1:9/sam_vit_b_01ec64.pth")
    assert "--checkpoint PATH" in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in (tmp_path / "cache").glob("*") if p.is_file()]


def test_download_of_a_model_without_released_weights(files, tmp_path, capsys):
    rc, _, err = predict(capsys, *base_args(files, tmp_path / "out", **{"--checkpoint": None}), "--download")
    assert_one_line_error(rc, err, "vit_tiny has no released weights")


def test_output_dir_that_is_a_file(files, tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    rc, _, err = predict(capsys, *base_args(files, tmp_path / "taken"))
    assert_one_line_error(rc, err, f"--output-dir {tmp_path / 'taken'}: exists and is not a directory")


def test_a_picture_named_like_the_input_is_refused(files, tmp_path, capsys):
    """``box.png`` in the output directory is the input image: writing the box picture would lose it."""
    image = tmp_path / "box.png"
    image.write_bytes(Path(files.astronaut).read_bytes())
    before = image.read_bytes()
    args = base_args(files, tmp_path, **{"--input": image, "--prompt-type": "box"})
    rc, stdout, err = predict(capsys, *args)
    assert_one_line_error(rc, err, f"--output-dir: {image} is the input image")
    assert stdout == "" and image.read_bytes() == before and os.listdir(tmp_path) == ["box.png"]


# ------------------------------------------------------------------ the console script itself


def test_subcommand_table():
    assert "predict" in COMMANDS
    for add_arguments, run in COMMANDS.values():
        assert callable(add_arguments) and callable(run) and run.__doc__


def test_no_subcommand_help_and_version(capsys):
    assert main([]) == 2
    assert_one_line_error(2, capsys.readouterr().err, "required: COMMAND")
    assert main(["--help"]) == 0
    assert "predict" in capsys.readouterr().out
    assert main(["predict", "--help"]) == 0
    assert "--prompt-type" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("samkit ")


def run_script(*argv) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "demo/inference_with_prompts.py", *(str(a) for a in argv)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_demo_script_runs_from_the_repo_root(files, tmp_path):
    out = tmp_path / "out"
    done = run_script("--prompt-type", "point", *base_args(files, out))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert sorted(os.listdir(out)) == ["point.png", "point_followup.png"]


def test_demo_script_error_is_one_line_without_traceback(files, tmp_path):
    out = tmp_path / "out"
    done = run_script(*base_args(files, out, **{"--checkpoint": files.truncated_ckpt}))
    assert_one_line_error(done.returncode, done.stderr, f"cannot read checkpoint {files.truncated_ckpt}")
    assert not out.exists()
