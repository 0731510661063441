"""Tests for samkit.checkpoints.mindspore: MindSpore .ckpt read/write and SAM name mapping."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
import torch

from samkit.checkpoints import mindspore as msc
from samkit.checkpoints.mindspore import (
    looks_like_mindspore_checkpoint,
    mindspore_to_torch_names,
    read_mindspore_checkpoint,
    torch_to_mindspore_names,
    write_mindspore_checkpoint,
)
from samkit.errors import CheckpointError

# ----------------------------------------------------------------------------- hand-rolled encoder
# Independent of the module's writer, to craft files MindSpore (or a hostile user) could produce.


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _ld(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _tensor_proto(dims, dtype: str, content: bytes, extra: bytes = b"") -> bytes:
    body = b"".join(_key(1, 0) + _varint(d) for d in dims)
    return body + _ld(2, dtype.encode()) + extra + _ld(3, content)


def _value(tag: str, tensor: bytes, extra: bytes = b"") -> bytes:
    return _ld(1, _ld(1, tag.encode()) + extra + _ld(2, tensor))


MS_DTYPES = {
    "Float16": torch.float16,
    "Float32": torch.float32,
    "Float64": torch.float64,
    "BFloat16": torch.bfloat16,
    "Int8": torch.int8,
    "Int16": torch.int16,
    "Int32": torch.int32,
    "Int64": torch.int64,
    "UInt8": torch.uint8,
    "UInt16": torch.uint16,
    "UInt32": torch.uint32,
    "UInt64": torch.uint64,
    "Bool": torch.bool,
}


def _sample(dtype: torch.dtype, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 100).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype)


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(
        a.view(torch.uint8) if a.dtype == torch.bool else a,
        b.view(torch.uint8) if b.dtype == torch.bool else b,
    )


def _assert_one_line_naming(err: pytest.ExceptionInfo, path) -> None:
    msg = str(err.value)
    assert str(path) in msg
    assert "\n" not in msg


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("ms_name", sorted(MS_DTYPES))
def test_round_trip_every_dtype_and_shape(tmp_path, ms_name):
    dtype = MS_DTYPES[ms_name]
    shapes = [(), (1,), (0,), (2, 0, 3), (5,), (2, 3, 4)]
    state = {f"p.{i}": _sample(dtype, s) for i, s in enumerate(shapes)}
    path = tmp_path / "m.ckpt"
    write_mindspore_checkpoint(state, path)

    entries = msc._parse_checkpoint(path.read_bytes(), path.stat().st_size)
    assert {e.dtype for e in entries} == {ms_name}

    back = read_mindspore_checkpoint(path)
    assert list(back) == list(state)
    for key in state:
        _assert_same(back[key], state[key])


def test_file_order_and_names_preserved(tmp_path):
    names = ["z.last", "a.first", "image_encoder.blocks.0.norm1.gamma", "ünïcode.名前", "x"]
    state = {n: torch.full((2,), float(i)) for i, n in enumerate(names)}
    path = tmp_path / "order.ckpt"
    write_mindspore_checkpoint(state, path)
    assert list(read_mindspore_checkpoint(path)) == names


def test_numpy_inputs_big_endian_and_non_contiguous(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    arrays = {
        "transposed": base.T,
        "big_endian": base.astype(">f4"),
        "read_only": np.frombuffer(base.tobytes(), dtype=np.float32),
        "int64": np.arange(5, dtype=np.int64) - 2,
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5),
        "numpy_scalar": np.float32(1.5),
    }
    path = tmp_path / "np.ckpt"
    write_mindspore_checkpoint(arrays, path)
    back = read_mindspore_checkpoint(path)
    for key, arr in arrays.items():
        np.testing.assert_array_equal(back[key].numpy(), arr.astype(arr.dtype.newbyteorder("=")))
        assert back[key].shape == arr.shape


def test_large_tensors_split_into_slices_are_concatenated(tmp_path, monkeypatch):
    monkeypatch.setattr(msc, "_SLICE_BYTES", 64)  # MindSpore uses 512 MiB
    state = {"big": torch.arange(100, dtype=torch.float32).reshape(10, 10), "small": torch.ones(3)}
    path = tmp_path / "split.ckpt"
    write_mindspore_checkpoint(state, path)

    entries = msc._parse_checkpoint(path.read_bytes(), path.stat().st_size)
    big = [e for e in entries if e.tag == "big"]
    assert len(big) == 7  # 400 bytes in 64-byte slices
    assert all(e.dims == (10, 10) for e in big)  # every slice carries the full dims, as MindSpore does

    back = read_mindspore_checkpoint(path)
    assert list(back) == ["big", "small"]
    _assert_same(back["big"], state["big"])


def test_crc_trailer_written_verified_and_stripped(tmp_path):
    state = {"w": torch.arange(16, dtype=torch.float32)}
    path = tmp_path / "crc.ckpt"
    write_mindspore_checkpoint(state, path, crc_check=True)
    data = path.read_bytes()
    assert data[-17:-10] == b"crc_num"
    _assert_same(read_mindspore_checkpoint(path)["w"], state["w"])

    damaged = bytearray(data)
    damaged[-20] ^= 0xFF  # a content byte
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="CRC") as err:
        read_mindspore_checkpoint(path)
    _assert_one_line_naming(err, path)
    assert read_mindspore_checkpoint(path, verify_crc=False)["w"].shape == (16,)


def test_write_is_atomic_and_rejects_bad_input(tmp_path):
    path = tmp_path / "bad.ckpt"
    with pytest.raises(CheckpointError, match="complex"):
        write_mindspore_checkpoint({"ok": torch.ones(1), "c": torch.ones(2, dtype=torch.complex64)}, path)
    with pytest.raises(TypeError):
        write_mindspore_checkpoint({"x": [1.0, 2.0]}, path)  # type: ignore[dict-item]
    assert not path.exists() and not (tmp_path / "bad.ckpt.tmp").exists()


# ----------------------------------------------------------------------------- MindSpore variants


def test_mindspore_1x_scalars_with_dims_zero(tmp_path):
    path = tmp_path / "legacy.ckpt"
    data = (
        _value("global_step", _tensor_proto([0], "Int32", struct.pack("<i", 1234)))
        + _value("learning_rate", _tensor_proto([0], "Float32", struct.pack("<f", 0.5)))
        + _value("empty", _tensor_proto([0], "Float32", b""))
        + _value("new_style_scalar", _tensor_proto([], "Float64", struct.pack("<d", 3.25)))
    )
    path.write_bytes(data)
    back = read_mindspore_checkpoint(path)
    assert back["global_step"].shape == () and back["global_step"].item() == 1234
    assert back["learning_rate"].shape == () and back["learning_rate"].item() == 0.5
    assert back["empty"].shape == (0,)
    assert back["new_style_scalar"].dtype == torch.float64 and back["new_style_scalar"].item() == 3.25


def test_unknown_fields_of_every_wire_type_are_skipped(tmp_path):
    unknown = (
        _key(9, 0)
        + _varint(2**63 + 5)  # varint
        + _key(10, 1)
        + struct.pack("<d", 1.5)  # 64-bit
        + _ld(11, b"\x0a\x03abc some nested bytes")  # length-delimited
        + _key(12, 5)
        + struct.pack("<f", 2.0)  # 32-bit
    )
    weight = np.arange(6, dtype=np.float32)
    tensor = _tensor_proto([2, 3], "Float32", weight.tobytes(), extra=unknown)
    path = tmp_path / "extra.ckpt"
    path.write_bytes(
        unknown
        + _value("w", tensor, extra=unknown)
        + unknown
        + _value("b", _tensor_proto([1], "Int8", b"\x07"))
    )
    back = read_mindspore_checkpoint(path)
    assert list(back) == ["w", "b"]
    np.testing.assert_array_equal(back["w"].numpy(), weight.reshape(2, 3))
    assert back["b"].tolist() == [7]


def test_packed_dims_are_accepted(tmp_path):
    packed = _ld(1, _varint(2) + _varint(2))
    tensor = packed + _ld(2, b"Int16") + _ld(3, np.arange(4, dtype=np.int16).tobytes())
    path = tmp_path / "packed.ckpt"
    path.write_bytes(_value("p", tensor))
    assert read_mindspore_checkpoint(path)["p"].tolist() == [[0, 1], [2, 3]]


def test_str_metadata_skipped_and_map_tensors_warned(tmp_path):
    text = np.array("epoch_10").tobytes()  # how MindSpore stores append_dict strings (UTF-32)
    map_value = _ld(1, _ld(1, b"hash_table") + _ld(3, _ld(1, _tensor_proto([1], "Int64", b"\0" * 8))))
    path = tmp_path / "meta.ckpt"
    path.write_bytes(
        _value("w", _tensor_proto([1], "Float32", struct.pack("<f", 1.0)))
        + _value("note", _tensor_proto([0], "str", text))
        + map_value
    )
    with pytest.warns(UserWarning, match="hash_table"):
        back = read_mindspore_checkpoint(path)
    assert list(back) == ["w"]


# ----------------------------------------------------------------------------- invalid files


def _bad_files(tmp_path):
    ok = tmp_path / "ok.ckpt"
    write_mindspore_checkpoint({"a": torch.arange(64, dtype=torch.float32), "b": torch.ones(3)}, ok)
    good = ok.read_bytes()

    zip_path = tmp_path / "model.pth"
    torch.save({"w": torch.ones(2)}, zip_path)
    pickle_path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, pickle_path, _use_new_zipfile_serialization=False)

    files = {
        "truncated": good[: len(good) // 2],
        "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty": b"",
        "mismatch": _value("w", _tensor_proto([2, 3], "Float32", b"\0" * 20)),
        "unknown_dtype": _value("q", _tensor_proto([4], "Int4", b"\0" * 2)),
        "negative_dim": _value("n", _tensor_proto([-1], "Float32", b"")),
        "no_tensor": _ld(1, _ld(1, b"w")),
        "group_wire_type": _value("w", _tensor_proto([1], "UInt8", b"\1")) + _key(5, 3),
        "duplicate": (
            _value("w", _tensor_proto([1], "UInt8", b"\1"))
            + _value("v", _tensor_proto([1], "UInt8", b"\1"))
            + _value("w", _tensor_proto([1], "UInt8", b"\2"))
        ),
        "slice_mismatch": (
            _value("w", _tensor_proto([2], "UInt8", b"\1")) + _value("w", _tensor_proto([2], "Int8", b"\1"))
        ),
        "bad_bool": _value("m", _tensor_proto([2], "Bool", b"\x00\x07")),
        "only_metadata": _value("note", _tensor_proto([0], "str", np.array("x").tobytes())),
    }
    paths = {"zip": zip_path, "pickle": pickle_path}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.ckpt"
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize(
    "case, problem",
    [
        ("truncated", "truncated"),
        ("random", "not a valid MindSpore checkpoint"),
        ("empty", "empty"),
        ("zip", "zip"),
        ("pickle", "pickle"),
        ("mismatch", "need 24 bytes but the file holds 20"),
        ("unknown_dtype", "Int4"),
        ("negative_dim", "negative"),
        ("no_tensor", "no tensor"),
        ("group_wire_type", "wire type 3"),
        ("duplicate", "twice"),
        ("slice_mismatch", "disagree"),
        ("bad_bool", "Bool"),
        ("only_metadata", "no tensors"),
        ("missing", "cannot read"),
    ],
)
def test_invalid_files_raise_checkpoint_error_naming_the_file(tmp_path, case, problem):
    paths = _bad_files(tmp_path)
    path = paths.get(case, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=problem) as err:
        read_mindspore_checkpoint(path)
    _assert_one_line_naming(err, path)


def test_looks_like_mindspore_checkpoint(tmp_path):
    paths = _bad_files(tmp_path)
    assert looks_like_mindspore_checkpoint(tmp_path / "ok.ckpt")
    assert looks_like_mindspore_checkpoint(str(tmp_path / "ok.ckpt"))
    long_name = tmp_path / "long.ckpt"
    write_mindspore_checkpoint({"é" * 300: torch.ones(1)}, long_name)  # name cut by the sniff window
    assert looks_like_mindspore_checkpoint(long_name)
    for case in ("zip", "pickle", "empty", "random"):
        assert not looks_like_mindspore_checkpoint(paths[case]), case
    assert not looks_like_mindspore_checkpoint(tmp_path / "does_not_exist.ckpt")
    assert not looks_like_mindspore_checkpoint(tmp_path)  # a directory


# ----------------------------------------------------------------------------- cross-check with protobuf


def _protobuf_checkpoint_class():
    """Build the message classes of mindspore/ccsrc/utils/checkpoint.proto without protoc."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="samkit_test_checkpoint.proto", package="samkit_test", syntax="proto2"
    )
    tensor = proto.message_type.add(name="TensorProto")
    tensor.field.add(name="dims", number=1, type=f.TYPE_INT64, label=f.LABEL_REPEATED)
    tensor.field.add(name="tensor_type", number=2, type=f.TYPE_STRING, label=f.LABEL_REQUIRED)
    tensor.field.add(name="tensor_content", number=3, type=f.TYPE_BYTES, label=f.LABEL_REQUIRED)
    ckpt = proto.message_type.add(name="Checkpoint")
    value = ckpt.nested_type.add(name="Value")
    value.field.add(name="tag", number=1, type=f.TYPE_STRING, label=f.LABEL_REQUIRED)
    value.field.add(
        name="tensor",
        number=2,
        type=f.TYPE_MESSAGE,
        label=f.LABEL_OPTIONAL,
        type_name=".samkit_test.TensorProto",
    )
    ckpt.field.add(
        name="value",
        number=1,
        type=f.TYPE_MESSAGE,
        label=f.LABEL_REPEATED,
        type_name=".samkit_test.Checkpoint.Value",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("samkit_test.Checkpoint"))


