"""The coordinator's view of its experiment's events, bounded and checked against who sent them (pure: no broker).

`EventBook.admit(body, user_id, now)` takes one event as it arrived (bytes and the broker-validated
`user_id`) and returns what the coordinator should act on, or None when the event is dropped; drops are
counted by reason in `dropped`. Rules (docs/security.md):

- an event over `MAX_EVENT_BYTES`, undecodable, of another experiment, or without a user_id is dropped;
- a worker user speaks only for its own node (registrations, heartbeats, its trainers' metrics);
- at most `max_nodes` nodes are known; a registration lists at most `MAX_DEVICES` devices of at most
  `MAX_NAME` characters; shard descriptions at most `MAX_NAME` characters;
- central evaluation metrics (source `evaluator`) come from a non-worker user and must be possible
  (accuracy in [0, 1], finite loss, a version that exists);
- federated evaluation metrics are taken only for versions the coordinator asked to evaluate, at most as
  many as it asked for, and only the known finite values.
"""
from __future__ import annotations

import dataclasses
import math

from broker.definitions import NODE_OK, Sender, sender_of
from broker.topology import Topology
from common.wire import messages

MAX_EVENT_BYTES = 64 * 1024
MAX_NODES = 1024
MAX_DEVICES = 16
MAX_NAME = 128
EVALUATOR = "evaluator"
FEDERATED_KEYS = ("val_accuracy", "val_loss", "val_samples")


@dataclasses.dataclass(frozen=True)
class Admitted:
    """An event to act on. kind: `registration`, `heartbeat`, `central_eval` or `federated_eval`."""

    kind: str
    node: str | None = None
    version: int = 0
    values: dict = dataclasses.field(default_factory=dict)


class EventBook:
    """Known worker nodes (`workers`: node -> devices, shard, shard_size, last_seen) and the rules above."""

    def __init__(self, topo: Topology, max_nodes: int = MAX_NODES) -> None:
        self.topo, self.max_nodes = topo, max_nodes
        self.workers: dict[str, dict] = {}
        self.dropped: dict[str, int] = {}
        self.expected_evals: dict[int, int] = {}  # version -> federated evaluations still expected

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def expect_evaluations(self, version: int, count: int, keep_versions: int = 16) -> None:
        """The coordinator asked for `count` federated evaluations of `version` (only the newest
        `keep_versions` versions stay expected)."""
        self.expected_evals[version] = count
        for old in sorted(self.expected_evals)[:-keep_versions]:
            del self.expected_evals[old]

    def _node_ok(self, who: Sender, node: str) -> bool:
        if not (isinstance(node, str) and NODE_OK.match(node)):
            self._drop("bad_node_name")
            return False
        if who.role == "worker" and node != who.node:
            self._drop("forged_node")
            return False
        if node not in self.workers and len(self.workers) >= self.max_nodes:
            self._drop("too_many_nodes")
            return False
        return True

    def admit(self, body: bytes, user_id: str | None, version_now: int, now: float) -> Admitted | None:
        """What to act on for one event (see the module doc), or None (dropped and counted)."""
        if len(body) > MAX_EVENT_BYTES:
            self._drop("too_large")
            return None
        try:
            msg = messages.decode(body)
        except messages.MessageError:
            self._drop("invalid")
            return None
        if getattr(msg, "experiment", None) != self.topo.experiment:
            self._drop("other_experiment")
            return None
        who = sender_of(self.topo, user_id)
        if who is None:
            self._drop("no_user_id")
            return None
        if isinstance(msg, messages.Registration):
            if not self._node_ok(who, msg.node):
                return None
            if len(msg.devices) > MAX_DEVICES or any(len(d) > MAX_NAME for d in msg.devices) or len(msg.shard) > MAX_NAME:
                self._drop("registration_too_large")
                return None
            self.workers[msg.node] = {"devices": list(msg.devices), "shard": msg.shard,
                                      "shard_size": msg.shard_size, "last_seen": now}
            return Admitted("registration", msg.node)
        if isinstance(msg, messages.Heartbeat):
            if not self._node_ok(who, msg.node):
                return None
            self.workers.setdefault(msg.node, {})["last_seen"] = now
            return Admitted("heartbeat", msg.node)
        if isinstance(msg, messages.Metrics):
            return self._metrics(msg, who, version_now)
        self._drop("unexpected_type")
        return None

    def _metrics(self, msg: messages.Metrics, who: Sender, version_now: int) -> Admitted | None:
        if msg.source == EVALUATOR:
            accuracy, loss = msg.values.get("accuracy"), msg.values.get("loss")
            if who.role == "worker":
                self._drop("forged_evaluator")
            elif accuracy is None or loss is None:
                self._drop("invalid_metrics")
            elif not (0.0 <= accuracy <= 1.0 and math.isfinite(loss) and 0 <= msg.version <= version_now):
                self._drop("impossible_metrics")
            else:
                return Admitted("central_eval", None, msg.version, {"accuracy": accuracy, "loss": loss})
            return None
        node = msg.source.split("/", 1)[0]
        if who.role == "worker" and node != who.node:
            self._drop("forged_node")
            return None
        if self.expected_evals.get(msg.version, 0) <= 0:
            self._drop("unrequested_metrics")
            return None
        values = {k: msg.values[k] for k in FEDERATED_KEYS if k in msg.values and math.isfinite(msg.values[k])}
        if "val_accuracy" not in values or not 0.0 <= values["val_accuracy"] <= 1.0 or len(msg.source) > MAX_NAME:
            self._drop("invalid_metrics")
            return None
        self.expected_evals[msg.version] -= 1
        return Admitted("federated_eval", msg.source, msg.version, values)
