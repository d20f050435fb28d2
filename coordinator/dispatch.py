"""Task dispatch as pure code: which train tasks to issue, and when; no broker, no clock of its own.

The coordinator asks `Dispatcher.to_issue(version, now)` after every event and publishes what it returns;
it reports each task's end with `finished(task_id)` (an update arrived for it: accepted, duplicate or
rejected) and calls `expire(now)` periodically. Times are plain floats the caller supplies (unix seconds).

Asynchronous mode (FedBuff): keep `concurrency` train tasks outstanding. Whenever one ends (its update
arrived) or expires (its deadline passed without an update), a new one is issued for the current version.

Synchronous mode (FedAvg rounds, on the same machinery): a round is the model version. At the start of a
round `concurrency` tasks are issued; when one ends without its update being accepted (rejected,
expired) a replacement is issued for the same round; nothing else is issued until the version changes,
which happens when the aggregator has K = concurrency accepted updates. So the round waits for its
slowest worker, which is the point of comparing it with FedBuff.

Every task has a deadline (`deadline_s` after issue). An expired task is forgotten here; if its update
still arrives later, the aggregator judges it by staleness like any other.
"""
from __future__ import annotations

import dataclasses
import uuid

MODES = ("async", "sync")


@dataclasses.dataclass(frozen=True)
class PlannedTask:
    task_id: str
    min_version: int
    deadline_unix: float


@dataclasses.dataclass
class _Outstanding:
    version: int
    deadline_unix: float


class Dispatcher:
    """Decides which train tasks to issue (see the module doc).

    mode: `async` or `sync`. concurrency: tasks outstanding at once (>= 1). deadline_s: task lifetime (> 0).
    """

    def __init__(self, mode: str = "async", concurrency: int = 4, deadline_s: float = 600.0) -> None:
        if mode not in MODES:
            raise ValueError(f"dispatch mode {mode!r} unknown; known: {', '.join(MODES)}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
        self.mode, self.concurrency, self.deadline_s = mode, concurrency, float(deadline_s)
        self.outstanding: dict[str, _Outstanding] = {}
        self.issued = 0
        self.expired = 0
        self._round_started: int | None = None  # sync: the version whose round has been issued

    def _plan(self, version: int, now: float) -> PlannedTask:
        self.issued += 1
        task = PlannedTask(f"t{self.issued:06d}-{uuid.uuid4().hex[:8]}", version, now + self.deadline_s)
        self.outstanding[task.task_id] = _Outstanding(version, task.deadline_unix)
        return task

    def to_issue(self, version: int, now: float) -> list[PlannedTask]:
        """The tasks to publish now for model `version` (recorded as outstanding)."""
        if self.mode == "async":
            return [self._plan(version, now) for _ in range(self.concurrency - len(self.outstanding))]
        if self._round_started != version:
            # A new round: tasks of older rounds can only produce stale updates; stop counting them.
            self.outstanding = {t: o for t, o in self.outstanding.items() if o.version == version}
            self._round_started = version
        return [self._plan(version, now) for _ in range(self.concurrency - len(self.outstanding))]

    def finished(self, task_id: str, accepted: bool, version: int) -> None:
        """An update for `task_id` arrived. In sync mode an accepted update keeps its round slot filled
        until the version changes, so the round issues no replacement for it; a later report for the same
        task (a redelivered duplicate, reported as not accepted) changes nothing."""
        if task_id not in self.outstanding:
            return
        if self.outstanding[task_id].deadline_unix == float("inf"):
            return  # its update was accepted already (a duplicate, or another worker's copy of the task)
        if self.mode == "sync" and accepted and self.outstanding[task_id].version == version:
            self.outstanding[task_id].deadline_unix = float("inf")  # done: holds its slot for the round
            return
        del self.outstanding[task_id]

    def expire(self, now: float) -> list[str]:
        """Forget tasks whose deadline passed; returns their ids (the caller logs them)."""
        gone = [t for t, o in self.outstanding.items() if o.deadline_unix <= now]
        for t in gone:
            del self.outstanding[t]
        self.expired += len(gone)
        return gone

    def state_dict(self) -> dict:
        return {
            "mode": self.mode, "issued": self.issued, "expired": self.expired, "round": self._round_started,
            "outstanding": {t: [o.version, o.deadline_unix] for t, o in self.outstanding.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.issued, self.expired = int(state["issued"]), int(state["expired"])
        self._round_started = state.get("round") if state.get("mode") == self.mode else None
        self.outstanding = {t: _Outstanding(int(v), float(d)) for t, (v, d) in state["outstanding"].items()}
        if self.mode == "async":  # a sync round's done slots (infinite deadline) would never be freed here
            self.outstanding = {t: o for t, o in self.outstanding.items() if o.deadline_unix != float("inf")}
