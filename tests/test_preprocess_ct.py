"""FLARE22 preprocessing (samkit.data.ct_preprocess, scripts/preprocess_CT_MR_dataset.py) on synthetic NIfTI.

Most runs use --image-size 64, the generator's slice size, so that resizing is the identity and the
outputs can be compared exactly with the generator's known cleaned labels; one run uses 1024.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from samkit.commands.preprocess_ct import main as preprocess_main
from samkit.data import ct_preprocess as ctp
from samkit.errors import DatasetError
from tests.nifti_gen import case_name, make_flare_nifti, synthetic_case, write_nifti

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "preprocess_CT_MR_dataset.py"
FAST = ["--image-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def flare5(tmp_path_factory) -> Path:
    return make_flare_nifti(tmp_path_factory.mktemp("flare5"), num_cases=5)


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = preprocess_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def npy_names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def leftovers(out: Path) -> list[Path]:
    """Temporary files of interrupted writes: hidden ``.<name>.tmp-XXXX`` anywhere under ``out``."""
    return [p for p in out.rglob(".*") if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------------
# Pure functions


def test_window_ct_numbers():
    hu = np.array([-1000, -160, -60, 40, 240, 1500], dtype=np.int16)
    # Clipped to [-160, 240], rescaled by (x + 160) / 400 * 255 and truncated like np.uint8().
    assert ctp.window_ct(hu).tolist() == [0, 0, 63, 127, 255, 255]
    assert ctp.window_ct(hu).dtype == np.uint8
    assert ctp.window_ct(np.array([0, 50, 100, 1000]), level=50, width=100).tolist() == [0, 127, 255, 255]
    # The rescale uses the clipped volume's own range (the seed's rule), and a constant volume is 0.
    assert ctp.window_ct(np.array([0, 100]), 40, 400).tolist() == [0, 255]
    assert not ctp.window_ct(np.full((2, 3, 4), 500)).any()


def test_normalize_mr_keeps_background_zero():
    volume = np.zeros((4, 10, 10))
    volume[:, 2:8, 2:8] = np.linspace(10, 1000, 4 * 36).reshape(4, 6, 6)
    out = ctp.normalize_mr(volume)
    assert out.dtype == np.uint8 and out.shape == volume.shape
    assert not out[volume == 0].any() and out.max() == 255 and out[volume > 0].min() == 0
    assert not ctp.normalize_mr(np.zeros((2, 2, 2))).any()


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_nan_voxels_give_zero_and_leave_the_rest_alone(modality):
    """A NaN voxel (outside a scan's field of view) made the whole volume 0: min/max were NaN."""
    rng = np.random.default_rng(5)
    volume = rng.uniform(-1000, 1500, (3, 16, 16)) if modality == "CT" else rng.uniform(1, 900, (3, 16, 16))
    volume[0, :2] = 0  # MR background
    convert = ctp.window_ct if modality == "CT" else ctp.normalize_mr
    bad = volume.copy()
    bad[1, 4:6, 7] = np.nan
    out = convert(bad)
    assert (out[1, 4:6, 7] == 0).all()
    rest = ~np.isnan(bad)
    if modality == "MR":  # the percentiles come from the finite foreground: the same without those voxels
        volume[1, 4:6, 7] = 0
    np.testing.assert_array_equal(out[rest], convert(volume)[rest])
    assert out[rest].max() == 255
    assert not convert(np.full((2, 2), np.nan)).any()


def test_remove_small_components_3d_connectivity_and_ids():
    label = np.zeros((6, 6, 6), dtype=np.uint8)
    label[0:2, 0:2, 0:2] = 1  # 8 voxels
    label[2:4, 2:4, 2:4] = 1  # 8 voxels meeting the first block at one corner only
    label[4:6, 4:6, 0:2] = 2  # 8 voxels of id 2 ...
    label[4:6, 4:6, 2:4] = 3  # ... face to face with 8 of id 3: ids never merge
    kept = ctp.remove_small_components_3d(label, 16, connectivity=26)
    assert (kept == np.where(label == 1, 1, 0)).all()  # 26: the corner joins 8 + 8 = 16, not < 16
    assert not ctp.remove_small_components_3d(label, 16, connectivity=6).any()
    assert not ctp.remove_small_components_3d(label, 16, connectivity=18).any()  # a corner is not an edge
    assert (ctp.remove_small_components_3d(label, 8) == label).all()  # exactly min_size stays
    assert (ctp.remove_small_components_3d(label, 0) == label).all()
    assert label[0, 0, 0] == 1  # the input is left alone
    with pytest.raises(ValueError):
        ctp.remove_small_components_3d(label, 10, connectivity=8)


def test_remove_small_components_2d_connectivity_per_slice():
    label = np.zeros((3, 6, 6), dtype=np.uint8)
    label[0, 0:2, 0:2] = 5  # 4 pixels ...
    label[0, 2:4, 2:4] = 5  # ... and 4 touching them diagonally: one 8-connected component of 8
    label[1, 0:2, 0:2] = 7  # 4 pixels on each of two slices: 8 voxels in 3D, but slices are apart
    label[2, 0:2, 0:2] = 7
    assert (ctp.remove_small_components_2d(label, 8) == np.where(label == 5, 5, 0)).all()
    assert not ctp.remove_small_components_2d(label, 8, connectivity=4).any()
    assert (ctp.remove_small_components_2d(label[0], 8) == label[0]).all()  # a single (Y, X) slice
    assert not ctp.remove_small_components_2d(label[0], 9).any()
    with pytest.raises(ValueError):
        ctp.remove_small_components_2d(label, 8, connectivity=26)


def test_clean_labels_and_labelled_slices():
    label = np.zeros((5, 20, 20), dtype=np.uint8)
    label[1:4, 0:12, 0:12] = 12  # large, but dropped
    label[1:4, 0:10, 12:20] = 3  # 240 voxels, 80 pixels per slice
    label[4, 15:20, 15:20] = 4  # 25 voxels: under min_volume
    assert not ctp.clean_labels(label, (12,), min_volume=100, min_area=10)[:, :, :12].any()
    cleaned = ctp.clean_labels(label, (12,), min_volume=100, min_area=10)
    assert set(np.unique(cleaned)) == {0, 3} and cleaned[4].sum() == 0
    assert ctp.labelled_slices(cleaned).tolist() == [1, 2, 3]
    assert not ctp.clean_labels(label, (12,), min_volume=100, min_area=81).any()  # 80 < 81 per slice
    kept = ctp.clean_labels(label, (), min_volume=0, min_area=0)
    assert (kept == label).all() and ctp.labelled_slices(kept).tolist() == [1, 2, 3, 4]


def test_resize_slice_matches_the_seeds_three_channel_resize():
    from skimage.transform import resize

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 30)).astype(np.uint8)
    label = np.zeros((40, 30), dtype=np.uint8)
    label[10:30, 5:20] = 9
    out, out_label = ctp.resize_slice(image, label, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.float64 and out.min() == 0 and out.max() == 1
    assert out_label.shape == (64, 64) and out_label.dtype == np.uint8
    assert set(np.unique(out_label)) == {0, 9}
    seed = resize(np.repeat(image[:, :, None], 3, axis=-1), (64, 64, 3), order=3, preserve_range=True,
                  mode="constant", anti_aliasing=True)  # fmt: skip
    seed = (seed - seed.min()) / np.clip(seed.max() - seed.min(), 1e-8, None)
    np.testing.assert_allclose(out, seed, atol=1e-9)
    flat, _ = ctp.resize_slice(np.full((8, 8), 77, np.uint8), label[:8, :8], 16)
    assert flat.shape == (16, 16, 3) and not flat.any()


@pytest.mark.parametrize("shape", [(48, 48), (37, 61), (1, 5), (64, 64), (90, 70)])
def test_resize_slice_equals_skimage_resize_up_and_down(shape):
    """Upsampling runs as matrix products and index lookups: the same values as skimage's resize
    (image to 1e-12, labels exactly); downsampling (90 -> 64, anti-aliased) calls resize itself."""
    from skimage.transform import resize

    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, shape).astype(np.uint8)
    label = rng.integers(0, 14, shape).astype(np.uint8)
    out, out_label = ctp.resize_slice(image, label, 64)
    ref = resize(image, (64, 64), order=3, mode="constant", preserve_range=True, anti_aliasing=True)
    ref = (ref - ref.min()) / max(ref.max() - ref.min(), 1e-8)
    np.testing.assert_allclose(out, np.repeat(ref[:, :, None], 3, axis=2), rtol=0, atol=1e-12)
    ref_label = resize(label, (64, 64), order=0, mode="constant", preserve_range=True, anti_aliasing=False)
    np.testing.assert_array_equal(out_label, ref_label.astype(np.uint8))


