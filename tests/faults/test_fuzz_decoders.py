"""Fuzz every decoder that reads bytes from the wire or the disk, with a fixed budget (hypothesis,
derandomized: the same examples every run, no example database).

Random bytes rarely get past a decoder's first check (magic, msgpack framing), so each target is fed
valid encodings mutated at three depths: bytes (flips, truncation, splices of random bytes or of other
valid encodings), structure (the msgpack header or map re-packed with one field dropped, added or replaced
by an arbitrary msgpack value, which reaches the type and size checks), and for update payloads the body
(decompressed, its tensor frame altered, recompressed, `body_len` fixed up, which reaches the per-tensor
checks). Only the decoder's documented error type may escape; anything else is a bug:

| decoder                              | may raise                    |
|--------------------------------------|------------------------------|
| common.wire.messages.decode               | MessageError                 |
| common.wire.tensors.decode_state          | TensorFormatError            |
| common.compression.codecs.decode                 | CodecError                   |
| codecs.decode + Aggregator.add       | CodecError, UpdateRejected   |
| common.wire.chunks.Reassembler.add        | ChunkError                   |
| coordinator.checkpoint.load          | CheckpointError              |
| worker task path (Trainer._on_task)  | nothing: ack, nack or reject |

What does decode must be well formed (round-trips, finite, indices in range). tests/unit/test_codecs.py
already fuzzes codecs.decode with byte-level mutations; the codec tests here add the structure and body
levels, lzma and bitmap-indexed payloads, and the coordinator's decode-then-validate path.
"""
from __future__ import annotations

import hashlib
import lzma
import math
import os
import struct
import tempfile
import types
import zlib
from pathlib import Path

import msgpack
import pika.compat
import pika.data
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common.compression import codecs
from common.compression.sparse import SparseTensor
from common.learning.config import TrainConfig
from common.metrics import WorkerMetrics
from common.wire import messages
from common.wire.chunks import ChunkError, Reassembler, publish_chunked
from common.wire.tensors import TensorFormatError, decode_state, encode_state
from coordinator import checkpoint
from coordinator.aggregator import Aggregator, AggregatorConfig, ClientUpdate, UpdateRejected

pytestmark = pytest.mark.faults

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- generic mutations -----------------------------------------------------------------------------------------

_KEYS = st.one_of(st.text(max_size=8), st.binary(max_size=8))
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1),
    st.sampled_from([0, 1, -1, 7, 255, 256, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]),
    st.floats(), st.text(max_size=16), st.binary(max_size=16),
)
#: any value msgpack can carry (maps with str or bytes keys, as strict_map_key allows)
MSGPACK_VALUES = st.recursive(
    _SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=8)


def _packed_values():
    return MSGPACK_VALUES.map(lambda v: msgpack.packb(v, use_bin_type=True))


def byte_mutations(seeds: list[bytes]):
    """Bytes of a seed with a few bytes overwritten, truncated, or with random bytes / a valid msgpack
    encoding / another seed spliced in; or random bytes (with a seed's first 4 bytes half the time)."""
    seed = st.sampled_from(seeds)
    pos = st.integers(0, 1 << 30)
    flip = st.tuples(seed, st.lists(st.tuples(pos, st.integers(0, 255)), min_size=1, max_size=6)).map(
        lambda t: _overwrite(t[0], t[1]))
    bitflip = st.tuples(seed, pos, st.integers(0, 7)).map(lambda t: _overwrite(
        t[0], [(t[1], t[0][t[1] % len(t[0])] ^ (1 << t[2]))]))
    cut = st.tuples(seed, pos).map(lambda t: t[0][: t[1] % (len(t[0]) + 1)])
    insert = st.tuples(seed, pos, st.one_of(st.binary(min_size=1, max_size=32), _packed_values(), seed)).map(
        lambda t: t[0][: t[1] % (len(t[0]) + 1)] + t[2] + t[0][t[1] % (len(t[0]) + 1):])
    delete = st.tuples(seed, pos, st.integers(1, 64)).map(
        lambda t: t[0][: t[1] % len(t[0])] + t[0][t[1] % len(t[0]) + t[2]:])
    raw = st.binary(max_size=256)
    headed = st.tuples(seed, st.binary(max_size=256)).map(lambda t: t[0][:4] + t[1])
    return st.one_of(flip, bitflip, cut, insert, delete, raw, headed)


