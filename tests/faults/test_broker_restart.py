"""RabbitMQ restarted during a run, on a private node (tests/faults/private_broker.py), never the shared one.

A real federation (coordinator + two worker daemons as processes, the CPU preset, the small synthetic
corpus) trains against a broker node of its own. After a few versions the broker goes away and comes back
on the same data directory and port: once gracefully (`rabbitmqctl stop`: clients get 320
CONNECTION_FORCED), once abruptly (SIGKILL of the Erlang VM: sockets reset, nothing flushed).

What must hold:
- the experiment completes (summary reason `max_versions`) and no process exits with an error;
- versions only go up: the run record holds 1..N, each once;
- no update is applied twice: no (task, worker) pair twice in the record;
- the coordinator and both workers noticed and reconnected (`coordinator_connection_lost` /
  `worker_connection_lost` in their JSON logs) and the run went on after the restart;
- durable state survived: the model stream still serves the versions published before the restart (each
  version is announced once in the index, so the coordinator found its version there and did not need to
  republish it; the bytes fetched afresh match the announced sha256).
"""
from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import pytest

from coordinator.local_federation import LocalFederation
from faults.test_process_faults import _account

pytestmark = pytest.mark.faults

SETTINGS = {"fedbuff.concurrency": 2, "fedbuff.buffer_size": 2, "local.steps": 8, "local.batch_size": 16,
            "tasks.eval_every": 2, "tasks.deadline_s": 120.0, "data.eval_max_clips": 60, "stop.max_versions": 12}
VERSIONS = SETTINGS["stop.max_versions"]
BEFORE_RESTART = 3  # versions to wait for before the broker goes away


def _federation(broker, tmp_path: Path, corpus: Path) -> LocalFederation:
    from common.config import load_config
    from coordinator.experiment import ExperimentConfig

    cfg = load_config(ExperimentConfig, env={}, overrides={
        "experiment.name": "broker-restart", "experiment.run_dir": str(tmp_path / "run"), "data.path": str(corpus),
        **SETTINGS})
    return LocalFederation(cfg, corpus, [{"shard": "iid:1/2"}, {"shard": "iid:2/2"}], least_privilege=True,
                           env={"AMQP_URL": broker.url, "MQFED_MANAGEMENT_URL": broker.management_url})


