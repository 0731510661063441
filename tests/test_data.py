"""samkit.data: the box-prompt datasets (COCO, SA-1B, FLARE), their sample contract and prompt helpers."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from samkit.build import build_sam_vit_tiny
from samkit.data import (
    CocoDataset,
    FlareDataset,
    Sa1bDataset,
    boxes_from_masks,
    build_dataset,
    choose_objects,
    collate,
    jitter_boxes,
    prepare_image,
    prepare_masks,
)
from samkit.errors import DatasetError
from samkit.utils.image import load_image
from samkit.utils.transforms import ResizeLongestSide

from .datagen import make_coco_dataset, make_flare_slices, make_sa1b_dataset

# pycocotools' own DeprecationWarning under numpy 2 (in the tests' reference decoding).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = 64  # image_size for most tests; the 1024 frame is checked where it matters


@pytest.fixture(scope="module")
def coco_paths(tmp_path_factory):
    return make_coco_dataset(tmp_path_factory.mktemp("coco"), num_images=6, seed=0)


@pytest.fixture(scope="module")
def sa1b_dir(tmp_path_factory):
    return make_sa1b_dataset(tmp_path_factory.mktemp("sa1b"), num_images=4, seed=1)


@pytest.fixture(scope="module")
def flare_dir(tmp_path_factory):
    return make_flare_slices(tmp_path_factory.mktemp("flare"), num_slices=4, seed=2, size=64)


def check_contract(sample: dict, size: int, cap: int, n_valid: int) -> None:
    """The sample contract every dataset must meet."""
    assert sample["image"].shape == (3, size, size) and sample["image"].dtype == torch.float32
    assert sample["boxes"].shape == (cap, 4) and sample["boxes"].dtype == torch.float32
    assert sample["masks"].shape == (cap, size, size) and sample["masks"].dtype == torch.uint8
    assert sample["valid"].shape == (cap,) and sample["valid"].dtype == torch.bool
    assert sample["original_size"].dtype == torch.int64 and sample["input_size"].dtype == torch.int64
    assert isinstance(sample["index"], int)
    height, width = sample["original_size"].tolist()
    h, w = sample["input_size"].tolist()
    assert (h, w) == ResizeLongestSide.get_preprocess_shape(height, width, size)
    valid = sample["valid"]
    assert int(valid.sum()) == n_valid and valid[:n_valid].all()  # a prefix
    boxes, masks = sample["boxes"], sample["masks"]
    assert set(masks.unique().tolist()) <= {0, 1}
    assert (boxes[~valid] == 0).all() and (masks[~valid] == 0).all()
    b = boxes[valid]
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
    assert masks[valid].flatten(1).any(1).all()  # every real object has a target
    assert (masks[:, h:] == 0).all() and (masks[:, :, w:] == 0).all()  # padding
    assert (sample["image"][:, h:] == 0).all() and (sample["image"][:, :, w:] == 0).all()
    if "original_masks" in sample:
        om = sample["original_masks"]
        assert om.shape == (cap, height, width) and om.dtype == torch.uint8
        assert (om[~valid] == 0).all() and om[valid].flatten(1).any(1).all()


def same_sample(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


# ---------------------------------------------------------------------------------------------------
# prompts.py


def test_boxes_from_masks_are_tight_and_contain_every_pixel():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n, h, w = int(rng.integers(1, 5)), int(rng.integers(1, 30)), int(rng.integers(1, 30))
        masks = rng.random((n, h, w)) < rng.uniform(0.0, 0.05)
        boxes = boxes_from_masks(masks)
        assert boxes.shape == (n, 4) and boxes.dtype == np.float64
        for mask, (x0, y0, x1, y1) in zip(masks, boxes):
            if not mask.any():
                assert (x0, y0, x1, y1) == (0, 0, 0, 0)
                continue
            ys, xs = np.nonzero(mask)
            # Tight, with inclusive maxima: each side passes through a mask pixel.
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())
    one = np.zeros((1, 10, 10), np.uint8)
    one[0, 7, 5] = 1
    assert boxes_from_masks(one).tolist() == [[5, 7, 5, 7]]
    with pytest.raises(ValueError, match="NxHxW"):
        boxes_from_masks(one[0])


def test_jitter_boxes_moves_sides_outward_within_bounds():
    rng = np.random.default_rng(1)
    h, w, m = 50, 80, 6
    boxes = np.array([[10, 10, 30, 40], [0, 2, 79, 49], [70, 45, 78, 48]], np.float64)
    seen = set()
    for _ in range(200):
        out = jitter_boxes(boxes, m, (h, w), rng)
        assert out.shape == boxes.shape
        lo = np.maximum(boxes - [m, m, 0, 0], 0)
        hi = np.minimum(boxes + [0, 0, m, m], [w, h, w, h])
        assert (out >= lo).all() and (out <= hi).all()
        assert (out[:, 0::2] <= w).all() and (out[:, 1::2] <= h).all()
        seen.update((out[0] - boxes[0]).astype(int).tolist())
        assert np.array_equal(out, np.round(out))  # whole-pixel offsets
    assert seen == {*range(-m, 0), 0, *range(1, m + 1)}  # every offset occurs, each side outward
    np.testing.assert_array_equal(jitter_boxes(boxes, 0, (h, w), None), boxes)
    np.testing.assert_array_equal(jitter_boxes([[-3, -1, 90, 60]], 0, (h, w), None), [[0, 0, w, h]])


def test_choose_objects_returns_cap_distinct_sorted_indices():
    rng = np.random.default_rng(2)
    for _ in range(50):
        n, cap = int(rng.integers(0, 40)), int(rng.integers(1, 10))
        keep = choose_objects(n, cap, np.random.default_rng([5, n, cap]))
        assert keep.dtype == np.int64
        if n <= cap:
            assert keep.tolist() == list(range(n))
        else:
            assert len(keep) == cap == len(set(keep.tolist()))
            assert (np.diff(keep) > 0).all() and keep.min() >= 0 and keep.max() < n
        again = choose_objects(n, cap, np.random.default_rng([5, n, cap]))
        assert np.array_equal(keep, again)


# ---------------------------------------------------------------------------------------------------
# COCO


def usable_annotations(ann_path, include_crowd: bool) -> dict[int, list[dict]]:
    """Image id -> usable annotations, decided independently of samkit with pycocotools."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_path))
    out = {}
    for image_id in sorted(coco.imgs):
        anns = [
            a
            for a in coco.imgToAnns[image_id]
            if (include_crowd or not a["iscrowd"])
            and a["bbox"][2] > 0
            and a["bbox"][3] > 0
            and coco.annToMask(a).any()
        ]
        if anns:
            out[image_id] = [dict(a, mask=coco.annToMask(a)) for a in anns]
    return out


