"""The framing shared by every binary format here: ``magic | u32 LE header length | msgpack header | body``.

``magic`` is 4 bytes naming the format (b"MQT1" tensor frames, b"MQC1" encoded updates, b"MQEF" residual
files); the body is opaque to this module. Pure: stdlib and msgpack only.
"""
from __future__ import annotations

import struct

import msgpack

_PREFIX = 8  # magic (4) + header length (4)


def pack(magic: bytes, header: object, *body: bytes | memoryview) -> bytes:
    """``magic | u32 LE len(packed header) | msgpack(header) | body parts``, joined in one bytes object.

    With no body parts this is the prefix alone; appending the body to it (say, written to a file
    separately) gives the same bytes. Raises ValueError for a magic that is not 4 bytes.
    """
    if len(magic) != 4:
        raise ValueError(f"magic must be 4 bytes, got {magic!r}")
    head = msgpack.packb(header, use_bin_type=True)
    return b"".join([magic, struct.pack("<I", len(head)), head, *body])


def unpack(
    data: bytes | bytearray | memoryview,
    magic: bytes,
    error: type[Exception],
    *,
    what: str,
    max_header: int,
    **limits: object,
) -> tuple[object, memoryview]:
    """(header, body) from bytes written by ``pack(magic, header, *body)``; the body is a view, not a copy.

    what: names the format in messages, with its article ("an encoded update"). max_header: the most
    header bytes accepted. limits: passed to ``msgpack.unpackb`` (max_bin_len=0, max_str_len=...).
    Raises ``error(message)`` for data shorter than the prefix, another magic, a header length above
    ``max_header`` or beyond the data, or a header msgpack cannot read. The header's type is not checked.
    """
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX:
        raise error(f"not {what} (bad magic): {len(view)} bytes is shorter than the {_PREFIX}-byte prefix")
    if bytes(view[:4]) != magic:
        raise error(f"not {what} (bad magic)")
    (head_len,) = struct.unpack("<I", view[4:_PREFIX])
    if head_len > max_header:
        raise error(f"header length {head_len} exceeds the limit of {max_header} bytes")
    if _PREFIX + head_len > len(view):
        raise error(f"header length {head_len} exceeds {what} of {len(view)} bytes")
    try:
        header = msgpack.unpackb(view[_PREFIX:_PREFIX + head_len], raw=False, **limits)
    except Exception as exc:
        raise error(f"unreadable header: {exc}") from None
    return header, view[_PREFIX + head_len:]