def test_writer_output_parses_with_protobuf(tmp_path):
    checkpoint_cls = _protobuf_checkpoint_class()
    state = {
        "a.gamma": torch.randn(3, 4),
        "b": torch.tensor(7, dtype=torch.int64),
        "c": _sample(torch.bfloat16, (2,)),
    }
    path = tmp_path / "w.ckpt"
    write_mindspore_checkpoint(state, path)
    message = checkpoint_cls()
    message.ParseFromString(path.read_bytes())
    assert [v.tag for v in message.value] == list(state)
    assert [list(v.tensor.dims) for v in message.value] == [[3, 4], [], [2]]
    assert [v.tensor.tensor_type for v in message.value] == ["Float32", "Int64", "BFloat16"]
    assert message.value[0].tensor.tensor_content == state["a.gamma"].numpy().tobytes()


def test_protobuf_output_reads_back(tmp_path):
    checkpoint_cls = _protobuf_checkpoint_class()
    weight = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
    message = checkpoint_cls()
    # A tensor saved MindSpore-style in two slices with the same tag and full dims, then a scalar.
    for piece in np.array_split(weight.reshape(-1), 2):
        entry = message.value.add(tag="image_encoder.patch_embed.proj.weight")
        entry.tensor.dims.extend([4, 5])
        entry.tensor.tensor_type = "Float32"
        entry.tensor.tensor_content = piece.tobytes()
    entry = message.value.add(tag="step")
    entry.tensor.dims.extend([0])
    entry.tensor.tensor_type = "Int64"
    entry.tensor.tensor_content = np.int64(-3).tobytes()
    path = tmp_path / "pb.ckpt"
    path.write_bytes(message.SerializeToString())

    back = read_mindspore_checkpoint(path)
    np.testing.assert_array_equal(back["image_encoder.patch_embed.proj.weight"].numpy(), weight)
    assert back["step"].shape == () and back["step"].item() == -3
    assert looks_like_mindspore_checkpoint(path)


