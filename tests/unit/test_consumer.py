"""The one consumer settles every delivery exactly once, as its handler's Outcome says (an in-memory channel
stands in for pika's; tests/integration/test_messaging.py runs the same consumer on the real broker)."""
from __future__ import annotations

import types

import pytest

from common.learning.config import TrainConfig
from common.transport.consumer import MessageConsumer, Outcome
from common.wire import messages
from common.wire.chunks import publish_chunked

TASK = messages.TrainTask("exp", "run-1", "t1", 0, 4e9, "none", "kws-tiny", False, TrainConfig(steps=1))


class Channel:
    def __init__(self) -> None:
        self.settled: list[tuple[str, int]] = []

    def basic_qos(self, prefetch_count):
        self.prefetch = prefetch_count

    def basic_consume(self, queue, callback, consumer_tag=None):
        return "ctag"

    def basic_ack(self, tag):
        self.settled.append(("ack", tag))

    def basic_nack(self, tag, requeue=True):
        self.settled.append(("nack-requeue" if requeue else "dead-letter", tag))

    def basic_reject(self, tag, requeue=True):
        self.settled.append(("requeue" if requeue else "dead-letter", tag))


def deliver(consumer: MessageConsumer, body: bytes, tag: int = 1, headers: dict | None = None) -> None:
    consumer._on_delivery(types.SimpleNamespace(delivery_tag=tag),
                          types.SimpleNamespace(headers=headers, message_id="m", type=None), body)


@pytest.mark.parametrize("outcome, settled", [(Outcome.ACK, [("ack", 1)]), (Outcome.REQUEUE, [("requeue", 1)]),
                                              (Outcome.DEAD_LETTER, [("dead-letter", 1)]), (Outcome.DEFER, [])])
def test_each_outcome_settles_the_delivery_once_as_it_says(outcome, settled):
    ch = Channel()
    consumer = MessageConsumer(ch, "q", lambda delivery: outcome, prefetch=1)
    deliver(consumer, messages.encode(TASK))
    assert ch.settled == settled
    assert consumer.stats.dead_lettered == (1 if outcome is Outcome.DEAD_LETTER else 0)


def test_a_deferred_delivery_is_acked_when_the_handler_says_so():
    ch, tags = Channel(), []
    consumer = MessageConsumer(ch, "q", lambda delivery: tags.append(delivery.tag) or Outcome.DEFER)
    deliver(consumer, messages.encode(TASK), tag=7)
    assert ch.settled == []
    consumer.ack(tags)
    assert ch.settled == [("ack", 7)]


def test_a_handler_that_returns_no_outcome_is_a_bug_not_a_dead_letter():
    ch = Channel()
    consumer = MessageConsumer(ch, "q", lambda delivery: None)
    with pytest.raises(TypeError, match="not an Outcome"):
        deliver(consumer, messages.encode(TASK))
    assert ch.settled == []  # unsettled: redelivered when the channel closes


def test_a_handler_raising_a_message_error_dead_letters_and_the_consumer_goes_on():
    ch, seen = Channel(), []

    def handler(delivery):
        seen.append(delivery.tag)
        if delivery.tag == 1:
            raise messages.InvalidField("not for this queue")
        return Outcome.ACK

    consumer = MessageConsumer(ch, "q", handler)
    deliver(consumer, messages.encode(TASK), tag=1)
    deliver(consumer, messages.encode(TASK), tag=2)
    assert ch.settled == [("dead-letter", 1), ("ack", 2)] and seen == [1, 2]
    assert consumer.stats.rejected == {"InvalidField": 1}


def test_a_chunk_on_a_queue_that_takes_none_is_dead_lettered_unread():
    ch, seen = Channel(), []
    consumer = MessageConsumer(ch, "tasks", lambda delivery: seen.append(delivery) or Outcome.ACK, prefetch=1)
    chunks: list = []
    publish_chunked(lambda body, headers: chunks.append((bytes(body), headers)), b"x" * 100, chunk_size=40)
    for i, (body, headers) in enumerate(chunks):
        deliver(consumer, body, tag=i + 1, headers=headers)
    assert ch.settled == [("dead-letter", 1), ("dead-letter", 2), ("dead-letter", 3)] and seen == []
    assert consumer.stats.rejected == {"InvalidChunk": 3}