def test_load_nifti_zyx_rows_are_y(tmp_path):
    xyz = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    write_nifti(tmp_path / "v.nii.gz", xyz)
    zyx = ctp.load_nifti_zyx(tmp_path / "v.nii.gz")
    assert zyx.shape == (7, 6, 5) and zyx.dtype == np.int16
    assert zyx[3, 4, 2] == xyz[2, 4, 3]  # [z, y, x] = nibabel's [x, y, z]


def test_split_cases_first_80_percent_train():
    def sizes(n, fraction=0.2):
        split = ctp.split_cases(list(range(n)), fraction)
        assert split["train"] + split["val"] == list(range(n))  # by order, nothing lost
        return len(split["train"]), len(split["val"])

    assert sizes(50) == (40, 10)  # FLARE22: the seed's 40 training cases
    assert sizes(5) == (4, 1) and sizes(3) == (2, 1) and sizes(10, 0.3) == (7, 3)
    assert sizes(4, 0) == (4, 0) and sizes(4, 1) == (0, 4)


def test_pair_cases_warns_about_unpaired_files(tmp_path):
    root = make_flare_nifti(tmp_path / "d", num_cases=2)
    (root / "images" / "FLARE22_Tr_0099_0000.nii.gz").write_bytes(b"")
    (root / "labels" / "FLARE22_Tr_0077.nii.gz").write_bytes(b"")
    (root / "labels" / "._FLARE22_Tr_0001.nii.gz").write_bytes(b"")  # macOS litter: ignored
    cases, warnings = ctp.pair_cases(root)
    assert [c.name for c in cases] == [case_name(0), case_name(1)]
    assert cases[0].image == root / "images" / "FLARE22_Tr_0001_0000.nii.gz"
    assert len(warnings) == 2
    assert "FLARE22_Tr_0099_0000.nii.gz has no label" in warnings[0]
    assert "FLARE22_Tr_0077.nii.gz has no image" in warnings[1]
    with pytest.raises(DatasetError, match="labels"):
        ctp.pair_cases(tmp_path / "nowhere")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "labels").mkdir()
    with pytest.raises(DatasetError, match="no label"):
        ctp.pair_cases(tmp_path / "empty")


