"""Wire messages, chunked transfers and dead-lettering against a real RabbitMQ."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pika
import pytest

from common.learning.config import TrainConfig
from common.transport.consumer import MessageConsumer, Outcome
from common.transport.publish import publish_message
from common.wire import messages as m
from common.wire.chunks import Reassembler, publish_chunked

pytestmark = pytest.mark.integration

EXAMPLES = [
    m.TrainTask("exp", "run-1", "t1", 3, 1700000000.0, "topk-0.01", "kws-tiny", False,
                TrainConfig(steps=50, batch_size=16, learning_rate=1e-4, seed=1)),
    m.EvaluateTask("exp", "e1", 4, "test", 1700000000.0),
    m.Update("exp", "t1", "node-a:cuda:0", 3, 128, {"loss": 0.5}, "fp32", 400, 2, m.PayloadRef(inline=b"\x00\x01")),
    m.ModelVersion("exp", 7, 1234, 48, 380_000_000, "ab" * 32, "tid", 1700000000.5),
    m.Registration("exp", "node-a", ["cuda:0", "cuda:1"], "dirichlet(0.3) 2/8", 5120),
    m.Heartbeat("exp", "node-a", "cuda:0", 1700000000.0, "training"),
    m.Metrics("exp", "coordinator", 7, {"accuracy": 0.91}, 1700000000.0),
]


def _drain(connection, consumer, until, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        consumer.poll(connection, 0.2)
    assert until(), "timed out waiting for deliveries"


def test_every_message_type_round_trips_through_the_broker(connection, topo):
    ch = connection.channel()
    ch.confirm_delivery()
    for msg in EXAMPLES:
        publish_message(ch, topo.task_exchange, topo.TASKS_KEY, msg)
    got = []
    consumer = MessageConsumer(ch, topo.tasks, lambda d: got.append(d.message) or Outcome.ACK)
    _drain(connection, consumer, lambda: len(got) == len(EXAMPLES))
    assert got == EXAMPLES


def test_update_with_chunked_payload_reaches_the_handler(connection, topo):
    ch = connection.channel()
    ch.confirm_delivery()
    payload = os.urandom(3 * 1024 * 1024 + 17)

    def send(body, headers):
        ch.basic_publish(topo.update_exchange, topo.UPDATES_KEY, bytes(body),
                         pika.BasicProperties(headers=headers, delivery_mode=2), mandatory=True)

    info = publish_chunked(send, payload, chunk_size=1024 * 1024)
    upd = m.Update(topo.experiment, "t9", "w1", 0, 10, {}, "fp32", len(payload), len(payload),
                   m.PayloadRef(transfer_id=info.transfer_id))
    publish_message(ch, topo.update_exchange, topo.UPDATES_KEY, upd)
    got = []
    consumer = MessageConsumer(ch, topo.updates, lambda d: got.append((d.message, d.payload.read_bytes())) or Outcome.ACK,
                               reassembler=Reassembler())
    _drain(connection, consumer, lambda: bool(got))
    assert got[0][0] == upd and got[0][1] == payload and consumer.stats.chunks == 4


def _dead_letters(connection, topo, n, timeout=20.0):
    ch = connection.channel()
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        method, props, body = ch.basic_get(topo.dead_letters, auto_ack=True)
        if method is None:
            time.sleep(0.1)
            continue
        out.append((props, body))
    return out


def test_malformed_and_unknown_version_go_to_dlq_and_consumer_keeps_running(connection, topo, capsys):
    ch = connection.channel()
    ch.confirm_delivery()
    import msgpack

    bad_version = msgpack.packb({"t": "heartbeat", "v": 999, "experiment": "e", "node": "n", "device": "d",
                                 "sent_unix": 1.0})
    for body in (b"\xc1not msgpack", bad_version):
        ch.basic_publish(topo.task_exchange, topo.TASKS_KEY, body, pika.BasicProperties(delivery_mode=2))
    good = EXAMPLES[5]
    publish_message(ch, topo.task_exchange, topo.TASKS_KEY, good)
    got = []
    consumer = MessageConsumer(ch, topo.tasks, lambda d: got.append(d.message) or Outcome.ACK)
    _drain(connection, consumer, lambda: bool(got))
    assert got == [good] and consumer.stats.dead_lettered == 2
    dead = _dead_letters(connection, topo, 2)
    assert [b for _, b in dead] == [b"\xc1not msgpack", bad_version]
    assert dead[0][0].headers["x-death"][0]["reason"] == "rejected"
    err = capsys.readouterr()
    log = err.err + err.out
    assert "MalformedMessage" in log and "UnsupportedSchemaVersion" in log and "message_dead_lettered" in log


def _publish_chunks(ch, topo, payload, chunk_size, mutate=None):
    msgs = []
    info = publish_chunked(lambda b, h: msgs.append((bytes(b), h)), payload, chunk_size=chunk_size)
    if mutate:
        msgs = mutate(msgs)
    for body, h in msgs:
        ch.basic_publish(topo.update_exchange, topo.UPDATES_KEY, body,
                         pika.BasicProperties(headers=h, delivery_mode=2), mandatory=True)
    return info


def test_corrupted_chunk_is_detected_and_dead_lettered(connection, topo, capsys):
    ch = connection.channel()
    ch.confirm_delivery()

    def corrupt(msgs):
        body, h = msgs[1]
        return [msgs[0], (bytes([body[0] ^ 0xFF]) + body[1:], h), *msgs[2:]]

    info = _publish_chunks(ch, topo, os.urandom(4096), 1024, corrupt)
    consumer = MessageConsumer(ch, topo.updates, lambda d: Outcome.ACK, reassembler=Reassembler(fsync=False))
    _drain(connection, consumer, lambda: consumer.stats.chunks == 4)
    assert consumer.payloads == {}
    log = "".join(capsys.readouterr())
    assert f"transfer {info.transfer_id}: chunk 1 is corrupt" in log
    assert consumer.stats.dead_lettered >= 2  # chunk 0 (held) and the corrupt chunk 1


def test_missing_chunk_is_detected_after_timeout(connection, topo, capsys):
    ch = connection.channel()
    ch.confirm_delivery()
    info = _publish_chunks(ch, topo, os.urandom(4096), 1024, lambda msgs: msgs[:2] + msgs[3:])
    consumer = MessageConsumer(ch, topo.updates, lambda d: Outcome.ACK,
                               reassembler=Reassembler(timeout_s=1.0, fsync=False))
    _drain(connection, consumer, lambda: consumer.stats.dead_lettered == 3)
    log = "".join(capsys.readouterr())
    assert f"transfer {info.transfer_id}: 1 of 4 chunks missing" in log and "missing=[2]" in log


RECEIVER = r"""
import resource, sys, tracemalloc, time
from common.transport.connection import connect
from common.wire.chunks import Reassembler
queue, prefetch, spool = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = connect("test", device="receiver", attempts=3)
ch = conn.channel()
ch.basic_qos(prefetch_count=prefetch)
r = Reassembler(spill_threshold=0, spool_dir=spool, fsync=False)
rss0 = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()  # current RSS
tracemalloc.start()
t0 = time.monotonic()
done = None
for method, props, body in ch.consume(queue):
    res = r.add(props.headers, body, method.delivery_tag)
    del body
    for t in res.ack:
        ch.basic_ack(t)
    if res.complete:
        done = res.complete
        break
