"""Tensor wire framing: a state dict (name -> torch.Tensor) as raw little-endian buffers.

Layout (a common.wire.envelope): ``b"MQT1"`` | u32 LE header length | msgpack header | buffers.
The header is a list of ``[name, dtype, shape, offset, nbytes]``; offsets are relative to the start of the
buffer section and must tile it exactly (no gaps, no overlap, nothing after the last tensor). Decoding
checks every declared size against dtype x shape and against the actual bytes, so a lying header raises
`TensorFormatError` instead of reading garbage. Values round-trip bit-exactly (bf16/fp16 included).
"""
from __future__ import annotations

import io
import math
import sys
from typing import BinaryIO

import torch

from common.errors import MqfedError
from common.wire import envelope

MAGIC = b"MQT1"
_MAX_HEADER = 16 * 1024 * 1024
#: Largest product of a shape's dimensions (zero dimensions counted as 1): torch refuses shapes whose
#: sizes or strides overflow int64, even for tensors with no elements, such as [0, 2**63].
_MAX_SPAN = 1 << 62
DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64,
    "i8": torch.int8, "u8": torch.uint8, "i16": torch.int16, "i32": torch.int32, "i64": torch.int64,
    "bool": torch.bool,
}
_NAME_OF = {v: k for k, v in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("common.wire.tensors assumes a little-endian host")


class TensorFormatError(MqfedError, ValueError):
    """The bytes are not a valid tensor frame (bad magic, lying sizes, unknown dtype...)."""


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype is torch.bool:
        t = t.to(torch.uint8)
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


#: The precisions model versions may travel in (coordinator's `tasks.model_dtype`).
WIRE_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_LARGEST = {torch.float16: 65504.0, torch.bfloat16: float(torch.finfo(torch.bfloat16).max)}


def narrowed_dtypes(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.dtype]:
    """The dtype each float32 tensor of `state` travels in when versions travel in `dtype`: `dtype` where
    every value fits it (finite, within its range), else float32. Other tensors are not listed."""
    if dtype not in WIRE_FLOAT_DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}; known: {', '.join(WIRE_FLOAT_DTYPES)}")
    narrow = getattr(torch, dtype)
    out = {}
    for name, t in state.items():
        if t.dtype is torch.float32 and narrow is not torch.float32:
            fits = t.numel() == 0 or bool(t.detach().abs().max() <= _LARGEST[narrow])  # NaN compares False
            out[name] = narrow if fits else torch.float32
    return out


def encode_state(state: dict[str, torch.Tensor]) -> bytes:
    """Encode name -> tensor into one bytes object (see module doc for the layout)."""
    buf = io.BytesIO()
    write_state(state, buf)
    return buf.getvalue()


def write_state(state: dict[str, torch.Tensor], out: BinaryIO, dtypes: dict[str, torch.dtype] | None = None) -> int:
    """Write `encode_state(state)`'s bytes to `out`, one tensor at a time (memory: the largest tensor, twice
    when cast); returns the number of bytes written. dtypes: name -> the dtype to cast that tensor to."""
    dtypes = dtypes or {}
    header, offset = [], 0
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        dtype = dtypes.get(name, t.dtype)
        if dtype not in _NAME_OF:
            raise TypeError(f"{name}: dtype {dtype} is not supported on the wire")
        nbytes = t.numel() * (1 if dtype is torch.bool else torch.empty((), dtype=dtype).element_size())
        header.append([name, _NAME_OF[dtype], list(t.shape), offset, nbytes])
        offset += nbytes
    written = out.write(envelope.pack(MAGIC, header))
    for name, t in state.items():
        written += out.write(_raw(t.to(dtypes.get(name, t.dtype))))
    return written


def decode_state(data: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """Decode bytes from `encode_state`; raises TensorFormatError on any inconsistency."""
    header, body = envelope.unpack(data, MAGIC, TensorFormatError, what="a tensor frame", max_header=_MAX_HEADER,
                                   max_bin_len=0, max_str_len=65536)
    if not isinstance(header, list):
        raise TensorFormatError("tensor header is not a list")
    expected_offset = 0
    out: dict[str, torch.Tensor] = {}
    for entry in header:
        if not (isinstance(entry, list) and len(entry) == 5):
            raise TensorFormatError(f"bad header entry {entry!r:.80}")
        name, dname, shape, offset, nbytes = entry
        if not isinstance(name, str) or name in out:
            raise TensorFormatError(f"bad or duplicate tensor name {name!r:.80}")
        if not isinstance(dname, str) or dname not in DTYPES:
            raise TensorFormatError(f"{name}: unknown dtype {dname!r:.40}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and math.prod(max(d, 1) for d in shape) <= _MAX_SPAN):
            raise TensorFormatError(f"{name}: bad shape {shape!r:.80}")
        if type(offset) is not int or type(nbytes) is not int:
            raise TensorFormatError(f"{name}: offset and size must be integers, got {offset!r:.40} and {nbytes!r:.40}")
        dtype = DTYPES[dname]
        itemsize = 1 if dtype is torch.bool else torch.empty((), dtype=dtype).element_size()
        want = math.prod(shape) * itemsize
        if nbytes != want:
            raise TensorFormatError(f"{name}: declares {nbytes} bytes but {dname}{shape} needs {want}")
        if offset != expected_offset:
            raise TensorFormatError(f"{name}: offset {offset} where {expected_offset} was expected")
        if offset + nbytes > len(body):
            raise TensorFormatError(f"{name}: needs bytes up to {offset + nbytes}, frame has {len(body)}")
        raw = bytearray(body[offset:offset + nbytes])
        flat = torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        t = flat.view(torch.uint8 if dtype is torch.bool else dtype)
        if dtype is torch.bool:
            t = t.to(torch.bool)
        out[name] = t.reshape(shape)
        expected_offset = offset + nbytes
    if expected_offset != len(body):
        raise TensorFormatError(f"{len(body) - expected_offset} unexplained bytes after the last tensor")
    return out
