import base64
import hashlib
import json
import re

import pytest

from broker import definitions, topology


def test_names_derive_from_the_experiment_and_queue_types_are_right():
    t = topology.Topology("kws-1")
    args = {q.name: q.arguments for q in t.queues()}
    assert args["mqfed.kws-1.tasks"]["x-queue-type"] == "quorum"
    assert args["mqfed.kws-1.tasks"]["x-dead-letter-exchange"] == "mqfed.kws-1.dlx"
    assert args["mqfed.kws-1.updates"]["x-single-active-consumer"] is True
    assert args["mqfed.kws-1.models"]["x-queue-type"] == "stream"
    assert args["mqfed.kws-1.models"]["x-max-length-bytes"] > 0
    assert {e.type for e in t.exchanges()} == {"direct", "fanout", "topic"}


@pytest.mark.parametrize("bad", ["", "Upper", "has space", "a.b", "x" * 70])
def test_bad_experiment_names_are_refused(bad):
    with pytest.raises(ValueError):
        topology.Topology(bad)


def test_password_hash_matches_rabbitmq_sha256_scheme():
    h = base64.b64decode(definitions.password_hash("secret", salt=b"\x01\x02\x03\x04"))
    assert h[:4] == b"\x01\x02\x03\x04" and h[4:] == hashlib.sha256(b"\x01\x02\x03\x04secret").digest()


def test_worker_permissions_are_least_privilege():
    t = topology.Topology("e1")
    perms = definitions.worker_permissions(t)
    match = lambda kind, name: re.match(perms[kind], name) is not None  # noqa: E731
    assert not match("configure", t.tasks)
    assert match("read", t.tasks) and match("read", t.models) and match("read", t.model_index)
    assert not match("read", t.updates) and not match("read", t.dead_letters)
    assert match("write", t.update_exchange) and match("write", t.events)
    for name in (t.task_exchange, t.model_exchange, "amq.default", "", "mqfed.other.events", t.dlx):
        assert not match("write", name), name
    topic = definitions.worker_topic_permissions(t, "n1")
    assert topic["exchange"] == t.events
    for key in ("registration.n1", "heartbeat.n1", "metrics.n1"):
        assert re.match(topic["write"], key)
    for key in ("heartbeat.n2", "heartbeat.n1x", "heartbeat.n1.x", "metrics.evaluator", "model.version", "heartbeat.n"):
        assert not re.match(topic["write"], key), key
    assert not re.match(topic["read"], "#")


def test_coordinator_permissions_stay_inside_the_experiment():
    t = topology.Topology("e1")
    perms = definitions.coordinator_permissions(t)
    for kind in ("configure", "write", "read"):
        assert re.match(perms[kind], t.tasks) and re.match(perms[kind], t.listener_queue("coordinator"))
        for other in ("amq.default", "", "mqfed.e1x.tasks", "mqfed.e2.tasks", "mqfed.e1-b.tasks"):
            assert not re.match(perms[kind], other), (kind, other)


@pytest.mark.parametrize("bad", ["", "a b", "a/b", "-lead", "x" * 64, "n1)|(.*"])
def test_bad_node_names_are_refused(bad):
    with pytest.raises(ValueError, match="node name"):
        definitions.worker_user(topology.Topology("e1"), bad)


def test_definitions_document_is_json_with_users_only_when_asked():
    t = topology.Topology("e1")
    assert "users" not in definitions.build(t)
    doc = json.loads(json.dumps(definitions.build(t, vhost="v", workers={"n2": "p2", "n1": "p1"},
                                                  coordinator_password="c")))
    assert [u["name"] for u in doc["users"]] == ["mqfed-e1-coordinator", "mqfed-e1-worker-n1", "mqfed-e1-worker-n2"]
    assert [p["user"] for p in doc["topic_permissions"]] == ["mqfed-e1-worker-n1", "mqfed-e1-worker-n2"]
    assert {q["vhost"] for q in doc["queues"]} == {"v"}


def test_dead_letter_queue_is_bounded():
    args = {q.name: q.arguments for q in topology.Topology("e1").queues()}["mqfed.e1.dead-letters"]
    assert args["x-max-length"] == topology.DEAD_LETTER_MAX_MESSAGES and args["x-overflow"] == "drop-head"
    assert args["x-max-length-bytes"] == topology.DEAD_LETTER_MAX_BYTES
