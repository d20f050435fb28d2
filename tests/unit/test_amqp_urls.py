"""AMQP_URL naming a RabbitMQ cluster (docs/cluster.md), without a broker: the list of nodes is parsed and
checked (`common.transport.connection.amqp_urls`), every place that reads AMQP_URL takes it (pika
parameters, the publishing identity, per-user URLs, the management API client, `mqfed-broker ensure`),
connections fail over from node to node in a per-process order, and a single URL behaves exactly as it
always did. Against a real 3-node cluster: tests/faults/test_cluster.py."""
from __future__ import annotations

import http.server
import json
import threading
import time

import pika
import pika.exceptions
import pytest

from broker import admin, ensure
from common.errors import MqfedError
from common.transport import connection
from common.transport.connection import BrokerUrlError, amqp_urls, broker_user, node_parameters, parameters

N1, N2, N3 = ("amqp://u:p%2Cw@10.0.0.1:5672/%2F", "amqp://u:p%2Cw@10.0.0.2:5673/%2F",
              "amqp://u:p%2Cw@rabbit-3/%2F")
CLUSTER = ",".join((N1, N2, N3))


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("AMQP_URL", "AMQP_CA_FILE", "AMQP_CERT_FILE", "AMQP_KEY_FILE", "AMQP_KEY_PASSWORD", "AMQP_AUTH",
                "MQFED_MANAGEMENT_URL", "MQFED_MANAGEMENT_USER", "MQFED_MANAGEMENT_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def fresh_order(monkeypatch):
    """No remembered node order or failures from other tests."""
    monkeypatch.setattr(connection, "_next_node", {})
    monkeypatch.setattr(connection, "_failed_at", {})


# -- parsing -----------------------------------------------------------------------------------------------

def test_a_single_url_is_taken_as_it_is(clean_env):
    assert amqp_urls("amqp://guest:guest@localhost:5672/%2F") == ["amqp://guest:guest@localhost:5672/%2F"]
    assert amqp_urls("amqp://localhost") == ["amqp://localhost"]
    assert amqp_urls() == [connection.DEFAULT_URL]
    clean_env.setenv("AMQP_URL", N1)
    assert amqp_urls() == [N1]


def test_a_list_gives_every_node_in_order_spaces_ignored(clean_env):
    assert amqp_urls(CLUSTER) == [N1, N2, N3]
    assert amqp_urls(f" {N1} ,\t{N2}\n") == [N1, N2]
    clean_env.setenv("AMQP_URL", CLUSTER)
    assert amqp_urls() == [N1, N2, N3]


def test_the_default_vhost_may_be_written_any_way_pika_reads_it():
    assert len(amqp_urls("amqp://u:p@h1:5672,amqp://u:p@h2:5672/,amqp://u:p@h3:5672/%2F")) == 3


@pytest.mark.parametrize("url, words", [
    (f"{N1},,{N2}", "item 2 of 3 is empty"),
    (f"{N1},", "item 2 of 2 is empty"),
    (f",{N1}", "item 1 of 2 is empty"),
    (f"{N1}, ,{N2}", "item 2 of 3 is empty"),
    (f"{N1},10.0.0.2:5672", "item 2 of 2 is not an amqp:// or amqps:// URL"),
    (f"{N1},http://u:p%2Cw@10.0.0.2/%2F", "item 2 of 2 is not an amqp:// or amqps:// URL"),
    (f"{N1},amqp:/10.0.0.2", "item 2 of 2 is not an amqp:// or amqps:// URL"),
    (f"{N1},amqp://u:p%2Cw@:5672/%2F", "item 2 of 2 names no host"),
    (f"{N1},amqps://u:p%2Cw@10.0.0.2:5671/%2F", "mixes amqp:// (item 1) and amqps:// (item 2)"),
    (f"{N1},amqp://other:p%2Cw@10.0.0.2/%2F", "user 'u' in item 1 but 'other' in item 2"),
    (f"{N1},amqp://10.0.0.2/%2F", "user 'u' in item 1 but None in item 2"),
    (f"{N1},amqp://u:else@10.0.0.2/%2F", "another password in item 2"),
    (f"{N1},amqp://u:p%2Cw@10.0.0.2/prod", "vhost '/' in item 1 but 'prod' in item 2"),
    (f"{N1},amqp://u:p%2Cw@10.0.0.1/%2F", "items 1 and 2 name the same node 10.0.0.1:5672"),
    ("amqp://u:p@h1,amqp://u:p@H1:5672", "items 1 and 2 name the same node h1:5672"),
])
def test_a_bad_list_is_refused_naming_the_item_and_the_problem(url, words):
    with pytest.raises(BrokerUrlError) as info:
        amqp_urls(url)
    assert isinstance(info.value, MqfedError)  # the CLIs print it and exit 2
    assert words in str(info.value)
    assert "p,w" not in str(info.value) and "p%2Cw" not in str(info.value) and "else" not in str(info.value)


def test_a_comma_in_a_password_must_be_encoded_and_the_error_says_so_without_showing_it():
    url = "amqp://u:s3cr,et@h1:5672/%2F"  # one URL with a raw comma: read as two items
    with pytest.raises(BrokerUrlError) as info:
        amqp_urls(url)
    assert "%2C" in str(info.value) and "s3cr" not in str(info.value) and "et@" not in str(info.value)


def test_every_reader_of_amqp_url_refuses_a_bad_list(clean_env):
    clean_env.setenv("AMQP_URL", f"{N1},,{N2}")
    for call in (lambda: parameters("t"), lambda: broker_user(), lambda: admin.user_url("x", "y"),
                 lambda: admin.Management(), lambda: connection.connect("t", attempts=1)):
        with pytest.raises(BrokerUrlError, match="item 2 of 3 is empty"):
            call()


# -- what reads AMQP_URL -----------------------------------------------------------------------------------

def test_pika_parameters_for_every_node_with_the_same_connection_name_and_settings(clean_env):
    nodes = node_parameters("worker", "n1", "cpu", url=CLUSTER, heartbeat=30, frame_max=131072)
    assert [(p.host, p.port) for p in nodes] == [("10.0.0.1", 5672), ("10.0.0.2", 5673), ("rabbit-3", 5672)]
    for p in nodes:
        assert p.client_properties["connection_name"] == "worker:n1:cpu"
        assert (p.heartbeat, p.frame_max, p.connection_attempts, p.virtual_host) == (30, 131072, 1, "/")
        assert (p.credentials.username, p.credentials.password) == ("u", "p,w")
        assert p.ssl_options is None
    first = parameters("worker", "n1", "cpu", url=CLUSTER, heartbeat=30, frame_max=131072)
    assert (first.host, first.port) == ("10.0.0.1", 5672)


def test_a_single_url_gives_the_parameters_it_always_gave(clean_env):
    url = "amqp://bob:pw@broker:5680/v?heartbeat=10"
    [p] = node_parameters("coordinator", "c", "x", url=url)
    q = parameters("coordinator", "c", "x", url=url)
    for params in (p, q):
        assert (params.host, params.port, params.virtual_host, params.heartbeat) == ("broker", 5680, "v", 60)
        assert params.blocked_connection_timeout == 300 and params.connection_attempts == 1


def test_tls_checks_each_nodes_own_host_name(clean_env):
    nodes = node_parameters("t", url="amqps://u:p@rabbit-1:5671/%2F,amqps://u:p@rabbit-2:5671/%2F")
    assert [p.ssl_options.server_hostname for p in nodes] == ["rabbit-1", "rabbit-2"]
    assert all(p.ssl_options.context.check_hostname for p in nodes)


def test_the_publishing_identity_of_a_list_is_its_one_user(clean_env):
    assert broker_user(CLUSTER, env={}) == "u"
    assert broker_user("amqp://a%40b:pw@h1/%2F,amqp://a%40b:pw@h2/%2F", env={}) == "a@b"


def test_user_url_rewrites_every_node_and_keeps_hosts_ports_vhost_and_query(clean_env):
    url = "amqp://guest:guest@127.0.0.1:5672/%2F?heartbeat=5,amqp://guest:guest@127.0.0.1:5673/%2F?heartbeat=5"
    out = admin.user_url("mqfed-e-worker-n1", "p@ss,w/rd", url)
    assert out == ("amqp://mqfed-e-worker-n1:p%40ss%2Cw%2Frd@127.0.0.1:5672/%2F?heartbeat=5,"
                   "amqp://mqfed-e-worker-n1:p%40ss%2Cw%2Frd@127.0.0.1:5673/%2F?heartbeat=5")
    assert amqp_urls(out) and broker_user(out, env={}) == "mqfed-e-worker-n1"
    assert [p.credentials.password for p in node_parameters("t", url=out)] == ["p@ss,w/rd"] * 2


def test_user_url_of_a_single_url_is_unchanged_in_form(clean_env):
    assert admin.user_url("w", "pw", "amqp://guest:guest@localhost:5672/%2F") == "amqp://w:pw@localhost:5672/%2F"
    assert admin.user_url("w", "pw", "amqps://h:5671/v") == "amqps://w:pw@h:5671/v"


def test_the_management_client_defaults_to_every_nodes_host(clean_env):
    api = admin.Management(amqp="amqp://a:b@rabbit-1:5672/%2F,amqp://a:b@rabbit-2:5672/%2F")
    assert api.base_urls == ["http://rabbit-1:15672", "http://rabbit-2:15672"]
    assert admin.Management(amqp="amqp://a:b@rabbit-1:5672/%2F").base_url == "http://rabbit-1:15672"
    clean_env.setenv("MQFED_MANAGEMENT_URL", "http://m1:15672/, http://m2:15672")
    assert admin.Management(amqp=CLUSTER).base_urls == ["http://m1:15672", "http://m2:15672"]


class _Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):
        pass