@pytest.mark.parametrize("include_crowd", [False, True])
def test_coco_samples_follow_annotations(coco_paths, include_crowd):
    image_dir, ann_path = coco_paths
    expected = usable_annotations(ann_path, include_crowd)
    ds = CocoDataset(
        image_dir, ann_path, include_crowd=include_crowd, image_size=SMALL, return_original_masks=True
    )
    assert len(ds) == len(expected) == (5 if include_crowd else 4)  # crowd-only image appears with crowd
    assert ds.image_ids.tolist() == sorted(expected)  # sorted by image id
    assert ds.num_objects == sum(len(v) for v in expected.values())
    crowd_seen = False
    for index, image_id in enumerate(ds.image_ids.tolist()):
        sample = ds[index]
        anns = expected[image_id]
        check_contract(sample, SMALL, 20, len(anns))
        height, width = sample["original_size"].tolist()
        for row, ann in enumerate(anns):
            assert np.array_equal(sample["original_masks"][row].numpy(), ann["mask"])  # == annToMask
            x, y, bw, bh = ann["bbox"]
            box = np.clip([x, y, x + bw, y + bh], 0, [width, height, width, height])
            scaled = ResizeLongestSide(SMALL).apply_boxes(box[None], (height, width))[0]
            np.testing.assert_allclose(sample["boxes"][row].numpy(), scaled, rtol=1e-6)
            crowd_seen |= bool(ann["iscrowd"])
    assert crowd_seen == include_crowd
    assert ds.describe().startswith(f"COCO {len(ds)} images, {ds.num_objects} objects")


