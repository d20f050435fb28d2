import os
import random

import pytest

from common.chunks import (
    H_CRC, CorruptTransfer, IncompleteTransfer, InvalidChunk, Reassembler, publish_chunked,
)


def _chunks(data, chunk_size=100):
    out = []
    info = publish_chunked(lambda body, h: out.append((bytes(body), h)), data, chunk_size=chunk_size)
    return info, out


@pytest.mark.parametrize("spill", [10**9, 0], ids=["memory", "spool"])
def test_reordered_and_duplicated_chunks_reassemble(spill, tmp_path):
    data = os.urandom(2345)
    info, msgs = _chunks(data)
    assert info.num_chunks == 24
    random.Random(1).shuffle(msgs)
    msgs = msgs[:5] + [msgs[2]] + msgs[5:] + [msgs[0]]
    r = Reassembler(spill_threshold=spill, spool_dir=str(tmp_path), fsync=False)
    acked, done = [], None
    for token, (body, h) in enumerate(msgs):
        res = r.add(h, body, token)
        acked += res.ack
        done = res.complete or done
    assert done is not None and done.read_bytes() == data
    assert sorted(acked) == list(range(len(msgs)))  # every delivery, duplicates included, acked exactly once
    done.close()
    assert os.listdir(tmp_path) == []


def test_in_memory_chunks_are_acked_only_on_completion():
    _, msgs = _chunks(b"x" * 250)
    r = Reassembler(fsync=False)
    assert r.add(msgs[0][1], msgs[0][0], "a").ack == []
    assert r.add(msgs[1][1], msgs[1][0], "b").ack == []
    res = r.add(msgs[2][1], msgs[2][0], "c")
    assert res.complete and sorted(res.ack) == ["a", "b", "c"]


def test_empty_payload():
    info, msgs = _chunks(b"")
    assert info.num_chunks == 1
    res = Reassembler().add(msgs[0][1], msgs[0][0])
    assert res.complete.read_bytes() == b""


def test_corrupt_chunk_is_detected():
    _, msgs = _chunks(os.urandom(500))
    r = Reassembler(fsync=False)
    r.add(msgs[0][1], msgs[0][0], 0)
    bad = bytearray(msgs[1][0]); bad[7] ^= 1
    with pytest.raises(CorruptTransfer, match="chunk 1 is corrupt") as err:
        r.add(msgs[1][1], bytes(bad), 1)
    assert sorted(err.value.tokens) == [0, 1]
    assert r.open_transfers == []


def test_payload_checksum_mismatch_is_detected():
    _, msgs = _chunks(os.urandom(300))
    body, h = msgs[2]
    forged = b"\x00" * len(body)
    h = {**h, H_CRC: __import__("zlib").crc32(forged)}
    r = Reassembler(fsync=False)
    r.add(msgs[0][1], msgs[0][0]); r.add(msgs[1][1], msgs[1][0])
    with pytest.raises(CorruptTransfer, match="sha256"):
        r.add(h, forged)


def test_missing_chunk_times_out_and_names_it():
    now = [0.0]
    _, msgs = _chunks(os.urandom(500))
    r = Reassembler(timeout_s=10, clock=lambda: now[0], fsync=False)
    for i, (body, h) in enumerate(msgs):
        if i != 3:
            r.add(h, body, i)
    assert r.expire() == []
    now[0] = 11
    (err,) = r.expire()
    assert isinstance(err, IncompleteTransfer) and err.missing == [3] and sorted(err.tokens) == [0, 1, 2, 4]


def test_inconsistent_headers_and_lengths():
    _, msgs = _chunks(os.urandom(300))
    r = Reassembler()
    with pytest.raises(InvalidChunk):
        r.add({}, b"")
    with pytest.raises(InvalidChunk, match="bytes"):
        r.add(msgs[0][1], msgs[0][0][:-1])
    r.add(msgs[0][1], msgs[0][0])
    with pytest.raises(InvalidChunk, match="disagrees"):
        r.add({**msgs[1][1], "mqfed-sha256": "0" * 64}, msgs[1][0])


def test_file_source(tmp_path):
    p = tmp_path / "payload"
    data = os.urandom(1000)
    p.write_bytes(data)
    info, msgs = _chunks(str(p), chunk_size=256)
    assert info.size == 1000 and b"".join(b for b, _ in msgs) == data
