"""Task dispatch: async keeps `concurrency` tasks outstanding, sync issues rounds of `concurrency` tasks
that wait for their slowest worker; deadlines, expiry, replacement, resume. Driven together with the
real aggregator, sync dispatch gives FedAvg rounds, checked against hand-computed numbers."""
from __future__ import annotations

import math

import pytest
import torch

from coordinator import checkpoint
from coordinator.aggregator import (
    Aggregator,
    AggregatorConfig,
    ClientUpdate,
    UpdateRejected,
)
from coordinator.dispatch import Dispatcher, PlannedTask
from coordinator.server_optim import ServerOptimizerConfig

T0 = 1_000.0


def ids(tasks: list[PlannedTask]) -> list[str]:
    return [t.task_id for t in tasks]


# -- asynchronous ------------------------------------------------------------------------------------------

def test_async_issues_concurrency_tasks_and_nothing_more_while_they_are_outstanding():
    d = Dispatcher("async", concurrency=3, deadline_s=60.0)
    first = d.to_issue(0, T0)
    assert len(first) == 3 and [t.min_version for t in first] == [0, 0, 0]
    assert set(d.outstanding) == set(ids(first))
    assert d.to_issue(0, T0 + 1) == [] and d.to_issue(5, T0 + 2) == []  # even at a new version
    assert d.issued == 3 and d.expired == 0


def test_async_deadline_is_now_plus_deadline_s():
    d = Dispatcher("async", concurrency=2, deadline_s=42.5)
    assert [t.deadline_unix for t in d.to_issue(0, T0)] == [T0 + 42.5, T0 + 42.5]
    assert [o.deadline_unix for o in d.outstanding.values()] == [T0 + 42.5, T0 + 42.5]


@pytest.mark.parametrize("accepted", [True, False])
def test_async_finished_task_is_replaced_for_the_current_version(accepted):
    d = Dispatcher("async", concurrency=3, deadline_s=60.0)
    a, b, c = d.to_issue(0, T0)
    d.finished(b.task_id, accepted, 0)
    assert set(d.outstanding) == {a.task_id, c.task_id}
    (new,) = d.to_issue(7, T0 + 5)
    assert new.min_version == 7 and new.deadline_unix == T0 + 65.0
    assert new.task_id not in (a.task_id, b.task_id, c.task_id)
    assert set(d.outstanding) == {a.task_id, c.task_id, new.task_id}
    assert d.issued == 4 and d.expired == 0


def test_async_expired_tasks_are_forgotten_counted_and_replaced():
    d = Dispatcher("async", concurrency=2, deadline_s=10.0)
    a, b = d.to_issue(0, T0)
    d.finished(a.task_id, True, 0)
    (c,) = d.to_issue(1, T0 + 5)  # c's deadline: T0 + 15
    assert d.expire(T0 + 9.999) == [] and d.expired == 0
    assert d.expire(T0 + 10.0) == [b.task_id]  # the deadline itself has passed
    assert d.expired == 1 and set(d.outstanding) == {c.task_id}
    (r,) = d.to_issue(2, T0 + 11)
    assert r.min_version == 2 and r.deadline_unix == T0 + 21.0
    assert d.expire(T0 + 100) == [c.task_id, r.task_id]
    assert d.expired == 3 and d.outstanding == {}
    assert [t.min_version for t in d.to_issue(3, T0 + 100)] == [3, 3]


def test_async_update_for_unknown_or_expired_task_changes_nothing():
    d = Dispatcher("async", concurrency=2, deadline_s=10.0)
    a, b = d.to_issue(0, T0)
    d.expire(T0 + 10)
    assert len(d.to_issue(0, T0 + 10)) == 2  # both replaced
    before = (dict(d.outstanding), d.issued, d.expired)
    d.finished(a.task_id, True, 0)  # arrived after its deadline
    d.finished(b.task_id, False, 0)
    d.finished("no-such-task", True, 0)
    assert (dict(d.outstanding), d.issued, d.expired) == before
    assert d.to_issue(0, T0 + 11) == []


