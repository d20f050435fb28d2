"""common/metrics.py without a federation: each process's registry renders every name it promises, with its
type and labels; the counters move with the calls; dead letters survive a new consumer; a CPU trainer has
no GPU series; the endpoint serves the text format, is off at port 0 and names its key when the port is
taken; the config keys refuse hostile values naming the key."""
from __future__ import annotations

import socket
import types
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.config import ConfigError, load_config
from common.metrics import (
    COORDINATOR_METRICS,
    WORKER_METRICS,
    CoordinatorMetrics,
    MetricsError,
    MetricsSection,
    WorkerMetrics,
    serve,
)
from coordinator.experiment import ExperimentConfig
from worker.config import WorkerConfig


def parse(text: str | bytes) -> dict[str, types.SimpleNamespace]:
    """Exposed family name (counters with `_total`) -> type and samples {(sample name, labels): value}."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        out[name] = types.SimpleNamespace(type=family.type, samples=samples)
    return out


def value(families, name: str, **labels) -> float | None:
    """The value of sample `name` (a histogram's `_count`/`_sum` too) with exactly `labels`, or None."""
    for family in families.values():
        for (sample, got), v in family.samples.items():
            if sample == name and dict(got) == labels:
                return v
    return None


def labels_of(family) -> set[str]:
    return {k for _, got in family.samples for k, _ in got} - {"le"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stats:  # what CoordinatorMetrics reads of a ConsumerStats
    def __init__(self) -> None:
        self.rejected: dict[str, int] = {}


def coordinator(**state) -> tuple[CoordinatorMetrics, dict]:
    live = {"version": 0, "buffered": 0, "workers": 0, "last_eval": None, **state}
    m = CoordinatorMetrics(lambda: live["version"], lambda: live["buffered"], lambda: live["workers"],
                           lambda: live["last_eval"])
    return m, live


def test_the_coordinator_registry_renders_every_promised_name_with_its_type_and_labels():
    m, _ = coordinator(last_eval={"version": 1, "accuracy": 0.5, "loss": 1.2})
    m.accepted("w1", 100, 400, 1000, 0.01)
    m.rejected("norm")
    m.dropped("stale")
    m.track_consumer(Stats())
    families = parse(m.render())
    assert set(COORDINATOR_METRICS) <= set(families), set(COORDINATOR_METRICS) - set(families)
    for name, (kind, labels) in COORDINATOR_METRICS.items():
        assert families[name].type == kind, name
        if families[name].samples and labels:
            assert labels_of(families[name]) == set(labels), name
    assert all(name.startswith("mqfed_") for name in families)
    assert all(name.endswith("_total") for name, f in families.items() if f.type == "counter")
    assert not any(name.endswith("_created") for f in families.values() for name, _ in f.samples)


def test_coordinator_counters_and_gauges_move_with_what_happens():
    m, live = coordinator()
    before = parse(m.render())
    assert value(before, "mqfed_model_version") == 0
    assert before["mqfed_central_accuracy_ratio"].samples == {}  # no evaluation yet: no sample, not a 0
    m.accepted("w1", 100, 400, 1000, 0.02)
    m.accepted("w2", 50, 400, 0, 0.5)
    m.rejected("nan")
    m.dropped("stale")
    m.dropped("step_refused", 2)
    m.stepped([0, 3])
    m.tasks_issued(3)
    m.tasks_expired()
    m.checkpoint_written(4)
    live.update(version=4, buffered=1, workers=2, last_eval={"version": 4, "accuracy": 0.75, "loss": 0.9})
    after = parse(m.render())
    assert value(after, "mqfed_updates_accepted_total", node="w1") == 1
    assert value(after, "mqfed_updates_accepted_total", node="w2") == 1
    assert value(after, "mqfed_updates_received_bytes_total") == 150
    assert value(after, "mqfed_updates_raw_bytes_total") == 800
    assert value(after, "mqfed_updates_fetched_bytes_total") == 1000
    assert value(after, "mqfed_updates_rejected_total", reason="nan") == 1
    assert value(after, "mqfed_updates_dropped_total", reason="stale") == 1
    assert value(after, "mqfed_updates_dropped_total", reason="step_refused") == 2
    assert value(after, "mqfed_updates_applied_total") == 2
    assert value(after, "mqfed_update_staleness_count") == 2 and value(after, "mqfed_update_staleness_sum") == 3
    assert value(after, "mqfed_update_staleness_bucket", le="0.0") == 1
    assert value(after, "mqfed_update_ingest_seconds_count") == 2
    assert value(after, "mqfed_update_ingest_seconds_bucket", le="0.025") == 1
    assert value(after, "mqfed_tasks_issued_total") == 3 and value(after, "mqfed_tasks_expired_total") == 1
    assert value(after, "mqfed_model_version") == 4 and value(after, "mqfed_updates_buffered") == 1
    assert value(after, "mqfed_workers_registered") == 2
    assert value(after, "mqfed_central_accuracy_ratio") == 0.75 and value(after, "mqfed_central_loss") == 0.9
    assert value(after, "mqfed_central_eval_version") == 4
    assert value(after, "mqfed_checkpoint_last_version") == 4
    assert value(after, "mqfed_checkpoint_last_timestamp_seconds") > 1.7e9


def test_dead_letters_count_on_across_consumers():
    """Each broker session has a new consumer with fresh stats: the counter must not go back."""
    m, _ = coordinator()
    first = Stats()
    m.track_consumer(first)
    first.rejected["InvalidField"] = 2
    assert value(parse(m.render()), "mqfed_dead_letters_total", error="InvalidField") == 2
    second = Stats()
    m.track_consumer(second)
    second.rejected.update(InvalidField=1, MalformedMessage=1)
    families = parse(m.render())
    assert value(families, "mqfed_dead_letters_total", error="InvalidField") == 3
    assert value(families, "mqfed_dead_letters_total", error="MalformedMessage") == 1


def test_two_registries_in_one_process_do_not_share_values():
    a, _ = coordinator()
    b, _ = coordinator()
    a.rejected("norm")
    assert value(parse(a.render()), "mqfed_updates_rejected_total", reason="norm") == 1
    assert value(parse(b.render()), "mqfed_updates_rejected_total", reason="norm") is None
    WorkerMetrics("n", "cpu")
    WorkerMetrics("n", "cpu")  # the same names again, in their own registries: no clash


def test_the_worker_registry_renders_every_promised_name_and_moves():
    held = {"version": None, "busy": False}
    m = WorkerMetrics("node-a", "cpu", lambda: held["version"], lambda: held["busy"])
    before = parse(m.render())
    assert set(WORKER_METRICS) <= set(before), set(WORKER_METRICS) - set(before)
    for name, (kind, labels) in WORKER_METRICS.items():
        assert before[name].type == kind, name
        if before[name].samples:
            assert labels_of(before[name]) == {"node", "device", *labels}, name
    who = {"node": "node-a", "device": "cpu"}
    # A CPU trainer: the GPU families are there, with no series (not an error, not a 0).
    assert before["mqfed_worker_gpu_memory_allocated_bytes"].samples == {}
    assert before["mqfed_worker_gpu_memory_reserved_bytes"].samples == {}
    assert before["mqfed_worker_model_version"].samples == {}  # no model held yet
    assert value(before, "mqfed_worker_training_samples_total", **who) == 0
    m.fetched(1000)
    m.fetched(0)  # from the cache: nothing downloaded
    m.trained(64, 2.0)
    m.published(321)
    m.task_done("train")
    m.task_failed("expired")
    m.task_failed("ModelLoadError")
    held.update(version=3, busy=True)
    after = parse(m.render())
    assert value(after, "mqfed_worker_fetched_bytes_total", **who) == 1000
    assert value(after, "mqfed_worker_training_samples_total", **who) == 64
    assert value(after, "mqfed_worker_training_samples_per_second", **who) == 32
    assert value(after, "mqfed_worker_training_seconds_count", **who) == 1
    assert value(after, "mqfed_worker_training_seconds_sum", **who) == 2.0
    assert value(after, "mqfed_worker_published_bytes_total", **who) == 321
    assert value(after, "mqfed_worker_tasks_done_total", kind="train", **who) == 1
    assert value(after, "mqfed_worker_tasks_failed_total", reason="expired", **who) == 1
    assert value(after, "mqfed_worker_tasks_failed_total", reason="ModelLoadError", **who) == 1
    assert value(after, "mqfed_worker_model_version", **who) == 3
    assert value(after, "mqfed_worker_busy", **who) == 1


def test_a_gpu_trainer_reports_its_memory():
    m = WorkerMetrics("node-a", "cuda:1", gpu_memory=lambda: (1024, 4096))
    families = parse(m.render())
    who = {"node": "node-a", "device": "cuda:1"}
    assert value(families, "mqfed_worker_gpu_memory_allocated_bytes", **who) == 1024
    assert value(families, "mqfed_worker_gpu_memory_reserved_bytes", **who) == 4096


def test_the_endpoint_serves_the_text_format_is_off_at_port_0_and_names_its_key_when_the_port_is_taken():
    assert serve(CoordinatorMetrics(lambda: 7).registry, 0) is None
    m, live = coordinator(version=7)
    port = free_port()
    server = m.serve(port, "127.0.0.1")
    try:
        assert server is not None and server.url == f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(server.url, timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=")
            assert value(parse(resp.read()), "mqfed_model_version") == 7
        with pytest.raises(MetricsError, match=rf"worker.metrics_port: cannot serve metrics on 127.0.0.1:{port}"):
            WorkerMetrics("n", "cpu").serve(port, "127.0.0.1", key="worker.metrics_port")
    finally:
        m.close()
    m.close()  # idempotent


@pytest.mark.parametrize("toml, env, expected", [
    ("[metrics]\nport = 70000\n", {}, "metrics.port must be a port in [0, 65535] (0: off), got 70000"),
    ("[metrics]\nport = -1\n", {}, "metrics.port must be a port in [0, 65535] (0: off), got -1"),
    ('[metrics]\nport = "9100"\n', {}, "metrics.port: expected int, got str '9100'"),
    ("", {"MQFED_METRICS_PORT": "http"}, "metrics.port: expected int, got str 'http' (from MQFED_METRICS_PORT)"),
    ("", {"MQFED_METRICS_HOST": "0.0.0.0 evil"}, "metrics.host must be a host name or an IP address"),
    ('[metrics]\nhost = ""\n', {}, "metrics.host must be a host name or an IP address"),
    ("", {"MQFED_METRICS_PROT": "9100"}, "MQFED_METRICS_PROT: environment variable matches no config key"),
])
def test_the_coordinator_metrics_keys_refuse_hostile_values_naming_the_key(tmp_path, toml, env, expected):
    path = tmp_path / "exp.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as refused:
        load_config(ExperimentConfig, path, env=env)
    assert expected in str(refused.value)


@pytest.mark.parametrize("toml, env, expected", [
    ("[worker]\nmetrics_port = 65536\n", {}, "worker.metrics_port must be a port in [0, 65535] (0: off), got 65536"),
    ('[worker]\nmetrics_port = 65535\ndevices = ["cuda:0", "cuda:1"]\n', {},
     "worker.metrics_port 65535 + 1 (one port per device) is above 65535"),
    ("", {"MQFED_WORKER_METRICS_PORT": "1e3"},
     "worker.metrics_port: expected int, got str '1e3' (from MQFED_WORKER_METRICS_PORT)"),
    ("", {"MQFED_WORKER_METRICS_HOST": "host/path"}, "worker.metrics_host must be a host name or an IP address"),
])
def test_the_worker_metrics_keys_refuse_hostile_values_naming_the_key(tmp_path, toml, env, expected):
    path = tmp_path / "worker.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as refused:
        load_config(WorkerConfig, path, env=env)
    assert expected in str(refused.value)


def test_metrics_are_off_by_default_and_each_trainer_has_its_own_port():
    assert load_config(ExperimentConfig, env={}).metrics == MetricsSection(port=0, host="127.0.0.1")
    assert load_config(ExperimentConfig, env={"MQFED_METRICS_PORT": "9100"}).metrics.port == 9100
    w = load_config(WorkerConfig, env={"MQFED_WORKER_METRICS_PORT": "9101",
                                       "MQFED_WORKER_DEVICES": '["cuda:0", "cuda:1"]'}).worker
    assert (w.metrics_port_of("cuda:0"), w.metrics_port_of("cuda:1")) == (9101, 9102)
    assert load_config(WorkerConfig, env={}).worker.metrics_port_of("cpu") == 0
