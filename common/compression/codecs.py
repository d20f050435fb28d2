"""Update codecs: compress a model delta (name -> float tensor) into self-describing bytes and back.

A codec is a spec string of stages joined by ``+``, at most one per kind, in the order sparsify (``topk``) ->
values (``fp16``, ``bf16``, ``int8``) -> lossless (``zlib``, ``lzma``), e.g. ``topk:0.01+int8+zlib``; ``STAGES``
maps each name to its implementation. Invariants: ``encode`` returns, with the bytes, ``decoded``: exactly
what ``decode`` reconstructs, bit for bit (error feedback relies on it); ``decode`` is strict and bounded: any
inconsistency raises ``CodecError`` naming the tensor, and nothing larger than the declared shapes (checked
against ``max_elements``) is allocated. Specs, wire layout, index packing: docs/compression.md.
"""
from __future__ import annotations

import lzma
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar, Union, cast

import torch

from common.compression.sparse import SparseTensor
from common.errors import MqfedError
from common.wire import envelope
from common.wire.tensors import DTYPES, TensorFormatError, decode_state, encode_state

MAGIC = b"MQC1"
FORMAT_VERSION = 1
#: The codec an experiment uses unless it names one: 1% top-k per tensor, int8 values, zlib over the body
#: (about 190x smaller than fp32 on wav2vec2-base; docs/compression.md has the measurements).
DEFAULT_CODEC = "topk:0.01+int8+zlib"
#: Default (and largest allowed) bound on the total number of elements a payload may declare (2**31 fp32
#: values = 8 GiB); it also keeps index arithmetic far from int64 overflow.
DEFAULT_MAX_ELEMENTS = 1 << 31
_MAX_HEADER = 16 * 1024 * 1024
_MAX_NAME = 1024
_MAX_DIMS = 32
_MAX_VARINT_BYTES = 9  # 63 bits: every index below 2**31 fits in 5
_FLOAT32_MAX = torch.finfo(torch.float32).max
_SAMPLE_MIN_NUMEL = 1 << 16  # below this an exact torch.topk is as fast as sampling a threshold
_SAMPLE_STRIDE = 64

Decoded = Union[torch.Tensor, SparseTensor]


class CodecError(MqfedError, ValueError):
    """A codec spec is invalid, a delta cannot be encoded, or a payload is not a valid encoded update."""


class UnknownCodec(CodecError):
    """A codec spec (or a payload) names a stage that does not exist."""


# -- codec specs --------------------------------------------------------------------------------------------

_OptionValue = Union[int, float, str]  # what the option parsers (_fraction, _int_in, _one_of) return


@dataclass(frozen=True)
class Option:
    """One stage option: ``parse(text)`` returns the value or raises ValueError saying what is allowed."""

    parse: Callable[[str], _OptionValue]
    default: _OptionValue


@dataclass(frozen=True)
class StageSpec:
    """One parsed stage: its name and every option's value (defaults filled in), in declaration order."""

    name: str
    options: tuple[tuple[str, _OptionValue], ...] = ()

    def option(self, key: str) -> _OptionValue:
        """The value of option ``key``; raises KeyError when the stage has no such option."""
        for k, v in self.options:
            if k == key:
                return v
        raise KeyError(f"stage {self.name!r} has no option {key!r}")

    def __str__(self) -> str:
        stage = STAGES[self.name]
        parts: list[str] = []
        for key, value in self.options:
            text = repr(value) if isinstance(value, float) else str(value)
            if key == stage.positional:
                parts.insert(0, text)
            elif value != stage.options[key].default:
                parts.append(f"{key}={text}")
        return self.name + (":" + ",".join(parts) if parts else "")


@dataclass(frozen=True)
class CodecSpec:
    """A parsed codec: at most one stage per kind, in pipeline order. ``str(spec)`` is the canonical spec."""

    sparsify: StageSpec | None = None
    values: StageSpec | None = None
    lossless: StageSpec | None = None

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        return tuple(s for s in (self.sparsify, self.values, self.lossless) if s is not None)

    @property
    def is_lossless(self) -> bool:
        """True when decoding gives back exactly what was encoded (as float32): no topk, no fp16/bf16/int8."""
        return self.sparsify is None and self.values is None

    def __str__(self) -> str:
        return "+".join(str(s) for s in self.stages) or "none"


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise ValueError("must be a number in (0, 1]")
    return value


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise ValueError(f"must be an integer in [{low}, {high}]")
        return value

    return parse


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text

    return parse


