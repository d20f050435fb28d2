"""Connecting to RabbitMQ: one place for the URL, connection names, heartbeats, TLS and reconnects.

`AMQP_URL` (default ``amqp://guest:guest@localhost:5672/%2F``) names the broker; ``amqps://`` turns on TLS
(system CA store; `AMQP_CA_FILE` adds a CA bundle). Every connection names itself
``{role}:{node}:{device}`` so the management UI shows who is who.
"""
from __future__ import annotations

import os
import socket
import ssl
import time
from typing import Callable, TypeVar

import pika
import pika.exceptions

from common.logs import get_logger

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
log = get_logger(__name__)
T = TypeVar("T")

RETRYABLE = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.StreamLostError,
    pika.exceptions.ConnectionClosedByBroker,
    pika.exceptions.ChannelWrongStateError,
    ConnectionError,
    socket.gaierror,
)


def amqp_url(url: str | None = None) -> str:
    return url or os.environ.get("AMQP_URL") or DEFAULT_URL


def connection_name(role: str, node: str | None = None, device: str | None = None) -> str:
    return f"{role}:{node or socket.gethostname()}:{device or '-'}"


def parameters(role: str, node: str | None = None, device: str | None = None, url: str | None = None,
               heartbeat: int = 60, frame_max: int | None = None) -> pika.URLParameters:
    """pika parameters for `url` with heartbeats, a connection name and TLS for amqps://."""
    params = pika.URLParameters(amqp_url(url))
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 300
    params.connection_attempts = 1
    params.client_properties = {"connection_name": connection_name(role, node, device), "product": "mqfed"}
    if frame_max:
        params.frame_max = frame_max
    if amqp_url(url).startswith("amqps://"):
        ctx = ssl.create_default_context(cafile=os.environ.get("AMQP_CA_FILE"))
        params.ssl_options = pika.SSLOptions(ctx, params.host)
    return params


def connect(role: str, node: str | None = None, device: str | None = None, url: str | None = None,
            attempts: int = 0, initial_delay: float = 0.5, max_delay: float = 30.0,
            **kwargs) -> pika.BlockingConnection:
    """Open a blocking connection, retrying with exponential back-off (attempts=0: forever)."""
    params = parameters(role, node, device, url, **kwargs)
    delay, attempt = initial_delay, 0
    while True:
        attempt += 1
        try:
            return pika.BlockingConnection(params)
        except RETRYABLE as exc:
            if attempts and attempt >= attempts:
                raise
            log.warning("amqp_connect_failed", host=params.host, port=params.port, attempt=attempt,
                        retry_in_s=round(delay, 2), error=repr(exc))
            time.sleep(delay)
            delay = min(max_delay, delay * 2)


def run_forever(body: Callable[[pika.BlockingConnection], T], role: str, node: str | None = None,
                device: str | None = None, url: str | None = None, max_delay: float = 30.0) -> T:
    """Run `body(connection)`; when the connection drops, reconnect with back-off and run it again.

    `body` must be restartable (declare topology, set up consumers, loop). Returns what `body` returns.
    """
    delay = 0.5
    while True:
        conn = connect(role, node, device, url, max_delay=max_delay)
        try:
            result = body(conn)
            if conn.is_open:
                conn.close()
            return result
        except RETRYABLE as exc:
            log.warning("amqp_connection_lost", role=role, retry_in_s=round(delay, 2), error=repr(exc))
            time.sleep(delay)
            delay = min(max_delay, delay * 2)
