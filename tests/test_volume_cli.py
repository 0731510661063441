"""``samkit volume`` / ``volume_inference.py`` and ``eval.py -o eval_prompt=volume`` (issue 37), on
generated NIfTI scans: the label NIfTI keeps the input's geometry, mistakes give one line and write
nothing, the 3D evaluation is deterministic and the same under torchrun with 2 processes."""

from __future__ import annotations

import gzip
import json
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from samkit.volume.evaluate import tight_box
from samkit.volume.synthetic import synthetic_volume, write_synthetic_dataset

from .test_train import run_cli, torchrun, write_config

SMALL = (12, 48, 56)  # (Z, Y, X): the smallest generated scan, for the command-line tests


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A generated CT stored (X, Y, Z) with a non-diagonal affine and its label (Z, Y, X)."""
    root = tmp_path_factory.mktemp("scan")
    ct, label = synthetic_volume(3, SMALL)
    affine = np.array([[-0.8, 0, 0, 100.0], [0, -0.8, 0, 50.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    image = nib.Nifti1Image(ct.transpose(2, 1, 0).copy(), affine)
    image.header["descrip"] = b"generated for samkit tests"
    path = root / "ct.nii.gz"
    nib.save(image, str(path))
    return path, label


@pytest.fixture(scope="module")
def volume_checkpoint(volume_box_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("volume_ckpt") / "volume_box.pth"
    torch.save(volume_box_model.state_dict(), path)
    return str(path)


def test_volume_command_writes_labels_with_the_scans_geometry(scan, volume_checkpoint, tmp_path):
    path, label = scan
    z = int((label == 1).sum((1, 2)).argmax())
    x0, y0, x1, y1 = (int(v) for v in tight_box(label[z] == 1))
    z2 = int((label == 3).sum((1, 2)).argmax())
    a0, b0, a1, b1 = (int(v) for v in tight_box(label[z2] == 3))
    out = tmp_path / "out"
    done = run_cli([sys.executable, "volume_inference.py", "--input", str(path), "--model-type", "vit_tiny",
                    "--checkpoint", volume_checkpoint, "--box", f"{z},{x0},{y0},{x1},{y1}", "--label", "3",
                    "--box", f"{z2},{a0},{b0},{a1},{b1}", "--output-dir", str(out), "--no-progress"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "label 1: slices" in done.stdout and "label 3: slices" in done.stdout
    written = nib.load(str(out / "ct_labels.nii.gz"))
    source = nib.load(str(path))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    assert written.get_data_dtype() == np.uint8 and written.header["descrip"] == source.header["descrip"]
    labels = np.asarray(written.dataobj).transpose(2, 1, 0)  # back to (Z, Y, X)
    assert set(np.unique(labels)) == {0, 1, 3}
    for organ in (1, 3):
        got, truth = labels == organ, label == organ
        assert 2 * (got & truth).sum() / (got.sum() + truth.sum()) > 0.6
    from PIL import Image

    assert Image.open(out / "ct_montage.png").size[0] > 0


@pytest.fixture(scope="module")
def bad_scans(tmp_path_factory, scan):
    root = tmp_path_factory.mktemp("bad")
    flat = root / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.int16), np.eye(4)), str(flat))
    series = root / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 12, 3), np.int16), np.eye(4)), str(series))
    corrupt = root / "corrupt.nii.gz"
    corrupt.write_bytes(scan[0].read_bytes()[:400])
    notgz = root / "garbage.nii.gz"
    notgz.write_bytes(gzip.compress(b"not a nifti at all" * 30))
    return {"flat": flat, "series": series, "corrupt": corrupt, "garbage": notgz, "good": scan[0]}


@pytest.mark.parametrize(
    "which, prompt, words",
    [
        ("flat", "--box=5,1,1,4,4", "2D image"),
        ("series", "--box=5,1,1,4,4", "4D series"),
        ("corrupt", "--box=5,1,1,4,4", "corrupt.nii.gz"),
        ("garbage", "--box=5,1,1,4,4", "garbage.nii.gz"),
        ("good", "--box=5,10,10,90,20", "box 10,10,90,20"),  # X1 90 > 56 columns
        ("good", "--box=40,1,1,4,4", "slice 40"),
        ("good", "--point=5,3", "--point"),
        ("good", "--label=0", "--label"),
    ],
)
def test_bad_inputs_give_one_line_and_write_nothing(bad_scans, tmp_path, capsys, which, prompt, words):
    from samkit.commands.main import main

    out = tmp_path / "out"
    status = main(["volume", "--input", str(bad_scans[which]), prompt, "--model-type", "vit_tiny",
                   "--output-dir", str(out), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], err
    assert not out.exists()


@pytest.fixture(scope="module")
def volume_folder(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("volumes"), num_cases=2, seed=50, shape=SMALL)


def test_eval_volume_protocol_is_deterministic_and_splits_under_torchrun(
    volume_folder, volume_checkpoint, tmp_path
):
    cfg = {
        "model": {"type": "vit_tiny", "checkpoint": volume_checkpoint},
        "eval_data": {"type": "flare", "data_dir": str(volume_folder), "num_workers": 0},
        "eval_prompt": "volume",
        "eval_batch_size": 4,
        "work_dir": str(tmp_path / "run"),
        "progress": False,
        "device": "cpu",
    }
    path = write_config(tmp_path, cfg)
    outs = [tmp_path / f"eval{i}.json" for i in range(2)]
    done = run_cli([sys.executable, "eval.py", "-c", path, "-o", f"eval_output={outs[0]}"])
    assert done.returncode == 0, done.stderr
    assert "oracle_dice" in done.stdout and "gap_dice" in done.stdout
    two = torchrun("eval.py", "-c", path, "-o", f"eval_output={outs[1]}")
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r3 = (json.loads(o.read_text()) for o in outs)
    # Another run, split over 2 processes, gives every row to the last digit: deterministic.
    assert r1["processes"] == 1 and r3["processes"] == 2
    assert r1["cases"] == r3["cases"] and r1["organs"] == r3["organs"]
    assert len(r1["cases"]) == 8 and sorted(r1["organs"]) == ["1", "2", "3", "4"]
    for key in ("dice", "nsd_1mm", "nsd_2mm", "oracle_dice", "oracle_nsd_1mm", "oracle_nsd_2mm", "gap_dice"):
        assert r1[key] == pytest.approx(r3[key], abs=1e-9)
    assert 0 < r1["dice"] <= 100 and r1["oracle_dice"] > 50


def test_train_refuses_the_volume_protocol_before_training(tmp_path, small_frame_checkpoint):
    """``eval_prompt: volume`` scores NIfTI scans with eval.py; train.py says so before any step."""
    from samkit.errors import ConfigError
    from samkit.training.config import config_from_dict
    from samkit.training.train import train

    from .datagen import make_coco_dataset
    from .test_train import make_config

    images, annotations = make_coco_dataset(tmp_path / "coco", num_images=4, seed=0)
    data = {"train": (str(images), str(annotations)), "val": (str(images), str(annotations))}
    cfg = make_config(data, tmp_path / "run", small_frame_checkpoint, eval_every=1, eval_prompt="volume", batch_size=2,
                      **{"model.image_size": 256})  # fmt: skip
    with pytest.raises(ConfigError, match="eval_prompt volume"):
        train(config_from_dict(cfg))
    assert not list((tmp_path / "run").glob("**/*.pth"))
