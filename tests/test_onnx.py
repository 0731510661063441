"""ONNX export of vit_tiny: verified against PyTorch, Meta's decoder interface, the torch-free OnnxPredictor, bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from samkit import SamPredictor, build_model  # noqa: E402
from samkit.commands.export_onnx import main  # noqa: E402
from samkit.export.onnx import export_onnx  # noqa: E402
from samkit.export.verify import format_table, verification_image, verify_onnx  # noqa: E402
from samkit.onnx import OnnxPredictor  # noqa: E402
from samkit.utils.onnx import SamOnnxModel  # noqa: E402
from samkit.utils.transforms import ResizeLongestSide  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ONE_IMAGE = {"portrait": (520, 360)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "vit_tiny"
    args = ["--model-type", "vit_tiny", "--checkpoint", tiny_checkpoint, "--output", str(out)]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return build_model("vit_tiny", tiny_checkpoint).eval()


def test_export_writes_models_with_metadata(exported):
    assert sorted(os.listdir(exported)) == ["decoder.onnx", "encoder.onnx"]
    assert not [n for n in os.listdir(exported.parent) if n.startswith(".")]  # no temporary folder left
    for name in ("encoder.onnx", "decoder.onnx"):
        proto = onnx.load(exported / name)
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["model_type"] == "vit_tiny" and meta["image_size"] == "1024"
        assert meta["pixel_mean"] == "123.675,116.28,103.53" and meta["mask_threshold"] == "0.0"
        assert meta["samkit_version"] and meta["precision"] == "fp32"
    decoder = ort.InferenceSession(str(exported / "decoder.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in decoder.get_inputs()]
    assert names == [
        "image_embeddings",
        "point_coords",
        "point_labels",
        "mask_input",
        "has_mask_input",
        "orig_im_size",
    ]
    assert [o.name for o in decoder.get_outputs()] == ["masks", "iou_predictions", "low_res_masks"]
    encoder = ort.InferenceSession(str(exported / "encoder.onnx"), providers=["CPUExecutionProvider"])
    assert encoder.get_inputs()[0].shape == [1, 3, 1024, 1024]
    assert encoder.get_outputs()[0].shape == [1, 256, 64, 64]


def test_fp32_verification_passes_tight_bounds(exported, model):
    rows = verify_onnx(model, exported, "fp32")
    table = format_table(rows, "fp32")
    assert all(r.ok for r in rows), table
    assert {r.image for r in rows} == {"square", "portrait", "landscape"}
    assert {r.case for r in rows} == {
        "embeddings",
        "one point",
        "several points",
        "box",
        "point + box",
        "mask_input",
    }
    masks = [r for r in rows if r.case != "embeddings"]
    assert min(r.mask_agreement for r in masks) >= 0.999 and max(r.iou_abs for r in masks) < 1e-3
    assert max(r.emb_rel_l2 for r in rows if r.case == "embeddings") < 1e-4


def test_meta_notebook_decoder_call(exported, model):
    """The decoder run as Meta's onnx_model_example notebook does: a padding point, labels 2/3 for a box."""
    image = verification_image(480, 640, seed=5)
    predictor = SamPredictor(model)
    predictor.set_image(image)
    embedding = predictor.get_image_embedding().numpy()
    session = ort.InferenceSession(str(exported / "decoder.onnx"), providers=["CPUExecutionProvider"])
    transform = ResizeLongestSide(1024)
    point, box = np.array([[320, 200]]), np.array([150, 100, 450, 380])

    coords = np.concatenate([point, np.array([[0.0, 0.0]])])[None, :, :]
    labels = np.concatenate([np.array([1]), np.array([-1])])[None, :].astype(np.float32)
    coords = transform.apply_coords(coords, image.shape[:2]).astype(np.float32)
    inputs = {
        "image_embeddings": embedding,
        "point_coords": coords,
        "point_labels": labels,
        "mask_input": np.zeros((1, 1, 256, 256), dtype=np.float32),
        "has_mask_input": np.zeros(1, dtype=np.float32),
        "orig_im_size": np.array(image.shape[:2], dtype=np.float32),
    }
    masks, scores, low_res = session.run(None, inputs)
    assert masks.shape == (1, 4, 480, 640) and scores.shape == (1, 4) and low_res.shape == (1, 4, 256, 256)
    ref_masks, ref_scores, _ = predictor.predict(point_coords=point, point_labels=np.array([1]))
    assert ((masks[0, 1:] > 0) == ref_masks).mean() >= 0.999
    np.testing.assert_allclose(scores[0, 1:], ref_scores, atol=1e-3)

    # Point + box: the box corners follow the point, labels 2 and 3, no padding point.
    coords = np.concatenate([point, box.reshape(2, 2)])[None, :, :]
    inputs["point_coords"] = transform.apply_coords(coords, image.shape[:2]).astype(np.float32)
    inputs["point_labels"] = np.array([[1, 2, 3]], dtype=np.float32)
    # Refinement with the previous low-res mask, as the notebook's second call does.
    inputs["mask_input"], inputs["has_mask_input"] = low_res[:, :1], np.ones(1, dtype=np.float32)
    masks, scores, _ = session.run(None, inputs)
    ref_masks, ref_scores, _ = predictor.predict(
        point_coords=point,
        point_labels=np.array([1]),
        box=box,
        mask_input=low_res[0, :1],
        multimask_output=False,
    )
    assert ((masks[0, :1] > 0) == ref_masks).mean() >= 0.999
    np.testing.assert_allclose(scores[0, :1], ref_scores, atol=1e-3)


