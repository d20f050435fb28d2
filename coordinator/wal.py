"""The write-ahead log of accepted updates: each is made durable here before any of its messages is
acknowledged; after a restart the records past the checkpoint are replayed, in order; a checkpoint that holds
them cuts them. docs/federation.md#nothing-lost-nothing-applied-twice.

A record is two files in the log directory: `<seq>.payload` (the update's payload exactly as received, a
spooled transfer linked in) and `<seq>.wal` (an envelope: the update's other fields, the payload's
size and sha256), written and fsynced after the payload, so it is the commit mark. A payload without its
mark is a torn append (its messages were never acknowledged) and is deleted when the log is opened.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

from common.errors import MqfedError
from common.failpoints import failpoint
from common.wire import envelope
from common.wire.chunks import CompletedTransfer

MAGIC = b"MQWL"
_MAX_HEADER = 1 << 20


class WalError(MqfedError):
    """A committed record cannot be read back (its payload is missing or differs from its mark)."""


@dataclasses.dataclass(frozen=True)
class WalRecord:
    seq: int
    meta: dict
    payload_path: Path

    def read_payload(self) -> bytes:
        """The payload, checked against the size and sha256 its mark recorded; raises WalError."""
        try:
            data = self.payload_path.read_bytes()
        except OSError as exc:
            raise WalError(f"write-ahead log record {self.seq}: payload unreadable: {exc}") from None
        if len(data) != self.meta["size"] or hashlib.sha256(data).hexdigest() != self.meta["sha256"]:
            raise WalError(f"write-ahead log record {self.seq}: payload differs from what was logged")
        return data


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteAheadLog:
    """The log in `directory` (created). `append` is durable when it returns; `cut(seq)` forgets records up to
    `seq`. Sequence numbers only grow, across restarts too."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        marks = {int(p.stem) for p in self.dir.glob("*.wal")}
        for stray in list(self.dir.glob("*.payload")) + list(self.dir.glob(".*.tmp")):
            if stray.suffix == ".tmp" or int(stray.stem) not in marks:
                stray.unlink(missing_ok=True)  # a torn append: never acknowledged, redelivered
        self.next_seq = max(marks, default=0) + 1
        cut = self.dir / "cut"
        if cut.exists():  # every record up to here was cut, even if the log is empty now
            self.next_seq = max(self.next_seq, int(cut.read_text()) + 1)

    def append(self, meta: dict, payload: bytes | CompletedTransfer) -> int:
        """Log one accepted update (`meta`: msgpack-able fields) and its payload; returns its sequence number."""
        seq = self.next_seq
        path = self.dir / f"{seq:012d}.payload"
        if isinstance(payload, CompletedTransfer) and payload.path is not None:
            # Spooled and fsynced chunk by chunk: linked in, not moved (the spool must survive until the
            # commit mark does, or a crash in between would lose both) and not copied.
            size, digest = payload.size, payload.sha256
            try:
                os.link(payload.path, path)
            except OSError:  # another file system
                shutil.copyfile(payload.path, path)
        else:
            data = payload.read_bytes() if isinstance(payload, CompletedTransfer) else payload
            size, digest = len(data), hashlib.sha256(data).hexdigest()
            tmp = self.dir / f".{seq:012d}.payload.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        failpoint("coordinator.mid_wal_append")
        tmp = self.dir / f".{seq:012d}.wal.tmp"
        with open(tmp, "wb") as f:
            f.write(envelope.pack(MAGIC, {**meta, "seq": seq, "size": size, "sha256": digest}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / f"{seq:012d}.wal")
        _fsync_dir(self.dir)
        self.next_seq = seq + 1
        return seq

    def records(self, after: int = 0) -> list[WalRecord]:
        """The committed records with `seq > after`, in order; raises WalError for an unreadable mark."""
        out = []
        for mark in sorted(self.dir.glob("*.wal")):
            seq = int(mark.stem)
            if seq <= after:
                continue
            try:
                meta, _ = envelope.unpack(mark.read_bytes(), MAGIC, WalError, what="a write-ahead log record",
                                          max_header=_MAX_HEADER)
            except OSError as exc:
                raise WalError(f"write-ahead log record {seq}: unreadable: {exc}") from None
            if not isinstance(meta, dict) or meta.get("seq") != seq:
                raise WalError(f"write-ahead log record {seq}: its mark names another record")
            out.append(WalRecord(seq, meta, self.dir / f"{seq:012d}.payload"))
        return out

    def cut(self, upto: int) -> int:
        """Delete the records with `seq <= upto` (a durable checkpoint holds them); returns how many."""
        (self.dir / ".cut.tmp").write_text(str(upto))
        os.replace(self.dir / ".cut.tmp", self.dir / "cut")
        removed = 0
        for mark in sorted(self.dir.glob("*.wal")):
            if int(mark.stem) <= upto:
                mark.unlink()  # the mark first: a payload left alone is a torn append, cleaned at open
                (self.dir / f"{mark.stem}.payload").unlink(missing_ok=True)
                removed += 1
        _fsync_dir(self.dir)
        return removed