# ----------------------------------------------------------------------------- SAM name mapping


@pytest.fixture(scope="module")
def sam_vit_b():
    segment_anything = pytest.importorskip("segment_anything")
    with torch.device("meta"):  # names and module types only; no memory, builds in ~1 s
        return segment_anything.sam_model_registry["vit_b"]()


def test_torch_to_mindspore_names_on_real_sam(sam_vit_b):
    state = sam_vit_b.state_dict()
    # Expected renames, derived from the module types rather than from the regex list.
    expected = {}
    for module_name, module in sam_vit_b.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            expected[f"{module_name}.weight"] = f"{module_name}.gamma"
            expected[f"{module_name}.bias"] = f"{module_name}.beta"
        elif isinstance(module, torch.nn.Embedding):
            expected[f"{module_name}.weight"] = f"{module_name}.embedding_table"
    assert (
        len(expected) == 12 * 4 + 2 * 4 * 2 + 2 + 4 + 1 + 1 + 1 + 1
    )  # norms of blocks/layers, final norm, embeddings

    ms_state = torch_to_mindspore_names(state)
    assert list(ms_state) == [expected.get(k, k) for k in state]
    assert all(ms_state[expected.get(k, k)] is v for k, v in state.items())
    for kept in (
        "image_encoder.neck.1.weight",
        "prompt_encoder.mask_downscaling.4.bias",
        "mask_decoder.output_upscaling.1.weight",
    ):
        assert kept in ms_state  # LayerNorm2d keeps weight/bias

    back = mindspore_to_torch_names(ms_state)
    assert list(back) == list(state)


