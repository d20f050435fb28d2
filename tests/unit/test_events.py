"""The coordinator's event book: events are bounded, and a worker user speaks only for its own node
(coordinator/events.py; docs/security.md)."""
from __future__ import annotations

import math

import pytest

from broker.topology import Topology
from common.wire import messages
from coordinator import events as ev

TOPO = Topology("e1")
N1, N2 = "mqfed-e1-worker-n1", "mqfed-e1-worker-n2"


def reg(node="n1", devices=("cpu",), shard="iid:1/2", experiment="e1"):
    return messages.encode(messages.Registration(experiment, node, list(devices), shard, 10))


def beat(node="n1"):
    return messages.encode(messages.Heartbeat("e1", node, "cpu", 0.0))


def metrics(source, version, **values):
    return messages.encode(messages.Metrics("e1", source, version, values, 0.0))


def test_a_worker_registers_and_beats_for_its_own_node_only():
    book = ev.EventBook(TOPO)
    assert book.admit(reg(), N1, 0, 5.0) == ev.Admitted("registration", "n1")
    assert book.workers == {"n1": {"devices": ["cpu"], "shard": "iid:1/2", "shard_size": 10, "last_seen": 5.0}}
    assert book.admit(beat("n1"), N1, 0, 6.0).kind == "heartbeat" and book.workers["n1"]["last_seen"] == 6.0
    assert book.admit(reg("n2"), N1, 0, 7.0) is None and book.admit(beat("n2"), N1, 0, 7.0) is None
    assert book.dropped == {"forged_node": 2} and set(book.workers) == {"n1"}
    assert book.admit(reg("n2"), "guest", 0, 8.0).kind == "registration"  # an operator is trusted as the broker trusts it


@pytest.mark.parametrize("body, user, reason", [
    (b"\x00" * (ev.MAX_EVENT_BYTES + 1), N1, "too_large"),
    (b"\xc1", N1, "invalid"),
    (reg(experiment="e2"), N1, "other_experiment"),
    (reg(), None, "no_user_id"),
    (reg(node="a/b"), "guest", "bad_node_name"),
    (reg(node="x" * 200), "guest", "bad_node_name"),
    (reg(devices=[f"cuda:{i}" for i in range(ev.MAX_DEVICES + 1)]), N1, "registration_too_large"),
    (reg(shard="s" * (ev.MAX_NAME + 1)), N1, "registration_too_large"),
    (messages.encode(messages.EvaluateTask("e1", "t", 0, "validation", 0.0)), N1, "unexpected_type"),
], ids=["too-large", "undecodable", "other-experiment", "no-user-id", "bad-node", "long-node", "many-devices",
        "long-shard", "not-an-event"])
def test_hostile_events_are_dropped_and_counted(body, user, reason):
    book = ev.EventBook(TOPO)
    assert book.admit(body, user, 0, 0.0) is None
    assert book.dropped == {reason: 1} and book.workers == {}


def test_known_nodes_are_bounded():
    book = ev.EventBook(TOPO, max_nodes=3)
    for i in range(5):
        book.admit(reg(f"n{i}"), "guest", 0, 0.0)
    assert sorted(book.workers) == ["n0", "n1", "n2"] and book.dropped == {"too_many_nodes": 2}
    assert book.admit(beat("n0"), "guest", 0, 1.0).kind == "heartbeat"  # a known node still counts


def test_central_evaluations_come_from_a_non_worker_and_must_be_possible():
    book = ev.EventBook(TOPO)
    got = book.admit(metrics("evaluator", 2, accuracy=0.5, loss=1.0), "mqfed-e1-coordinator", 3, 0.0)
    assert got == ev.Admitted("central_eval", None, 2, {"accuracy": 0.5, "loss": 1.0})
    assert book.admit(metrics("evaluator", 2, accuracy=1.0, loss=0.0), N1, 3, 0.0) is None
    assert book.admit(metrics("evaluator", 4, accuracy=0.5, loss=1.0), "guest", 3, 0.0) is None
    assert book.admit(metrics("evaluator", 2, accuracy=0.5, loss=math.inf), "guest", 3, 0.0) is None
    assert book.admit(metrics("evaluator", 2, accuracy=0.5), "guest", 3, 0.0) is None
    assert book.dropped == {"forged_evaluator": 1, "impossible_metrics": 2, "invalid_metrics": 1}


def test_federated_evaluations_only_as_many_as_asked_for_and_only_known_values():
    book = ev.EventBook(TOPO)
    body = metrics("n1/cpu", 4, val_accuracy=0.5, val_loss=1.0, val_samples=10.0, junk=1.0)
    assert book.admit(body, N1, 4, 0.0) is None and book.dropped == {"unrequested_metrics": 1}
    book.expect_evaluations(4, 1)
    assert book.admit(metrics("n2/cpu", 4, val_accuracy=0.5), N1, 4, 0.0) is None  # not its node
    got = book.admit(body, N1, 4, 0.0)
    assert got == ev.Admitted("federated_eval", "n1/cpu", 4, {"val_accuracy": 0.5, "val_loss": 1.0, "val_samples": 10.0})
    assert book.admit(body, N1, 4, 0.0) is None  # one was asked for
    assert book.dropped == {"unrequested_metrics": 2, "forged_node": 1}


def test_expected_evaluations_keep_only_recent_versions():
    book = ev.EventBook(TOPO)
    for v in range(20):
        book.expect_evaluations(v, 1, keep_versions=4)
    assert sorted(book.expected_evals) == [16, 17, 18, 19]