ch.cancel()
peak = tracemalloc.get_traced_memory()[1]
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the pre-exec (forked parent) image
hwm_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
rss = hwm_kib * 1024 - rss0
print(done.path, done.size, done.sha256, peak, time.monotonic() - t0, rss)
"""


def test_400mb_payload_arrives_byte_exact_with_bounded_receiver_memory(connection, topo, tmp_path):
    """Receiver runs in its own process. Both its Python heap peak (tracemalloc: pika's frame buffers and
    message bodies) and its peak RSS growth (VmHWM at the end minus RSS before consuming; Linux) must stay under
    1.5 x its chunk window (prefetch x chunk size = 32 MiB)."""
    chunk, prefetch, total = 8 * 1024 * 1024, 4, 400 * 1024 * 1024
    window = chunk * prefetch
    src = tmp_path / "payload.bin"
    with open(src, "wb") as f:
        block = os.urandom(1024 * 1024)
        for i in range(total // len(block)):
            f.write(block[i % 7:] + block[: i % 7])  # cheap but position-dependent content
    ch = connection.channel()
    ch.confirm_delivery()

    def send(body, headers):
        ch.basic_publish(topo.update_exchange, topo.UPDATES_KEY, bytes(body),
                         pika.BasicProperties(headers=headers, delivery_mode=2), mandatory=True)

    info = publish_chunked(send, str(src), chunk_size=chunk)
    assert info.num_chunks == 50
    out = subprocess.run([sys.executable, "-c", RECEIVER, topo.updates, str(prefetch), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    path, size, digest, peak, secs, rss_growth = out.stdout.split()
    assert int(size) == total and digest == info.sha256
    with open(path, "rb") as a, open(src, "rb") as b:
        while (x := a.read(1 << 24)):
            assert x == b.read(1 << 24)
    print(f"receiver peak traced memory {int(peak) / 2**20:.1f} MiB, peak RSS growth {int(rss_growth) / 2**20:.1f} MiB,"
          f" window {window / 2**20:.0f} MiB, {float(secs):.1f}s")
    assert int(peak) < 1.5 * window
    assert int(rss_growth) < 1.5 * window
