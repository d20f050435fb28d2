"""The RabbitMQ topology of one experiment, in one place.

All names derive from the experiment name and read well in the management UI:

| name                          | kind                | arguments                                                   |
|-------------------------------|---------------------|-------------------------------------------------------------|
| mqfed.<exp>.tasks             | quorum queue        | dead letters -> mqfed.<exp>.dlx                             |
| mqfed.<exp>.updates           | quorum queue        | single active consumer, dead letters -> mqfed.<exp>.dlx     |
| mqfed.<exp>.models            | stream              | x-max-length-bytes retention                                |
| mqfed.<exp>.model-index       | stream              | small ModelVersion announcements (offset of each version)   |
| mqfed.<exp>.dead-letters      | quorum queue        | inspectable; bound to the DLX                               |
| mqfed.<exp>.work              | direct exchange     | "tasks" -> tasks queue, "updates" -> updates queue          |
| mqfed.<exp>.dlx               | fanout exchange     | dead-letter exchange                                        |
| mqfed.<exp>.events            | topic exchange      | registration.<node>, heartbeat.<node>, metrics.<source>, model.version |
"""
from __future__ import annotations

import dataclasses
import re

import pika.exceptions

from common.errors import MqfedError
from common.logs import get_logger
from common.transport.connection import QueueUnavailable, queue_unavailable_is_retryable

log = get_logger(__name__)
_NAME_OK = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEFAULT_MODEL_RETENTION_BYTES = 20 * 1024**3


@dataclasses.dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict


@dataclasses.dataclass(frozen=True)
class Exchange:
    name: str
    type: str


@dataclasses.dataclass(frozen=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str


@dataclasses.dataclass(frozen=True)
class Topology:
    """Names and arguments of an experiment's queues, exchanges and bindings."""

    experiment: str
    model_retention_bytes: int = DEFAULT_MODEL_RETENTION_BYTES
    task_delivery_limit: int = 5

    def __post_init__(self) -> None:
        if not _NAME_OK.match(self.experiment):
            raise ValueError(f"experiment name {self.experiment!r} must match {_NAME_OK.pattern}")

    @property
    def prefix(self) -> str:
        return f"mqfed.{self.experiment}"

    tasks = property(lambda self: f"{self.prefix}.tasks")
    updates = property(lambda self: f"{self.prefix}.updates")
    models = property(lambda self: f"{self.prefix}.models")
    model_index = property(lambda self: f"{self.prefix}.model-index")
    dead_letters = property(lambda self: f"{self.prefix}.dead-letters")
    work_exchange = property(lambda self: f"{self.prefix}.work")
    dlx = property(lambda self: f"{self.prefix}.dlx")
    events = property(lambda self: f"{self.prefix}.events")
    TASKS_KEY, UPDATES_KEY = "tasks", "updates"

    def queues(self) -> list[Queue]:
        dl = {"x-dead-letter-exchange": self.dlx}
        stream = {"x-queue-type": "stream", "x-max-length-bytes": self.model_retention_bytes}
        return [
            Queue(self.tasks, {"x-queue-type": "quorum", **dl, "x-delivery-limit": self.task_delivery_limit}),
            Queue(self.updates, {"x-queue-type": "quorum", "x-single-active-consumer": True, **dl}),
            Queue(self.models, stream),
            Queue(self.model_index, {"x-queue-type": "stream", "x-max-length-bytes": 64 * 1024 * 1024}),
            Queue(self.dead_letters, {"x-queue-type": "quorum"}),
        ]

    def exchanges(self) -> list[Exchange]:
        return [Exchange(self.work_exchange, "direct"), Exchange(self.dlx, "fanout"), Exchange(self.events, "topic")]

    def bindings(self) -> list[Binding]:
        return [
            Binding(self.work_exchange, self.tasks, self.TASKS_KEY),
            Binding(self.work_exchange, self.updates, self.UPDATES_KEY),
            Binding(self.dlx, self.dead_letters, ""),
        ]


def declare(channel, topo: Topology, passive: bool = False) -> None:
    """Declare every exchange, queue and binding of `topo`; idempotent (same arguments each time).

    passive=True only checks that they exist (for roles without configure permission, e.g. workers);
    raises pika.exceptions.ChannelClosedByBroker (404) when something is missing, and
    common.transport.connection.QueueUnavailable (a retryable 404) when a queue exists but is not back yet after a restart.
    """
    with queue_unavailable_is_retryable():
        for ex in topo.exchanges():
            channel.exchange_declare(ex.name, ex.type, durable=True, passive=passive)
        for q in topo.queues():
            channel.queue_declare(q.name, durable=True, passive=passive, arguments=None if passive else q.arguments)
        if not passive:
            for b in topo.bindings():
                channel.queue_bind(b.queue, b.exchange, routing_key=b.routing_key)
    log.debug("topology_declared", experiment=topo.experiment, passive=passive)


class ExperimentNotDeclared(MqfedError):
    """The experiment's queues do not exist (yet): its coordinator has not started. Retryable for the roles
    that wait for it (workers, the evaluator)."""


def require(channel, topo: Topology) -> None:
    """Check that `topo` exists (passively: for roles without configure permission); raises
    ExperimentNotDeclared naming the experiment when it does not."""
    try:
        declare(channel, topo, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 404 or isinstance(exc, QueueUnavailable):
            raise
        log.warning("experiment_not_declared", experiment=topo.experiment,
                    hint="start the coordinator (or `mqfed-broker setup`) for this experiment")
        raise ExperimentNotDeclared(f"experiment {topo.experiment}: {exc.reply_text}") from None


def delete(channel, topo: Topology) -> None:
    """Delete everything `topo` declared (used by tests and `mqfed-broker teardown`)."""
    for q in topo.queues():
        channel.queue_delete(q.name)
    for ex in topo.exchanges():
        channel.exchange_delete(ex.name)
