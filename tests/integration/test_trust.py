"""What the broker itself refuses to the generated least-privilege users (broker/definitions.py), tried as an
attacker on the same broker would: each forbidden operation is refused by RabbitMQ, by name (403
ACCESS_REFUSED naming the resource, or 406 for a forged user_id). docs/security.md has the table."""
from __future__ import annotations

import uuid

import pika
import pika.exceptions
import pytest

from broker import admin, definitions, topology
from common.transport.connection import connect
from common.transport.publish import publish_message
from common.wire import messages

pytestmark = pytest.mark.integration


@pytest.fixture
def users(topo):
    """The coordinator's user and two worker nodes' users of `topo` (and of a second experiment), as URLs."""
    api = admin.Management()
    other = topology.Topology(f"{topo.experiment}-other")
    made = {
        "coordinator": (definitions.coordinator_user(topo), admin.add_coordinator(api, topo)),
        "n1": (definitions.worker_user(topo, "n1"), admin.add_worker(api, topo, "n1")),
        "n2": (definitions.worker_user(topo, "n2"), admin.add_worker(api, topo, "n2")),
    }
    guest = connect("test", device="other-experiment", attempts=3)
    topology.declare(guest.channel(), other)
    try:
        yield {role: admin.user_url(u, p) for role, (u, p) in made.items()} | {"other": other}
    finally:
        topology.delete(guest.channel(), other)
        guest.close()
        for user, _ in made.values():
            api.delete_user(user)


def _refused(url: str, operation, code: int = 403) -> str:
    """Run `operation(channel)` on a fresh confirming channel of `url`'s user; assert the broker closes the
    channel with `code`; return its reply text."""
    conn = connect("test", device="attacker", url=url, attempts=3)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            operation(ch)
        assert refused.value.reply_code == code, refused.value
        return refused.value.reply_text
    finally:
        if conn.is_open:
            conn.close()


def _task(topo) -> messages.TrainTask:
    from common.learning.config import TrainConfig

    return messages.TrainTask(topo.experiment, "run", "t1", 0, 2e9, "none", "kws-tiny", False, TrainConfig(steps=1))


def test_a_worker_cannot_publish_tasks_models_or_another_workers_events(users, topo):
    n1 = users["n1"]
    body = messages.encode(_task(topo))
    cases = {
        "a task": (lambda ch: ch.basic_publish(topo.task_exchange, topo.TASKS_KEY, body), topo.task_exchange),
        "a model chunk": (lambda ch: ch.basic_publish(topo.model_exchange, topo.MODELS_KEY, b"x"), topo.model_exchange),
        "into a queue by the default exchange": (lambda ch: ch.basic_publish("", topo.tasks, body), "amq.default"),
        "to the dead-letter exchange": (lambda ch: ch.basic_publish(topo.dlx, "", body), topo.dlx),
        "another node's heartbeat": (lambda ch: ch.basic_publish(topo.events, "heartbeat.n2", b"x"), "heartbeat.n2"),
        "the evaluator's metrics": (lambda ch: ch.basic_publish(topo.events, "metrics.evaluator", b"x"),
                                    "metrics.evaluator"),
        "a model announcement": (lambda ch: ch.basic_publish(topo.events, "model.version", b"x"), "model.version"),
    }
    for what, (operation, name) in cases.items():
        text = _refused(n1, operation)
        assert "ACCESS_REFUSED" in text and name in text, (what, text)


def test_a_worker_cannot_read_updates_delete_or_declare(users, topo):
    n1 = users["n1"]
    cases = {
        "consume the updates": (lambda ch: ch.basic_consume(topo.updates, lambda *a: None), topo.updates),
        "read the dead letters": (lambda ch: ch.basic_get(topo.dead_letters), topo.dead_letters),
        "delete the tasks queue": (lambda ch: ch.queue_delete(topo.tasks), topo.tasks),
        "delete the models stream": (lambda ch: ch.queue_delete(topo.models), topo.models),
        "delete an exchange": (lambda ch: ch.exchange_delete(topo.events), topo.events),
        "declare a queue": (lambda ch: ch.queue_declare(f"{topo.prefix}.evil", durable=True), f"{topo.prefix}.evil"),
        "bind to the events": (lambda ch: ch.queue_bind(topo.tasks, topo.events, "#"), topo.tasks),
    }
    for what, (operation, name) in cases.items():
        text = _refused(n1, operation)
        assert "ACCESS_REFUSED" in text and name in text, (what, text)


