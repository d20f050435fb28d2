"""The RabbitMQ topology of one experiment, in one place.

All names derive from the experiment name and read well in the management UI:

| name                          | kind                | arguments                                                   |
|-------------------------------|---------------------|-------------------------------------------------------------|
| mqfed.<exp>.tasks             | quorum queue        | dead letters -> mqfed.<exp>.dlx                             |
| mqfed.<exp>.updates           | quorum queue        | single active consumer, dead letters -> mqfed.<exp>.dlx     |
| mqfed.<exp>.models            | stream              | x-max-length-bytes retention                                |
| mqfed.<exp>.model-index       | stream              | small ModelVersion announcements (offset of each version)   |
| mqfed.<exp>.dead-letters      | quorum queue        | inspectable; bound to the DLX; newest 10 000 / 1 GiB kept   |
| mqfed.<exp>.task-exchange     | direct exchange     | "tasks" -> tasks queue (the coordinator writes)             |
| mqfed.<exp>.update-exchange   | direct exchange     | "updates" -> updates queue (workers write)                  |
| mqfed.<exp>.model-exchange    | direct exchange     | "models" / "model-index" -> the two streams (coordinator)   |
| mqfed.<exp>.dlx               | fanout exchange     | dead-letter exchange                                        |
| mqfed.<exp>.events            | topic exchange      | registration.<node>, heartbeat.<node>, metrics.<source>, model.version |
| mqfed.<exp>.listen.<id>       | classic, exclusive  | an event listener's own queue (coordinator, status)         |

One exchange per writer role, and no use of the default exchange, so that RabbitMQ's write permission (a
regex on exchange names) says who may publish what: docs/security.md.
"""
from __future__ import annotations

import dataclasses
import re
import uuid

import pika.exceptions

from common.errors import MqfedError
from common.logs import get_logger
from common.transport.connection import QueueUnavailable, queue_unavailable_is_retryable

log = get_logger(__name__)
_NAME_OK = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEFAULT_MODEL_RETENTION_BYTES = 20 * 1024**3
DEAD_LETTER_MAX_MESSAGES = 10_000  # the dead-letter queue keeps the newest (drop-head): bounded under a flood
DEAD_LETTER_MAX_BYTES = 1024**3
LISTENER_MAX_EVENTS = 10_000  # an event listener that falls behind loses the oldest, its memory stays bounded


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
    task_exchange = property(lambda self: f"{self.prefix}.task-exchange")
    update_exchange = property(lambda self: f"{self.prefix}.update-exchange")
    model_exchange = property(lambda self: f"{self.prefix}.model-exchange")
    dlx = property(lambda self: f"{self.prefix}.dlx")
    events = property(lambda self: f"{self.prefix}.events")
    TASKS_KEY, UPDATES_KEY, MODELS_KEY, MODEL_INDEX_KEY = "tasks", "updates", "models", "model-index"

    def listener_queue(self, role: str) -> str:
        """A name for an event listener's own exclusive queue (inside the experiment's names, so the
        coordinator's configure permission covers it)."""
        return f"{self.prefix}.listen.{role}-{uuid.uuid4().hex[:12]}"

    def listen(self, channel, role: str, keys: tuple[str, ...]) -> str:
        """Declare `role`'s own exclusive event queue (at most LISTENER_MAX_EVENTS waiting), bind it to the
        events exchange with each routing key in `keys`; returns its name."""
        q = channel.queue_declare(self.listener_queue(role), exclusive=True, auto_delete=True,
                                  arguments={"x-max-length": LISTENER_MAX_EVENTS}).method.queue
        for key in keys:
            channel.queue_bind(q, self.events, routing_key=key)
        return q

    def queues(self) -> list[Queue]:
        dl = {"x-dead-letter-exchange": self.dlx}
        stream = {"x-queue-type": "stream", "x-max-length-bytes": self.model_retention_bytes}
        return [
            Queue(self.tasks, {"x-queue-type": "quorum", **dl, "x-delivery-limit": self.task_delivery_limit}),
            Queue(self.updates, {"x-queue-type": "quorum", "x-single-active-consumer": True, **dl}),
            Queue(self.models, stream),
            Queue(self.model_index, {"x-queue-type": "stream", "x-max-length-bytes": 64 * 1024 * 1024}),
            Queue(self.dead_letters, {"x-queue-type": "quorum", "x-max-length": DEAD_LETTER_MAX_MESSAGES,
                                      "x-max-length-bytes": DEAD_LETTER_MAX_BYTES, "x-overflow": "drop-head"}),
        ]

    def exchanges(self) -> list[Exchange]:
        return [Exchange(self.task_exchange, "direct"), Exchange(self.update_exchange, "direct"),
                Exchange(self.model_exchange, "direct"), Exchange(self.dlx, "fanout"), Exchange(self.events, "topic")]

    def bindings(self) -> list[Binding]:
        return [
            Binding(self.task_exchange, self.tasks, self.TASKS_KEY),
            Binding(self.update_exchange, self.updates, self.UPDATES_KEY),
            Binding(self.model_exchange, self.models, self.MODELS_KEY),
            Binding(self.model_exchange, self.model_index, self.MODEL_INDEX_KEY),
            Binding(self.dlx, self.dead_letters, ""),
        ]


def declare(channel, topo: Topology, passive: bool = False) -> None:
    """Declare every exchange, queue and binding of `topo`; idempotent (same arguments each time).

    passive=True only checks that they exist (for roles without configure permission, e.g. workers);
    raises pika.exceptions.ChannelClosedByBroker (404) when something is missing, and
    common.transport.connection.QueueUnavailable (a retryable 404) when a queue exists but is not back yet after a restart.
    """
    try:
        with queue_unavailable_is_retryable():
            for ex in topo.exchanges():
                channel.exchange_declare(ex.name, ex.type, durable=True, passive=passive)
            for q in topo.queues():
                channel.queue_declare(q.name, durable=True, passive=passive,
                                      arguments=None if passive else q.arguments)
            if not passive:
                for b in topo.bindings():
                    channel.queue_bind(b.queue, b.exchange, routing_key=b.routing_key)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            raise TopologyMismatch(
                f"experiment {topo.experiment}: {exc.reply_text}. It was declared with other arguments (by an"
                f" older mqfed?): `mqfed-broker teardown --experiment {topo.experiment}` or run the coordinator"
                f" with --fresh") from None
        raise
    log.debug("topology_declared", experiment=topo.experiment, passive=passive)


class TopologyMismatch(MqfedError):
    """A queue or exchange of the experiment exists with other arguments than this code declares."""


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
