"""The Prometheus endpoints during a real federation (coordinator, evaluator and two worker daemons as
processes on the real broker, kws-tiny): each endpoint is scraped over HTTP while the run goes on, every
metric name the docs promise is there with its type, and what should move between two scrapes moved. A few
messages the test publishes as an operator make the counters of the unhappy paths move too: an update that
does not decode (rejected, dead-lettered), an update for a task already answered (dropped), a task naming a
model no worker has (failed on a worker). docs/operations.md#metrics."""
from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.metrics import COORDINATOR_METRICS, WORKER_METRICS
from common.transport.connection import connect
from common.transport.publish import publish_message
from common.wire import messages
from coordinator.dispatch import Dispatcher
from coordinator.local_federation import LocalFederation

from . import federation

pytestmark = pytest.mark.integration

#: The exact names this test asserts present on each endpoint (common.metrics keeps the same lists).
COORDINATOR_NAMES = [
    "mqfed_model_version", "mqfed_updates_buffered", "mqfed_workers_registered", "mqfed_updates_accepted_total",
    "mqfed_updates_applied_total", "mqfed_updates_rejected_total", "mqfed_updates_dropped_total",
    "mqfed_dead_letters_total", "mqfed_update_staleness", "mqfed_update_ingest_seconds",
    "mqfed_updates_received_bytes_total", "mqfed_updates_raw_bytes_total", "mqfed_updates_fetched_bytes_total",
    "mqfed_tasks_issued_total", "mqfed_tasks_expired_total", "mqfed_central_accuracy_ratio", "mqfed_central_loss",
    "mqfed_central_eval_version", "mqfed_checkpoint_last_timestamp_seconds", "mqfed_checkpoint_last_version",
]
WORKER_NAMES = [
    "mqfed_worker_tasks_done_total", "mqfed_worker_tasks_failed_total", "mqfed_worker_training_samples_per_second",
    "mqfed_worker_training_samples_total", "mqfed_worker_training_seconds", "mqfed_worker_published_bytes_total",
    "mqfed_worker_fetched_bytes_total", "mqfed_worker_model_version", "mqfed_worker_busy",
    "mqfed_worker_gpu_memory_allocated_bytes", "mqfed_worker_gpu_memory_reserved_bytes",
]

