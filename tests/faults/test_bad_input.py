"""Bad input against a real coordinator on the real broker: every kind of malformed, inconsistent or hostile
message on the updates queue is dead-lettered (or, for a good transfer that arrives oddly, applied once),
counted, and logged; nothing crashes and nothing bad is applied.

Everything runs as the generated least-privilege users (broker/definitions.py): the coordinator as the
experiment's coordinator user, the hostile publisher as worker node `faulty`; only the test's observer (the
dead-letter reader) is an administrator. Task ids are signed by the coordinator: a test names its updates by
a label, and `Federation.signed(label)` makes the id a task of this run would have.

One `coordinator.server.Coordinator` runs in a thread for the whole module (K = 1, so any accepted update
would take a server step at once; the kws-tiny model; a 12-clip evaluation set; no evaluation during the
run; `tasks.transfer_timeout_s` = 3 s; `fedbuff.max_update_norm` = 1). One coordinator surviving every case
in turn is itself the "nothing crashes" check, and keeps the module at about a minute. Each test:

1. publishes its bad message(s) to `mqfed.<exp>.updates` (through the experiment's work exchange), each
   delivery with its own `message_id`;
2. then publishes one good update and waits until the coordinator applied it: the queue is FIFO with one
   consumer, so the bad messages were handled first, and the run record must show exactly one new version
   holding exactly that good update (the consumer is alive, and nothing bad took a step);
3. reads `mqfed.<exp>.dead-letters` with basic_get until it holds the expected deliveries, then publishes a
   malformed sentinel and reads on until the sentinel arrives, so it also sees anything dead-lettered that
   was not expected; every dead letter must carry `x-death` reason `rejected` from the updates queue;
4. checks the counters' change (the consumer's `stats.rejected` by error type, the coordinator's
   `counters`, the aggregator's `counters["rejected"]` by reason) and the structlog events the coordinator
   logged meanwhile (captured in-process by a processor placed in front of structlog's chain).
docs/faults.md ("Bad input") tabulates the cases and what the system does with each.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import math
import re
import struct
import threading
import time
import uuid
import zlib
from typing import Callable

import msgpack
import pika
import pytest
import structlog
import torch

from broker import topology
from common.compression import codecs
from common.learning.config import TrainConfig
from common.transport.connection import connect
from common.transport.publish import publish_message, sender
from common.wire import messages
from common.wire.chunks import publish_chunked
from common.wire.tensors import decode_state, encode_state

pytestmark = pytest.mark.faults

BROKER_MAX_MESSAGE_SIZE = 128 * 1024 * 1024  # broker/rabbitmq.conf max_message_size
WAIT_S = 90.0  # how long to wait for something that should happen (generous: shared 2-core machine)


# -- the running coordinator --------------------------------------------------------------------------------

class _LogTee:
    """A structlog processor that keeps a copy of every event dict, placed first in the chain."""

    def __init__(self) -> None:
        self.entries: list[dict] = []

    def __call__(self, _logger, method_name: str, event_dict: dict) -> dict:
        self.entries.append({**event_dict, "log_level": method_name})
        return event_dict

    def __enter__(self) -> "_LogTee":
        processors = structlog.get_config()["processors"]
        processors.insert(0, self)
        structlog.configure(processors=processors)
        return self

    def __exit__(self, *_exc) -> None:
        processors = structlog.get_config()["processors"]
        if self in processors:
            processors.remove(self)
        structlog.configure(processors=processors)


@dataclasses.dataclass
class Mark:
    """What the coordinator looked like before a test."""

    version: int
    versions_seen: int
    log_index: int
    consumer: dict
    counters: dict
    aggregator: dict


class Federation:
    """A Coordinator thread plus a publisher and a dead-letter reader on their own connection."""

    def __init__(self, coordinator, topo: topology.Topology, logs: _LogTee, worker_url: str) -> None:
        self.coordinator, self.topo, self.logs = coordinator, topo, logs
        self.versions: list[dict] = []  # the coordinator's on_version entries, in order
        self.worker_url = worker_url
        self.conn = connect("test", device="bad-input", url=worker_url, attempts=3)  # worker node `faulty`
        self.pub = self.conn.channel()
        self.pub.confirm_delivery()
        self.observer = connect("test", device="observer", attempts=3)  # an administrator
        self.dlq = self.observer.channel()
        self._signed: dict[str, str] = {}
        self.stash: list[tuple] = []  # dead letters read but not claimed yet
        self._ids = itertools.count()
        with torch.no_grad():
            self.params = {n: t.detach().clone() for n, t in coordinator.state.items() if t.is_floating_point()}

    # -- publishing ---------------------------------------------------------------------------------------
    def signed(self, label: str) -> str:
        """The task id (signed by the coordinator's dispatcher, at the current version) that stands for `label`
        in this test (a signed id stands for itself)."""
        if re.fullmatch(r"t\d+-v\d+-[0-9a-f]{16}", label):
            return label
        if label not in self._signed:
            self._signed[label] = self.coordinator.dispatcher.task_id(
                10**6 + next(self._ids), self.coordinator.version)
        return self._signed[label]

    def publish(self, body: bytes, message_id: str, headers: dict | None = None, channel=None) -> None:
        channel = channel or self.pub
        channel.basic_publish(
            self.topo.update_exchange, self.topo.UPDATES_KEY, body,
            pika.BasicProperties(delivery_mode=2, message_id=message_id, headers=headers, user_id=sender(channel)),
            mandatory=True)

    def publish_message(self, msg, message_id: str, channel=None) -> None:
        """Publish `msg` (an Update's task label made its signed task id) as worker `faulty`."""
        if isinstance(msg, messages.Update):
            msg = dataclasses.replace(msg, task_id=self.signed(msg.task_id))
        publish_message(channel or self.pub, self.topo.update_exchange, self.topo.UPDATES_KEY, msg,
                        message_id=message_id)

    def delta(self, scale: float = 1e-5) -> dict[str, torch.Tensor]:
        return {n: torch.full_like(t, scale) for n, t in self.params.items()}

    def update(self, task_id: str, data: bytes | None = None, *, codec: str = "none", **fields) -> messages.Update:
        """An Update of this experiment at the current version; `data` defaults to a small valid delta."""
        if data is None:
            data = codecs.encode(self.delta(), "none").data
        try:  # what the payload really holds, as an honest worker declares it
            raw = 4 * sum(math.prod(v.shape) for v in codecs.decode(data).values())
        except (codecs.CodecError, ValueError):
            raw = 4 * sum(t.numel() for t in self.params.values())
        base = dict(experiment=self.topo.experiment, task_id=self.signed(task_id), worker_id="faulty/cpu",
                    base_version=self.coordinator.version, num_samples=10, metrics={}, codec=codec,
                    raw_bytes=raw, wire_bytes=len(data),
                    payload=messages.PayloadRef(inline=data))
        return messages.Update(**{**base, **fields})

    def raw_update(self, task_id: str, **changes) -> bytes:
        """The msgpack map of a valid Update with `changes` applied (a value of None deletes the field)."""
        body = msgpack.unpackb(messages.encode(self.update(task_id)), raw=False)
        for key, value in changes.items():
            if value is None:
                body.pop(key, None)
            else:
                body[key] = value
        return msgpack.packb(body, use_bin_type=True)

    # -- observing ----------------------------------------------------------------------------------------
    def mark(self) -> Mark:
        self.check_alive()
        self._signed.clear()  # each test signs its labels afresh, at the version it starts at
        c = self.coordinator
        return Mark(c.version, len(self.versions), len(self.logs.entries),
                    copy.deepcopy(dataclasses.asdict(c.consumer.stats)), dict(c.counters),
                    copy.deepcopy(c.aggregator.counters))

    def check_alive(self) -> None:
        assert self.thread.is_alive(), f"the coordinator thread died: {self.errors!r}"

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)

    def apply_good_update(self, mark: Mark, update: messages.Update | None = None) -> str:
        """Publish a valid update (unless `update` was published already) and wait until it is applied.
        Asserts that it made exactly one new version since `mark` and that version holds only it."""
        if update is None:
            update = self.update(f"good-{next(self._ids)}")
            self.publish_message(update, update.task_id)
        task = self.signed(update.task_id)
        self.wait(lambda: any(task in v["tasks"] for v in self.versions[mark.versions_seen:]),
                  f"good update {task} to be applied")
        new = self.versions[mark.versions_seen:]
        assert [v["tasks"] for v in new] == [[task]], f"versions since the test began: {new}"
        assert self.coordinator.version == mark.version + 1
        return task

    def dead_letters(self, expected: list[str]) -> list[tuple[pika.BasicProperties, bytes]]:
        """The dead letters of this test: wait for the `expected` message ids (a multiset), then read up to a
        sentinel published afterwards, so that unexpected dead letters show too. Checks x-death."""
        want = collections.Counter(expected)
        got: list[tuple] = []

        def take(until: Callable[[], bool], what: str) -> None:
            pending, self.stash = self.stash, []
            for item in pending:
                (got if item[0].message_id in want or item[0].message_id == sentinel else self.stash).append(item)
            deadline = time.monotonic() + WAIT_S
            while not until():
                self.check_alive()
                method, props, body = self.dlq.basic_get(self.topo.dead_letters, auto_ack=True)
                if method is None:
                    assert time.monotonic() < deadline, f"gave up waiting for {what}; dead letters so far: " \
                                                         f"{[p.message_id for p, _ in got]}"
                    time.sleep(0.05)
                    continue
                got.append((props, body))

        sentinel = f"sentinel-{uuid.uuid4().hex[:8]}"
        take(lambda: not (want - collections.Counter(p.message_id for p, _ in got)), f"dead letters {sorted(want)}")
        self.publish(b"\xc1 sentinel", sentinel)
        take(lambda: any(p.message_id == sentinel for p, _ in got), "the sentinel")
        got = [(p, b) for p, b in got if p.message_id != sentinel]
        assert collections.Counter(p.message_id for p, _ in got) == want, "dead-lettered: " + str(
            [p.message_id for p, _ in got])
        for props, _body in got:
            death = props.headers["x-death"][0]
            assert death["reason"] == "rejected" and death["queue"] == self.topo.updates, death
        return got

    def changes(self, mark: Mark, sentinel: bool = True) -> dict:
        """Counter changes since `mark` (the sentinel's MalformedMessage taken out)."""
        c = self.coordinator
        consumer = dataclasses.asdict(c.consumer.stats)
        rejected = collections.Counter(consumer["rejected"]) - collections.Counter(mark.consumer["rejected"])
        if sentinel:
            rejected["MalformedMessage"] -= 1
        return {
            "consumer": {k: v for k, v in rejected.items() if v},
            "dead_lettered": consumer["dead_lettered"] - mark.consumer["dead_lettered"] - int(sentinel),
            "counters": {k: v - mark.counters.get(k, 0) for k, v in c.counters.items() if v != mark.counters.get(k, 0)},
            "rejected": dict(collections.Counter(c.aggregator.counters["rejected"])
                             - collections.Counter(mark.aggregator["rejected"])),
            "accepted": c.aggregator.counters["accepted"] - mark.aggregator["accepted"],
            "duplicates": c.aggregator.counters["duplicates"] - mark.aggregator["duplicates"],
        }

    def events(self, mark: Mark, event: str) -> list[dict]:
        return [e for e in self.logs.entries[mark.log_index:] if e.get("event") == event]

    def logged(self, mark: Mark, event: str, **match: str) -> dict:
        """The first `event` logged since `mark` whose fields contain each `match` value (as text)."""
        match = {k: self.signed(v) if k == "task_id" else v for k, v in match.items()}
        for e in self.events(mark, event):
            if all(text in str(e.get(key)) for key, text in match.items()):
                return e
        raise AssertionError(f"no {event} log line with {match}; {event} lines: {self.events(mark, event)}")


@pytest.fixture(scope="module")
def fed(tmp_path_factory, tiny_corpus_dir, broker_url):
    from common.config import load_config
    from coordinator.experiment import ExperimentConfig
    from coordinator.server import Coordinator

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from broker import admin, definitions

    topo = topology.Topology(f"bad-input-{uuid.uuid4().hex[:8]}")
    api = admin.Management()
    coordinator_url = admin.user_url(definitions.coordinator_user(topo), admin.add_coordinator(api, topo))
    worker_url = admin.user_url(definitions.worker_user(topo, "faulty"), admin.add_worker(api, topo, "faulty"))
    run_dir = tmp_path_factory.mktemp("bad-input") / "run"
    cfg = load_config(ExperimentConfig, env={}, overrides={
        "experiment.name": topo.experiment, "experiment.run_dir": str(run_dir), "data.path": str(tiny_corpus_dir),
        "data.eval_max_clips": 12, "fedbuff.concurrency": 1, "fedbuff.buffer_size": 1, "fedbuff.max_update_norm": 1.0,
        "tasks.eval_every": 0, "tasks.transfer_timeout_s": 3.0, "tasks.deadline_s": 3600.0,
        "stop.max_versions": 0, "stop.max_wall_s": 3600.0})
    with _LogTee() as logs:
        versions: list[dict] = []
        coordinator = Coordinator(cfg, url=coordinator_url, on_version=versions.append)
        f = None
        summary: dict = {}
        error: list[BaseException] = []

        def run() -> None:
            try:
                summary.update(coordinator.run())
            except BaseException as exc:  # reported by check_alive
                error.append(exc)
                raise

        thread = threading.Thread(target=run, name="coordinator", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + WAIT_S
            while not any(e.get("event") == "coordinator_started" for e in logs.entries):
                assert thread.is_alive() and time.monotonic() < deadline, f"coordinator did not start: {error}"
                time.sleep(0.05)
            f = Federation(coordinator, topo, logs, worker_url)
            f.versions, f.thread, f.errors = versions, thread, error
            yield f
        finally:
            coordinator.request_stop()
            thread.join(WAIT_S)
            if f is not None:
                for conn in (f.conn, f.observer):
                    if conn.is_open:
                        conn.close()
            for user in (definitions.coordinator_user(topo), definitions.worker_user(topo, "faulty")):
                api.delete_user(user)
            cleanup = connect("test", device="cleanup", attempts=3)
            topology.delete(cleanup.channel(), topo)
            cleanup.close()
            torch.set_num_threads(threads)
    assert not thread.is_alive(), "the coordinator did not stop"
    assert summary.get("reason") == "signal", (summary, error)


# -- payload surgery ------------------------------------------------------------------------------------------

def split_payload(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, components) of an uncompressed update payload."""
    (n,) = struct.unpack("<I", data[4:8])
    header = msgpack.unpackb(data[8:8 + n], raw=False)
    assert header["body"] == "raw"
    return header, decode_state(data[8 + n:])


def join_payload(header: dict, body: bytes, body_len: int | None = None) -> bytes:
    header = {**header, "body_len": len(body) if body_len is None else body_len}
    head = msgpack.packb(header, use_bin_type=True)
    return codecs.MAGIC + struct.pack("<I", len(head)) + head + body


def with_component(data: bytes, key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> bytes:
    """`data` with component `key` (e.g. "0.v": values of tensor 0) replaced by `make(old)`."""
    header, comps = split_payload(data)
    comps[key] = make(comps[key])
    return join_payload(header, encode_state(comps))


def poisoned(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[0] = value
        return t
    return make


# -- decode-level faults: the consumer refuses the bytes --------------------------------------------------------

DECODE_CASES = {
    # case: (make body from fed, consumer error type, phrase in the log line's reason)
    "malformed-msgpack": (lambda fed: b"\xc1\x00 not msgpack", "MalformedMessage", "not valid msgpack"),
    "truncated-msgpack": (lambda fed: fed.raw_update("x")[:-7], "MalformedMessage", "truncated msgpack"),
    "not-a-map": (lambda fed: msgpack.packb([1, 2, 3]), "MalformedMessage", "expected a msgpack map"),
    "unknown-schema-version": (lambda fed: fed.raw_update("x", v=99), "UnsupportedSchemaVersion",
                               "schema version 99 unsupported"),
    "unknown-message-type": (lambda fed: fed.raw_update("x", t="launch_missiles"), "UnknownMessageType",
                             "unknown message type 'launch_missiles'"),
    "missing-field": (lambda fed: fed.raw_update("x", num_samples=None), "InvalidField", "missing field 'num_samples'"),
    "wrong-field-type": (lambda fed: fed.raw_update("x", base_version="0"), "InvalidField",
                         "update.base_version: expected an integer, got str"),
    "bool-for-int": (lambda fed: fed.raw_update("x", num_samples=True), "InvalidField", "update.num_samples"),
    "unexpected-field": (lambda fed: fed.raw_update("x", evil=1), "InvalidField", "unexpected field(s) ['evil']"),
    "binary-field-name": (lambda fed: msgpack.packb({**msgpack.unpackb(fed.raw_update("x")), b"\xff": 1, "y": 2},
                                                    use_bin_type=True), "InvalidField", "unexpected field(s)"),
    "payload-ref-with-both": (lambda fed: fed.raw_update("x", payload={"inline": b"x", "transfer_id": "t"}),
                              "InvalidField", "exactly one of inline or transfer_id"),
    "train-task-on-updates-queue": (lambda fed: messages.encode(messages.TrainTask(
        fed.topo.experiment, "run-1", "t", 0, time.time() + 60, "none", "kws-tiny", False,
        TrainConfig(steps=1, batch_size=1, learning_rate=0.1))), "InvalidField",
        "train_task message on the updates queue"),
    "update-for-a-transfer-never-sent": (lambda fed: messages.encode(fed.update(
        "x", payload=messages.PayloadRef(transfer_id="no-such-transfer"))), "InvalidField",
        "payload transfer no-such-transfer not received"),
    "wire-bytes-lie": (lambda fed: messages.encode(fed.update("x", wire_bytes=12345)), "InvalidField",
                       "declares wire_bytes=12345 but its payload has"),
}


@pytest.mark.parametrize("case", DECODE_CASES)
def test_an_undecodable_or_invalid_message_is_dead_lettered_counted_and_logged(fed, case):
    make, error, phrase = DECODE_CASES[case]
    mark = fed.mark()
    fed.publish(make(fed), case)
    fed.apply_good_update(mark)
    fed.dead_letters([case])
    changes = fed.changes(mark)
    assert changes["consumer"] == {error: 1} and changes["dead_lettered"] == 1
    assert changes["accepted"] == 1 and changes["rejected"] == {}
    line = fed.logged(mark, "message_dead_lettered", message_id=case, reason=phrase)
    assert line["error"] == error and line["log_level"] == "warning"


# -- payload-level faults: the update decodes, its payload does not ------------------------------------------

def _dense_payload(fed) -> bytes:
    return codecs.encode(fed.delta(), "none").data


PAYLOAD_CASES = {
    # case: (make Update from fed, phrase in the reason)
    "undecodable-payload": (lambda fed: fed.update("p", b"this is not a payload"), "bad magic"),
    "nan": (lambda fed: fed.update("p", with_component(_dense_payload(fed), "0.v", poisoned(math.nan))),
            "non-finite float32 value"),
    "inf": (lambda fed: fed.update("p", with_component(_dense_payload(fed), "3.v", poisoned(-math.inf))),
            "non-finite float32 value"),
    # codecs.decode always yields float32: a payload can only carry another dtype in a component, and the
    # decoder refuses it (the aggregator's own dtype check is there for callers that bypass the codec)
    "wrong-dtype": (lambda fed: fed.update("p", with_component(_dense_payload(fed), "0.v", lambda t: t.double())),
                    "component 'v' is torch.float64"),
    "payload-codec-differs-from-message": (lambda fed: fed.update("p", codecs.encode(fed.delta(), "fp16").data),
                                           "differs from the expected"),
    "unknown-codec": (lambda fed: fed.update("p", codec="gzip"), "unknown stage 'gzip'"),
    "sparse-index-out-of-range": (lambda fed: fed.update("p", _sparse_out_of_range(fed), codec="topk:0.01"),
                                  "out of range"),
    "declared-body-length-lies": (lambda fed: fed.update("p", _body_len_lies(fed)), "header declares"),
    "declared-tensor-size-lies": (lambda fed: fed.update("p", _tensor_size_lies(fed)), "declares 8 bytes but"),
    "shape-torch-cannot-hold": (lambda fed: fed.update("p", _impossible_shape(fed)), "out of range"),
    "zlib-bomb": (lambda fed: fed.update("p", _zlib_bomb(), codec="zlib"), "more than the declared 0 bytes"),
    "more-elements-than-the-model": (lambda fed: fed.update("p", _delta_with(fed, lambda d: d.update(
        {_first(fed): torch.zeros(fed.params[_first(fed)].numel() + 1)}))),
        "declares more than max_elements=226396"),  # one element more than the kws-tiny model has
}


def _sparse_out_of_range(fed) -> bytes:
    data = codecs.encode(fed.delta(), "topk:0.01").data
    header, comps = split_payload(data)
    i, entry = next((i, e) for i, e in enumerate(header["tensors"]) if e[2] == "sparse" and e[4] == "varint")
    gaps = torch.zeros(entry[3], dtype=torch.int64)
    gaps[-1] = math.prod(entry[1])  # the last index lands past the end of the tensor
    comps[f"{i}.x"] = codecs._varint_encode(gaps)
    return join_payload(header, encode_state(comps))


def _body_len_lies(fed) -> bytes:
    header, comps = split_payload(_dense_payload(fed))
    body = encode_state(comps)
    return join_payload(header, body, body_len=len(body) - 4)


def _tensor_size_lies(fed) -> bytes:
    header, comps = split_payload(_dense_payload(fed))
    body = bytearray(encode_state(comps))
    (n,) = struct.unpack("<I", body[4:8])
    frame = msgpack.unpackb(bytes(body[8:8 + n]), raw=False)
    frame[0][4] = 8  # tensor 0's values declare 8 bytes
    head = msgpack.packb(frame, use_bin_type=True)
    return join_payload(header, b"MQT1" + struct.pack("<I", len(head)) + head + bytes(body[8 + n:]))


def _impossible_shape(fed) -> bytes:
    comps = {"0.v": torch.zeros(0)}
    header = {"v": 1, "codec": "none", "body": "raw", "tensors": [["x", [0, 1 << 63], "dense", 0, None]]}
    return join_payload(header, encode_state(comps))


def _zlib_bomb() -> bytes:
    return join_payload({"v": 1, "codec": "zlib", "body": "zlib", "tensors": []}, zlib.compress(bytes(32 << 20), 9),
                        body_len=0)


@pytest.mark.parametrize("case", PAYLOAD_CASES)
def test_an_update_whose_payload_does_not_decode_is_dead_lettered_as_a_codec_error(fed, case):
    make, phrase = PAYLOAD_CASES[case]
    mark = fed.mark()
    update = make(fed)
    fed.publish_message(dataclasses.replace(update, task_id=case), case)
    fed.apply_good_update(mark)
    fed.dead_letters([case])
    changes = fed.changes(mark)
    assert changes["consumer"] == {"InvalidField": 1}
    assert changes["counters"] == {"codec_errors": 1, "dead_lettered": 1}
    assert changes["accepted"] == 1 and changes["rejected"] == {}
    line = fed.logged(mark, "message_dead_lettered", message_id=case, reason=phrase)
    assert f"update {fed.signed(case)} from faulty/cpu: payload:" in line["reason"]


# -- validation faults: the payload decodes, the aggregator refuses it ---------------------------------------

def _delta_with(fed, change: Callable[[dict], None], scale: float = 1e-5) -> bytes:
    delta = fed.delta(scale)
    change(delta)
    return codecs.encode(delta, "none").data


def _first(fed) -> str:
    return next(iter(fed.params))


VALIDATION_CASES = {
    # case: (make Update from fed, aggregator reason, phrase in its detail)
    # (a payload declaring more elements than the model has is refused earlier, by the codec's max_elements:
    # these keep the element count and change the layout)
    "wrong-shape": (lambda fed: fed.update("v", _delta_with(fed, lambda d: d.update(
        {_first(fed): d[_first(fed)].reshape(2, -1)}))), "shape",
        lambda fed: f"shape (2, {fed.params[_first(fed)].numel() // 2}), expected ({fed.params[_first(fed)].numel()},)"),
    "unknown-parameter": (lambda fed: fed.update("v", _delta_with(fed, lambda d: d.update(
        {"classifier.backdoor": d.pop(_first(fed))}))), "unknown_param", "'classifier.backdoor' is not a parameter"),
    "missing-parameter": (lambda fed: fed.update("v", _delta_with(fed, lambda d: d.pop(_first(fed)))),
                          "missing_param", "first 'wav2vec2.masked_spec_embed'"),
    "norm-above-bound": (lambda fed: fed.update("v", _delta_with(fed, lambda d: None, scale=0.01)), "norm",
                         "> max_update_norm 1"),
    "base-version-from-the-future": (lambda fed: fed.update("v", base_version=fed.coordinator.version + 5),
                                     "future_version", "is newer than server version"),
    "another-experiment": (lambda fed: fed.update("v", experiment="someone-else"), "experiment",
                           "update is for 'someone-else'"),
    "no-samples": (lambda fed: fed.update("v", num_samples=0), "num_samples", "num_samples must be an int >= 1"),
    "more-samples-than-the-task-asked-for": (lambda fed: fed.update("v", num_samples=2**63 - 1), "num_samples",
                                             lambda fed: f"the task asked for at most {_asked(fed)}"),
    "finite-but-huge": (lambda fed: fed.update("v", _delta_with(fed, lambda d: None, scale=3e38)), "norm",
                        "> max_update_norm 1"),
}


def _asked(fed) -> int:
    local = fed.coordinator.cfg.local
    return local.total_steps(0) * local.batch_size


@pytest.mark.parametrize("case", VALIDATION_CASES)
def test_an_update_that_fails_validation_is_dead_lettered_with_its_reason(fed, case):
    make, reason, phrase = VALIDATION_CASES[case]
    phrase = phrase(fed) if callable(phrase) else phrase
    mark = fed.mark()
    fed.publish_message(dataclasses.replace(make(fed), task_id=case), case)
    fed.apply_good_update(mark)
    fed.dead_letters([case])
    changes = fed.changes(mark)
    assert changes["rejected"] == {reason: 1} and changes["accepted"] == 1
    assert changes["counters"] == {"dead_lettered": 1} and changes["consumer"] == {"InvalidField": 1}
    rejected = fed.logged(mark, "update_rejected", task_id=case)
    assert rejected["reason"] == reason and phrase in rejected["detail"], rejected
    fed.logged(mark, "message_dead_lettered", message_id=case, reason=f"rejected: {reason}: ")


def test_a_stale_update_is_acknowledged_counted_and_dropped_not_dead_lettered(fed):
    mark = fed.mark()
    stale = fed.update("stale", base_version=fed.coordinator.version - 11)  # max_staleness is 10
    fed.publish_message(stale, "stale")
    fed.apply_good_update(mark)
    fed.dead_letters([])
    changes = fed.changes(mark)
    assert changes["rejected"] == {"stale": 1} and changes["counters"] == {"stale_dropped": 1}
    assert changes["consumer"] == {} and changes["accepted"] == 1
    assert fed.logged(mark, "update_rejected", task_id="stale")["reason"] == "stale"


def test_an_update_whose_declared_raw_size_lies_is_dead_lettered(fed):
    mark = fed.mark()
    fed.publish_message(fed.update("raw-bytes-lie", raw_bytes=10 ** 12), "raw-bytes-lie")
    fed.apply_good_update(mark)
    fed.dead_letters(["raw-bytes-lie"])


# -- identity and tasks: who the broker vouches for, and what the coordinator issued (docs/security.md) --------

def test_an_update_claiming_another_worker_is_dead_lettered(fed):
    """Worker node `faulty` (its broker user) signs an update as node `honest`: refused, whatever the body says."""
    mark = fed.mark()
    fed.publish_message(fed.update("impostor", worker_id="honest/cpu"), "impostor")
    fed.apply_good_update(mark)
    fed.dead_letters(["impostor"])
    changes = fed.changes(mark)
    assert changes["consumer"] == {"InvalidField": 1} and changes["accepted"] == 1 and changes["rejected"] == {}
    fed.logged(mark, "message_dead_lettered", message_id="impostor",
               reason=f"claims worker 'honest/cpu', but the broker vouches for user mqfed-{fed.topo.experiment}-worker-faulty")


def test_an_update_without_a_user_id_is_dead_lettered(fed):
    mark = fed.mark()
    fed.pub.basic_publish(fed.topo.update_exchange, fed.topo.UPDATES_KEY, messages.encode(fed.update("anonymous")),
                          pika.BasicProperties(delivery_mode=2, message_id="anonymous"), mandatory=True)
    fed.apply_good_update(mark)
    fed.dead_letters(["anonymous"])
    fed.logged(mark, "message_dead_lettered", message_id="anonymous", reason="has no user_id property")


def test_an_update_for_a_task_this_run_never_issued_is_dead_lettered(fed):
    from coordinator.dispatch import Dispatcher

    mark = fed.mark()
    real = fed.signed("forgery-template")
    n, v, _mac = real[1:].split("-")
    forged = {"unsigned": "good-1", "zero-mac": f"t{n}-{v}-{'0' * 16}",
              "other-version": f"t{n}-v{int(v[1:]) + 1}-{real.rsplit('-', 1)[1]}",
              "other-secret": Dispatcher(secret=b"not the run's").task_id(1, 0)}
    for case, task_id in forged.items():
        fed.publish(messages.encode(dataclasses.replace(fed.update(case), task_id=task_id)), case)
    fed.apply_good_update(mark)
    fed.dead_letters(list(forged))
    changes = fed.changes(mark)
    assert changes["consumer"] == {"InvalidField": len(forged)} and changes["accepted"] == 1
    for case in forged:
        fed.logged(mark, "message_dead_lettered", message_id=case, reason="was not issued by this run")


def test_a_task_answered_twice_is_applied_once(fed):
    """The same payload for the same task sent again as another of the node's devices: the task is answered;
    the copy is acknowledged, counted and dropped (answered_dropped), not applied."""
    mark = fed.mark()
    first = fed.update("answered-twice")
    fed.publish_message(first, "answered-twice-1")
    fed.publish_message(dataclasses.replace(first, worker_id="faulty/cuda:0"), "answered-twice-2")
    fed.apply_good_update(mark, first)
    flush = fed.mark()
    fed.apply_good_update(flush)  # FIFO: the copy was handled before this one
    fed.dead_letters([])
    changes = fed.changes(mark)
    assert changes["counters"] == {"answered_dropped": 1} and changes["accepted"] == 2, changes
    assert sum(first.task_id in v["tasks"] for v in fed.versions) == 1
    assert fed.logged(mark, "update_rejected", task_id=first.task_id, worker_id="faulty/cuda:0")["reason"] == "answered"


def test_a_flood_of_hostile_events_is_bounded_and_leaves_the_coordinator_serving(fed):
    """Worker `faulty` floods the events exchange with what its topic permission lets through (keys
    `*.faulty`): megabyte bodies, registrations and metrics in another node's name, metrics nobody asked for.
    All are dropped and counted; the coordinator knows `faulty` only; its log grows by a handful of lines."""
    mark = fed.mark()
    before = dict(fed.coordinator.events.dropped)
    ex, n = fed.topo.events, 200
    big = messages.encode(messages.Heartbeat(fed.topo.experiment, "faulty", "x" * (1 << 20), 0.0))
    forged = messages.encode(messages.Registration(fed.topo.experiment, "honest", ["cpu"], "iid:1/1", 10))
    unasked = messages.encode(messages.Metrics(fed.topo.experiment, "faulty/cpu", 10**6, {"val_accuracy": 1.0}, 0.0))
    evaluator = messages.encode(messages.Metrics(fed.topo.experiment, "evaluator", 0, {"accuracy": 1.0, "loss": 0.0},
                                                 0.0))
    props = pika.BasicProperties(user_id=sender(fed.pub))
    for _ in range(n):
        for key, body in (("heartbeat.faulty", big), ("registration.faulty", forged), ("metrics.faulty", unasked),
                          ("metrics.faulty", evaluator)):
            fed.pub.basic_publish(ex, key, body, props)
    fed.pub.basic_publish(ex, "registration.faulty", messages.encode(messages.Registration(
        fed.topo.experiment, "faulty", ["cpu"], "iid:1/1", 10)), props)
    fed.wait(lambda: "faulty" in fed.coordinator.events.workers, "the honest registration")
    fed.apply_good_update(mark)
    dropped = collections.Counter(fed.coordinator.events.dropped) - collections.Counter(before)
    assert dropped == {"too_large": n, "forged_node": n, "unrequested_metrics": n, "forged_evaluator": n}, dropped
    assert set(fed.coordinator.events.workers) == {"faulty"}
    assert fed.coordinator.best["accuracy"] < 1.0  # the forged evaluation did not count
    assert len(fed.events(mark, "events_dropped")) <= 12  # 1, 2, 4, ... of 4 n + the module's earlier ones


# -- size limits ---------------------------------------------------------------------------------------------

def test_a_message_above_max_message_bytes_is_refused_by_the_decoder_and_dead_lettered(fed):
    """RabbitMQ takes it (below its max_message_size of 128 MiB); messages.decode refuses it by its length
    before parsing anything."""
    mark = fed.mark()
    big = fed.update("oversized", b"\0" * messages.MAX_MESSAGE_BYTES, wire_bytes=messages.MAX_MESSAGE_BYTES)
    body = messages.encode(big)
    assert messages.MAX_MESSAGE_BYTES < len(body) < BROKER_MAX_MESSAGE_SIZE
    fed.publish(body, "oversized")
    del body, big
    fed.apply_good_update(mark)
    (props, dead), = fed.dead_letters(["oversized"])
    assert len(dead) > messages.MAX_MESSAGE_BYTES
    changes = fed.changes(mark)
    assert changes["consumer"] == {"MalformedMessage": 1} and changes["accepted"] == 1
    fed.logged(mark, "message_dead_lettered", message_id="oversized", reason="exceeds the limit of 67108864")


def test_a_message_above_the_brokers_max_message_size_is_refused_by_rabbitmq_before_any_consumer(fed):
    """RabbitMQ closes the publishing channel (406 PRECONDITION_FAILED); the coordinator never sees it."""
    mark = fed.mark()
    conn = connect("test", device="too-big", attempts=3)
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            fed.publish(b"\0" * (BROKER_MAX_MESSAGE_SIZE + 1), "too-big-for-the-broker", channel=channel)
    finally:
        if conn.is_open:
            conn.close()
    assert refused.value.reply_code == 406 and "larger than configured max size" in refused.value.reply_text
    fed.apply_good_update(mark)
    fed.dead_letters([])
    assert fed.changes(mark)["consumer"] == {}
    assert fed.coordinator.consumer.stats.messages - mark.consumer["messages"] == 2  # the good update, the sentinel


# -- chunked transfers ----------------------------------------------------------------------------------------

def chunked(fed, task_id: str) -> tuple[list[tuple[bytes, dict]], messages.Update]:
    """The chunks of a valid update's payload and the Update that references them (nothing published): the
    uncompressed delta, whatever the model's size, in 4 chunks."""
    data = codecs.encode(fed.delta(), "none").data
    chunks: list[tuple[bytes, dict]] = []
    chunk_size = -(-len(data) // 4)
    info = publish_chunked(lambda body, headers: chunks.append((bytes(body), headers)), data, chunk_size=chunk_size)
    assert info.num_chunks == 4
    update = fed.update(task_id, data, payload=messages.PayloadRef(transfer_id=info.transfer_id))
    return chunks, update


def publish_chunks(fed, case: str, chunks, order) -> list[str]:
    ids = []
    for n, i in enumerate(order):
        body, headers = chunks[i]
        ids.append(f"{case}-chunk{i}-{n}")
        fed.publish(body, ids[-1], headers=headers)
    return ids


@pytest.mark.parametrize("case, order", [("duplicated-chunks", [0, 0, 1, 2, 1, 3, 3]),
                                         ("reordered-chunks", [3, 1, 0, 2]),
                                         ("reordered-and-duplicated-chunks", [2, 3, 2, 0, 1, 0])])
def test_a_transfer_with_duplicated_or_reordered_chunks_completes_and_is_applied_once(fed, case, order):
    mark = fed.mark()
    chunks, update = chunked(fed, case)
    publish_chunks(fed, case, chunks, order)
    fed.publish_message(update, case)
    fed.apply_good_update(mark, update)
    fed.dead_letters([])
    changes = fed.changes(mark)
    assert changes["consumer"] == {} and changes["accepted"] == 1 and changes["counters"] == {}
    assert fed.coordinator.consumer.stats.chunks - mark.consumer["chunks"] == len(order)


def test_a_transfer_that_stops_midway_is_dropped_after_the_transfer_timeout(fed):
    """The sender died after chunks 0, 1 and 3 (no chunk 2, no Update). The coordinator spools chunked
    updates to disk and acknowledges each chunk once stored (so interleaved transfers never fill the
    prefetch window): after tasks.transfer_timeout_s the spool is dropped with one IncompleteTransfer line
    naming the missing chunk; there is nothing left to dead-letter, and nothing is applied."""
    mark = fed.mark()
    chunks, update = chunked(fed, "truncated")
    publish_chunks(fed, "truncated", chunks, [0, 1, 3])
    deadline = time.monotonic() + WAIT_S
    while not fed.events(mark, "transfer_dropped") and time.monotonic() < deadline:
        time.sleep(0.2)  # the transfer timeout (3 s) runs out
    fed.apply_good_update(mark)
    fed.dead_letters([])
    line = fed.logged(mark, "transfer_dropped", transfer_id=update.payload.transfer_id)
    changes = fed.changes(mark)
    assert changes["consumer"] == {"IncompleteTransfer": 1} and changes["accepted"] == 1
    assert line["error"] == "IncompleteTransfer" and line["missing"] == [2]
    assert "1 of 4 chunks missing" in line["reason"]


def test_a_corrupted_chunk_dead_letters_its_whole_transfer_and_the_update(fed):
    """Chunk 1's body is altered (crc32 mismatch): chunk 1 goes with CorruptTransfer (chunk 0 was spooled
    and acknowledged; the spool is dropped), chunks 2 and 3 (arriving after) with InvalidChunk, and the
    Update, whose payload never completed."""
    mark = fed.mark()
    chunks, update = chunked(fed, "corrupt")
    body, headers = chunks[1]
    chunks[1] = (body[:100] + bytes([body[100] ^ 0x40]) + body[101:], headers)
    ids = publish_chunks(fed, "corrupt", chunks, [0, 1, 2, 3])
    fed.publish_message(update, "corrupt")
    fed.apply_good_update(mark)
    fed.dead_letters(ids[1:] + ["corrupt"])
    changes = fed.changes(mark)
    assert changes["consumer"] == {"CorruptTransfer": 1, "InvalidChunk": 2, "InvalidField": 1}
    assert changes["accepted"] == 1
    tid = update.payload.transfer_id
    fed.logged(mark, "message_dead_lettered", error="CorruptTransfer", reason=f"transfer {tid}: chunk 1 is corrupt")
    fed.logged(mark, "message_dead_lettered", error="InvalidChunk",
               reason="which was dropped earlier (chunk 1 was corrupt)")
    fed.logged(mark, "message_dead_lettered", message_id="corrupt", reason=f"payload transfer {tid} not received")


CHUNK_HEADER_CASES = {
    # case: (change the first chunk's headers, phrase in the reason)
    "transfer-id-not-utf8": (lambda h: {**h, "mqfed-transfer": b"\xff\xfe"}, "is not UTF-8"),
    "declared-size-beyond-limit": (lambda h: {**h, "mqfed-size": 1 << 62, "mqfed-chunk-size": 1 << 62,
                                              "mqfed-chunks": 1}, "above the limit"),
    "declared-size-lies-about-the-body": (lambda h: {**h, "mqfed-chunk-size": h["mqfed-chunk-size"] * 2, "mqfed-chunks": 2},
                                          "bytes, expected"),
    "missing-checksum": (lambda h: {k: v for k, v in h.items() if k != "mqfed-crc32"}, "lacks header"),
    "inconsistent-count": (lambda h: {**h, "mqfed-chunks": 7}, "is inconsistent"),
}


@pytest.mark.parametrize("case", CHUNK_HEADER_CASES)
def test_a_chunk_with_lying_or_malformed_headers_is_dead_lettered(fed, case):
    change, phrase = CHUNK_HEADER_CASES[case]
    mark = fed.mark()
    chunks, _update = chunked(fed, case)
    body, headers = chunks[0]
    fed.publish(body, case, headers=change(headers))
    fed.apply_good_update(mark)
    fed.dead_letters([case])
    changes = fed.changes(mark)
    assert changes["consumer"] == {"InvalidChunk": 1} and changes["accepted"] == 1
    fed.logged(mark, "message_dead_lettered", error="InvalidChunk", reason=phrase)


# -- found while writing these tests (not bad input): keep last, it leaves dead letters behind when it fails --

def test_interleaved_chunked_transfers_filling_the_prefetch_window_all_complete(fed):
    mark = fed.mark()
    transfers = [chunked(fed, f"interleaved-{i}") for i in range(6)]  # 6 x 4 chunks, sent round-robin
    for index in range(4):
        for i, (chunks, _update) in enumerate(transfers):
            body, headers = chunks[index]
            fed.publish(body, f"interleaved-{i}-chunk{index}", headers=headers)
    for _chunks, update in transfers:
        fed.publish_message(update, update.task_id)
    tasks = {u.task_id for _c, u in transfers}
    stalled = lambda: fed.coordinator.consumer.stats.rejected.get("IncompleteTransfer", 0) > \
        mark.consumer["rejected"].get("IncompleteTransfer", 0)
    applied = lambda: tasks <= {t for v in fed.versions[mark.versions_seen:] for t in v["tasks"]}
    fed.wait(lambda: stalled() or applied(), "the six transfers to complete (or to stall)")
    assert not stalled(), "the transfers stalled and were dead-lettered as incomplete"
