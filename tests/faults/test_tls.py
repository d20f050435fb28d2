"""TLS with client certificates (mTLS) against a private RabbitMQ node (tests/faults/private_broker.py, TLS
mode), never the shared one; certificates are made by tests/faults/tls_certs.py for this module only.

The node trusts one CA (`ca`), presents a server certificate for localhost/127.0.0.1 signed by it,
requires a client certificate (`verify_peer`, `fail_if_no_peer_cert`) and offers SASL EXTERNAL with the
certificate's CN as the user name. Clients connect through `common.transport.connection.connect` with the
AMQP_* variables set, so what is tested is what the daemons do.

What must hold:
- the right CA and a client certificate signed by it: connected over TLS, a message goes and comes back;
- no client certificate, or one signed by another CA: the broker refuses during the handshake, quickly,
  with an AMQPConnectionError that says why (not a hang);
- a client that trusts only another CA (AMQP_CA_FILE) refuses the broker (ssl.SSLCertVerificationError);
- AMQP_AUTH=external: the connection's user on the broker is the certificate's CN; a CN that is not a
  broker user is refused.
"""
from __future__ import annotations

import re
import secrets
import ssl
import time
import uuid

import pika.exceptions
import pytest

from common.transport.connection import close_quietly, connect

pytestmark = pytest.mark.faults

#: pika's socket and stack timeouts for the refusals: a refused handshake must end well before them.
FAST = "?socket_timeout=5&stack_timeout=5"
USER = "mqfed-tlstest-worker-w1"  # a per-worker broker user name (docs/tls.md): the certificate's CN


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from . import tls_certs

    if not tls_certs.available():
        pytest.skip("no openssl CLI to make test certificates")
    d = tmp_path_factory.mktemp("tls")
    ca, other_ca = tls_certs.make_ca(d / "ca", "mqfed-test-ca"), tls_certs.make_ca(d / "other", "other-ca")
    return {
        "ca": ca, "other_ca": other_ca,
        "server": tls_certs.issue(ca, d / "ca", "server", "localhost", server=True),
        "client": tls_certs.issue(ca, d / "ca", "client", USER),
        "stranger": tls_certs.issue(ca, d / "ca", "stranger", "mqfed-nobody"),
        "foreign": tls_certs.issue(other_ca, d / "other", "foreign", USER),
    }


@pytest.fixture(scope="module")
def tls_broker(certs):
    """One private TLS node for the module (EXTERNAL offered too), with `USER` added with full rights."""
    from .private_broker import BrokerUnavailable, PrivateBroker, TlsFiles

    try:
        node = PrivateBroker(tls=TlsFiles(certs["ca"].cert, certs["server"].cert, certs["server"].key),
                             external_auth=True)
    except BrokerUnavailable as exc:
        pytest.skip(f"no private RabbitMQ node for this fault test: {exc}")
    try:
        node.start()
        for args in (("add_user", USER, secrets.token_hex(16)), ("set_permissions", USER, ".*", ".*", ".*")):
            result = node._ctl(*args)
            assert result.returncode == 0, result.stderr
        yield node
    finally:
        node.close()


@pytest.fixture
def tls_env(monkeypatch, certs):
    """The AMQP_* variables of a client that trusts `ca` and presents `client`; returns a setter."""
    for var in ("AMQP_URL", "AMQP_CA_FILE", "AMQP_CERT_FILE", "AMQP_KEY_FILE", "AMQP_KEY_PASSWORD", "AMQP_AUTH"):
        monkeypatch.delenv(var, raising=False)

    def use(ca="ca", client="client", auth=None):
        monkeypatch.setenv("AMQP_CA_FILE", str(certs[ca].cert))
        for var, value in (("AMQP_CERT_FILE", client and certs[client].cert),
                           ("AMQP_KEY_FILE", client and certs[client].key), ("AMQP_AUTH", auth)):
            if value:
                monkeypatch.setenv(var, str(value))
            else:
                monkeypatch.delenv(var, raising=False)
    use()
    return use


