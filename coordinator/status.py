"""`mqfed-coordinator status --experiment NAME [--watch]`: the federation as the broker sees it, live.

Listens to the experiment's events exchange on a temporary queue (registrations, heartbeats, central
evaluation metrics, model versions; the newest version also from the model index at start), reads the
queues (ready, unacked, consumers: the management API, else passive declares, which know no unacked count)
and shows: the newest model version and its accuracy, the queues, and one row per worker trainer (node,
device, status, current task, last update, its staleness, samples/s, heartbeat age). Needs only read access
plus a temporary queue, so it runs beside a live experiment from any machine.

Without --watch: listen for --seconds, print one snapshot. With --watch: redraw every --interval seconds until
Ctrl-C or SIGTERM (exit status 0); on a terminal in place (ANSI home + clear, 80 columns), otherwise (a pipe,
a file, a log) as timestamped lines without escape codes: one summary line and one line per trainer per
interval. docs/operations.md#watching-a-federation.

The first half of this module is pure (events and values in, lines out, given `now`); the second does the I/O.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import urllib.parse

import pika.exceptions

from broker import topology
from broker.definitions import Sender, sender_of
from common.logs import get_logger
from common.wire import messages

log = get_logger(__name__)

WIDTH = 80  # the screen view fits a plain 80-column terminal
STALE_BEAT_S = 30.0  # a heartbeat older than this is marked "!" (3x the default worker.heartbeat_s)
MAX_TRAINERS = 1024  # trainers remembered (events beyond are ignored: the view's memory stays bounded)
MAX_EVENT_BYTES = 64 * 1024  # as the coordinator's event book (coordinator/events.py)
EVALUATOR = "evaluator"  # Metrics.source of central evaluations (coordinator/evaluator.py)
LEGEND = "stale: newest version - base of last update; beat: heartbeat age (! > 30s)"
_TASK_ID = re.compile(r"^(t\d+-v\d+)-[0-9a-f]{16}$")  # coordinator/dispatch.py: t<n>-v<version>-<signature>
_ROW = "{:<20} {:<6} {:<12} {:<12} {:>5} {:>9} {:>6}"
_QUEUE_ROW = "{:<14}{:>8}{:>9}{:>11}"


# -- the view (pure) -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainerView:
    """What the events said about one trainer (node, device)."""

    node: str
    device: str
    status: str = ""
    shard: str = ""
    shard_size: int | None = None
    task_id: str = ""  # the task it runs ("" none)
    samples_per_s: float = 0.0  # of its last training (0.0 unknown)
    last_update_task: str = ""
    last_update_base: int = -1  # the version its last update trained from (-1 none)
    update_age_at_beat: float | None = None  # its last update's age when the heartbeat left (worker's clock)
    heard: float | None = None  # when its last heartbeat arrived (this machine's clock)


@dataclasses.dataclass
class QueueStat:
    """One queue's counts; None where unknown. `via`: "api" (management API), "amqp" (a passive declare:
    no unacked count) or "" (not read: the queue is missing)."""

    name: str  # short: tasks, updates, dead-letters
    ready: int | None = None
    unacked: int | None = None
    consumers: int | None = None
    via: str = ""


@dataclasses.dataclass
class WatchState:
    """An experiment as its events tell it; `apply` takes one decoded event."""

    experiment: str
    trainers: dict[tuple[str, str], TrainerView] = dataclasses.field(default_factory=dict)
    version: int | None = None  # the newest model version announced
    accuracy: float | None = None  # the central evaluator's newest accuracy ...
    accuracy_version: int | None = None  # ... and the version it measured
    ignored: int = 0  # events not taken (undecodable, other experiment, forged, impossible, over the bounds)

    def _ignore(self) -> bool:
        self.ignored += 1
        return False

    def _trainer(self, node: str, device: str) -> TrainerView | None:
        key = (node, device)
        if key not in self.trainers:
            if len(self.trainers) >= MAX_TRAINERS:
                return None
            self.trainers[key] = TrainerView(node, device)
        return self.trainers[key]

    def saw_version(self, version: int) -> None:
        if self.version is None or version > self.version:
            self.version = version

    def apply(self, msg: messages.Message, sender: Sender | None, now: float) -> bool:
        """Take one event (`sender`: the broker-validated user_id's sender, broker/definitions.py) at local time
        `now`; False when it is ignored. A worker speaks only for its own node and never for the evaluator or
        the model; an event without a sender (no user_id) is ignored, as the coordinator does."""
        if getattr(msg, "experiment", None) != self.experiment or sender is None:
            return self._ignore()
        node = getattr(msg, "node", None)
        if node is not None and sender.role == "worker" and node != sender.node:
            return self._ignore()
        if isinstance(msg, messages.Heartbeat):
            return self._heartbeat(msg, now)
        if isinstance(msg, messages.Registration):
            for device in msg.devices[:16]:
                t = self._trainer(msg.node, device)
                if t is not None:
                    t.shard, t.shard_size = msg.shard, msg.shard_size
            return True
        if sender.role == "worker":  # model versions and central metrics are not a worker's to say
            return self._ignore()
        if isinstance(msg, messages.ModelVersion):
            self.saw_version(msg.version)
            return True
        if isinstance(msg, messages.Metrics) and msg.source == EVALUATOR:
            accuracy = msg.values.get("accuracy")
            if accuracy is None or not 0.0 <= accuracy <= 1.0:
                return self._ignore()
            if self.accuracy_version is None or msg.version >= self.accuracy_version:
                self.accuracy, self.accuracy_version = accuracy, msg.version
            return True
        return False  # federated evaluation metrics and the like: not shown

    def _heartbeat(self, msg: messages.Heartbeat, now: float) -> bool:
        t = self._trainer(msg.node, msg.device)
        if t is None:
            return self._ignore()
        t.status, t.task_id, t.samples_per_s, t.heard = msg.status, msg.task_id, msg.samples_per_s, now
        t.last_update_task, t.last_update_base = msg.last_update_task, msg.last_update_base
        t.update_age_at_beat = None
        if msg.last_update_unix > 0.0 and math.isfinite(msg.sent_unix):  # both the worker's clock: no skew
            t.update_age_at_beat = max(0.0, msg.sent_unix - msg.last_update_unix)
        return True


def fit(text: str, width: int) -> str:
    """`text` in at most `width` characters (a cut is marked `~`); control characters (escape codes a
    hostile name could carry into the terminal) become `?`."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= width else text[:max(0, width - 1)] + "~"


def fmt_age(seconds: float | None) -> str:
    """An age in at most 3 characters and a unit: `7s`, `12m`, `5h`, `3d`; `-` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = max(0.0, seconds)
    if s < 100:
        return f"{s:.0f}s"
    if s < 100 * 60:
        return f"{s // 60:.0f}m"
    if s < 100 * 3600:
        return f"{s // 3600:.0f}h"
    return f"{s // 86400:.0f}d"


def short_task(task_id: str) -> str:
    """A task id without its signature (`t000012-v5`); `-` for none."""
    if not task_id:
        return "-"
    found = _TASK_ID.match(task_id)
    return found.group(1) if found else task_id


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


@dataclasses.dataclass(frozen=True)
class TrainerRow:
    """One trainer's figures as shown (strings; `-` where unknown)."""

    trainer: str
    status: str
    task: str
    update_task: str  # the task of its last update
    base: str  # the version its last update trained from
    update_age: str  # how long ago it was published
    stale: str
    samples_per_s: str
    beat: str

    @property
    def last_update(self) -> str:
        return "-" if self.base == "-" else f"v{self.base} {self.update_age}"


def trainer_rows(state: WatchState, now: float, stale_after: float = STALE_BEAT_S) -> list[TrainerRow]:
    """A row per trainer, sorted by node and device, at local time `now`. Staleness of the last update is
    computed here: the newest version announced minus the version that update trained from."""
    rows = []
    for (node, device), t in sorted(state.trainers.items()):
        beat_age = None if t.heard is None else max(0.0, now - t.heard)
        base = update_age = stale = "-"
        if t.last_update_base >= 0:
            age = None if t.update_age_at_beat is None or beat_age is None else beat_age + t.update_age_at_beat
            base, update_age = str(t.last_update_base), fmt_age(age)
            if state.version is not None:
                stale = str(max(0, state.version - t.last_update_base))
        rate = f"{t.samples_per_s:.1f}" if t.samples_per_s > 0 else "-"
        beat = fmt_age(beat_age) + ("!" if beat_age is not None and beat_age > stale_after else "")
        rows.append(TrainerRow(f"{node}/{device}", t.status or "-", short_task(t.task_id),
                               short_task(t.last_update_task), base, update_age, stale, rate, beat))
    return rows


def _unacked(q: QueueStat) -> str:
    return "?" if q.via == "amqp" and q.unacked is None else _count(q.unacked)


def _model_line(state: WatchState) -> str:
    version = "-" if state.version is None else str(state.version)
    accuracy = "-" if state.accuracy is None else f"{state.accuracy:.4f} (version {state.accuracy_version})"
    return f"model version {version}   accuracy {accuracy}"


def render_screen(state: WatchState, queues: list[QueueStat], now: float, *, source: str = "",
                  width: int = WIDTH, max_lines: int | None = None, note: str = "", shards: bool = False,
                  stale_after: float = STALE_BEAT_S) -> list[str]:
    """The view as lines of at most `width` characters (no escape codes), at most `max_lines` of them (the
    trainers that do not fit are counted on the last line). `source`: where the queue counts came from.
    `shards`: add each node's shard (the one-shot snapshot)."""
    clock = time.strftime("%H:%M:%S UTC", time.gmtime(now))
    head = [fit(f"mqfed status  experiment {state.experiment}", width - len(clock) - 1).ljust(width - len(clock))
            + clock, fit(_model_line(state), width), ""]
    prefix = topology.Topology(state.experiment).prefix
    head += [fit(f"queues {prefix}.* {source}".rstrip(), width),
             _QUEUE_ROW.format("queue", "ready", "unacked", "consumers")]
    for q in queues:
        head.append(_QUEUE_ROW.format(q.name, _count(q.ready), _unacked(q), _count(q.consumers)))
    head += ["", _ROW.format("trainer", "status", "task", "last update", "stale", "samples/s", "beat")]
    rows = [_ROW.format(fit(r.trainer, 20), fit(r.status, 6), fit(r.task, 12), fit(r.last_update, 12),
                        fit(r.stale, 5), fit(r.samples_per_s, 9), r.beat)
            for r in trainer_rows(state, now, stale_after)]
    if not rows:
        rows = ["(no trainer heard from yet)"]
    tail = [LEGEND]
    if shards:
        nodes = sorted({(t.node, t.shard, t.shard_size) for t in state.trainers.values() if t.shard})
        tail += [f"shard of {fit(n, 20)}: {fit(s, 30)} ({_count(size)} clips)" for n, s, size in nodes]
    if note:
        tail.append(fit(note, width))
    if max_lines is not None and len(head) + len(rows) + len(tail) > max_lines:
        room = max(0, max_lines - len(head) - len(tail) - 1)
        rows = rows[:room] + [f"... {len(rows) - room} more trainers (a taller terminal shows them)"]
    lines = [line[:width].rstrip() for line in head + rows + tail]
    return lines if max_lines is None else lines[:max_lines]


def _log_value(text: str) -> str:
    return fit(text, 64).replace(" ", "_") or "-"


def render_log(state: WatchState, queues: list[QueueStat], now: float, *, note: str = "",
               stale_after: float = STALE_BEAT_S) -> list[str]:
    """The view as log lines, each starting with an ISO time (UTC): a summary (version, accuracy, queues as
    ready/unacked/consumers, dead letters, trainers) and one `key=value` line per trainer."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    accuracy = "-" if state.accuracy is None else f"{state.accuracy:.4f}@v{state.accuracy_version}"
    parts = [f"experiment={_log_value(state.experiment)}",
             f"version={'-' if state.version is None else state.version}", f"accuracy={accuracy}"]
    for q in queues:
        if q.name == "dead-letters":
            parts.append(f"dead_letters={_count(q.ready)}")
        else:
            parts.append(f"{q.name}={_count(q.ready)}/{_unacked(q)}/{_count(q.consumers)}")
    parts.append(f"trainers={len(state.trainers)}")
    lines = [f"{stamp} " + " ".join(parts)]
    for r in trainer_rows(state, now, stale_after):
        lines.append(f"{stamp} trainer={_log_value(r.trainer)} status={_log_value(r.status)}"
                     f" task={_log_value(r.task)} last_update={_log_value(r.update_task)}"
                     f" base={r.base} update_age={r.update_age} stale={r.stale}"
                     f" samples_per_s={r.samples_per_s} beat={r.beat}")
    if note:
        lines.append(f"{stamp} note: {fit(note, 200)}")
    return lines


# -- the broker side -------------------------------------------------------------------------------------------

def vhost_of(url: str) -> str:
    """The vhost an AMQP URL names ("" and "/" are the default vhost "/")."""
    path = urllib.parse.urlparse(url).path
    return urllib.parse.unquote(path.split("/")[1]) if len(path) > 1 else "/"


class QueueReader:
    """The experiment's queues (tasks, updates, dead letters; not the streams): from the management API
    (broker/admin.py; MQFED_MANAGEMENT_* or AMQP_URL's host and user), else, while it cannot be had
    (unreachable, not an administrator), from passive declares (ready and consumers only). The API is
    tried again every `retry_api_s`."""

    def __init__(self, topo: topology.Topology, api=None, vhost: str = "/", retry_api_s: float = 30.0) -> None:
        self.names = [("tasks", topo.tasks), ("updates", topo.updates), ("dead-letters", topo.dead_letters)]
        self.api, self.vhost, self.retry_api_s = api, vhost, retry_api_s
        self.api_failed_at: float | None = None
        self.source = ""

    def read(self, conn) -> list[QueueStat]:
        from broker.admin import ManagementError

        if self.api is not None and (self.api_failed_at is None
                                     or time.monotonic() - self.api_failed_at >= self.retry_api_s):
            try:
                stats = [self._from_api(short, name) for short, name in self.names]
                self.api_failed_at, self.source = None, "(management API)"
                return stats
            except ManagementError as exc:
                if self.api_failed_at is None:
                    log.warning("status_management_api_unavailable", error=str(exc)[:300],
                                fallback="passive declares: no unacked counts")
                self.api_failed_at = time.monotonic()
        self.source = "(AMQP: unacked ?)"
        return [self._from_amqp(conn, short, name) for short, name in self.names]

    def _from_api(self, short: str, name: str) -> QueueStat:
        from broker.admin import ManagementError

        path = (f"/api/queues/{urllib.parse.quote(self.vhost, safe='')}/{urllib.parse.quote(name, safe='')}"
                "?columns=messages_ready,messages_unacknowledged,consumers")
        try:
            q = self.api.request("GET", path) or {}
        except ManagementError as exc:
            if "HTTP 404" in str(exc):
                return QueueStat(short)
            raise

        def num(key: str) -> int | None:
            value = q.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        return QueueStat(short, num("messages_ready"), num("messages_unacknowledged"), num("consumers"), "api")

    @staticmethod
    def _from_amqp(conn, short: str, name: str) -> QueueStat:
        ch = conn.channel()
        try:
            decl = ch.queue_declare(name, passive=True).method
            return QueueStat(short, decl.message_count, None, decl.consumer_count, "amqp")
        except pika.exceptions.ChannelClosedByBroker:  # 404: not there (the channel is closed by it)
            return QueueStat(short)
        finally:
            if ch.is_open:
                ch.close()


def _listen(conn, topo: topology.Topology, state: WatchState):
    """Bind a temporary queue to every event and follow the model index (the newest version now: events only
    announce the next). Returns the ModelStore following the index. Raises ExperimentNotDeclared when the
    experiment's exchanges do not exist."""
    from common.transport.model_store import ModelStore

    ch = conn.channel()
    try:
        q = topo.listen(ch, "status", ("#",))
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            raise topology.ExperimentNotDeclared(
                f"experiment {topo.experiment} is not declared (no coordinator has started it): {exc.reply_text}") from None
        raise

    def on_event(_ch, _method, props, body):
        if len(body) > MAX_EVENT_BYTES:
            state.ignored += 1
            return
        try:
            msg = messages.decode(body)
        except messages.MessageError:
            state.ignored += 1
            return
        state.apply(msg, sender_of(topo, getattr(props, "user_id", None)), time.time())

    ch.basic_consume(q, on_event, auto_ack=True)
    store = ModelStore(conn.channel(), topo)
    try:
        store.follow(conn.channel())
    except pika.exceptions.ChannelClosedByBroker as exc:  # no index stream (yet): the events will tell
        log.info("status_no_model_index", error=exc.reply_text)
    return store


def _queue_reader(topo: topology.Topology) -> QueueReader:
    from broker.admin import Management
    from common.transport.connection import amqp_urls

    url = amqp_urls()[0]
    return QueueReader(topo, Management(timeout=3.0), vhost_of(url))


def snapshot(args: argparse.Namespace, topo: topology.Topology) -> int:
    """Listen for --seconds, print the view once."""
    from common.transport.connection import close_quietly, connect

    state = WatchState(args.experiment)
    conn = connect("status", device=args.experiment, attempts=3)
    try:
        store = _listen(conn, topo, state)
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            conn.process_data_events(time_limit=min(0.5, max(0.0, deadline - time.monotonic())))
        if store.newest is not None:
            state.saw_version(store.newest.version)
        reader = _queue_reader(topo)
        queues = reader.read(conn)
        store.unfollow()
    finally:
        close_quietly(conn)
    note = "" if state.trainers else f"(no worker heartbeat in {args.seconds:.0f} s)"
    print("\n".join(render_screen(state, queues, time.time(), source=reader.source, note=note, shards=True)))
    return 0


class _Screen:
    """Where the view goes: a terminal (redrawn in place) or a log (timestamped lines appended)."""

    def __init__(self, out, tty: bool) -> None:
        self.out, self.tty, self.drawn = out, tty, False

    def show(self, state: WatchState, queues: list[QueueStat], source: str, note: str = "") -> None:
        now = time.time()
        if self.tty:
            cols, rows = shutil.get_terminal_size((WIDTH, 24))
            lines = render_screen(state, queues, now, source=source, width=min(WIDTH, cols),
                                  max_lines=max(1, rows - 1), note=note)
            start = "\x1b[H" if self.drawn else "\x1b[H\x1b[2J"  # home (and clear, the first time)
            self.out.write(start + "".join(line + "\x1b[K\n" for line in lines) + "\x1b[J")
        else:
            self.out.write("".join(line + "\n" for line in render_log(state, queues, now, note=note)))
        self.out.flush()
        self.drawn = True


def watch(args: argparse.Namespace, topo: topology.Topology, out=None) -> int:
    """Redraw every --interval seconds until SIGTERM or Ctrl-C (then exit status 0); reconnects when the
    broker goes away, waits (and says so) while the experiment is not declared."""
    from common.transport.connection import run_forever

    out = out or sys.stdout
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    state = WatchState(args.experiment)
    screen = _Screen(out, out.isatty())
    reader = _queue_reader(topo)

    def session(conn) -> int:
        try:
            store = _listen(conn, topo, state)
        except topology.ExperimentNotDeclared:
            screen.show(state, [], "", note="waiting: the experiment is not declared (its coordinator has not"
                                            " started); retrying")
            raise
        next_draw = time.monotonic()
        while not stop.is_set():
            if time.monotonic() >= next_draw:
                if store.newest is not None:
                    state.saw_version(store.newest.version)
                screen.show(state, reader.read(conn), reader.source)
                next_draw = time.monotonic() + args.interval
            conn.process_data_events(time_limit=max(0.0, min(0.2, next_draw - time.monotonic())))
        return 0

    try:
        run_forever(session, "status", None, args.experiment, stop=stop, retry_on=(topology.ExperimentNotDeclared,))
    except BrokenPipeError:  # the reader of a pipe went away (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        topo = topology.Topology(args.experiment)
    except ValueError as exc:
        print(f"mqfed-coordinator status: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "watch", False) and not (math.isfinite(args.interval) and args.interval > 0):
        print(f"mqfed-coordinator status: --interval must be a number of seconds > 0, got {args.interval}",
              file=sys.stderr)
        return 2
    if getattr(args, "watch", False):
        return watch(args, topo)
    return snapshot(args, topo)
