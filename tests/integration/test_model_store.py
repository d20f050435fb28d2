"""Model versions through the real model stream: fetch without reading older versions, disk cache."""
from __future__ import annotations

import hashlib
import time

import pika
import pytest

from common.transport.model_store import H_VERSION, ModelNotFound, ModelStore
from common.wire import messages
from common.wire.chunks import publish_chunked

pytestmark = pytest.mark.integration


def _payload(v: int) -> bytes:
    return hashlib.sha256(str(v).encode()).digest() * (4096 * (v + 1))  # 128 KiB * (v+1)


def test_fetching_version_10_reads_only_its_chunks(connection, topo, tmp_path):
    ch = connection.channel()
    ch.confirm_delivery()
    store = ModelStore(ch, topo, cache_dir=tmp_path / "pub", chunk_size=64 * 1024)
    anns = [store.publish(v, _payload(v)) for v in range(1, 11)]
    assert anns[-1].stream_offset >= 10 + sum(a.num_chunks for a in anns[:-1])  # 10 probes before

    reader = ModelStore(connection.channel(), topo, cache_dir=tmp_path / "worker", chunk_size=64 * 1024)
    res = reader.fetch(10)
    assert res.path.read_bytes() == _payload(10) and not res.from_cache
    assert res.chunks_read == anns[-1].num_chunks == 22
    latest = reader.fetch()  # latest = 10, now from the cache
    assert latest.from_cache and latest.announcement.version == 10 and latest.chunks_read == 0
    mid = reader.fetch(4)
    assert mid.path.read_bytes() == _payload(4) and mid.chunks_read == anns[3].num_chunks


def test_corrupt_cache_file_is_refetched(connection, topo, tmp_path):
    ch = connection.channel()
    ch.confirm_delivery()
    store = ModelStore(ch, topo, cache_dir=tmp_path, chunk_size=64 * 1024)
    store.publish(1, _payload(1))
    first = store.fetch(1)
    first.path.write_bytes(b"garbage" + first.path.read_bytes()[7:])
    again = store.fetch(1)
    assert not again.from_cache and again.path.read_bytes() == _payload(1)


def test_unknown_version_raises(connection, topo, tmp_path):
    store = ModelStore(connection.channel(), topo, cache_dir=tmp_path)
    with pytest.raises(ModelNotFound):
        store.fetch(3)
    with pytest.raises(ModelNotFound):
        store.fetch()


def test_a_model_corrupted_in_the_stream_is_refused_naming_the_version(connection, topo, tmp_path):
    """Stream readers skip the per-chunk crc32 (nothing is redelivered from a stream); the sha256 of the
    whole payload still catches a corrupted chunk, and the fetch fails with ModelNotFound naming the version."""
    ch = connection.channel()
    ch.confirm_delivery()
    store = ModelStore(ch, topo, cache_dir=tmp_path / "pub", chunk_size=64 * 1024)
    first = store._probe_offset() + 1
    chunks = []
    info = publish_chunked(lambda body, h: chunks.append((bytes(body), h)), _payload(1), chunk_size=64 * 1024,
                           transfer_id="model-v1", headers={H_VERSION: 1}, digest_in_last_chunk=True)
    body, headers = chunks[1]
    chunks[1] = (body[:10] + bytes([body[10] ^ 1]) + body[11:], headers)
    for body, headers in chunks:
        ch.basic_publish("", topo.models, body, pika.BasicProperties(headers=headers, delivery_mode=2))
    ann = messages.ModelVersion(topo.experiment, 1, first, info.num_chunks, info.size, info.sha256,
                                info.transfer_id, time.time())
    ch.basic_publish("", topo.model_index, messages.encode(ann), pika.BasicProperties(delivery_mode=2))
    reader = ModelStore(connection.channel(), topo, cache_dir=tmp_path / "worker")
    with pytest.raises(ModelNotFound, match="model version 1 in the stream is corrupt"):
        reader.fetch(1)
    assert not reader.cached_path(1).exists()


def test_the_confirm_window_delivers_everything_and_raises_on_an_unroutable_message(connection, topo):
    """Model chunks go out with up to `window` unconfirmed messages; wait_confirmed returns once the broker
    confirmed them all, and a message nobody can route surfaces as pika's UnroutableError."""
    from common.transport.model_store import _ConfirmWindow

    ch = connection.channel()
    queue = ch.queue_declare("", exclusive=True).method.queue
    window = _ConfirmWindow(connection, 3)
    try:
        for i in range(10):
            window.publish("", queue, b"x" * 1000 + bytes([i]), pika.BasicProperties())
        window.wait_confirmed()
        assert ch.queue_declare(queue, passive=True).method.message_count == 10
        with pytest.raises(pika.exceptions.UnroutableError):
            window.publish("", f"{queue}-nobody", b"lost", pika.BasicProperties())
            window.wait_confirmed()
    finally:
        window.close()


def test_the_cache_keeps_only_the_newest_versions_it_is_allowed(connection, topo, tmp_path):
    ch = connection.channel()
    ch.confirm_delivery()
    store = ModelStore(ch, topo, cache_dir=tmp_path / "pub", chunk_size=64 * 1024)
    for v in range(1, 6):
        store.publish(v, _payload(v))
    reader = ModelStore(connection.channel(), topo, cache_dir=tmp_path / "worker", chunk_size=64 * 1024,
                        cache_versions=2)
    for v in (1, 2, 3, 5, 4):  # an older version fetched last is still kept: it is the one in use
        assert reader.fetch(v).path.read_bytes() == _payload(v)
    cached = sorted(p.name for p in (tmp_path / "worker" / topo.experiment).glob("model-v*.bin"))
    assert cached == ["model-v00000004.bin", "model-v00000005.bin"]


@pytest.mark.parametrize("unfollow", [True, False])
def test_a_follower_closes_cleanly_with_announcements_still_buffered_only_after_unfollow(connection, topo, unfollow):
    """`follow` deliveries that pika buffered but did not dispatch yet are rejected by a plain channel close,
    and a stream answers a reject by closing the connection (what `mqfed-coordinator status` once died of);
    `unfollow` closes the channel without rejecting them, so the connection closes cleanly."""
    from common.transport.connection import connect

    ch = connection.channel()
    ch.confirm_delivery()
    publisher = ModelStore(ch, topo, chunk_size=64 * 1024)
    for v in range(1, 4):
        publisher.publish(v, _payload(v))
    conn = connect("test", device="pytest-follower", attempts=3)
    try:
        follower = ModelStore(conn.channel(), topo)
        follower.follow(conn.channel())
        time.sleep(0.5)
        conn.channel()  # a blocking round trip: the index deliveries arrive and wait in pika's buffer
        assert follower.newest is None  # none dispatched
        if unfollow:
            follower.unfollow()
            conn.close()
            assert conn.is_closed
        else:
            with pytest.raises(pika.exceptions.ConnectionClosedByBroker, match="basic.nack and basic.reject"):
                conn.close()
    finally:
        if conn.is_open:
            conn.close()