def test_name_mapping_spot_checks_and_prefixes():
    ms_names = [
        "image_encoder.blocks.11.norm2.gamma",
        "mask_decoder.transformer.norm_final_attn.beta",
        "prompt_encoder.point_embeddings.3.embedding_table",
        "prompt_encoder.text_embeddings.embedding_table",
        "image_encoder.neck.3.weight",
        "image_encoder.pos_embed",
    ]
    torch_names = [
        "image_encoder.blocks.11.norm2.weight",
        "mask_decoder.transformer.norm_final_attn.bias",
        "prompt_encoder.point_embeddings.3.weight",
        "prompt_encoder.text_embeddings.weight",
        "image_encoder.neck.3.weight",
        "image_encoder.pos_embed",
    ]
    values = [torch.zeros(1) for _ in ms_names]
    assert list(mindspore_to_torch_names(dict(zip(ms_names, values)))) == torch_names
    assert list(torch_to_mindspore_names(dict(zip(torch_names, values)))) == ms_names

    prefixed = torch_to_mindspore_names({"module.mask_decoder.iou_token.weight": values[0]})
    assert list(prefixed) == ["module.mask_decoder.iou_token.embedding_table"]
    # Look-alikes that are not SAM LayerNorm/Embedding modules stay untouched.
    lookalikes = [
        "image_encoder.blocks.0.norm3.weight",
        "my_image_encoder.blocks.0.norm1.weight",
        "mask_decoder.iou_token.bias",
    ]
    assert list(torch_to_mindspore_names(dict.fromkeys(lookalikes, values[0]))) == lookalikes


