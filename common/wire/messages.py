"""Wire messages: frozen dataclasses, msgpack-encoded, versioned, strictly validated on decode.

Every message is a msgpack map ``{"t": <type tag>, "v": <schema version>, ...fields}``. `decode` returns the
dataclass named by the tag, or raises a `MessageError` subclass naming the problem. Decoding is bounded:
the whole message and every string/bin/array/map inside it have hard size limits, so hostile input cannot
exhaust memory. No pickle anywhere: only msgpack scalars, lists, maps and bytes cross the wire.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass

import msgpack

from common.errors import MqfedError
from common.learning.config import TrainConfig

SCHEMA_VERSION = 5  # 2: TrainTask carries typed local-training settings (`local`), not an options map;
#                    3: `local` gained the augmentation fields (speed, gain_db, noise_snr_db, time_masks, time_mask_ms);
#                    4: `local` gained eq_db (random equalisation); 5: `local` gained keep_optimizer
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # inline payloads are limited to this; bigger ones travel chunked
_MAX_STR = 1024 * 1024
_MAX_ARRAY = 100_000
_MAX_MAP = 100_000


class MessageError(MqfedError, ValueError):
    """Base of every decoding/validation error."""


class MalformedMessage(MessageError):
    """The bytes are not a msgpack map (or exceed a size limit)."""


class UnknownMessageType(MessageError):
    """The type tag names no known message."""


class UnsupportedSchemaVersion(MessageError):
    """The schema version is not one this code understands."""


class InvalidField(MessageError):
    """A field is missing, unexpected, or of the wrong type/value."""


@dataclass(frozen=True)
class PayloadRef:
    """Where an update's or model's tensor bytes are: inline, or a chunked transfer id (see common/chunks)."""

    inline: bytes | None = None
    transfer_id: str | None = None

    def __post_init__(self) -> None:
        if (self.inline is None) == (self.transfer_id is None):
            raise InvalidField("PayloadRef needs exactly one of inline or transfer_id")


@dataclass(frozen=True)
class TrainTask:
    """Train `model` from the newest version >= `min_version` (or the newest there is) with `local`, compress
    the delta with `codec`, answer before `deadline_unix`. `run_id` names the run (a fresh start makes a new
    one): a worker's error-feedback residual belongs to one run."""

    experiment: str
    run_id: str
    task_id: str
    min_version: int
    deadline_unix: float
    codec: str
    model: str
    freeze_feature_encoder: bool
    local: TrainConfig


@dataclass(frozen=True)
class EvaluateTask:
    experiment: str
    task_id: str
    version: int
    split: str
    deadline_unix: float


@dataclass(frozen=True)
class Update:
    experiment: str
    task_id: str
    worker_id: str
    base_version: int
    num_samples: int
    metrics: dict[str, float]
    codec: str
    raw_bytes: int
    wire_bytes: int
    payload: PayloadRef


@dataclass(frozen=True)
class ModelVersion:
    """Announcement that model `version` is in the model stream starting at `stream_offset`."""

    experiment: str
    version: int
    stream_offset: int
    num_chunks: int
    size_bytes: int
    sha256: str
    transfer_id: str
    created_unix: float


@dataclass(frozen=True)
class Registration:
    experiment: str
    node: str
    devices: list[str]
    shard: str
    shard_size: int


MAX_TASK_ID = 256  # a Heartbeat's task ids (the coordinator's are 29 characters: coordinator/dispatch.py)