def test_task_ids_are_unique():
    d = Dispatcher("async", concurrency=5, deadline_s=1.0)
    seen: list[str] = []
    for step in range(100):
        now = T0 + step
        seen += ids(d.to_issue(step, now))
        for t in list(d.outstanding)[:2]:
            d.finished(t, step % 2 == 0, step)
        d.expire(now + 0.5 if step % 3 else now + 1.0)
    assert len(seen) == d.issued == len(set(seen))
    assert d.issued > 200


# -- synchronous -------------------------------------------------------------------------------------------

def test_sync_issues_exactly_concurrency_tasks_at_a_new_version():
    d = Dispatcher("sync", concurrency=3, deadline_s=60.0)
    round0 = d.to_issue(0, T0)
    assert len(round0) == 3 and {t.min_version for t in round0} == {0}
    assert {t.deadline_unix for t in round0} == {T0 + 60.0}
    assert d.to_issue(0, T0 + 1) == []


def test_sync_accepted_task_keeps_its_slot_until_the_version_changes():
    d = Dispatcher("sync", concurrency=3, deadline_s=60.0)
    a, b, c = d.to_issue(0, T0)
    d.finished(a.task_id, True, 0)
    assert d.outstanding[a.task_id].deadline_unix == math.inf  # done; holds the slot for the round
    assert d.to_issue(0, T0 + 1) == []
    assert d.expire(T0 + 1e9) == [b.task_id, c.task_id]  # only the unfinished ones expire
    assert a.task_id in d.outstanding and d.expired == 2
    replacements = d.to_issue(0, T0 + 1e9)
    assert len(replacements) == 2 and {t.min_version for t in replacements} == {0}


@pytest.mark.parametrize("how", ["rejected", "expired"])
def test_sync_task_that_ends_without_an_accepted_update_is_replaced_in_the_same_round(how):
    d = Dispatcher("sync", concurrency=3, deadline_s=60.0)
    a, b, c = d.to_issue(4, T0)
    d.finished(a.task_id, True, 4)
    if how == "rejected":
        d.finished(b.task_id, False, 4)
    else:
        d.outstanding[c.task_id].deadline_unix = T0 + 120  # c is not due yet
        assert d.expire(T0 + 60) == [b.task_id]
    (r,) = d.to_issue(4, T0 + 61)
    assert r.min_version == 4 and r.deadline_unix == T0 + 121
    assert set(d.outstanding) == {a.task_id, c.task_id, r.task_id}
    assert d.to_issue(4, T0 + 62) == []


def test_sync_new_version_starts_a_new_round_and_forgets_the_old_rounds_tasks():
    d = Dispatcher("sync", concurrency=2, deadline_s=60.0)
    a, b = d.to_issue(0, T0)
    d.finished(a.task_id, True, 0)
    late = d.to_issue(0, T0 + 1)
    assert late == []
    # b's update completes the round: the aggregator steps to version 1 (finished is told the version
    # the update was judged at, as the server does).
    d.finished(b.task_id, True, 0)
    round1 = d.to_issue(1, T0 + 2)
    assert len(round1) == 2 and {t.min_version for t in round1} == {1}
    assert set(d.outstanding) == set(ids(round1))
    # An old-round task that was still running (here: one reported for the wrong round) is gone too.
    d2 = Dispatcher("sync", concurrency=2, deadline_s=60.0)
    x, y = d2.to_issue(0, T0)
    d2.finished(x.task_id, True, 0)
    new = d2.to_issue(1, T0 + 1)  # version moved on while y was still out (late update from elsewhere)
    assert len(new) == 2 and y.task_id not in d2.outstanding and x.task_id not in d2.outstanding
    d2.finished(y.task_id, True, 1)  # y's stale update later: unknown now, nothing changes
    assert set(d2.outstanding) == set(ids(new)) and d2.to_issue(1, T0 + 2) == []
    assert d2.expired == 0


