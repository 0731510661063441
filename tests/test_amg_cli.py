"""`samkit amg` and demo/inference_with_amg.py end to end, offline, with the tiny model.

The random tiny model's masks are poor, so the runs relax the filters (and keep few prompts) to get
a dozen records per image quickly.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from samkit.commands.amg import (
    METADATA_HEADER,
    distinct_colors,
    metadata_rows,
    overlay_masks,
    plan_job,
)
from samkit.commands.main import COMMANDS, main
from samkit.errors import SamkitError

REPO = Path(__file__).resolve().parents[1]
RELAXED = [
    "--points-per-side", "2", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
    "--box-nms-thresh", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def photos(tmp_path_factory, tiny_checkpoint):
    """A folder with two photos, a corrupt 'image' and a file that is not an image; the model flags."""
    from skimage import data

    d = tmp_path_factory.mktemp("amg_photos")
    Image.fromarray(data.chelsea()).save(d / "chelsea.png")
    Image.fromarray(data.coffee()).save(d / "coffee.jpg")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 this is no JPEG")
    (d / "notes.txt").write_text("not an image, not listed\n")
    model = ["--model-type", "vit_tiny", "--checkpoint", tiny_checkpoint, *RELAXED]
    return SimpleNamespace(dir=d, chelsea=d / "chelsea.png", coffee=d / "coffee.jpg", model=model)


def amg(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["amg", *(str(a) for a in argv)])
    return rc, out.getvalue(), err.getvalue()


def lines(text: str) -> list[str]:
    """Lines of output, progress bar redraws ('\\r') split off and blank ones dropped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*")]


@pytest.fixture(scope="module")
def folder_run(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("amg_folder") / "masks"
    rc, stdout, stderr = amg("--input", photos.dir, "--output", out, *photos.model)
    return SimpleNamespace(rc=rc, stdout=stdout, stderr=stderr, out=out)


# ------------------------------------------------------------------ results


def test_single_image_writes_the_overlay_picture(photos, tmp_path):
    picture = tmp_path / "pics" / "amg.png"
    rc, stdout, stderr = amg("--input", photos.chelsea, "--output", picture, *photos.model)
    assert rc == 0, stderr
    assert stderr == ""
    assert stdout.startswith(f"wrote {picture} (")
    drawn, photo = np.asarray(Image.open(picture)), np.asarray(Image.open(photos.chelsea))
    assert drawn.shape == photo.shape and drawn.dtype == np.uint8
    assert (drawn != photo).any()
    assert os.listdir(picture.parent) == ["amg.png"]


def test_folder_skips_the_unreadable_image_and_ends_with_status_1(folder_run, photos):
    assert folder_run.rc == 1, folder_run.stderr
    assert sorted(os.listdir(folder_run.out)) == ["chelsea", "coffee"]
    err = lines(folder_run.stderr)
    warnings = [line for line in err if "warning:" in line]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0], err
    assert err[-1] == "error: 1 of 3 images could not be read"
    assert "Traceback" not in folder_run.stderr
    assert "wrote the results of 2 images" in folder_run.stdout


def test_folder_of_one_unreadable_image_is_not_a_usage_error(photos, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photos.dir / "broken.jpg", folder)
    rc, _, stderr = amg("--input", folder, "--output", tmp_path / "out", *photos.model)
    assert rc == 1, stderr
    assert "broken.jpg" in stderr and lines(stderr)[-1] == "error: 1 of 1 images could not be read"
    assert not (tmp_path / "out").exists()  # nothing was written: no empty folder left behind