def test_uncompressed_nii_cases_pair_too(tmp_path, capsys):
    """Volumes saved as .nii (uncompressed) next to .nii.gz ones are cases too: they were left out
    without a word. A case present as both keeps the .nii.gz file, with a warning; end to end the
    .nii case gives the same slices as the .nii.gz one it copies."""
    import nibabel as nib

    root = make_flare_nifti(tmp_path / "d", num_cases=3)
    for folder, suffix in (("images", "_0000"), ("labels", "")):
        old = root / folder / f"{case_name(2)}{suffix}.nii.gz"
        nib.save(nib.load(old), root / folder / f"{case_name(2)}{suffix}.nii")  # same volume, uncompressed
        old.unlink()
        twin = root / folder / f"{case_name(0)}{suffix}.nii"
        nib.save(nib.load(root / folder / f"{case_name(0)}{suffix}.nii.gz"), twin)
    cases, warnings = ctp.pair_cases(root)
    assert [c.name for c in cases] == [case_name(i) for i in range(3)]
    assert cases[0].image.name.endswith("_0000.nii.gz") and cases[0].label.name.endswith(".nii.gz")
    assert cases[2].image.name == f"{case_name(2)}_0000.nii" and cases[2].label.name == f"{case_name(2)}.nii"
    assert len(warnings) == 2 and all("is left out" in w and ".nii " in w for w in warnings)
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "--input-dir", root, "--output-dir", out, "--val-fraction", "0", *FAST)
    assert code == 0, err
    ct, _, clean = synthetic_case(0, 2)
    kept = [z for z in range(clean.shape[2]) if clean[..., z].any()]
    names = [n for n in npy_names(out / "train" / "labels") if case_name(2) in n]
    assert len(names) == len(kept) > 0
    for name, z in zip(names, kept):
        assert (np.load(out / "train" / "labels" / name) == clean[..., z].T).all()


