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

Task ids are signed: `t<n>-v<version issued at>-<HMAC-SHA256(secret, n, version), 16 hex>`, so `check`
knows, without remembering every task, whether this run issued a task id (a forged one is refused) and the
version it was issued at; it remembers the tasks answered (an accepted update) until they are too old to
matter, so each task is answered once (docs/security.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re

MODES = ("async", "sync")
_TASK_ID = re.compile(r"^t(\d{1,12})-v(\d{1,12})-([0-9a-f]{16})$")


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
    secret: the key task ids are signed with (the run's; tasks of another secret are not this run's).
    version_lag: async tasks issued at version v ask for `min_version` v - version_lag (at least 0): a
    worker may train from a cached version that much older instead of fetching the newest (sync: always v).
    """

    def __init__(self, mode: str = "async", concurrency: int = 4, deadline_s: float = 600.0,
                 secret: bytes = b"", version_lag: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"dispatch mode {mode!r} unknown; known: {', '.join(MODES)}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
        if isinstance(version_lag, bool) or not isinstance(version_lag, int) or version_lag < 0:
            raise ValueError(f"version_lag must be an int >= 0, got {version_lag!r}")
        self.version_lag = version_lag if mode == "async" else 0
        self.mode, self.concurrency, self.deadline_s = mode, concurrency, float(deadline_s)
        self.outstanding: dict[str, _Outstanding] = {}
        self.issued = 0
        self.expired = 0
        self._round_started: int | None = None  # sync: the version whose round has been issued
        self.secret = secret
        self.answered: dict[str, int] = {}  # task id -> version it was issued at, for tasks with an accepted update

    def _sign(self, n: int, version: int) -> str:
        return hmac.new(self.secret, f"{n}:{version}".encode(), hashlib.sha256).hexdigest()[:16]

    def task_id(self, n: int, version: int) -> str:
        """The id of the `n`-th task issued, at `version` (signed; see the module doc)."""
        return f"t{n:06d}-v{version}-{self._sign(n, version)}"

    def check(self, task_id: str, version: int, max_staleness: int | None) -> str | None:
        """Why an update for `task_id` cannot be taken now (None: it can): `forged` (not a task this run
        issued), `answered` (an update for it was accepted already), `stale` (issued more than
        `max_staleness` versions before `version`)."""
        found = _TASK_ID.match(task_id) if isinstance(task_id, str) else None
        if found is None or not hmac.compare_digest(found[3], self._sign(int(found[1]), int(found[2]))):
            return "forged"
        if task_id in self.answered:
            return "answered"
        if max_staleness is not None and int(found[2]) < version - max_staleness:
            return "stale"
        return None

    def forget_answered(self, version: int, max_staleness: int | None) -> None:
        """Forget answered tasks `check` would call stale anyway (bounds memory)."""
        if max_staleness is not None:
            self.answered = {t: v for t, v in self.answered.items() if v >= version - max_staleness}

    def _plan(self, version: int, now: float) -> PlannedTask:
        self.issued += 1
        task = PlannedTask(self.task_id(self.issued, version), max(0, version - self.version_lag), now + self.deadline_s)
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
        task (a redelivered duplicate, reported as not accepted) changes nothing. An accepted update marks its
        task answered (see `check`)."""
        if accepted:
            found = _TASK_ID.match(task_id)
            self.answered[task_id] = int(found[2]) if found else version
        if task_id not in self.outstanding:
            return
        if self.outstanding[task_id].deadline_unix == float("inf"):
            return  # its update was accepted already (a duplicate, or another worker's copy of the task)
        if self.mode == "sync" and accepted and self.outstanding[task_id].version == version:
            self.outstanding[task_id].deadline_unix = float("inf")  # done: holds its slot for the round
            return
        del self.outstanding[task_id]

    def release(self, task_ids) -> None:
        """Free the slots of tasks whose updates were consumed without making a version (a refused step), so
        that replacements are issued (a sync round would otherwise wait for ever)."""
        for task_id in task_ids:
            self.outstanding.pop(task_id, None)

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
            "answered": dict(self.answered),
        }

    def load_state_dict(self, state: dict) -> None:
        self.issued, self.expired = int(state["issued"]), int(state["expired"])
        self._round_started = state.get("round") if state.get("mode") == self.mode else None
        self.outstanding = {t: _Outstanding(int(v), float(d)) for t, (v, d) in state["outstanding"].items()}
        self.answered = {t: int(v) for t, v in state.get("answered", {}).items()}
        if self.mode == "async":  # a sync round's done slots (infinite deadline) would never be freed here
            self.outstanding = {t: o for t, o in self.outstanding.items() if o.deadline_unix != float("inf")}
