"""Read and write MindSpore ``.ckpt`` checkpoints without MindSpore or protobuf installed.

A ``.ckpt`` written by ``mindspore.save_checkpoint`` is a serialized protobuf message (proto2,
``mindspore/ccsrc/utils/checkpoint.proto``)::

    message Checkpoint {
        message Value {
            required string tag = 1;
            oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; }
        }
        repeated Value value = 1;
    }
    message TensorProto {
        repeated int64 dims = 1;           // proto2: not packed, one varint per dim
        required string tensor_type = 2;   // "Float32", "BFloat16", "Int64", "Bool", ... or "str"
        required bytes tensor_content = 3; // raw little-endian C-order array bytes
    }

What ``mindspore/train/serialization.py`` adds on top, and how this module handles it:

* Tensors over 512 MiB are written as several consecutive ``Value`` entries with the same tag and
  the full ``dims``; their ``tensor_content`` pieces are concatenated on load.
* ``save_checkpoint(..., crc_check=True)`` appends the 17-byte trailer
  ``b"crc_num" + crc32(preceding bytes).to_bytes(10, "big")``, which is not protobuf; it is
  stripped and the CRC verified.
* 0-d tensors are stored with ``dims = []`` by current MindSpore and ``dims = [0]`` (one element
  of content) by MindSpore 1.x; both read back as 0-d tensors.
* ``append_dict`` strings are stored with ``tensor_type = "str"`` (UTF-32 text); they are not
  tensors and are skipped. ``MapParameter`` entries (``maptensor``) are skipped with a warning.

The protobuf wire format is parsed here directly; unknown fields are skipped by wire type.
"""

from __future__ import annotations

import codecs
import mmap
import os
import sys
import warnings
import zlib
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch

from samkit.errors import CheckpointError

from ..utils.files import atomic_write

# The SAM name mapping (seed <-> Meta) lives in its own module; importable from here too.
from .mindspore_names import mindspore_to_torch_names, torch_to_mindspore_names

__all__ = [
    "looks_like_mindspore_checkpoint",
    "mindspore_to_torch_names",
    "read_mindspore_checkpoint",
    "torch_to_mindspore_names",
    "write_mindspore_checkpoint",
]

PathLike = Union[str, "os.PathLike[str]"]

# MindSpore dtype strings (str(mindspore.dtype), the keys of serialization.tensor_to_ms_type) -> torch.
_MS_TO_TORCH: Dict[str, torch.dtype] = {
    "Float16": torch.float16,
    "Float32": torch.float32,
    "Float64": torch.float64,
    "BFloat16": torch.bfloat16,
    "Int8": torch.int8,
    "Int16": torch.int16,
    "Int32": torch.int32,
    "Int64": torch.int64,
    "UInt8": torch.uint8,
    "Bool": torch.bool,
}
for _ms_name, _torch_name in (("UInt16", "uint16"), ("UInt32", "uint32"), ("UInt64", "uint64")):
    if hasattr(torch, _torch_name):  # torch >= 2.3
        _MS_TO_TORCH[_ms_name] = getattr(torch, _torch_name)
_TORCH_TO_MS: Dict[torch.dtype, str] = {v: k for k, v in _MS_TO_TORCH.items()}

# MindSpore writes tensors larger than this as several Value entries (SLICE_SIZE = 512 * 1024 KB).
_SLICE_BYTES = 512 * 1024 * 1024
_CRC_MAGIC = b"crc_num"
_CRC_TRAILER_LEN = len(_CRC_MAGIC) + 10

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


class _ParseError(Exception):
    """Internal: what is wrong with the bytes; turned into a CheckpointError naming the file."""


# --------------------------------------------------------------------------- protobuf wire format