def test_image_and_masks_match_the_predictor_frame(coco_paths, flare_dir, tmp_path):
    """At the real 1024 frame: ``image`` is bit for bit the predictor's input, masks follow the rule."""
    sam = build_sam_vit_tiny()
    transform = ResizeLongestSide(1024)
    image_dir, ann_path = coco_paths
    coco = CocoDataset(image_dir, ann_path, max_objects=3, return_original_masks=True)
    sample = coco[1]
    image = load_image(coco.image_info(1)["file"])
    reference = sam.preprocess(torch.as_tensor(np.array(transform.apply_image(image))).permute(2, 0, 1))
    assert torch.equal(sample["image"], reference)
    h, w = sample["input_size"].tolist()
    assert (h, w) == (768, 1024)
    for row in range(int(sample["valid"].sum())):
        soft = F.interpolate(sample["original_masks"][row][None, None].float(), (h, w), mode="bilinear")
        assert torch.equal(sample["masks"][row, :h, :w], (soft[0, 0] >= 0.5).to(torch.uint8))

    # FLARE: a PNG written from the rounded slice gives the predictor the very same input.
    flare = FlareDataset(flare_dir, box_jitter=0)
    raw = np.load(flare_dir / "images" / "CT_Abd_FLARE22_Tr_0001-000.npy")
    png = tmp_path / "slice.png"
    Image.fromarray(np.rint(raw * 255).astype(np.uint8)).save(png)
    pixels = np.array(transform.apply_image(load_image(png)))
    reference = sam.preprocess(torch.as_tensor(pixels).permute(2, 0, 1))
    assert torch.equal(flare[0]["image"], reference)
    assert torch.equal(prepare_image(load_image(png))[0], reference)


def test_masks_shrink_with_antialiasing_and_never_vanish():
    masks = np.zeros((2, 100, 120), np.uint8)
    masks[0, 10:60, 20:90] = 1
    masks[1, 50, 50] = 1  # one pixel: below 0.5 everywhere after a 10x shrink
    out = prepare_masks(masks, (10, 12), 16)
    assert out.shape == (2, 16, 16) and out.dtype == torch.uint8
    soft = F.interpolate(torch.from_numpy(masks[:1]).float()[None], (10, 12), mode="bilinear", antialias=True)
    assert torch.equal(out[0, :10, :12], (soft[0, 0] >= 0.5).to(torch.uint8))
    assert out[1].sum() == 1 and out[1, 5, 5] == 1
    assert (out[:, 10:] == 0).all() and (out[:, :, 12:] == 0).all()


# ---------------------------------------------------------------------------------------------------
# SA-1B


def test_sa1b_filters_masks_by_area(sa1b_dir):
    files = sorted((sa1b_dir / "sa_000000").glob("sa_*.json"))
    records = {f.stem: json.loads(f.read_text()) for f in files}
    ds = Sa1bDataset(sa1b_dir, min_area=200, image_size=SMALL, return_original_masks=True)
    kept = {s: [a for a in r["annotations"] if a["area"] >= 200] for s, r in records.items()}
    kept = {s: v for s, v in kept.items() if v}
    assert ds.num_pairs == 4 and len(ds) == len(kept) == 3  # the 8x8-square image is dropped
    assert ds.num_objects == sum(len(v) for v in kept.values())
    assert sum(len(r["annotations"]) for r in records.values()) > ds.num_objects  # some filtered
    for index, stem in enumerate(sorted(kept)):
        sample = ds[index]
        check_contract(sample, SMALL, 20, len(kept[stem]))
        for row, ann in enumerate(kept[stem]):
            rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
            assert np.array_equal(sample["original_masks"][row].numpy(), mask_utils.decode(rle))
            x, y, w, h = ann["bbox"]
            scaled = ResizeLongestSide(SMALL).apply_boxes(np.array([[x, y, x + w, y + h]]), (96, 128))[0]
            np.testing.assert_allclose(sample["boxes"][row].numpy(), scaled, rtol=1e-6)
    assert len(Sa1bDataset(sa1b_dir, min_area=10, image_size=SMALL)) == 4
    assert ds.describe().startswith("SA-1B 3 images")