def test_mask_pngs_and_metadata_csv_in_metas_layout(folder_run, photos):
    for stem, photo in (("chelsea", photos.chelsea), ("coffee", photos.coffee)):
        folder = folder_run.out / stem
        with open(folder / "metadata.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert ",".join(rows[0]) == METADATA_HEADER
        records = rows[1:]
        assert len(records) > 1
        assert sorted(os.listdir(folder)) == sorted(
            [f"{i}.png" for i in range(len(records))] + ["metadata.csv"]
        )
        height, width = Image.open(photo).size[::-1]
        for row in records:
            i, area, x0, y0, w, h = (int(v) for v in row[:6])
            mask = np.asarray(Image.open(folder / f"{i}.png"))
            assert mask.shape == (height, width) and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}
            assert (mask == 255).sum() == area
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()) == (x0, y0, w, h)
            assert [int(v) for v in row[10:]] == [0, 0, width, height]  # one crop: the whole image
            float(row[8]), float(row[9])  # predicted_iou, stability_score


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools on numpy 2
def test_convert_to_rle_writes_sa1b_json(photos, tmp_path):
    from pycocotools import mask as mask_utils

    out = tmp_path / "json"
    rc, _, stderr = amg("--input", photos.coffee, "--output", out, "--convert-to-rle", *photos.model)
    assert rc == 0, stderr
    assert os.listdir(out) == ["coffee.json"]
    data = json.loads((out / "coffee.json").read_text())
    assert data["image"] == {"image_id": 1, "file_name": "coffee.jpg", "width": 600, "height": 400}
    annotations = data["annotations"]
    assert len(annotations) > 1
    assert [a["id"] for a in annotations] == list(range(len(annotations)))
    for a in annotations:
        assert set(a) == {
            "id", "segmentation", "area", "bbox", "predicted_iou", "stability_score", "point_coords", "crop_box",
        }  # fmt: skip
        assert a["segmentation"]["size"] == [400, 600] and isinstance(a["segmentation"]["counts"], str)
        mask = mask_utils.decode(a["segmentation"])
        assert mask.shape == (400, 600) and int(mask.sum()) == a["area"] > 0
        assert len(a["bbox"]) == 4 and len(a["point_coords"]) == 1 and a["crop_box"] == [0, 0, 600, 400]


def test_sa1b_json_holds_an_empty_masks_nan_stability_as_null():
    """An empty mask's stability score is 0/0 (NaN, as Meta's generator gives; kept when
    stability_score_thresh is 0): the SA-1B file writes null there, so strict JSON parsers read it."""
    from samkit.maskgen.output import sa1b_annotation

    record = {
        "segmentation": {"size": [2, 3], "counts": "6"},
        "area": 0,
        "bbox": [0, 0, 0, 0],
        "predicted_iou": 0.5,
        "stability_score": float("nan"),
        "point_coords": [[1.0, 1.0]],
        "crop_box": [0, 0, 3, 2],
    }
    annotation = sa1b_annotation([record, {**record, "stability_score": 0.75}], 1, "a.png", 3, 2)
    first, second = annotation["annotations"]
    assert first["stability_score"] is None and first["predicted_iou"] == 0.5
    assert second["stability_score"] == 0.75
    json.dumps(annotation, allow_nan=False)


