import io
import struct

import msgpack
import pytest
import torch

from common.wire.tensors import TensorFormatError, decode_state, encode_state, narrowed_dtypes, write_state


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(4, 5, generator=g),
        "wbf16": torch.randn(7, generator=g).bfloat16(),
        "wf16": torch.randn(3, 3, generator=g).half(),
        "q8": torch.randint(-128, 127, (11,), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 255, (2, 2), dtype=torch.uint8, generator=g),
        "i32": torch.randint(-(2**31), 2**31 - 1, (5,), dtype=torch.int32, generator=g),
        "i64": torch.tensor([2**62, -1]),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "noncontig": torch.randn(4, 6, generator=g).t(),
    }


def test_every_dtype_round_trips_bit_exactly():
    state = _state()
    out = decode_state(encode_state(state))
    assert list(out) == list(state)
    for k in state:
        assert out[k].dtype == state[k].dtype and out[k].shape == state[k].shape
        assert torch.equal(out[k], state[k]), k


def test_nan_payload_bits_survive():
    t = torch.tensor([float("nan"), float("inf"), -0.0])
    out = decode_state(encode_state({"t": t}))["t"]
    assert out.view(torch.int32).tolist() == t.view(torch.int32).tolist()


def _with_header(data, mutate):
    (n,) = struct.unpack("<I", data[4:8])
    header = msgpack.unpackb(data[8:8 + n])
    mutate(header)
    head = msgpack.packb(header)
    return data[:4] + struct.pack("<I", len(head)) + head + data[8 + n:]


def test_lying_sizes_are_rejected():
    data = encode_state({"a": torch.zeros(4), "b": torch.zeros(2)})
    with pytest.raises(TensorFormatError, match="needs"):
        decode_state(_with_header(data, lambda h: h[0].__setitem__(2, [400])))
    with pytest.raises(TensorFormatError, match="declares"):
        decode_state(_with_header(data, lambda h: h[0].__setitem__(4, 8)))
    with pytest.raises(TensorFormatError):
        decode_state(data[:-1])
    with pytest.raises(TensorFormatError, match="unexplained"):
        decode_state(data + b"\x00")
    with pytest.raises(TensorFormatError, match="magic"):
        decode_state(b"XXXX" + data[4:])
    with pytest.raises(TensorFormatError, match="header length"):
        decode_state(data[:4] + struct.pack("<I", 10**7) + data[8:])


def test_a_state_written_to_a_file_one_tensor_at_a_time_is_the_same_frame(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.tensor([True, False])}
    path = tmp_path / "frame.bin"
    with open(path, "wb") as f:
        written = write_state(state, f)
    assert path.read_bytes() == encode_state(state) and written == path.stat().st_size
    assert all(torch.equal(decode_state(path.read_bytes())[n], t) for n, t in state.items())


def test_narrowed_dtypes_narrow_float32_tensors_that_fit_and_keep_the_rest_float32():
    state = {"w": torch.tensor([1.0, -65504.0]), "big": torch.tensor([1.0, 65520.0]), "nan": torch.tensor([float("nan")]),
             "inf": torch.tensor([float("inf")]), "empty": torch.zeros(0), "steps": torch.tensor([3]),
             "half": torch.tensor([1.0], dtype=torch.float16)}
    assert narrowed_dtypes(state, "float16") == {"w": torch.float16, "big": torch.float32, "nan": torch.float32,
                                                 "inf": torch.float32, "empty": torch.float16}
    assert narrowed_dtypes(state, "bfloat16")["big"] is torch.bfloat16  # bf16 holds 65520 (as 65536)
    assert narrowed_dtypes(state, "float32") == {}
    with pytest.raises(ValueError, match="float8"):
        narrowed_dtypes(state, "float8")


def test_write_state_casts_as_told_and_the_frame_decodes_to_the_cast_values():
    gen = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(300, generator=gen), "b": torch.randn(7, 3, generator=gen) * 1e5, "i": torch.arange(4)}
    buf = io.BytesIO()
    n = write_state(state, buf, narrowed_dtypes(state, "float16"))
    out = decode_state(buf.getvalue())
    assert n == len(buf.getvalue()) and len(buf.getvalue()) < len(encode_state(state)) - 2 * 300 + 64
    assert out["a"].dtype is torch.float16 and torch.equal(out["a"], state["a"].half())
    assert out["b"].dtype is torch.float32 and torch.equal(out["b"], state["b"])  # above float16's range
    assert torch.equal(out["i"], state["i"])
