"""Connecting to RabbitMQ: one place for the URL, connection names, heartbeats, TLS and reconnects.

`AMQP_URL` (default ``amqp://guest:guest@localhost:5672/%2F``) names the broker. Every connection names itself
``{role}:{node}:{device}`` so the management UI shows who is who.

A RabbitMQ cluster (docs/cluster.md): `AMQP_URL` lists its nodes as full URLs separated by commas
(``amqp://u:p@rabbit-1:5672/%2F,amqp://u:p@rabbit-2:5672/%2F,...``), all with the same scheme, user,
password and vhost (`amqp_urls` checks it and raises `BrokerUrlError` naming the item). `connect()` tries
the nodes in turn: each process starts at a node of its own (chosen at random, then the node after the one
it last connected to), and a node that failed within `FAILED_NODE_S` is tried last, so a dead node costs
one failed attempt, not one per reconnect. A connection lost with its node (`RETRYABLE`) is answered by
the reconnect loops (`run_forever`, the daemons) as for a single broker: they come back on another node.

TLS (docs/tls.md): ``amqps://`` turns it on, with these variables (read only for amqps:// URLs):

- `AMQP_CA_FILE`: trust exactly the CAs in this PEM bundle, *instead of* the system trust store (a broker
  whose certificate chains to a public CA only is then refused). Unset: the system store.
- `AMQP_CERT_FILE` + `AMQP_KEY_FILE`: the client certificate (PEM, chain allowed) and its private key,
  presented to the broker; both or neither. `AMQP_KEY_PASSWORD`: the key's passphrase, if it has one.
- `AMQP_AUTH`: `plain` (default: user and password from the URL) or `external` (SASL EXTERNAL: the broker
  takes the user name from the client certificate; needs amqps:// and a client certificate; the URL's
  user and password are not sent).

The broker's certificate must name the URL's host (check_hostname): with a certificate for ``localhost``,
connect to ``amqps://localhost:5671/`` rather than ``amqps://127.0.0.1:5671/``. Incomplete or unreadable
settings raise `TlsConfigError` naming the variable and the path.
"""
from __future__ import annotations

import contextlib
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Callable, Iterator, Mapping, TypeVar

import pika
import pika.credentials
import pika.exceptions

from common.errors import MqfedError
from common.logs import get_logger

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
log = get_logger(__name__)
T = TypeVar("T")

QUEUE_DOWN = "is down or inaccessible"


class QueueUnavailable(MqfedError, pika.exceptions.ChannelClosedByBroker):
    """The broker answers, but a durable queue of ours is not back yet: RabbitMQ closed the channel with
    404 "home node ... of durable queue ... is down or inaccessible".

    A node that restarts accepts connections a moment (about 1-2 s here) before its streams and quorum
    queues run again; a client that reconnects in that window, e.g. after a back-off, gets this on its
    first declare or consume. Transient, unlike the other 404s (a queue that was never declared): it is in
    `RETRYABLE`, so the coordinator and the workers reconnect with back-off and resume. Raised by
    `queue_unavailable_is_retryable()` in place of pika's ChannelClosedByBroker (still an instance of it).
    """


def is_queue_unavailable(exc: BaseException) -> bool:
    return (isinstance(exc, pika.exceptions.ChannelClosedByBroker) and exc.reply_code == 404
            and QUEUE_DOWN in str(exc.reply_text))


@contextlib.contextmanager
def queue_unavailable_is_retryable() -> Iterator[None]:
    """Turn a channel closed because a durable queue is still down into `QueueUnavailable` (retryable)."""
    try:
        yield
    except pika.exceptions.ChannelClosedByBroker as exc:
        if is_queue_unavailable(exc) and not isinstance(exc, QueueUnavailable):
            raise QueueUnavailable(exc.reply_code, exc.reply_text) from exc
        raise


# What means "the broker went away, or is coming back": reconnect with back-off and resume. Broker
# restarts raise ConnectionClosedByBroker (320 CONNECTION_FORCED, graceful), StreamLostError (socket
# reset, abrupt), AMQPHeartbeatTimeout (a broker that hangs), AMQPConnectionError (refused while it is
# down), QueueUnavailable (up again, queues not yet: see above).
RETRYABLE = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.StreamLostError,
    pika.exceptions.ConnectionClosedByBroker,
    pika.exceptions.ChannelWrongStateError,
    QueueUnavailable,
    ConnectionError,
    socket.gaierror,
)