@pytest.mark.parametrize("extra_metrics", [False, True])
def test_meta_export_script_interface(tmp_path, model, extra_metrics):
    """What Meta's scripts/export_onnx_model.py does, with SamOnnxModel imported from samkit."""
    torch.manual_seed(1)
    onnx_model = SamOnnxModel(model=model, return_single_mask=True, use_stability_score=extra_metrics,
                              return_extra_metrics=extra_metrics)  # fmt: skip
    embed_size = model.prompt_encoder.image_embedding_size
    dummy = {
        "image_embeddings": torch.randn(1, model.prompt_encoder.embed_dim, *embed_size, dtype=torch.float),
        "point_coords": torch.randint(low=0, high=1024, size=(1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(low=0, high=4, size=(1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, *[4 * x for x in embed_size], dtype=torch.float),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
    }
    _ = onnx_model(**dummy)
    names = ["masks", "iou_predictions", "low_res_masks"]
    if extra_metrics:
        names = ["masks", "iou_predictions", "stability_scores", "areas", "low_res_masks"]
    path = tmp_path / "sam.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dynamo=False: torch >= 2.9 defaults to the dynamo exporter, which Meta's script predates.
        torch.onnx.export(onnx_model, tuple(dummy.values()), path, export_params=True, opset_version=17,
                          do_constant_folding=True, input_names=list(dummy), output_names=names,
                          dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
                          dynamo=False)  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {k: v.numpy() for k, v in dummy.items()}
    inputs["point_coords"], inputs["point_labels"] = (
        inputs["point_coords"][:, :3],
        inputs["point_labels"][:, :3],
    )
    inputs["orig_im_size"] = np.array([300, 200], dtype=np.float32)
    outputs = dict(zip(names, session.run(None, inputs)))
    expected = onnx_model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    assert outputs["masks"].shape == (1, 1, 300, 200) and outputs["low_res_masks"].shape == (1, 1, 256, 256)
    for name, ref in zip(names, expected):
        if name == "areas":  # a pixel count: pixels whose logit lies within rounding of 0 may flip
            borderline = int((expected[0].abs() < 1e-4).sum())
            assert abs(int(outputs[name].sum()) - int(ref.sum())) <= borderline, (
                outputs[name],
                ref,
                borderline,
            )
        else:
            np.testing.assert_allclose(outputs[name], ref.numpy(), atol=2e-3, err_msg=name)


def test_onnx_predictor_batch_and_preprocess_encoder(tmp_path, exported, model):
    image = verification_image(300, 450, seed=2)
    predictor, ref = OnnxPredictor(exported), SamPredictor(model)
    predictor.set_image(image)
    ref.set_image(image)
    prompts = [{"boxes": np.array([[20, 30, 200, 250], [100, 50, 400, 280]]),
                "point_coords": np.array([[[100, 120]], [[250, 150]]]), "point_labels": np.array([[1], [0]])}]  # fmt: skip
    (masks, iou, low), = predictor.predict_batch(prompts, multimask_output=False)  # fmt: skip
    (ref_masks, ref_iou, _), = ref.predict_batch(prompts, multimask_output=False)  # fmt: skip
    assert masks.shape == ref_masks.shape == (2, 1, 300, 450) and low.shape == (2, 1, 256, 256)
    assert (masks == ref_masks).mean() >= 0.999
    np.testing.assert_allclose(iou, ref_iou, atol=1e-3)

    out = tmp_path / "pre"
    export_onnx(model, out, model_type="vit_tiny", encoder_preprocess=True)
    inside = OnnxPredictor(out)
    assert len(inside.encoder.get_inputs()[0].shape) == 3
    inside.set_image(image)
    np.testing.assert_allclose(inside.get_image_embedding(), predictor.get_image_embedding(), atol=1e-4)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_low_precision_within_stated_bounds(tmp_path, model, precision):
    export_onnx(model, tmp_path / precision, model_type="vit_tiny", precision=precision)
    rows = verify_onnx(model, tmp_path / precision, precision, sizes=ONE_IMAGE)
    assert all(r.ok for r in rows), format_table(rows, precision)
    for name in ("encoder.onnx", "decoder.onnx"):
        proto = onnx.load(tmp_path / precision / name)
        ops = {node.op_type for node in proto.graph.node}
        weights = {init.data_type for init in proto.graph.initializer}
        if precision == "int8":
            assert "MatMulInteger" in ops and onnx.TensorProto.UINT8 in weights
        else:
            assert onnx.TensorProto.FLOAT16 in weights
        assert [i.type.tensor_type.elem_type for i in proto.graph.input][0] == onnx.TensorProto.FLOAT


def test_external_data_overwrite_and_atomic_failure(tmp_path, model, monkeypatch):
    out = tmp_path / "ext"
    export_onnx(model, out, model_type="vit_tiny", external_data_bytes=0)  # as vit_h's 2.5 GB encoder would
    assert sorted(os.listdir(out)) == ["decoder.onnx", "encoder.onnx", "encoder.onnx.data"]
    onnx.checker.check_model(str(out / "encoder.onnx"))
    OnnxPredictor(out).set_image(verification_image(100, 120))

    import samkit.export.onnx as export_module

    def broken(*args, **kwargs):
        raise RuntimeError("tracing failed")

    monkeypatch.setattr(export_module, "export_decoder", broken)
    with pytest.raises(RuntimeError):
        export_onnx(model, out, model_type="vit_tiny", overwrite=True)
    assert sorted(os.listdir(out)) == ["decoder.onnx", "encoder.onnx", "encoder.onnx.data"]  # untouched
    assert sorted(os.listdir(tmp_path)) == ["ext"]  # no temporary folder left


def _refused(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_one_line_nothing_written(tmp_path, tiny_checkpoint, exported, capsys):
    out = tmp_path / "out"
    base = ["--checkpoint", tiny_checkpoint, "--output", str(out)]
    assert "vit_huge" in _refused(capsys, ["--model-type", "vit_huge", *base])
    assert "vit_tiny" in _refused(capsys, ["--model-type", "vit_b", *base])  # a checkpoint of another size
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "not a directory" in _refused(capsys, ["--model-type", "vit_tiny", "--checkpoint", tiny_checkpoint,
                                                  "--output", str(blocker / "sub")])  # fmt: skip
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["file"]
    before = {n: os.path.getmtime(exported / n) for n in os.listdir(exported)}
    err = _refused(
        capsys, ["--model-type", "vit_tiny", "--checkpoint", tiny_checkpoint, "--output", str(exported)]
    )
    assert "--overwrite" in err
    assert {n: os.path.getmtime(exported / n) for n in os.listdir(exported)} == before
    # --overwrite replaces a previous export only: a folder that also holds the checkpoint stays whole.
    mixed = tmp_path / "mixed"
    shutil.copytree(exported, mixed)
    shutil.copy(tiny_checkpoint, mixed / "tiny.pth")
    before = sorted(os.listdir(mixed))
    err = _refused(
        capsys, ["--model-type", "vit_tiny", "--checkpoint", str(mixed / "tiny.pth"), "--output", str(mixed), "--overwrite"]
    )  # fmt: skip
    assert f"--output {mixed}: holds files other than a previous export's (tiny.pth)" in err
    assert sorted(os.listdir(mixed)) == before
    shutil.rmtree(mixed)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _refused(
            capsys,
            ["--model-type", "vit_tiny", "--checkpoint", tiny_checkpoint, "--output", str(locked / "x")],
        )


def test_onnx_package_runs_without_torch(exported):
    """samkit.onnx needs numpy, onnxruntime and Pillow only: with torch made unimportable, the real
    ``samkit`` package (its public names load on first use) imports, predicts and generates masks."""
    code = """
import sys
sys.modules["torch"] = None  # any 'import torch' now raises ImportError
sys.path.insert(0, sys.argv[1])
import samkit
assert samkit.__file__.startswith(sys.argv[1]), samkit.__file__
import numpy as np
from samkit.onnx import OnnxAutomaticMaskGenerator, OnnxPredictor
predictor = OnnxPredictor(sys.argv[2])
predictor.set_image(np.full((120, 160, 3), 90, dtype=np.uint8))
masks, iou, low = predictor.predict(point_coords=np.array([[80, 60]]), point_labels=np.array([1]))
records = OnnxAutomaticMaskGenerator(predictor, points_per_side=1, pred_iou_thresh=0, stability_score_thresh=0).generate(
    np.full((120, 160, 3), 90, dtype=np.uint8))
assert [m for m in sys.modules if m.split(".")[0] == "torch"] == ["torch"]  # only the blocker
print(masks.shape, iou.shape, low.shape, len(records) >= 1)
"""
    result = subprocess.run(
        [sys.executable, "-c", code, str(REPO), str(exported)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 120, 160) (3,) (3, 256, 256) True"


def test_cli_verify_prints_table_and_fails_out_of_bounds(
    tmp_path, exported, tiny_checkpoint, monkeypatch, capsys
):
    """--verify's wiring: the table goes to stdout and a row out of bounds makes the exit status 1 (the
    export and the verification themselves are tested above; here both are stand-ins)."""
    import samkit.export.onnx as export_module
    import samkit.export.verify as verify_module

    calls = []
    monkeypatch.setattr(export_module, "export_onnx", lambda model, output, **kw: calls.append(kw) or {})
    rows = [
        verify_module.Row("square", "embeddings", 1e-6, 1e-7),
        verify_module.Row("square", "box", mask_agreement=0.5, mask_iou=0.1, iou_abs=0.2, ok=False),
    ]
    monkeypatch.setattr(verify_module, "verify_onnx", lambda model, folder, precision: rows)
    args = [
        "--model-type",
        "vit_tiny",
        "--checkpoint",
        tiny_checkpoint,
        "--output",
        str(tmp_path / "m"),
        "--verify",
    ]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "square     box" in out and "FAIL" in out and "1/2 within bounds; 1 FAILED" in out
    assert calls[0]["precision"] == "fp32" and calls[0]["opset"] == 17
    rows[1].ok = True
    assert main(args) == 0


def test_onnx_amg_records_equal_samkit(exported, model):
    from samkit import SamAutomaticMaskGenerator
    from samkit.onnx import OnnxAutomaticMaskGenerator

    image = verification_image(240, 320, seed=3)
    # NMS thresholds of 1 keep every mask: random weights give near-identical masks that NMS would
    # reduce to one record, and the comparison should cover many.
    kwargs = dict(points_per_side=3, crop_n_layers=1, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                  box_nms_thresh=1.0, crop_nms_thresh=1.0, output_mode="uncompressed_rle")  # fmt: skip
    ref = SamAutomaticMaskGenerator(model, **kwargs).generate(image)
    ours = OnnxAutomaticMaskGenerator(OnnxPredictor(exported), **kwargs).generate(image)
    assert len(ours) == len(ref) >= 20

    def key(record):
        return (record["crop_box"], record["point_coords"], -record["predicted_iou"])

    from samkit.onnx.amg import rle_to_mask

    for a, b in zip(sorted(ours, key=key), sorted(ref, key=key)):
        assert a["crop_box"] == b["crop_box"] and a["point_coords"] == b["point_coords"]
        assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-3
        assert abs(a["stability_score"] - b["stability_score"]) < 1e-2
        assert (rle_to_mask(a["segmentation"]) == rle_to_mask(b["segmentation"])).mean() >= 0.999
        assert (
            np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 1
            and abs(a["area"] - b["area"]) <= 0.001 * 240 * 320
        )
