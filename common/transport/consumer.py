"""One consumer for both daemons: wire messages (and the chunked payloads they reference) from one queue,
each delivery settled exactly once by an explicit `Outcome`. Behaviour and reasoning: docs/messaging.md#consuming.

Contract:
- A chunk (headers carry `mqfed-transfer`) goes to the `Reassembler` and is acked when it says the chunk is
  durably handled; a queue that takes no chunks (`reassembler=None`) dead-letters them.
- Any other body is decoded strictly; the handler gets a `Delivery` (`payload` None when the transfer it
  names has not arrived) and returns an `Outcome`. A decoding error, a payload whose size differs from the
  message's `wire_bytes`, or a handler raising `MessageError` dead-letters the delivery (one log line,
  counted in `stats`); other exceptions propagate.
- Deliveries are handled by `poll()`, outside pika's callback, so a handler may do broker I/O of its own.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import time
from typing import Callable

import pika

from common.logs import get_logger
from common.wire import messages
from common.wire.chunks import ChunkError, CompletedTransfer, InvalidChunk, Reassembler, is_chunk

log = get_logger(__name__)


class Outcome(enum.Enum):
    """How a handler settles its delivery."""

    ACK = "ack"                  # done: acknowledge now
    DEFER = "defer"              # the handler acknowledges `delivery.tag` later, with `MessageConsumer.ack`
    REQUEUE = "requeue"          # not done here: back to the queue for another consumer
    DEAD_LETTER = "dead_letter"  # cannot be done anywhere: to the dead-letter queue (the handler logged why)


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One decoded message; `payload` is its completed chunked transfer, closed after the handler returns."""

    message: messages.Message
    payload: CompletedTransfer | None
    tag: int
    properties: pika.BasicProperties


Handler = Callable[[Delivery], Outcome]


@dataclasses.dataclass
class ConsumerStats:
    """What the consumer saw since it started. dead_lettered: deliveries rejected to the dead-letter
    exchange; rejected: the same, by error type (MalformedMessage, InvalidField, CorruptTransfer, ...; a
    handler's own verdict counts as `handler`). unclaimed_payloads: completed transfers no message claimed
    within the timeout (dropped; their chunks were acknowledged)."""

    messages: int = 0
    chunks: int = 0
    dead_lettered: int = 0
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    unclaimed_payloads: int = 0
    max_unserved_s: float = 0.0  # the longest time between two reads of the connection by `poll`


