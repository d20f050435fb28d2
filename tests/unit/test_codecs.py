"""Update codecs: specs, round trips within each codec's stated bound, exact top-k, index packing, sizes,
strict rejection of hostile payloads, and sparse decoded updates in the aggregator."""
from __future__ import annotations

import math
import struct

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.compression.codecs import (
    DEFAULT_CODEC,
    MAGIC,
    CodecError,
    CodecSpec,
    UnknownCodec,
    decode,
    encode,
    parse_codec,
    topk_count,
)
from common.compression.sparse import SparseTensor
from common.wire.tensors import decode_state, encode_state
from coordinator.aggregator import Aggregator, AggregatorConfig, ClientUpdate
from coordinator.server_optim import ServerOptimizerConfig

LOSSLESS = ["none", "zlib", "lzma", "zlib:level=1"]
LOSSY = ["fp16", "bf16", "int8", "int8:block=64,round=stochastic", "topk:0.05", "topk:0.05+int8", "topk:0.3+fp16+zlib", "topk:0.01+bf16+lzma"]


def _delta(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(40, 50, generator=g) * 1e-3,
        "b": torch.randn(7, generator=g),
        "scalar": torch.randn((), generator=g),
        "frozen": torch.zeros(300),
        "empty": torch.empty(0, 3),
        "noncontig": torch.randn(30, 20, generator=g).t(),
        "half": torch.randn(64, generator=g).half(),
    }


def _dense(x) -> torch.Tensor:
    return x.to_dense() if isinstance(x, SparseTensor) else x


def _same(a, b) -> bool:
    if isinstance(a, SparseTensor) or isinstance(b, SparseTensor):
        return (
            isinstance(a, SparseTensor) and isinstance(b, SparseTensor) and a.shape == b.shape
            and torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
        )
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# -- specs ---------------------------------------------------------------------------------------------------


def test_equivalent_specs_parse_to_the_same_canonical_codec():
    long = parse_codec("topk:k=0.01 + int8:block=256,round=nearest + zlib:level=6")
    assert long == parse_codec("topk:0.01+int8+zlib") == parse_codec(DEFAULT_CODEC)
    assert str(long) == "topk:0.01+int8+zlib"
    assert str(parse_codec("int8:round=stochastic,block=64")) == "int8:block=64,round=stochastic"
    assert str(parse_codec("none")) == "none" and parse_codec("none") == CodecSpec()
    for spec in LOSSLESS + LOSSY:
        assert parse_codec(str(parse_codec(spec))) == parse_codec(spec)


@pytest.mark.parametrize(
    ("spec", "error", "names"),
    [
        ("gzip", UnknownCodec, "'gzip'"),
        ("topk:0.01+int4", UnknownCodec, "'int4'"),
        ("topk:2", CodecError, "k='2'"),
        ("topk:0", CodecError, "k='0'"),
        ("topk:nan", CodecError, "(0, 1]"),
        ("int8:block=3", CodecError, "block='3'"),
        ("int8:round=up", CodecError, "nearest, stochastic"),
        ("int8:bits=4", CodecError, "no option 'bits'"),
        ("int8:256", CodecError, "not key=value"),
        ("int8:block=64,block=128", CodecError, "given twice"),
        ("int8+fp16", CodecError, "second values stage"),
        ("zlib+int8", CodecError, "out of order"),
        ("int8+topk:0.1", CodecError, "out of order"),
        ("none+zlib", CodecError, "'none' cannot be combined"),
        ("", CodecError, "non-empty"),
    ],
)
def test_bad_codec_specs_are_rejected_naming_the_bad_part(spec, error, names):
    with pytest.raises(error) as err:
        parse_codec(spec)
    assert names in str(err.value)
    assert isinstance(err.value, ValueError)


# -- round trips ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", LOSSLESS + LOSSY)
def test_decoded_field_is_exactly_what_decode_returns(spec):
    delta = _delta()
    enc = encode(delta, spec, generator=torch.Generator().manual_seed(1))
    out = decode(enc.data, spec)
    assert list(out) == list(delta) == list(enc.decoded)
    for name in delta:
        assert _same(out[name], enc.decoded[name]), name
        assert tuple(_dense(out[name]).shape) == tuple(delta[name].shape)
        assert _dense(out[name]).dtype is torch.float32