# ---------------------------------------------------------------------------------------------------
# FLARE


def test_flare_one_mask_per_label_and_outward_jitter(flare_dir):
    jitter = 5
    ds = FlareDataset(
        flare_dir, box_jitter=jitter, image_size=64, return_original_masks=True
    )  # frame = original
    exact = FlareDataset(flare_dir, box_jitter=0, image_size=64)
    assert len(ds) == 4 and ds.describe() == f"FLARE 4 slices from {flare_dir}"
    offsets = set()
    for index in range(len(ds)):
        label = np.load(ds.paths(index)[1])
        ids = [i for i in np.unique(label) if i != 0]
        tight = boxes_from_masks(np.stack([label == i for i in ids]))
        assert exact[index]["boxes"][: len(ids)].numpy().tolist() == tight.tolist()
        for epoch in range(5):
            ds.set_epoch(epoch)
            sample = ds[index]
            check_contract(sample, 64, 20, len(ids))
            for row, organ in enumerate(ids):
                assert np.array_equal(sample["original_masks"][row].numpy(), label == organ)
            boxes = sample["boxes"][: len(ids)].numpy().astype(np.float64)
            lo = np.maximum(tight - [jitter, jitter, 0, 0], 0)
            hi = np.minimum(tight + [0, 0, jitter, jitter], 64)
            assert (boxes >= lo).all() and (boxes <= hi).all()
            offsets.update(np.abs(boxes - tight).astype(int).ravel().tolist())
    assert offsets == set(range(jitter + 1))


def test_flare_image_is_the_rounded_slice(flare_dir):
    ds = FlareDataset(flare_dir, image_size=SMALL)
    raw = np.load(ds.paths(2)[0])
    expected, _ = prepare_image(np.rint(raw * 255).astype(np.uint8), SMALL)
    assert torch.equal(ds[2]["image"], expected)


# ---------------------------------------------------------------------------------------------------
# Randomness, loading, batching


def build_all(coco_paths, sa1b_dir, flare_dir, **kwargs):
    image_dir, ann_path = coco_paths
    return [
        CocoDataset(image_dir, ann_path, box_jitter=3, **kwargs),
        Sa1bDataset(sa1b_dir, min_area=10, box_jitter=3, **kwargs),
        FlareDataset(flare_dir, **kwargs),
    ]


def test_samples_depend_only_on_seed_epoch_and_index(coco_paths, sa1b_dir, flare_dir):
    first = build_all(coco_paths, sa1b_dir, flare_dir, image_size=SMALL, max_objects=2, seed=7)
    second = build_all(coco_paths, sa1b_dir, flare_dir, image_size=SMALL, max_objects=2, seed=7)
    other_seed = build_all(coco_paths, sa1b_dir, flare_dir, image_size=SMALL, max_objects=2, seed=8)
    for a, b, c in zip(first, second, other_seed):
        b.set_epoch(3)
        later = [b[0]]
        b.set_epoch(0)
        assert same_sample(a[0], b[0]) and same_sample(a[1], b[1])  # fresh object, reverse order
        a.set_epoch(3)
        assert same_sample(a[0], later[0])
        # Over the cap (every first image has >2 objects): the kept subset changes with the epoch.
        subsets = set()
        for epoch in range(8):
            a.set_epoch(epoch)
            subsets.add(a[0]["masks"].numpy().tobytes())
        assert len(subsets) > 1
        a.set_epoch(0)
        assert not all(same_sample(a[i], c[i]) for i in range(len(a)))