def amqp_url(url: str | None = None) -> str:
    """`url`, else AMQP_URL, else the default: one broker URL or a comma-separated list (a cluster)."""
    return url or os.environ.get("AMQP_URL") or DEFAULT_URL


class BrokerUrlError(MqfedError):
    """AMQP_URL lists several nodes but an item is not a full amqp:// or amqps:// URL, or the items differ
    in scheme, user, password or vhost, or name one node twice; the message names the items and what is
    wrong (never a password)."""


def _vhost(path: str) -> str:
    """The vhost a URL path names, as pika reads it ("" and "/" are the default vhost "/")."""
    return urllib.parse.unquote(path.split("/")[1]) if len(path) > 1 else "/"


def amqp_urls(url: str | None = None) -> list[str]:
    """The node URLs in `url` (default AMQP_URL, see `amqp_url`), in the order given.

    One URL (no comma) is returned as it is, unchecked (pika reads it, as it always did). A list must be
    full URLs separated by commas (spaces around them are ignored) with one scheme (amqp or amqps), one
    user and password, one vhost, each node once; otherwise `BrokerUrlError`. A comma inside a password
    must be percent-encoded (%2C).
    """
    raw = amqp_url(url)
    if "," not in raw:
        return [raw]
    items = [item.strip() for item in raw.split(",")]
    n = len(items)
    hint = ("AMQP_URL lists a cluster's nodes as full URLs separated by commas, e.g."
            " amqp://user:pass@host-1:5672/%2F,amqp://user:pass@host-2:5672/%2F (a comma inside a password"
            " is written %2C)")
    seen: dict[tuple[str, int], int] = {}
    first: tuple[str, str | None, str | None, str] | None = None
    for i, item in enumerate(items, 1):
        if not item:
            raise BrokerUrlError(f"AMQP_URL: item {i} of {n} is empty (a doubled, leading or trailing comma?)."
                                 f" {hint}")
        try:
            parsed = urllib.parse.urlparse(item)
            scheme, host, port = parsed.scheme.lower(), parsed.hostname, parsed.port
        except ValueError:  # a port that is not a number (e.g. part of a password cut at a comma): not shown
            raise BrokerUrlError(f"AMQP_URL: item {i} of {n} has no valid host and port. {hint}") from None
        if scheme not in ("amqp", "amqps") or not parsed.netloc:
            raise BrokerUrlError(f"AMQP_URL: item {i} of {n} is not an amqp:// or amqps:// URL. {hint}")
        if not host:
            raise BrokerUrlError(f"AMQP_URL: item {i} of {n} names no host. {hint}")
        address = (host, port or (5671 if scheme == "amqps" else 5672))
        if address in seen:
            raise BrokerUrlError(f"AMQP_URL: items {seen[address]} and {i} name the same node"
                                 f" {address[0]}:{address[1]}")
        seen[address] = i
        user = urllib.parse.unquote(parsed.username) if parsed.username is not None else None
        password = urllib.parse.unquote(parsed.password) if parsed.password is not None else None
        this = (scheme, user, password, _vhost(parsed.path))
        if first is None:
            first = this
            continue
        if this[0] != first[0]:
            raise BrokerUrlError(f"AMQP_URL mixes {first[0]}:// (item 1) and {this[0]}:// (item {i}): every"
                                 " node of a cluster is reached the same way, with the same TLS settings")
        if this[1] != first[1]:
            raise BrokerUrlError(f"AMQP_URL names user {first[1]!r} in item 1 but {this[1]!r} in item {i}: a"
                                 " process logs in as one user (the user_id its messages carry) on every node")
        if this[2] != first[2]:
            raise BrokerUrlError(f"AMQP_URL gives user {first[1]!r} another password in item {i} than in item"
                                 " 1: users are the same on every node of a cluster")
        if this[3] != first[3]:
            raise BrokerUrlError(f"AMQP_URL names vhost {first[3]!r} in item 1 but {this[3]!r} in item {i}:"
                                 " an experiment's queues live in one vhost")
    return items


def url_host(hostname: str) -> str:
    """`hostname` as it goes into a URL (an IPv6 address in brackets)."""
    return f"[{hostname}]" if ":" in hostname else hostname


def connection_name(role: str, node: str | None = None, device: str | None = None) -> str:
    return f"{role}:{node or socket.gethostname()}:{device or '-'}"


