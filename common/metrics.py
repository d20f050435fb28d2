"""Prometheus metrics of the coordinator and of each worker trainer (docs/operations.md#metrics).

Each process keeps its metrics in its own `CollectorRegistry` (never prometheus_client's global one: tests
run a coordinator and trainers in one process) and serves them over HTTP only when asked (`serve`; a port
of 0 is off). Names carry the `mqfed_` prefix and Prometheus's unit suffixes (`_total` counters, `_seconds`,
`_bytes`, `_ratio`); labels are low-cardinality: a reason or error type from a fixed set in the code, the
worker node (bounded by the federation's broker users), the trainer's device.

Values are recorded where they happen (`CoordinatorMetrics.accepted`, `WorkerMetrics.task_done`, ...) or
read when scraped from a callable the owner passes in (the model version, the buffer, the last central
evaluation, GPU memory): a scrape runs on the HTTP server's thread and only reads. No pika, no torch here.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from common.config import rule, validate
from common.errors import InvalidValue, MqfedError
from common.logs import get_logger

__all__ = ["COORDINATOR_METRICS", "WORKER_METRICS", "CoordinatorMetrics", "MetricsError",
           "MetricsSection", "MetricsServer", "WorkerMetrics", "check_host", "serve"]

# `_created` series double every counter and histogram for a timestamp Prometheus does not need.
prometheus_client.disable_created_metrics()

log = get_logger(__name__)

#: Staleness is an integer (versions behind); `le="0"` counts the fresh updates.
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
INGEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TRAINING_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

#: Every family the coordinator exposes: name -> (type, labels). docs/operations.md#metrics describes each.
COORDINATOR_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mqfed_model_version": ("gauge", ()),
    "mqfed_updates_buffered": ("gauge", ()),
    "mqfed_workers_registered": ("gauge", ()),
    "mqfed_updates_accepted_total": ("counter", ("node",)),
    "mqfed_updates_applied_total": ("counter", ()),
    "mqfed_updates_rejected_total": ("counter", ("reason",)),
    "mqfed_updates_dropped_total": ("counter", ("reason",)),
    "mqfed_dead_letters_total": ("counter", ("error",)),
    "mqfed_update_staleness": ("histogram", ()),
    "mqfed_update_ingest_seconds": ("histogram", ()),
    "mqfed_updates_received_bytes_total": ("counter", ()),
    "mqfed_updates_raw_bytes_total": ("counter", ()),
    "mqfed_updates_fetched_bytes_total": ("counter", ()),
    "mqfed_tasks_issued_total": ("counter", ()),
    "mqfed_tasks_expired_total": ("counter", ()),
    "mqfed_central_accuracy_ratio": ("gauge", ()),
    "mqfed_central_loss": ("gauge", ()),
    "mqfed_central_eval_version": ("gauge", ()),
    "mqfed_checkpoint_last_timestamp_seconds": ("gauge", ()),
    "mqfed_checkpoint_last_version": ("gauge", ()),
}

#: Every family a worker trainer exposes (each also labelled `node` and `device`).
WORKER_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mqfed_worker_tasks_done_total": ("counter", ("kind",)),
    "mqfed_worker_tasks_failed_total": ("counter", ("reason",)),
    "mqfed_worker_training_samples_per_second": ("gauge", ()),
    "mqfed_worker_training_samples_total": ("counter", ()),
    "mqfed_worker_training_seconds": ("histogram", ()),
    "mqfed_worker_published_bytes_total": ("counter", ()),
    "mqfed_worker_fetched_bytes_total": ("counter", ()),
    "mqfed_worker_model_version": ("gauge", ()),
    "mqfed_worker_busy": ("gauge", ()),
    "mqfed_worker_gpu_memory_allocated_bytes": ("gauge", ()),
    "mqfed_worker_gpu_memory_reserved_bytes": ("gauge", ()),
}

_MAX_HOST = 253


def check_host(host: str, key: str) -> None:
    """Raise InvalidValue naming `key` unless `host` is a plausible address or host name to listen on."""
    if not host or len(host) > _MAX_HOST or any(c.isspace() or not c.isprintable() or c in "/#?@" for c in host):
        raise InvalidValue(f"{key} must be a host name or an IP address to listen on (e.g. 127.0.0.1, 0.0.0.0, ::),"
                           f" got {host[:80]!r}")


@dataclasses.dataclass(frozen=True)
class MetricsSection:
    """`[metrics]` of the experiment config: the coordinator's Prometheus endpoint. port: 0 (the default)
    serves nothing; host: the address it listens on (127.0.0.1: this machine only)."""

    port: int = rule(0, ge=0, le=65535, what="a port in [0, 65535] (0: off)")
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        validate(self, "metrics")
        check_host(self.host, "metrics.host")


class MetricsError(MqfedError):
    """The metrics endpoint could not be served (its port taken, its host not an address here)."""


class MetricsServer:
    """A running endpoint: `url` (http://host:port/metrics), `close()` stops it."""

    def __init__(self, httpd, thread: threading.Thread, host: str, port: int) -> None:
        self._httpd, self._thread, self.host, self.port = httpd, thread, host, port
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve(registry: CollectorRegistry, port: int, host: str = "127.0.0.1", key: str = "metrics.port") \
        -> MetricsServer | None:
    """Serve `registry` at http://host:port/metrics on a daemon thread; None when `port` is 0 (off). Raises
    MetricsError naming `key` when it cannot listen there."""
    if not port:
        return None
    try:
        httpd, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # the port is taken, or the host is no address of this machine
        raise MetricsError(f"{key}: cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return MetricsServer(httpd, thread, host, port)


class _Callback:
    """A collector whose families are built at scrape time by `fn` (values the owner holds anyway)."""

    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self._fn = fn

    def collect(self) -> Iterable[Metric]:
        return list(self._fn())


def _gauge(name: str, doc: str, value: float | None, labels: Mapping[str, str] | None = None) -> GaugeMetricFamily:
    """A gauge family with one sample, or none when `value` is None (nothing known yet)."""
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    if value is not None:
        family.add_metric(list((labels or {}).values()), float(value))
    return family


class _ProcessMetrics:
    """The registry of one process, its text exposition and its endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.server: MetricsServer | None = None

    def render(self) -> bytes:
        """The registry in the Prometheus text format (what a scrape gets)."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1", key: str = "metrics.port") -> MetricsServer | None:
        """Start the endpoint (port 0: off); raises MetricsError naming `key`."""
        self.close()
        self.server = serve(self.registry, port, host, key)
        if self.server is not None:
            log.info("metrics_serving", url=self.server.url)
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class CoordinatorMetrics(_ProcessMetrics):
    """The coordinator's metrics. `version`, `buffered`, `workers`: read at scrape time; `last_eval`: the last
    central evaluation (`{"version", "accuracy", "loss"}` or None). Everything else is recorded by the calls
    below, once per event of the live run (never for updates replayed from the write-ahead log at resume:
    they were counted when they arrived)."""

    def __init__(self, version: Callable[[], int], buffered: Callable[[], int] = lambda: 0,
                 workers: Callable[[], int] = lambda: 0, last_eval: Callable[[], dict | None] = lambda: None) -> None:
        super().__init__()
        r = self.registry
        self._version, self._buffered, self._workers, self._last_eval = version, buffered, workers, last_eval
        self._accepted = Counter("mqfed_updates_accepted", "Updates accepted into the buffer (durable in the"
                                 " write-ahead log), by the sending worker node", ["node"], registry=r)
        self._applied = Counter("mqfed_updates_applied", "Updates applied to the model by a server step",
                                registry=r)
        self._rejected = Counter("mqfed_updates_rejected", "Updates refused by validation and dead-lettered, by"
                                 " reason (the aggregator's reasons, codec)", ["reason"], registry=r)
        self._dropped = Counter("mqfed_updates_dropped", "Updates acknowledged but not applied, by reason (stale,"
                                " answered, duplicate, step_refused)", ["reason"], registry=r)
        self._staleness = Histogram("mqfed_update_staleness", "Staleness (versions behind) of the updates each"
                                    " server step applied", buckets=STALENESS_BUCKETS, registry=r)
        self._ingest = Histogram("mqfed_update_ingest_seconds", "From an update's arrival (its message, or its"
                                 " last chunk, taken from the queue) to its write-ahead log record being durable",
                                 buckets=INGEST_BUCKETS, registry=r)
        self._wire = Counter("mqfed_updates_received_bytes", "Compressed bytes of the accepted updates", registry=r)
        self._raw = Counter("mqfed_updates_raw_bytes", "Uncompressed (float32) bytes the accepted updates stand"
                            " for", registry=r)
        self._fetched = Counter("mqfed_updates_fetched_bytes", "Model bytes the workers report they downloaded"
                                " for the accepted updates' tasks", registry=r)
        self._issued = Counter("mqfed_tasks_issued", "Train tasks published", registry=r)
        self._expired = Counter("mqfed_tasks_expired", "Train tasks not answered by their deadline (re-issued)",
                                registry=r)
        self._ckpt_time = Gauge("mqfed_checkpoint_last_timestamp_seconds", "Unix time the last checkpoint was"
                                " written", registry=r)
        self._ckpt_version = Gauge("mqfed_checkpoint_last_version", "Model version the last checkpoint holds",
                                   registry=r)
        self._dead_base: dict[str, int] = {}
        self._dead_stats = None
        self._lock = threading.Lock()
        r.register(_Callback(self._read))

    # -- recorded ----------------------------------------------------------------------------------------------
    def accepted(self, node: str, wire_bytes: int, raw_bytes: int, fetched_bytes: int, ingest_s: float) -> None:
        self._accepted.labels(node).inc()
        self._wire.inc(max(0, wire_bytes))
        self._raw.inc(max(0, raw_bytes))
        self._fetched.inc(max(0, fetched_bytes))
        self._ingest.observe(max(0.0, ingest_s))

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason).inc()

    def dropped(self, reason: str, count: int = 1) -> None:
        self._dropped.labels(reason).inc(count)

    def stepped(self, staleness: Iterable[int]) -> None:
        """A server step applied updates of these stalenesses."""
        for s in staleness:
            self._staleness.observe(s)
            self._applied.inc()

    def checkpoint_written(self, version: int) -> None:
        self._ckpt_time.set(time.time())
        self._ckpt_version.set(version)

    def tasks_issued(self, count: int = 1) -> None:
        self._issued.inc(count)

    def tasks_expired(self, count: int = 1) -> None:
        self._expired.inc(count)

    def track_consumer(self, stats) -> None:
        """Read dead letters from `stats` (a `ConsumerStats`: `rejected`, by error type) from now on; the last
        consumer's (a session ago) are kept, so the counter never goes back."""
        with self._lock:
            if self._dead_stats is not None:
                for error, n in dict(self._dead_stats.rejected).items():
                    self._dead_base[error] = self._dead_base.get(error, 0) + n
            self._dead_stats = stats

    # -- read at scrape time --------------------------------------------------------------------------------
    def _read(self) -> Iterable[Metric]:
        yield _gauge("mqfed_model_version", "The coordinator's model version", self._version())
        yield _gauge("mqfed_updates_buffered", "Accepted updates waiting in the buffer for the next server step",
                     self._buffered())
        yield _gauge("mqfed_workers_registered", "Worker nodes the coordinator knows (registered)", self._workers())
        last = self._last_eval()
        yield _gauge("mqfed_central_accuracy_ratio", "Accuracy of the last central evaluation (0-1)",
                     None if last is None else last["accuracy"])
        yield _gauge("mqfed_central_loss", "Loss of the last central evaluation",
                     None if last is None else last["loss"])
        yield _gauge("mqfed_central_eval_version", "Model version of the last central evaluation",
                     None if last is None else last["version"])
        with self._lock:
            dead = dict(self._dead_base)
            if self._dead_stats is not None:
                for error, n in dict(self._dead_stats.rejected).items():
                    dead[error] = dead.get(error, 0) + n
        family = CounterMetricFamily("mqfed_dead_letters", "Update-queue deliveries dead-lettered, by error type",
                                     labels=["error"])
        for error, n in sorted(dead.items()):
            family.add_metric([error], n)
        yield family


