"""Add and revoke an experiment's broker users on a running RabbitMQ, through its management HTTP API.

`mqfed-broker add-worker / revoke-worker / add-coordinator` call these. The API is at `MQFED_MANAGEMENT_URL`
(default `http://<AMQP_URL's host>:15672`), with `MQFED_MANAGEMENT_USER` / `MQFED_MANAGEMENT_PASSWORD`
(default: AMQP_URL's user and password), an administrator. Users and permissions: broker/definitions.py.

A cluster (docs/cluster.md): with several nodes in AMQP_URL the default is every node's host on 15672, and
MQFED_MANAGEMENT_URL may list several APIs too, comma-separated; a request goes to the API that answered
last and moves on to the next one while an API cannot be reached (users and permissions are the cluster's,
whichever node is asked). `user_url` rewrites the credentials of every node in the list.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import urllib.error
import urllib.parse
import urllib.request

from broker import definitions
from broker.topology import Topology
from common.errors import MqfedError
from common.logs import get_logger
from common.transport.connection import amqp_urls, url_host

log = get_logger(__name__)


class ManagementError(MqfedError):
    """The management API refused a request or could not be reached."""


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


class Management:
    """A small client of the RabbitMQ management HTTP API (administrator credentials)."""

    def __init__(self, base_url: str | None = None, user: str | None = None, password: str | None = None,
                 timeout: float = 10.0, amqp: str | None = None) -> None:
        """Defaults: MQFED_MANAGEMENT_* from the environment, else from `amqp` (else AMQP_URL). `base_url`
        (or MQFED_MANAGEMENT_URL) may list several APIs, comma-separated (see the module doc)."""
        nodes = [urllib.parse.urlparse(u) for u in amqp_urls(amqp)]
        given = base_url or os.environ.get("MQFED_MANAGEMENT_URL")
        if given:
            self.base_urls = [b.strip().rstrip("/") for b in given.split(",") if b.strip()]
        else:
            self.base_urls = [f"http://{url_host(n.hostname or 'localhost')}:15672" for n in nodes]
        self.base_url = self.base_urls[0]  # the API that answered last (requests start there)
        amqp_user = nodes[0]
        user = user or os.environ.get("MQFED_MANAGEMENT_USER") or urllib.parse.unquote(amqp_user.username or "guest")
        password = (password or os.environ.get("MQFED_MANAGEMENT_PASSWORD")
                    or urllib.parse.unquote(amqp_user.password or "guest"))
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | None = None):
        """The decoded JSON answer (None when empty); ManagementError for any HTTP error, naming it, or when
        no API answers (each unreachable one is tried once, from the one that answered last)."""
        data = json.dumps(body).encode() if body is not None else None
        start = self.base_urls.index(self.base_url)
        unreachable = []
        for base in self.base_urls[start:] + self.base_urls[:start]:
            req = urllib.request.Request(base + path, data=data, method=method,
                                         headers={"Authorization": self._auth, "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                raise ManagementError(f"{method} {path}: HTTP {exc.code} {exc.read()[:300].decode(errors='replace')}") from None
            except (OSError, ValueError) as exc:
                unreachable.append(f"{base}: {exc}")
                continue
            self.base_url = base
            return json.loads(raw) if raw else None
        raise ManagementError(f"management API unreachable at {'; '.join(unreachable)}")

    def put_user(self, name: str, password: str) -> None:
        self.request("PUT", f"/api/users/{_q(name)}", {"password": password, "tags": ""})

    def set_permissions(self, name: str, vhost: str, perms: dict[str, str]) -> None:
        self.request("PUT", f"/api/permissions/{_q(vhost)}/{_q(name)}", perms)

    def set_topic_permissions(self, name: str, vhost: str, perms: dict[str, str]) -> None:
        self.request("PUT", f"/api/topic-permissions/{_q(vhost)}/{_q(name)}", perms)

    def delete_user(self, name: str) -> bool:
        """Delete user `name` and close its open connections; False when there was no such user."""
        try:
            self.request("DELETE", f"/api/users/{_q(name)}")
        except ManagementError as exc:
            if "HTTP 404" not in str(exc):
                raise
            return False
        for conn in self.request("GET", "/api/connections?columns=name,user") or []:
            if conn.get("user") == name:
                try:
                    self.request("DELETE", f"/api/connections/{_q(conn['name'])}")
                except ManagementError as exc:  # closed meanwhile
                    log.debug("connection_close_failed", connection=conn["name"], error=str(exc))
        return True


def add_worker(api: Management, topo: Topology, node: str, password: str | None = None, vhost: str = "/") -> str:
    """Create (or reset) the broker user of worker `node` with its permissions; returns its password."""
    name, password = definitions.worker_user(topo, node), password or secrets.token_urlsafe(24)
    api.put_user(name, password)
    api.set_permissions(name, vhost, definitions.worker_permissions(topo))
    api.set_topic_permissions(name, vhost, definitions.worker_topic_permissions(topo, node))
    log.info("broker_user_added", user=name, role="worker", vhost=vhost)
    return password


def add_coordinator(api: Management, topo: Topology, password: str | None = None, vhost: str = "/") -> str:
    """Create (or reset) the coordinator's broker user with its permissions; returns its password."""
    name, password = definitions.coordinator_user(topo), password or secrets.token_urlsafe(24)
    api.put_user(name, password)
    api.set_permissions(name, vhost, definitions.coordinator_permissions(topo))
    log.info("broker_user_added", user=name, role="coordinator", vhost=vhost)
    return password


def revoke_worker(api: Management, topo: Topology, node: str) -> bool:
    """Delete worker `node`'s user and close its connections: it can neither reconnect nor go on publishing."""
    revoked = api.delete_user(definitions.worker_user(topo, node))
    log.info("broker_user_revoked", user=definitions.worker_user(topo, node), existed=revoked)
    return revoked


def user_url(user: str, password: str, url: str | None = None) -> str:
    """AMQP_URL (or `url`) with its credentials replaced by `user` / `password`; for a list of nodes, in
    every URL of the list (same order)."""
    out = []
    for node_url in amqp_urls(url):
        parsed = urllib.parse.urlparse(node_url)
        host = parsed.netloc.rsplit("@", 1)[-1]
        out.append(parsed._replace(netloc=f"{_q(user)}:{_q(password)}@{host}").geturl())
    return ",".join(out)