#: Coordinator samples that must grow between the two scrapes (sample name, labels; summed over other labels).
COORDINATOR_MOVING = [
    ("mqfed_model_version", {}), ("mqfed_updates_accepted_total", {}), ("mqfed_updates_applied_total", {}),
    ("mqfed_update_staleness_count", {}), ("mqfed_update_ingest_seconds_count", {}),
    ("mqfed_updates_received_bytes_total", {}), ("mqfed_updates_raw_bytes_total", {}),
    ("mqfed_updates_fetched_bytes_total", {}), ("mqfed_tasks_issued_total", {}),
    ("mqfed_updates_rejected_total", {"reason": "codec"}), ("mqfed_updates_dropped_total", {"reason": "answered"}),
    ("mqfed_dead_letters_total", {"error": "InvalidField"}), ("mqfed_central_eval_version", {}),
    ("mqfed_checkpoint_last_version", {}), ("mqfed_checkpoint_last_timestamp_seconds", {}),
]
#: Samples of each worker that must grow between the two scrapes.
WORKER_MOVING = [
    ("mqfed_worker_tasks_done_total", {"kind": "train"}), ("mqfed_worker_training_samples_total", {}),
    ("mqfed_worker_training_seconds_count", {}), ("mqfed_worker_published_bytes_total", {}),
    ("mqfed_worker_fetched_bytes_total", {}), ("mqfed_worker_model_version", {}),
]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def scrape(port: int) -> str | None:
    """The text a Prometheus scrape of 127.0.0.1:port gets, or None while nothing answers there."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
            return resp.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None


def parse(text: str) -> dict:
    """Exposed family name (counters with `_total`) -> (type, [(sample name, labels, value)])."""
    out = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = (family.type, [(s.name, s.labels, s.value) for s in family.samples])
    return out


def total(families: dict, sample: str, **labels) -> float | None:
    """The sum of the samples named `sample` whose labels include `labels`; None when there is none."""
    found = [v for _, samples in families.values() for name, got, v in samples
             if name == sample and all(got.get(k) == want for k, want in labels.items())]
    return sum(found) if found else None


def test_every_metric_is_scraped_present_and_moving_during_a_federation(experiment, small_corpus_dir, tmp_path):
    coordinator_port, *worker_ports = free_ports(3)
    cfg = federation.experiment_config(experiment.experiment, tmp_path / "run", small_corpus_dir, **{
        "metrics.port": coordinator_port, "checkpoint.every_versions": 1, "stop.max_versions": 40,
        "stop.max_wall_s": 240.0})
    workers = [{"shard": f"speaker:{i + 1}/2", "env": {"MQFED_WORKER_METRICS_PORT": str(port)}}
               for i, port in enumerate(worker_ports)]
    fed = LocalFederation(cfg, small_corpus_dir, workers, least_privilege=True)
    ports = {"coordinator": coordinator_port, "w1": worker_ports[0], "w2": worker_ports[1]}
    started = time.monotonic()
    conn = connect("test", device="metrics", attempts=3)
    try:
        fed.start()
        first: dict[str, dict] = {}

        def ready() -> bool:  # every endpoint answers, a version is out, evaluated and checkpointed
            texts = {who: scrape(port) for who, port in ports.items()}
            if any(t is None for t in texts.values()):
                return False
            got = {who: parse(t) for who, t in texts.items()}
            c = got["coordinator"]
            if not ((total(c, "mqfed_model_version") or 0) >= 1 and total(c, "mqfed_central_eval_version") is not None
                    and total(c, "mqfed_checkpoint_last_version") is not None
                    and all(total(got[w], "mqfed_worker_model_version") is not None for w in ("w1", "w2"))):
                return False
            first.update(got)
            for who, text in texts.items():
                (fed.run_dir / f"scrape-1-{who}.txt").write_text(text)
            return True

        fed.wait_for(ready, 150, "every metrics endpoint answering, version 1 evaluated and checkpointed")
        inject(conn, experiment, fed, int(total(first["coordinator"], "mqfed_model_version")))
        second: dict[str, dict] = {}

        def moved() -> bool:
            texts = {who: scrape(port) for who, port in ports.items()}
            if any(t is None for t in texts.values()):
                return False
            got = {who: parse(t) for who, t in texts.items()}
            if stuck(first, got):
                return False
            second.update(got)
            for who, text in texts.items():
                (fed.run_dir / f"scrape-2-{who}.txt").write_text(text)
            return True

        fed.wait_for(moved, 150, "every moving metric to move")
    finally:
        conn.close()
        fed.stop()
    elapsed = time.monotonic() - started

    for who, names, promised in (("coordinator", COORDINATOR_NAMES, COORDINATOR_METRICS),
                                 ("w1", WORKER_NAMES, WORKER_METRICS), ("w2", WORKER_NAMES, WORKER_METRICS)):
        assert sorted(names) == sorted(promised)  # the test asserts every name the code promises
        for scraped in (first[who], second[who]):
            missing = [n for n in names if n not in scraped]
            assert missing == [], f"{who}: missing {missing}"
            for name in names:
                assert scraped[name][0] == promised[name][0], f"{who}: {name} is a {scraped[name][0]}"
    assert stuck(first, second) == []
    c = second["coordinator"]
    assert total(c, "mqfed_workers_registered") == 2
    assert total(c, "mqfed_updates_accepted_total", node="w1") and total(c, "mqfed_updates_accepted_total", node="w2")
    assert 0 <= total(c, "mqfed_central_accuracy_ratio") <= 1 and total(c, "mqfed_central_loss") > 0
    assert total(c, "mqfed_update_staleness_count") == total(c, "mqfed_updates_applied_total")
    for w in ("w1", "w2"):
        assert total(second[w], "mqfed_worker_training_samples_per_second") > 0
        assert second[w]["mqfed_worker_gpu_memory_allocated_bytes"][1] == []  # a CPU trainer: no GPU series
        assert all(labels["node"] == w and labels["device"] == "cpu" for _, samples in second[w].values()
                   for _, labels, _ in samples), w
    failed = sum(total(second[w], "mqfed_worker_tasks_failed_total", reason="ModelLoadError") or 0
                 for w in ("w1", "w2"))
    assert failed == 1
    # Every daemon stopped cleanly on SIGTERM, its endpoint with it.
    assert [p.returncode for p in fed.processes] == [0] * len(fed.processes)
    assert all(scrape(port) is None for port in ports.values())
    print(f"\nmetrics scraped during a federation in {elapsed:.0f} s; excerpt of the second coordinator scrape:")
    print("\n".join(line for line in (fed.run_dir / "scrape-2-coordinator.txt").read_text().splitlines()
                    if not line.startswith("#") and "_bucket" not in line))
    print("\n".join(line for line in (fed.run_dir / "scrape-2-w1.txt").read_text().splitlines()
                    if not line.startswith("#") and "_bucket" not in line))


def stuck(first: dict, second: dict) -> list[str]:
    """The samples of `*_MOVING` that did not grow from `first` to `second` (a scrape of each endpoint)."""
    out = []
    for who, moving in (("coordinator", COORDINATOR_MOVING), ("w1", WORKER_MOVING), ("w2", WORKER_MOVING)):
        for sample, labels in moving:
            before, after = total(first[who], sample, **labels) or 0, total(second[who], sample, **labels)
            if after is None or not after > before:
                out.append(f"{who} {sample}{labels or ''}: {before} -> {after}")
    if sum(total(second[w], "mqfed_worker_tasks_failed_total") or 0 for w in ("w1", "w2")) < 1:
        out.append("mqfed_worker_tasks_failed_total: no worker failed the injected task yet")
    return out


def inject(conn, topo, fed: LocalFederation, version: int) -> None:
    """As an operator: an update whose payload does not decode (for a task id this run could have issued:
    rejected as `codec`, dead-lettered as InvalidField), an update for a task already answered (dropped as
    `answered`), a train task naming a model no worker has (dead-lettered by a worker: ModelLoadError)."""
    ch = conn.channel()
    ch.confirm_delivery()
    secret = (fed.run_dir / "run-secret").read_bytes()
    forged_ok = Dispatcher(secret=secret).task_id(999_999, version)
    answered = fed.versions()[-1]["tasks"][0]
    garbage = b"not a compressed update"
    for task_id in (forged_ok, answered):
        update = messages.Update(topo.experiment, task_id, "operator/cpu", version, 16, {}, "none", 4 * 1000,
                                 len(garbage), messages.PayloadRef(inline=garbage))
        publish_message(ch, topo.update_exchange, topo.UPDATES_KEY, update)
    from common.learning.config import TrainConfig

    task = messages.TrainTask(topo.experiment, "run-injected", "injected-bad-model", 0, time.time() + 120, "none",
                              "kws-huge", False, TrainConfig(steps=1, batch_size=4))
    publish_message(ch, topo.task_exchange, topo.TASKS_KEY, task)
    ch.close()