class MessageConsumer:
    """Consume `queue` on `channel`, calling `handler(delivery) -> Outcome` for every valid message.

    prefetch: unacked deliveries the broker may push (bounds memory: prefetch x chunk size).
    reassembler: where chunks go; None: this queue takes no chunks.
    """

    def __init__(self, channel, queue: str, handler: Handler, prefetch: int = 4,
                 reassembler: Reassembler | None = None, consumer_tag: str | None = None):
        self.channel, self.queue, self.handler = channel, queue, handler
        self.reassembler = reassembler
        self.payloads: dict[str, CompletedTransfer] = {}
        self._payload_since: dict[str, float] = {}
        self.stats = ConsumerStats()
        self._inbox: collections.deque = collections.deque()
        self._served_at: float | None = None
        channel.basic_qos(prefetch_count=prefetch)
        self.tag = channel.basic_consume(queue, lambda _ch, *delivery: self._inbox.append(delivery),
                                         consumer_tag=consumer_tag)

    def _count(self, kind: str, count: int) -> None:
        self.stats.rejected[kind] = self.stats.rejected.get(kind, 0) + count

    def _reject(self, tags: list, kind: str, reason: str, **kw) -> None:
        count = 0
        for tag in tags:
            if tag is not None:
                self.channel.basic_nack(tag, requeue=False)
                count += 1
        if count == 0:  # a spooled transfer: its chunks were acknowledged as they were stored
            self._count(kind, 1)
            log.warning("transfer_dropped", queue=self.queue, error=kind, reason=reason, **kw)
            return
        self.stats.dead_lettered += count
        self._count(kind, count)
        log.warning("message_dead_lettered", queue=self.queue, error=kind, reason=reason, count=count, **kw)

    def _on_chunk(self, tag: int, props: pika.BasicProperties, body: bytes) -> None:
        self.stats.chunks += 1
        try:
            if self.reassembler is None:
                raise InvalidChunk(f"queue {self.queue} takes no chunked transfers", props.headers.get("mqfed-transfer"))
            res = self.reassembler.add(props.headers, body, tag)
        except ChunkError as exc:
            self._reject(exc.tokens or [tag], type(exc).__name__, str(exc), transfer_id=exc.transfer_id)
            return
        if res.complete is not None:
            self.payloads[res.complete.transfer_id] = res.complete
            self._payload_since[res.complete.transfer_id] = time.monotonic()
        for t in res.ack:
            self.channel.basic_ack(t)

    def _claim(self, msg: messages.Message) -> CompletedTransfer | None:
        """The payload `msg` references (popped; None when it has not arrived: the handler decides whether it
        needs it), after checking its declared size; raises InvalidField."""
        ref = getattr(msg, "payload", None)
        payload = None
        if ref is not None and ref.transfer_id is not None:
            payload = self.payloads.pop(ref.transfer_id, None)
            self._payload_since.pop(ref.transfer_id, None)
            if payload is None:
                return None
        declared = getattr(msg, "wire_bytes", None)
        if ref is not None and declared is not None:
            size = payload.size if payload is not None else len(ref.inline)
            if declared != size:
                if payload is not None:
                    payload.close()
                raise messages.InvalidField(f"{messages.type_tag(msg)} declares wire_bytes={declared} but its"
                                            f" payload has {size} bytes")
        return payload

    def _on_delivery(self, method, props: pika.BasicProperties, body: bytes) -> None:
        tag = method.delivery_tag
        if is_chunk(props.headers):
            self._on_chunk(tag, props, body)
            return
        self.stats.messages += 1
        try:
            msg = messages.decode(body)
            payload = self._claim(msg)
            try:
                outcome = self.handler(Delivery(msg, payload, tag, props))
            finally:
                if payload is not None:
                    payload.close()
        except messages.MessageError as exc:
            self._reject([tag], type(exc).__name__, f"{type(exc).__name__}: {exc}", message_id=props.message_id,
                         type=props.type)
            return
        self.settle(tag, outcome)

    def settle(self, tag: int, outcome: Outcome) -> None:
        """Settle one delivery as `outcome` says (DEFER: leave it to a later `ack`)."""
        if outcome is Outcome.ACK:
            self.channel.basic_ack(tag)
        elif outcome is Outcome.REQUEUE:
            self.channel.basic_reject(tag, requeue=True)
        elif outcome is Outcome.DEAD_LETTER:
            self.channel.basic_nack(tag, requeue=False)
            self.stats.dead_lettered += 1
            self._count("handler", 1)
        elif outcome is not Outcome.DEFER:
            raise TypeError(f"a handler of {self.queue} returned {outcome!r}, not an Outcome")

    def recover(self) -> int:
        """Take over the payloads a journaled reassembler finds completed on disk (their messages come again);
        returns how many."""
        done = self.reassembler.recover() if self.reassembler is not None else []
        for transfer in done:
            self.payloads[transfer.transfer_id] = transfer
            self._payload_since[transfer.transfer_id] = time.monotonic()
        return len(done)

    def release(self) -> None:
        """Let go of this consumer's files without deleting them (a new session recovers them)."""
        if self.reassembler is not None:
            self.reassembler.release()
        self.payloads.clear()
        self._payload_since.clear()

    def ack(self, tags: list[int]) -> None:
        """Acknowledge deliveries a handler deferred (see Outcome.DEFER)."""
        for tag in tags:
            self.channel.basic_ack(tag)

    def expire(self) -> None:
        """Reject transfers that stalled, and drop completed payloads no message claimed in time."""
        if self.reassembler is None:
            return
        for err in self.reassembler.expire():
            self._reject(err.tokens, type(err).__name__, str(err), transfer_id=err.transfer_id,
                         missing=err.missing[:10])
        now = time.monotonic()
        for tid, since in list(self._payload_since.items()):
            if now - since >= self.reassembler.timeout_s:
                self._payload_since.pop(tid)
                self.payloads.pop(tid).close()
                self.stats.unclaimed_payloads += 1
                log.warning("payload_unclaimed", queue=self.queue, transfer_id=tid)

    def poll(self, connection, time_limit: float = 0.2) -> None:
        """Wait up to `time_limit` for deliveries, handle what arrived, check transfer timeouts."""
        now = time.monotonic()
        if self._served_at is not None:
            self.stats.max_unserved_s = max(self.stats.max_unserved_s, now - self._served_at)
        connection.process_data_events(time_limit=time_limit)
        self._served_at = time.monotonic()
        while self._inbox:
            self._on_delivery(*self._inbox.popleft())
        self.expire()

    def run(self, connection, until: Callable[[], bool] = lambda: False, tick_s: float = 1.0) -> None:
        """Process deliveries until `until()`, then cancel the consumer."""
        while not until():
            self.poll(connection, tick_s)
        if self.channel.is_open:
            self.channel.basic_cancel(self.tag)
