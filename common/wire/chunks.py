"""Chunked transfer: a payload of any size crosses the broker as messages below its size limit.

Invariants: `publish_chunked` sends every chunk with headers naming the transfer, its index and count, the
sizes, a crc32 and the whole payload's sha256 (in every chunk, or only in the last one). `Reassembler` (pure)
stores chunks in any order, drops duplicates, bounds memory (spools above `spill_threshold`), verifies the
sha256, and hands back an acknowledgement token only once its chunk is durably handled; its errors carry the
tokens to reject, and a late chunk of a failed transfer is refused too. docs/messaging.md#chunked-transfer-commonwirechunkspy.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import tempfile
import time
import uuid
import zlib
from typing import Any, BinaryIO, Callable, Iterator, cast

from common.errors import MqfedError

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
H_TRANSFER, H_INDEX, H_COUNT = "mqfed-transfer", "mqfed-chunk", "mqfed-chunks"
H_SIZE, H_CHUNK_SIZE, H_SHA256, H_CRC = "mqfed-size", "mqfed-chunk-size", "mqfed-sha256", "mqfed-crc32"
_READ_BLOCK = 1024 * 1024


class ChunkError(MqfedError):
    """Base of chunked-transfer errors; `tokens` are the acknowledgement tokens to reject."""

    def __init__(self, message: str, transfer_id: str | None = None, tokens: list | None = None):
        super().__init__(message)
        self.transfer_id = transfer_id
        self.tokens = tokens or []


class InvalidChunk(ChunkError):
    """A chunk's headers are missing, malformed, or disagree with the transfer's earlier chunks."""


class CorruptTransfer(ChunkError):
    """A chunk's crc32 or the whole payload's sha256 does not match."""


class IncompleteTransfer(ChunkError):
    """A transfer made no progress within its timeout; `missing` lists the chunk indexes never seen."""

    def __init__(self, message: str, transfer_id: str, tokens: list, missing: list[int]):
        super().__init__(message, transfer_id, tokens)
        self.missing = missing


@dataclasses.dataclass(frozen=True)
class TransferInfo:
    transfer_id: str
    num_chunks: int
    size: int
    sha256: str
    chunk_size: int


def _sha256_of(source: bytes | str | os.PathLike) -> tuple[int, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source), hashlib.sha256(source).hexdigest()
    h, size = hashlib.sha256(), 0
    with open(source, "rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def iter_chunks(source: bytes | str | os.PathLike, chunk_size: int) -> Iterator[bytes | memoryview]:
    """Yield the payload in pieces of `chunk_size` (the last may be shorter; an empty payload yields one empty chunk)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        if len(view) == 0:
            yield b""
        for start in range(0, len(view), chunk_size):
            yield view[start:start + chunk_size]
        return
    with open(source, "rb") as f:
        first = True
        while (block := f.read(chunk_size)) or first:
            first = False
            yield block
            if len(block) < chunk_size:
                break


def chunk_headers(info: TransferInfo, index: int, chunk: bytes | memoryview) -> dict[str, Any]:
    return {
        H_TRANSFER: info.transfer_id, H_INDEX: index, H_COUNT: info.num_chunks, H_SIZE: info.size,
        H_CHUNK_SIZE: info.chunk_size, H_SHA256: info.sha256, H_CRC: zlib.crc32(chunk),
    }


