"""Image + mask folders (samkit.data.masks): label formats, picture bit depths, semantic labels,
pairing errors, the seeded validation split, and training / evaluation from a config in every
prompt mode that runs offline (box, point)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from samkit.data import MaskFolderDataset, build_dataset
from samkit.data.files import normalize_intensity, read_image_array, split_stems
from samkit.data.masks import objects_from_label
from samkit.errors import DatasetError
from samkit.training.config import config_from_dict
from samkit.training.evaluate import run as run_eval
from samkit.training.train import train

from .conftest import SMALL_FRAME
from .owndata import IMAGE_FORMATS, LABEL_FORMATS, make_mask_folder, save_label

ROOT = Path(__file__).resolve().parents[1]
SMALL = 64


@pytest.mark.parametrize("label_format", LABEL_FORMATS)
def test_label_formats_give_the_drawn_objects(label_format, tmp_path):
    root, truth = make_mask_folder(tmp_path, 2, seed=3, label_format=label_format)
    ds = MaskFolderDataset(root, image_size=SMALL, return_original_masks=True)
    assert len(ds) == 2 and ds.categories == {1: "object"}
    for index, stem in enumerate(sorted(truth)):
        _, masks, categories = ds.read_objects(index)
        np.testing.assert_array_equal(masks, truth[stem])
        assert categories.tolist() == [1] * len(truth[stem])
    sample = ds[1]
    k = len(truth["img_01"])
    assert sample["valid"].sum() == k and sample["category_ids"][:k].tolist() == [1] * k
    np.testing.assert_array_equal(sample["original_masks"][:k].numpy(), truth["img_01"])
    # Box prompts: COCO's bbox edges (x0, y0, last column + 1, last row + 1), in the 64 frame.
    ys, xs = np.nonzero(truth["img_01"][0])
    expected = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) * SMALL / 128
    np.testing.assert_allclose(sample["boxes"][0].numpy(), expected, rtol=1e-6)


def test_mask_folders_equal_label_images(tmp_path):
    labels, _ = make_mask_folder(tmp_path / "l", 3, seed=5, layout="labels", image_format="png")
    masks, _ = make_mask_folder(tmp_path / "m", 3, seed=5, layout="masks", image_format="png")
    a = MaskFolderDataset(labels, image_size=SMALL, max_objects=3, seed=1)
    b = MaskFolderDataset(masks, image_size=SMALL, max_objects=3, seed=1)
    for i in range(3):
        sa, sb = a[i], b[i]
        for key in ("image", "boxes", "masks", "valid"):
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("image_format", IMAGE_FORMATS)
def test_picture_formats(image_format, tmp_path):
    root, _ = make_mask_folder(tmp_path, 1, seed=2, image_format=image_format)
    ds = MaskFolderDataset(root, image_size=SMALL)
    path = ds.image_path(0)
    image, _, _ = ds.read_objects(0)
    assert image.dtype == np.uint8 and image.shape == (96, 128, 3)
    raw = read_image_array(path)
    if image_format in ("tif16", "tiff_float"):
        assert raw.dtype in (np.uint16, np.float32) and raw.ndim == 2
        lo, hi = np.percentile(raw.astype(np.float64), [1, 99])
        expected = np.rint(np.clip((raw - lo) * 255 / (hi - lo), 0, 255)).astype(np.uint8)
        np.testing.assert_array_equal(image, np.repeat(expected[..., None], 3, axis=2))
        assert image.min() == 0 and image.max() == 255  # a 12-bit camera's picture is not left dark
    else:
        assert raw.dtype == np.uint8
        np.testing.assert_array_equal(image, raw[..., :3])


def test_percentile_rule_edge_cases():
    flat = np.full((4, 5), 1234, np.uint16)
    assert (normalize_intensity(flat) == 0).all()
    x = np.linspace(0, 1, 101, dtype=np.float32).reshape(1, 101)
    x[0, 50] = np.nan
    out = normalize_intensity(x, (0, 100))
    assert out[0, 0] == 0 and out[0, 100] == 255 and out[0, 50] == 0
    assert out[0, 25] == round(0.25 * 255)


def test_holes_touching_objects_and_semantic_labels():
    label = np.zeros((40, 40), np.uint16)
    label[5:25, 5:25] = 3  # a ring: object 3 with a background hole
    label[10:20, 10:20] = 0
    label[5:25, 25:35] = 7  # touches object 3
    label[30:38, 2:10] = 3  # a second piece of value 3 (occluded object) / a second class-3 component
    label[30:32, 30:32] = 9  # 4 pixels
    masks, categories = objects_from_label(label)
    assert categories.tolist() == [1, 1, 1]
    np.testing.assert_array_equal(masks[0], label == 3)
    assert not masks[0][15, 15] and masks[0][6, 6]  # the hole stays a hole
    assert masks[1].sum() == 200 and not (masks[0] & masks[1]).any()
    sem, classes = objects_from_label(label, semantic=True)
    assert classes.tolist() == [3, 3, 7, 9]
    assert [int(m.sum()) for m in sem] == [400 - 100, 64, 200, 4]


def test_semantic_min_area_and_category_names(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    rng = np.random.default_rng(0)
    label = np.zeros((32, 48), np.uint8)
    label[2:12, 2:12] = 1
    label[20:30, 2:12] = 1  # another component of class 1
    label[2:12, 30:46] = 2
    label[28:30, 40:42] = 2  # 4 pixels: dropped with min_area 5
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(tmp_path / "images" / "a.png")
    save_label(label, tmp_path / "labels" / "a", "palette")
    (tmp_path / "categories.json").write_text('{"1": "nucleus", "2": "membrane"}')
    ds = build_dataset("masks", data_dir=tmp_path, semantic=True, min_area=5, image_size=SMALL)
    _, masks, categories = ds.read_objects(0)
    assert categories.tolist() == [1, 1, 2] and ds.num_objects == 3
    assert ds.categories == {1: "nucleus", 2: "membrane"}
    assert ds[0]["category_ids"][:4].tolist() == [1, 1, 2, -1]


def bad_folder(tmp_path: Path, problem: str) -> tuple[Path, str]:
    """A folder with one mistake, and the text its one-line error must contain."""
    root, _ = make_mask_folder(tmp_path / problem, 3, seed=4)
    if problem == "unpaired_image":
        (root / "labels" / "img_01.png").unlink()
        return root, "image without its label image: " + str(root / "images" / "img_01.jpg")
    if problem == "unpaired_label":
        (root / "images" / "img_02.jpg").unlink()
        return root, "label image without its image: " + str(root / "labels" / "img_02.png")
    if problem == "corrupt_label":
        (root / "labels" / "img_00.png").write_bytes(b"\x89PNG not really")
        return root, f"cannot read label image {root / 'labels' / 'img_00.png'}"
    if problem == "corrupt_image":
        (root / "images" / "img_01.jpg").write_text("hello")
        return root, f"cannot read image {root / 'images' / 'img_01.jpg'}"
    if problem == "empty":
        for p in (root / "labels").iterdir():
            save_label(np.zeros((96, 128), np.uint8), p.with_suffix(""), "png8")
        return root, "no picture with an object"
    if problem == "rgb_label":
        Image.new("RGB", (128, 96)).save(root / "labels" / "img_00.png")
        return root, "must have one channel"
    if problem == "wrong_size":
        save_label(np.ones((50, 50), np.uint8), root / "labels" / "img_02", "png8")
        return root, "labels/img_02.png is 50x50 but its image"
    if problem == "same_stem":
        Image.new("L", (128, 96)).save(root / "labels" / "img_00.tif")
        return root, "two label images with the stem 'img_00'"
    raise ValueError(problem)


PROBLEMS = ["unpaired_image", "unpaired_label", "corrupt_label", "corrupt_image", "empty", "rgb_label"]
PROBLEMS += ["wrong_size", "same_stem"]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_bad_folders_name_the_file(problem, tmp_path):
    root, message = bad_folder(tmp_path, problem)
    with pytest.raises(DatasetError, match=None) as err:
        MaskFolderDataset(root)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_seeded_validation_split():
    stems = [f"s{i:03d}" for i in range(50)]
    train_part = split_stems(stems, 0.2, 0, "train")
    val_part = split_stems(stems, 0.2, 0, "val")
    assert len(val_part) == 10 and sorted(train_part + val_part) == stems
    assert split_stems(list(reversed(stems)), 0.2, 0, "val") == val_part  # the order of listing is irrelevant
    assert split_stems(stems, 0.2, 1, "val") != val_part
    assert split_stems(stems[:2], 0.01, 0, "val") and split_stems(stems[:2], 0.99, 0, "train")


def make_config(root: Path, work_dir: Path, checkpoint: str, **top) -> dict:
    data = {"type": "masks", "data_dir": str(root), "val_fraction": 0.25, "max_objects": 3, "num_workers": 0}
    return {
        "model": {"type": "vit_tiny", "checkpoint": checkpoint, "image_size": SMALL_FRAME},
        "train_data": data,
        "eval_data": {**data, "max_objects": 8},
        "optimizer": {"lr": 1e-3},
        "scheduler": {"warmup_steps": 1},
        "work_dir": str(work_dir),
        "epochs": 1,
        "batch_size": 2,
        "eval_every": 1,
        "log_every": 1,
        "tensorboard": False,
        "progress": False,
        **top,
    }


@pytest.mark.parametrize("mode", ["box", "point"])
def test_train_and_eval_from_a_folder(mode, small_frame_checkpoint, tmp_path):
    root, truth = make_mask_folder(tmp_path / "data", 8, seed=6, size=(64, 80), image_format="tif16")
    top = {"prompt_mode": mode}
    if mode == "point":
        top["point"] = {"num_iter": 2, "mask_only_iter": ["last"]}
        top["max_steps"] = 1  # point rounds cost several decoder passes; one step shows the mode runs
    cfg = config_from_dict(make_config(root, tmp_path / "run", small_frame_checkpoint, **top))
    result = train(cfg)
    val = sorted(split_stems(list(truth), 0.25, 0, "val"))
    objects = sum(len(truth[s]) for s in val)
    assert len(val) == 2
    final = str(tmp_path / "run" / "sam_final.pth")
    again = run_eval(config_from_dict(make_config(root, tmp_path / "eval", final, **top)))
    counts = [v for k, v in again.items() if k.startswith("objects_1024")]
    assert counts and all(c == objects for c in counts)  # exactly the held-out pictures' objects
    if "eval" in result:  # the evaluation at the end of training agrees with eval.py
        for key in ("miou_1024", "miou_original"):
            assert again[key] == pytest.approx(result["eval"][key], abs=1e-6)


def test_command_line_bad_folder_writes_nothing(small_frame_checkpoint, tmp_path):
    root, message = bad_folder(tmp_path, "unpaired_image")
    cfg = make_config(root, tmp_path / "run", small_frame_checkpoint)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "train.py", "-c", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()