def test_sync_duplicate_of_an_accepted_update_does_not_free_its_slot():
    """The server reports a redelivered update (aggregator status "duplicate") as finished(accepted=False);
    the task's accepted update still counts for the round, so no replacement may be issued."""
    d = Dispatcher("sync", concurrency=2, deadline_s=60.0)
    a, b = d.to_issue(0, T0)
    d.finished(a.task_id, True, 0)
    d.finished(a.task_id, False, 0)  # the same update again
    assert d.to_issue(0, T0 + 1) == []
    assert set(d.outstanding) == {a.task_id, b.task_id}


# -- dispatcher + aggregator: synchronous FedAvg rounds ------------------------------------------------------

def test_sync_dispatch_with_the_aggregator_gives_fedavg_rounds():
    """Three rounds of K = 3 workers with hand-chosen client models m_i and sample counts n_i (sums are
    powers of two, so every number is exact): after each round the global model must be
    sum_i n_i m_i / sum_i n_i. Round 1 also has a rejected update, an expired task and a late update from
    round 0's expired task, and round 2 a redelivered (duplicate) update, each handled the way the server
    does."""
    K = 3
    state = {"w": torch.zeros(3)}
    agg = Aggregator(state, AggregatorConfig.synchronous(K, experiment="e"), ServerOptimizerConfig("sgd", lr=1.0))
    d = Dispatcher("sync", concurrency=K, deadline_s=30.0)

    def send(task: PlannedTask, model: list[float], n: int, base: int | None = None) -> str:
        """A worker's update: delta = its trained model - the global model it started from."""
        version = agg.version
        base = task.min_version if base is None else base
        delta = {"w": torch.tensor(model) - history[base]}
        try:
            result = agg.add(ClientUpdate("e", task.task_id, f"w-{task.task_id}", base, n, delta))
        except UpdateRejected as exc:
            d.finished(task.task_id, False, version)
            return exc.reason
        d.finished(task.task_id, result.status == "accepted", version)
        return result.status

    history = {0: state["w"].clone()}
    rounds = [
        # (client models, sample counts)
        ([[1.0, 2.0, 3.0], [5.0, -2.0, 0.0], [0.5, 0.5, 0.5]], [1, 3, 4]),
        ([[2.0, 2.0, 2.0], [-4.0, 0.0, 8.0], [1.0, 0.0, -1.0]], [2, 2, 4]),
        ([[0.0, 0.0, 0.0], [3.0, 3.0, 3.0], [-1.0, 1.0, 0.25]], [8, 4, 4]),
    ]
    now = T0
    expired_round0 = None
    for r, (models, ns) in enumerate(rounds):
        tasks = d.to_issue(agg.version, now)
        assert len(tasks) == K and {t.min_version for t in tasks} == {r}
        order = list(range(K))
        if r == 0:
            # The first worker never answers in time; the others do (their slots stay filled), the first
            # task expires and is replaced; the replacement's worker answers last.
            expired_round0 = tasks[0]
            assert send(tasks[1], models[1], ns[1]) == "accepted"
            assert send(tasks[2], models[2], ns[2]) == "accepted"
            assert d.expire(now + 30.0) == [expired_round0.task_id]
            (tasks[0],) = d.to_issue(agg.version, now + 30.0)
            assert tasks[0].min_version == 0 and tasks[0].deadline_unix == now + 60.0
            order = [0]
        if r == 1:
            # A NaN update is rejected and its task replaced; round 0's expired task answers late and
            # is judged stale (max_staleness 0); neither counts for the round.
            assert send(tasks[0], [math.nan, 0.0, 0.0], 5) == "nan"
            assert send(expired_round0, [9.0, 9.0, 9.0], 100, base=0) == "stale"
            (tasks[0],) = d.to_issue(agg.version, now + 1)
            assert tasks[0].min_version == 1
        for j, i in enumerate(order):
            assert d.to_issue(agg.version, now + 2) == []  # the round waits for its slowest worker
            assert send(tasks[i], models[i], ns[i]) == "accepted"
            if j < len(order) - 1:
                assert agg.version == r
            if r == 2 and j == 0:
                # A redelivery of the update just accepted: counted as a duplicate, its slot stays filled.
                assert send(tasks[i], models[i], ns[i]) == "duplicate"
        assert agg.version == r + 1
        expected = sum(n * torch.tensor(m) for m, n in zip(models, ns)) / sum(ns)
        assert torch.equal(state["w"], expected), (r, state["w"], expected)
        history[r + 1] = state["w"].clone()
        now += 100.0
    assert torch.equal(history[1], torch.tensor([2.25, -0.25, 0.625]))  # (1*m1 + 3*m2 + 4*m3) / 8, by hand
    assert d.expired == 1
    assert agg.counters["applied_updates"] == 9 and agg.counters["duplicates"] == 1
    assert agg.counters["rejected"] == {"nan": 1, "stale": 1}