def _refused(url: str, error: type[BaseException] = pika.exceptions.AMQPConnectionError) -> BaseException:
    """Connect once, expecting `error`, within a few seconds and saying that TLS ended it; returns it.

    Under TLS 1.3 the client finishes its side of the handshake before the broker checks its certificate,
    so the broker's refusal reaches pika either as the alert (`TLSV13_ALERT_CERTIFICATE_REQUIRED`, `...
    UNKNOWN_CA`) or, when the broker closed first, as an `SSLEOFError`: both in an IncompatibleProtocolError
    (an AMQPConnectionError). Which one is a race, so only "it was TLS" is asserted."""
    t0 = time.monotonic()
    with pytest.raises(error) as info:
        conn = connect("tlstest", url=url, attempts=1)
        close_quietly(conn)
    assert time.monotonic() - t0 < 4.0, "a refused TLS handshake must fail fast, not wait for a timeout"
    assert re.search(r"SSL|TLS|certificate", repr(info.value)), repr(info.value)
    return info.value


def _connection_users(broker, role: str) -> list[tuple[str, str, str]]:
    """(user, auth_mechanism, ssl) of the node's connections named by `role` (connection_name())."""
    result = broker._ctl("list_connections", "user", "auth_mechanism", "ssl", "client_properties")
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    return [(r[0], r[1], r[2]) for r in rows if len(r) == 4 and f"{role}:" in r[3]]


def test_ca_and_client_certificate_connect_and_carry_a_message(tls_broker, tls_env):
    """(a) The right CA and client certificate: connected over TLS (PLAIN login as guest from loopback),
    one message published and got back."""
    conn = connect("tlstest-a", url=tls_broker.tls_url(userinfo="guest:guest@"), attempts=1)
    try:
        ch = conn.channel()
        queue = ch.queue_declare("", exclusive=True).method.queue
        body = uuid.uuid4().bytes
        ch.basic_publish("", queue, body)
        got = None
        for _ in range(50):
            method, _props, got = ch.basic_get(queue, auto_ack=True)
            if method is not None:
                break
            time.sleep(0.05)
        assert got == body
        assert _connection_users(tls_broker, "tlstest-a") == [("guest", "PLAIN", "true")]
    finally:
        close_quietly(conn)


def test_without_client_certificate_the_broker_refuses(tls_broker, tls_env):
    """(b) No AMQP_CERT_FILE/AMQP_KEY_FILE: the node (fail_if_no_peer_cert) ends the handshake."""
    tls_env(client=None)
    _refused(tls_broker.tls_url(userinfo="guest:guest@") + FAST)


def test_client_certificate_of_another_ca_is_refused(tls_broker, tls_env):
    """(c) A client certificate signed by a CA the node does not trust (same CN): refused in the handshake."""
    tls_env(client="foreign")
    _refused(tls_broker.tls_url(userinfo="guest:guest@") + FAST)


def test_client_trusting_another_ca_refuses_the_broker(tls_broker, tls_env):
    """AMQP_CA_FILE replaces the trust store: a client that trusts only another CA refuses the node. pika
    lets the client side's ssl.SSLCertVerificationError through as it is (not an AMQPConnectionError)."""
    tls_env(ca="other_ca")
    exc = _refused(tls_broker.tls_url(userinfo="guest:guest@") + FAST, ssl.SSLCertVerificationError)
    assert re.search(r"certificate.verify.failed", str(exc), re.I), str(exc)


def test_external_auth_user_is_the_certificate_cn(tls_broker, tls_env):
    """(d) AMQP_AUTH=external, no credentials in the URL: the broker's user for the connection is the
    client certificate's CN, logged in with EXTERNAL."""
    tls_env(auth="external")
    conn = connect("tlstest-d", url=tls_broker.tls_url(), attempts=1)
    try:
        conn.channel().queue_declare("", exclusive=True)  # the user has rights on the vhost
        assert _connection_users(tls_broker, "tlstest-d") == [(USER, "EXTERNAL", "true")]
    finally:
        close_quietly(conn)


def test_external_auth_with_unknown_cn_is_refused(tls_broker, tls_env):
    """A valid certificate whose CN is not a broker user: the handshake passes, the login is refused."""
    tls_env(client="stranger", auth="external")
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        connect("tlstest-e", url=tls_broker.tls_url() + FAST, attempts=1)
