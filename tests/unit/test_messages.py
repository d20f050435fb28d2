import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.learning.config import TrainConfig
from common.wire import messages as m

EXAMPLES = [
    m.TrainTask("exp", "run-1", "t1", 3, 1700000000.0, "topk-0.01", "kws-tiny", False,
                TrainConfig(steps=50, batch_size=16, learning_rate=1e-4, seed=1)),
    m.EvaluateTask("exp", "e1", 4, "test", 1700000000.0),
    m.Update("exp", "t1", "node-a:cuda:0", 3, 128, {"loss": 0.5}, "fp32", 400, 380, m.PayloadRef(inline=b"\x00\x01")),
    m.Update("exp", "t2", "node-a:cpu", 3, 128, {}, "int8", 400, 100, m.PayloadRef(transfer_id="abc")),
    m.ModelVersion("exp", 7, 1234, 48, 380_000_000, "ab" * 32, "tid", 1700000000.5),
    m.Registration("exp", "node-a", ["cuda:0", "cuda:1"], "dirichlet(0.3) 2/8", 5120),
    m.Heartbeat("exp", "node-a", "cuda:0", 1700000000.0, "training"),
    m.Metrics("exp", "coordinator", 7, {"accuracy": 0.91}, 1700000000.0),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda x: type(x).__name__)
def test_every_message_type_round_trips(msg):
    assert m.decode(m.encode(msg)) == msg


def _raw(msg, **changes):
    body = msgpack.unpackb(m.encode(msg), raw=False)
    body.update(changes)
    return body


def test_missing_field_is_named():
    body = _raw(EXAMPLES[0])
    del body["local"]["batch_size"]
    with pytest.raises(m.InvalidField, match="train_task.local: missing field 'batch_size'"):
        m.decode(msgpack.packb(body))


def test_wrong_type_is_named():
    with pytest.raises(m.InvalidField, match="min_version"):
        m.decode(msgpack.packb(_raw(EXAMPLES[0], min_version="3")))


def test_bool_is_not_an_int():
    with pytest.raises(m.InvalidField):
        m.decode(msgpack.packb(_raw(EXAMPLES[0], min_version=True)))


def test_unknown_type_and_version_and_extra_field():
    with pytest.raises(m.UnknownMessageType):
        m.decode(msgpack.packb(_raw(EXAMPLES[0], t="launch_missiles")))
    with pytest.raises(m.UnsupportedSchemaVersion):
        m.decode(msgpack.packb(_raw(EXAMPLES[0], v=99)))
    with pytest.raises(m.InvalidField, match="unexpected"):
        m.decode(msgpack.packb(_raw(EXAMPLES[0], evil=1)))


def test_payload_ref_needs_exactly_one_target():
    with pytest.raises(m.InvalidField):
        m.decode(msgpack.packb(_raw(EXAMPLES[2], payload={"inline": None, "transfer_id": None})))


def test_size_limits_reject_oversized_input():
    with pytest.raises(m.MalformedMessage, match="exceeds"):
        m.decode(b"\x00" * 100, max_bytes=10)
    # a str header claiming 4 GiB must not allocate it
    with pytest.raises(m.MalformedMessage):
        m.decode(b"\xdb\xff\xff\xff\xff" + b"a" * 10)


def test_trailing_bytes_and_non_map_are_malformed():
    with pytest.raises(m.MalformedMessage):
        m.decode(m.encode(EXAMPLES[1]) + b"\x00")
    with pytest.raises(m.MalformedMessage):
        m.decode(msgpack.packb([1, 2]))


@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_message_errors(data):
    try:
        m.decode(data)
    except m.MessageError:
        pass
