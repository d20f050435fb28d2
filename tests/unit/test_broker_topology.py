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
    perms = definitions.permissions(t)["worker"]
    match = lambda kind, name: re.match(perms[kind], name) is not None  # noqa: E731
    assert not match("configure", t.tasks)
    assert match("read", t.tasks) and match("read", t.models) and match("read", t.model_index)
    assert not match("read", t.updates) and not match("read", t.dead_letters)
    assert match("write", t.work_exchange) and match("write", t.events)
    assert not match("write", "amq.default") and not match("write", "mqfed.other.events")


def test_definitions_document_is_json_with_users_only_when_asked():
    t = topology.Topology("e1")
    assert "users" not in definitions.build(t)
    doc = json.loads(json.dumps(definitions.build(t, vhost="v", passwords={"worker": "p"})))
    assert [u["name"] for u in doc["users"]] == ["mqfed-e1-worker"]
    assert {q["vhost"] for q in doc["queues"]} == {"v"}