@pytest.mark.parametrize("which", [0, 2])
def test_dataloader_workers_give_the_same_batches(coco_paths, sa1b_dir, flare_dir, which):
    ds = build_all(coco_paths, sa1b_dir, flare_dir, image_size=SMALL, max_objects=2, seed=3)[which]
    ds.set_epoch(1)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate)
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) == 2
    for a, b in zip(*batches):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_collate_stacks_tensors_and_lists_original_masks(coco_paths, flare_dir):
    image_dir, ann_path = coco_paths
    coco = CocoDataset(image_dir, ann_path, image_size=SMALL, max_objects=4, return_original_masks=True)
    flare = FlareDataset(flare_dir, image_size=SMALL, max_objects=4, return_original_masks=True)
    batch = collate([coco[0], flare[1], coco[2]])
    assert batch["image"].shape == (3, 3, SMALL, SMALL) and batch["masks"].shape == (3, 4, SMALL, SMALL)
    assert batch["boxes"].shape == (3, 4, 4) and batch["valid"].shape == (3, 4)
    assert batch["original_size"].tolist() == [[96, 128], [64, 64], [96, 128]]
    assert batch["index"].dtype == torch.int64 and batch["index"].tolist() == [0, 1, 2]
    assert isinstance(batch["original_masks"], list)
    assert [tuple(m.shape) for m in batch["original_masks"]] == [(4, 96, 128), (4, 64, 64), (4, 96, 128)]
    assert "original_masks" not in collate([FlareDataset(flare_dir, image_size=SMALL)[0]])


def test_build_dataset_and_argument_checks(flare_dir):
    ds = build_dataset("flare", data_dir=flare_dir, image_size=SMALL)
    assert isinstance(ds, FlareDataset) and ds.box_jitter == 20
    with pytest.raises(ValueError, match="coco, sa1b, flare"):
        build_dataset("voc", data_dir=flare_dir)
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert same_sample(ds[-1], ds[len(ds) - 1])
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)
    with pytest.raises(ValueError, match="max_objects"):
        FlareDataset(flare_dir, max_objects=0)


# ---------------------------------------------------------------------------------------------------
# Errors


def one_line_error(call, *names) -> str:
    with pytest.raises(DatasetError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert os.fspath(name) in message
    return message


def test_errors_name_the_path_at_fault(tmp_path, coco_paths):
    image_dir, ann_path = coco_paths
    missing = tmp_path / "nowhere"
    one_line_error(lambda: CocoDataset(missing, ann_path), missing)
    one_line_error(lambda: CocoDataset(image_dir, missing / "a.json"), missing / "a.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    one_line_error(lambda: CocoDataset(image_dir, bad), bad)
    bad.write_text("[1, 2]")
    one_line_error(lambda: CocoDataset(image_dir, bad), bad)
    one_line_error(lambda: Sa1bDataset(missing), missing)
    one_line_error(lambda: FlareDataset(missing), missing)

    # A COCO image listed but absent.
    data = json.loads(ann_path.read_text())
    data["images"][0]["file_name"] = "gone.jpg"
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(data))
    one_line_error(lambda: CocoDataset(image_dir, moved), image_dir / "gone.jpg")


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("bbox", ["a", 5, 20, 10], "bbox of non-numbers"),
        ("bbox", [float("nan"), 5, 20, 10], "non-finite"),  # json writes NaN; Python reads it back
        ("bbox", [5, 5, float("inf"), 10], "non-finite"),
        ("bbox", None, "no 4-number bbox"),
        ("category_id", "cat", "category_id that is not an integer"),
        ("segmentation", {"size": None, "counts": [100, 50]}, "cannot read the segmentation"),
        ("segmentation", "RLE", "cannot read the segmentation"),
    ],
)
def test_bad_coco_annotations_are_named(tmp_path, coco_paths, field, value, says):
    """Values that were accepted (NaN boxes became NaN prompts and losses) or ended in a traceback
    (ValueError from float() / int()) are a one-line DatasetError naming the annotation and file."""
    image_dir, ann_path = coco_paths
    data = json.loads(ann_path.read_text())
    ann = next(a for a in data["annotations"] if not a.get("iscrowd"))
    ann[field] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    message = one_line_error(lambda: CocoDataset(image_dir, bad), bad)
    assert says in message and f"annotation {ann['id']} " in message


