import os
import random

import pytest

from common.wire.chunks import (
    H_CRC,
    CorruptTransfer,
    IncompleteTransfer,
    InvalidChunk,
    Reassembler,
    publish_chunked,
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


def _last_chunk_digest(data, chunk_size=100):
    out = []
    info = publish_chunked(lambda body, h: out.append((bytes(body), h)), data, chunk_size=chunk_size,
                           digest_in_last_chunk=True)
    return info, out


@pytest.mark.parametrize("spill", [10**9, 0], ids=["memory", "spool"])
def test_digest_in_the_last_chunk_only_reassembles_in_any_order(spill, tmp_path):
    data = os.urandom(2345)
    info, msgs = _last_chunk_digest(data)
    upfront, _ = _chunks(data)
    assert info.num_chunks == 24 and info.sha256 == upfront.sha256
    assert [h["mqfed-sha256"] for _, h in msgs[:-1]] == [""] * 23 and msgs[-1][1]["mqfed-sha256"] == info.sha256
    random.Random(2).shuffle(msgs)
    r = Reassembler(spill_threshold=spill, spool_dir=str(tmp_path), fsync=False)
    done = None
    for body, h in msgs:
        done = r.add(h, body).complete or done
    assert done is not None and done.read_bytes() == data
    done.close()


def test_digest_in_the_last_chunk_still_detects_a_forged_chunk():
    info, msgs = _last_chunk_digest(os.urandom(300))
    body, h = msgs[1]
    forged = b"\x00" * len(body)
    r = Reassembler(fsync=False)
    r.add(msgs[0][1], msgs[0][0])
    r.add({**h, H_CRC: __import__("zlib").crc32(forged)}, forged)
    with pytest.raises(CorruptTransfer, match="sha256"):
        r.add(msgs[2][1], msgs[2][0])


def test_a_last_chunk_without_digest_and_mixed_digest_forms_are_refused():
    _, late = _last_chunk_digest(os.urandom(300))
    _, early = _chunks(os.urandom(300))
    with pytest.raises(InvalidChunk, match="carries no sha256"):
        Reassembler().add({**late[2][1], "mqfed-sha256": ""}, late[2][0])
    r = Reassembler()
    r.add(late[0][1], late[0][0])  # the sha256 comes last in this transfer ...
    with pytest.raises(InvalidChunk, match="disagrees"):  # ... so a middle chunk carrying one is a mix
        r.add({**late[1][1], "mqfed-sha256": early[0][1]["mqfed-sha256"]}, late[1][0])


def test_without_crc_checks_corruption_is_caught_by_the_whole_payload_sha256():
    _, msgs = _chunks(os.urandom(500))
    bad = bytearray(msgs[1][0]); bad[7] ^= 1
    msgs[1] = (bytes(bad), msgs[1][1])
    r = Reassembler(fsync=False, verify_crc=False)
    with pytest.raises(CorruptTransfer, match="sha256"):
        for body, h in msgs:
            r.add(h, body)


# -- journaled spools: chunks acknowledged when stored survive a restart ------------------------------------

def _journaled_chunks(data: bytes, chunk_size: int, **kw) -> list:
    out: list = []
    publish_chunked(lambda body, h: out.append((bytes(body), h)), data, chunk_size=chunk_size, **kw)
    return out


@pytest.mark.parametrize("digest_in_last_chunk", [False, True])
def test_a_journaled_transfer_resumes_after_a_restart_from_the_chunks_already_acknowledged(tmp_path,
                                                                                          digest_in_last_chunk):
    data = os.urandom(10_000)
    chunks = _journaled_chunks(data, 1024, digest_in_last_chunk=digest_in_last_chunk)
    first = Reassembler(spill_threshold=0, spool_dir=str(tmp_path), journaled=True)
    acked = []
    for i, (body, h) in enumerate(chunks[:6]):
        acked += first.add(h, body, i).ack
    assert acked == list(range(6))  # stored, journaled: acknowledged (the broker forgets them)
    # the process dies here; a new one recovers the spool and gets the rest
    second = Reassembler(spill_threshold=0, spool_dir=str(tmp_path), journaled=True)
    assert second.recover() == [] and len(second.open_transfers) == 1
    done = None
    for i, (body, h) in enumerate(chunks[6:], start=6):
        done = second.add(h, body, i).complete or done
    assert done is not None and done.read_bytes() == data
    done.close()
    assert list(tmp_path.iterdir()) == []  # spool and journal gone with the payload


def test_a_journaled_transfer_completed_before_a_restart_is_recovered_whole(tmp_path):
    data = os.urandom(5000)
    r = Reassembler(spill_threshold=0, spool_dir=str(tmp_path), journaled=True)
    for i, (body, h) in enumerate(_journaled_chunks(data, 1024)):
        done = r.add(h, body, i).complete
    assert done is not None  # completed, never claimed: the process dies
    (recovered,) = Reassembler(spill_threshold=0, spool_dir=str(tmp_path), journaled=True).recover()
    assert recovered.transfer_id == done.transfer_id and recovered.read_bytes() == data


def test_a_torn_journal_line_means_that_chunk_comes_again(tmp_path):
    data = os.urandom(4096)
    chunks = _journaled_chunks(data, 1024)
    r = Reassembler(spill_threshold=0, spool_dir=str(tmp_path), journaled=True)
    for i, (body, h) in enumerate(chunks[:3]):
        r.add(h, body, i)
    (journal,) = tmp_path.glob("*.journal")
    journal.write_bytes(journal.read_bytes()[:-5])  # the last line torn: chunk 2 was never acknowledged
    again = Reassembler(spill_threshold=0, spool_dir=str(tmp_path), journaled=True)
    assert again.recover() == []
    done = None
    for i, (body, h) in enumerate(chunks[2:], start=2):
        done = again.add(h, body, i).complete or done
    assert done is not None and done.read_bytes() == data


def test_an_unreadable_journal_is_deleted_not_fatal(tmp_path):
    (tmp_path / "mqfed-spool-x.journal").write_bytes(b"\xff not json\n")
    (tmp_path / "mqfed-spool-x.part").write_bytes(b"junk")
    assert Reassembler(spill_threshold=0, spool_dir=str(tmp_path), journaled=True).recover() == []
    assert list(tmp_path.iterdir()) == []