def _log(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a non-JSON line (a library writing to stderr)
    return out


def _events(path: Path, event: str) -> list[dict]:
    return [e for e in _log(path) if e.get("event") == event]


@pytest.mark.parametrize("how", ["graceful", "kill"])
def test_broker_restart_mid_run_federation_reconnects_and_completes(how, private_broker, small_corpus_dir, tmp_path):
    from broker import topology
    from common.transport.connection import connect
    from common.transport.model_store import ModelStore

    fed = _federation(private_broker, tmp_path, small_corpus_dir).start()
    codes: list = []
    try:
        fed.wait_for(lambda: len(fed.versions()) >= BEFORE_RESTART, 180, f"{BEFORE_RESTART} versions")
        at_restart = len(fed.versions())
        if how == "graceful":
            private_broker.restart()
        else:
            private_broker.kill()
            time.sleep(2.0)  # let every client run into the dead socket and back off once
            private_broker.start()
        restarted_at = time.time()
        fed.wait_for(lambda: fed.summary() is not None, 240, f"the run to finish after the {how} restart")
        codes = [fed.wait_coordinator(timeout=60)]
    finally:
        codes += fed.signal(list(fed.workers.values()))
        fed.stop()  # the coordinator, the evaluator, whatever still runs
    logs = fed.run_dir

    # The experiment completed and nobody died of the restart.
    summary = fed.summary()
    assert summary["reason"] == "max_versions" and summary["versions"] == VERSIONS, summary
    assert codes == [0, 0, 0], f"exit codes coordinator, w1, w2: {codes} (logs in {logs})"

    # Versions only go up, each once; no update applied twice.
    versions = [e["version"] for e in fed.versions()]
    assert versions == list(range(1, VERSIONS + 1)), versions
    applied = [(t, w) for e in fed.versions() for t, w in zip(e["tasks"], e["workers"])]
    assert len(applied) == len(set(applied)), "an update was applied twice"
    assert at_restart < VERSIONS, "the run finished before the broker restart: nothing was tested"
    _account(fed)  # every update a worker confirmed: applied once, buffered, dropped as stale or waiting

    # Everyone noticed, reconnected and carried on.
    lost = _events(logs / "coordinator.log", "coordinator_connection_lost")
    assert lost, f"the coordinator never lost its connection (logs in {logs})"
    assert len(_events(logs / "coordinator.log", "coordinator_resumed")) >= 1
    for node in ("w1", "w2"):
        assert _events(logs / f"worker-{node}.log", "worker_connection_lost"), f"{node} never reconnected"
        published = [e for e in _events(logs / f"worker-{node}.log", "update_published")
                     if _when(e) is not None and _when(e) > restarted_at]
        assert published, f"{node} published no update after the restart (logs in {logs})"

    # The model stream survived: every version announced once, and versions from before the restart can
    # still be fetched afresh (sha256 checked by the store).
    conn = connect("test", device="restart-check", url=private_broker.url, attempts=10)
    try:
        store = ModelStore(conn.channel(), topology.Topology(fed.name), cache_dir=tmp_path / "check-cache")
        announced = [a.version for a in store.announcements()]
        assert announced == list(range(0, VERSIONS + 1)), f"model index after the restart: {announced}"
        for v in (0, at_restart):
            assert store.fetch(v).announcement.version == v
    finally:
        conn.close()


def _session_like_the_daemons(url: str, topo, cache: Path, version: int) -> None:
    """What the coordinator and a worker do on a fresh connection, in one go: declare (and passively check)
    the topology, read the model index, fetch and publish a model version, publish a task with confirms,
    take one task from the quorum queue."""
    from broker import topology
    from common.transport.connection import connect
    from common.transport.model_store import ModelStore
    from common.transport.publish import publish_message
    from common.wire import messages

    conn = connect("test", device="hammer", url=url, attempts=1)
    try:
        topology.declare(conn.channel(), topo)
        topology.declare(conn.channel(), topo, passive=True)
        pub = conn.channel()
        pub.confirm_delivery()
        store = ModelStore(pub, topo, cache_dir=cache)
        latest = store.latest()
        if latest is not None:
            store.fetch(announcement=latest)
        store.publish(version, b"m" * 4096)
        task = messages.EvaluateTask(topo.experiment, f"t{version}", 0, "validation", time.time() + 60)
        publish_message(pub, topo.task_exchange, topo.TASKS_KEY, task)
        tasks = conn.channel()
        method, _props, _body = tasks.basic_get(topo.tasks)
        if method is not None:
            tasks.basic_ack(method.delivery_tag)
    finally:
        if conn.is_open:
            try:
                conn.close()
            except Exception:
                pass


@pytest.mark.parametrize("how", ["graceful", "kill"])
def test_every_error_a_client_sees_while_the_broker_restarts_is_retryable(how, private_broker, tmp_path):
    """A client that reconnects at any moment of a restart (the daemons back off, so they may land anywhere
    in it, e.g. just after the broker answers again but before its streams are back) only ever sees
    errors in common.transport.connection.RETRYABLE, which the coordinator and the workers answer with reconnect-and-resume."""
    import logging
    import threading

    from broker import topology
    from common.transport.connection import RETRYABLE

    topo = topology.Topology("restart-window")
    _session_like_the_daemons(private_broker.url, topo, tmp_path / "cache", 0)
    restarted = threading.Event()
    retried: collections.Counter = collections.Counter()
    fatal: list[str] = []
    ok_after_restart = 0

    def hammer():
        nonlocal ok_after_restart
        version = 1
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not fatal and ok_after_restart < 5:
            try:
                _session_like_the_daemons(private_broker.url, topo, tmp_path / "cache", version)
                version += 1
                if restarted.is_set():
                    ok_after_restart += 1
            except RETRYABLE as exc:
                retried[type(exc).__name__] += 1
                time.sleep(0.02)
            except Exception as exc:  # what a daemon would die of
                fatal.append(f"{type(exc).__name__}: {exc}")

    pika_log = logging.getLogger("pika")
    level, pika_log.level = pika_log.level, logging.CRITICAL  # thousands of refused connects
    thread = threading.Thread(target=hammer, daemon=True)
    try:
        thread.start()
        time.sleep(1.0)
        private_broker.restart(kill=(how == "kill"))
        restarted.set()
        thread.join(180)
    finally:
        pika_log.level = level
    assert not thread.is_alive(), "the client loop did not finish"
    assert not fatal, f"not retryable (a daemon would exit): {fatal[0]} (retried: {dict(retried)})"
    assert ok_after_restart >= 5, f"no session succeeded after the restart (retried: {dict(retried)})"
    assert retried, "the client never noticed the restart"


def test_a_connection_lost_right_after_a_version_leaves_the_version_in_the_run_record(private_broker,
                                                                                      small_corpus_dir, tmp_path,
                                                                                      monkeypatch):
    """The window a broker restart hits now and then (seen in the federation test above): version v is made
    (its update logged), then acknowledging the update fails because the connection is gone. The coordinator
    resumes from its checkpoint and the write-ahead log (v again), the redelivered update is a duplicate,
    training goes on; the record must hold v once. Deterministic here: the coordinator runs in a thread with
    K = 1 and the test makes the acknowledgement of version 2's update fail as a lost connection does."""
    import threading

    import pika.exceptions
    import torch

    from broker import topology
    from common.compression import codecs
    from common.config import load_config
    from common.transport.connection import connect
    from common.transport.consumer import MessageConsumer
    from common.transport.publish import publish_message
    from common.wire import messages
    from coordinator.experiment import ExperimentConfig
    from coordinator.local_federation import read_record
    from coordinator.server import Coordinator

    run_dir = tmp_path / "run"
    cfg = load_config(ExperimentConfig, env={}, overrides={
        "experiment.name": "record-gap", "experiment.run_dir": str(run_dir), "data.path": str(small_corpus_dir),
        "fedbuff.concurrency": 1, "fedbuff.buffer_size": 1, "tasks.eval_every": 0, "data.eval_max_clips": 24,
        "stop.max_versions": 3})
    acks = []
    real_settle = MessageConsumer.settle

    def settle(self, tag, outcome):
        acks.append(tag)
        if len(acks) == 2:  # version 2 is made and logged; its update's ack is lost with the connection
            raise pika.exceptions.StreamLostError("Stream connection lost: ConnectionResetError(104)")
        return real_settle(self, tag, outcome)

    monkeypatch.setattr(MessageConsumer, "settle", settle)
    coordinator = Coordinator(cfg, url=private_broker.url)
    topo = topology.Topology(cfg.experiment.name)
    conn = connect("test", device="record-gap", url=private_broker.url, attempts=10)
    try:
        ch = conn.channel()
        topology.declare(ch, topo)
        ch.confirm_delivery()
        for i in range(3):  # three updates on version 0: with K = 1, versions 1, 2, 3
            delta = {n: torch.full_like(t, 1e-4 * (i + 1)) for n, t in coordinator.state.items()
                     if t.is_floating_point()}
            enc = codecs.encode(delta, "none")
            publish_message(ch, topo.update_exchange, topo.UPDATES_KEY, messages.Update(
                topo.experiment, coordinator.dispatcher.task_id(100 + i, 0), f"w{i}/cpu", 0, 10, {}, enc.codec,
                enc.raw_bytes, enc.wire_bytes,
                messages.PayloadRef(inline=enc.data)))
    finally:
        conn.close()
    summary: dict = {}
    thread = threading.Thread(target=lambda: summary.update(coordinator.run()), daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the coordinator did not finish"
    assert summary["reason"] == "max_versions" and summary["versions"] == 3, summary
    assert len(acks) >= 3, "the injected connection loss did not happen"
    versions = [e["version"] for e in read_record(run_dir) if e.get("kind") is None]
    assert versions == [1, 2, 3], f"run record versions: {versions}"


def _when(entry: dict) -> float | None:
    """A JSON log line's timestamp as Unix time (structlog's ISO `timestamp`), None when it has none."""
    from datetime import datetime

    ts = entry.get("timestamp")
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def test_a_connection_lost_mid_training_stops_the_training_thread_before_the_worker_reconnects():
    """The worker trains in a thread while its main thread services the connection. When the connection
    drops (a broker restart), the trainer reconnects and may take the next task, training the same model
    object: the old training must be over by then, or two threads step one model and the next update
    mixes both."""
    import threading

    import pika.exceptions

    from worker.daemon import Trainer

    class DroppedConnection:
        is_open = False

        def call_later(self, delay, callback):  # the heartbeat timer: never runs, the connection is gone
            return object()

        def process_data_events(self, time_limit=None):
            raise pika.exceptions.StreamLostError("Stream connection lost: ConnectionResetError(104)")

    trainer = Trainer.__new__(Trainer)  # only what _wait_for uses: no data, no broker
    trainer.device, trainer.conn, trainer.stop_event = "cpu", DroppedConnection(), threading.Event()

    def training():
        for _ in range(20):  # a training loop that takes a while
            time.sleep(0.05)

    with pytest.raises(pika.exceptions.StreamLostError):
        trainer._wait_for(training)
    still_running = [t.name for t in threading.enumerate() if t.name == "train-cpu" and t.is_alive()]
    assert not still_running, "the training thread outlived the connection it belonged to"


def test_daemons_told_to_stop_while_the_broker_is_down_exit_cleanly(private_broker, small_corpus_dir, tmp_path):
    """SIGTERM during a broker outage: the coordinator, the evaluator and the workers stop (exit 0) without
    waiting for the broker to come back (the design: the worker daemon stops cleanly on SIGTERM, under systemd too)."""
    import signal

    fed = _federation(private_broker, tmp_path, small_corpus_dir).provision()  # users need the broker up
    private_broker.stop()
    fed.start()
    logs = ["coordinator.log", "evaluator.log", "worker-w1.log", "worker-w2.log"]
    procs = [fed.coordinator, fed.evaluator, *fed.workers.values()]
    try:
        fed.wait_for(lambda: all(_events(fed.run_dir / name, "amqp_connect_failed") for name in logs), 180,
                     "every daemon retrying to connect")
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15  # a guard: a daemon that honours SIGTERM exits within a second
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
    finally:
        fed.signal(procs, signal.SIGKILL, timeout=10)
    assert codes == [0, 0, 0, 0], \
        f"exit codes coordinator, evaluator, w1, w2 (None: still waiting for the broker): {codes}"