# ---------------------------------------------------------------------------------------------------
# The script end to end


def test_script_end_to_end(flare5, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--input-dir", flare5, "--output-dir", out, "--image-size", "64"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "train: " in done.stdout and "val: " in done.stdout

    # 5 cases: the first 4 train, the last val; for each, only the slices with a label after cleanup.
    for index in range(5):
        split = "train" if index < 4 else "val"
        ct, _, clean = synthetic_case(0, index)
        clean_zyx, ct_zyx = clean.transpose(2, 1, 0), ct.transpose(2, 1, 0)
        kept = [z for z in range(clean_zyx.shape[0]) if clean_zyx[z].any()]
        windowed = ctp.window_ct(ct_zyx)
        names = [f"CT_Abd_{case_name(index)}-{i:03d}.npy" for i in range(len(kept))]
        listed = [n for n in npy_names(out / split / "images") if case_name(index) in n]
        assert listed == names
        for name, z in zip(names, kept):
            image = np.load(out / split / "images" / name)
            label = np.load(out / split / "labels" / name)
            assert image.shape == (64, 64, 3) and image.dtype == np.float64
            assert image.min() == 0 and image.max() == 1 and (image[..., 0] == image[..., 2]).all()
            assert label.shape == (64, 64) and label.dtype == np.uint8
            assert (label == clean_zyx[z]).all()  # no id 12, no small component; rows = Y
            expected = (windowed[z] - windowed[z].min()) / (windowed[z].max() - windowed[z].min())
            np.testing.assert_allclose(image[..., 0], expected, atol=1e-9)
    for split in ("train", "val"):
        assert npy_names(out / split / "labels") == npy_names(out / split / "images")
    assert not leftovers(out)


def test_script_missing_folder_is_one_line_exit_2(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--input-dir", tmp_path / "nope", "--output-dir", tmp_path / "o"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0], done.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--val-fraction", "1.5", "between 0"),
        ("--image-size", "0", "at least 1"),
        ("--min-area", "x", "expected a number"),
        ("--modality", "PET", "invalid choice"),
        ("--window-level", "nan", "expected a finite number"),  # said "must be at least -inf"
        ("--window-width", "inf", "expected a finite number"),  # said "must be at least 1e-06, got inf"
    ],
)
def test_bad_flag_values_exit_2(tmp_path, capsys, flag, value, says):
    code, out, err = run_main(capsys, "--input-dir", tmp_path, flag, value)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and flag in err and says in err and "Traceback" not in err


