"""labelme folders (samkit.data.labelme) and ``samkit convert --to coco`` (samkit.data.coco_export):
shapes rasterised as labelme does, holes from grouped shapes, embedded and linked pictures, label names
as categories, one-line errors; the COCO file loads in pycocotools and trains to the same numbers as
the folder it came from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from samkit.commands.main import main
from samkit.data import CocoDataset, LabelmeDataset, MaskFolderDataset
from samkit.errors import DatasetError
from samkit.training.config import config_from_dict
from samkit.training.evaluate import category_names
from samkit.training.evaluate import run as run_eval
from samkit.training.train import train

from .conftest import SMALL_FRAME
from .owndata import LABELME_NAMES, labelme_file, make_labelme_folder, make_mask_folder, shape

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
SMALL = 64


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_generated_folder_matches_the_drawn_shapes(tmp_path):
    root, truth = make_labelme_folder(tmp_path, 4, seed=2)
    ds = LabelmeDataset(root, image_size=SMALL, return_original_masks=True)
    assert len(ds) == 4 and ds.categories == {i + 1: n for i, n in enumerate(sorted(LABELME_NAMES))}
    assert category_names(ds) == ds.categories  # what the text mode's category-name evaluation reads
    for index, stem in enumerate(sorted(truth)):
        image, masks, ids = ds.read_objects(index)
        assert image.shape == (96, 128, 3) and len(masks) == len(truth[stem])
        for k, mask in enumerate(masks):
            # The outlines' polygons drawn with their outline: ~1 pixel wider than the shape all round.
            scores = [iou(mask, other) for other in truth[stem]]
            assert int(np.argmax(scores)) == k and scores[k] > 0.7, (stem, k, scores)
            assert ds.categories[int(ids[k])] == LABELME_NAMES[k % 3]
    sample = ds[1]
    assert (
        sample["valid"].sum() == len(truth["photo_01"])
        and (sample["category_ids"][sample["valid"]] > 0).all()
    )
    # imagePath pictures are read from disk (the Windows separator in imagePath is understood)
    stored = np.asarray(Image.open(root / "pics" / "photo_01.png"))
    np.testing.assert_array_equal(ds.read_objects(1)[0], stored)


def test_shapes_holes_groups_and_embedded_pictures(tmp_path):
    h, w = 40, 50
    outer = [[5, 5], [30, 5], [30, 30], [5, 30]]
    inner = [[12, 12], [22, 12], [22, 22], [12, 22]]
    shapes = [
        shape("ring", "polygon", outer, group_id=1),
        shape("ring", "polygon", inner, group_id=1),  # a hole through the ring
        shape("box", "rectangle", [[40, 2], [35, 9]]),  # corners in any order
        shape("disc", "circle", [[42, 30], [42, 34]]),
        shape("ring", "polygon", [[33, 33], [38, 33], [38, 38]], group_id=2),  # another ring object
        shape("ruler", "line", [[0, 0], [10, 10]]),  # no area: no object, no category
    ]
    picture = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    labelme_file(tmp_path / "a" / "x.json", shapes, (h, w), picture, None)
    Image.fromarray(picture).save(tmp_path / "b" / "x.png")
    labelme_file(tmp_path / "b" / "x.json", shapes, (h, w), None, "x.png")
    a = LabelmeDataset(tmp_path / "a", image_size=SMALL)
    b = LabelmeDataset(tmp_path / "b", image_size=SMALL)
    image, masks, ids = a.read_objects(0)
    np.testing.assert_array_equal(image, picture)
    assert a.categories == {1: "box", 2: "disc", 3: "ring"} and ids.tolist() == [3, 1, 2, 3]
    ring = masks[0]
    # Both outlines are drawn (labelme's rasterisation), so the hole takes its own outline too.
    assert ring[8, 8] and not ring[17, 17] and ring[5:31, 5:31].sum() == 26 * 26 - 11 * 11
    np.testing.assert_array_equal(np.argwhere(masks[1])[[0, -1]], [[2, 35], [9, 40]])  # inclusive corners
    assert masks[2][30, 42] and masks[2][26, 42] and not masks[2][25, 42] and not masks[2][30, 37]
    for key in ("image", "boxes", "masks", "valid", "category_ids"):
        assert torch.equal(a[0][key], b[0][key]), key


@pytest.mark.parametrize(
    "problem", ["not_labelme", "missing_picture", "size", "bad_data", "bad_type", "bad_points", "empty"]
)
def test_bad_labelme_files_name_the_file(problem, tmp_path):
    good = [shape("a", "polygon", [[1, 1], [8, 1], [8, 8]])]
    pic = np.zeros((10, 12, 3), np.uint8)
    path = tmp_path / "x.json"
    message = str(path)
    if problem == "not_labelme":
        path.write_text('{"images": []}')
        message = f"not a labelme file (no 'shapes' list): {path}"
    elif problem == "missing_picture":
        labelme_file(path, good, (10, 12), None, "gone.png")
        message = f"image {tmp_path / 'gone.png'} of {path} (imagePath) not found"
    elif problem == "size":
        labelme_file(path, good, (20, 12), pic, None)
        message = f"{path} says 20x12 but its image is 10x12"
    elif problem == "bad_data":
        doc = {"shapes": good, "imageData": "aGVsbG8=", "imagePath": "x.png"}  # "hello"
        path.write_text(json.dumps(doc))
        message = f"cannot read image the imageData of {path}"
    elif problem == "bad_type":
        labelme_file(path, [shape("a", "cube", [[1, 1]])], (10, 12), pic, None)
        message = f"shape 0 of {path} has an unknown shape_type 'cube'"
    elif problem == "bad_points":
        labelme_file(path, [shape("a", "polygon", [[1, "x"], [2, 2], [3, 1]])], (10, 12), pic, None)
        message = f"shape 0 of {path} has points that are not [x, y] numbers"
    else:
        labelme_file(path, [], (10, 12), pic, None)
        message = f"no labelme file with an object (of >= 1 pixels) in {tmp_path}"
    with pytest.raises(DatasetError) as err:
        LabelmeDataset(tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def assert_same_samples(a, b) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        sa, sb = a[i], b[i]
        for key in ("image", "boxes", "masks", "valid", "original_size", "category_ids"):
            assert torch.equal(sa[key], sb[key]), (i, key)


@pytest.mark.parametrize("kind", ["masks", "labelme"])
def test_convert_to_coco_gives_the_same_samples(kind, tmp_path, capsys):
    if kind == "masks":
        root, _ = make_mask_folder(tmp_path / "src", 4, seed=8, image_format="tif16", label_format="palette")
        folder = MaskFolderDataset(root, image_size=SMALL, max_objects=3, box_jitter=4, seed=5)
    else:
        root, _ = make_labelme_folder(tmp_path / "src", 4, seed=8)
        folder = LabelmeDataset(root, image_size=SMALL, max_objects=3, box_jitter=4, seed=5)
    out = tmp_path / "coco"
    assert main(["convert", "--to", "coco", str(root), str(out)]) == 0
    assert "-> " + str(out / "instances.json") in capsys.readouterr().out
    coco = COCO(str(out / "instances.json"))  # pycocotools reads it
    assert len(coco.imgs) == len(folder) and len(coco.anns) == folder.num_objects
    for index in range(len(folder)):
        _, masks, ids = folder.read_objects(index)
        anns = coco.imgToAnns[index + 1]
        np.testing.assert_array_equal(np.stack([coco.annToMask(a) for a in anns]), masks)
        assert [a["category_id"] for a in anns] == ids.tolist()
    converted = CocoDataset(
        out / "images", out / "instances.json", image_size=SMALL, max_objects=3, box_jitter=4, seed=5
    )
    assert converted.categories == folder.categories
    for epoch in (0, 1):
        folder.set_epoch(epoch)
        converted.set_epoch(epoch)
        assert_same_samples(folder, converted)


def test_convert_output_trains_to_the_same_numbers(small_frame_checkpoint, tmp_path):
    root, _ = make_mask_folder(tmp_path / "src", 4, seed=9, size=(64, 80), image_format="png")
    out = tmp_path / "coco"
    assert main(["convert", "--to", "coco", str(root), str(out)]) == 0
    runs = {}
    for name, data in [
        ("folder", {"type": "masks", "data_dir": str(root)}),
        (
            "coco",
            {"type": "coco", "data_dir": str(out / "images"), "annotation_path": str(out / "instances.json")},
        ),
    ]:
        data = {**data, "max_objects": 3, "num_workers": 0}
        cfg = {
            "model": {"type": "vit_tiny", "checkpoint": small_frame_checkpoint, "image_size": SMALL_FRAME},
            "train_data": data,
            "eval_data": data,
            "optimizer": {"lr": 1e-3},
            "scheduler": {"warmup_steps": 1},
            "work_dir": str(tmp_path / name),
            "epochs": 1,
            "batch_size": 2,
            "log_every": 1,
            "tensorboard": False,
            "progress": False,
        }
        runs[name] = train(config_from_dict(cfg))
        runs[name + "_weights"] = torch.load(tmp_path / name / "sam_final.pth", weights_only=True)
    scores = [k for k in runs["coco"]["eval"] if k.startswith(("miou", "dice", "objects"))]
    assert scores and all(runs["folder"]["eval"][k] == runs["coco"]["eval"][k] for k in scores)
    losses = [(Path(tmp_path / n / "metrics.jsonl").read_text().splitlines()) for n in ("folder", "coco")]
    assert [json.loads(x).get("loss") for x in losses[0]] == [json.loads(x).get("loss") for x in losses[1]]
    for k, v in runs["folder_weights"].items():
        assert torch.equal(v, runs["coco_weights"][k]), k


@pytest.mark.parametrize(
    "problem", ["unpaired", "corrupt", "empty", "neither", "not_a_folder", "percentiles"]
)
def test_convert_bad_folders_write_nothing(problem, tmp_path, capsys):
    root, _ = make_mask_folder(tmp_path / "src", 3, seed=1)
    flags: list[str] = []
    if problem == "unpaired":
        (root / "labels" / "img_01.png").unlink()
        message = "image without its label image"
    elif problem == "corrupt":
        (root / "images" / "img_02.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # a JPEG header, no data
        message = str(root / "images" / "img_02.jpg")
    elif problem == "empty":
        for p in (root / "images").iterdir():
            p.unlink()
        message = "no image files in"
    elif problem == "neither":
        root = root / "labels"
        message = "neither a mask folder (no images/) nor a labelme folder (no .json files)"
    elif problem == "not_a_folder":
        root = root / "images" / "img_00.jpg"
        message = "not a folder"
    elif problem == "percentiles":
        flags = ["--percentiles", "99", "1"]
        message = "--percentiles must be two numbers 0 <= LOW < HIGH <= 100, got 99 1"
    out = tmp_path / "out"
    assert main(["convert", "--to", "coco", str(root), str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_text_mode_trains_and_evaluates_label_names(small_frame_checkpoint, tmp_path):
    """prompt_mode text (crop features of a tiny random CLIP) on a labelme folder, then the
    category-name evaluation, which prompts with the label names of the held-out pictures."""
    from .text_helpers import save_tiny_clip

    root, _ = make_labelme_folder(tmp_path / "data", 6, seed=4, size=(64, 80))
    clip = save_tiny_clip(tmp_path / "clip")
    data = {
        "type": "labelme",
        "data_dir": str(root),
        "val_fraction": 0.34,
        "max_objects": 3,
        "num_workers": 0,
    }
    cfg = {
        "model": {"type": "vit_tiny", "checkpoint": small_frame_checkpoint, "image_size": SMALL_FRAME},
        "train_data": data,
        "eval_data": {**data, "max_objects": 8},
        "prompt_mode": "text",
        "text": {"encoder": "clip", "model": str(clip), "feature_dim": 12, "min_area": 10},
        "work_dir": str(tmp_path / "run"),
        "epochs": 1,
        "max_steps": 1,
        "batch_size": 2,
        "eval_every": 0,
        "tensorboard": False,
        "progress": False,
    }
    train(config_from_dict(cfg))
    final = str(tmp_path / "run" / "sam_final.pth")
    evaluated = run_eval(config_from_dict({**cfg, "model": {**cfg["model"], "checkpoint": final}}))
    val = LabelmeDataset(root, val_fraction=0.34, subset="val")
    pairs = sum(len(set(val.read_objects(i)[2].tolist())) for i in range(len(val)))
    assert evaluated["objects_1024_category_best"] == pairs > 0
