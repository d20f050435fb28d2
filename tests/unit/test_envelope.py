import struct

import msgpack
import pytest

from common.wire.envelope import pack, unpack

MAGIC = b"TST1"


class FrameError(ValueError):
    pass


def _unpack(data, **limits):
    return unpack(data, MAGIC, FrameError, what="a test frame", max_header=1024, **limits)


def test_a_packed_frame_round_trips_header_and_body():
    header = {"name": "w", "shape": [2, 3], "codec": None}
    data = pack(MAGIC, header, b"abc", memoryview(b"def"), b"")
    got, body = _unpack(data)
    assert got == header
    assert isinstance(body, memoryview) and bytes(body) == b"abcdef"


def test_the_layout_is_magic_then_u32_le_length_then_msgpack_then_body():
    head = msgpack.packb([1, "x"], use_bin_type=True)
    assert pack(MAGIC, [1, "x"], b"body") == MAGIC + struct.pack("<I", len(head)) + head + b"body"


def test_a_prefix_packed_without_a_body_can_be_followed_by_the_body():
    assert pack(MAGIC, {"a": 1}) + b"body" == pack(MAGIC, {"a": 1}, b"body")


def test_an_empty_body_unpacks_to_an_empty_view():
    header, body = _unpack(bytearray(pack(MAGIC, "h")))
    assert header == "h" and len(body) == 0


def test_another_magic_is_refused():
    data = b"XXXX" + pack(MAGIC, {"a": 1}, b"body")[4:]
    with pytest.raises(FrameError, match=r"^not a test frame \(bad magic\)$"):
        _unpack(data)


@pytest.mark.parametrize("size", [0, 3, 4, 7])
def test_data_shorter_than_magic_and_header_length_is_refused(size):
    with pytest.raises(FrameError, match=rf"not a test frame \(bad magic\): {size} bytes is shorter"):
        _unpack(pack(MAGIC, {"a": 1})[:size])


def test_a_header_longer_than_the_data_is_refused():
    data = pack(MAGIC, {"key": "value"}, b"")
    with pytest.raises(FrameError, match=rf"header length {len(data) - 8} exceeds a test frame of {len(data) - 1} bytes"):
        _unpack(data[:-1])


def test_a_header_length_above_max_header_is_refused_before_reading_it():
    data = MAGIC + struct.pack("<I", 1025) + bytes(2000)
    with pytest.raises(FrameError, match="header length 1025 exceeds the limit of 1024 bytes"):
        _unpack(data)


def test_a_header_of_exactly_max_header_bytes_is_read():
    header = "x" * (1024 - 3)  # str 16: 1 type byte + 2 length bytes
    assert _unpack(pack(MAGIC, header))[0] == header


@pytest.mark.parametrize("head", [b"\xc1", b"\x92\x01", b"\x01\x02"], ids=["reserved byte", "truncated array", "extra data"])
def test_an_unreadable_msgpack_header_is_refused(head):
    data = MAGIC + struct.pack("<I", len(head)) + head + b"body"
    with pytest.raises(FrameError, match="^unreadable header: "):
        _unpack(data)


def test_the_callers_msgpack_limits_apply_to_the_header():
    data = pack(MAGIC, {"blob": b"\x00" * 4})
    assert _unpack(data)[0] == {"blob": b"\x00" * 4}
    with pytest.raises(FrameError, match="^unreadable header: "):
        _unpack(data, max_bin_len=0)


def test_a_magic_that_is_not_four_bytes_cannot_be_packed():
    with pytest.raises(ValueError, match="magic must be 4 bytes"):
        pack(b"TOOLONG", {})