def test_a_worker_may_do_its_job(users, topo):
    """The positive half: what a worker needs is allowed (passive declares, its own events, updates)."""
    conn = connect("test", device="n1", url=users["n1"], attempts=3)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        topology.require(ch, topo)
        for key in ("registration.n1", "heartbeat.n1", "metrics.n1"):
            ch.basic_publish(topo.events, key, b"x")
        publish_message(ch, topo.update_exchange, topo.UPDATES_KEY, messages.Heartbeat(topo.experiment, "n1", "cpu", 0.0))
        ch.basic_get(topo.tasks)
    finally:
        conn.close()


def test_a_forged_user_id_is_refused_by_the_broker(users, topo):
    """RabbitMQ checks user_id against the connection's user: a worker cannot sign as another."""
    text = _refused(users["n1"], lambda ch: ch.basic_publish(
        topo.update_exchange, topo.UPDATES_KEY, b"x",
        pika.BasicProperties(user_id=definitions.worker_user(topo, "n2"))), code=406)
    assert "PRECONDITION_FAILED" in text and "user_id property set to" in text, text


def test_the_worker_purging_the_task_queue_is_the_one_thing_the_broker_allows(users, topo):
    """RabbitMQ ties queue.purge to read permission, which consuming needs: a worker can purge the tasks
    queue. What stops the harm is the coordinator: tasks that are not answered expire at their deadline and
    are issued again (tests/unit/test_dispatch.py; docs/security.md)."""
    conn = connect("test", device="n1", url=users["n1"], attempts=3)
    try:
        ch = conn.channel()
        assert ch.queue_purge(topo.tasks).method.message_count == 0
    finally:
        conn.close()


def test_the_coordinator_reaches_only_its_own_experiment(users, topo):
    coordinator, other = users["coordinator"], users["other"]
    conn = connect("test", device="coordinator", url=coordinator, attempts=3)
    try:  # its own experiment: all of it, its listener queue included
        ch = conn.channel()
        topology.declare(ch, topo)
        topo.listen(ch, "coordinator", ("registration.#", "heartbeat.#", "metrics.#"))
    finally:
        conn.close()
    body = messages.encode(_task(other))
    cases = {
        "another experiment's tasks": (lambda ch: ch.basic_publish(other.task_exchange, other.TASKS_KEY, body),
                                       other.task_exchange),
        "the default exchange": (lambda ch: ch.basic_publish("", other.tasks, body), "amq.default"),
        "another experiment's queue": (lambda ch: ch.queue_delete(other.tasks), other.tasks),
        "another experiment's updates": (lambda ch: ch.basic_consume(other.updates, lambda *a: None), other.updates),
        "a queue outside mqfed": (lambda ch: ch.queue_declare(f"evil-{uuid.uuid4().hex[:6]}"), "evil-"),
    }
    for what, (operation, name) in cases.items():
        text = _refused(coordinator, operation)
        assert "ACCESS_REFUSED" in text and name in text, (what, text)


def test_a_revoked_worker_is_cut_off(users, topo):
    conn = connect("test", device="n2", url=users["n2"], attempts=3)
    revoked = admin.revoke_worker(admin.Management(), topo, "n2")
    assert revoked
    for _ in range(50):
        if not conn.is_open:
            break
        try:
            conn.process_data_events(time_limit=0.1)
        except pika.exceptions.AMQPError:
            break
    assert not conn.is_open, "the revoked worker's connection stayed open"
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(users["n2"]))