def test_name_mapping_collision_raises():
    with pytest.raises(CheckpointError, match="both map to 'x.weight'"):
        mindspore_to_torch_names({"x.weight": torch.zeros(1), "x.gamma": torch.zeros(1)})


def test_full_seed_style_round_trip_through_file(tmp_path, sam_vit_b):
    """Meta names -> MindSpore names -> .ckpt -> read -> Meta names, on small stand-in tensors."""
    names = list(sam_vit_b.state_dict())
    state = {n: torch.full((2,), float(i)) for i, n in enumerate(names)}
    path = tmp_path / "sam_seed.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_mindspore_checkpoint(torch_to_mindspore_names(state), path)
        back = mindspore_to_torch_names(read_mindspore_checkpoint(path))
    assert list(back) == names
    assert all(torch.equal(back[n], state[n]) for n in names)


# ----------------------------------------------------------------------------- the seed's fine-tuned files

PORT_TEXT_NAMES = (
    "prompt_encoder.text_proj.weight",
    "prompt_encoder.text_proj.bias",
    "prompt_encoder.text_embeddings.embedding_table",
)


def port_checkpoint_state(model: torch.nn.Module, layernorm: str) -> dict[str, torch.Tensor]:
    """``model``'s state dict in the port's names: nn.LayerNorm as ``gamma``/``beta`` (MindSpore's
    nn.LayerNorm) or ``weight``/``bias`` (the other spelling its files carry), embeddings as
    ``embedding_table``."""
    state = torch_to_mindspore_names(model.state_dict())
    if layernorm == "weight/bias":
        leaf = {"gamma": "weight", "beta": "bias"}
        state = {
            (
                k.rpartition(".")[0] + "." + leaf[k.rpartition(".")[2]] if k.rpartition(".")[2] in leaf else k
            ): v
            for k, v in state.items()
        }
    return state


@pytest.mark.parametrize("layernorm", ["gamma/beta", "weight/bias"])
def test_seed_fine_tuned_ckpt_with_text_branch_loads_into_plain_and_text_sam(tmp_path, layernorm):
    """The port saves text_proj and text_embeddings in every training checkpoint (box and point
    fine-tunes too): a plain SAM loads it with the branch left out and one note; a text SAM gets it."""
    from samkit import build_model
    from samkit.errors import SamkitNote

    torch.manual_seed(5)
    trained = build_model("vit_tiny", text_feature_dim=256)
    state = port_checkpoint_state(trained, layernorm)
    assert set(PORT_TEXT_NAMES) <= set(state)
    norm = "image_encoder.blocks.0.norm1." + ("gamma" if layernorm == "gamma/beta" else "weight")
    assert norm in state and "mask_decoder.iou_token.embedding_table" in state
    path = tmp_path / "sam_008_coco_box.ckpt"
    write_mindspore_checkpoint(state, path)
    expected = trained.state_dict()

    with pytest.warns(SamkitNote) as notes:
        plain = build_model("vit_tiny", path)
    assert len(notes) == 1
    assert f"{path} has a text-prompt branch (text features of size 256)" in str(notes[0].message)
    got = plain.state_dict()
    assert not any("text" in k for k in got)
    assert all(torch.equal(v, expected[k]) for k, v in got.items())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note: nothing is left out
        text = build_model("vit_tiny", path, text_feature_dim=256)
    got = text.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in got.items())
