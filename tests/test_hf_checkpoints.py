"""Hugging Face transformers SAM checkpoints (samkit.checkpoints.hf): samkit -> HF -> samkit is
bit-identical, transformers' SamModel loads what samkit writes (and samkit what transformers writes),
and both models give the same masks and IoU predictions for the same preprocessed input and prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from samkit import build_model, sam_model_registry
from samkit.build import read_checkpoint
from samkit.checkpoints.hf import hf_to_samkit_names, safetensors_bytes
from samkit.checkpoints.hf_write import write_hf_folder
from samkit.commands.main import main
from samkit.errors import CheckpointError

from .conftest import perturbed_state

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    sam = build_model("vit_tiny")
    sam.load_state_dict(perturbed_state(sam.state_dict(), seed=3, scale=0.05))
    return sam.eval()


@pytest.fixture(scope="module")
def hf_folder(tiny_sam, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "sam-tiny"
    write_hf_folder(tiny_sam.state_dict(), folder)
    return folder


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trip_is_bit_identical(tiny_sam, hf_folder, tmp_path):
    assert sorted(p.name for p in hf_folder.iterdir()) == ["config.json", "model.safetensors"]
    for source in (hf_folder, hf_folder / "model.safetensors"):
        back = sam_model_registry["vit_tiny"](checkpoint=source)
        assert_same_state(back.state_dict(), tiny_sam.state_dict())
    # samkit's own names in a .safetensors file
    own = tmp_path / "sam_tiny.safetensors"
    own.write_bytes(safetensors_bytes(tiny_sam.state_dict()))
    assert_same_state(read_checkpoint(own), tiny_sam.state_dict())


def test_transformers_loads_every_weight(tiny_sam, hf_folder):
    hf = transformers.SamModel.from_pretrained(hf_folder).eval()
    assert_same_state(hf_to_samkit_names(hf.state_dict()), tiny_sam.state_dict())
    config = json.loads((hf_folder / "config.json").read_text())
    assert config["model_type"] == "sam" and config["vision_config"]["hidden_size"] == 64


def test_reads_what_transformers_writes(tmp_path):
    """A random SamModel of vit_tiny's shape, saved by transformers as safetensors and as .bin."""
    vision = transformers.SamVisionConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1], mlp_dim=256
    )
    torch.manual_seed(1)
    hf = transformers.SamModel(transformers.SamConfig(vision_config=vision.to_dict())).eval()
    with torch.no_grad():  # HF initialises many tensors to 0/1: make every one distinct
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / "st")
    # transformers 5 writes only safetensors; older versions wrote pytorch_model.bin, a torch.save of
    # the state dict (tied copies included), which many shared SAMs still are.
    (tmp_path / "bin").mkdir()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    # Shards: two safetensors files listed in model.safetensors.index.json.
    state = hf.state_dict()
    names = sorted(state)
    (tmp_path / "shards").mkdir()
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        (tmp_path / "shards" / file).write_bytes(safetensors_bytes({k: state[k] for k in part}))
        weight_map.update({k: file for k in part})
    (tmp_path / "shards" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save({"state_dict": {"model": state}}, tmp_path / "wrapped.bin")
    expected = hf_to_samkit_names(state)
    sources = [tmp_path / "st", tmp_path / "bin", tmp_path / "bin" / "pytorch_model.bin", tmp_path / "shards"]
    for source in [*sources, tmp_path / "wrapped.bin"]:
        sam = build_model("vit_tiny", source)
        assert_same_state(sam.state_dict(), expected)


def test_same_masks_and_iou_as_transformers(tiny_sam, hf_folder):
    hf = transformers.SamModel.from_pretrained(hf_folder).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 1024, 1024, generator=g)  # an already preprocessed input
    boxes = torch.tensor([[[100.0, 200.0, 500.0, 700.0], [600.0, 50.0, 1000.0, 400.0]]])
    points = torch.tensor([[[[300.0, 400.0], [350.0, 420.0]]]])
    labels = torch.tensor([[[1, 0]]])
    with torch.no_grad():
        ours = tiny_sam.image_encoder(x)
        theirs = hf.get_image_embeddings(x)
        assert torch.equal(ours, theirs)
        pe = tiny_sam.prompt_encoder.get_dense_pe()
        cases = [
            ({"boxes": boxes[0]}, {"input_boxes": boxes}),
            (
                {"points": (points[0, 0][None], labels[0, 0][None])},
                {"input_points": points, "input_labels": labels},
            ),
        ]
        for prompt, hf_prompt in cases:
            sparse, dense = tiny_sam.prompt_encoder(
                **{"points": None, "boxes": None, "masks": None, **prompt}
            )
            low, iou = tiny_sam.mask_decoder(
                image_embeddings=ours,
                image_pe=pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
            )
            out = hf(image_embeddings=theirs, multimask_output=True, **hf_prompt)
            hf_low, hf_iou = out.pred_masks[0], out.iou_scores[0]
            assert hf_low.shape == low.shape and hf_iou.shape == iou.shape
            torch.testing.assert_close(hf_low, low, atol=1e-4, rtol=0)
            torch.testing.assert_close(hf_iou, iou, atol=1e-5, rtol=0)
            # The same masks: a pixel may flip only where the logit is within float noise of 0.
            flipped = (hf_low > 0) != (low > 0)
            assert (low[flipped].abs() < 1e-4).all() and flipped.float().mean() < 1e-4
            assert 0.05 < (low > 0).float().mean() < 0.95  # masks that are neither empty nor full


def test_convert_command_and_errors(tiny_sam, hf_folder, tmp_path, capsys):
    pth = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), pth)
    out = tmp_path / "out-hf"
    assert main(["convert", "--to", "hf", str(pth), str(out)]) == 0
    assert (out / "model.safetensors").read_bytes() == (hf_folder / "model.safetensors").read_bytes()
    assert main(["convert", "--to", "safetensors", str(out), str(tmp_path / "t.safetensors")]) == 0
    assert_same_state(read_checkpoint(tmp_path / "t.safetensors"), tiny_sam.state_dict())
    # A command takes the HF folder as --checkpoint and gives what the .pth gives.
    picture = tmp_path / "pic.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(picture)
    results = []
    for name, weights in (("pth", pth), ("hf", out)):
        args = [
            "--model-type",
            "vit_tiny",
            "--checkpoint",
            weights,
            "--input",
            picture,
            "--output-dir",
            tmp_path / name,
        ]
        assert main(["predict", "--prompt-type", "box", "--box", "5,6,40,30", *map(str, args)]) == 0
        results.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())})
    assert results[0] and results[0] == results[1]
    capsys.readouterr()

    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text('{"model_type": "sam"}')
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    cases = [
        (lambda: build_model("vit_b", hf_folder), "checkpoint is vit_tiny, model is vit_b"),
        (lambda: build_model("vit_tiny", other), "is a 'bert' model, not a SAM"),
        (lambda: build_model("vit_tiny", empty), "without model.safetensors or pytorch_model.bin"),
        (lambda: build_model("vit_tiny", bad), f"cannot read safetensors file {bad}"),
        (
            lambda: build_model("vit_tiny", tiny_sam.state_dict() and tmp_path / "nope"),
            "checkpoint not found",
        ),
    ]
    for call, message in cases:
        with pytest.raises(CheckpointError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value)
    text = build_model("vit_tiny", text_feature_dim=8)
    torch.save(text.state_dict(), tmp_path / "text.pth")
    target = tmp_path / "text-hf"
    assert main(["convert", "--to", "hf", str(tmp_path / "text.pth"), str(target)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text-prompt branch" in err[0] and not target.exists()