def test_polygons_of_fewer_than_three_points_are_dropped(tmp_path, coco_paths):
    """Label tools export polygons of 1-2 points (and odd lengths); pycocotools reads a first
    polygon of 4 numbers as a box and fails. Such polygons are dropped: an annotation with only
    them is skipped like an empty mask, one with a valid polygon too keeps exactly that polygon's
    mask (annToMask of the valid polygons)."""
    image_dir, ann_path = coco_paths
    data = json.loads(ann_path.read_text())
    anns = [a for a in data["annotations"] if not a.get("iscrowd") and isinstance(a["segmentation"], list)]
    dropped, mixed = anns[0], anns[1]
    dropped["segmentation"] = [[5, 5, 9, 9], [1, 2, 3]]
    valid = mixed["segmentation"]
    mixed["segmentation"] = [[5, 5, 9, 9], *valid, [1, 2, 3, 4, 5]]
    bad = tmp_path / "odd_polygons.json"
    bad.write_text(json.dumps(data))
    base = CocoDataset(image_dir, ann_path, image_size=SMALL, return_original_masks=True)
    ds = CocoDataset(image_dir, bad, image_size=SMALL, return_original_masks=True)
    assert ds.num_objects == base.num_objects - 1
    coco = COCO(str(ann_path))
    index = list(ds.image_ids).index(mixed["image_id"])
    wanted = coco.annToMask({**coco.anns[mixed["id"]], "segmentation": valid})
    masks = ds[index]["original_masks"].numpy()
    assert any(np.array_equal(m, wanted) for m in masks)


