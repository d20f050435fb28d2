"""The TLS and authentication settings of `common.transport.connection` (AMQP_CA_FILE, AMQP_CERT_FILE,
AMQP_KEY_FILE, AMQP_KEY_PASSWORD, AMQP_AUTH), without a broker: what SSLContext and pika parameters they
give, and that every incomplete or wrong setting is a `TlsConfigError` naming the variables and paths.
Certificates are made with the openssl CLI (tests/faults/tls_certs.py). Against a real broker:
tests/faults/test_tls.py."""
from __future__ import annotations

import ssl

import pika.credentials
import pytest

from common.errors import MqfedError
from common.transport.connection import TlsConfigError, parameters, sasl_mechanism, tls_context

VARS = ("AMQP_URL", "AMQP_CA_FILE", "AMQP_CERT_FILE", "AMQP_KEY_FILE", "AMQP_KEY_PASSWORD", "AMQP_AUTH")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from faults import tls_certs

    if not tls_certs.available():
        pytest.skip("no openssl CLI to make test certificates")
    d = tmp_path_factory.mktemp("tls-unit")
    ca = tls_certs.make_ca(d, "unit-ca")
    return {"ca": ca, "client": tls_certs.issue(ca, d, "client", "alice"),
            "locked": tls_certs.issue(ca, d, "locked", "bob", password="s3cret")}


@pytest.fixture
def clean_env(monkeypatch):
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_ca_file_replaces_the_system_store(certs):
    """(f) With AMQP_CA_FILE the context trusts exactly that file's CA and nothing of the system store."""
    ctx = tls_context({"AMQP_CA_FILE": str(certs["ca"].cert)})
    cas = ctx.get_ca_certs()
    assert [dict(x[0] for x in ca["subject"])["commonName"] for ca in cas] == ["unit-ca"]
    assert ctx.cert_store_stats()["x509_ca"] == 1
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


@pytest.mark.parametrize("given", ["AMQP_CERT_FILE", "AMQP_KEY_FILE"])
def test_certificate_and_key_go_together(certs, given):
    """(e) One of AMQP_CERT_FILE / AMQP_KEY_FILE without the other: an MqfedError naming both."""
    path = certs["client"].cert if given == "AMQP_CERT_FILE" else certs["client"].key
    with pytest.raises(TlsConfigError) as info:
        tls_context({given: str(path)})
    assert isinstance(info.value, MqfedError)
    assert "AMQP_CERT_FILE" in str(info.value) and "AMQP_KEY_FILE" in str(info.value)


@pytest.mark.parametrize("var", ["AMQP_CA_FILE", "AMQP_CERT_FILE", "AMQP_KEY_FILE"])
def test_missing_file_is_named(certs, tmp_path, var):
    env = {"AMQP_CA_FILE": str(certs["ca"].cert), "AMQP_CERT_FILE": str(certs["client"].cert),
           "AMQP_KEY_FILE": str(certs["client"].key), var: str(tmp_path / "nope.pem")}
    with pytest.raises(TlsConfigError, match=f"{var}=.*nope.pem: no such file"):
        tls_context(env)


def test_ca_file_that_is_not_pem(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(TlsConfigError, match="AMQP_CA_FILE=.*ca.pem"):
        tls_context({"AMQP_CA_FILE": str(bad)})


def test_client_certificate_is_loaded(certs):
    """A matching certificate and key load (a mismatched pair is refused, naming both variables)."""
    tls_context({"AMQP_CERT_FILE": str(certs["client"].cert), "AMQP_KEY_FILE": str(certs["client"].key)})
    with pytest.raises(TlsConfigError, match="AMQP_CERT_FILE=.*AMQP_KEY_FILE="):
        tls_context({"AMQP_CERT_FILE": str(certs["client"].cert), "AMQP_KEY_FILE": str(certs["locked"].key),
                     "AMQP_KEY_PASSWORD": "s3cret"})


def test_encrypted_key_needs_its_password(certs):
    env = {"AMQP_CERT_FILE": str(certs["locked"].cert), "AMQP_KEY_FILE": str(certs["locked"].key)}
    tls_context({**env, "AMQP_KEY_PASSWORD": "s3cret"})
    for wrong in ({}, {"AMQP_KEY_PASSWORD": "wrong"}):
        with pytest.raises(TlsConfigError, match="AMQP_KEY_PASSWORD"):
            tls_context({**env, **wrong})


def test_amqps_parameters_verify_the_url_host(clean_env, certs):
    """amqps://: an SSLContext from the variables, the URL's host as server_hostname, PLAIN credentials."""
    clean_env.setenv("AMQP_CA_FILE", str(certs["ca"].cert))
    params = parameters("t", url="amqps://u:p@localhost:5671/%2F")
    assert params.ssl_options.server_hostname == "localhost"
    assert params.ssl_options.context.check_hostname
    assert params.ssl_options.context.get_ca_certs() == tls_context().get_ca_certs()
    assert isinstance(params.credentials, pika.credentials.PlainCredentials)


def test_plain_url_reads_no_tls_variables(clean_env, tmp_path):
    """amqp://: no TLS, and the TLS variables (even broken ones) are not read."""
    clean_env.setenv("AMQP_CERT_FILE", str(tmp_path / "absent.pem"))
    assert parameters("t", url="amqp://u:p@localhost:5672/%2F").ssl_options is None


def test_external_auth(clean_env, certs):
    """AMQP_AUTH=external (any case): SASL EXTERNAL credentials, needs amqps:// and a client certificate."""
    clean_env.setenv("AMQP_AUTH", "EXTERNAL")
    clean_env.setenv("AMQP_CERT_FILE", str(certs["client"].cert))
    clean_env.setenv("AMQP_KEY_FILE", str(certs["client"].key))
    params = parameters("t", url="amqps://localhost:5671/%2F")
    assert isinstance(params.credentials, pika.credentials.ExternalCredentials)
    with pytest.raises(TlsConfigError, match="AMQP_AUTH=external needs an amqps://"):
        parameters("t", url="amqp://localhost:5672/%2F")
    with pytest.raises(TlsConfigError, match="AMQP_CERT_FILE and AMQP_KEY_FILE"):
        sasl_mechanism({"AMQP_AUTH": "external"}, tls=True)


@pytest.mark.parametrize("value", ["", "plain", "PLAIN"])
def test_plain_auth_is_the_default(value):
    assert sasl_mechanism({"AMQP_AUTH": value}, tls=False) == "plain"


def test_unknown_auth_is_named():
    with pytest.raises(TlsConfigError, match="AMQP_AUTH='kerberos'"):
        sasl_mechanism({"AMQP_AUTH": "kerberos"}, tls=True)


def test_the_publishing_identity_is_the_user_the_broker_sees(certs):
    """`broker_user` (the `user_id` every message carries): AMQP_URL's user, or under EXTERNAL the client
    certificate's common name, which is what RabbitMQ takes as the user (ssl_cert_login_from = common_name)."""
    from common.transport.connection import broker_user

    assert broker_user("amqp://mqfed-e-worker-n1:pw@h:5672/%2F", env={}) == "mqfed-e-worker-n1"
    assert broker_user("amqp://a%40b:pw@h/%2F", env={}) == "a@b"
    assert broker_user("amqps://h:5671/%2F", env={"AMQP_AUTH": "external",
                                                  "AMQP_CERT_FILE": str(certs["client"].cert)}) == "alice"
