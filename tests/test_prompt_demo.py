"""The prompt demo's library side: parsing and checking prompts, defaults, pictures, demo photos."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from samkit import SamPredictor
from samkit.commands.demo_data import main as demo_data_main
from samkit.commands.demo_photos import PHOTOS, load_photo
from samkit.commands.predict import (
    PROMPT_TYPES,
    check_boxes,
    check_points,
    default_prompts,
    parse_box,
    parse_point,
    plan_prompts,
    run_prompt_demo,
)
from samkit.commands.visualize import Panel, save_figure, save_masks
from samkit.errors import PromptError

# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "text, expected",
    [("10,20", (10.0, 20.0, 1)), ("10.5, 20 ,0", (10.5, 20.0, 0)), ("0,0,1", (0.0, 0.0, 1))],
)
def test_parse_point(text, expected):
    assert parse_point(text) == expected


@pytest.mark.parametrize("text", ["1,2,3,4", "1", "", "a,2", "1,2,2", "1,2,-1", "1,2,1.0", "nan,1", "1,inf"])
def test_parse_point_rejects(text):
    with pytest.raises(PromptError, match="--point") as err:
        parse_point(text)
    assert repr(text) in str(err.value) and "\n" not in str(err.value)


def test_parse_box():
    assert parse_box("1, 2,30.5,40") == (1.0, 2.0, 30.5, 40.0)


@pytest.mark.parametrize("text", ["1,2,3", "1,2,3,4,5", "a,b,c,d", "1,2,inf,4", ""])
def test_parse_box_rejects(text):
    with pytest.raises(PromptError, match="--box") as err:
        parse_box(text)
    assert repr(text) in str(err.value)


# ------------------------------------------------------------------ checking against the image


def test_check_points_inside_and_on_the_border():
    check_points([(0, 0, 1), (512, 300, 0), (255.5, 0.5, 1)], (300, 512))


@pytest.mark.parametrize(
    "point, name", [((513, 10, 1), "513,10"), ((-1, 5, 1), "-1,5"), ((5, 300.5, 0), "5,300.5")]
)
def test_check_points_outside(point, name):
    with pytest.raises(PromptError, match=f"point {name} is outside the image"):
        check_points([(1, 1, 1), point], (300, 512))


@pytest.mark.parametrize(
    "box, message",
    [
        ((10, 0, 10, 5), r"box 10,0,10,5: x1 \(10\) must be greater than x0"),
        ((20, 0, 10, 5), r"box 20,0,10,5: x1 \(10\) must be greater than x0"),
        ((0, 5, 10, 5), r"box 0,5,10,5: y1 \(5\) must be greater than y0"),
        ((0, 0, 513, 5), "box 0,0,513,5 is outside the image"),
        ((-2, 0, 10, 5), "box -2,0,10,5 is outside the image"),
    ],
)
def test_check_boxes_rejects(box, message):
    with pytest.raises(PromptError, match=message):
        check_boxes([box], (300, 512))
    check_boxes([(0, 0, 512, 300)], (300, 512))  # the whole image is a valid box


@pytest.mark.parametrize("size", [(512, 512), (1, 1), (1, 1000), (1000, 1), (400, 600)])
@pytest.mark.parametrize("prompt_type", PROMPT_TYPES)
def test_defaults_lie_inside_every_image(prompt_type, size):
    points, boxes = default_prompts(prompt_type, size)
    assert points or boxes
    check_points(points, size)
    check_boxes(boxes, size)
    plan = plan_prompts(prompt_type, None, None, size)
    if prompt_type == "point":
        check_points([plan.followup_point], size)
        assert plan.followup_point[2] == 0


def test_defaults_scale_with_the_image():
    small, _ = default_prompts("batch_point", (100, 200))
    big, _ = default_prompts("batch_point", (1000, 2000))
    np.testing.assert_allclose(np.array(big)[:, :2], 10 * np.array(small)[:, :2])


# ------------------------------------------------------------------ combining given prompts

P1, P2, P3 = (10, 10, 1), (50, 60, 0), (90, 20, 1)
B1, B2 = (0, 0, 40, 40), (50, 50, 99, 99)
SIZE = (100, 100)


def test_plan_point_uses_all_points_as_one_prompt_and_a_far_negative_followup():
    plan = plan_prompts("point", [P1, P3], [B1], SIZE)
    assert plan.points == [P1, P3] and plan.boxes == []
    assert plan.followup_point == (10.0, 90.0, 0)  # the inset corner farthest from both clicks


def test_plan_box_and_point_box_take_the_first_box():
    assert plan_prompts("box", None, [B1, B2], SIZE).boxes == [B1]
    plan = plan_prompts("point_box", [P1, P2], [B2, B1], SIZE)
    assert plan.points == [P1, P2] and plan.boxes == [B2]


def test_plan_point_box_fills_the_missing_kind_with_defaults():
    plan = plan_prompts("point_box", [P2], None, SIZE)
    assert plan.points == [P2] and plan.boxes == default_prompts("point_box", SIZE)[1]


def test_plan_batches():
    assert plan_prompts("batch_point", [P1, P2, P3], None, SIZE).points == [P1, P2, P3]
    assert plan_prompts("batch_box", None, [B1, B2], SIZE).boxes == [B1, B2]
    plan = plan_prompts("batch_point_box", [P1, P3], [B1, B2], SIZE)
    assert plan.points == [P1, P3] and plan.boxes == [B1, B2]
    plan = plan_prompts("batch_point_box", None, [B1, B2], SIZE)
    assert plan.points == [(20, 20, 1), (74.5, 74.5, 1)]  # a foreground click at each box's centre


def test_plan_batch_point_box_counts_must_agree():
    with pytest.raises(PromptError, match="got 2 boxes and 3 points"):
        plan_prompts("batch_point_box", [P1, P2, P3], [B1, B2], SIZE)
    with pytest.raises(PromptError, match="got 1 points and no box"):
        plan_prompts("batch_point_box", [P1], None, SIZE)


def test_plan_checks_every_given_prompt_even_unused_ones():
    with pytest.raises(PromptError, match="box 0,0,200,10 is outside"):
        plan_prompts("point", [P1], [(0, 0, 200, 10)], SIZE)
    with pytest.raises(ValueError, match="unknown prompt type 'lasso'"):
        plan_prompts("lasso", None, None, SIZE)


# ------------------------------------------------------------------ running the demo on a real photo


@pytest.fixture(scope="module")
def astronaut_predictor(tiny_model, photo):
    predictor = SamPredictor(tiny_model)
    predictor.set_image(photo)
    return predictor


def assert_png(path: str, min_size: int = 100) -> None:
    assert os.path.isfile(path), path
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= min_size
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".part")]


@pytest.mark.parametrize("prompt_type", PROMPT_TYPES)
def test_run_prompt_demo_writes_the_picture(astronaut_predictor, photo, tmp_path, prompt_type):
    paths = run_prompt_demo(astronaut_predictor, photo, prompt_type, output_dir=tmp_path / "out")
    names = [os.path.basename(p) for p in paths]
    assert names == (
        ["point.png", "point_followup.png"] if prompt_type == "point" else [f"{prompt_type}.png"]
    )
    for path in paths:
        assert_png(path)
    if prompt_type == "point":  # three masks side by side
        with Image.open(paths[0]) as wide, Image.open(paths[1]) as single:
            assert wide.size[0] > 2.5 * single.size[0]


def test_run_prompt_demo_with_given_prompts(astronaut_predictor, photo, tmp_path):
    points, boxes = [(200, 120, 1), (380, 420, 1)], [(20, 10, 360, 512), (280, 340, 512, 512)]
    for prompt_type in ("point", "point_box", "batch_point_box"):
        for path in run_prompt_demo(astronaut_predictor, photo, prompt_type, points, boxes, tmp_path):
            assert_png(path)
    with pytest.raises(PromptError, match="point 600,10 is outside"):
        run_prompt_demo(astronaut_predictor, photo, "batch_point", [(600, 10, 1)], None, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_run_prompt_demo_embeds_the_image_when_needed(tiny_model, photo, tmp_path):
    predictor = SamPredictor(tiny_model)
    gray = photo[:64, :96, 0]  # HxW grayscale: converted like set_image does
    assert_png(run_prompt_demo(predictor, gray, "box", output_dir=tmp_path)[0])
    assert predictor.original_size == (64, 96)
    with pytest.raises(ValueError, match="reset_image"):
        run_prompt_demo(predictor, photo, "box", output_dir=tmp_path)


# ------------------------------------------------------------------ pictures


def test_masks_are_drawn_in_distinct_visible_colours(tmp_path):
    image = np.zeros((60, 80, 3), np.uint8)
    masks = np.zeros((2, 60, 80), bool)
    masks[0, :, :40] = masks[1, :, 40:] = True
    path = save_masks(tmp_path / "m.png", image, masks, scores=[0.9, 0.8])
    rgb = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
    blue = np.abs(rgb - (15, 72, 128)).sum(1) < 30  # dodger blue at half opacity over black
    orange = np.abs(rgb - (128, 83, 0)).sum(1) < 30
    assert blue.sum() > 1000 and orange.sum() > 1000


def test_points_are_green_and_red_stars(tmp_path):
    image = np.full((100, 100, 3), 128, np.uint8)
    path = save_masks(tmp_path / "p.png", image, None, point_coords=[[25, 50], [75, 50]], point_labels=[1, 0])
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    green = (rgb[..., 1] > 150) & (rgb[..., 0] < 60) & (rgb[..., 2] < 60)
    red = (rgb[..., 0] > 180) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
    w = rgb.shape[1]
    assert green[:, : w // 2].sum() > 50 and green[:, w // 2 :].sum() == 0
    assert red[:, w // 2 :].sum() > 50 and red[:, : w // 2].sum() == 0


def test_save_figure_rows_and_side_by_side(tmp_path):
    image = np.zeros((30, 40, 3), np.uint8)
    masks = np.ones((3, 30, 40), bool)
    one = Panel(masks[:1], [0.5], boxes=[2, 2, 20, 20], title="one")
    save_figure(tmp_path / "rows.png", image, [[one, one], [one]])
    save_masks(tmp_path / "side.png", image, masks, [0.1, 0.2, 0.3], side_by_side=True)
    with Image.open(tmp_path / "rows.png") as rows, Image.open(tmp_path / "side.png") as side:
        assert rows.size[1] > 1.5 * rows.size[0] / 2 and side.size[0] > 2.5 * side.size[1]
    with pytest.raises(ValueError, match="at least one panel"):
        save_figure(tmp_path / "none.png", image, [])


def test_a_failed_save_leaves_the_old_picture_and_no_temp_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    image = np.zeros((20, 20, 3), np.uint8)
    path = tmp_path / "pic.png"
    path.write_bytes(b"old picture")

    def half_then_fail(self, f, **kwargs):
        f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_masks(path, image, np.ones((20, 20), bool))
    assert path.read_bytes() == b"old picture"
    assert os.listdir(tmp_path) == ["pic.png"]


# ------------------------------------------------------------------ demo photos


def test_demo_data_writes_the_photo(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "astronaut.png"
    assert demo_data_main([str(out)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), load_photo("astronaut"))
    assert demo_data_main([str(tmp_path / "coffee.png"), "--name", "coffee"]) == 0
    assert Image.open(tmp_path / "coffee.png").size == (600, 400)
    assert set(PHOTOS) >= {"astronaut", "coffee", "chelsea", "rocket"}
    capsys.readouterr()
    assert demo_data_main([str(tmp_path / "x.png"), "--name", "lena"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --name: invalid choice: 'lena'") and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