def _overwrite(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


def _edit_map(draw, body: dict, interesting_keys: list) -> dict:
    """`body` with one key dropped, replaced by any msgpack value, or a new key added."""
    body = dict(body)
    op = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
    if op == "add" or not body:
        body[draw(st.one_of(_KEYS, st.sampled_from(interesting_keys)))] = draw(MSGPACK_VALUES)
    else:
        key = draw(st.sampled_from(sorted(body, key=repr)))
        if op == "drop":
            del body[key]
        else:
            body[key] = draw(st.one_of(MSGPACK_VALUES, st.sampled_from(list(body.values()))))
    return body


# -- common.wire.messages.decode --------------------------------------------------------------------------------

_FAR = 4_000_000_000.0
MESSAGE_SEEDS = [
    messages.TrainTask("exp", "run-1", "t1", 3, _FAR, "topk:0.01", "kws-tiny", False,
                       TrainConfig(steps=50, epochs=1.0, batch_size=16, learning_rate=1e-4)),
    messages.TrainTask("exp", "run-1", "t2", 3, _FAR, "none", "kws-tiny", False,
                       TrainConfig(steps=5, speed=(0.9, 1.1), gain_db=6.0, noise_snr_db=(5.0, 20.0), time_masks=2,
                                   time_mask_ms=40.0)),
    messages.EvaluateTask("exp", "e1", 4, "validation", _FAR),
    messages.Update("exp", "t1", "node-a/cpu", 3, 128, {"loss": 0.5}, "none", 400, 2,
                    messages.PayloadRef(inline=b"\0\1")),
    messages.Update("exp", "t2", "node-a/cpu", 3, 128, {}, "int8", 400, 100, messages.PayloadRef(transfer_id="abc")),
    messages.ModelVersion("exp", 7, 1234, 48, 380_000_000, "ab" * 32, "tid", 1700000000.5),
    messages.Registration("exp", "node-a", ["cuda:0", "cuda:1"], "iid:1/2", 5120),
    messages.Heartbeat("exp", "node-a", "cuda:0", 1700000000.0, "training"),
    messages.Metrics("exp", "coordinator", 7, {"accuracy": 0.91}, 1700000000.0),
]
_MESSAGE_BYTES = [messages.encode(m) for m in MESSAGE_SEEDS]
_FIELD_NAMES = sorted({f for m in MESSAGE_SEEDS for f in m.__dataclass_fields__} | {"t", "v"})


@st.composite
def message_mutations(draw):
    if draw(st.booleans()):
        return draw(byte_mutations(_MESSAGE_BYTES))
    body = msgpack.unpackb(draw(st.sampled_from(_MESSAGE_BYTES)), raw=False)
    for _ in range(draw(st.integers(1, 3))):
        body = _edit_map(draw, body, _FIELD_NAMES + ["inline", "transfer_id"])
        if isinstance(body.get("payload"), dict) and draw(st.booleans()):
            body["payload"] = _edit_map(draw, body["payload"], ["inline", "transfer_id"])
    return msgpack.packb(body, use_bin_type=True)


def _check_message(data: bytes) -> messages.Message | None:
    try:
        msg = messages.decode(data)
    except messages.MessageError:
        return None
    assert type(msg) in messages.MESSAGE_TYPES.values()
    again = messages.encode(msg)
    assert messages.encode(messages.decode(again)) == again  # what decodes re-encodes to itself
    return msg


@FUZZ
@given(data=message_mutations())
@example(data=msgpack.packb({"t": [], "v": 1}))  # a tag that cannot be looked up (was TypeError)
@example(data=msgpack.packb({"t": "heartbeat", "v": 1, b"x": 1, "y": 2}, use_bin_type=True))  # str and bytes names
def test_messages_decode_raises_only_message_errors(data):
    _check_message(data)


# -- common.wire.tensors.decode_state ----------------------------------------------------------------------------

_STATE = {
    "w": torch.arange(6, dtype=torch.float32).view(2, 3), "i": torch.arange(4),
    "mask": torch.tensor([True, False, True]),
    "half": torch.ones((), dtype=torch.bfloat16), "empty": torch.empty(0, 5, dtype=torch.float16),
    "u": torch.arange(3, dtype=torch.uint8),
}
_FRAME = encode_state(_STATE)


def _split_frame(frame: bytes, magic: bytes) -> tuple[object, bytes]:
    (n,) = struct.unpack("<I", frame[4:8])
    assert frame[:4] == magic
    return msgpack.unpackb(frame[8:8 + n], raw=False), frame[8 + n:]


def _join_frame(magic: bytes, header, body: bytes) -> bytes:
    head = msgpack.packb(header, use_bin_type=True)
    return magic + struct.pack("<I", len(head)) + head + body


@st.composite
def frame_mutations(draw, frame: bytes = _FRAME):
    if draw(st.booleans()):
        return draw(byte_mutations([frame]))
    header, body = _split_frame(frame, b"MQT1")
    op = draw(st.sampled_from(["entry", "entry", "entry", "drop", "duplicate", "header", "body"]))
    if op == "entry":
        i = draw(st.integers(0, len(header) - 1))
        entry = list(header[i])
        j = draw(st.integers(0, 4))
        dims = st.lists(st.sampled_from([0, 1, 2, 3, 5, 1 << 31, (1 << 63) - 1, 1 << 63]), max_size=4)
        entry[j] = draw(st.one_of(MSGPACK_VALUES, st.integers(-2, 2 * len(body)), dims))
        header[i] = entry
    elif op == "drop":
        header.pop(draw(st.integers(0, len(header) - 1)))
    elif op == "duplicate":
        header.append(header[draw(st.integers(0, len(header) - 1))])
    elif op == "header":
        header = draw(MSGPACK_VALUES)
    else:
        body = draw(byte_mutations([body]))
    return _join_frame(b"MQT1", header, body)


@FUZZ
@given(data=frame_mutations())
@example(data=_join_frame(b"MQT1", [["a", [1], [2], 0, 8]], bytes(8)))  # unhashable dtype (was TypeError)
@example(data=_join_frame(b"MQT1", [["a", "f32", [2], 0.0, 8]], bytes(8)))  # float offset (was TypeError)
@example(data=_join_frame(b"MQT1", [["a", "f32", [2], 0, 8.0]], bytes(8)))  # float size (was TypeError)
@example(data=_join_frame(b"MQT1", [["a", "f32", [0, 1 << 63], 0, 0]], b""))  # torch cannot hold it (was TypeError)
@example(data=_join_frame(b"MQT1", [["a", "f32", [1 << 62, 4, 0], 0, 0]], b""))  # (was RuntimeError)
def test_decode_state_raises_only_tensor_format_errors(data):
    try:
        out = decode_state(data)
    except TensorFormatError:
        return
    assert all(isinstance(t, torch.Tensor) for t in out.values())
    assert sum(t.numel() * t.element_size() for t in out.values()) <= len(data)


# -- common.compression.codecs.decode ------------------------------------------------------------------------------------

def _delta(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(16, 12, generator=g) * 1e-2, "b": torch.randn(12, generator=g),
            "s": torch.randn((), generator=g), "z": torch.zeros(40), "e": torch.empty(0, 3)}


_SPECS = ["none", "fp16", "bf16", "int8:block=16", "int8:round=stochastic+lzma", "topk:0.05+int8", "topk:0.5+fp16",
          "topk:0.05+int8+zlib", "topk:0.3+bf16+lzma", "zlib:level=1"]
_PAYLOADS = {spec: codecs.encode(_delta(), spec, generator=torch.Generator().manual_seed(0)).data for spec in _SPECS}
_NUMEL = sum(t.numel() for t in _delta().values())


def _decompress(name: str, data: bytes) -> bytes:
    return zlib.decompress(data) if name == "zlib" else lzma.decompress(data) if name == "lzma" else data


def _compress(name: str, data: bytes) -> bytes:
    if name == "zlib":
        return zlib.compress(data)
    return lzma.compress(data, format=lzma.FORMAT_XZ) if name == "lzma" else data


@st.composite
def payload_mutations(draw):
    """An update payload mutated at the byte, header or body level (see the module doc)."""
    spec = draw(st.sampled_from(_SPECS))
    data = _PAYLOADS[spec]
    level = draw(st.sampled_from(["bytes", "header", "header", "body", "body"]))
    if level == "bytes":
        return spec, draw(byte_mutations(list(_PAYLOADS.values())))
    header, body = _split_frame(data, codecs.MAGIC)
    if level == "header":
        if draw(st.booleans()):
            header = _edit_map(draw, header, ["v", "codec", "body", "body_len", "tensors"])
            if draw(st.booleans()):  # a plausible body_len, so the checks after it run
                header["body_len"] = draw(st.sampled_from([0, 1, 8, len(body) - 1, len(body), len(body) + 1, 1 << 40]))
        else:
            entries = header["tensors"]
            i = draw(st.integers(0, len(entries) - 1))
            entry = list(entries[i])
            j = draw(st.integers(0, 4))
            entry[j] = draw(st.one_of(
                MSGPACK_VALUES, st.sampled_from(["dense", "sparse", "varint", "bitmap", None]),
                st.integers(-1, 300), st.lists(st.sampled_from([0, 1, 2, 3, 12, 16, 1 << 31, (1 << 63) - 1, 1 << 63]),
                                               max_size=4)))
            entries[i] = entry
        return spec, _join_frame(codecs.MAGIC, header, body)
    # body level: decompress, alter the tensor frame inside, recompress, fix up body_len
    inner = _decompress(header["body"], body)
    inner = draw(frame_mutations(inner)) if draw(st.booleans()) else _replace_component(draw, inner)
    header["body_len"] = len(inner)
    return spec, _join_frame(codecs.MAGIC, header, _compress(header["body"], inner))


def _replace_component(draw, frame: bytes) -> bytes:
    """One component of a codec body replaced by a valid tensor of another dtype, length or content."""
    comps = decode_state(frame)
    name = draw(st.sampled_from(sorted(comps)))
    n = comps[name].numel() + draw(st.sampled_from([0, 0, -1, 1]))
    dtype = draw(st.sampled_from([comps[name].dtype, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int64]))
    fill = draw(st.sampled_from(["same", "nan", "inf", "big", "random"]))
    if fill == "same" and n == comps[name].numel():
        t = comps[name].to(dtype)
    elif fill in ("nan", "inf") and dtype.is_floating_point:
        t = torch.full((max(n, 0),), math.nan if fill == "nan" else math.inf, dtype=dtype)
    elif fill == "big":
        t = torch.full((max(n, 0),), 127 if not dtype.is_floating_point else 3e38, dtype=dtype)
    else:
        raw = draw(st.binary(min_size=max(n, 0) * dtype.itemsize, max_size=max(n, 0) * dtype.itemsize))
        t = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    return encode_state({**comps, name: t})


def _check_decoded(out: dict, max_elements: int) -> None:
    total = 0
    for value in out.values():
        if isinstance(value, SparseTensor):
            n = math.prod(value.shape)
            assert value.indices.dtype is torch.int64 and value.values.dtype is torch.float32
            assert value.indices.numel() == value.values.numel()
            assert value.indices.numel() == 0 or (int(value.indices.min()) >= 0 and int(value.indices.max()) < n)
            assert bool(torch.isfinite(value.values).all())
        else:
            n = value.numel()
            assert value.dtype is torch.float32 and bool(torch.isfinite(value).all())
        total += n
    assert total <= max_elements


def _hostile_payload(header: dict, body: bytes) -> bytes:
    return _join_frame(codecs.MAGIC, {"v": 1, **header}, body)


_EMPTY_COMPONENT = encode_state({"0.v": torch.zeros(0)})
_BOMB = zlib.compress(bytes(64 << 20), 9)  # 64 KiB that inflate to 64 MiB


@FUZZ
@given(case=payload_mutations())
@example(case=("none", _hostile_payload({"codec": "none", "body": "raw", "body_len": len(_EMPTY_COMPONENT),
                                         "tensors": [["a", [0, 1 << 63], "dense", 0, None]]}, _EMPTY_COMPONENT)))
@example(case=("zlib", _hostile_payload({"codec": "zlib", "body": "zlib", "body_len": 0, "tensors": []}, _BOMB)))
def test_codecs_decode_of_mutated_payloads_raises_only_codec_errors(case):
    spec, data = case
    for expected in (None, spec):
        try:
            out = codecs.decode(data, expected_codec=expected, max_elements=4 * _NUMEL)
        except codecs.CodecError:
            continue
        _check_decoded(out, 4 * _NUMEL)


@pytest.mark.parametrize("body_len", [0, 9, 1 << 20])
def test_a_compressed_body_never_inflates_past_its_declared_length(body_len):
    """zlib reads max_length=0 as "no limit": a body declaring 0 bytes used to inflate in full."""
    import tracemalloc

    tensors = [["a", [body_len // 4], "dense", body_len // 4, None]]  # so that body_len passes the size bound
    data = _hostile_payload({"codec": "zlib", "body": "zlib", "body_len": body_len, "tensors": tensors}, _BOMB)
    tracemalloc.start()
    try:
        with pytest.raises(codecs.CodecError, match="more than the declared"):
            codecs.decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(_BOMB) + 2 * body_len + (1 << 20), f"inflated {peak} bytes for a body of {body_len}"


# -- the coordinator's update path: decode, then validate against the model --------------------------------

@FUZZ
@given(case=payload_mutations(), base_version=st.sampled_from([0, 0, 0, 1, -1]), num_samples=st.sampled_from([1, 10, 0]))
def test_decoding_and_validating_mutated_updates_raises_only_codec_errors_or_rejections(case, base_version, num_samples):
    spec, data = case
    state = {n: torch.zeros_like(t) for n, t in _delta().items()}
    state["count"] = torch.zeros(2, dtype=torch.int64)  # a non-float entry: never aggregated
    agg = Aggregator(state, AggregatorConfig(buffer_size=1, max_update_norm=1e3, experiment="exp"))
    try:
        delta = codecs.decode(data, expected_codec=spec, max_elements=sum(t.numel() for t in state.values()))
        agg.add(ClientUpdate("exp", "t", "w", base_version, num_samples, delta))
    except (codecs.CodecError, UpdateRejected):
        assert agg.version == 0
        return
    assert agg.version == 1 and all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


# -- common.wire.chunks.Reassembler.add ---------------------------------------------------------------------------

_H = ["mqfed-transfer", "mqfed-chunk", "mqfed-chunks", "mqfed-size", "mqfed-chunk-size", "mqfed-sha256", "mqfed-crc32"]


def _transfer(tid: str, size: int, chunk_size: int) -> list[tuple[bytes, dict]]:
    """The chunks of a transfer as a consumer sees them (headers through pika's wire encoding)."""
    out = []
    data = hashlib.sha256(tid.encode()).digest() * (size // 32 + 1)
    publish_chunked(lambda body, h: out.append((bytes(body), h)), data[:size], chunk_size=chunk_size, transfer_id=tid)
    return [(body, _through_pika(h)) for body, h in out]


def _through_pika(headers: dict) -> dict:
    pieces: list = []
    pika.data.encode_table(pieces, headers)
    return pika.data.decode_table(b"".join(pieces), 0)[0]


_TRANSFERS = [_transfer("a", 100, 16), _transfer("b", 33, 32), _transfer("c", 0, 8), _transfer("d", 64, 64)]
_HEADER_VALUES = st.one_of(
    st.integers(-2, 200),
    st.integers(0, 1 << 40).map(pika.compat.long),  # pika decodes 64-bit ints as its `long` (an int subclass)
    st.sampled_from([1 << 31, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63, 1 << 64, 10 ** 30]),
    st.text(max_size=8), st.binary(max_size=8), st.sampled_from([b"\xff\xfe", b"a", "a", "b"]), st.none(), st.booleans(),
    st.floats(allow_nan=False, max_value=1e3, min_value=-1e3))


@st.composite
def chunk_operations(draw):
    """A sequence of chunks: from valid transfers (reordered, duplicated, dropped), some with a header
    replaced or removed or the body corrupted, some with random headers; "expire" advances the clock."""
    pool = [c for t in _TRANSFERS for c in t]
    ops = []
    for _ in range(draw(st.integers(1, 24))):
        kind = draw(st.sampled_from(["valid", "valid", "valid", "header", "drop-header", "body", "random", "expire"]))
        if kind == "expire":
            ops.append(("expire", None, None))
            continue
        if kind == "random":
            headers = draw(st.dictionaries(st.sampled_from(_H + ["x"]), _HEADER_VALUES, max_size=8))
            ops.append(("add", headers, draw(st.binary(max_size=80))))
            continue
        body, headers = draw(st.sampled_from(pool))
        headers = dict(headers)
        if kind == "header":
            headers[draw(st.sampled_from(_H))] = draw(_HEADER_VALUES)
        elif kind == "drop-header":
            del headers[draw(st.sampled_from(_H))]
        elif kind == "body":
            body = draw(byte_mutations([body])) if body else draw(st.binary(min_size=1, max_size=4))
        ops.append(("add", headers, body))
    return ops


def _with(chunk: tuple[bytes, dict], **headers) -> tuple[str, dict, bytes]:
    body, h = chunk
    return ("add", {**h, **{k.replace("_", "-"): v for k, v in headers.items()}}, body)


_A = _TRANSFERS[0]


@FUZZ
@given(ops=chunk_operations(), spill=st.sampled_from([0, 50, 1 << 30]))
@example(ops=[_with(_A[0], mqfed_transfer=b"\xff\xfe")], spill=0)  # not UTF-8 (was UnicodeDecodeError)
@example(ops=[_with(_A[0], mqfed_size=10 ** 30, mqfed_chunk_size=10 ** 30)], spill=0)  # (was OverflowError)
@example(ops=[("add", _A[0][1], _A[0][0]), ("add", _A[1][1], b"x" * len(_A[1][0])), ("add", _A[2][1], _A[2][0]),
              ("expire", None, None), ("add", _A[3][1], _A[3][0])], spill=1 << 30)  # chunks after a corrupt one
def test_reassembler_add_raises_only_chunk_errors_and_hands_back_every_token_once(ops, spill):
    now = [0.0]
    with tempfile.TemporaryDirectory() as spool:
        r = Reassembler(spill_threshold=spill, spool_dir=spool, timeout_s=10.0, fsync=False, clock=lambda: now[0])
        settled: list[int] = []  # every token acked or rejected, in order
        for token, (op, headers, body) in enumerate(ops):
            if op == "expire":
                now[0] += 11.0
                for err in r.expire():
                    settled += err.tokens
                continue
            try:
                res = r.add(headers, body, token)
            except ChunkError as exc:
                settled += exc.tokens or [token]  # the consumer rejects the delivery itself when none is named
                continue
            settled += res.ack
            if res.complete is not None:
                done = res.complete
                payload = done.read_bytes()
                assert len(payload) == done.size and hashlib.sha256(payload).hexdigest() == done.sha256
                done.close()
        now[0] += 11.0
        for err in r.expire():
            settled += err.tokens
        added = [t for t, (op, _, _) in enumerate(ops) if op == "add"]
        assert sorted(settled) == added, "a delivery was never settled, or settled twice"
        assert os.listdir(spool) == [], "a spool file outlived its transfer"


# -- coordinator.checkpoint.load -----------------------------------------------------------------------------

def _checkpoint_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "checkpoint.pt"
        checkpoint.save(path, {"experiment": "exp", "aggregator": {"version": 3, "model": {"w": torch.ones(4, 3)}},
                               "counters": {"dead_lettered": 1}, "workers": "{}", "elapsed_s": 1.5})
        return path.read_bytes()


_CKPT = _checkpoint_bytes()


@settings(FUZZ, max_examples=200)
@given(data=st.one_of(byte_mutations([_CKPT]), st.binary(max_size=512)))
def test_checkpoint_load_of_random_or_mutated_files_raises_only_checkpoint_error(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "checkpoint.pt"
        path.write_bytes(data)
        try:
            state = checkpoint.load(path, "exp")
        except checkpoint.CheckpointError:
            return
        assert isinstance(state, dict) and state["experiment"] == "exp" and state["format"] == checkpoint.FORMAT


# -- the worker's task path ----------------------------------------------------------------------------------

class _Channel:
    """An in-memory stand-in for a pika channel: records how each delivery was settled."""

    def __init__(self) -> None:
        self.settled: list[str] = []

    def basic_qos(self, prefetch_count):
        pass

    def basic_consume(self, queue, callback, consumer_tag=None):
        return "ctag"

    def basic_ack(self, tag):
        self.settled.append("ack")

    def basic_nack(self, tag, requeue=True):
        self.settled.append("nack" if not requeue else "nack-requeue")

    def basic_reject(self, tag, requeue=True):
        self.settled.append("reject-requeue" if requeue else "reject")


def _fake_trainer(reached: list):
    return types.SimpleNamespace(
        worker_id="w1/cpu", w=types.SimpleNamespace(experiment="exp"), status="idle", tasks_done=0,
        metrics=WorkerMetrics("w1", "cpu"),
        _train_task=lambda task: reached.append(task), _evaluate_task=lambda task: reached.append(task))


def _deliver_task(trainer, data: bytes) -> _Channel:
    """Hand `data` to the worker's task handler through the real consumer (as the tasks queue would)."""
    from common.transport.consumer import MessageConsumer
    from worker.daemon import Trainer

    ch = _Channel()
    consumer = MessageConsumer(ch, "tasks", lambda delivery: Trainer._on_task(trainer, delivery), prefetch=1)
    consumer._on_delivery(types.SimpleNamespace(delivery_tag=1),
                          types.SimpleNamespace(headers=None, message_id="m", type=None), data)
    return ch


_TASK_BYTES = [messages.encode(m) for m in MESSAGE_SEEDS[:3]] + _MESSAGE_BYTES[3:5]  # the tasks and two updates


@FUZZ
@given(data=st.one_of(message_mutations(), byte_mutations(_TASK_BYTES)))
@example(data=msgpack.packb({"t": "train_task", "v": messages.SCHEMA_VERSION, b"experiment": "exp"},
                            use_bin_type=True))
def test_worker_task_path_settles_every_delivery_once_and_runs_only_valid_tasks(data):
    reached: list = []
    ch = _deliver_task(_fake_trainer(reached), data)
    assert len(ch.settled) == 1
    msg = _check_message(data)
    valid = isinstance(msg, (messages.TrainTask, messages.EvaluateTask)) and msg.experiment == "exp"
    if not valid:
        assert ch.settled == ["nack"] and reached == []
    elif msg.deadline_unix > 3_000_000_000:
        assert ch.settled == ["ack"] and reached == [msg]


@pytest.mark.parametrize("local", [{"epochs": [1.0]}, {"warmup_steps": None}, {"time_shift_s": {}},
                                   {"batch_size": 0}, {"optimizer": "adam"}, {"speed": [0.9]}, {"speed": [2.0, 0.5]},
                                   {"speed": "fast"}, {"noise_snr_db": [0.0, 1e300]}, {"gain_db": 1e300},
                                   {"time_masks": 10**9}, {"time_mask_ms": -1.0}, {"keep_optimizer": 1}],
                         ids=["epochs-list", "warmup-none", "time-shift-map", "batch-size-0", "unknown-optimizer",
                              "speed-one-item", "speed-reversed", "speed-string", "snr-huge", "gain-huge",
                              "time-masks-huge", "time-mask-negative", "keep-optimizer-int"])
def test_a_train_task_with_local_settings_of_the_wrong_type_is_dead_lettered_not_fatal_to_the_trainer(local):
    from worker.daemon import TaskAborted, Trainer

    reached: list = []
    fake = _fake_trainer(reached)
    fake._train_task = lambda task: Trainer._train_task(fake, task)
    fake._model_for = lambda name, freeze: types.SimpleNamespace(load_state_dict=lambda state: None)
    fake._fetch = lambda version: (0, {})

    def wait_for(fn, *args):  # what reaches training has passed every check: stop here
        reached.append("training")
        raise TaskAborted()

    fake._wait_for = wait_for
    fake.stop_event = types.SimpleNamespace(is_set=lambda: False)
    body = msgpack.unpackb(messages.encode(messages.TrainTask("exp", "run-1", "t1", 0, _FAR, "none", "kws-tiny", False,
                                                              TrainConfig(steps=1, batch_size=16))), raw=False)
    body["local"].update(local)
    ch = _deliver_task(fake, msgpack.packb(body, use_bin_type=True))
    assert ch.settled == ["nack"] and reached == []  # dead-lettered as InvalidField, the trainer lives on