def _sized_chunks(source: bytes | str | os.PathLike, chunk_size: int) -> Iterator[tuple[int, bytes | memoryview]]:
    """(total size, chunk) pairs for a one-pass send: the size is known before the first chunk (a file's
    size when it is opened; a file that shrinks meanwhile raises, bytes appended meanwhile are not sent)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        size = memoryview(source).nbytes
        for chunk in iter_chunks(source, chunk_size):
            yield size, chunk
        return
    with open(source, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        count = max(1, -(-size // chunk_size))
        for index in range(count):
            want = min(chunk_size, size - index * chunk_size) if size else 0
            block = f.read(want)
            if len(block) != want:
                raise ValueError(f"{os.fspath(source)} shrank while it was published ({size} bytes when opened)")
            yield size, block


def publish_chunked(
    publish: Callable[[bytes | memoryview, dict[str, Any]], None],
    source: bytes | str | os.PathLike,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    transfer_id: str | None = None,
    headers: dict[str, Any] | None = None,
    digest_in_last_chunk: bool = False,
) -> TransferInfo:
    """Send `source` (bytes or a file path) as chunks through `publish(body, headers)`.

    `publish` must return only once the broker confirmed the message (e.g. pika BlockingChannel with
    `confirm_delivery()`; it raises on nack/unroutable), or the caller must wait for every outstanding
    confirm before it relies on the transfer (e.g. before announcing it; `ModelStore` does so).
    `headers` are added to every chunk's headers.

    digest_in_last_chunk: hash while sending (one pass over the payload instead of two, and no hashing
    before the first chunk leaves) and put the sha256 only in the last chunk's `mqfed-sha256` header; the
    other chunks carry "" there. Receivers of this module accept both forms; readers older than the form
    refuse such chunks (they expect the sha256 on every chunk).
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    tid, extra = transfer_id or uuid.uuid4().hex, headers or {}
    if not digest_in_last_chunk:
        size, digest = _sha256_of(source)
        info = TransferInfo(tid, max(1, -(-size // chunk_size)), size, digest, chunk_size)
        for index, chunk in enumerate(iter_chunks(source, chunk_size)):
            publish(chunk, {**extra, **chunk_headers(info, index, chunk)})
        return info
    hasher = hashlib.sha256()
    last: TransferInfo | None = None
    for index, (size, chunk) in enumerate(_sized_chunks(source, chunk_size)):
        count = max(1, -(-size // chunk_size))
        hasher.update(chunk)
        last = TransferInfo(tid, count, size, hasher.hexdigest() if index == count - 1 else "", chunk_size)
        publish(chunk, {**extra, **chunk_headers(last, index, chunk)})
    return cast(TransferInfo, last)  # set: _sized_chunks yields at least one chunk (an empty payload is one)


def _plain_headers(headers: dict) -> dict:
    """The transfer-wide chunk headers, as JSON can hold them (the journal's first line)."""
    return {k: headers[k] for k in (H_COUNT, H_SIZE, H_CHUNK_SIZE, H_SHA256, H_INDEX, H_CRC)} | {
        k: v for k, v in headers.items() if not k.startswith("mqfed-") and isinstance(v, (str, int, float, bool))}


def _log_recovery_failure(journal: str, exc: BaseException) -> None:
    from common.logs import get_logger  # the wire package logs only here, at recovery

    get_logger(__name__).warning("spool_unrecoverable", journal=journal, error=f"{type(exc).__name__}: {exc}")


def is_chunk(headers: dict | None) -> bool:
    if not headers:
        return False
    return H_TRANSFER in headers


@dataclasses.dataclass
class CompletedTransfer:
    """A verified payload: in memory (`data`) or in a spool file (`path`, deleted by `close()`)."""

    transfer_id: str
    size: int
    sha256: str
    headers: dict[str, Any]
    data: bytes | bytearray | None = None
    path: str | None = None
    journal: str | None = None  # a journaled spool's chunk journal, deleted with the spool file by `close()`
    completed_at: float = 0.0  # the reassembler's clock when the last chunk was stored

    def read_bytes(self) -> bytes | bytearray:
        if self.data is not None:
            return self.data
        with open(cast(str, self.path), "rb") as f:  # no data: the payload is in the file at `path`
            return f.read()

    def save_to(self, dest: str | os.PathLike) -> None:
        """Move/write the payload to `dest` atomically (rename from a temp file beside it)."""
        dest = os.fspath(dest)
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        tmp = f"{dest}.{uuid.uuid4().hex}.part"
        if self.path is not None:
            try:
                os.replace(self.path, dest)
                self.path = dest
                return
            except OSError:  # other file system: copy below
                pass
        with open(tmp, "wb") as out:
            if self.data is not None:
                out.write(self.data)
            else:
                with open(cast(str, self.path), "rb") as f:  # no data: the payload is in the file at `path`
                    while block := f.read(_READ_BLOCK):
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)

    def close(self) -> None:
        """Delete the spool file (unless `save_to` moved it away) and the journal."""
        for path in (self.path if self.path is not None and os.path.basename(self.path).startswith("mqfed-spool-")
                     else None, self.journal):
            if path is not None:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass


@dataclasses.dataclass
class AddResult:
    complete: CompletedTransfer | None
    ack: list
    duplicate: bool = False


class _Assembly:
    def __init__(self, tid: str, headers: dict, spill: bool, spool_dir: str | None, now: float,
                 journaled: bool = False, reopen: tuple[str, str] | None = None):
        self.tid = tid
        self.count, self.size = headers[H_COUNT], headers[H_SIZE]
        self.chunk_size, self.sha256 = headers[H_CHUNK_SIZE], ""  # set by `note` (maybe only at the last chunk)
        self.digest_upfront: bool | None = None  # does every chunk carry the sha256? (known at a non-last chunk)
        self.first_headers = {k: v for k, v in headers.items() if not k.startswith("mqfed-")}
        self.received: dict[int, int] = {}  # index -> crc32
        self.held_tokens: list = []
        self.hasher, self.hashed = hashlib.sha256(), 0  # chunks hashed so far (contiguous prefix)
        self.last_progress = now
        self.buffer: bytearray | None = None
        self.file: BinaryIO | None = None
        self.path: str | None = None
        self.journal: BinaryIO | None = None
        self.journal_path: str | None = None
        if reopen is not None:  # a journaled spool left by an earlier process (`Reassembler.recover`)
            self.path, self.journal_path = reopen
            self.file = open(self.path, "r+b")
        elif journaled:  # named after the transfer, so that `Reassembler.recover` finds it after a restart
            name = hashlib.sha256(tid.encode()).hexdigest()[:32]
            self.path = os.path.join(cast(str, spool_dir), f"mqfed-spool-{name}.part")
            self.journal_path = os.path.join(cast(str, spool_dir), f"mqfed-spool-{name}.journal")
            self.file = open(self.path, "w+b")
            self.journal = open(self.journal_path, "ab")
            self.journal.write(json.dumps({"transfer": tid, "headers": _plain_headers(headers)}).encode() + b"\n")
        elif spill:
            fd, self.path = tempfile.mkstemp(prefix="mqfed-spool-", suffix=".part", dir=spool_dir)
            # Not preallocated: the declared size is the sender's word, and a lying first chunk must not
            # reserve disk for bytes that never come (the file grows as chunks are written).
            self.file = os.fdopen(fd, "r+b")
        else:
            self.buffer = bytearray(self.size)

    @property
    def spool(self) -> BinaryIO:
        """The spool file, for a transfer that is not buffered in memory (`buffer` is None)."""
        return cast(BinaryIO, self.file)  # __init__ opens it whenever it does not allocate `buffer`

    def agree(self, headers: dict, index: int) -> bool:
        """Do this chunk's transfer-wide headers agree with the chunks accepted so far?"""
        if (headers[H_COUNT], headers[H_SIZE], headers[H_CHUNK_SIZE]) != (self.count, self.size, self.chunk_size):
            return False
        digest = headers[H_SHA256]
        if index != self.count - 1 and self.digest_upfront is not None and self.digest_upfront != bool(digest):
            return False  # the sha256 is on every chunk, or on the last one only: not a mix
        return not (digest and self.sha256 and digest != self.sha256)

    def note(self, headers: dict, index: int) -> None:
        """Record the digest form and the sha256 of an accepted chunk."""
        if index != self.count - 1 and self.digest_upfront is None:
            self.digest_upfront = bool(headers[H_SHA256])
        self.sha256 = self.sha256 or headers[H_SHA256]

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size) if self.size else 0

    def store(self, index: int, body: bytes | memoryview, fsync: bool, headers: dict) -> None:
        offset = index * self.chunk_size
        if self.buffer is not None:
            self.buffer[offset:offset + len(body)] = body
        else:
            os.pwrite(self.spool.fileno(), body, offset)
            if fsync:
                os.fsync(self.spool.fileno())
        if self.journal is not None:  # the chunk is on disk: now say so (a torn last line is ignored)
            self.journal.write(json.dumps([index, headers[H_CRC], headers[H_SHA256]]).encode() + b"\n")
            self.journal.flush()
            if fsync:
                os.fsync(self.journal.fileno())
        if index == self.hashed:
            self.hasher.update(body)
            self.hashed += 1
            self._hash_stored()

    def _hash_stored(self) -> None:
        while self.hashed < self.count and self.hashed in self.received:
            offset, n = self.hashed * self.chunk_size, self.chunk_len(self.hashed)
            if self.buffer is not None:
                self.hasher.update(memoryview(self.buffer)[offset:offset + n])
            else:
                pos = offset
                while pos < offset + n:
                    block = os.pread(self.spool.fileno(), min(_READ_BLOCK, offset + n - pos), pos)
                    self.hasher.update(block)
                    pos += len(block)
            self.hashed += 1

    def close_journal(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    def discard(self) -> None:
        self.buffer = None
        self.close_journal()
        if self.file is not None:
            self.file.close()
            for path in (self.path, self.journal_path):
                if path is not None:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass


class Reassembler:
    """Reassembles chunked transfers; pure (no broker), see the module doc.

    spill_threshold: transfers larger than this many bytes are spooled to disk under `spool_dir`.
    timeout_s: a transfer with no new chunk for this long is reported by `expire()`.
    fsync: fsync the spool file before handing back a chunk's token.
    max_size: a transfer declaring more bytes than this is refused (InvalidChunk) at its first chunk.
    verify_crc: check each chunk's crc32 on arrival (default). False leaves corruption to the sha256 of the
    whole payload, checked when the last chunk arrives: still detected and reported (CorruptTransfer), but
    without naming the chunk, and chunks of a corrupt transfer may be acknowledged before it is found out
    (spooled ones). For readers that gain nothing from an early, per-chunk verdict (a model read from a
    stream, where nothing is redelivered); the crc32 header is still required and type-checked.

    Nothing is allocated for a transfer until a chunk of it passed every check (headers, length, and crc32
    when verified), and then only memory for the declared size (at most `spill_threshold`) or an empty
    spool file.
    """

    def __init__(self, spill_threshold: int = 64 * 1024 * 1024, spool_dir: str | None = None,
                 timeout_s: float = 120.0, fsync: bool = True, clock: Callable[[], float] = time.monotonic,
                 max_size: int = 16 * 1024**3, verify_crc: bool = True, journaled: bool = False):
        if journaled and spool_dir is None:
            raise ValueError("a journaled Reassembler needs a spool_dir")
        self.journaled = journaled
        self.spill_threshold, self.spool_dir, self.timeout_s = spill_threshold, spool_dir, timeout_s
        self.max_size, self.verify_crc = max_size, verify_crc
        self.fsync, self.clock = fsync, clock
        self._open: dict[str, _Assembly] = {}
        # transfers that ended: None when completed, else why they were dropped (later chunks are refused)
        self._done: collections.OrderedDict[str, str | None] = collections.OrderedDict()

    @property
    def open_transfers(self) -> list[str]:
        return list(self._open)

    def _validate(self, headers: dict, body) -> tuple[str, int]:
        if not is_chunk(headers):
            raise InvalidChunk("message is not a chunk (no mqfed-transfer header)")
        try:
            tid, index, count = headers[H_TRANSFER], headers[H_INDEX], headers[H_COUNT]
            size, csize, digest, crc = headers[H_SIZE], headers[H_CHUNK_SIZE], headers[H_SHA256], headers[H_CRC]
        except KeyError as exc:
            raise InvalidChunk(f"chunk lacks header {exc}", headers.get(H_TRANSFER)) from None
        try:  # pika hands over a header string that is not valid UTF-8 as bytes
            tid = tid.decode() if isinstance(tid, bytes) else tid
            digest = digest.decode() if isinstance(digest, bytes) else digest
        except UnicodeDecodeError:
            raise InvalidChunk(f"chunk headers have wrong types: transfer id {tid!r:.80} or sha256 is not UTF-8") from None
        headers[H_TRANSFER], headers[H_SHA256] = tid, digest
        ints = (index, count, size, csize, crc)
        numbers = all(isinstance(v, int) and not isinstance(v, bool) for v in ints)  # pika's `long` is an int
        if not isinstance(tid, str) or not isinstance(digest, str) or not numbers:
            raise InvalidChunk("chunk headers have wrong types", str(tid))
        if count < 1 or csize < 1 or size < 0 or not 0 <= index < count or max(1, -(-size // csize)) != count:
            raise InvalidChunk(f"chunk {index}/{count} of size {size} (chunks of {csize}) is inconsistent", tid)
        if not digest and index == count - 1:
            raise InvalidChunk(f"chunk {index}, the last of transfer {tid}, carries no sha256", tid)
        if size > self.max_size:
            raise InvalidChunk(f"transfer {tid} declares {size} bytes, above the limit of {self.max_size}", tid)
        return tid, index

    def add(self, headers: dict | None, body: bytes | memoryview, token: Any = None) -> AddResult:
        """Store one chunk. Returns the completed transfer (verified) when this was the last missing chunk.

        Raises InvalidChunk (bad/inconsistent headers, wrong length, a chunk of a transfer dropped earlier)
        or CorruptTransfer (crc32 or sha256 mismatch; the transfer is dropped and all its held tokens are in
        the error). A chunk of a completed transfer is a duplicate: acknowledged, nothing else.
        """
        headers = dict(headers or {})
        tid, index = self._validate(headers, body)
        if tid in self._done:
            dropped = self._done[tid]
            if dropped is None:
                return AddResult(None, [token], duplicate=True)
            raise InvalidChunk(f"chunk {index} of transfer {tid}, which was dropped earlier ({dropped})", tid, [token])
        asm = self._open.get(tid)
        if asm is not None and not asm.agree(headers, index):
            raise InvalidChunk(f"chunk {index} disagrees with earlier chunks of transfer {tid}", tid, [token])
        size, csize = headers[H_SIZE], headers[H_CHUNK_SIZE]
        expected = min(csize, size - index * csize) if size else 0
        if len(body) != expected:
            raise InvalidChunk(f"chunk {index} of {tid} has {len(body)} bytes, expected {expected}", tid, [token])
        if self.verify_crc and zlib.crc32(body) != headers[H_CRC]:
            tokens = self._drop(tid, f"chunk {index} was corrupt") + [token]
            raise CorruptTransfer(f"transfer {tid}: chunk {index} is corrupt (crc32 mismatch)", tid, tokens)
        if asm is None:
            asm = _Assembly(tid, headers, size > self.spill_threshold, self.spool_dir, self.clock(), self.journaled)
            self._open[tid] = asm
        if index in asm.received:
            return AddResult(None, [token], duplicate=True)
        asm.note(headers, index)
        asm.store(index, body, self.fsync, headers)
        asm.received[index] = headers[H_CRC]
        asm._hash_stored()
        asm.last_progress = self.clock()
        ack: list = []
        if asm.buffer is not None:
            asm.held_tokens.append(token)
        else:
            ack.append(token)
        if len(asm.received) < asm.count:
            return AddResult(None, ack)
        done = self._complete(asm)
        return AddResult(done, ack + asm.held_tokens)

    def _complete(self, asm: _Assembly) -> CompletedTransfer:
        """The verified payload of `asm`, whose chunks are all stored; raises CorruptTransfer."""
        tid = asm.tid
        del self._open[tid]
        if asm.hasher.hexdigest() != asm.sha256:
            asm.discard()
            self._remember(tid, "its sha256 did not match")
            raise CorruptTransfer(f"transfer {tid}: sha256 of the reassembled payload does not match", tid,
                                  asm.held_tokens)
        self._remember(tid)
        if asm.buffer is not None:
            return CompletedTransfer(tid, asm.size, asm.sha256, asm.first_headers, data=asm.buffer,
                                     completed_at=self.clock())
        asm.close_journal()
        asm.spool.flush()
        asm.spool.close()
        return CompletedTransfer(tid, asm.size, asm.sha256, asm.first_headers, path=asm.path,
                                 journal=asm.journal_path, completed_at=self.clock())

    def recover(self) -> list[CompletedTransfer]:
        """Reopen the journaled spools a previous process left (their chunks were acknowledged when stored):
        incomplete transfers go on receiving chunks (their timeout starts now); complete ones are returned,
        verified. A spool that cannot be read back is deleted and logged. Only for `journaled=True`."""
        done: list[CompletedTransfer] = []
        for journal in sorted(glob.glob(os.path.join(cast(str, self.spool_dir), "mqfed-spool-*.journal"))):
            part = journal[:-len(".journal")] + ".part"
            try:
                asm = self._reopen(journal, part)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                for path in (journal, part):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                _log_recovery_failure(journal, exc)
                continue
            self._open[asm.tid] = asm
            if len(asm.received) == asm.count:
                try:
                    done.append(self._complete(asm))
                except CorruptTransfer as exc:
                    _log_recovery_failure(journal, exc)
        return done

    def _reopen(self, journal: str, part: str) -> _Assembly:
        with open(journal, "rb") as f:
            lines = f.read().split(b"\n")
        first = json.loads(lines[0])
        headers = dict(first["headers"])
        asm = _Assembly(first["transfer"], headers, True, None, self.clock(), reopen=(part, journal))
        for line in lines[1:]:
            try:
                index, crc, digest = json.loads(line)
            except ValueError:
                break  # a torn last line: that chunk was not acknowledged, it comes again
            if not (isinstance(index, int) and 0 <= index < asm.count):
                raise ValueError(f"journal names chunk {index!r} of {asm.count}")
            asm.note({H_SHA256: digest}, index)
            asm.received[index] = crc
        asm._hash_stored()
        asm.journal = open(journal, "ab")
        return asm

    def expire(self) -> list[IncompleteTransfer]:
        """Drop transfers without progress for `timeout_s`; return one IncompleteTransfer per dropped transfer."""
        now, out = self.clock(), []
        for tid, asm in list(self._open.items()):
            if now - asm.last_progress >= self.timeout_s:
                missing = [i for i in range(asm.count) if i not in asm.received]
                tokens = self._drop(tid, f"incomplete after {self.timeout_s:.0f}s")
                out.append(IncompleteTransfer(
                    f"transfer {tid}: {len(missing)} of {asm.count} chunks missing after {self.timeout_s:.0f}s "
                    f"(first missing: {missing[:5]})", tid, tokens, missing))
        return out

    def _drop(self, tid: str, why: str) -> list:
        """Discard transfer `tid` (open or not) and remember why; returns the tokens it held."""
        self._remember(tid, why)
        asm = self._open.pop(tid, None)
        if asm is None:
            return []
        asm.discard()
        return asm.held_tokens

    def _remember(self, tid: str, dropped: str | None = None) -> None:
        self._done[tid] = dropped
        while len(self._done) > 4096:
            self._done.popitem(last=False)

    def close(self) -> None:
        for tid in list(self._open):
            self._drop(tid, "the reassembler was closed")

    def release(self) -> None:
        """Close the open transfers' files without deleting them (journaled: another Reassembler recovers them)."""
        for asm in self._open.values():
            asm.close_journal()
            if asm.file is not None:
                asm.file.close()
        self._open.clear()