# -- resume --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["async", "sync"])
def test_state_dict_round_trip_resumes_identically(mode, tmp_path):
    d = Dispatcher(mode, concurrency=3, deadline_s=20.0)
    a, b, _ = d.to_issue(2, T0)
    d.finished(a.task_id, True, 2)
    if mode == "async":
        d.expire(T0 + 25)
    else:
        d.finished(b.task_id, False, 2)
    d.to_issue(2, T0 + 26)
    # Through the checkpoint as the server does (torch.save / weights_only load keeps inf deadlines).
    checkpoint.save(tmp_path / "ckpt.pt", {"experiment": "e", "dispatcher": d.state_dict()})
    state = checkpoint.load(tmp_path / "ckpt.pt", "e")["dispatcher"]
    resumed = Dispatcher(mode, concurrency=3, deadline_s=20.0)
    resumed.load_state_dict(state)
    assert resumed.outstanding == d.outstanding
    assert (resumed.issued, resumed.expired, resumed._round_started) == (d.issued, d.expired, d._round_started)
    if mode == "sync":
        assert resumed.outstanding[a.task_id].deadline_unix == math.inf
    # From here on both behave the same (task ids share the numbered prefix; the random tail differs).
    due = [t for t, o in d.outstanding.items() if o.deadline_unix <= T0 + 100]
    for disp in (d, resumed):
        assert disp.to_issue(2, T0 + 27) == []
        assert disp.expire(T0 + 100) == due
    after = [[(t.task_id[:7], t.min_version, t.deadline_unix) for t in disp.to_issue(3, T0 + 101)]
             for disp in (d, resumed)]
    assert after[0] == after[1] and len(after[0]) == 3
    assert (resumed.issued, resumed.expired) == (d.issued, d.expired)


# -- construction ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, names", [
    ({"mode": "foo"}, "'foo'"),
    ({"concurrency": 0}, "concurrency"),
    ({"concurrency": -2}, "concurrency"),
    ({"concurrency": True}, "concurrency"),
    ({"concurrency": 2.0}, "concurrency"),
    ({"deadline_s": 0}, "deadline_s"),
    ({"deadline_s": -1.0}, "deadline_s"),
    ({"deadline_s": math.nan}, "deadline_s"),
])
def test_bad_constructor_values_are_refused_naming_the_problem(kwargs, names):
    with pytest.raises(ValueError, match=names):
        Dispatcher(**kwargs)