@pytest.mark.parametrize("spec", LOSSLESS)
def test_lossless_codecs_round_trip_exactly(spec):
    delta = _delta()
    out = decode(encode(delta, spec).data)
    for name, t in delta.items():
        assert isinstance(out[name], torch.Tensor) and torch.equal(out[name], t.float()), name


@pytest.mark.parametrize(("spec", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_codecs_stay_within_half_an_ulp(spec, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5000, generator=g) * torch.logspace(-4, 2, 5000)  # magnitudes across the normal range
    out = decode(encode({"x": x}, spec).data)["x"]
    info = torch.finfo(dtype)  # eps: fp16 2**-10, bf16 2**-7; below `tiny` the spacing is tiny * eps
    assert bool(((out - x).abs() <= x.abs() * info.eps / 2 + info.tiny * info.eps / 2).all())


def test_fp16_rejects_values_outside_its_range():
    with pytest.raises(CodecError, match="big: .*fp16 range"):
        encode({"big": torch.tensor([1.0, 70000.0])}, "fp16")


def _block_scales(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-element scale (block max magnitude / 127), computed independently of the codec."""
    pad = -x.numel() % block
    blocks = torch.cat([x, x.new_zeros(pad)]).view(-1, block)
    return (blocks.abs().amax(1) / 127).repeat_interleave(block)[: x.numel()]


@pytest.mark.parametrize("block", [8, 64, 256])
def test_int8_nearest_error_is_at_most_half_a_scale_per_element(block):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, generator=g) * torch.logspace(-6, 0, 1000)  # blocks of very different scale
    out = decode(encode({"x": x}, f"int8:block={block}").data)["x"]
    scale = _block_scales(x, block)
    assert bool(((out - x).abs() <= scale / 2 * (1 + 1e-5) + 1e-30).all())
    assert torch.equal(out[x == 0], x[x == 0])


def test_int8_stochastic_rounding_is_unbiased_and_within_one_scale():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, generator=g)
    scale = _block_scales(x, 256)
    runs = torch.stack([
        decode(encode({"x": x}, "int8:round=stochastic", generator=torch.Generator().manual_seed(s)).data)["x"]
        for s in range(400)
    ])
    assert bool(((runs - x).abs() < scale * (1 + 1e-5)).all())
    # the mean of 400 draws: standard error <= scale / (2 * sqrt(400)) = scale / 40; allow 5 of them
    assert bool(((runs.mean(0) - x).abs() <= scale / 8).all())
    nearest = decode(encode({"x": x}, "int8").data)["x"]
    assert (runs.mean(0) - x).abs().mean() < (nearest - x).abs().mean()  # nearest is biased per element


def test_stochastic_rounding_is_reproducible_with_a_generator():
    x = torch.randn(1000)
    a = encode({"x": x}, "int8:round=stochastic", generator=torch.Generator().manual_seed(9)).data
    b = encode({"x": x}, "int8:round=stochastic", generator=torch.Generator().manual_seed(9)).data
    assert a == b


def test_encode_does_not_modify_the_delta():
    delta = _delta()
    before = {n: t.clone() for n, t in delta.items()}
    for spec in LOSSLESS + LOSSY:
        encode(delta, spec)
    assert all(torch.equal(delta[n], before[n]) for n in delta)


def test_empty_delta_round_trips():
    enc = encode({}, DEFAULT_CODEC)
    assert decode(enc.data) == {} and enc.raw_bytes == 0 and enc.decoded == {}


# -- top-k ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("numel", "fraction"),
    [(1000, 0.05), (200_000, 0.01), (200_000, 0.1), (300_001, 0.003)],  # exact path, then the sampled one
)
def test_topk_keeps_exactly_the_k_largest_magnitudes(numel, fraction):
    g = torch.Generator().manual_seed(numel)
    magnitudes = torch.randperm(numel, generator=g).float() + 1  # distinct, so the top k is unique
    signs = torch.randint(0, 2, (numel,), generator=g).float() * 2 - 1
    x = (magnitudes * signs).view(-1, 1)
    out = decode(encode({"x": x}, f"topk:{fraction}").data)["x"]
    k = topk_count(numel, fraction)
    expected = torch.sort(torch.topk(magnitudes, k).indices).values
    assert isinstance(out, SparseTensor) and out.shape == (numel, 1)
    assert torch.equal(out.indices, expected)
    assert torch.equal(out.values, x.view(-1)[expected])


def test_topk_is_exact_when_the_sampled_threshold_keeps_too_few():
    n = 1 << 17
    x = torch.arange(n, dtype=torch.float32) / n  # distinct magnitudes below 1...
    x[::64] = 10 + torch.arange(n // 64) / n      # ...except at exactly the strided sample positions
    out = decode(encode({"x": x}, "topk:0.1").data)["x"]
    expected = torch.sort(torch.topk(x, topk_count(n, 0.1)).indices).values
    assert torch.equal(out.indices, expected)


def test_topk_keeps_at_least_one_entry_per_tensor_and_never_sends_zeros():
    x = {"small": torch.tensor([0.1, -3.0, 0.2]), "frozen": torch.zeros(1000), "few": torch.zeros(1000)}
    x["few"][[5, 700]] = torch.tensor([1.0, -2.0])
    out = decode(encode(x, "topk:0.01").data)
    assert out["small"].indices.tolist() == [1] and out["small"].values.tolist() == [-3.0]
    assert out["frozen"].indices.numel() == 0 and torch.equal(out["frozen"].to_dense(), x["frozen"])
    assert out["few"].indices.tolist() == [5, 700]  # k = 10, but only two entries are not zero


def test_topk_sends_a_tensor_dense_when_it_keeps_everything():
    out = decode(encode({"one": torch.tensor([2.0]), "all": torch.randn(10)}, "topk:1.0").data)
    assert isinstance(out["one"], torch.Tensor) and isinstance(out["all"], torch.Tensor)


@pytest.mark.parametrize(("fraction", "packing"), [(0.01, "varint"), (0.5, "bitmap")])
def test_sparse_indices_pack_as_varint_gaps_or_a_bitmap_whichever_is_smaller(fraction, packing):
    g = torch.Generator().manual_seed(5)
    x = {"w": torch.randn(100, 100, generator=g)}
    enc = encode(x, f"topk:{fraction}")
    header = _header(enc.data)
    assert header["tensors"][0][4] == packing
    index_bytes = decode_state(_body(enc.data))["0.x"].numel()
    k = topk_count(10_000, fraction)
    assert index_bytes <= (2 * k if packing == "varint" else 10_000 // 8)
    out = decode(enc.data)["w"]
    assert torch.equal(out.indices, torch.sort(torch.topk(x["w"].abs().view(-1), k).indices).values)


def test_varint_gaps_cover_every_width():
    n = 1 << 22
    indices = torch.tensor([0, 1, 2, 130, 20_000, 3_000_000, n - 1])  # gaps of 1, 2 and 3 bytes
    x = torch.zeros(n)
    x[indices] = torch.arange(1, 8, dtype=torch.float32)
    out = decode(encode({"x": x}, "topk:0.000001").data)["x"]  # k = 4: the four largest
    assert out.indices.tolist() == [130, 20_000, 3_000_000, n - 1]


# -- sizes ---------------------------------------------------------------------------------------------------


def test_raw_and_wire_bytes_are_reported():
    delta = _delta()
    numel = sum(t.numel() for t in delta.values())
    for spec in LOSSLESS + LOSSY:
        enc = encode(delta, spec)
        assert enc.raw_bytes == 4 * numel and enc.wire_bytes == len(enc.data) and enc.codec == str(parse_codec(spec))


def test_default_codec_is_over_100x_smaller_than_fp32_on_a_large_delta():
    g = torch.Generator().manual_seed(6)
    delta = {"w": torch.randn(1024, 1024, generator=g) * 1e-3, "b": torch.randn(1024, generator=g) * 1e-3}
    enc = encode(delta, DEFAULT_CODEC)
    assert enc.raw_bytes / enc.wire_bytes >= 100


def test_lossless_stage_is_skipped_when_it_does_not_pay():
    x = {"x": torch.randn(64)}  # random mantissas do not compress
    assert _header(encode(x, "zlib").data)["body"] == "raw"
    assert _header(encode({"z": torch.zeros(4096)}, "zlib").data)["body"] == "zlib"
    assert torch.equal(decode(encode(x, "zlib").data)["x"], x["x"])


# -- sparse updates in the aggregator ------------------------------------------------------------------------


def test_decoded_sparse_update_in_the_aggregator_equals_its_dense_equivalent():
    g = torch.Generator().manual_seed(7)
    model = {"w": torch.randn(60, 70, generator=g), "b": torch.randn(70, generator=g)}
    delta = {"w": torch.randn(60, 70, generator=g), "b": torch.randn(70, generator=g)}
    other = {"w": torch.randn(60, 70, generator=g), "b": torch.randn(70, generator=g)}
    decoded = decode(encode(delta, "topk:0.05+int8+zlib").data)
    assert all(isinstance(v, SparseTensor) for v in decoded.values())
    states = []
    for update in (decoded, {n: v.to_dense() for n, v in decoded.items()}):
        agg = Aggregator({n: t.clone() for n, t in model.items()}, AggregatorConfig(buffer_size=2, max_staleness=None),
                         ServerOptimizerConfig(name="sgd", lr=1.0), version=2)
        agg.add(ClientUpdate("exp", "t1", "A", 0, 3, update))
        agg.add(ClientUpdate("exp", "t2", "B", 2, 1, other))
        states.append(agg.state)
    for name in model:
        assert torch.equal(states[0][name], states[1][name]), name


# -- hostile payloads ----------------------------------------------------------------------------------------


def _header(data: bytes) -> dict:
    (n,) = struct.unpack("<I", data[4:8])
    return msgpack.unpackb(data[8:8 + n])


def _body(data: bytes) -> bytes:
    (n,) = struct.unpack("<I", data[4:8])
    return data[8 + n:]


def _rebuild(data: bytes, header=None, components=None, body: bytes | None = None) -> bytes:
    """Re-pack a raw-body payload after mutating its header and/or body components (consistent lengths)."""
    head = _header(data)
    if body is None:
        comps = {k: v.clone() for k, v in decode_state(_body(data)).items()}
        if components:
            components(comps)
        body = encode_state(comps)
        head["body_len"] = len(body)
    if header:
        header(head)
    packed = msgpack.packb(head, use_bin_type=True)
    return MAGIC + struct.pack("<I", len(packed)) + packed + body


def _sparse_payload(spec: str = "topk:0.1+int8") -> bytes:
    x = torch.zeros(10, 20)
    x.view(-1)[torch.arange(0, 200, 7)] = torch.linspace(1, 2, 29)
    return encode({"layer.weight": x, "layer.bias": torch.tensor([0.5])}, spec).data  # sparse, then dense


def _set_last_gap(comps, value):
    # varint bytes of the first tensor: replace the last (one-byte) gap with a multi-byte one
    x = comps["0.x"]
    tail = []
    while True:
        tail.append((value & 0x7F) | (0x80 if value >= 0x80 else 0))
        value >>= 7
        if not value:
            break
    comps["0.x"] = torch.cat([x[:-1], torch.tensor(tail, dtype=torch.uint8)])


def _set(item, pos, value):
    item[pos] = value


HOSTILE = {
    "index out of range": (lambda d: _rebuild(d, components=lambda c: _set_last_gap(c, 150)), "layer.weight: index .* out of range"),
    "index gap out of range": (lambda d: _rebuild(d, components=lambda c: _set_last_gap(c, 1 << 40)), "layer.weight: index gap .* out of range"),
    "count disagrees with values": (
        lambda d: _rebuild(d, header=lambda h: _set(h["tensors"][0], 3, h["tensors"][0][3] - 1)), "layer.weight: component 'q'"),
    "values shorter than indices": (
        lambda d: _rebuild(d, components=lambda c: c.__setitem__("0.q", c["0.q"][:-1])), "layer.weight: component 'q' is"),
    "indices disagree with count": (
        lambda d: _rebuild(d, components=lambda c: c.__setitem__("0.x", c["0.x"][:-1])), "layer.weight: index bytes hold"),
    "truncated varint": (
        lambda d: _rebuild(d, components=lambda c: c.__setitem__("0.x", torch.cat([c["0.x"][:-1], torch.tensor([0x81], dtype=torch.uint8)]))),
        "layer.weight: .*truncated"),
    "overlong varint": (
        lambda d: _rebuild(d, components=lambda c: c.__setitem__("0.x", torch.cat([c["0.x"][:-1], torch.tensor([0x80] * 10 + [1], dtype=torch.uint8)]))),
        "layer.weight: a varint longer"),
    "count above the codec's k": (
        lambda d: _rebuild(d, header=lambda h: _set(h["tensors"][0], 3, 100)), "layer.weight: sparse entry declares 100 values"),
    "non-finite scale": (
        lambda d: _rebuild(d, components=lambda c: c["0.s"].__setitem__(0, float("nan"))), "layer.weight: int8 block scales must be finite"),
    "infinite scale": (
        lambda d: _rebuild(d, components=lambda c: c["1.s"].__setitem__(0, float("inf"))), "layer.bias: int8 block scales must be finite"),
    "int8 -128": (
        lambda d: _rebuild(d, components=lambda c: c["1.q"].__setitem__(0, -128)), "layer.bias: int8 value -128"),
    "unknown codec": (lambda d: _rebuild(d, header=lambda h: h.__setitem__("codec", "topk:0.1+int4")), "unknown stage 'int4'"),
    "bad codec option": (lambda d: _rebuild(d, header=lambda h: h.__setitem__("codec", "topk:7+int8")), "option k='7'"),
    "lying body length": (lambda d: _rebuild(d, header=lambda h: h.__setitem__("body_len", h["body_len"] + 1)), "header declares"),
    "impossible body length": (lambda d: _rebuild(d, header=lambda h: h.__setitem__("body_len", 10**9)), "impossible"),
    "shape beyond max_elements": (lambda d: _rebuild(d, header=lambda h: _set(h["tensors"][0], 1, [2**31, 2])), "layer.weight: .*max_elements"),
    "negative dimension": (lambda d: _rebuild(d, header=lambda h: _set(h["tensors"][0], 1, [-10, -20])), "layer.weight: bad shape"),
    "dense count lies": (lambda d: _rebuild(d, header=lambda h: _set(h["tensors"][1], 3, 2)), "layer.bias: dense entry declares 2"),
    "duplicate name": (lambda d: _rebuild(d, header=lambda h: _set(h["tensors"][1], 0, "layer.weight")), "duplicate tensor name"),
    "unknown layout": (lambda d: _rebuild(d, header=lambda h: _set(h["tensors"][0], 2, "coo")), "layer.weight: unknown layout"),
    "unknown index encoding": (lambda d: _rebuild(d, header=lambda h: _set(h["tensors"][0], 4, "rle")), "layer.weight: unknown index encoding"),
    "body encoding not the codec's": (lambda d: _rebuild(d, header=lambda h: h.__setitem__("body", "lzma")), "does not match codec"),
    "missing component": (lambda d: _rebuild(d, components=lambda c: c.pop("1.s")), "missing \\['1.s'\\]"),
    "component of another dtype": (
        lambda d: _rebuild(d, components=lambda c: c.__setitem__("1.s", c["1.s"].double())), "layer.bias: component 's'"),
    "future format version": (lambda d: _rebuild(d, header=lambda h: h.__setitem__("v", 2)), "unsupported payload format version 2"),
    "extra header key": (lambda d: _rebuild(d, header=lambda h: h.__setitem__("x", 1)), "exactly v, codec"),
    "bad magic": (lambda d: b"MQT1" + d[4:], "bad magic"),
    "truncated": (lambda d: d[:-3], "truncated or trailing"),
    "trailing bytes": (lambda d: d + b"\0", "truncated or trailing"),
    "truncated header": (lambda d: d[:20], "header length"),
    "empty": (lambda d: b"", "bad magic"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_payloads_raise_codec_error_naming_the_problem(case):
    mutate, message = HOSTILE[case]
    data = _sparse_payload()
    decode(data)  # the unmutated payload is valid
    with pytest.raises(CodecError, match=message):
        decode(mutate(data))


def test_bitmap_bit_past_the_end_is_out_of_range():
    data = encode({"w": torch.arange(1.0, 13.0)}, "topk:0.5").data  # 12 elements: a 2-byte bitmap
    assert _header(data)["tensors"][0][4] == "bitmap"
    bad = _rebuild(data, components=lambda c: c["0.x"].__setitem__(1, c["0.x"][1] | 0x80))
    with pytest.raises(CodecError, match="w: bitmap sets a bit past the end"):
        decode(bad)
    extra = _rebuild(data, components=lambda c: c["0.x"].__setitem__(0, c["0.x"][0] | 0x01))
    with pytest.raises(CodecError, match="w: bitmap marks 7 entries, header declares 6"):
        decode(extra)


def test_non_finite_values_in_a_payload_are_rejected():
    data = encode({"w": torch.ones(8)}, "fp16").data
    bad = _rebuild(data, components=lambda c: c["0.v"].__setitem__(3, float("inf")))
    with pytest.raises(CodecError, match="w: non-finite fp16 value"):
        decode(bad)


def test_sparse_entry_in_a_dense_codec_payload_is_rejected():
    data = _sparse_payload()
    bad = _rebuild(data, header=lambda h: h.__setitem__("codec", "int8"))
    with pytest.raises(CodecError, match="layer.weight: sparse entry in a payload whose codec int8"):
        decode(bad)


def test_payload_codec_must_match_the_expected_codec():
    data = _sparse_payload("topk:0.1+int8")
    assert decode(data, "topk:k=0.1+int8:block=256")  # the same codec, spelled differently
    with pytest.raises(CodecError, match="payload codec 'topk:0.1\\+int8' differs from the expected 'topk:0.1\\+int8\\+zlib'"):
        decode(data, "topk:0.1+int8+zlib")


def test_max_elements_bounds_the_declared_shapes():
    data = encode({"w": torch.ones(100), "b": torch.ones(10)}, "none").data
    assert decode(data, max_elements=110)
    with pytest.raises(CodecError, match="b: the payload declares more than max_elements=109"):
        decode(data, max_elements=109)


def test_compressed_bodies_must_decompress_to_exactly_the_declared_length():
    data = encode({"z": torch.zeros(5000)}, "zlib").data
    head = _header(data)
    assert head["body"] == "zlib"
    shorter = _rebuild(data, header=lambda h: h.__setitem__("body_len", h["body_len"] - 1), body=_body(data))
    with pytest.raises(CodecError, match="holds more than the declared"):
        decode(shorter)
    longer = _rebuild(data, header=lambda h: h.__setitem__("body_len", h["body_len"] + 1), body=_body(data))
    with pytest.raises(CodecError, match="truncated"):
        decode(longer)
    with pytest.raises(CodecError, match="truncated|corrupt"):
        decode(data[:-5])
    with pytest.raises(CodecError, match="after the end of the zlib stream"):
        decode(data + b"junk")


def test_encode_rejects_non_finite_deltas_and_non_float_tensors():
    nan = torch.tensor([1.0, float("nan"), 2.0] * 50)
    for spec in ["none", "fp16", "bf16", "int8", "topk:0.1", "topk:0.1+int8"]:
        with pytest.raises(CodecError, match="bad: .*non-finite"):
            encode({"ok": torch.ones(3), "bad": nan}, spec)
    big = torch.zeros(1 << 17)
    big[12345] = float("inf")
    with pytest.raises(CodecError, match="big: .*non-finite"):
        encode({"big": big}, "topk:0.01")  # the sampled-threshold path
    with pytest.raises(TypeError, match="count: expected a floating-point tensor"):
        encode({"count": torch.tensor([1, 2])}, "none")


# -- fuzz ----------------------------------------------------------------------------------------------------

_SEEDS = {spec: encode(_delta(), spec, generator=torch.Generator().manual_seed(0)).data
          for spec in ["none", "fp16", "int8", "topk:0.05+int8", "topk:0.5+fp16", "topk:0.05+int8+zlib", "zlib"]}


def _mutations():
    seed = st.sampled_from(sorted(_SEEDS)).map(lambda k: _SEEDS[k])
    flip = st.tuples(seed, st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8)).map(
        lambda t: bytes(_apply(t[0], t[1])))
    cut = st.tuples(seed, st.integers(0, 1 << 20)).map(lambda t: t[0][: t[1] % (len(t[0]) + 1)])
    splice = st.tuples(seed, st.integers(0, 1 << 20), st.binary(max_size=64)).map(
        lambda t: t[0][: t[1] % len(t[0])] + t[2] + t[0][t[1] % len(t[0]):])
    raw = st.binary(max_size=512)
    with_magic = st.binary(max_size=512).map(lambda b: MAGIC + b)
    return st.one_of(flip, cut, splice, raw, with_magic)


def _apply(data: bytes, edits) -> bytearray:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_mutations())
def test_decode_of_random_or_mutated_bytes_only_ever_raises_codec_error(data):
    try:
        out = decode(data, max_elements=1 << 20)
    except CodecError:
        return
    for value in out.values():  # whatever decodes is well-formed
        if isinstance(value, SparseTensor):
            n = math.prod(value.shape)
            assert value.indices.dtype is torch.int64 and value.values.dtype is torch.float32
            assert value.indices.numel() == value.values.numel()
            assert value.indices.numel() == 0 or (int(value.indices.min()) >= 0 and int(value.indices.max()) < n)
            assert bool(torch.isfinite(value.values).all())
        else:
            assert value.dtype is torch.float32 and bool(torch.isfinite(value).all())
