"""A real federation on the real broker: coordinator and worker daemons as processes (or the coordinator in
a thread where the test needs its counters), the small synthetic corpus, the CPU preset."""
from __future__ import annotations

import json
import signal
import threading
import time

import pika
import pytest
import torch

from common.compression import codecs
from common.transport.connection import connect
from common.transport.model_store import ModelStore
from common.transport.publish import publish_message
from common.wire import messages
from common.wire.tensors import decode_state

from . import federation

pytestmark = pytest.mark.integration


def test_federation_of_two_worker_processes_trains_to_the_target_accuracy(experiment, small_corpus_dir, tmp_path):
    fed = federation.federation(experiment.experiment, tmp_path, small_corpus_dir, ["speaker:1/2", "speaker:2/2"], **{
        "stop.target_accuracy": 0.3, "stop.max_versions": 0, "stop.max_wall_s": 300.0}).start()
    try:
        fed.wait_coordinator(timeout=360)
    finally:
        fed.stop()
    summary = fed.summary()
    assert summary["reason"] == "target_accuracy", summary
    assert summary["best_accuracy"] >= 0.3
    assert summary["test_accuracy"] is not None
    assert "unseen_accuracy" in summary  # None for a corpus without the unseen-speaker split
    # The accuracy came from the evaluator process, not from the coordinator's ingest loop.
    evaluated = fed.events("evaluator.log", "evaluated")
    assert evaluated and fed.events("coordinator.log", "central_eval")
    assert max(e["accuracy"] for e in evaluated) >= 0.3
    assert (fed.run_dir / "export" / "mqfed.json").exists()
    assert sorted(summary["workers"]) == ["w1", "w2"]
    versions = [e["version"] for e in fed.versions()]
    assert versions == list(range(1, len(versions) + 1))
    assert {w.split("/")[0] for e in fed.versions() for w in e["workers"]} == {"w1", "w2"}
    export = fed.run_dir / "export"
    assert (export / "config.json").exists() and (export / "preprocessor_config.json").exists()
    keys = federation.applied_keys(fed)
    assert len(keys) == len(set(keys)), "an update was applied twice"
    # It ran as the generated users (one per worker node), and what it wrote is its owner's only.
    assert set(fed.users) == {"coordinator", "w1", "w2"} and fed.urls == {}  # made, and deleted at the end
    exposed = [str(p) for p in fed.run_dir.rglob("*") if p.stat().st_mode & 0o077
               and p.name not in ("experiment.toml", "coordinator.log", "evaluator.log") and not p.name.startswith("worker-")]
    assert exposed == [], f"readable by others: {exposed[:5]}"


def test_a_duplicated_update_is_applied_once(experiment, small_corpus_dir, tmp_path):
    from coordinator.server import Coordinator

    run_dir = tmp_path / "run"
    cfg = federation.experiment_config(experiment.experiment, run_dir, small_corpus_dir, **{
        "fedbuff.buffer_size": 2, "fedbuff.concurrency": 1, "stop.max_versions": 1, "tasks.eval_every": 0,
        "data.eval_max_clips": 24, "tasks.model_dtype": "float32"})  # the base it fetches is the master, bit for bit
    coordinator = Coordinator(cfg)
    summary: dict = {}
    thread = threading.Thread(target=lambda: summary.update(coordinator.run()), daemon=True)
    thread.start()
    conn = connect("test", device="duplicate", attempts=3)
    ch = conn.channel()
    ch.confirm_delivery()
    store = ModelStore(conn.channel(), experiment, cache_dir=tmp_path / "cache")

    def model_published() -> bool:
        try:
            return store.latest() is not None
        except pika.exceptions.ChannelClosedByBroker:  # 404 until the coordinator has declared its queues
            store.channel = conn.channel()
            return False

    deadline = time.monotonic() + 60
    while not model_published() and time.monotonic() < deadline:
        time.sleep(0.2)
    base = decode_state(store.fetch(0).path.read_bytes())

    def update(task_id: str, worker: str, scale: float) -> messages.Update:
        delta = {n: torch.full_like(t, scale) for n, t in base.items() if t.is_floating_point()}
        enc = codecs.encode(delta, "none")
        return messages.Update(experiment.experiment, task_id, worker, 0, 10, {}, enc.codec, enc.raw_bytes,
                               enc.wire_bytes, messages.PayloadRef(inline=enc.data))

    task_a, task_b = (coordinator.dispatcher.task_id(n, 0) for n in (101, 102))  # as the coordinator signs them
    first = update(task_a, "w1/cpu", 1e-3)
    for msg in (first, first, update(task_b, "w2/cpu", 3e-3)):
        publish_message(ch, experiment.update_exchange, experiment.UPDATES_KEY, msg)
    thread.join(timeout=120)
    conn.close()
    assert not thread.is_alive()
    assert summary["versions"] == 1
    counters = summary["counters"]
    assert counters["duplicates"] == 1 and counters["applied_updates"] == 2 and counters["accepted"] == 2
    # The applied step is the mean of the two distinct deltas (sample weights equal): 2e-3 on every entry.
    name = next(n for n, t in base.items() if t.is_floating_point())
    assert torch.allclose(coordinator.state[name], base[name] + 2e-3, atol=1e-6)
    assert coordinator.record.lines()[0]["tasks"] == [task_a, task_b]


def test_coordinator_killed_mid_run_resumes_from_its_checkpoint_and_applies_nothing_twice(experiment, small_corpus_dir,
                                                                                           tmp_path):
    fed = federation.federation(experiment.experiment, tmp_path, small_corpus_dir, ["iid:1/2", "iid:2/2"],
                                **{"stop.max_versions": 10, "tasks.eval_every": 2}).start()
    try:
        fed.wait_for(lambda: len(fed.versions()) >= 3, 240, "3 versions")
        fed.signal([fed.coordinator], signal.SIGKILL)
        fed.start_coordinator()
        fed.wait_coordinator(timeout=300)
    finally:
        fed.stop()
    resumed = fed.events("coordinator.log", "coordinator_resumed")
    assert resumed and resumed[0]["version"] >= 3
    versions = [e["version"] for e in fed.versions()]
    assert versions == list(range(1, 11)), versions
    keys = federation.applied_keys(fed)
    assert len(keys) == len(set(keys)), "an update was applied twice"
    summary = fed.summary()
    assert summary["versions"] == 10 and summary["reason"] == "max_versions"
    assert json.loads((fed.run_dir / "export" / "mqfed.json").read_text())["experiment"] == experiment.experiment
