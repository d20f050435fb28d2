"""Transport throughput: mqfed's model broadcast and update ingest beside raw pika, at its best, on the same bytes.

    python tests/benchmarks/transport.py [--model-mb 256] [--readers 3] [--updates 8] [--update-mb 32] [--repeat 3]
    python tests/benchmarks/transport.py --sweep [--windows 1,4,16,64] [--prefetches 4,16,32]  # tune raw pika

Model broadcast. mqfed: one publisher appends a model of --model-mb to the model stream (`ModelStore.publish`:
chunked, sha256, 8 chunks unconfirmed at a time), then --readers processes fetch it at the same time
(`ModelStore.fetch`, prefetch 4: reassembly into their disk cache, verified). Raw pika at its best: the same bytes as the
same number of messages to a plain stream, published by pika's asynchronous adapter (`SelectConnection`, the
pattern of pika's asynchronous publisher example) with publisher confirms and up to --raw-window messages
unconfirmed, read by the same number of reader processes (`BlockingConnection`, prefetch --raw-prefetch) that
only count bytes; a second reading of that stream has raw readers that also write what they receive to a file,
as mqfed's readers must. MB/s = payload MB delivered to all readers / (publish + reads).

Update ingest: --updates updates of --update-mb (a delta of that many fp32 bytes, `codec=none`, so the wire
bytes are the update's size), each published as a worker publishes it (`publish_payload`: --chunk-mb chunks,
each confirmed, then the `Update` message), all of them, then consumed:
- "real coordinator path": consumed as the coordinator consumes them, by the coordinator's own pieces set up
  as `coordinator/server.py` sets them up (`MessageConsumer`, prefetch max(16, 2K + 8); a journaled
  `Reassembler` spooling every chunk to disk, fsynced, before it is acked), and per update what
  `Coordinator._apply` does before the ack: read the spooled payload, `codecs.decode` it (checked against the
  model's size), `Aggregator.add` (FedBuff, K = --buffer-size: a server step every K updates, on a model of
  the update's size) and `WriteAheadLog.append` (durable: payload linked in, mark fsynced). Left out: the
  admission checks before it (task signature, sender, duplicates: microseconds) and what each version costs
  after it (the model publication and the checkpoint, off the ingest thread and sized by the model, not by
  the update: tests/benchmarks/coordinator_overhead.py measures them at real size). This in-process setup
  rather than a coordinator process: it times exactly the per-update path, on updates of any size (a real
  coordinator accepts only updates of its model's shapes), without starting a coordinator (its model, its
  evaluation data, its first model publication) for every row.
- "transport only": into `MessageConsumer` (same prefetch) with an in-memory `Reassembler` and a handler
  that only acknowledges: what the broker I/O, reassembly and message decoding cost.
- raw pika at its best: the same payload bytes as the same number of messages to a plain quorum queue,
  published as above (window --raw-window), then consumed with prefetch --raw-prefetch and an ack each.
MB/s = update MB / (publish + consume); each run prints both phases of every row, and for the real path the
handler's seconds (read + decode, aggregate, log), so a reader sees where the time goes.

Raw pika at its best also gets the socket setting mqfed's connections have (1 MiB per socket read instead of
pika's 4 KiB, see common/transport/connection.py RECV_BYTES; frame_max is the broker's 128 KiB for both).
`--sweep` measures raw pika alone over confirm windows and prefetches, each candidate once per repeat, in turn;
the defaults (window 4, prefetch 16) are what it found best here: 1 MiB reads and prefetch 16 read faster than
stock, while windows of 1 to 64 published 8 MiB messages alike within the noise. The stock rows keep pika as it
comes: `BlockingConnection`, default parameters, one confirm waited for per message, prefetch 4.

Each row runs --repeat times, mqfed and raw interleaved (their order reversed every other run); the table
gives the median and the range (min-max) of the runs, and each ratio is the median (and range) of the per-run
ratios of paired runs, not a ratio of medians. A 2-core machine shared by the broker, the publisher and the
readers varies by +-20 % from run to run. Prints a table, then one JSON line {"broadcast_mb_s", "raw_mb_s",
"ratio", "ingest_mb_s", "ingest_ratio", "ingest_real_mb_s", "ingest_real_ratio", "raw_window", ...}: rates are
medians, `*_range` are [min, max]; `ingest_mb_s` / `ingest_ratio` are the transport-only row (as before),
`ingest_real_*` the real coordinator path. Every queue and stream it makes is deleted at the end.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pika
import pika.exceptions

from broker import topology
from common.logs import configure
from common.transport.connection import RECV_BYTES, close_quietly, connect, parameters
from common.transport.consumer import Delivery, MessageConsumer, Outcome
from common.transport.model_store import ModelStore, _close_without_reject
from common.transport.publish import publish_message, publish_payload
from common.wire import messages
from common.wire.chunks import DEFAULT_CHUNK_SIZE, Reassembler

MB = 1024 * 1024
PERSISTENT = pika.BasicProperties(delivery_mode=2)
# Chosen with --sweep here (2 cores, shared with other work): 1 MiB reads with prefetch 16 read 2-3x faster than
# stock pika from a quorum queue and 1.05-1.4x from a stream; confirm windows of 1 to 64 published 8 MiB messages
# alike within the run-to-run noise (stock pika too), 4 was never far from the best.
DEFAULT_WINDOW = 4
DEFAULT_PREFETCH = 16


# -- raw pika -------------------------------------------------------------------------------------------
def _large_reads(transport) -> None:
    """1 MiB per socket read, as common.transport.connection gives mqfed's connections."""
    if transport is not None and hasattr(transport, "_MAX_RECV_BYTES"):
        transport._MAX_RECV_BYTES = RECV_BYTES  # noqa: SLF001 - the same setting as mqfed's
        transport._MAX_CONSUME_BYTES = 4 * RECV_BYTES  # noqa: SLF001


