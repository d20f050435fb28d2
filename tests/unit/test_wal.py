"""The write-ahead log: durable appends, ordered replay, cuts, torn appends, lying records."""
from __future__ import annotations

import os

import pytest

from common.wire.chunks import Reassembler, publish_chunked
from coordinator.wal import WalError, WriteAheadLog


def test_records_come_back_in_order_with_their_payloads_and_seq_survives_a_reopen(tmp_path):
    wal = WriteAheadLog(tmp_path)
    seqs = [wal.append({"task_id": f"t{i}"}, bytes([i]) * (100 + i)) for i in range(3)]
    assert seqs == [1, 2, 3]
    again = WriteAheadLog(tmp_path)
    records = again.records()
    assert [r.seq for r in records] == [1, 2, 3] and [r.meta["task_id"] for r in records] == ["t0", "t1", "t2"]
    assert [r.read_payload() for r in records] == [bytes([i]) * (100 + i) for i in range(3)]
    assert [r.seq for r in again.records(after=2)] == [3]
    assert again.append({"task_id": "t3"}, b"x") == 4


def test_a_cut_forgets_what_a_checkpoint_holds_and_numbers_never_go_back(tmp_path):
    wal = WriteAheadLog(tmp_path)
    for i in range(4):
        wal.append({"i": i}, b"p")
    assert wal.cut(3) == 3
    assert [r.seq for r in wal.records()] == [4]
    wal.cut(4)
    assert WriteAheadLog(tmp_path).append({}, b"q") == 5  # an empty log still remembers where it was cut


def test_a_spooled_payload_is_linked_in_and_its_spool_outlives_a_torn_append(tmp_path):
    data = os.urandom(5000)
    spool = tmp_path / "spool"
    spool.mkdir()
    r = Reassembler(spill_threshold=0, spool_dir=str(spool), journaled=True)
    done = None
    out: list = []
    publish_chunked(lambda body, h: out.append((bytes(body), h)), data, chunk_size=1024)
    for i, (body, h) in enumerate(out):
        done = r.add(h, body, i).complete or done
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "000000000001.payload").hardlink_to(done.path)  # a crash between the payload and its mark:
    WriteAheadLog(torn)  # the log drops the unmarked payload, and the spool is still there to recover
    (recovered,) = Reassembler(spill_threshold=0, spool_dir=str(spool), journaled=True).recover()
    assert recovered.read_bytes() == data
    wal = WriteAheadLog(tmp_path / "wal")
    seq = wal.append({"task_id": "t"}, recovered)
    recovered.close()  # the consumer closes the payload after its handler: the logged one stays
    assert WriteAheadLog(tmp_path / "wal").records()[0].read_payload() == data and seq == 1
    assert list(spool.iterdir()) == []  # spool and journal are gone


def test_a_torn_append_without_its_mark_is_dropped_at_open(tmp_path):
    wal = WriteAheadLog(tmp_path)
    wal.append({"i": 1}, b"one")
    (tmp_path / "000000000002.payload").write_bytes(b"two, never marked")
    again = WriteAheadLog(tmp_path)
    assert [r.seq for r in again.records()] == [1] and not (tmp_path / "000000000002.payload").exists()
    assert again.append({"i": 2}, b"two") == 2


def test_a_payload_that_differs_from_its_mark_is_refused_by_name(tmp_path):
    wal = WriteAheadLog(tmp_path)
    wal.append({"i": 1}, b"original")
    (tmp_path / "000000000001.payload").write_bytes(b"tampered")
    with pytest.raises(WalError, match="record 1: payload differs"):
        wal.records()[0].read_payload()


def test_a_corrupt_mark_is_refused_by_name(tmp_path):
    wal = WriteAheadLog(tmp_path)
    wal.append({"i": 1}, b"x")
    (tmp_path / "000000000001.wal").write_bytes(b"garbage")
    with pytest.raises(WalError, match="not a write-ahead log record"):
        wal.records()