def test_the_management_client_moves_on_from_an_api_that_cannot_be_reached(clean_env):
    from faults.private_broker import free_port

    server = http.server.HTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        live, dead = f"http://127.0.0.1:{server.server_port}", f"http://127.0.0.1:{free_port()}"
        api = admin.Management(f"{dead},{live}", timeout=2)
        assert api.request("GET", "/api/overview") == {"path": "/api/overview"}
        assert api.base_url == live  # the next request starts there
        with pytest.raises(admin.ManagementError, match="unreachable"):
            admin.Management(dead, timeout=2).request("GET", "/api/overview")
    finally:
        server.shutdown()
        server.server_close()


def test_ensure_never_starts_or_reconfigures_a_cluster_and_redacts_every_password():
    local = "amqp://g:s3cret@127.0.0.1:5672/%2F,amqp://g:s3cret@127.0.0.1:5673/%2F"
    assert not ensure.is_local(local, "node7")
    plan = ensure.decide(ensure.Facts(url=local, broker_answers=False, rabbitmq_server=True, rabbitmq_plugins=True))
    assert not plan.starts and "2 nodes (a cluster)" in plan.problem
    assert ensure.decide(ensure.Facts(url=local, broker_answers=True, rabbitmq_plugins=True)) == ensure.Plan()
    assert ensure.redact(local) == "amqp://g:***@127.0.0.1:5672/%2F,amqp://g:***@127.0.0.1:5673/%2F"