def test_an_rle_that_does_not_decode_is_named(tmp_path, coco_paths, sa1b_dir):
    """Runs longer than the image pass pycocotools' area() but fail its decode(), in the loader (a
    ValueError from pycocotools before)."""
    image_dir, ann_path = coco_paths
    data = json.loads(ann_path.read_text())
    image = data["images"][0]
    for ann in data["annotations"]:
        if ann["image_id"] == image["id"] and not ann.get("iscrowd"):
            ann["segmentation"] = {"size": [image["height"], image["width"]], "counts": [10, 10**7]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    dataset = CocoDataset(image_dir, bad)
    index = list(dataset.image_ids).index(image["id"])
    assert "cannot decode the mask" in one_line_error(lambda: dataset[index], bad, image["file_name"])

    copy = tmp_path / "sa1b"
    shutil.copytree(sa1b_dir, copy)
    ann_file = sorted(copy.rglob("sa_*.json"))[0]
    sa = json.loads(ann_file.read_text())
    for ann in sa["annotations"]:
        ann["bbox"] = [1, 2, "w", 4]  # read when the image loads (a TypeError from x + w before)
    ann_file.write_text(json.dumps(sa))
    dataset = Sa1bDataset(copy, min_area=0)
    index = [str(p) for p in dataset._annotations].index(str(ann_file))
    assert "bbox of non-numbers" in one_line_error(lambda: dataset[index], ann_file)


def test_unpaired_files_are_named(tmp_path):
    sa1b = make_sa1b_dataset(tmp_path / "s", num_images=2)
    extra = sa1b / "sa_000000" / "sa_99.jpg"
    extra.write_bytes(b"")
    one_line_error(lambda: Sa1bDataset(sa1b, min_area=10), extra)
    extra.unlink()
    lonely = sa1b / "sa_000000" / "sa_4.json"
    lonely.rename(sa1b / "sa_4.json")  # its image stays in the part folder
    one_line_error(lambda: Sa1bDataset(sa1b, min_area=10), sa1b / "sa_4.json")

    flare = make_flare_slices(tmp_path / "f", num_slices=3)
    name = "CT_Abd_FLARE22_Tr_0001-001.npy"
    (flare / "labels" / name).unlink()
    one_line_error(lambda: FlareDataset(flare), flare / "images" / name)
    os.rename(flare / "images" / name, tmp_path / name)
    bad = np.zeros((64, 64), np.float64)  # a grey slice without its 3 channels
    np.save(flare / "images" / "CT_Abd_FLARE22_Tr_0001-000.npy", bad)
    one_line_error(lambda: FlareDataset(flare)[0], flare / "images" / "CT_Abd_FLARE22_Tr_0001-000.npy")


def test_missing_pycocotools_says_how_to_install(coco_paths, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    message = one_line_error(lambda: CocoDataset(*coco_paths))
    assert "pip install 'samkit[train]'" in message


def test_exif_orientation_does_not_misalign_annotations(tmp_path):
    """COCO and SA-1B annotations refer to the stored pixel grid; a JPEG with an EXIF rotation tag
    must not be turned upright for training (the predictor does turn user photos upright)."""
    image_dir, ann_path = make_coco_dataset(tmp_path / "coco", num_images=4, seed=3)
    info = json.loads(ann_path.read_text())["images"][0]
    path = image_dir / info["file_name"]
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
        exif = im.getexif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
        im.convert("RGB").save(path, exif=exif, quality=95)
    assert load_image(path).shape[:2] == pixels.shape[1::-1]  # upright for users
    dataset = CocoDataset(image_dir, ann_path, image_size=256, return_original_masks=True)
    index = [dataset.image_info(i)["file"] for i in range(len(dataset))].index(str(path))
    sample = dataset[index]  # no size-mismatch error, and the masks are the annotation's
    assert tuple(sample["original_size"].tolist()) == (info["height"], info["width"])


@pytest.mark.parametrize("size", [SMALL, 60])  # 60: rows of masks that do not fill whole bytes
def test_compact_samples_rebuild_the_full_ones_exactly(coco_paths, sa1b_dir, flare_dir, size):
    """train.py and eval.py load compact samples (uint8 image, bit-packed masks) and rebuild them on the
    device: the rebuilt batch equals the full samples' batch bit for bit, for every dataset type."""
    from samkit.data import batch_images, batch_masks, pack_masks, unpack_masks

    full = build_all(coco_paths, sa1b_dir, flare_dir, image_size=size, max_objects=3, seed=5)
    compact = build_all(coco_paths, sa1b_dir, flare_dir, image_size=size, max_objects=3, seed=5, compact=True)
    for ds_full, ds_compact in zip(full, compact):
        a = collate([ds_full[i] for i in range(2)])
        b = collate([ds_compact[i] for i in range(2)])
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (2, 3, size, size)
        assert b["masks"].dtype == torch.uint8 and b["masks"].shape == (2, 3, size, -(-size // 8))
        assert a["masks"].any()  # the comparison is about real masks
        images = batch_images(b, torch.device("cpu"))
        assert images.dtype == torch.float32
        assert torch.equal(images, a["image"])
        assert torch.equal(batch_images(b, torch.device("cpu"), rows=[1]), a["image"][1:])
        assert torch.equal(batch_masks(b, torch.device("cpu")), a["masks"])
        assert torch.equal(batch_masks(a, torch.device("cpu")), a["masks"])  # full samples pass through
        for k in ("boxes", "valid", "original_size", "input_size", "index"):
            assert torch.equal(a[k], b[k])
    masks = (torch.rand(2, 5, 13) > 0.5).to(torch.uint8)
    assert torch.equal(unpack_masks(pack_masks(masks), 13), masks)