@dataclass(frozen=True)
class Heartbeat:
    """A trainer is alive, and what it is doing (for `mqfed-coordinator status --watch`).

    The fields after `status` are optional (a heartbeat of an older worker decodes with these defaults):
    `task_id`, the task it runs now ("" between tasks); `samples_per_s` of its last training (0.0: none
    yet); its last update published: the task it answered (`last_update_task`, "" none), the version it
    trained from (`last_update_base`, -1 none) and when it was published (`last_update_unix`, this worker's
    clock, 0.0 none)."""

    experiment: str
    node: str
    device: str
    sent_unix: float
    status: str = "idle"
    task_id: str = ""
    samples_per_s: float = 0.0
    last_update_task: str = ""
    last_update_base: int = -1
    last_update_unix: float = 0.0

    def __post_init__(self) -> None:
        for name in ("task_id", "last_update_task"):
            if len(getattr(self, name)) > MAX_TASK_ID:
                raise InvalidField(f"{name}: longer than {MAX_TASK_ID} characters")
        for name in ("samples_per_s", "last_update_unix"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise InvalidField(f"{name}: must be a finite number >= 0, got {value!r}")
        if self.last_update_base < -1:
            raise InvalidField(f"last_update_base: must be >= -1 (-1: none), got {self.last_update_base}")


@dataclass(frozen=True)
class Metrics:
    experiment: str
    source: str
    version: int
    values: dict[str, float]
    sent_unix: float


MESSAGE_TYPES: dict[str, type] = {
    "train_task": TrainTask,
    "evaluate_task": EvaluateTask,
    "update": Update,
    "model_version": ModelVersion,
    "registration": Registration,
    "heartbeat": Heartbeat,
    "metrics": Metrics,
}
_TAG_OF = {cls: tag for tag, cls in MESSAGE_TYPES.items()}
Message = typing.Union[TrainTask, EvaluateTask, Update, ModelVersion, Registration, Heartbeat, Metrics]


def type_tag(msg: Message) -> str:
    """The wire tag of a message instance (also used as the AMQP `type` property)."""
    try:
        return _TAG_OF[type(msg)]
    except KeyError:
        raise UnknownMessageType(f"not a wire message: {type(msg).__name__}") from None


def _to_wire(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def encode(msg: Message) -> bytes:
    """Encode a message to msgpack bytes (type tag and schema version included)."""
    tag = type_tag(msg)
    body = {"t": tag, "v": SCHEMA_VERSION}
    for f in dataclasses.fields(msg):
        body[f.name] = _to_wire(getattr(msg, f.name))
    return msgpack.packb(body, use_bin_type=True)


def _check(name: str, value, hint) -> object:
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _struct(name, value, hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(name, value, arg)
            except InvalidField:
                pass
        raise InvalidField(f"{name}: expected {hint}, got {type(value).__name__}")
    if origin in (list, tuple):
        return _check_array(name, value, hint)
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        if not isinstance(value, dict):
            raise InvalidField(f"{name}: expected a map, got {type(value).__name__}")
        return {_check(f"{name} key", k, key_t): _check(f"{name}[{k!r}]", v, val_t) for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidField(f"{name}: expected a number, got {type(value).__name__}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidField(f"{name}: expected an integer, got {type(value).__name__}")
        return value
    if hint in (str, bytes, bool):
        if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
            raise InvalidField(f"{name}: expected {hint.__name__}, got {type(value).__name__}")
        return value
    raise InvalidField(f"{name}: unsupported field type {hint}")


def _check_array(name: str, value, hint) -> list | tuple:
    """A msgpack array as `list[T]`, or as a fixed-length `tuple[T, ...]` (TrainConfig's ranges): exactly that
    many items."""
    items = typing.get_args(hint)
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise InvalidField(f"{name}: expected a list, got {type(value).__name__}")
        return [_check(f"{name}[{i}]", v, items[0]) for i, v in enumerate(value)]
    if not isinstance(value, list) or len(value) != len(items):
        raise InvalidField(f"{name}: expected a list of {len(items)} items, got {type(value).__name__}"
                           + (f" of {len(value)}" if isinstance(value, list) else ""))
    return tuple(_check(f"{name}[{i}]", v, item) for i, (v, item) in enumerate(zip(value, items)))


def _struct(name: str, value, cls: type):
    """A nested map into the dataclass `cls`: exactly its fields, each checked; its own rules apply."""
    fields = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(value, dict):
        raise InvalidField(f"{name}: expected a map of {', '.join(fields)}, got {type(value).__name__}")
    missing, unknown = [f for f in fields if f not in value], set(value) - set(fields)
    if missing or unknown:
        raise InvalidField(f"{name}: " + (f"missing field {missing[0]!r}" if missing else
                                          f"unexpected field(s) {sorted(unknown, key=repr)}"))
    hints = typing.get_type_hints(cls)
    try:
        return cls(**{f: _check(f"{name}.{f}", value[f], hints[f]) for f in fields})
    except InvalidField:
        raise
    except MqfedError as exc:
        raise InvalidField(f"{name}: {exc}") from None


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Decode and validate msgpack bytes into the message dataclass named by their type tag.

    Raises MalformedMessage, UnknownMessageType, UnsupportedSchemaVersion or InvalidField (all MessageError).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MalformedMessage(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    unpacker = msgpack.Unpacker(
        raw=False, max_buffer_size=max(len(data), 1), max_bin_len=max_bytes, max_str_len=_MAX_STR,
        max_array_len=_MAX_ARRAY, max_map_len=_MAX_MAP, max_ext_len=0, strict_map_key=True,
    )
    try:
        unpacker.feed(data)
        body = unpacker.unpack()
    except msgpack.OutOfData:
        raise MalformedMessage("truncated msgpack data") from None
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise MalformedMessage(f"not valid msgpack: {exc}") from None
    if unpacker.tell() != len(data):
        raise MalformedMessage(f"{len(data) - unpacker.tell()} trailing bytes after the message")
    if not isinstance(body, dict):
        raise MalformedMessage(f"expected a msgpack map, got {type(body).__name__}")
    tag = body.pop("t", None)
    version = body.pop("v", None)
    if tag is None or version is None:
        raise MalformedMessage("message lacks its type tag 't' or schema version 'v'")
    if not isinstance(tag, str) or tag not in MESSAGE_TYPES:
        raise UnknownMessageType(f"unknown message type {tag!r:.80}")
    if version != SCHEMA_VERSION:
        raise UnsupportedSchemaVersion(f"{tag}: schema version {version!r} unsupported (this code speaks {SCHEMA_VERSION})")
    cls = MESSAGE_TYPES[tag]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(body) - set(fields)
    if unknown:
        raise InvalidField(f"{tag}: unexpected field(s) {sorted(unknown, key=repr)}")  # str and bytes keys
    kwargs = {}
    for name, f in fields.items():
        if name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InvalidField(f"{tag}: missing field {name!r}")
            continue
        kwargs[name] = _check(f"{tag}.{name}", body[name], hints[name])
    try:
        return cls(**kwargs)
    except InvalidField as exc:
        raise InvalidField(f"{tag}: {exc}") from None
