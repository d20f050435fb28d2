"""A RabbitMQ definitions document (import with the management UI or `POST /api/definitions`).

It holds the experiment's queues, exchanges and bindings plus two users with least privilege:

- worker (`mqfed-<exp>-worker`): read the tasks queue and both model streams; write to the work exchange
  (updates, routed by key) and the events exchange; configure nothing (workers declare passively).
- coordinator (`mqfed-<exp>-coordinator`): configure/write/read every `mqfed.<exp>.*` resource, plus write on
  the default exchange (it appends to the model streams through it).

Note: permissions are regexes on names, so a worker may also publish a "tasks" routing key to the work
exchange; RabbitMQ cannot restrict routing keys without topic permissions on a topic exchange. The
coordinator validates every message it consumes, so this is a nuisance, not a hole.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re

from broker.topology import Topology


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + utf8 password))."""
    salt = salt if salt is not None else os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def user_names(topo: Topology) -> dict[str, str]:
    return {"worker": f"mqfed-{topo.experiment}-worker", "coordinator": f"mqfed-{topo.experiment}-coordinator"}


def permissions(topo: Topology) -> dict[str, dict[str, str]]:
    esc = re.escape
    return {
        "worker": {
            "configure": "^$",
            "write": f"^({esc(topo.work_exchange)}|{esc(topo.events)})$",
            "read": f"^({esc(topo.tasks)}|{esc(topo.models)}|{esc(topo.model_index)})$",
        },
        "coordinator": {
            "configure": f"^{esc(topo.prefix)}\\..*$",
            "write": f"^({esc(topo.prefix)}\\..*|amq\\.default)$",
            "read": f"^{esc(topo.prefix)}\\..*$",
        },
    }


def build(topo: Topology, vhost: str = "/", passwords: dict[str, str] | None = None) -> dict:
    """The definitions document; `passwords` maps role -> password (users are omitted when None)."""
    doc = {
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
    if passwords:
        names, perms = user_names(topo), permissions(topo)
        doc["users"] = [
            {"name": names[role], "password_hash": password_hash(pw),
             "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []}
            for role, pw in passwords.items()
        ]
        doc["permissions"] = [{"user": names[role], "vhost": vhost, **perms[role]} for role in passwords]
    return doc