def test_rerun_skips_done_images_and_overwrite_redoes_them(folder_run, photos, tmp_path):
    out = tmp_path / "masks"
    shutil.copytree(folder_run.out, out)  # copy2 keeps the mtimes
    files = sorted(p for p in out.rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    rc, stdout, stderr = amg("--input", photos.dir, "--output", out, *photos.model)
    assert rc == 1, stderr  # broken.jpg is still unreadable
    assert "skipping 2 of 3 images" in stdout
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes

    (out / "chelsea" / "marker").write_text("from before")
    rc, stdout, stderr = amg("--input", photos.chelsea, "--output", out, "--overwrite", *photos.model)
    assert rc == 0, stderr
    assert "skipping" not in stdout
    assert not (out / "chelsea" / "marker").exists()  # the folder was replaced as a whole
    assert (out / "chelsea" / "metadata.csv").read_text() == (
        folder_run.out / "chelsea" / "metadata.csv"
    ).read_text()
    assert (out / "coffee" / "metadata.csv").stat().st_mtime_ns == mtimes[out / "coffee" / "metadata.csv"]
    assert hidden(out) == []


def test_overlay_in_a_directory_run(photos, tmp_path):
    out = tmp_path / "out"
    rc, _, stderr = amg(
        "--input", photos.chelsea, "--output", out, "--overlay", "--convert-to-rle", *photos.model
    )
    assert rc == 0, stderr
    assert sorted(os.listdir(out)) == ["chelsea.json", "chelsea_overlay.png"]
    assert Image.open(out / "chelsea_overlay.png").size == Image.open(photos.chelsea).size


# ------------------------------------------------------------------ interrupts


def _fake_generate(stop_at: int, stop):
    """A stand-in for SamAutomaticMaskGenerator.generate: quick records; calls ``stop()`` at call ``stop_at``."""
    from samkit.utils.amg import coco_encode_rle, mask_to_rle

    calls = []

    def generate(self, image):
        calls.append(1)
        if len(calls) == stop_at:
            stop()
        import torch

        h, w = image.shape[:2]
        masks = torch.zeros(4, h, w, dtype=torch.bool)
        for i in range(4):
            masks[i, 10 * i : 10 * i + 50, 20 * i : 20 * i + 80] = True
        records = []
        for mask, rle in zip(masks, mask_to_rle(masks)):
            seg = coco_encode_rle(rle) if self.output_mode == "coco_rle" else mask.numpy()
            records.append(
                {"segmentation": seg, "area": int(mask.sum()), "bbox": [0, 0, 1, 1], "predicted_iou": 0.9,
                 "point_coords": [[1.0, 2.0]], "stability_score": 0.95, "crop_box": [0, 0, w, h]}
            )  # fmt: skip
        return records

    return generate


def _raise_interrupt():
    raise KeyboardInterrupt


def _send_sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("rle", [False, True], ids=["mask_folder", "json"])
def test_interrupt_between_images_keeps_finished_results_only(photos, tmp_path, monkeypatch, rle):
    from samkit.amg import SamAutomaticMaskGenerator

    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate", _fake_generate(2, _raise_interrupt))
    out = tmp_path / "out"
    rc, _, stderr = amg("--input", photos.dir, "--output", out, *photos.model, *(["--convert-to-rle"] * rle))
    assert rc == 130, stderr
    assert lines(stderr)[-1].startswith("error: interrupted after 1 of 3 images")
    assert "Traceback" not in stderr
    assert sorted(os.listdir(out)) == (["chelsea.json"] if rle else ["chelsea"])  # coffee: nothing, not half
    if rle:
        assert len(json.loads((out / "chelsea.json").read_text())["annotations"]) == 4
    else:
        assert sorted(os.listdir(out / "chelsea")) == ["0.png", "1.png", "2.png", "3.png", "metadata.csv"]
    assert hidden(out) == []


def test_sigterm_is_handled_like_an_interrupt(photos, tmp_path, monkeypatch):
    from samkit.amg import SamAutomaticMaskGenerator

    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate", _fake_generate(2, _send_sigterm))
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    rc, _, stderr = amg("--input", photos.dir, "--output", out, *photos.model)
    assert rc == 143, stderr
    assert lines(stderr)[-1].startswith("error: terminated after 1 of 3 images")
    assert os.listdir(out) == ["chelsea"] and hidden(out) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_interrupt_while_writing_leaves_no_partial_result(photos, tmp_path, monkeypatch):
    import samkit.maskgen.output as amg_output
    from samkit.amg import SamAutomaticMaskGenerator

    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate", _fake_generate(0, _raise_interrupt))
    real_save, saved = amg_output.save_mask_png, []

    def save_then_interrupt(path, mask):
        real_save(path, mask)
        saved.append(path)
        if len(saved) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(amg_output, "save_mask_png", save_then_interrupt)
    out = tmp_path / "out"
    rc, _, stderr = amg("--input", photos.chelsea, "--output", out, *photos.model)
    assert rc == 130, stderr
    assert os.listdir(out) == []  # three PNGs were written, in a temporary folder that is gone

    def dump_then_interrupt(data, f):
        f.write('{"image": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(amg_output.json, "dump", dump_then_interrupt)
    rc, _, stderr = amg("--input", photos.chelsea, "--output", out, "--convert-to-rle", *photos.model)
    assert rc == 130, stderr
    assert os.listdir(out) == []


# ------------------------------------------------------------------ user mistakes


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["--crop-overlap-ratio", "abc"], "--crop-overlap-ratio"),
        (["--pred-iou-thresh", "2"], "--pred-iou-thresh"),
        (["--stability-score-thresh", "nan"], "--stability-score-thresh"),
        (["--points-per-side", "0"], "--points-per-side"),
        (["--points-per-batch", "1.5"], "--points-per-batch"),
        (["--min-mask-region-area", "-1"], "--min-mask-region-area"),
        (
            ["--crop-n-layers", "2", "--crop-n-points-downscale-factor", "2"],
            "--crop-n-points-downscale-factor",
        ),
        (["--input", "no/such/folder"], "no/such/folder"),
        (["--output", "masks.png"], "--output masks.png"),
        (["--device", "nonsense"], "--device"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(photos, tmp_path, argv, culprit):
    defaults = {"--input": str(photos.dir), "--output": str(tmp_path / "out")}
    for flag in ("--input", "--output"):
        if flag in argv:
            defaults.pop(flag)
    given = [x for kv in defaults.items() for x in kv]
    rc, stdout, stderr = amg(*given, *photos.model, *argv)
    assert rc == 2, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert culprit in stderr, stderr
    assert stdout == "" and os.listdir(tmp_path) == []


def test_bad_inputs_and_checkpoint_exit_2_before_writing(photos, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    bad_ckpt = tmp_path / "bad.pth"
    bad_ckpt.write_bytes(b"\x00" * 100)
    out = tmp_path / "out"
    cases = [
        (["--input", empty, "--output", out, *photos.model], "no images"),
        (["--input", photos.dir / "broken.jpg", "--output", out, *photos.model], "broken.jpg"),
        (["--input", photos.dir, *photos.model], "--output"),
        (["--input", photos.dir, "--output", out, *photos.model, "--checkpoint", bad_ckpt], "bad.pth"),
        (["--input", photos.dir, "--output", photos.dir / "notes.txt", *photos.model], "not a directory"),
    ]
    for argv, culprit in cases:
        rc, _, stderr = amg(*argv)
        assert rc == 2 and len(stderr.splitlines()) == 1 and culprit in stderr, (argv, stderr)
        assert not out.exists()


def test_output_picture_that_is_the_input_image_is_refused(photos, tmp_path):
    """``--output`` naming the input image (directly, through ``..`` or a link) would overwrite it."""
    image = tmp_path / "cat.png"
    image.write_bytes(photos.chelsea.read_bytes())
    (tmp_path / "link.png").symlink_to(image)
    before = image.read_bytes()
    for output in (image, tmp_path / "sub" / ".." / "cat.png", tmp_path / "link.png"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        rc, stdout, stderr = amg("--input", image, "--output", output, *photos.model)
        assert rc == 2 and stdout == "", stderr
        assert (
            stderr
            == f"error: --output: {output} is the input image; writing the result there would overwrite it\n"
        )
    assert image.read_bytes() == before


def test_picture_or_directory():
    with pytest.raises(SamkitError, match="not found"):
        plan_job("missing.png", None)
    here = str(REPO / "tests")
    job = plan_job(__file__, None)
    assert job.picture and job.output == "./amg_test.jpg"
    assert plan_job(__file__, "x/out.JPG").picture
    assert not plan_job(__file__, "x/out").picture
    assert not plan_job(__file__, here).picture  # an existing directory, whatever its name
    with pytest.raises(SamkitError, match="folder"):
        plan_job(here, None)


# ------------------------------------------------------------------ pieces


def test_overlay_masks_colours_and_order():
    image = np.full((40, 60, 3), 100, np.uint8)
    big, small = np.zeros((40, 60), bool), np.zeros((40, 60), bool)
    big[5:35, 5:55], small[15:25, 20:40] = True, True
    out = overlay_masks(image, [small, big])
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[~big] == 100).all()  # outside every mask: the photo
    colors = distinct_colors(2)
    assert np.abs(colors[0] - colors[1]).max() > 60
    # The big mask is painted first (colour 0), the small one on top of it (colour 1), inside its outline.
    inside_small = out[20, 30].astype(float)
    expected = (100 * 0.5 + colors[0] * 0.5) * 0.5 + colors[1] * 0.5
    assert np.abs(inside_small - expected).max() <= 1
    assert np.abs(out[5, 30].astype(float) - colors[0]).max() <= 1  # the big mask's outline is opaque
    assert (out[6, 30] != out[5, 30]).any()  # one pixel wide for a small picture
    edge = np.zeros((40, 60), bool)
    edge[:, :10] = True  # touches the image's left, top and bottom sides: no outline there
    out = overlay_masks(image, [edge])
    assert (out[20, 0] == out[20, 5]).all() and (out[0, 5] == out[20, 5]).all()
    assert (out[20, 9] != out[20, 5]).any()


def test_metadata_rows():
    record = {
        "area": 7, "bbox": [1, 2, 3, 4], "point_coords": [[5.5, 6.0]], "predicted_iou": 0.5,
        "stability_score": 0.25, "crop_box": [0, 0, 10, 20],
    }  # fmt: skip
    assert metadata_rows([record]) == [METADATA_HEADER, "0,7,1,2,3,4,5.5,6.0,0.5,0.25,0,0,10,20"]


def test_amg_is_a_samkit_subcommand(capsys):
    assert "amg" in COMMANDS
    assert main(["amg", "--help"]) == 0
    assert "--crop-overlap-ratio X" in capsys.readouterr().out


def test_seed_script_writes_the_picture(photos, tmp_path):
    picture = tmp_path / "amg_test.jpg"
    cmd = [
        sys.executable,
        "demo/inference_with_amg.py",
        "--input",
        str(photos.chelsea),
        "--output",
        str(picture),
    ]
    done = subprocess.run(cmd + photos.model, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    with Image.open(picture) as img:
        assert img.format == "JPEG" and img.size == (451, 300)
    assert os.listdir(tmp_path) == ["amg_test.jpg"]