def parse_codec(spec: str | CodecSpec) -> CodecSpec:
    """Parse and validate a codec spec such as ``"topk:0.01+int8:round=stochastic+zlib"``.

    spec: the string (a CodecSpec is returned as is).
    Raises UnknownCodec for a stage name that does not exist, CodecError (a ValueError) for anything else
    (bad option, repeated or misordered stage, ``none`` combined with another stage); the message names
    the offending part.
    """
    if isinstance(spec, CodecSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise CodecError(f"codec spec must be a non-empty string, got {spec!r:.80}")
    parts = [p.strip() for p in spec.split("+")]
    if parts == ["none"]:
        return CodecSpec()
    by_kind: dict[str, StageSpec] = {}
    order = ("sparsify", "values", "lossless")
    last = -1
    for part in parts:
        name, _, opts = part.partition(":")
        name = name.strip()
        if name == "none":
            raise CodecError(f"codec {spec!r}: 'none' cannot be combined with other stages")
        stage = STAGES.get(name)
        if stage is None:
            raise UnknownCodec(f"codec {spec!r}: unknown stage {name!r} (known: none, {', '.join(STAGES)})")
        if stage.kind in by_kind:
            raise CodecError(f"codec {spec!r}: stage {name!r} is a second {stage.kind} stage after {by_kind[stage.kind].name!r}")
        if order.index(stage.kind) < last:
            raise CodecError(f"codec {spec!r}: stage {name!r} is out of order (stages go topk, then fp16/bf16/int8, then zlib/lzma)")
        last = order.index(stage.kind)
        by_kind[stage.kind] = StageSpec(name, _parse_options(spec, name, stage, opts))
    return CodecSpec(by_kind.get("sparsify"), by_kind.get("values"), by_kind.get("lossless"))


def _parse_options(spec: str, name: str, stage: "Stage", text: str) -> tuple[tuple[str, _OptionValue], ...]:
    values = {k: o.default for k, o in stage.options.items()}
    items = [t.strip() for t in text.split(",")] if text.strip() else []
    seen: set[str] = set()
    for i, item in enumerate(items):
        key, eq, raw = item.partition("=")
        if not eq:
            if i != 0 or stage.positional is None:
                raise CodecError(f"codec {spec!r}: stage {name!r}: {item!r} is not key=value")
            key, raw = stage.positional, item
        key, raw = key.strip(), raw.strip()
        if key not in stage.options:
            known = ", ".join(stage.options) or "none"
            raise CodecError(f"codec {spec!r}: stage {name!r} has no option {key!r} (options: {known})")
        if key in seen:
            raise CodecError(f"codec {spec!r}: stage {name!r}: option {key!r} given twice")
        seen.add(key)
        try:
            values[key] = stage.options[key].parse(raw)
        except ValueError as exc:
            raise CodecError(f"codec {spec!r}: stage {name!r}: option {key}={raw!r}: {exc}") from None
    return tuple(values.items())


# -- stage implementations ----------------------------------------------------------------------------------


def topk_count(numel: int, fraction: float) -> int:
    """How many entries ``topk:<fraction>`` keeps of a tensor of ``numel`` elements: round(k * numel), >= 1."""
    return min(numel, max(1, round(numel * fraction)))


def _topk_select(name: str, flat: torch.Tensor, opts: StageSpec, scratch: torch.Tensor) -> torch.Tensor:
    """Sorted int64 indices of the ``topk_count`` largest magnitudes of ``flat``, exact zeros left out.

    Large tensors first estimate a threshold from a strided sample (as DGC does), keep the candidates at
    or above it, then select exactly among those; when the estimate keeps too few it falls back to an
    exact ``torch.topk`` over the whole tensor. The result is the exact top-k either way (ties broken
    arbitrarily); the sample only saves time. Raises CodecError for a non-finite value.
    """
    n = flat.numel()
    k = topk_count(n, float(opts.option("k")))
    mag = torch.abs(flat, out=scratch[:n])
    if not bool(torch.isfinite(mag.amax())):
        raise CodecError(f"{name}: the delta has non-finite values")
    idx = None
    if n >= _SAMPLE_MIN_NUMEL and k * 8 <= n:
        sample = mag[::_SAMPLE_STRIDE]
        m = sample.numel()
        ks = min(m, math.ceil(k * m / n * 1.25) + 16)  # aim a little below the k-th magnitude
        threshold = torch.topk(sample, ks, sorted=False).values.min()
        cand = torch.nonzero(mag >= threshold).squeeze(1)
        if cand.numel() >= k:
            idx = cand if cand.numel() == k else cand[torch.topk(mag[cand], k, sorted=False).indices]
    if idx is None:
        idx = torch.topk(mag, k, sorted=False).indices
    idx = idx[mag[idx] > 0]  # a zero carries nothing (frozen layers send no entries)
    return torch.sort(idx).values


@dataclass(frozen=True)
class SparsifyStage:
    """Chooses which entries of each tensor travel: ``select(name, flat, stage_spec, scratch)`` returns
    sorted unique int64 indices (``scratch`` is a float32 buffer at least as long as ``flat``);
    ``max_count(numel, stage_spec)`` bounds how many a valid payload may declare."""

    kind = "sparsify"
    options: Mapping[str, Option]
    positional: str | None
    select: Callable[[str, torch.Tensor, StageSpec, torch.Tensor], torch.Tensor]
    max_count: Callable[[int, StageSpec], int]


@dataclass(frozen=True)
class ValueStage:
    """Encodes a 1-D float32 vector of values.

    encode(name, values, stage_spec, generator) -> (components, decoded): components maps a role to a
        1-D tensor to send; decoded is the float32 vector the receiver will reconstruct.
    decode(name, components, count, stage_spec) -> float32 vector; raises CodecError.
    layout(count, stage_spec) -> {role: (dtype name, numel)}: what a valid payload must hold.
    """

    kind = "values"
    options: Mapping[str, Option]
    positional: str | None
    encode: Callable[[str, torch.Tensor, StageSpec, "torch.Generator | None"], "tuple[dict[str, torch.Tensor], torch.Tensor]"]
    decode: Callable[[str, Mapping[str, torch.Tensor], int, StageSpec], torch.Tensor]
    layout: Callable[[int, StageSpec], dict[str, tuple[str, int]]]


@dataclass(frozen=True)
class LosslessStage:
    """``compress(body, stage_spec) -> bytes``; ``decompress(data, size) -> bytes`` yields at most ``size``
    bytes and raises CodecError unless the stream ends exactly there."""

    kind = "lossless"
    options: Mapping[str, Option]
    positional: str | None
    compress: Callable[[bytes, StageSpec], bytes]
    decompress: Callable[[bytes, int], bytes]


Stage = Union[SparsifyStage, ValueStage, LosslessStage]


def _check_finite(name: str, t: torch.Tensor, what: str) -> None:
    """Raise CodecError(f"{name}: {what}") unless every element is finite (one pass, no allocation:
    min and max propagate NaN and show infinities)."""
    if t.numel():
        lo, hi = torch.aminmax(t)
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            raise CodecError(f"{name}: {what}")


def _cast_stage(dtype: torch.dtype, dname: str, label: str) -> ValueStage:
    def encode(name, values, _opts, _gen):
        sent = values if values.dtype is dtype else values.to(dtype)
        _check_finite(name, sent, f"non-finite value or a value outside the {label} range")
        decoded = sent if sent.dtype is torch.float32 else sent.float()
        return {"v": sent}, decoded

    def decode(name, comps, _count, _opts):
        values = comps["v"]
        _check_finite(name, values, f"non-finite {label} value in the payload")
        return values if values.dtype is torch.float32 else values.float()

    return ValueStage({}, None, encode, decode, lambda count, _opts: {"v": (dname, count)})


_F32 = _cast_stage(torch.float32, "f32", "float32")


def _blocks(values: torch.Tensor, block: int) -> list[torch.Tensor]:
    """``values`` as (full blocks x block) plus a (1 x rest) tail, without copying."""
    full = values.numel() // block
    parts = [values[: full * block].view(full, block)] if full else []
    if values.numel() > full * block:
        parts.append(values[full * block:].view(1, -1))
    return parts


def _dequantize(q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """float32 ``q * scale`` per block (the same arithmetic on both sides, so ``decoded`` is exact)."""
    out = torch.empty(q.numel(), dtype=torch.float32, device=q.device)
    row = 0
    for qb, ob in zip(_blocks(q, block), _blocks(out, block)):
        torch.mul(qb.to(torch.float32), scales[row:row + qb.shape[0]].unsqueeze(1), out=ob)
        row += qb.shape[0]
    return out


def _int8_encode(name, values, opts, generator):
    block = int(opts.option("block"))
    stochastic = opts.option("round") == "stochastic"
    q = torch.empty(values.numel(), dtype=torch.int8, device=values.device)
    scale_parts = []
    for vb, qb in zip(_blocks(values, block), _blocks(q, block)):
        lo, hi = torch.aminmax(vb, dim=1)
        amax = torch.maximum(-lo, hi)
        if not bool(torch.isfinite(amax).all()):
            raise CodecError(f"{name}: the delta has non-finite values")
        scale = amax / 127.0
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
        x = vb / divisor
        if stochastic:
            x.add_(torch.rand(x.shape, generator=generator, device=x.device)).floor_()
        else:
            x.round_()
        qb.copy_(x.clamp_(-127, 127))
        scale_parts.append(scale)
    scales = torch.cat(scale_parts) if scale_parts else torch.empty(0, device=values.device)
    return {"q": q, "s": scales}, _dequantize(q, scales, block)


def _int8_decode(name, comps, _count, opts):
    q, scales = comps["q"], comps["s"]
    if scales.numel() and not bool(((scales >= 0) & (scales <= _FLOAT32_MAX / 127)).all()):
        raise CodecError(f"{name}: int8 block scales must be finite, >= 0 and <= float32 max / 127")
    if q.numel() and int(q.min()) < -127:
        raise CodecError(f"{name}: int8 value -128 is never produced by the encoder")
    return _dequantize(q, scales, int(opts.option("block")))


def _int8_layout(count, opts):
    return {"q": ("i8", count), "s": ("f32", -(-count // int(opts.option("block"))))}


def _finish(d, out: bytes, size: int, label: str, more: Callable[[], bytes]) -> bytes:
    """Check that a bounded decompression produced exactly ``size`` bytes and the stream ended there."""
    if len(out) > size:
        raise CodecError(f"body: the {label} stream holds more than the declared {size} bytes")
    if len(out) == size and not d.eof and more():  # the end marker may be unread: one more byte proves excess
        raise CodecError(f"body: the {label} stream holds more than the declared {size} bytes")
    if len(out) != size or not d.eof:
        raise CodecError(f"body: the {label} stream is truncated ({len(out)} of {size} bytes)")
    if d.unused_data:
        raise CodecError(f"body: {len(d.unused_data)} bytes after the end of the {label} stream")
    return out


def _zlib_decompress(data: bytes, size: int) -> bytes:
    d = zlib.decompressobj()
    try:
        # zlib reads max_length=0 as "no limit" (a few KiB of zeros would inflate without bound): for a
        # declared size of 0 ask for one byte, which _finish then refuses if it exists.
        out = d.decompress(data, size or 1)
        return _finish(d, out, size, "zlib", lambda: d.decompress(d.unconsumed_tail, 1))
    except zlib.error as exc:
        raise CodecError(f"body: corrupt zlib stream: {exc}") from None


def _lzma_decompress(data: bytes, size: int) -> bytes:
    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=1 << 28)
    try:
        out = d.decompress(data, size)
        return _finish(d, out, size, "lzma", lambda: d.decompress(b"", 1))
    except lzma.LZMAError as exc:
        raise CodecError(f"body: corrupt lzma stream: {exc}") from None


STAGES: dict[str, Stage] = {
    "topk": SparsifyStage(
        options={"k": Option(_fraction, 0.01)},
        positional="k",
        select=_topk_select,
        max_count=lambda numel, opts: topk_count(numel, float(opts.option("k"))),
    ),
    "fp16": _cast_stage(torch.float16, "f16", "fp16"),
    "bf16": _cast_stage(torch.bfloat16, "bf16", "bf16"),
    "int8": ValueStage(
        options={"block": Option(_int_in(8, 1 << 20), 256), "round": Option(_one_of("nearest", "stochastic"), "nearest")},
        positional=None,
        encode=_int8_encode,
        decode=_int8_decode,
        layout=_int8_layout,
    ),
    "zlib": LosslessStage(
        options={"level": Option(_int_in(1, 9), 6)},
        positional=None,
        compress=lambda body, opts: zlib.compress(body, int(opts.option("level"))),
        decompress=_zlib_decompress,
    ),
    "lzma": LosslessStage(
        options={"preset": Option(_int_in(0, 9), 6)},
        positional=None,
        compress=lambda body, opts: lzma.compress(body, format=lzma.FORMAT_XZ, preset=int(opts.option("preset"))),
        decompress=_lzma_decompress,
    ),
}

_S = TypeVar("_S", SparsifyStage, ValueStage, LosslessStage)


def _stage_of(kind: type[_S], name: str) -> _S:
    """``STAGES[name]`` as a stage of ``kind``: parse_codec files each stage under its own kind in a CodecSpec."""
    stage = STAGES[name]
    if not isinstance(stage, kind):  # only a hand-built CodecSpec can get here
        raise TypeError(f"stage {name!r} is a {stage.kind} stage, not a {kind.kind} stage")
    return stage


# -- sparse index packing -----------------------------------------------------------------------------------


def _varint_len(numel: int) -> int:
    """Most bytes one gap of a tensor of ``numel`` elements needs."""
    return max(1, -(-max(numel - 1, 1).bit_length() // 7))


def _gaps(indices: torch.Tensor) -> torch.Tensor:
    gaps = indices.clone()
    gaps[1:] -= indices[:-1] + 1
    return gaps


def _varint_encode(values: torch.Tensor) -> torch.Tensor:
    """LEB128 (7 bits per byte, high bit = more follows) of non-negative int64 values, as uint8."""
    nbytes = torch.ones_like(values)
    j = 1
    while j < _MAX_VARINT_BYTES and values.numel():
        more = values >= (1 << (7 * j))
        if not bool(more.any()):
            break
        nbytes += more
        j += 1
    ends = torch.cumsum(nbytes, 0)
    starts = ends - nbytes
    out = torch.empty(int(ends[-1]) if values.numel() else 0, dtype=torch.uint8, device=values.device)
    for b in range(j):  # one pass per byte position, not per value
        sel = nbytes > b
        chunk = (values[sel] >> (7 * b)) & 0x7F
        chunk |= (nbytes[sel] > b + 1).long() << 7
        out[starts[sel] + b] = chunk.to(torch.uint8)
    return out


def _varint_decode(name: str, data: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of ``_varint_encode``: exactly ``count`` int64 values; raises CodecError naming ``name``."""
    if data.numel() == 0:
        if count:
            raise CodecError(f"{name}: no index bytes for {count} entries")
        return torch.empty(0, dtype=torch.int64)
    last = (data & 0x80) == 0
    found = int(last.sum())
    if found != count or not bool(last[-1]):
        raise CodecError(f"{name}: index bytes hold {found} complete varints (last one {'complete' if bool(last[-1]) else 'truncated'}), header declares {count} entries")
    group = torch.cumsum(last, 0) - last.long()  # which value each byte belongs to
    ends = torch.nonzero(last).squeeze(1)
    starts = torch.cat([ends.new_zeros(1), ends[:-1] + 1])
    position = torch.arange(data.numel()) - starts[group]
    if int(position.max()) >= _MAX_VARINT_BYTES:
        raise CodecError(f"{name}: a varint longer than {_MAX_VARINT_BYTES} bytes")
    out = torch.zeros(count, dtype=torch.int64)
    out.index_add_(0, group, (data & 0x7F).long() << (7 * position))
    return out


def _bitmap_encode(indices: torch.Tensor, numel: int) -> torch.Tensor:
    bits = torch.zeros(-(-numel // 8) * 8, dtype=torch.uint8, device=indices.device)
    bits[indices] = 1
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=indices.device)
    return (bits.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def _bitmap_decode(name: str, data: torch.Tensor, count: int, numel: int) -> torch.Tensor:
    if data.numel() != -(-numel // 8):
        raise CodecError(f"{name}: bitmap of {data.numel()} bytes for {numel} elements (needs {-(-numel // 8)})")
    bits = (data.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    bits = bits.view(-1)
    if bool(bits[numel:].any()):
        raise CodecError(f"{name}: bitmap sets a bit past the end of the tensor (index out of range)")
    indices = torch.nonzero(bits).squeeze(1)
    if indices.numel() != count:
        raise CodecError(f"{name}: bitmap marks {indices.numel()} entries, header declares {count}")
    return indices


def _pack_indices(indices: torch.Tensor, numel: int) -> tuple[str, torch.Tensor]:
    """The smaller of varint gaps and a bitmap for sorted unique ``indices``: (encoding name, uint8 bytes)."""
    varint = _varint_encode(_gaps(indices))
    if varint.numel() <= -(-numel // 8):
        return "varint", varint
    return "bitmap", _bitmap_encode(indices, numel)


def _unpack_indices(name: str, encoding: str, data: torch.Tensor, count: int, numel: int) -> torch.Tensor:
    if encoding == "bitmap":
        return _bitmap_decode(name, data, count, numel)
    gaps = _varint_decode(name, data, count)
    if count == 0:
        return gaps
    if int(gaps.max()) >= numel:  # with numel, count <= 2**31 the cumulative sum stays below 2**62
        raise CodecError(f"{name}: index gap {int(gaps.max())} is out of range for {numel} elements")
    indices = torch.cumsum(gaps, 0) + torch.arange(count)
    if int(indices[-1]) >= numel:
        raise CodecError(f"{name}: index {int(indices[-1])} is out of range for {numel} elements")
    return indices


# -- encode / decode ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedUpdate:
    """An encoded delta.

    codec: the canonical codec spec. data: the payload bytes (``decode(data)`` reads them).
    raw_bytes: the delta's dense float32 size (4 bytes per element); wire_bytes: ``len(data)``. These go
        into the ``Update`` message's ``raw_bytes`` / ``wire_bytes``.
    decoded: name -> dense float32 tensor or SparseTensor, on the delta's device, equal bit for bit to
        what ``decode(data)`` returns. For ``none`` a float32 contiguous delta's tensor is returned as a
        view (no copy), so do not modify the delta while ``decoded`` is in use.
    """

    codec: str
    data: bytes
    raw_bytes: int
    wire_bytes: int
    decoded: dict[str, Decoded]

    @property
    def ratio(self) -> float:
        """raw_bytes / wire_bytes."""
        return self.raw_bytes / max(1, self.wire_bytes)


def encode(
    delta: Mapping[str, torch.Tensor], spec: str | CodecSpec, *, generator: torch.Generator | None = None
) -> EncodedUpdate:
    """Encode ``delta`` (name -> floating-point tensor, any shape and device) with codec ``spec``.

    generator: random source for ``int8:round=stochastic`` (on the delta's device); None uses torch's.
    Raises CodecError for a bad spec or a non-finite value (or one outside fp16's range), TypeError for an
    entry that is not a floating-point tensor. ``delta`` is never modified.
    """
    spec = parse_codec(spec)
    sparsify = spec.sparsify
    values_stage = _stage_of(ValueStage, spec.values.name) if spec.values else _F32
    value_opts = spec.values or StageSpec("f32")
    entries: list[list[object]] = []  # [name, shape, layout, count, index encoding], as the header holds them
    components: dict[str, torch.Tensor] = {}
    decoded: dict[str, Decoded] = {}
    raw_bytes = 0
    scratch = None
    for i, (name, tensor) in enumerate(delta.items()):
        if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME:
            raise TypeError(f"delta names must be non-empty strings of at most {_MAX_NAME} characters, got {name!r:.80}")
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {getattr(tensor, 'dtype', type(tensor).__name__)}")
        shape = list(tensor.shape)
        if len(shape) > _MAX_DIMS:
            raise CodecError(f"{name}: {len(shape)} dimensions; the wire format allows {_MAX_DIMS}")
        flat = tensor.detach().reshape(-1)
        if flat.dtype is not torch.float32:
            flat = flat.float()
        n = flat.numel()
        raw_bytes += 4 * n
        indices = None
        if sparsify is not None and n > 1 and topk_count(n, float(sparsify.option("k"))) < n:
            if scratch is None or scratch.numel() < n or scratch.device != flat.device:
                biggest = max(t.numel() for t in delta.values() if isinstance(t, torch.Tensor))
                scratch = torch.empty(biggest, dtype=torch.float32, device=flat.device)
            indices = _stage_of(SparsifyStage, sparsify.name).select(name, flat, sparsify, scratch)
            values = flat[indices]
        else:
            values = flat
        comps, dec = values_stage.encode(name, values, value_opts, generator)
        for role, t in comps.items():
            components[f"{i}.{role}"] = t.cpu()
        if indices is None:
            entries.append([name, shape, "dense", n, None])
            decoded[name] = dec.view(tensor.shape)
        else:
            index_encoding, packed = _pack_indices(indices, n)
            components[f"{i}.x"] = packed.cpu()
            entries.append([name, shape, "sparse", int(indices.numel()), index_encoding])
            decoded[name] = SparseTensor(indices, dec, tuple(shape))
    body = encode_state(components)
    body_encoding, wire_body = "raw", body
    if spec.lossless is not None:
        compressed = _stage_of(LosslessStage, spec.lossless.name).compress(body, spec.lossless)
        if len(compressed) < len(body):  # the lossless stage only where it pays
            body_encoding, wire_body = spec.lossless.name, compressed
    header = {"v": FORMAT_VERSION, "codec": str(spec), "body": body_encoding, "body_len": len(body), "tensors": entries}
    data = envelope.pack(MAGIC, header, wire_body)
    return EncodedUpdate(str(spec), data, raw_bytes, len(data), decoded)


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    numel: int
    layout: str
    count: int
    index: str | None


def _read_header(view: memoryview) -> tuple[dict, memoryview]:
    header, body = envelope.unpack(
        view, MAGIC, CodecError, what="an encoded update", max_header=_MAX_HEADER,
        max_bin_len=0, max_ext_len=0, max_str_len=_MAX_NAME * 4, max_array_len=1_000_000, max_map_len=16,
        strict_map_key=True,
    )
    if not isinstance(header, dict) or set(header) != {"v", "codec", "body", "body_len", "tensors"}:
        raise CodecError("header must be a map with exactly v, codec, body, body_len, tensors")
    if header["v"] != FORMAT_VERSION:
        raise CodecError(f"unsupported payload format version {header['v']!r:.40} (this code reads {FORMAT_VERSION})")
    return header, body


def _read_entries(raw: object, spec: CodecSpec, max_elements: int) -> list[_Entry]:
    if not isinstance(raw, list):
        raise CodecError("header tensors must be a list")
    entries, names, total = [], set(), 0
    for item in raw:
        if not (isinstance(item, list) and len(item) == 5):
            raise CodecError(f"bad tensor entry {item!r:.80}")
        name, shape, layout, count, index = item
        if not isinstance(name, str) or not name or len(name) > _MAX_NAME or name in names:
            raise CodecError(f"bad or duplicate tensor name {name!r:.80}")
        names.add(name)
        if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(type(d) is int and d >= 0 for d in shape)):
            raise CodecError(f"{name}: bad shape {shape!r:.80}")
        numel = math.prod(shape)
        if math.prod(max(d, 1) for d in shape) > max_elements:  # [0, 2**63] has no elements, but torch refuses it
            raise CodecError(f"{name}: shape {shape!r:.80} is out of range (max_elements={max_elements})")
        total += numel
        if total > max_elements:
            raise CodecError(f"{name}: the payload declares more than max_elements={max_elements} elements")
        if type(count) is not int:
            raise CodecError(f"{name}: bad count {count!r:.40}")
        if layout == "dense":
            if count != numel or index is not None:
                raise CodecError(f"{name}: dense entry declares {count} values for {numel} elements")
        elif layout == "sparse":
            if spec.sparsify is None:
                raise CodecError(f"{name}: sparse entry in a payload whose codec {spec} does not sparsify")
            limit = _stage_of(SparsifyStage, spec.sparsify.name).max_count(numel, spec.sparsify)
            if not 0 <= count <= limit:
                raise CodecError(f"{name}: sparse entry declares {count} values; {spec} allows 0..{limit} of {numel}")
            if index not in ("varint", "bitmap"):
                raise CodecError(f"{name}: unknown index encoding {index!r:.40}")
        else:
            raise CodecError(f"{name}: unknown layout {layout!r:.40}")
        entries.append(_Entry(name, tuple(shape), numel, layout, count, index))
    return entries


def _expected_components(entries: list[_Entry], stage: ValueStage,
                         opts: StageSpec) -> tuple[dict[str, tuple[str, int | None]], int]:
    """{component name: (dtype name, numel or None for index bytes)} and an upper bound of the body size."""
    wanted: dict[str, tuple[str, int | None]] = {}
    bound = 64
    for i, e in enumerate(entries):
        for role, (dname, numel) in stage.layout(e.count, opts).items():
            wanted[f"{i}.{role}"] = (dname, numel)
            bound += 64 + numel * DTYPES[dname].itemsize
        if e.layout == "sparse":
            wanted[f"{i}.x"] = ("u8", None)
            most = -(-e.numel // 8) if e.index == "bitmap" else e.count * _varint_len(e.numel)
            bound += 64 + most
    return wanted, bound


def decode(
    data: bytes | bytearray | memoryview,
    expected_codec: str | CodecSpec | None = None,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> dict[str, Decoded]:
    """Decode a payload from ``encode``: name -> dense float32 tensor or SparseTensor (CPU).

    expected_codec: when given, the payload's codec must be this one (the codec the task asked for).
    max_elements: the most elements (summed over tensors) the payload may declare, in (0, 2**31].
    Raises CodecError (a ValueError; UnknownCodec for an unknown stage) naming the tensor and the problem
    for anything inconsistent: bad magic or version, truncated or trailing bytes, unknown or unexpected
    codec, lying lengths, out-of-range or disagreeing indices, non-finite values or scales. Never
    allocates more than the declared shapes imply.
    """
    if not 0 < max_elements <= DEFAULT_MAX_ELEMENTS:
        raise ValueError(f"max_elements must be in (0, 2**31], got {max_elements!r}")
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise CodecError(f"expected bytes, got {type(data).__name__}") from None
    body: memoryview | bytes  # bytes once the lossless stage is undone
    header, body = _read_header(view)
    if not isinstance(header["codec"], str):
        raise CodecError("header codec must be a string")
    try:
        spec = parse_codec(header["codec"])
    except UnknownCodec as exc:
        raise UnknownCodec(f"payload: {exc}") from None
    except CodecError as exc:
        raise CodecError(f"payload: {exc}") from None
    if expected_codec is not None and spec != parse_codec(expected_codec):
        raise CodecError(f"payload codec {str(spec)!r} differs from the expected {str(parse_codec(expected_codec))!r}")
    entries = _read_entries(header["tensors"], spec, max_elements)
    values_stage = _stage_of(ValueStage, spec.values.name) if spec.values else _F32
    value_opts = spec.values or StageSpec("f32")
    wanted, bound = _expected_components(entries, values_stage, value_opts)
    body_len, body_encoding = header["body_len"], header["body"]
    if type(body_len) is not int or not 0 <= body_len <= bound:
        raise CodecError(f"declared body length {body_len!r:.40} is impossible for the declared tensors (at most {bound})")
    if body_encoding == "raw":
        if len(body) != body_len:
            raise CodecError(f"body is {len(body)} bytes, header declares {body_len} (truncated or trailing data)")
    elif spec.lossless is not None and body_encoding == spec.lossless.name:
        body = _stage_of(LosslessStage, spec.lossless.name).decompress(bytes(body), body_len)
    else:
        raise CodecError(f"body encoding {body_encoding!r:.40} does not match codec {str(spec)!r}")
    try:
        comps = decode_state(body)
    except TensorFormatError as exc:
        raise CodecError(f"body: {exc}") from None
    if set(comps) != set(wanted):
        extra, missing = sorted(set(comps) - set(wanted)), sorted(set(wanted) - set(comps))
        raise CodecError(f"body components differ from the header: unexpected {extra[:3]}, missing {missing[:3]}")
    for key, (dname, numel) in wanted.items():
        t = comps[key]
        if t.dtype is not DTYPES[dname] or t.dim() != 1 or (numel is not None and t.numel() != numel):
            entry = entries[int(key.split(".")[0])]
            raise CodecError(f"{entry.name}: component {key.split('.')[1]!r} is {t.dtype}{list(t.shape)}, expected {dname}[{numel}]")
    out: dict[str, Decoded] = {}
    for i, e in enumerate(entries):
        roles = {role: comps[f"{i}.{role}"] for role in values_stage.layout(e.count, value_opts)}
        values = values_stage.decode(e.name, roles, e.count, value_opts)
        if e.layout == "dense":
            out[e.name] = values.view(e.shape)
        else:
            index = cast(str, e.index)  # _read_entries accepts a sparse entry only with "varint" or "bitmap"
            indices = _unpack_indices(e.name, index, comps[f"{i}.x"], e.count, e.numel)
            out[e.name] = SparseTensor(indices, values, e.shape)
    return out