def test_resuming_a_sync_state_in_async_mode_frees_the_done_round_slots():
    """A run resumed with fedbuff.mode changed from sync to async: tasks whose update was accepted held
    their round slot with an infinite deadline; in async mode nothing would ever free them."""
    sync = Dispatcher("sync", concurrency=3, deadline_s=20.0)
    a, b, c = sync.to_issue(5, T0)
    sync.finished(a.task_id, True, 5)
    sync.finished(b.task_id, True, 5)
    resumed = Dispatcher("async", concurrency=3, deadline_s=20.0)
    resumed.load_state_dict(sync.state_dict())
    assert set(resumed.outstanding) == {c.task_id} and resumed._round_started is None
    assert [t.min_version for t in resumed.to_issue(5, T0 + 1)] == [5, 5]
    # Back to sync: the async tasks of the current version count for the round, older ones do not.
    again = Dispatcher("sync", concurrency=3, deadline_s=20.0)
    again.load_state_dict(resumed.state_dict())
    assert again.to_issue(5, T0 + 2) == [] and len(again.to_issue(6, T0 + 3)) == 3


# -- signed task ids (docs/security.md) --------------------------------------------------------------------------

def test_task_ids_are_signed_and_checked():
    d = Dispatcher("async", concurrency=2, deadline_s=60.0, secret=b"k1")
    a, b = d.to_issue(3, 0.0)
    assert d.check(a.task_id, 3, 10) is None and d.check(b.task_id, 3, 10) is None
    other = Dispatcher("async", concurrency=1, deadline_s=60.0, secret=b"k2")
    assert d.check(other.to_issue(3, 0.0)[0].task_id, 3, 10) == "forged"  # another run's (another secret)
    n, v, mac = a.task_id[1:].split("-")
    for forged in (f"t{n}-v{int(v[1:]) + 1}-{mac}", f"t{int(n) + 1:06d}-{v}-{mac}", a.task_id + "0", "good-1", "",
                   a.task_id.upper(), f"t{n}-{v}-{'0' * 16}"):
        assert d.check(forged, 3, 10) == "forged", forged


def test_a_task_is_answered_once_and_old_tasks_are_stale():
    d = Dispatcher("async", concurrency=1, deadline_s=60.0, secret=b"k")
    (t,) = d.to_issue(5, 0.0)
    d.finished(t.task_id, True, 5)
    assert d.check(t.task_id, 5, 10) == "answered"
    (u,) = d.to_issue(5, 0.0)
    assert d.check(u.task_id, 16, 10) == "stale" and d.check(u.task_id, 15, 10) is None
    assert d.check(u.task_id, 10**6, None) is None  # no staleness limit
    d.forget_answered(15, 10)
    assert t.task_id in d.answered  # issued at 5 >= 15 - 10
    d.forget_answered(16, 10)
    assert d.answered == {}


def test_answered_tasks_survive_a_checkpoint():
    d = Dispatcher("async", concurrency=1, deadline_s=60.0, secret=b"k")
    (t,) = d.to_issue(0, 0.0)
    d.finished(t.task_id, True, 0)
    e = Dispatcher("async", concurrency=1, deadline_s=60.0, secret=b"k")
    e.load_state_dict(d.state_dict())
    assert e.check(t.task_id, 0, 10) == "answered"


def test_version_lag_lets_async_tasks_ask_for_an_older_version_never_below_zero():
    d = Dispatcher("async", concurrency=3, version_lag=2)
    assert [t.min_version for t in d.to_issue(1, 0.0)] == [0, 0, 0]
    d.outstanding.clear()
    assert [t.min_version for t in d.to_issue(7, 0.0)] == [5, 5, 5]
    assert all("-v7-" in t for t in d.outstanding)  # the task id keeps the version it was issued at


def test_version_lag_does_not_apply_to_sync_rounds():
    d = Dispatcher("sync", concurrency=2, version_lag=3)
    assert [t.min_version for t in d.to_issue(5, 0.0)] == [5, 5]


@pytest.mark.parametrize("lag", [-1, 1.5, True, "2"])
def test_version_lag_must_be_a_non_negative_int(lag):
    with pytest.raises(ValueError, match="version_lag"):
        Dispatcher("async", version_lag=lag)
