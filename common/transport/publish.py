"""Publishing: one wire message, and one update payload (inline or chunked), both under publisher confirms
when the channel confirms. Every message carries the connection's broker user as `user_id` (RabbitMQ refuses
a publish whose user_id is not the connection's user, so a receiver can trust it). docs/messaging.md#publishing."""
from __future__ import annotations

import time
from typing import Callable

import pika

from common.wire import messages
from common.wire.chunks import H_COUNT, H_INDEX, publish_chunked


def sender(channel) -> str | None:
    """The broker user of `channel`'s connection (set by common.transport.connection.connect), or None."""
    return getattr(getattr(channel, "connection", None), "broker_user", None)


def publish_message(channel, exchange: str, routing_key: str, msg: messages.Message, mandatory: bool = True,
                    **props) -> None:
    """Publish one wire message (persistent, `type` = its tag, content type msgpack).

    mandatory: raise `pika.exceptions.UnroutableError` (on a confirming channel) when no queue takes it;
    events pass False, since nobody may be listening.
    """
    props.setdefault("user_id", sender(channel))
    channel.basic_publish(exchange, routing_key, messages.encode(msg), pika.BasicProperties(
        content_type="application/msgpack", delivery_mode=2, type=messages.type_tag(msg),
        timestamp=int(time.time()), **props), mandatory=mandatory)


def publish_payload(channel, exchange: str, routing_key: str, data: bytes, *, inline_max_bytes: int,
                    chunk_bytes: int, after_chunk: Callable[[int, int], None] | None = None) -> messages.PayloadRef:
    """Where `data` travels for the message that will carry it: inline up to `inline_max_bytes`, else as
    chunks of `chunk_bytes` published (and, on a confirming channel, confirmed) now. `after_chunk(index,
    count)` runs after each chunk (failpoints)."""
    if len(data) <= inline_max_bytes:
        return messages.PayloadRef(inline=data)

    user_id = sender(channel)

    def send(chunk, headers) -> None:
        channel.basic_publish(exchange, routing_key, bytes(chunk),
                              pika.BasicProperties(headers=headers, delivery_mode=2, user_id=user_id), mandatory=True)
        if after_chunk is not None:
            after_chunk(headers[H_INDEX], headers[H_COUNT])

    return messages.PayloadRef(transfer_id=publish_chunked(send, data, chunk_size=chunk_bytes).transfer_id)
