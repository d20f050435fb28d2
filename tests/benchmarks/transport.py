"""Transport throughput: mqfed's model broadcast and update ingest beside raw pika on the same bytes.

    python tests/benchmarks/transport.py [--model-mb 256] [--readers 3] [--updates 8] [--update-mb 32] [--repeat 3]

Model broadcast: one publisher appends a model of --model-mb to the model stream (chunked, sha256, confirms),
then --readers processes fetch it at the same time (reassembly to their disk cache, verified). Raw: the same
bytes as the same number of messages published with confirms to a plain stream and consumed by the same
number of reader processes that only count bytes. MB/s = payload MB delivered to all readers / wall time
(publish + reads). Update ingest: --updates chunked updates through the updates queue into
common.transport.consumer.MessageConsumer, against raw publish + consume of the same messages on a quorum queue.
A third broadcast row has raw readers that also write what they receive to a file, as mqfed's readers
must (disk cache). The raw rows use stock pika connections (`pika.BlockingConnection`, pika's defaults);
mqfed's use `common.transport.connection.connect` (larger socket reads, see common/transport/connection.py). Each row is the best of
--repeat runs, mqfed and raw interleaved (a 2-core machine shared by the broker, the publisher and the
readers varies by +-20 % from run to run). Prints a table, then one JSON line
{"broadcast_mb_s", "raw_mb_s", "ratio", ...}.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
import uuid

import pika

from broker import topology
from common.logs import configure
from common.transport.connection import connect, parameters
from common.transport.consumer import MessageConsumer, Outcome
from common.transport.model_store import ModelStore, _close_without_reject
from common.transport.publish import publish_message
from common.wire import messages
from common.wire.chunks import DEFAULT_CHUNK_SIZE, Reassembler, publish_chunked

MB = 1024 * 1024


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


def _raw_connection(device: str) -> pika.BlockingConnection:
    """A stock pika connection (pika's own read sizes), for the raw baseline."""
    return pika.BlockingConnection(parameters("bench", device=device))


def _raw_reader(queue: str, n_messages: int, write_dir: str | None, barrier, out) -> None:
    conn = _raw_connection("raw-reader")
    sink = tempfile.NamedTemporaryFile(dir=write_dir) if write_dir else None
    ch = conn.channel()
    ch.basic_qos(prefetch_count=4)
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
    barrier.wait()
    t0 = time.perf_counter()
    got = [out.get(timeout=300) for _ in procs]
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    if not all(g == got[0] and isinstance(g, int) for g in got):
        raise RuntimeError(f"readers failed: {got}")
    return elapsed


def bench_broadcast(payload: bytes, readers: int, chunk: int, repeat: int) -> tuple[float, float, float]:
    topo = topology.Topology(f"bench-{uuid.uuid4().hex[:8]}")
    conn = connect("bench", device="publisher", attempts=3)
    ch = conn.channel()
    topology.declare(ch, topo)
    ch.confirm_delivery()
    raw_conn = _raw_connection("raw-publisher")
    raw_ch = raw_conn.channel()
    raw_ch.confirm_delivery()
    raw_q = f"{topo.prefix}.raw-stream"  # declared afresh in each run below
    total = len(payload) * readers / MB
    ours = raw = raw_disk = 0.0
    try:
        for version in range(1, repeat + 1):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                ModelStore(ch, topo, cache_dir=tmp, chunk_size=chunk).publish(version, payload)
                pub = time.perf_counter() - t0
                read = _run_readers(_fetch_reader, [(topo.experiment, version, os.path.join(tmp, f"r{i}"))
                                                    for i in range(readers)])
            ours = max(ours, total / (pub + read))
            ch.queue_delete(raw_q)  # a stream cannot be purged: a fresh one per run
            ch.queue_declare(raw_q, durable=True, arguments={"x-queue-type": "stream"})
            t0 = time.perf_counter()
            view = memoryview(payload)
            n = 0
            for start in range(0, len(payload), chunk):
                raw_ch.basic_publish("", raw_q, bytes(view[start:start + chunk]), pika.BasicProperties(delivery_mode=2))
                n += 1
            raw_pub = time.perf_counter() - t0
            raw_read = _run_readers(_raw_reader, [(raw_q, n, None)] * readers)
            raw = max(raw, total / (raw_pub + raw_read))
            with tempfile.TemporaryDirectory() as tmp:
                disk_read = _run_readers(_raw_reader, [(raw_q, n, tmp)] * readers)
            raw_disk = max(raw_disk, total / (raw_pub + disk_read))
            print(f"  broadcast run {version}: mqfed publish {pub:.2f}s + {readers} readers {read:.2f}s"
                  f" | raw: publish {raw_pub:.2f}s + readers {raw_read:.2f}s (readers writing to disk: {disk_read:.2f}s)")
        return ours, raw, raw_disk
    finally:
        raw_conn.close()
        ch = conn.channel()
        ch.queue_delete(raw_q)
        topology.delete(ch, topo)
        conn.close()


def bench_ingest(payload: bytes, updates: int, chunk: int, repeat: int) -> tuple[float, float]:
    topo = topology.Topology(f"bench-{uuid.uuid4().hex[:8]}")
    conn = connect("bench", device="ingest", attempts=3)
    ch = conn.channel()
    topology.declare(ch, topo)
    ch.confirm_delivery()
    raw_conn = _raw_connection("raw-ingest")
    raw_ch = raw_conn.channel()
    raw_ch.confirm_delivery()
    raw_q = f"{topo.prefix}.raw-updates"
    ch.queue_declare(raw_q, durable=True, arguments={"x-queue-type": "quorum"})
    total = len(payload) * updates / MB
    ours = raw = 0.0

    def send(body, headers):
        ch.basic_publish(topo.update_exchange, topo.UPDATES_KEY, bytes(body),
                         pika.BasicProperties(headers=headers, delivery_mode=2), mandatory=True)

    try:
        for run in range(repeat):
            t0 = time.perf_counter()
            for i in range(updates):
                info = publish_chunked(send, payload, chunk_size=chunk)
                publish_message(ch, topo.update_exchange, topo.UPDATES_KEY, messages.Update(
                    topo.experiment, f"r{run}-t{i}", "bench", 0, 1, {}, "fp32", len(payload), len(payload),
                    messages.PayloadRef(transfer_id=info.transfer_id)))
            got = []
            with tempfile.TemporaryDirectory() as tmp:
                cch = conn.channel()
                consumer = MessageConsumer(cch, topo.updates, lambda d: got.append(d.payload.size) or Outcome.ACK, prefetch=4,
                                           reassembler=Reassembler(spill_threshold=64 * MB, spool_dir=tmp, fsync=False))
                consumer.run(conn, until=lambda: len(got) == updates, tick_s=0.2)
                cch.close()
            ours_s = time.perf_counter() - t0
            ours = max(ours, total / ours_s)

            t0 = time.perf_counter()
            view = memoryview(payload)
            n = 0
            for _ in range(updates):
                for start in range(0, len(payload), chunk):
                    raw_ch.basic_publish("", raw_q, bytes(view[start:start + chunk]),
                                         pika.BasicProperties(delivery_mode=2))
                    n += 1
            rch = raw_conn.channel()
            rch.basic_qos(prefetch_count=4)
            for i, (method, _p, _b) in enumerate(rch.consume(raw_q)):
                rch.basic_ack(method.delivery_tag)
                if i + 1 == n:
                    break
            rch.cancel()
            rch.close()
            raw_s = time.perf_counter() - t0
            raw = max(raw, total / raw_s)
            print(f"  ingest run {run + 1}: mqfed {ours_s:.2f}s | raw {raw_s:.2f}s")
        return ours, raw
    finally:
        raw_conn.close()
        ch = conn.channel()
        ch.queue_delete(raw_q)
        topology.delete(ch, topo)
        conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-mb", type=int, default=256)
    p.add_argument("--readers", type=int, default=3)
    p.add_argument("--updates", type=int, default=8)
    p.add_argument("--update-mb", type=int, default=32)
    p.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_SIZE / MB)
    p.add_argument("--repeat", type=int, default=3, help="runs per row; the best is reported")
    args = p.parse_args()
    configure(level="WARNING")
    chunk = int(args.chunk_mb * MB)
    model = os.urandom(args.model_mb * MB)
    b_ours, b_raw, b_raw_disk = bench_broadcast(model, args.readers, chunk, args.repeat)
    u_ours, u_raw = bench_ingest(os.urandom(args.update_mb * MB), args.updates, chunk, args.repeat)
    print(f"{'path':<22}{'mqfed MB/s':>12}{'raw pika MB/s':>15}{'ratio':>8}")
    print(f"{'model broadcast':<22}{b_ours:>12.1f}{b_raw:>15.1f}{b_ours / b_raw:>8.2f}")
    print(f"{'  raw + disk write':<22}{'':>12}{b_raw_disk:>15.1f}{b_ours / b_raw_disk:>8.2f}")
    print(f"{'update ingest':<22}{u_ours:>12.1f}{u_raw:>15.1f}{u_ours / u_raw:>8.2f}")
    print(json.dumps({"broadcast_mb_s": round(b_ours, 1), "raw_mb_s": round(b_raw, 1), "ratio": round(b_ours / b_raw, 3),
                      "raw_disk_mb_s": round(b_raw_disk, 1), "ratio_vs_raw_disk": round(b_ours / b_raw_disk, 3),
                      "ingest_mb_s": round(u_ours, 1), "ingest_raw_mb_s": round(u_raw, 1),
                      "ingest_ratio": round(u_ours / u_raw, 3)}))


if __name__ == "__main__":
    main()