def _blocking(device: str, tuned: bool) -> pika.BlockingConnection:
    """A raw pika BlockingConnection: stock (pika's defaults, 4 KiB reads) or tuned (1 MiB reads)."""
    conn = pika.BlockingConnection(parameters("bench", device=device))
    if tuned:
        _large_reads(getattr(conn._impl, "_transport", None))  # noqa: SLF001
    return conn


def _pieces(payload: bytes, chunk: int, times: int = 1) -> Iterator[bytes]:
    view = memoryview(payload)
    for _ in range(times):
        for start in range(0, len(payload), chunk):
            yield bytes(view[start:start + chunk])


class WindowedPublisher:
    """pika at its best publishing under confirms: the asynchronous adapter (`SelectConnection`), up to `window`
    messages unconfirmed, the next one sent as each confirm comes back, large socket reads. A nack, a returned
    (unroutable) message, a closed channel or connection, or `timeout_s` raise from `publish`."""

    def __init__(self, device: str, window: int, timeout_s: float = 300.0):
        self.window, self.timeout_s = window, timeout_s
        self._error: BaseException | None = None
        self._closing = False
        self._ch = None
        self._tag = 0
        self._unconfirmed: collections.deque[int] = collections.deque()
        self._bodies: Iterator[bytes] = iter(())
        self._queue = ""
        self._conn = pika.SelectConnection(parameters("bench", device=device), on_open_callback=self._on_open,
                                           on_open_error_callback=lambda _c, exc: self._stop(exc),
                                           on_close_callback=self._on_close)
        self._run()  # until the channel is in confirm mode

    def _run(self) -> None:
        self._conn.ioloop.start()
        if self._error is not None:
            raise self._error

    def _stop(self, error: BaseException | str | None = None) -> None:
        if error is not None and self._error is None:
            self._error = error if isinstance(error, BaseException) else RuntimeError(str(error))
        self._conn.ioloop.stop()

    def _on_open(self, conn) -> None:
        _large_reads(conn._transport)  # noqa: SLF001
        conn.channel(on_open_callback=self._on_channel)

    def _on_close(self, _conn, reason) -> None:
        self._stop(None if self._closing else reason)

    def _on_channel(self, ch) -> None:
        self._ch = ch
        ch.add_on_close_callback(lambda _ch, reason: None if self._closing else self._stop(reason))
        ch.add_on_return_callback(lambda *_: self._stop(pika.exceptions.UnroutableError([])))
        ch.confirm_delivery(self._on_confirm, callback=lambda _frame: self._stop())

    def _on_confirm(self, frame) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self._stop(pika.exceptions.NackError([]))
            return
        if method.multiple:
            while self._unconfirmed and self._unconfirmed[0] <= method.delivery_tag:
                self._unconfirmed.popleft()
        elif method.delivery_tag in self._unconfirmed:
            self._unconfirmed.remove(method.delivery_tag)
        self._pump()

    def _pump(self) -> None:
        while len(self._unconfirmed) < self.window:
            body = next(self._bodies, None)
            if body is None:
                if not self._unconfirmed:
                    self._stop()
                return
            self._ch.basic_publish("", self._queue, body, PERSISTENT, mandatory=True)
            self._tag += 1
            self._unconfirmed.append(self._tag)

    def publish(self, queue: str, bodies: Iterable[bytes]) -> float:
        """Publish `bodies` to `queue` (default exchange); returns the seconds until the last is confirmed."""
        self._queue, self._bodies = queue, iter(bodies)
        loop = self._conn.ioloop
        timer = loop.call_later(self.timeout_s, lambda: self._stop(TimeoutError(f"publish to {queue} took over"
                                                                                f" {self.timeout_s} s")))
        t0 = time.perf_counter()
        loop.add_callback_threadsafe(self._pump)
        self._run()
        elapsed = time.perf_counter() - t0
        loop.remove_timeout(timer)
        return elapsed

    def close(self) -> None:
        self._closing = True
        if self._conn.is_open:
            self._conn.close()
            self._conn.ioloop.start()  # until on_close stops it