class WorkerMetrics(_ProcessMetrics):
    """One trainer's metrics (one process per device; every series labelled `node` and `device`).
    `model_version`: the version the trainer holds (None: none yet); `busy`: whether a task runs;
    `gpu_memory`: (allocated, reserved) bytes on its device, None on a CPU trainer (no series then)."""

    def __init__(self, node: str, device: str, model_version: Callable[[], int | None] = lambda: None,
                 busy: Callable[[], bool] = lambda: False,
                 gpu_memory: Callable[[], tuple[int, int]] | None = None) -> None:
        super().__init__()
        r, base = self.registry, ["node", "device"]
        self._who = {"node": node, "device": device}
        self._model_version, self._busy, self._gpu_memory = model_version, busy, gpu_memory
        self._done = Counter("mqfed_worker_tasks_done", "Tasks done (answered), by kind (train, evaluate)",
                             [*base, "kind"], registry=r)
        self._failed = Counter("mqfed_worker_tasks_failed", "Tasks not answered, by reason: expired,"
                               " expired_on_arrival, returned (a stop; requeued), not_a_task, or the error type"
                               " of a task that could not be run (dead-lettered)", [*base, "reason"], registry=r)
        self._rate = Gauge("mqfed_worker_training_samples_per_second", "Training throughput of the last train task",
                           base, registry=r)
        self._samples = Counter("mqfed_worker_training_samples", "Clips trained on (with repeats)", base, registry=r)
        self._seconds = Histogram("mqfed_worker_training_seconds", "Training time of each train task", base,
                                  buckets=TRAINING_BUCKETS, registry=r)
        self._published = Counter("mqfed_worker_published_bytes", "Compressed update bytes published", base,
                                  registry=r)
        self._fetched = Counter("mqfed_worker_fetched_bytes", "Model bytes downloaded from the model stream", base,
                                registry=r)
        # Zero-valued series from the start, so a scrape before the first task shows every family.
        self._rate.labels(node, device).set(0)
        for metric in (self._samples, self._published, self._fetched):
            metric.labels(node, device)
        self._seconds.labels(node, device)
        r.register(_Callback(self._read))

    def task_done(self, kind: str) -> None:
        self._done.labels(*self._who.values(), kind).inc()

    def task_failed(self, reason: str) -> None:
        self._failed.labels(*self._who.values(), reason).inc()

    def trained(self, samples: int, seconds: float) -> None:
        who = self._who.values()
        self._samples.labels(*who).inc(max(0, samples))
        self._seconds.labels(*who).observe(max(0.0, seconds))
        self._rate.labels(*who).set(samples / seconds if seconds > 0 else 0.0)

    def published(self, nbytes: int) -> None:
        self._published.labels(*self._who.values()).inc(max(0, nbytes))

    def fetched(self, nbytes: int) -> None:
        if nbytes > 0:
            self._fetched.labels(*self._who.values()).inc(nbytes)

    def _read(self) -> Iterable[Metric]:
        yield _gauge("mqfed_worker_model_version", "Model version the trainer holds (trains from)",
                     self._model_version(), self._who)
        yield _gauge("mqfed_worker_busy", "1 while the trainer runs a task", 1 if self._busy() else 0, self._who)
        memory = self._gpu_memory() if self._gpu_memory is not None else None
        yield _gauge("mqfed_worker_gpu_memory_allocated_bytes", "GPU memory held by tensors on the trainer's device"
                     " (CUDA trainers only)", None if memory is None else memory[0], self._who)
        yield _gauge("mqfed_worker_gpu_memory_reserved_bytes", "GPU memory reserved by torch's caching allocator on"
                     " the trainer's device (CUDA trainers only)", None if memory is None else memory[1], self._who)
