"""Model versions: published once to the experiment's model stream, read by many workers, cached on disk.

Publishing version v appends its chunks (common/chunks, headers also carry `mqfed-version`) to
`mqfed.<exp>.models`, then appends a small `ModelVersion` announcement with the stream offset of v's first
chunk to `mqfed.<exp>.model-index` (and to the events exchange, key `model.version`). The offset comes from
a tiny probe message appended just before the chunks (see `_probe_offset`); there is one publisher per
experiment (the active coordinator).

Fetching v reads the small index stream to find v's offset, then consumes the model stream from exactly that
offset (`x-stream-offset`) and stops after v's last chunk: older versions are never read. The payload lands
in the cache (`$MQFED_CACHE_DIR`, else `$XDG_CACHE_HOME/mqfed`, else `~/.cache/mqfed`) as
`<exp>/model-v<version>.bin`, and a cached file is used only when its sha256 matches the announcement.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import time
import uuid
from pathlib import Path

import pika
import pika.exceptions
from pika.adapters.blocking_connection import ReturnedMessage

from common.errors import MqfedError
from common.logs import get_logger
from common.transport.connection import queue_unavailable_is_retryable
from common.transport.publish import sender
from common.wire import messages
from common.wire.chunks import (
    DEFAULT_CHUNK_SIZE,
    CorruptTransfer,
    Reassembler,
    is_chunk,
    publish_chunked,
)

log = get_logger(__name__)
H_VERSION = "mqfed-version"


def _close_without_reject(ch) -> None:
    impl = ch._impl  # noqa: SLF001 - see ModelStore._read_stream
    if impl.is_open:
        impl.close()
    # process_data_events(time_limit=t) blocks for all of t (the close-ok reaches the impl channel, not the
    # blocking layer that would end the wait early), so wait in short slices: a close costs ~5 ms, not 50.
    deadline = time.monotonic() + 5.0
    while not impl.is_closed and time.monotonic() < deadline:
        ch.connection.process_data_events(time_limit=0.005)


class _ConfirmWindow:
    """Publish with publisher confirms, up to `window` messages unconfirmed at a time, on a channel of its own.

    pika's BlockingChannel in confirm mode waits for each message's confirm before the next one leaves: the
    broker's write and the round trip are then paid per chunk, with the publisher idle. Here the impl
    channel's confirm callbacks count the outstanding delivery tags, `publish` returns once the message is
    written to the socket and fewer than `window` are unconfirmed, and `wait_confirmed` blocks until every
    message is confirmed. A nack, an unroutable (mandatory) message or a channel closed by the broker raises
    (NackError, UnroutableError, ChannelClosedByBroker: the exceptions pika's blocking confirm mode raises)
    from the next `publish` or `wait_confirmed`. Memory: pika holds a message only until it is on the socket.
    """

    def __init__(self, connection, window: int):
        self.channel = connection.channel()
        self._impl = self.channel._impl  # noqa: SLF001 - pika's async channel under the blocking one
        self.window = max(1, window)
        self._published = 0
        self._unconfirmed: collections.deque[int] = collections.deque()
        self._failure: Exception | None = None
        self._impl.add_on_return_callback(self._on_return)
        selected: list = []
        self._impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=selected.append)
        self.channel._flush_output(lambda: bool(selected))  # noqa: SLF001 - raises if the broker closes it

    def _on_confirm(self, frame) -> None:
        method = frame.method
        tag, multiple = method.delivery_tag, method.multiple
        if multiple:
            while self._unconfirmed and self._unconfirmed[0] <= tag:
                self._unconfirmed.popleft()
        elif tag in self._unconfirmed:
            self._unconfirmed.remove(tag)
        if isinstance(method, pika.spec.Basic.Nack) and self._failure is None:
            self._failure = pika.exceptions.NackError([])

    def _on_return(self, _channel, method, properties, body) -> None:
        if self._failure is None:
            self._failure = pika.exceptions.UnroutableError([ReturnedMessage(method, properties, body)])

    def _wait(self, ready) -> None:
        self.channel._flush_output(lambda: ready() or self._failure is not None)  # noqa: SLF001
        if self._failure is not None:
            raise self._failure

    def publish(self, exchange: str, routing_key: str, body: bytes, properties) -> None:
        if self._failure is not None:
            raise self._failure
        self._impl.basic_publish(exchange, routing_key, body, properties, mandatory=True)
        self._published += 1
        self._unconfirmed.append(self._published)
        self._wait(lambda: len(self._unconfirmed) < self.window)

    def wait_confirmed(self) -> None:
        self._wait(lambda: not self._unconfirmed)

    def close(self) -> None:
        if self.channel.is_open:
            self.channel.close()


class ModelNotFound(MqfedError, LookupError):
    """The requested version is not (or no longer) in the model index."""


def default_cache_dir() -> Path:
    if os.environ.get("MQFED_CACHE_DIR"):
        return Path(os.environ["MQFED_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mqfed"


@dataclasses.dataclass(frozen=True)
class FetchResult:
    path: Path
    announcement: messages.ModelVersion
    chunks_read: int  # model-stream messages consumed (0 when served from cache)
    from_cache: bool


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class ModelStore:
    """Publish and fetch model versions of one experiment.

    names: an object with `experiment`, `models`, `model_index`, `events`, `model_exchange`, `MODELS_KEY`,
      `MODEL_INDEX_KEY` (e.g. broker.topology.Topology).
    channel: a pika BlockingChannel; publishing needs `confirm_delivery()` on it.
    """

    def __init__(self, channel, names, cache_dir: str | os.PathLike | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, prefetch: int = 4, index_wait_s: float = 0.5,
                 confirm_window: int = 8, cache_versions: int | None = None):
        self.channel, self.names = channel, names
        self.cache_versions = cache_versions  # None: keep every fetched version on disk
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.chunk_size, self.prefetch, self.index_wait_s = chunk_size, prefetch, index_wait_s
        self.confirm_window = confirm_window
        self.newest: messages.ModelVersion | None = None  # see `follow`
        self._following = None  # the channel `follow` consumes the index on

    # -- reading streams -------------------------------------------------------------------------------
    def _read_stream(self, queue: str, offset, wait_s: float, prefetch: int):
        """Yield (stream offset, properties, body) from `offset` until nothing arrives for `wait_s`.

        Runs on its own channel, closed at the impl level when done: pika's `cancel()`/`close()` would
        reject the deliveries still buffered, and streams answer basic.reject by closing the connection.
        """
        ch = self.channel.connection.channel()
        try:
            # A stream that is not back yet after a broker restart closes the channel (a retryable 404).
            with queue_unavailable_is_retryable():
                ch.basic_qos(prefetch_count=prefetch)
                gen = ch.consume(queue, arguments={"x-stream-offset": offset}, inactivity_timeout=wait_s)
                for item in gen:
                    if item == (None, None, None):
                        return
                    method, props, body = item
                    ch.basic_ack(method.delivery_tag)
                    yield (props.headers or {}).get("x-stream-offset"), props, body
        finally:
            _close_without_reject(ch)

    def _probe_offset(self) -> int:
        """Append a tiny probe message to the model stream and return the offset it got.

        Stream offsets are not message counts (osiris also gives offsets to internal entries, e.g. at
        segment roll-over, which consumers never see), and streams report no message count. With a single
        publisher, the first message appended after the probe is the first one a consumer starting at
        probe + 1 receives. The probe has no chunk headers, so readers skip it.
        """
        probe_id = f"probe-{uuid.uuid4().hex}"
        self.channel.basic_publish(self.names.model_exchange, self.names.MODELS_KEY, b"", pika.BasicProperties(
            message_id=probe_id, type="offset_probe", delivery_mode=2, user_id=sender(self.channel)), mandatory=True)
        for off, props, _ in self._read_stream(self.names.models, "last", 10.0, 16):
            if props.message_id == probe_id:
                return off
        raise RuntimeError(f"offset probe did not come back from {self.names.models}")

    def announcements(self, stop_at_version: int | None = None) -> list[messages.ModelVersion]:
        """Announcements in the index stream, oldest first (stops early at `stop_at_version`)."""
        out = []
        for _, _, body in self._read_stream(self.names.model_index, "first", self.index_wait_s, 256):
            msg = messages.decode(body)
            if isinstance(msg, messages.ModelVersion) and msg.experiment == self.names.experiment:
                out.append(msg)
                if stop_at_version is not None and msg.version == stop_at_version:
                    break
        return out

    def follow(self, channel) -> None:
        """Consume the model index from its last entry on (on `channel`, dedicated to it): `newest` is then
        the newest announcement seen, kept up to date by the connection's event processing."""
        channel.basic_qos(prefetch_count=64)

        def deliver(_ch, method, _props, body):
            channel.basic_ack(method.delivery_tag)
            try:
                msg = messages.decode(body)
            except messages.MessageError as exc:
                log.warning("model_index_invalid", error=str(exc))
                return
            if isinstance(msg, messages.ModelVersion) and msg.experiment == self.names.experiment:
                if self.newest is None or msg.version > self.newest.version:
                    self.newest = msg

        channel.basic_consume(self.names.model_index, deliver, arguments={"x-stream-offset": "last"})
        self._following = channel

    def unfollow(self) -> None:
        """Stop `follow`: close its channel without rejecting the deliveries pika still buffers (a stream
        answers basic.reject by closing the connection, see `_read_stream`), so the connection closes cleanly."""
        if self._following is not None:
            _close_without_reject(self._following)
            self._following = None

    def latest(self) -> messages.ModelVersion | None:
        anns = []
        for _, _, body in self._read_stream(self.names.model_index, "last", self.index_wait_s, 256):
            msg = messages.decode(body)
            if isinstance(msg, messages.ModelVersion) and msg.experiment == self.names.experiment:
                anns.append(msg)
        return max(anns, key=lambda a: a.version) if anns else None

    # -- publishing --------------------------------------------------------------------------------------
    def publish(self, version: int, payload: bytes | str | os.PathLike) -> messages.ModelVersion:
        """Append version `version` (bytes or a file) to the model stream and announce it. Single publisher."""
        with queue_unavailable_is_retryable():
            return self._publish(version, payload)

    def _publish(self, version: int, payload: bytes | str | os.PathLike) -> messages.ModelVersion:
        first = self._probe_offset() + 1
        props_base = dict(delivery_mode=2, content_type="application/octet-stream", type="model_chunk",
                          user_id=sender(self.channel))
        window = _ConfirmWindow(self.channel.connection, self.confirm_window)
        try:
            def send(body, headers):
                window.publish(self.names.model_exchange, self.names.MODELS_KEY, bytes(body),
                               pika.BasicProperties(headers=headers, **props_base))

            info = publish_chunked(send, payload, chunk_size=self.chunk_size, transfer_id=f"model-v{version}",
                                   headers={H_VERSION: version}, digest_in_last_chunk=True)
            window.wait_confirmed()  # every chunk is in the stream before the version is announced
        finally:
            window.close()
        ann = messages.ModelVersion(self.names.experiment, version, first, info.num_chunks, info.size,
                                    info.sha256, info.transfer_id, time.time())
        body = messages.encode(ann)
        props = pika.BasicProperties(delivery_mode=2, content_type="application/msgpack", type="model_version",
                                     user_id=sender(self.channel))
        self.channel.basic_publish(self.names.model_exchange, self.names.MODEL_INDEX_KEY, body, props, mandatory=True)
        self.channel.basic_publish(self.names.events, "model.version", body, props)
        log.info("model_published", version=version, bytes=info.size, chunks=info.num_chunks, offset=first)
        return ann

    # -- fetching -----------------------------------------------------------------------------------------
    def _prune_cache(self, keep: Path) -> None:
        """Delete all but the `cache_versions` newest cached versions (never `keep`, the one just fetched)."""
        if self.cache_versions is None:
            return
        cached = sorted(keep.parent.glob("model-v*.bin"))  # zero-padded versions: name order is version order
        for old in [p for p in cached if p != keep][:max(0, len(cached) - self.cache_versions)]:
            old.unlink(missing_ok=True)
            log.info("model_cache_pruned", path=str(old), keep=self.cache_versions)

    def cached_path(self, version: int) -> Path:
        return self.cache_dir / self.names.experiment / f"model-v{version:08d}.bin"

    def fetch(self, version: int | None = None, timeout_s: float = 300.0,
              announcement: messages.ModelVersion | None = None) -> FetchResult:
        """Get version `version` (None: the latest) from the cache or the stream; verified by sha256.

        announcement: the version's `ModelVersion` when the caller already has it (a worker following the
        index stream), which skips reading the index.
        """
        if announcement is not None:
            ann = announcement
        elif version is None:
            ann = self.latest()
            if ann is None:
                raise ModelNotFound(f"no model version published for {self.names.experiment}")
        else:
            found = [a for a in self.announcements(stop_at_version=version) if a.version == version]
            if not found:
                raise ModelNotFound(f"model version {version} of {self.names.experiment} is not in the index")
            ann = found[-1]
        path = self.cached_path(ann.version)
        if path.exists():
            if path.stat().st_size == ann.size_bytes and _sha256_file(path) == ann.sha256:
                return FetchResult(path, ann, 0, True)
            log.warning("model_cache_corrupt", version=ann.version, path=str(path))
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        # A stream redelivers nothing, so a per-chunk crc32 verdict buys nothing here: the sha256 of the whole,
        # checked at the last chunk, detects corruption (CorruptTransfer below).
        reasm = Reassembler(spill_threshold=0, spool_dir=str(path.parent), timeout_s=timeout_s, fsync=False,
                            verify_crc=False)
        read, done = 0, None
        deadline = time.monotonic() + timeout_s
        stream = self._read_stream(self.names.models, ann.stream_offset, min(timeout_s, 60.0), self.prefetch)
        for _off, props, body in stream:
            read += 1
            headers = props.headers or {}
            if is_chunk(headers):
                if headers.get("mqfed-transfer") == ann.transfer_id:
                    try:
                        done = reasm.add(headers, body).complete
                    except CorruptTransfer as exc:  # in the stream for good: no use reading it again
                        reasm.close()
                        raise ModelNotFound(f"model version {ann.version} in the stream is corrupt: {exc}") from exc
                elif isinstance(headers.get(H_VERSION), int) and headers[H_VERSION] > ann.version:
                    break  # a newer version began: ours is incomplete
            if done is not None or time.monotonic() > deadline:
                break
        if done is None:
            reasm.close()
            raise ModelNotFound(f"model version {ann.version}: version incomplete after reading {read} messages of {ann.num_chunks} chunks from the"
                                f" stream at offset {ann.stream_offset} (truncated by retention?)")
        done.save_to(path)
        log.info("model_fetched", version=ann.version, bytes=ann.size_bytes, chunks_read=read)
        self._prune_cache(path)
        return FetchResult(path, ann, read, False)
