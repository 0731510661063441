"""Checkpoint loading: wrappers, prefixes, MindSpore .ckpt, and loud errors for bad files."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from samkit import CheckpointError, build_model, load_checkpoint
from samkit.build import identify_model_size, read_checkpoint
from samkit.checkpoints.mindspore import torch_to_mindspore_names, write_mindspore_checkpoint


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"model": s},
        lambda s: {"model": {f"module.{k}": v for k, v in s.items()}, "epoch": 3},
        lambda s: {f"_orig_mod.{k}": v for k, v in s.items()},
        lambda s: {"state_dict": {"model": s}},
    ],
    ids=["plain", "model-wrapper", "ddp-prefix", "compile-prefix", "nested"],
)
def test_pth_round_trip(tmp_path, tiny_model, wrap):
    path = tmp_path / "w.pth"
    torch.save(wrap(tiny_model.state_dict()), path)
    loaded = build_model("vit_tiny", checkpoint=path)
    assert_same_weights(tiny_model, loaded)


def test_mindspore_ckpt_round_trip(tmp_path, tiny_model):
    path = tmp_path / "sam_vit_tiny.ckpt"
    ms_state = torch_to_mindspore_names(tiny_model.state_dict())
    assert any(k.endswith(".gamma") for k in ms_state) and any(
        k.endswith(".embedding_table") for k in ms_state
    )
    # The seed's checkpoints may carry its frozen text encoder: SAM ignores it (text-prompt
    # parameters themselves need text_feature_dim; tests/test_text_mode.py).
    ms_state["text_encoder.visual.proj"] = torch.zeros(4, 4)
    write_mindspore_checkpoint(ms_state, path)
    loaded = build_model("vit_tiny", checkpoint=path)
    assert_same_weights(tiny_model, loaded)


def test_size_mismatch_names_both_sizes(tmp_path, tiny_model):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_model.state_dict(), path)
    vit_b = build_model("vit_b")
    with pytest.raises(CheckpointError, match=r"checkpoint is vit_tiny, model is vit_b") as info:
        load_checkpoint(vit_b, path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_identify_model_size_for_every_size():
    for name in ("vit_b", "vit_l", "vit_h", "vit_tiny"):
        with torch.device("meta"):
            model = build_model(name)
        state = {k: v for k, v in model.state_dict().items() if k.startswith("image_encoder.")}
        assert identify_model_size(state) == name


def test_wrong_shape_and_missing_keys(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    state["mask_decoder.iou_token.weight"] = torch.zeros(2, 256)
    del state["mask_decoder.mask_tokens.weight"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(
        CheckpointError,
        match="missing: mask_decoder.mask_tokens.weight; wrong shape: mask_decoder.iou_token.weight",
    ):
        build_model("vit_tiny", checkpoint=path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path, tiny_model):
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_model.state_dict(), "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="pickled code") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "kind", ["truncated", "random", "text", "empty", "missing", "pickle-list", "directory"]
)
def test_bad_files_name_the_file(tmp_path, tiny_model, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "truncated":
        torch.save(tiny_model.state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(os.urandom(5000))
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickle-list":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(CheckpointError) as info:
        build_model("vit_tiny", checkpoint=path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_truncated_mindspore_ckpt(tmp_path, tiny_model):
    path = tmp_path / "t.ckpt"
    write_mindspore_checkpoint(torch_to_mindspore_names(tiny_model.state_dict()), path)
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="t.ckpt"):
        build_model("vit_tiny", checkpoint=path)