def raw_publish(queue: str, bodies: Iterable[bytes], window: int | None, device: str) -> float:
    """Seconds to publish `bodies` to `queue` under confirms: window None = stock pika (BlockingConnection,
    each publish waits for its confirm), else `WindowedPublisher`. Connecting is not timed."""
    if window is None:
        conn = _blocking(device, tuned=False)
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            t0 = time.perf_counter()
            for body in bodies:
                ch.basic_publish("", queue, body, PERSISTENT, mandatory=True)
            return time.perf_counter() - t0
        finally:
            close_quietly(conn)
    pub = WindowedPublisher(device, window)
    try:
        return pub.publish(queue, bodies)
    finally:
        pub.close()


def raw_drain(queue: str, n_messages: int, tuned: bool, prefetch: int) -> float:
    """Seconds to consume and ack `n_messages` from the (classic or quorum) queue `queue`."""
    conn = _blocking("raw-ingest", tuned)
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=prefetch)
        t0 = time.perf_counter()
        for i, (method, _props, _body) in enumerate(ch.consume(queue, inactivity_timeout=60)):
            if method is None:
                raise RuntimeError(f"{queue}: nothing for 60 s after {i} of {n_messages} messages")
            ch.basic_ack(method.delivery_tag)
            if i + 1 == n_messages:
                break
        elapsed = time.perf_counter() - t0
        ch.cancel()
        return elapsed
    finally:
        close_quietly(conn)


def _fresh(queue: str, kind: str) -> None:
    """(Re)declare `queue` empty (a stream cannot be purged: deleted and declared again)."""
    conn = connect("bench", device="admin", attempts=3)
    try:
        ch = conn.channel()
        ch.queue_delete(queue)
        ch.queue_declare(queue, durable=True, arguments={"x-queue-type": kind})
    finally:
        conn.close()


def _delete(queues: Iterable[str], topos: Iterable[topology.Topology] = ()) -> None:
    """Delete `queues` and `topos` on a fresh connection (an old one may have missed its heartbeats)."""
    conn = connect("bench", device="cleanup", attempts=3)
    try:
        ch = conn.channel()
        for q in queues:
            ch.queue_delete(q)
        for topo in topos:
            topology.delete(ch, topo)
    finally:
        conn.close()


# -- reader processes -----------------------------------------------------------------------------------
def _fetch_reader(experiment: str, version: int, cache: str, barrier, out) -> None:
    configure(level="WARNING")
    conn = connect("bench", device="reader", attempts=3)
    store = ModelStore(conn.channel(), topology.Topology(experiment), cache_dir=cache)
    barrier.wait()
    try:
        out.put(store.fetch(version).announcement.size_bytes)
    except Exception as exc:  # report, so the parent does not wait forever
        out.put(repr(exc))
    conn.close()


def _raw_reader(queue: str, n_messages: int, write_dir: str | None, tuned: bool, prefetch: int, barrier,
                out) -> None:
    conn = _blocking("raw-reader", tuned)
    sink = tempfile.NamedTemporaryFile(dir=write_dir) if write_dir else None
    ch = conn.channel()
    ch.basic_qos(prefetch_count=prefetch)
    barrier.wait()
    total = 0
    for i, (method, _props, body) in enumerate(ch.consume(queue, arguments={"x-stream-offset": "first"})):
        total += len(body)
        if sink is not None:
            sink.write(body)
        ch.basic_ack(method.delivery_tag)
        if i + 1 == n_messages:
            break
    _close_without_reject(ch)
    if sink is not None:
        sink.close()
    out.put(total)
    conn.close()


def _run_readers(target, args_list) -> float:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(args_list) + 1), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, barrier, out)) for a in args_list]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    t0 = time.perf_counter()
    got = [out.get(timeout=300) for _ in procs]
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    if not all(g == got[0] and isinstance(g, int) for g in got):
        raise RuntimeError(f"readers failed: {got}")
    return elapsed


# -- statistics ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Series:
    """One row's per-run values."""

    values: list[float] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def range(self) -> list[float]:
        return [min(self.values), max(self.values)]

    def ratio(self, other: Series) -> Series:
        """Per-run ratios of paired runs."""
        return Series([a / b for a, b in zip(self.values, other.values)])


def _order(run: int, *steps: Callable[[], None]) -> None:
    """Run the steps in order on even runs, in reverse on odd ones (neither side always goes first)."""
    for step in (steps if run % 2 == 0 else reversed(steps)):
        step()


# -- model broadcast -------------------------------------------------------------------------------------
def bench_broadcast(payload: bytes, readers: int, chunk: int, repeat: int, window: int, prefetch: int,
                    stock: bool) -> dict[str, Series]:
    topo = topology.Topology(f"bench-{uuid.uuid4().hex[:8]}")
    raw_q, stock_q = f"{topo.prefix}.raw-stream", f"{topo.prefix}.stock-stream"
    total = len(payload) * readers / MB
    n = -(-len(payload) // chunk)
    rows = {k: Series() for k in ("mqfed", "raw", "raw_disk", "stock")}
    conn = connect("bench", device="admin", attempts=3)
    topology.declare(conn.channel(), topo)
    conn.close()
    try:
        for run in range(repeat):
            line: list[str] = []

            def mqfed(version=run + 1, line=line) -> None:
                conn = connect("bench", device="publisher", attempts=3)
                ch = conn.channel()
                ch.confirm_delivery()
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    ModelStore(ch, topo, cache_dir=tmp, chunk_size=chunk).publish(version, payload)
                    pub = time.perf_counter() - t0
                    read = _run_readers(_fetch_reader, [(topo.experiment, version, os.path.join(tmp, f"r{i}"))
                                                        for i in range(readers)])
                conn.close()
                rows["mqfed"].values.append(total / (pub + read))
                line.append(f"mqfed {pub:.2f}+{read:.2f}s")

            def raw(line=line) -> None:
                _fresh(raw_q, "stream")
                pub = raw_publish(raw_q, _pieces(payload, chunk), window, "raw-publisher")
                read = _run_readers(_raw_reader, [(raw_q, n, None, True, prefetch)] * readers)
                with tempfile.TemporaryDirectory() as tmp:
                    disk = _run_readers(_raw_reader, [(raw_q, n, tmp, True, prefetch)] * readers)
                rows["raw"].values.append(total / (pub + read))
                rows["raw_disk"].values.append(total / (pub + disk))
                line.append(f"raw {pub:.2f}+{read:.2f}s (writing to disk +{disk:.2f}s)")
                if stock:
                    _fresh(stock_q, "stream")
                    pub = raw_publish(stock_q, _pieces(payload, chunk), None, "stock-publisher")
                    read = _run_readers(_raw_reader, [(stock_q, n, None, False, 4)] * readers)
                    rows["stock"].values.append(total / (pub + read))
                    line.append(f"stock pika {pub:.2f}+{read:.2f}s")

            _order(run, mqfed, raw)
            print(f"  broadcast run {run + 1} (publish + {readers} readers): {' | '.join(line)}", flush=True)
        return rows
    finally:
        _delete([raw_q, stock_q], [topo])


# -- update ingest ---------------------------------------------------------------------------------------
class CoordinatorPath:
    """Per update, what `Coordinator._apply` (coordinator/server.py) does before the update's ack: read the
    spooled payload, decode it, buffer it in the aggregator (a server step every K), log it durably."""

    def __init__(self, state: dict, numel: int, wal_dir: Path, buffer_size: int):
        from coordinator.aggregator import Aggregator, AggregatorConfig
        from coordinator.server_optim import ServerOptimizerConfig
        from coordinator.wal import WriteAheadLog

        self.aggregator = Aggregator({k: t.clone() for k, t in state.items()},
                                     AggregatorConfig(buffer_size=buffer_size, max_staleness=None),
                                     ServerOptimizerConfig())
        self.wal = WriteAheadLog(wal_dir)
        self.numel = numel
        self.done = self.steps = 0
        self.seconds = {"read+decode": 0.0, "aggregate": 0.0, "log": 0.0}  # in the handler, summed over updates

    def __call__(self, delivery: Delivery) -> Outcome:
        from common.compression import codecs
        from coordinator.aggregator import ClientUpdate

        msg, payload = delivery.message, delivery.payload
        assert isinstance(msg, messages.Update) and payload is not None
        t0 = time.perf_counter()
        data = payload.read_bytes()
        delta = codecs.decode(data, expected_codec=msg.codec, max_elements=self.numel)
        elements = sum(math.prod(v.shape) for v in delta.values())
        if msg.raw_bytes != 4 * elements:
            raise RuntimeError(f"raw_bytes={msg.raw_bytes}, payload decodes to {elements} values")
        t1 = time.perf_counter()
        result = self.aggregator.add(ClientUpdate(msg.experiment, msg.task_id, msg.worker_id, msg.base_version,
                                                  msg.num_samples, delta))
        if result.status != "accepted":
            raise RuntimeError(f"the aggregator did not accept update {msg.task_id}: {result}")
        t2 = time.perf_counter()
        fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name != "payload"}
        self.wal.append(fields, payload)  # durable before the ack that follows
        t3 = time.perf_counter()
        for key, seconds in zip(self.seconds, (t1 - t0, t2 - t1, t3 - t2)):
            self.seconds[key] += seconds
        self.done += 1
        self.steps += result.record is not None
        return Outcome.ACK


def _update(numel: int) -> tuple[dict, bytes]:
    """A model of `numel` fp32 values (tensors of 1 Mi values) and one update of it, encoded with codec none."""
    import torch

    from common.compression import codecs

    gen = torch.Generator().manual_seed(0)
    sizes = [min(1 << 20, numel - start) for start in range(0, numel, 1 << 20)]
    state = {f"layer{i}.weight": torch.randn(s, generator=gen) for i, s in enumerate(sizes)}
    delta = {k: torch.randn(t.shape, generator=gen) * 1e-3 for k, t in state.items()}
    return state, codecs.encode(delta, "none").data