class TlsConfigError(MqfedError):
    """The TLS or authentication settings (AMQP_CA_FILE, AMQP_CERT_FILE, AMQP_KEY_FILE, AMQP_KEY_PASSWORD,
    AMQP_AUTH) are incomplete, contradictory or name a file that cannot be read; the message names them."""


def _tls_file(env: Mapping[str, str], var: str) -> str | None:
    path = env.get(var) or None
    if path is not None and not os.path.isfile(path):
        raise TlsConfigError(f"{var}={path}: no such file")
    return path


def tls_context(env: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """The client's SSLContext from `env` (default os.environ), as the module doc describes: verifies the
    broker's certificate and host name against AMQP_CA_FILE only (when set) or the system store, and
    presents AMQP_CERT_FILE/AMQP_KEY_FILE (when set). Raises `TlsConfigError` on bad settings."""
    env = os.environ if env is None else env
    cert, key = env.get("AMQP_CERT_FILE") or None, env.get("AMQP_KEY_FILE") or None
    if (cert is None) != (key is None):
        given, missing = ("AMQP_CERT_FILE", "AMQP_KEY_FILE") if cert else ("AMQP_KEY_FILE", "AMQP_CERT_FILE")
        raise TlsConfigError(f"{given} is set but {missing} is not: a client certificate needs both"
                             " AMQP_CERT_FILE (the certificate) and AMQP_KEY_FILE (its private key)")
    ca, cert, key = (_tls_file(env, v) for v in ("AMQP_CA_FILE", "AMQP_CERT_FILE", "AMQP_KEY_FILE"))
    try:
        # cafile given: only its CAs are trusted (create_default_context loads the system store only
        # without one). Hostname checks and certificate verification are on.
        ctx = ssl.create_default_context(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"AMQP_CA_FILE={ca}: cannot load it as a PEM CA bundle ({exc})") from exc
    if cert is not None:
        try:
            ctx.load_cert_chain(cert, key, password=env.get("AMQP_KEY_PASSWORD") or None)
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(f"AMQP_CERT_FILE={cert} / AMQP_KEY_FILE={key}: cannot load the client"
                                 f" certificate and key (not PEM, not a pair, or a wrong or missing"
                                 f" AMQP_KEY_PASSWORD: {exc})") from exc
    return ctx


def _auth(env: Mapping[str, str]) -> str:
    return (env.get("AMQP_AUTH") or "plain").strip().lower()


def sasl_mechanism(env: Mapping[str, str] | None = None, *, tls: bool) -> str:
    """`plain` or `external` from AMQP_AUTH in `env` (default os.environ; unset: plain). `external` needs
    TLS (`tls`, an amqps:// URL) and a client certificate; anything else raises `TlsConfigError`."""
    env = os.environ if env is None else env
    auth = _auth(env)
    if auth not in ("plain", "external"):
        raise TlsConfigError(f"AMQP_AUTH={env.get('AMQP_AUTH')!r}: expected 'plain' (user and password from"
                             " AMQP_URL) or 'external' (the user named by the client certificate)")
    if auth == "external" and not (tls and env.get("AMQP_CERT_FILE")):
        raise TlsConfigError("AMQP_AUTH=external needs an amqps:// AMQP_URL and a client certificate"
                             " (AMQP_CERT_FILE and AMQP_KEY_FILE)")
    return auth


def parameters(role: str, node: str | None = None, device: str | None = None, url: str | None = None,
               heartbeat: int = 60, frame_max: int | None = None) -> pika.URLParameters:
    """pika parameters for `url` with heartbeats, a connection name and TLS for amqps://. For a list of
    nodes, those of the first (`node_parameters` gives every node's)."""
    return node_parameters(role, node, device, url, heartbeat, frame_max)[0]


def node_parameters(role: str, node: str | None = None, device: str | None = None, url: str | None = None,
                    heartbeat: int = 60, frame_max: int | None = None) -> list[pika.URLParameters]:
    """`parameters` for each node of `url` (see `amqp_urls`), in the order listed; TLS checks each node's
    own host name."""
    out = []
    for node_url in amqp_urls(url):
        params = pika.URLParameters(node_url)
        params.heartbeat = heartbeat
        params.blocked_connection_timeout = 300
        params.connection_attempts = 1
        params.client_properties = {"connection_name": connection_name(role, node, device), "product": "mqfed"}
        if frame_max:
            params.frame_max = frame_max
        tls = node_url.startswith("amqps://")
        if tls:
            params.ssl_options = pika.SSLOptions(tls_context(), server_hostname=params.host)
        if sasl_mechanism(tls=tls) == "external":
            params.credentials = pika.credentials.ExternalCredentials()
        out.append(params)
    return out


#: A node a connection attempt failed on is tried after the others for this long (seconds).
FAILED_NODE_S = 30.0
_order_lock = threading.Lock()
_next_node: dict[tuple[str, ...], int] = {}  # node list -> the node this process tries first next time
_failed_at: dict[str, float] = {}  # "host:port" -> monotonic time of its last failed attempt


def _address(params: pika.URLParameters) -> str:
    return f"{params.host}:{params.port}"


def node_order(addresses: list[str], now: float | None = None) -> list[int]:
    """The order in which to try the nodes `addresses` ("host:port"): from this process's next node on
    (chosen at random on first use, so processes spread over the cluster), nodes that failed within
    `FAILED_NODE_S` last. One node: [0]."""
    if len(addresses) == 1:
        return [0]
    now = time.monotonic() if now is None else now
    with _order_lock:
        start = _next_node.setdefault(tuple(addresses), random.randrange(len(addresses)))
        recent = {a for a in addresses if now - _failed_at.get(a, -FAILED_NODE_S) < FAILED_NODE_S}
    rotated = [(start + k) % len(addresses) for k in range(len(addresses))]
    return sorted(rotated, key=lambda i: addresses[i] in recent)  # stable: the rotation, failed ones last


def _node_result(addresses: list[str], index: int, ok: bool) -> None:
    """Remember how an attempt on node `index` went: after a success the next connection starts at the
    node after it (a process's connections spread too); a failure sends it to the back for a while."""
    if len(addresses) == 1:
        return
    with _order_lock:
        if ok:
            _next_node[tuple(addresses)] = (index + 1) % len(addresses)
            _failed_at.pop(addresses[index], None)
        else:
            _failed_at[addresses[index]] = time.monotonic()


def broker_user(url: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The broker user a connection to `url` logs in as: AMQP_URL's user, or with AMQP_AUTH=external the
    common name of AMQP_CERT_FILE. Every message this process publishes carries it as `user_id`, which
    RabbitMQ checks against the connection's user (docs/security.md)."""
    env = os.environ if env is None else env
    if _auth(env) == "external" and env.get("AMQP_CERT_FILE"):
        subject = ssl._ssl._test_decode_cert(env["AMQP_CERT_FILE"])["subject"]  # type: ignore[attr-defined]  # noqa: SLF001
        names = [value for rdn in subject for key, value in rdn if key == "commonName"]
        if names:
            return names[-1]
    # a list of nodes names one user (amqp_urls checks it)
    return urllib.parse.unquote(urllib.parse.urlparse(amqp_urls(url)[0]).username or "guest")


#: Bytes per socket read. pika reads 4 KiB per recv() call and appends each read to its frame buffer: a
#: 256 MB model then costs 65 000 recv calls and callbacks, and that, not the broker, bounded a reader's
#: speed (docs/messaging.md, "Measured"). 1 MiB reads cut a reader's fetch time about in half.
RECV_BYTES = 1024 * 1024


def _with_large_reads(conn: pika.BlockingConnection) -> pika.BlockingConnection:
    """Let `conn`'s transport read RECV_BYTES per recv() (pika's private `_MAX_RECV_BYTES`, set on this
    connection's transport only; pika's per-event limit `_MAX_CONSUME_BYTES` grows with it so that one
    event still reads a few calls' worth). Left as pika has it where pika's internals differ."""
    transport = getattr(getattr(conn, "_impl", None), "_transport", None)  # noqa: SLF001 - see RECV_BYTES
    if transport is not None and hasattr(transport, "_MAX_RECV_BYTES"):
        transport._MAX_RECV_BYTES = RECV_BYTES
        transport._MAX_CONSUME_BYTES = 4 * RECV_BYTES
    return conn


def connect(role: str, node: str | None = None, device: str | None = None, url: str | None = None,
            attempts: int = 0, initial_delay: float = 0.5, max_delay: float = 30.0,
            stop: Callable[[], bool] | None = None, **kwargs) -> pika.BlockingConnection:
    """Open a blocking connection, retrying with exponential back-off (attempts=0: forever).

    `url` (default AMQP_URL) may list several nodes (a cluster): one attempt tries each node once, in
    `node_order`, and fails with the last node's error when none accepts.

    stop: checked between attempts and between nodes (and during the waits, every 0.1 s); once true, the
    last connection error is raised (a RETRYABLE one), so a daemon told to stop while the broker is down
    does not wait for the broker to come back (pass e.g. `stop_event.is_set`).
    """
    nodes = node_parameters(role, node, device, url, **kwargs)
    addresses = [_address(p) for p in nodes]
    user = broker_user(url)
    where = {"host": nodes[0].host, "port": nodes[0].port} if len(nodes) == 1 else {"nodes": ",".join(addresses)}
    delay, attempt = initial_delay, 0
    while True:
        attempt += 1
        try:
            conn = _open_any(nodes, addresses, stop)
            conn.broker_user = user  # type: ignore[attr-defined] - read by the publishers
            return conn
        except RETRYABLE as exc:
            if (attempts and attempt >= attempts) or (stop is not None and stop()):
                raise
            log.warning("amqp_connect_failed", **where, attempt=attempt, retry_in_s=round(delay, 2),
                        error=repr(exc))
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                if stop is not None and stop():
                    raise
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            delay = min(max_delay, delay * 2)


def _open_any(nodes: list[pika.URLParameters], addresses: list[str],
              stop: Callable[[], bool] | None) -> pika.BlockingConnection:
    """A connection to the first node of `node_order` that accepts one; the last node's error when none
    does (or when `stop()` turns true between nodes)."""
    order = node_order(addresses)
    for k, i in enumerate(order):
        try:
            conn = _with_large_reads(pika.BlockingConnection(nodes[i]))
        except RETRYABLE as exc:
            _node_result(addresses, i, ok=False)
            if k == len(order) - 1 or (stop is not None and stop()):
                raise
            log.info("amqp_node_unavailable", node=addresses[i], error=repr(exc), next=addresses[order[k + 1]])
            continue
        _node_result(addresses, i, ok=True)
        return conn
    raise AssertionError("unreachable: node_order returns every node")  # pragma: no cover


#: A session that lasted this long (seconds) was healthy: `run_forever` starts its back-off afresh after it.
HEALTHY_SESSION_S = 10.0


def run_forever(body: Callable[[pika.BlockingConnection], T], role: str, node: str | None = None,
                device: str | None = None, url: str | None = None, *, stop: threading.Event,
                retry_on: tuple[type[BaseException], ...] = (), max_delay: float = 30.0, **log_context) -> T | None:
    """Connect and run `body(connection)`; when the connection is lost (`RETRYABLE`, or `retry_on`), log
    `<role>_connection_lost`, wait with back-off (0.5 s doubling to `max_delay`) and run it again on a new
    connection. `body` must be restartable. Returns what `body` returns, or None once `stop` is set (checked
    while waiting and while connecting). A session that ran `HEALTHY_SESSION_S` or longer starts the back-off
    afresh: a node lost after hours costs 0.5 s, not the delay left over from earlier failures."""
    delay = 0.5
    while not stop.is_set():
        connected_at = None
        try:
            conn = connect(role, node, device, url, max_delay=10.0, stop=stop.is_set)
            connected_at = time.monotonic()
            try:
                return body(conn)
            finally:
                close_quietly(conn)
        except RETRYABLE + retry_on as exc:
            if stop.is_set():
                break
            if connected_at is not None and time.monotonic() - connected_at >= HEALTHY_SESSION_S:
                delay = 0.5
            log.warning(f"{role}_connection_lost", error=repr(exc), retry_in_s=delay, **log_context)
            stop.wait(delay)
            delay = min(max_delay, delay * 2)
    return None


def serve_while(conn: pika.BlockingConnection, fn: Callable[..., T], *args, abort: threading.Event | None = None,
                name: str = "work") -> T:
    """Run `fn(*args)` in a thread while this thread keeps `conn` served (heartbeats, confirms); return its
    result or re-raise its error here. If serving fails (the connection is lost), `abort` is set and the
    thread joined before the error propagates: the work never outlives its connection."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            conn.process_data_events(time_limit=0.2)
    except BaseException:
        if abort is not None:
            abort.set()
        thread.join()
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def close_quietly(conn: pika.BlockingConnection) -> None:
    """Close `conn` if it is open; a connection that broke while closing is closed enough."""
    if conn.is_open:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass
