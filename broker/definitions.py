"""Users and permissions with least privilege, and the RabbitMQ definitions document that holds them.

Users (per experiment; what each may do is in docs/security.md):

- one per worker node, `mqfed-<exp>-worker-<node>`: configure nothing (workers declare passively); write only
  the update exchange and the events exchange, and on the events exchange only the routing keys
  `registration|heartbeat|metrics.<node>` (a topic permission); read the tasks queue and the two model
  streams. It cannot publish tasks or model versions, bind to or read the updates, or delete anything.
- the coordinator, `mqfed-<exp>-coordinator`: configure, write and read the experiment's own names
  `mqfed.<exp>.*` and nothing else (no default exchange: it reaches no other experiment). The evaluator and
  `mqfed-coordinator status` run as this user too.

`build` makes the definitions document (import with the management UI or `POST /api/definitions`);
`broker/admin.py` adds and revokes users on a running broker through the management API.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import re

from broker.topology import Topology
from common.errors import InvalidValue

NODE_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
EVENT_KINDS = ("registration", "heartbeat", "metrics")


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + utf8 password))."""
    salt = salt if salt is not None else os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def check_node(node: str) -> str:
    """`node` when it is a valid node name (letters, digits, `.`, `_`, `-`; 1-63 characters), else InvalidValue."""
    if not isinstance(node, str) or not NODE_OK.match(node):
        raise InvalidValue(f"node name {node!r} must match {NODE_OK.pattern}")
    return node


def _worker_prefix(topo: Topology) -> str:
    return f"mqfed-{topo.experiment}-worker-"


def worker_user(topo: Topology, node: str) -> str:
    return _worker_prefix(topo) + check_node(node)


def coordinator_user(topo: Topology) -> str:
    return f"mqfed-{topo.experiment}-coordinator"


def worker_permissions(topo: Topology) -> dict[str, str]:
    """configure / write / read regexes of every worker user of `topo`."""
    esc = re.escape
    return {
        "configure": "^$",
        "write": f"^({esc(topo.update_exchange)}|{esc(topo.events)})$",
        "read": f"^({esc(topo.tasks)}|{esc(topo.models)}|{esc(topo.model_index)})$",
    }


def worker_topic_permissions(topo: Topology, node: str) -> dict[str, str]:
    """The topic permission of `node`'s user on the events exchange: it publishes its own events only, and
    binds nothing."""
    return {"exchange": topo.events, "write": f"^({'|'.join(EVENT_KINDS)})\\.{re.escape(check_node(node))}$",
            "read": "^$"}


def coordinator_permissions(topo: Topology) -> dict[str, str]:
    own = f"^{re.escape(topo.prefix)}\\..*$"
    return {"configure": own, "write": own, "read": own}


def build(topo: Topology, vhost: str = "/", workers: dict[str, str] | None = None,
          coordinator_password: str | None = None) -> dict:
    """The definitions document: the topology, plus the users whose passwords are given (`workers` maps
    node -> password)."""
    doc: dict = {
        "rabbit_version": "3.10.0",
        "queues": [
            {"name": q.name, "vhost": vhost, "durable": True, "auto_delete": False, "arguments": q.arguments}
            for q in topo.queues()
        ],
        "exchanges": [
            {"name": e.name, "vhost": vhost, "type": e.type, "durable": True, "auto_delete": False,
             "internal": False, "arguments": {}}
            for e in topo.exchanges()
        ],
        "bindings": [
            {"source": b.exchange, "vhost": vhost, "destination": b.queue, "destination_type": "queue",
             "routing_key": b.routing_key, "arguments": {}}
            for b in topo.bindings()
        ],
    }
    users, perms, topic = [], [], []
    if coordinator_password:
        users.append((coordinator_user(topo), coordinator_password))
        perms.append({"user": coordinator_user(topo), "vhost": vhost, **coordinator_permissions(topo)})
    for node, password in sorted((workers or {}).items()):
        name = worker_user(topo, node)
        users.append((name, password))
        perms.append({"user": name, "vhost": vhost, **worker_permissions(topo)})
        topic.append({"user": name, "vhost": vhost, **worker_topic_permissions(topo, node)})
    if users:
        doc["users"] = [{"name": name, "password_hash": password_hash(pw),
                         "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []} for name, pw in users]
        doc["permissions"] = perms
        doc["topic_permissions"] = topic
    return doc


@dataclasses.dataclass(frozen=True)
class Sender:
    """Who published a message, as the broker vouches for it (the validated `user_id`).

    role: `worker` (a worker node's user; `node` is its node), `coordinator` (the experiment's coordinator
    user) or `operator` (any other user the broker let publish there: an administrator, or `guest` on a
    development broker; trusted as far as the broker trusts it, `node` None)."""

    user: str
    role: str
    node: str | None = None


def sender_of(topo: Topology, user_id: str | None) -> Sender | None:
    """The sender of a message with property `user_id` (None: the message has none, and names nobody)."""
    if not user_id:
        return None
    prefix = _worker_prefix(topo)
    if user_id.startswith(prefix) and NODE_OK.match(user_id[len(prefix):]):
        return Sender(user_id, "worker", user_id[len(prefix):])
    if user_id == coordinator_user(topo):
        return Sender(user_id, "coordinator")
    return Sender(user_id, "operator")
