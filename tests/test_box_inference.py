"""box_inference.py end to end on a real photo with the tiny model: outputs, masks equal to
SamPredictor's, the seed's flag spellings, and user mistakes (exit 2, one line, nothing written)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samkit import SamPredictor, build_model
from samkit.commands.box import amp_dtype, main

REPO = Path(__file__).resolve().parents[1]
BOXES = ["10,20,300,400", "250,300,512,512", "180.5,60,330,250"]  # on the 512x512 astronaut


@pytest.fixture(scope="module")
def astronaut_png(tmp_path_factory, photo) -> Path:
    path = tmp_path_factory.mktemp("box_inference") / "astronaut.png"
    Image.fromarray(photo).save(path)
    return path


def _args(image: Path, out: Path, checkpoint: str, *extra: str) -> list[str]:
    return ["--image-path", str(image), "--output-dir", str(out), "--model-type", "vit_tiny",
            "--checkpoint", checkpoint, *extra]  # fmt: skip


def _load(out: Path, stem: str = "astronaut") -> dict[str, np.ndarray]:
    with np.load(out / f"{stem}_masks.npz") as z:
        return dict(z)


def test_script_writes_picture_and_masks(tmp_path, astronaut_png, tiny_checkpoint, photo):
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "box_inference.py"), *_args(astronaut_png, out, tiny_checkpoint)]
    cmd += ["--box", BOXES[0], "--box-prompt", BOXES[1], "--amp_level=O0", "--mode", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert sorted(os.listdir(out)) == ["astronaut_infer.png", "astronaut_masks.npz"]  # no temporary left
    assert f"wrote {out / 'astronaut_infer.png'}" in result.stdout
    with Image.open(out / "astronaut_infer.png") as picture:
        assert picture.format == "PNG" and min(picture.size) > 100
    saved = _load(out)
    assert saved["masks"].shape == (2, *photo.shape[:2]) and saved["masks"].dtype == bool
    assert saved["iou"].shape == (2,) and saved["iou"].dtype == np.float32
    np.testing.assert_array_equal(saved["boxes"], [[10, 20, 300, 400], [250, 300, 512, 512]])


def test_masks_equal_predict_torch(tmp_path, astronaut_png, tiny_checkpoint, photo, capsys):
    boxes_args = [a for b in BOXES for a in ("--box", b)]
    assert main(_args(astronaut_png, tmp_path, tiny_checkpoint, *boxes_args)) == 0
    saved = _load(tmp_path)

    predictor = SamPredictor(build_model("vit_tiny", tiny_checkpoint))
    predictor.set_image(photo)
    boxes = torch.tensor([[float(v) for v in b.split(",")] for b in BOXES])
    masks, iou, _ = predictor.predict_torch(
        None,
        None,
        boxes=predictor.transform.apply_boxes_torch(boxes, photo.shape[:2]),
        multimask_output=False,
    )
    assert masks.shape == (3, 1, *photo.shape[:2])
    np.testing.assert_array_equal(saved["masks"], masks[:, 0].numpy())
    np.testing.assert_allclose(saved["iou"], iou[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(saved["boxes"], boxes.numpy())
    assert saved["masks"].any(axis=(1, 2)).all()  # the comparison is about real masks, not empty ones
    out = capsys.readouterr().out
    assert all(f"box {b}: predicted IoU" in out for b in BOXES)


def test_amp_level_picks_a_16_bit_dtype(tmp_path, astronaut_png, tiny_checkpoint):
    assert [amp_dtype(level, "cpu") for level in ("O0", "O1", "O2")] == ["float32", "bfloat16", "bfloat16"]
    assert [amp_dtype(level, "cuda") for level in ("O0", "O1", "O2")] == ["float32", "float16", "float16"]
    assert (
        main(_args(astronaut_png, tmp_path, tiny_checkpoint, "--box-prompt", BOXES[2], "--amp-level", "O2"))
        == 0
    )
    saved = _load(tmp_path)
    assert saved["masks"].shape == (1, 512, 512) and np.isfinite(saved["iou"]).all()


def test_results_are_replaced_and_named_after_the_image(tmp_path, photo, tiny_checkpoint):
    image = tmp_path / "my.photo.jpg"
    Image.fromarray(photo).save(image)
    out = tmp_path / "nested" / "out"
    for box in BOXES[:2]:
        assert main(_args(image, out, tiny_checkpoint, "--box", box)) == 0
    assert sorted(os.listdir(out)) == ["my.photo_infer.png", "my.photo_masks.npz"]
    np.testing.assert_array_equal(_load(out, "my.photo")["boxes"], [[250, 300, 512, 512]])


@pytest.mark.parametrize(
    "extra, culprit",
    [
        (["--box", "10,20,300"], "'10,20,300'"),
        (["--box", "10,20,a,40"], "'a' is not a number"),
        (["--box", "10,20,300,600"], "box 10,20,300,600 is outside the image"),
        (["--box", BOXES[0], "--box-prompt=-5,0,10,10"], "box -5,0,10,10 is outside the image"),
        (["--box", "300,20,10,400"], "box 300,20,10,400: x1 (10) must be greater than x0 (300)"),
        (["--box", "10,400,300,20"], "box 10,400,300,20: y1 (20) must be greater than y0 (400)"),
        (
            ["--box", BOXES[0], "--dtype", "float32", "--amp-level", "O1"],
            "--dtype float32 and --amp-level O1",
        ),
        (["--box", BOXES[0], "--amp-level", "O3"], "O3"),
        ([], "--box"),
    ],
)
def test_user_mistakes(tmp_path, astronaut_png, tiny_checkpoint, capsys, extra, culprit):
    out = tmp_path / "out"
    assert main(_args(astronaut_png, out, tiny_checkpoint, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and culprit in err, err
    assert not out.exists()


def test_missing_image_and_checkpoint(tmp_path, astronaut_png, tiny_checkpoint, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "missing.png"
    assert main(_args(missing, out, tiny_checkpoint, "--box", BOXES[0])) == 2
    assert capsys.readouterr().err == f"error: image not found: {missing}\n"
    assert main(_args(astronaut_png, out, str(tmp_path / "nope.pth"), "--box", BOXES[0])) == 2
    assert "nope.pth: not found" in capsys.readouterr().err
    # Without --checkpoint, a model with released weights asks for them instead of running untrained.
    argv = ["--image-path", str(astronaut_png), "--output-dir", str(out), "--box", BOXES[0]]
    assert main(argv) == 2
    assert "no weights for vit_b: pass --download" in capsys.readouterr().err
    assert not out.exists()


def test_output_dir_that_is_a_file(tmp_path, astronaut_png, tiny_checkpoint, capsys):
    out = tmp_path / "taken"
    out.write_text("")
    assert main(_args(astronaut_png, out, tiny_checkpoint, "--box", BOXES[0])) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert out.read_text() == ""