def _read_varint(buf, pos: int, end: int) -> Tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return (value as unsigned 64-bit, position after it)."""
    value = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise _ParseError(f"truncated varint at byte {start}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
        if shift >= 70:
            raise _ParseError(f"varint longer than 10 bytes at byte {start}")


def _read_key(buf, pos: int, end: int) -> Tuple[int, int, int]:
    """Read a field key; return (field number, wire type, position after it)."""
    key_at = pos
    key, pos = _read_varint(buf, pos, end)
    field, wire = key >> 3, key & 7
    if field == 0:
        raise _ParseError(f"invalid field number 0 at byte {key_at}")
    return field, wire, pos


def _read_len(buf, pos: int, end: int) -> Tuple[int, int]:
    """Read the length prefix of a length-delimited field; return (start, stop) of its payload."""
    at = pos
    length, pos = _read_varint(buf, pos, end)
    if length > end - pos:
        raise _ParseError(f"truncated: a {length}-byte field at byte {at} runs past its end at byte {end}")
    return pos, pos + length


def _skip(buf, wire: int, pos: int, end: int) -> int:
    """Skip the payload of an unknown field of wire type ``wire``; return the position after it."""
    if wire == _WIRE_VARINT:
        return _read_varint(buf, pos, end)[1]
    if wire == _WIRE_LEN:
        return _read_len(buf, pos, end)[1]
    size = {_WIRE_I64: 8, _WIRE_I32: 4}.get(wire)
    if size is None:  # 3/4 are deprecated groups (never used by checkpoint.proto), 6/7 do not exist
        raise _ParseError(f"unsupported protobuf wire type {wire} at byte {pos}")
    if pos + size > end:
        raise _ParseError(f"truncated fixed-size field at byte {pos}")
    return pos + size


def _expect_len(field: str, wire: int, pos: int) -> None:
    if wire != _WIRE_LEN:
        raise _ParseError(f"field {field} has wire type {wire}, expected length-delimited (byte {pos})")


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class _Entry(NamedTuple):
    """One ``Checkpoint.Value``; the content is referenced by its byte range in the file."""

    tag: str
    dims: Tuple[int, ...]
    dtype: Optional[str]  # None when the Value holds no TensorProto
    content: Tuple[int, int]
    is_map: bool
    at: int  # offset of the Value message, for error messages


def _parse_tensor(buf, pos: int, end: int, acc: dict) -> None:
    """Parse a TensorProto in ``buf[pos:end]`` into ``acc`` (repeated occurrences merge, as in protobuf)."""
    while pos < end:
        field, wire, pos = _read_key(buf, pos, end)
        if field == 1 and wire == _WIRE_VARINT:
            value, pos = _read_varint(buf, pos, end)
            acc["dims"].append(_as_int64(value))
        elif field == 1 and wire == _WIRE_LEN:  # packed encoding, accepted as protobuf parsers do
            start, pos = _read_len(buf, pos, end)
            while start < pos:
                value, start = _read_varint(buf, start, pos)
                acc["dims"].append(_as_int64(value))
        elif field == 2:
            _expect_len("TensorProto.tensor_type", wire, pos)
            start, pos = _read_len(buf, pos, end)
            try:
                acc["dtype"] = bytes(buf[start:pos]).decode("ascii")
            except UnicodeDecodeError:
                raise _ParseError(f"tensor_type at byte {start} is not ASCII") from None
        elif field == 3:
            _expect_len("TensorProto.tensor_content", wire, pos)
            start, pos = _read_len(buf, pos, end)
            acc["content"] = (start, pos - start)
        else:
            pos = _skip(buf, wire, pos, end)


def _parse_value(buf, pos: int, end: int) -> _Entry:
    """Parse a Checkpoint.Value in ``buf[pos:end]``."""
    at = pos
    tag: Optional[str] = None
    tensor: Optional[dict] = None
    is_map = False
    while pos < end:
        field, wire, pos = _read_key(buf, pos, end)
        if field == 1:
            _expect_len("Value.tag", wire, pos)
            start, pos = _read_len(buf, pos, end)
            try:
                tag = bytes(buf[start:pos]).decode("utf-8")
            except UnicodeDecodeError:
                raise _ParseError(f"tensor name at byte {start} is not UTF-8") from None
        elif field == 2:
            _expect_len("Value.tensor", wire, pos)
            start, pos = _read_len(buf, pos, end)
            if tensor is None:
                tensor = {"dims": [], "dtype": None, "content": None}
            _parse_tensor(buf, start, pos, tensor)
        elif field == 3:
            _expect_len("Value.maptensor", wire, pos)
            pos = _read_len(buf, pos, end)[1]
            is_map = True
        else:
            pos = _skip(buf, wire, pos, end)
    if tag is None:
        raise _ParseError(f"entry at byte {at} has no name (required field Value.tag)")
    if tensor is None:
        if not is_map:
            raise _ParseError(f"entry {tag!r} at byte {at} holds no tensor")
        return _Entry(tag, (), None, (0, 0), True, at)
    if tensor["dtype"] is None or tensor["content"] is None:
        raise _ParseError(f"tensor {tag!r} at byte {at} lacks its tensor_type or tensor_content")
    return _Entry(tag, tuple(tensor["dims"]), tensor["dtype"], tensor["content"], False, at)


def _parse_checkpoint(buf, end: int) -> List[_Entry]:
    """Parse the top-level Checkpoint message in ``buf[0:end]``."""
    entries: List[_Entry] = []
    pos = 0
    while pos < end:
        field, wire, pos = _read_key(buf, pos, end)
        if field == 1:
            _expect_len("Checkpoint.value", wire, pos)
            start, pos = _read_len(buf, pos, end)
            entries.append(_parse_value(buf, start, pos))
        else:
            pos = _skip(buf, wire, pos, end)
    return entries


# --------------------------------------------------------------------------- reading


def _tensor_shape(entry: _Entry, nbytes: int, itemsize: int) -> Tuple[int, ...]:
    dims = entry.dims
    if any(d < 0 for d in dims):
        raise _ParseError(f"tensor {entry.tag!r} has negative dims {list(dims)}")
    # MindSpore 1.x wrote 0-d tensors as dims [0] with one element of content.
    if dims == (0,) and nbytes == itemsize:
        return ()
    return dims


def _build_tensors(buf, entries: List[_Entry]) -> Dict[str, torch.Tensor]:
    # Group consecutive entries with the same tag: MindSpore's slices of one large tensor.
    groups: List[List[_Entry]] = []
    for entry in entries:
        if groups and groups[-1][0].tag == entry.tag:
            groups[-1].append(entry)
        else:
            groups.append([entry])

    out: Dict[str, torch.Tensor] = {}
    seen = set()
    for group in groups:
        first = group[0]
        if first.tag in seen:
            raise _ParseError(f"tensor name {first.tag!r} appears twice, at separate places")
        seen.add(first.tag)
        if any(e.is_map or e.dtype is None for e in group):
            warnings.warn(
                f"skipping {first.tag!r}: MindSpore MapParameter entries have no PyTorch equivalent",
                stacklevel=3,
            )
            continue
        for e in group[1:]:
            if e.dtype != first.dtype or e.dims != first.dims:
                raise _ParseError(
                    f"slices of tensor {first.tag!r} disagree: {first.dtype}{list(first.dims)} "
                    f"vs {e.dtype}{list(e.dims)} at byte {e.at}"
                )
        if first.dtype == "str":  # save_checkpoint(append_dict=...) metadata strings
            continue
        dtype = _MS_TO_TORCH.get(first.dtype)  # type: ignore[arg-type]
        if dtype is None:
            raise _ParseError(f"tensor {first.tag!r} has unsupported tensor_type {first.dtype!r}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = sum(e.content[1] for e in group)
        shape = _tensor_shape(first, nbytes, itemsize)
        numel = 1
        for d in shape:
            numel *= d
        if numel * itemsize != nbytes:
            raise _ParseError(
                f"tensor {first.tag!r}: dims {list(first.dims)} of {first.dtype} need "
                f"{numel * itemsize} bytes but the file holds {nbytes}"
            )
        raw = torch.empty(nbytes, dtype=torch.uint8)
        dst = raw.numpy()
        filled = 0
        for e in group:
            offset, length = e.content
            if length:
                dst[filled : filled + length] = np.frombuffer(
                    buf, dtype=np.uint8, count=length, offset=offset
                )
                filled += length
        if dtype == torch.bool and nbytes and int(raw.max()) > 1:
            raise _ParseError(f"tensor {first.tag!r} of type Bool holds bytes other than 0 and 1")
        out[first.tag] = raw.view(dtype).reshape(shape)
    return out


def _sniff_other_format(head: bytes) -> str:
    if head.startswith(b"PK"):
        return " (it looks like a zip archive, e.g. a PyTorch torch.save file)"
    if head[:1] == b"\x80":
        return " (it looks like a Python pickle, e.g. an old-style PyTorch file)"
    return ""


def read_mindspore_checkpoint(path: PathLike, *, verify_crc: bool = True) -> Dict[str, torch.Tensor]:
    """Read a MindSpore ``.ckpt`` file into CPU tensors keyed by their MindSpore names, in file order.

    Slices of large tensors are concatenated, a ``crc_check`` trailer is verified when
    ``verify_crc`` is true, ``str`` metadata entries are skipped and MapParameter entries are
    skipped with a warning. The file is memory-mapped and each tensor is copied once out of the
    map (into its own aligned buffer), so no second private copy of the whole file is made.

    Raises:
        CheckpointError: the file is missing, unreadable, empty, truncated, not a MindSpore
            checkpoint (a zip, pickle or random bytes), fails its CRC, holds a tensor whose
            dims do not match its content size, or uses a dtype PyTorch cannot represent.
    """
    name = os.fspath(path)
    if sys.byteorder != "little":
        raise CheckpointError(f"{name}: reading MindSpore checkpoints needs a little-endian machine")
    try:
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CheckpointError(f"{name}: not a MindSpore checkpoint: the file is empty")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as err:
        raise CheckpointError(f"{name}: cannot read MindSpore checkpoint: {err.strerror or err}") from None

    try:
        head = bytes(buf[:4])
        end = size
        try:
            if size >= _CRC_TRAILER_LEN and buf[size - _CRC_TRAILER_LEN : size - 10] == _CRC_MAGIC:
                end = size - _CRC_TRAILER_LEN
                if verify_crc:
                    stored = int.from_bytes(buf[size - 10 : size], "big")
                    # zlib.crc32 over the mmap itself; release the export before closing the map.
                    with memoryview(buf) as view, view[:end] as body:
                        actual = zlib.crc32(body)
                    if actual != stored:
                        raise _ParseError(
                            f"CRC mismatch (stored {stored:#x}, computed {actual:#x}); the file is damaged"
                        )
            entries = _parse_checkpoint(buf, end)
            if not entries:
                raise _ParseError("no tensors found")
            tensors = _build_tensors(buf, entries)
        except _ParseError as err:
            raise CheckpointError(
                f"{name}: not a valid MindSpore checkpoint: {err}{_sniff_other_format(head)}"
            ) from None
        if not tensors:
            raise CheckpointError(f"{name}: MindSpore checkpoint holds no tensors, only metadata entries")
        return tensors
    finally:
        try:
            buf.close()
        except BufferError:  # a view is still alive somewhere; the map is closed when it is freed
            pass


def looks_like_mindspore_checkpoint(path: PathLike) -> bool:
    """Cheaply tell whether ``path`` starts like a MindSpore ``.ckpt`` (reads at most 256 bytes).

    A checkpoint starts with ``Checkpoint.value`` (byte ``0x0a``, a length) whose first field is
    the ``Value.tag`` string (``0x0a`` again, a length, UTF-8 text). PyTorch files start with
    ``b"PK"`` (zip) or ``0x80`` (pickle) and never match. Unreadable or empty files give ``False``.
    """
    try:
        with open(os.fspath(path), "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    try:
        if not head or head[0] != 0x0A:
            return False
        value_len, pos = _read_varint(head, 1, len(head))
        if pos >= len(head) or head[pos] != 0x0A:
            return False
        tag_len, pos = _read_varint(head, pos + 1, len(head))
        if tag_len + 2 > value_len:
            return False
        tag = head[pos : pos + tag_len]
        # A name cut off by the 256-byte window may end inside a multi-byte character.
        codecs.getincrementaldecoder("utf-8")().decode(tag, final=len(tag) == tag_len)
        return True
    except (_ParseError, UnicodeDecodeError):
        return False


# --------------------------------------------------------------------------- writing


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= 0xFFFFFFFFFFFFFFFF
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(field: int, payload_len: int) -> bytes:
    return _varint((field << 3) | _WIRE_LEN) + _varint(payload_len)


def _raw_bytes(name: str, value: object, path: str) -> Tuple[List[int], str, np.ndarray, int]:
    """Return (dims, MindSpore dtype, flat uint8 array of little-endian bytes, itemsize)."""
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)  # not ascontiguousarray: it turns 0-d arrays into 1-d ones
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        array = array.astype(array.dtype.newbyteorder("="), copy=False)
        value = torch.from_numpy(array if array.flags.writeable else array.copy())
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"tensor {name!r}: expected a torch.Tensor or numpy.ndarray, got {type(value).__name__}"
        )
    tensor = value.detach().to("cpu").contiguous()
    ms_dtype = _TORCH_TO_MS.get(tensor.dtype)
    if ms_dtype is None:
        raise CheckpointError(
            f"{path}: cannot write tensor {name!r}: MindSpore checkpoints have no {tensor.dtype}"
        )
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    return list(tensor.shape), ms_dtype, raw, tensor.element_size()


def write_mindspore_checkpoint(
    tensors: Mapping[str, Union[torch.Tensor, np.ndarray]], path: PathLike, *, crc_check: bool = False
) -> None:
    """Write tensors to ``path`` as a MindSpore ``.ckpt``, loadable by ``mindspore.load_checkpoint``.

    Names are written unchanged (see :func:`torch_to_mindspore_names`). Tensors over 512 MiB are
    split into several same-named entries as MindSpore does; 0-d tensors get ``dims = []`` as in
    current MindSpore. With ``crc_check`` the MindSpore CRC trailer is appended. The file is
    written to a hidden temporary file and renamed into place, so a failed write leaves no partial file.

    Raises:
        TypeError: a name is not a string or a value is not a tensor, array or NumPy scalar.
        CheckpointError: a tensor has a dtype MindSpore checkpoints cannot hold (e.g. complex, float8).
    """
    name = os.fspath(path)
    if sys.byteorder != "little":
        raise CheckpointError(f"{name}: writing MindSpore checkpoints needs a little-endian machine")
    prepared = []
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"tensor names must be strings, got {key!r}")
        prepared.append((key, *_raw_bytes(key, value, name)))

    crc = 0
    with atomic_write(name) as f:
        for key, dims, ms_dtype, raw, itemsize in prepared:
            tag = key.encode("utf-8")
            type_bytes = ms_dtype.encode("ascii")
            dims_bytes = b"".join(b"\x08" + _varint(d) for d in dims)
            step = max(itemsize, _SLICE_BYTES // itemsize * itemsize)
            starts = range(0, raw.size, step) if raw.size else [0]
            for start in starts:
                piece = raw[start : start + step]
                tensor_head = dims_bytes + _len_field(2, len(type_bytes)) + type_bytes
                tensor_head += _len_field(3, piece.size)
                tensor_len = len(tensor_head) + piece.size
                value_head = _len_field(1, len(tag)) + tag + _len_field(2, tensor_len)
                head = _len_field(1, len(value_head) + tensor_len) + value_head + tensor_head
                f.write(head)
                f.write(piece.data)
                if crc_check:
                    crc = zlib.crc32(piece.data, zlib.crc32(head, crc))
        if crc_check:
            f.write(_CRC_MAGIC + crc.to_bytes(10, "big"))