def bench_ingest(update_mb: float, updates: int, chunk: int, repeat: int, window: int, prefetch: int,
                 buffer_size: int, stock: bool) -> dict[str, Series]:
    numel = int(update_mb * MB) // 4
    state, payload = _update(numel)
    topo = topology.Topology(f"bench-{uuid.uuid4().hex[:8]}")
    raw_q, stock_q = f"{topo.prefix}.raw-updates", f"{topo.prefix}.stock-updates"
    total = len(payload) * updates / MB
    n = updates * -(-len(payload) // chunk)
    consumer_prefetch = max(16, 2 * buffer_size + 8)  # as coordinator/server.py
    rows = {k: Series() for k in ("real", "transport", "raw", "stock")}
    conn = connect("bench", device="admin", attempts=3)
    topology.declare(conn.channel(), topo)
    conn.close()
    for q in (raw_q, stock_q):
        _fresh(q, "quorum")
    try:
        for run in range(repeat):
            line: list[str] = []

            def mqfed(real: bool, run=run, line=line) -> None:
                conn = connect("bench", device="ingest", attempts=3)
                ch = conn.channel()
                ch.confirm_delivery()
                with tempfile.TemporaryDirectory() as tmp:
                    if real:
                        handler = CoordinatorPath(state, numel, Path(tmp) / "wal", buffer_size)
                        reasm = Reassembler(spill_threshold=0, spool_dir=tmp, timeout_s=120.0, journaled=True)
                    else:
                        handler = _Counter()
                        reasm = Reassembler(spill_threshold=64 * MB, spool_dir=tmp, fsync=False)
                    t0 = time.perf_counter()
                    for i in range(updates):  # as a worker publishes an update (worker/daemon.py)
                        ref = publish_payload(ch, topo.update_exchange, topo.UPDATES_KEY, payload,
                                              inline_max_bytes=MB, chunk_bytes=chunk)
                        publish_message(ch, topo.update_exchange, topo.UPDATES_KEY, messages.Update(
                            topo.experiment, f"r{run}-{'real' if real else 'tr'}-t{i}", "bench/cpu", 0, 1, {},
                            "none", 4 * numel, len(payload), ref))
                    pub = time.perf_counter() - t0
                    cch = conn.channel()
                    consumer = MessageConsumer(cch, topo.updates, handler, prefetch=consumer_prefetch,
                                               reassembler=reasm)
                    deadline = time.monotonic() + 300
                    consumer.run(conn, until=lambda: handler.done == updates or time.monotonic() > deadline,
                                 tick_s=0.2)
                    elapsed = time.perf_counter() - t0
                    if handler.done != updates or consumer.stats.dead_lettered:
                        raise RuntimeError(f"ingest got {handler.done} of {updates} updates, stats"
                                           f" {consumer.stats}")
                    cch.close()
                conn.close()
                rows["real" if real else "transport"].values.append(total / elapsed)
                line.append(f"mqfed {'real path' if real else 'transport only'} {pub:.2f}+{elapsed - pub:.2f}s")
                if real:  # the handler's share of the consume phase
                    line[-1] += " (" + ", ".join(f"{k} {v:.2f}" for k, v in handler.seconds.items()) + ")"

            def raw(line=line) -> None:
                pub = raw_publish(raw_q, _pieces(payload, chunk, updates), window, "raw-publisher")
                drain = raw_drain(raw_q, n, True, prefetch)
                rows["raw"].values.append(total / (pub + drain))
                line.append(f"raw {pub:.2f}+{drain:.2f}s")
                if stock:
                    pub = raw_publish(stock_q, _pieces(payload, chunk, updates), None, "stock-publisher")
                    drain = raw_drain(stock_q, n, False, 4)
                    rows["stock"].values.append(total / (pub + drain))
                    line.append(f"stock pika {pub:.2f}+{drain:.2f}s")

            _order(run, lambda: mqfed(True), lambda: mqfed(False), raw)
            print(f"  ingest run {run + 1} (publish + consume): {' | '.join(line)}", flush=True)
        return rows
    finally:
        _delete([raw_q, stock_q], [topo])


class _Counter:
    """The transport-only handler: acknowledge, count."""

    done = 0

    def __call__(self, delivery: Delivery) -> Outcome:
        self.done += 1
        return Outcome.ACK


# -- tuning raw pika -------------------------------------------------------------------------------------
def sweep(model: bytes, update: bytes, updates: int, readers: int, chunk: int, repeat: int,
          windows: list[int], prefetches: list[int]) -> dict:
    """Raw pika alone: publish MB/s per confirm window (stock: one confirm waited for per message) to a stream
    and to a quorum queue; read MB/s per prefetch (3 stream readers; one quorum consumer)."""
    prefix = f"mqfed.bench-{uuid.uuid4().hex[:8]}"
    stream_q, quorum_q = f"{prefix}.sweep-stream", f"{prefix}.sweep-quorum"
    n_model, n_update = -(-len(model) // chunk), updates * -(-len(update) // chunk)
    model_mb, update_mb = len(model) / MB, len(update) * updates / MB
    out: dict = {"publish_stream": {}, "publish_quorum": {}, "read_stream": {}, "read_quorum": {}}

    def med(xs):
        return round(statistics.median(xs), 1)

    try:
        _fresh(quorum_q, "quorum")
        pub: dict = {w: ([], []) for w in [None, *windows]}
        for _ in range(repeat):  # candidates interleaved within each repeat: a change in load hits them all
            for w, (s, q) in pub.items():
                _fresh(stream_q, "stream")
                s.append(model_mb / raw_publish(stream_q, _pieces(model, chunk), w, "sweep"))
                q.append(update_mb / raw_publish(quorum_q, _pieces(update, chunk, updates), w, "sweep"))
                raw_drain(quorum_q, n_update, True, DEFAULT_PREFETCH)
        for w, (s, q) in pub.items():
            out["publish_stream"][w or "stock"], out["publish_quorum"][w or "stock"] = med(s), med(q)
            print(f"  publish, window {w or 'stock'}: stream {med(s)} MB/s {_span(s)}, quorum {med(q)} MB/s"
                  f" {_span(q)}", flush=True)
        _fresh(stream_q, "stream")
        raw_publish(stream_q, _pieces(model, chunk), max(windows), "sweep")
        read: dict = {p: ([], []) for p in [None, *prefetches]}
        for _ in range(repeat):
            for p, (s, q) in read.items():
                tuned, pf = (False, 4) if p is None else (True, p)
                s.append(model_mb * readers / _run_readers(_raw_reader, [(stream_q, n_model, None, tuned, pf)] * readers))
                raw_publish(quorum_q, _pieces(update, chunk, updates), max(windows), "sweep")
                q.append(update_mb / raw_drain(quorum_q, n_update, tuned, pf))
        for p, (s, q) in read.items():
            label = "stock (4 KiB reads, prefetch 4)" if p is None else f"prefetch {p}"
            out["read_stream"][p or "stock"], out["read_quorum"][p or "stock"] = med(s), med(q)
            print(f"  read, {label}: {readers} stream readers {med(s)} MB/s {_span(s)}, quorum consumer {med(q)}"
                  f" MB/s {_span(q)}", flush=True)
        return out
    finally:
        _delete([stream_q, quorum_q])


def _span(xs: list[float]) -> str:
    return f"({min(xs):.0f}-{max(xs):.0f})"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-mb", type=int, default=256)
    p.add_argument("--readers", type=int, default=3)
    p.add_argument("--updates", type=int, default=8)
    p.add_argument("--update-mb", type=float, default=32)
    p.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_SIZE / MB)
    p.add_argument("--buffer-size", type=int, default=2, help="K of the aggregator on the real ingest path")
    p.add_argument("--repeat", type=int, default=3, help="runs per row; the median and the range are reported")
    p.add_argument("--raw-window", type=int, default=DEFAULT_WINDOW, help="raw pika: messages unconfirmed")
    p.add_argument("--raw-prefetch", type=int, default=DEFAULT_PREFETCH, help="raw pika: consumer prefetch")
    p.add_argument("--no-stock", action="store_true", help="skip the stock pika rows")
    p.add_argument("--sweep", action="store_true", help="only measure raw pika's windows and prefetches")
    p.add_argument("--windows", type=_ints, default=[1, 4, 16, 64])
    p.add_argument("--prefetches", type=_ints, default=[4, 16, 32])
    args = p.parse_args()
    if min(args.repeat, args.readers, args.updates, args.raw_window, args.raw_prefetch) < 1:
        p.error("--repeat, --readers, --updates, --raw-window and --raw-prefetch must be >= 1")
    configure(level="WARNING")
    chunk = int(args.chunk_mb * MB)
    model = os.urandom(args.model_mb * MB)
    if args.sweep:
        _, update = _update(int(args.update_mb * MB) // 4)
        print(json.dumps(sweep(model, update, args.updates, args.readers, chunk, args.repeat, args.windows,
                               args.prefetches)))
        return
    stock = not args.no_stock
    b = bench_broadcast(model, args.readers, chunk, args.repeat, args.raw_window, args.raw_prefetch, stock)
    u = bench_ingest(args.update_mb, args.updates, chunk, args.repeat, args.raw_window, args.raw_prefetch,
                     args.buffer_size, stock)
    best = f"raw pika, window {args.raw_window}, prefetch {args.raw_prefetch}"
    stock_name = "stock pika (BlockingConnection defaults)"
    rates = [("model broadcast: mqfed", b["mqfed"]), (f"  {best}", b["raw"]),
             ("  raw pika as above, readers writing to disk", b["raw_disk"]), (f"  {stock_name}", b["stock"]),
             ("update ingest: mqfed, real coordinator path", u["real"]),
             ("  mqfed, transport only (MessageConsumer)", u["transport"]), (f"  {best}", u["raw"]),
             (f"  {stock_name}", u["stock"])]
    ratio, disk_ratio = b["mqfed"].ratio(b["raw"]), b["mqfed"].ratio(b["raw_disk"])
    real_ratio, tr = u["real"].ratio(u["raw"]), u["transport"].ratio(u["raw"])
    ratios = [("broadcast: mqfed / raw pika at its best", ratio),
              ("broadcast: mqfed / raw pika readers writing to disk", disk_ratio),
              ("ingest: mqfed real path / raw pika at its best", real_ratio),
              ("ingest: mqfed transport only / raw pika at its best", tr)]
    if stock:
        ratios += [("broadcast: raw pika at its best / stock pika", b["raw"].ratio(b["stock"])),
                   ("ingest: raw pika at its best / stock pika", u["raw"].ratio(u["stock"]))]
    width = max(len(name) for name, _ in rates + ratios)
    print(f"\n{args.repeat} runs each; MB/s: median (min-max)")
    for name, series in rates:
        if series.values:
            print(f"{name:<{width}}  {series.median:8.1f}  ({series.range[0]:.1f}-{series.range[1]:.1f})")
    print("ratios: median of the paired runs' ratios (min-max)")
    for name, series in ratios:
        print(f"{name:<{width}}  {series.median:8.2f}  ({series.range[0]:.2f}-{series.range[1]:.2f})")

    def r(x: float, nd: int = 1) -> float:
        return round(x, nd)

    out = {"broadcast_mb_s": r(b["mqfed"].median), "raw_mb_s": r(b["raw"].median), "ratio": r(ratio.median, 3),
           "raw_disk_mb_s": r(b["raw_disk"].median), "ratio_vs_raw_disk": r(disk_ratio.median, 3),
           "ingest_mb_s": r(u["transport"].median), "ingest_raw_mb_s": r(u["raw"].median),
           "ingest_ratio": r(tr.median, 3), "ingest_real_mb_s": r(u["real"].median),
           "ingest_real_ratio": r(real_ratio.median, 3),
           "ratio_range": [r(x, 3) for x in ratio.range], "ratio_vs_raw_disk_range": [r(x, 3) for x in disk_ratio.range],
           "ingest_ratio_range": [r(x, 3) for x in tr.range],
           "ingest_real_ratio_range": [r(x, 3) for x in real_ratio.range],
           "broadcast_mb_s_range": [r(x) for x in b["mqfed"].range], "raw_mb_s_range": [r(x) for x in b["raw"].range],
           "ingest_real_mb_s_range": [r(x) for x in u["real"].range],
           "ingest_raw_mb_s_range": [r(x) for x in u["raw"].range],
           "raw_window": args.raw_window, "raw_prefetch": args.raw_prefetch, "repeat": args.repeat}
    if stock:
        out.update({"raw_stock_mb_s": r(b["stock"].median), "ingest_raw_stock_mb_s": r(u["stock"].median)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