def test_default_folders_are_the_seeds(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_flare_nifti(tmp_path / "datasets" / "FLARE22Train", num_cases=2)
    code, out, err = run_main(capsys, *FAST)
    assert code == 0, err
    train = tmp_path / "datasets" / "FLARE22Train_processed" / "train" / "images"
    assert npy_names(train)[0] == "CT_Abd_FLARE22_Tr_0001-000.npy"


def test_rerun_skips_overwrite_rewrites(flare5, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--input-dir", flare5, "--output-dir", out, *FAST]
    assert run_main(capsys, *args)[0] == 0
    files = sorted(out.rglob("*.npy"))
    marked = files[-1]
    np.save(marked, np.zeros(1))  # a mark that only a rewrite removes

    code, stdout, _ = run_main(capsys, *args)
    assert code == 0 and "4 case(s) done before" in stdout and "0 slices of 0 case(s)" in stdout
    assert np.load(marked).shape == (1,)

    code, stdout, _ = run_main(capsys, *args, "--overwrite")
    assert code == 0 and "done before" not in stdout
    assert sorted(out.rglob("*.npy")) == files and np.load(marked).shape == (64, 64)

    # A case with an output file missing is done again.
    files[0].unlink()
    code, stdout, _ = run_main(capsys, *args)
    assert code == 0 and files[0].exists() and "3 case(s) done before" in stdout


def test_changed_settings_redo_cases_and_remove_stale_slices(flare5, tmp_path, capsys):
    out = tmp_path / "out"
    keep12 = ["--drop-labels"]  # no ids dropped: the duodenum-only last slice is kept too
    assert run_main(capsys, "--input-dir", flare5, "--output-dir", out, *keep12, *FAST)[0] == 0
    assert any(12 in np.load(p) for p in (out / "train" / "labels").iterdir())
    assert (
        run_main(capsys, "--input-dir", flare5, "--output-dir", out, "--val-fraction", "0.5", *FAST)[0] == 0
    )
    # 5 cases at 0.5: 2 train, 3 val; the third case moved and its train slices are gone.
    assert not [n for n in npy_names(out / "train" / "images") if case_name(2) in n]
    assert [n for n in npy_names(out / "val" / "images") if case_name(2) in n]
    # The slices kept for id 12 alone are gone too.
    cleaned = [synthetic_case(0, i)[2] for i in range(5)]
    assert len(list(out.rglob("*.npy"))) == 2 * sum(c.any(axis=(0, 1)).sum() for c in cleaned)
    for p in (out / "val" / "labels").iterdir():
        assert 12 not in np.load(p)
    marker = json.loads((out / ".done" / f"{case_name(2)}.json").read_text())
    assert marker["split"] == "val" and marker["settings"]["drop_labels"] == [12]


def test_unpaired_files_warn_and_the_rest_runs(tmp_path, capsys):
    root = make_flare_nifti(tmp_path / "d", num_cases=2)
    os.replace(root / "labels" / f"{case_name(1)}.nii.gz", root / "labels" / "FLARE22_Tr_0042.nii.gz")
    code, out, err = run_main(capsys, "--input-dir", root, "--output-dir", tmp_path / "o", *FAST)
    assert code == 0
    assert f"warning: {root / 'images' / case_name(1)}_0000.nii.gz has no label" in err
    assert f"warning: {root / 'labels' / 'FLARE22_Tr_0042.nii.gz'} has no image" in err
    # One case: floor(1 * 0.8) = 0 train, 1 val.
    assert npy_names(tmp_path / "o" / "val" / "images")[0] == f"CT_Abd_{case_name(0)}-000.npy"


def test_unreadable_or_mismatched_cases_are_named_exit_1(tmp_path, capsys):
    root = make_flare_nifti(tmp_path / "d", num_cases=4)
    broken_image = root / "images" / f"{case_name(0)}_0000.nii.gz"
    broken_image.write_bytes(broken_image.read_bytes()[:2000])  # truncated download
    broken_label = root / "labels" / f"{case_name(1)}.nii.gz"
    broken_label.write_bytes(gzip.compress(b"not a nifti file"))
    write_nifti(root / "labels" / f"{case_name(2)}.nii.gz", np.zeros((64, 64, 10), np.uint8))
    code, out, err = run_main(capsys, "--input-dir", root, "--output-dir", tmp_path / "o", *FAST)
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4 and "3 case(s) could not be processed" in errors[-1]
    assert str(broken_image) in errors[0] and str(broken_label) in errors[1]
    assert str(root / "images" / f"{case_name(2)}_0000.nii.gz") in errors[2]
    assert str(root / "labels" / f"{case_name(2)}.nii.gz") in errors[2]
    assert "Traceback" not in err
    written = {n.split("-")[0] for n in npy_names(tmp_path / "o" / "val" / "images")}
    assert written == {f"CT_Abd_{case_name(3)}"}  # the good case (val: 4 cases -> 3/1) is complete
    assert not npy_names(tmp_path / "o" / "train" / "images")


def test_a_label_volume_with_nan_is_named(tmp_path, capsys):
    """Float labels (scaled NIfTI) holding NaN made those voxels background without a word."""
    root = make_flare_nifti(tmp_path / "d", num_cases=2)
    _, label, _ = synthetic_case(0, 0)
    label = label.astype(np.float32)
    label[3, 4, 5] = np.nan
    bad = root / "labels" / f"{case_name(0)}.nii.gz"
    write_nifti(bad, label)
    code, out, err = run_main(capsys, "--input-dir", root, "--output-dir", tmp_path / "o", *FAST)
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and str(bad) in errors[0] and "1 NaN/inf voxels" in errors[0]


def test_interrupt_leaves_no_half_written_file(flare5, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real_save = np.save

    def save_then_interrupt(file, array, **kwargs):
        if f"{case_name(1)}-003" in file.name:  # in the middle of the second case and of a file
            file.write(b"\x93NUMPY half")
            raise KeyboardInterrupt
        real_save(file, array, **kwargs)

    monkeypatch.setattr(ctp.np, "save", save_then_interrupt)
    code, _, err = run_main(capsys, "--input-dir", flare5, "--output-dir", out, *FAST)
    assert code == 130 and "interrupted" in err
    assert not leftovers(out)
    for p in out.rglob("*.npy"):
        np.load(p)  # every file there is complete
    assert sorted(p.name for p in (out / ".done").iterdir()) == [f"{case_name(0)}.json"]

    monkeypatch.setattr(ctp.np, "save", real_save)
    code, stdout, _ = run_main(capsys, "--input-dir", flare5, "--output-dir", out, *FAST)
    assert code == 0 and "train: " in stdout and "1 case(s) done before" in stdout
    assert len(list((out / ".done").iterdir())) == 5 and not leftovers(out)


def test_full_size_1024_slices(tmp_path):
    root = make_flare_nifti(tmp_path / "d", num_cases=1)
    counts = ctp.preprocess_ct_dataset(root, tmp_path / "o", val_fraction=0.0, progress=False)
    assert counts["train"]["cases"] == 1 and counts["val"] == dict(cases=0, slices=0, skipped=0, failed=0)
    _, _, clean = synthetic_case(0, 0)
    names = npy_names(tmp_path / "o" / "train" / "images")
    assert len(names) == counts["train"]["slices"] == sum(clean[:, :, z].any() for z in range(clean.shape[2]))
    image = np.load(tmp_path / "o" / "train" / "images" / names[0])
    label = np.load(tmp_path / "o" / "train" / "labels" / names[0])
    assert image.shape == (1024, 1024, 3) and image.dtype == np.float64
    assert image.min() == 0 and image.max() == 1
    assert label.shape == (1024, 1024) and label.dtype == np.uint8
    assert set(np.unique(label)) <= set(np.unique(clean)) and label.any()
