"""`mqfed-broker definitions` output imports into the running broker (management HTTP API)."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pika
import pytest

from broker import definitions, topology
from common.transport.connection import amqp_url

pytestmark = pytest.mark.integration


def _api(method, path, body=None):
    url = urllib.parse.urlparse(amqp_url())
    base = os.environ.get("RABBITMQ_API", f"http://{url.hostname or 'localhost'}:15672")
    auth = base64.b64encode(f"{url.username or 'guest'}:{url.password or 'guest'}".encode()).decode()
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        data = resp.read()
        return resp.status, (json.loads(data) if data else None)


@pytest.fixture
def vhost(broker_url):
    name = f"mqfed-it-{uuid.uuid4().hex[:8]}"
    try:
        _api("PUT", f"/api/vhosts/{name}", {})
    except urllib.error.URLError as exc:
        pytest.fail(f"management API not reachable ({exc}); run `rabbitmq-plugins enable rabbitmq_management`")
    _api("PUT", f"/api/permissions/{name}/{urllib.parse.quote(urllib.parse.urlparse(amqp_url()).username or 'guest')}",
         {"configure": ".*", "write": ".*", "read": ".*"})
    yield name
    _api("DELETE", f"/api/vhosts/{name}")


def test_definitions_import_and_worker_permissions_hold(vhost):
    exp = f"defs-{uuid.uuid4().hex[:6]}"
    out = subprocess.run([sys.executable, "-m", "broker.cli", "definitions", "--experiment", exp, "--vhost", vhost,
                          "--worker", "n1=w-secret", "--coordinator-password", "c-secret"],
                         capture_output=True, text=True, check=True)
    doc = json.loads(out.stdout)
    users = {"worker": definitions.worker_user(topology.Topology(exp), "n1"),
             "coordinator": definitions.coordinator_user(topology.Topology(exp))}
    try:
        status, _ = _api("POST", "/api/definitions", doc)
        assert status in (200, 201, 204)
        _, queues = _api("GET", f"/api/queues/{vhost}")
        by_name = {q["name"]: q for q in queues}
        topo = topology.Topology(exp)
        assert by_name[topo.tasks]["type"] == "quorum" and by_name[topo.models]["type"] == "stream"
        assert by_name[topo.updates]["arguments"]["x-single-active-consumer"] is True

        url = urllib.parse.urlparse(amqp_url())
        params = pika.ConnectionParameters(url.hostname or "localhost", url.port or 5672, vhost,
                                           pika.PlainCredentials(users["worker"], "w-secret"))
        conn = pika.BlockingConnection(params)
        ch = conn.channel()
        topology.declare(ch, topo, passive=True)  # workers only check
        ch.basic_publish(topo.events, "heartbeat.n1", b"x")  # allowed: its own node's events
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as denied:
            ch.queue_declare("not-allowed", durable=True)  # workers configure nothing
        assert denied.value.reply_code == 403
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as denied:
            ch.basic_consume(topo.updates, lambda *a: None)  # updates are the coordinator's
        assert denied.value.reply_code == 403
        ch = conn.channel()
        ch.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as denied:
            ch.basic_publish(topo.events, "heartbeat.n2", b"x")  # the imported topic permission holds
        assert denied.value.reply_code == 403 and "heartbeat.n2" in denied.value.reply_text
        conn.close()
    finally:
        for u in users.values():
            try:
                _api("DELETE", f"/api/users/{u}")
            except urllib.error.HTTPError:
                pass
