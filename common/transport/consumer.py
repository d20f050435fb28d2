"""Consume wire messages (and the chunked payloads they reference) from one queue, robustly.

- A chunk (headers carry `mqfed-transfer`) goes to a `Reassembler`; its delivery is acked once the
  reassembler says it is durably handled. A completed payload waits (by transfer id) for the message that
  references it (`Update.payload.transfer_id`).
- Any other body is decoded with `common.wire.messages.decode`. Malformed msgpack, an unknown type or schema
  version, a corrupt/incomplete transfer, or a handler raising `MessageError` is rejected with
  `basic_nack(requeue=False)`, so it ends in the queue's dead-letter exchange, with one clear log line; the
  consumer keeps running. Other handler exceptions propagate (the message is then redelivered).
  `stats` counts what was dead-lettered, by error type.
- A message whose `wire_bytes` differs from the size of the payload it carries (inline or transferred) is
  rejected the same way: declared sizes that lie are refused, not merely logged.
- A completed payload that no message claims within the reassembler's timeout is dropped (and logged).
- Deliveries are queued by pika's callback and handled by `poll()` / `run()` afterwards, outside pika's
  callback: a handler may then do broker I/O of its own on the same connection (publish with confirms,
  read a stream), which pika would not dispatch from inside a callback.
- A handler that returns `DEFER` takes over the acknowledgement: it keeps `consumer.current_tag` and acks
  it later with `consumer.ack(tags)` (the coordinator acks buffered updates only once a checkpoint holds
  them). A deferred delivery that is never acked is redelivered when the channel closes.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

import pika

from common.logs import get_logger
from common.wire import messages
from common.wire.chunks import ChunkError, CompletedTransfer, Reassembler, is_chunk

log = get_logger(__name__)
Handler = Callable[[messages.Message, "CompletedTransfer | None"], object]
DEFER = "defer"  # handler return value: the handler acks `consumer.current_tag` itself, later


@dataclasses.dataclass
class ConsumerStats:
    """What the consumer saw since it started. dead_lettered: deliveries rejected to the dead-letter
    exchange; rejected: the same, by error type (MalformedMessage, UnsupportedSchemaVersion, InvalidField,
    CorruptTransfer, IncompleteTransfer, InvalidChunk, ...). unclaimed_payloads: completed transfers no
    message claimed within the timeout (dropped; their chunks were acknowledged)."""

    messages: int = 0
    chunks: int = 0
    dead_lettered: int = 0
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    unclaimed_payloads: int = 0


class MessageConsumer:
    """Consume `queue` on `channel`, calling `handler(message, payload)` for every valid message.

    prefetch: unacked deliveries the broker may push (bounds memory: prefetch x chunk size).
    reassembler: where chunks go (default: spill above 64 MiB to the temp dir).
    """

    def __init__(self, channel, queue: str, handler: Handler, prefetch: int = 4,
                 reassembler: Reassembler | None = None, consumer_tag: str | None = None):
        self.channel, self.queue, self.handler = channel, queue, handler
        self.reassembler = reassembler or Reassembler()
        self.payloads: dict[str, CompletedTransfer] = {}
        self._payload_since: dict[str, float] = {}
        self.stats = ConsumerStats()
        self.current_tag: int | None = None
        self._stop = False
        self._inbox: collections.deque = collections.deque()
        channel.basic_qos(prefetch_count=prefetch)
        self.tag = channel.basic_consume(queue, lambda _ch, *delivery: self._inbox.append(delivery),
                                         consumer_tag=consumer_tag)

    def _reject(self, tags: list, error: Exception, reason: str, **kw) -> None:
        count = 0
        for tag in tags:
            if tag is not None:
                self.channel.basic_nack(tag, requeue=False)
                count += 1
        kind = type(error).__name__
        if count == 0:  # a spooled transfer: its chunks were acknowledged as they were stored
            self.stats.rejected[kind] = self.stats.rejected.get(kind, 0) + 1
            log.warning("transfer_dropped", queue=self.queue, error=kind, reason=reason, **kw)
            return
        self.stats.dead_lettered += count
        self.stats.rejected[kind] = self.stats.rejected.get(kind, 0) + count
        log.warning("message_dead_lettered", queue=self.queue, error=kind, reason=reason, count=count, **kw)

    def _on_delivery(self, method, props: pika.BasicProperties, body: bytes) -> None:
        ch = self.channel
        tag = method.delivery_tag
        if is_chunk(props.headers):
            self.stats.chunks += 1
            try:
                res = self.reassembler.add(props.headers, body, tag)
            except ChunkError as exc:
                self._reject(exc.tokens or [tag], exc, str(exc), transfer_id=exc.transfer_id)
                return
            if res.complete is not None:
                self.payloads[res.complete.transfer_id] = res.complete
                self._payload_since[res.complete.transfer_id] = time.monotonic()
            for t in res.ack:
                ch.basic_ack(t)
            return
        self.stats.messages += 1
        try:
            msg = messages.decode(body)
            payload = None
            ref = getattr(msg, "payload", None)
            if ref is not None and ref.transfer_id is not None:
                payload = self.payloads.pop(ref.transfer_id, None)
                self._payload_since.pop(ref.transfer_id, None)
                if payload is None:
                    raise messages.InvalidField(f"payload transfer {ref.transfer_id} not received (or incomplete)")
            declared = getattr(msg, "wire_bytes", None)
            if ref is not None and declared is not None:
                size = payload.size if payload is not None else len(ref.inline)
                if declared != size:
                    if payload is not None:
                        payload.close()
                    raise messages.InvalidField(f"{messages.type_tag(msg)} declares wire_bytes={declared} but its"
                                                f" payload has {size} bytes")
            self.current_tag = tag
            try:
                outcome = self.handler(msg, payload)
            finally:
                self.current_tag = None
                if payload is not None:
                    payload.close()
        except messages.MessageError as exc:
            self._reject([tag], exc, f"{type(exc).__name__}: {exc}", message_id=props.message_id, type=props.type)
            return
        if outcome != DEFER:
            ch.basic_ack(tag)

    def ack(self, tags: list[int]) -> None:
        """Acknowledge deliveries a handler deferred (see DEFER)."""
        for tag in tags:
            self.channel.basic_ack(tag)

    def expire(self) -> None:
        """Reject transfers that stalled, and drop completed payloads no message claimed in time."""
        for err in self.reassembler.expire():
            self._reject(err.tokens, err, str(err), transfer_id=err.transfer_id, missing=err.missing[:10])
        now = time.monotonic()
        for tid, since in list(self._payload_since.items()):
            if now - since >= self.reassembler.timeout_s:
                self._payload_since.pop(tid)
                self.payloads.pop(tid).close()
                self.stats.unclaimed_payloads += 1
                log.warning("payload_unclaimed", queue=self.queue, transfer_id=tid)

    def stop(self) -> None:
        self._stop = True

    def poll(self, connection, time_limit: float = 0.2) -> None:
        """Wait up to `time_limit` for deliveries, handle what arrived, check transfer timeouts."""
        connection.process_data_events(time_limit=time_limit)
        while self._inbox:
            self._on_delivery(*self._inbox.popleft())
        self.expire()

    def run(self, connection, until: Callable[[], bool] = lambda: False, tick_s: float = 1.0) -> None:
        """Process deliveries until `stop()` or `until()`."""
        while not self._stop and not until():
            self.poll(connection, tick_s)
        if self.channel.is_open:
            self.channel.basic_cancel(self.tag)


def publish_message(channel, exchange: str, routing_key: str, msg: messages.Message, mandatory: bool = True,
                    **props) -> None:
    """Publish one wire message (persistent, `type` = its tag, content type msgpack).

    mandatory: raise `pika.exceptions.UnroutableError` (on a confirming channel) when no queue takes it;
    events pass False, since nobody may be listening.
    """
    channel.basic_publish(exchange, routing_key, messages.encode(msg), pika.BasicProperties(
        content_type="application/msgpack", delivery_mode=2, type=messages.type_tag(msg),
        timestamp=int(time.time()), **props), mandatory=mandatory)