# -- failing over ------------------------------------------------------------------------------------------

def test_each_process_starts_at_a_node_of_its_own_then_goes_round(fresh_order, monkeypatch):
    addresses = ["h1:5672", "h2:5672", "h3:5672"]
    monkeypatch.setattr(connection.random, "randrange", lambda n: 2)
    assert connection.node_order(addresses) == [2, 0, 1]
    connection._node_result(addresses, 2, ok=True)
    assert connection.node_order(addresses) == [0, 1, 2]  # the next connection starts at the next node
    assert connection.node_order(["only:5672"]) == [0]


def test_a_node_that_failed_lately_is_tried_last_until_it_is_forgotten(fresh_order, monkeypatch):
    addresses = ["h1:5672", "h2:5672", "h3:5672"]
    monkeypatch.setattr(connection.random, "randrange", lambda n: 0)
    connection._node_result(addresses, 0, ok=False)
    assert connection.node_order(addresses) == [1, 2, 0]
    later = time.monotonic() + connection.FAILED_NODE_S + 1
    assert connection.node_order(addresses, now=later) == [0, 1, 2]


class _Conn:
    def __init__(self, params):
        self.params = params


def test_connect_fails_over_to_the_next_node_and_remembers_the_dead_one(fresh_order, monkeypatch, clean_env):
    tried = []

    def blocking_connection(params):
        tried.append(params.host)
        if params.host == "10.0.0.1":
            raise pika.exceptions.AMQPConnectionError("refused")
        return _Conn(params)

    monkeypatch.setattr(connection.pika, "BlockingConnection", blocking_connection)
    monkeypatch.setattr(connection.random, "randrange", lambda n: 0)
    conn = connection.connect("t", url=CLUSTER, attempts=1)
    assert tried == ["10.0.0.1", "10.0.0.2"] and conn.params.host == "10.0.0.2" and conn.broker_user == "u"
    tried.clear()
    assert connection.connect("t", url=CLUSTER, attempts=1).params.host == "rabbit-3"
    assert connection.connect("t", url=CLUSTER, attempts=1).params.host == "10.0.0.2"  # 10.0.0.1 comes last now
    assert tried == ["rabbit-3", "10.0.0.2"]


def test_connect_raises_the_last_error_when_no_node_answers(fresh_order, monkeypatch, clean_env):
    tried = []

    def refused(params):
        tried.append(params.host)
        raise pika.exceptions.AMQPConnectionError(f"refused by {params.host}")

    monkeypatch.setattr(connection.pika, "BlockingConnection", refused)
    monkeypatch.setattr(connection.random, "randrange", lambda n: 1)
    with pytest.raises(pika.exceptions.AMQPConnectionError, match="refused by 10.0.0.1"):
        connection.connect("t", url=CLUSTER, attempts=1)
    assert tried == ["10.0.0.2", "rabbit-3", "10.0.0.1"]  # each node once per attempt
    tried.clear()
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        connection.connect("t", url=CLUSTER, attempts=1, stop=lambda: True)
    assert len(tried) == 1  # told to stop: no further node tried


def test_after_a_healthy_session_the_reconnect_back_off_starts_afresh(monkeypatch):
    """A node lost after a long session costs the first back-off step (0.5 s), not what earlier failures
    had grown the back-off to."""
    class Conn:
        is_open = False

    class Stop(threading.Event):
        waits: list[float] = []

        def wait(self, timeout=None):
            self.waits.append(timeout)
            if len(self.waits) == 5:
                self.set()
            return self.is_set()

    sessions = []

    def body(_conn):
        sessions.append(1)
        if len(sessions) == 4:  # the fourth session is a healthy one
            time.sleep(0.06)
        raise pika.exceptions.StreamLostError("node gone")

    monkeypatch.setattr(connection, "connect", lambda *a, **k: Conn())
    monkeypatch.setattr(connection, "HEALTHY_SESSION_S", 0.05)
    stop = Stop()
    assert connection.run_forever(body, "worker", stop=stop) is None
    assert stop.waits == [0.5, 1.0, 2.0, 0.5, 1.0]
