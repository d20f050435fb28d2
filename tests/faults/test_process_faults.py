"""Processes that die, stall or fall behind, for real: SIGKILL (from outside, or from a failpoint at an
exact place: common/failpoints.py), SIGSTOP/SIGCONT, a second coordinator replica, tasks nobody takes.

Every test checks the invariants of the fault suite: the experiment completes; each accepted update is
applied exactly once (no (task, worker) pair twice in the run record); no task is lost (the task a killed
worker held is applied later, by whoever got it next); versions only go up (the record holds 1..N once
each); the checkpoint stays consistent (it loads, at the final version, and no temporary file is left).
"""
from __future__ import annotations

import signal
import time

import pytest

from common.transport.connection import connect
from coordinator import checkpoint
from coordinator.local_federation import LocalFederation

pytestmark = pytest.mark.faults

FAST = {"fedbuff.concurrency": 2, "fedbuff.buffer_size": 2, "fedbuff.max_staleness": 50, "local.steps": 5,
        "local.batch_size": 16, "tasks.eval_every": 0, "tasks.deadline_s": 120.0, "data.eval_max_clips": 24,
        "stop.max_versions": 8}


_FEDERATIONS: list[LocalFederation] = []


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """Stop every process a test's federation started, also when the test failed half-way."""
    yield
    while _FEDERATIONS:
        _FEDERATIONS.pop().stop()


def _federation(experiment, tmp_path, corpus, workers: list[dict], **settings) -> LocalFederation:
    from common.config import load_config
    from coordinator.experiment import ExperimentConfig

    cfg = load_config(ExperimentConfig, env={}, overrides={
        "experiment.name": experiment.experiment, "experiment.run_dir": str(tmp_path / "run"),
        "data.path": str(corpus), **FAST, **settings})
    _FEDERATIONS.append(LocalFederation(cfg, corpus, workers, least_privilege=True))
    return _FEDERATIONS[-1]


def _applied(fed: LocalFederation) -> list[tuple[str, str]]:
    return [(t, w) for e in fed.versions() for t, w in zip(e["tasks"], e["workers"])]


def _assert_consistent(fed: LocalFederation, versions: int) -> dict:
    summary = fed.summary()
    assert summary is not None, f"no summary (logs in {fed.run_dir})"
    assert summary["reason"] == "max_versions" and summary["versions"] == versions, summary
    assert [e["version"] for e in fed.versions()] == list(range(1, versions + 1)), "versions must go 1..N once each"
    applied = _applied(fed)
    assert len(applied) == len(set(applied)), "an update was applied twice"
    state = checkpoint.load(fed.run_dir / "checkpoint.pt", fed.name)
    assert state["aggregator"]["version"] == versions
    assert not list(fed.run_dir.glob(".checkpoint.pt.*.tmp")), "a temporary checkpoint file was left behind"
    _account(fed)
    return summary


def _run_to_end(fed: LocalFederation, timeout: float = 240) -> None:
    try:
        fed.wait_coordinator(timeout)
    finally:
        fed.stop()


def _held_task(fed: LocalFederation, node: str) -> str:
    """The task a killed worker was working on: the last one it started."""
    started = fed.events(f"worker-{node}.log", "task_started")
    assert started, f"{node} never started a task"
    return started[-1]["task_id"]


def test_worker_killed_mid_training_loses_no_task(experiment, small_corpus_dir, tmp_path):
    fed = _federation(experiment, tmp_path, small_corpus_dir, [
        {"shard": "iid:1/2", "env": {"MQFED_FAILPOINTS": "worker.during_training=kill@13"}},  # 3rd task, step 3
        {"shard": "iid:2/2"}]).start()
    fed.wait_for(lambda: fed.workers["w1"].poll() is not None, 180, "w1 to die at its failpoint")
    assert fed.workers["w1"].returncode == -signal.SIGKILL
    held = _held_task(fed, "w1")
    _run_to_end(fed)
    _assert_consistent(fed, 8)
    assert held in {t for t, _ in _applied(fed)}, "the task the killed worker held was lost"


def test_worker_killed_mid_upload_loses_no_task_and_the_partial_upload_is_dropped(experiment, small_corpus_dir,
                                                                                  tmp_path):
    chunked = {"MQFED_WORKER_INLINE_MAX_BYTES": "1024", "MQFED_WORKER_CHUNK_BYTES": "65536"}
    fed = _federation(experiment, tmp_path, small_corpus_dir, [
        {"shard": "iid:1/2", "env": {**chunked, "MQFED_FAILPOINTS": "worker.after_first_chunk=kill@1"}},  # 1st upload
        {"shard": "iid:2/2", "env": chunked}], **{"tasks.codec": "none", "tasks.transfer_timeout_s": 2.0,
                                                  "stop.max_versions": 16}).start()
    fed.wait_for(lambda: fed.workers["w1"].poll() is not None, 180, "w1 to die mid-upload")
    held = _held_task(fed, "w1")
    _run_to_end(fed)
    _assert_consistent(fed, 16)  # 16 versions: the run outlasts the 2 s transfer timeout
    assert held in {t for t, _ in _applied(fed)}, "the task the killed worker held was lost"
    dropped = fed.events("coordinator.log", "transfer_dropped")
    assert any(e["error"] == "IncompleteTransfer" for e in dropped), "the incomplete upload was not dropped"


def test_worker_killed_between_publishing_its_update_and_acking_its_task(experiment, small_corpus_dir, tmp_path):
    fed = _federation(experiment, tmp_path, small_corpus_dir, [
        {"shard": "iid:1/2", "env": {"MQFED_FAILPOINTS": "worker.before_task_ack=kill@2"}},
        {"shard": "iid:2/2"}]).start()
    fed.wait_for(lambda: fed.workers["w1"].poll() is not None, 180, "w1 to die before its ack")
    held = _held_task(fed, "w1")
    _run_to_end(fed)
    _assert_consistent(fed, 8)
    applied = _applied(fed)
    # Its update was confirmed before it died: applied once. The broker gave the unacknowledged task to w2,
    # whose update answers a task answered already: acknowledged and dropped (a task is answered once).
    assert applied.count((held, "w1/cpu")) == 1 and [t for t, _ in applied].count(held) == 1
    redone = [e for e in fed.events("coordinator.log", "update_rejected") if e["task_id"] == held]
    assert [(e["worker_id"], e["reason"]) for e in redone] in ([], [("w2/cpu", "answered")])


def test_coordinator_killed_mid_aggregation_resumes_and_applies_nothing_twice(experiment, small_corpus_dir, tmp_path):
    fed = _federation(experiment, tmp_path, small_corpus_dir, [{"shard": "iid:1/2"}, {"shard": "iid:2/2"}],
                      **{"fedbuff.buffer_size": 3})
    fed.start_coordinator(env={"MQFED_FAILPOINTS": "coordinator.after_buffer=kill@8"})  # 2 into version 3's buffer
    for spec in fed.worker_specs:
        fed.start_worker(spec["node"])
    fed.wait_for(lambda: fed.coordinator.poll() is not None, 180, "the coordinator to die at its failpoint")
    assert fed.coordinator.returncode == -signal.SIGKILL
    fed.start_coordinator()
    _run_to_end(fed)
    _assert_consistent(fed, 8)
    assert fed.events("coordinator.log", "coordinator_resumed")[0]["version"] == 2


def test_coordinator_killed_mid_checkpoint_write_resumes_from_the_previous_checkpoint(experiment, small_corpus_dir,
                                                                                       tmp_path):
    fed = _federation(experiment, tmp_path, small_corpus_dir, [{"shard": "iid:1/2"}, {"shard": "iid:2/2"}],
                      **{"checkpoint.every_versions": 1})
    fed.start_coordinator(env={"MQFED_FAILPOINTS": "coordinator.before_checkpoint_rename=kill@3"})
    for spec in fed.worker_specs:
        fed.start_worker(spec["node"])
    fed.wait_for(lambda: fed.coordinator.poll() is not None, 180, "the coordinator to die mid-checkpoint")
    assert list(fed.run_dir.glob(".checkpoint.pt.*.tmp")), "the failpoint should leave the half-done write"
    assert checkpoint.load(fed.run_dir / "checkpoint.pt", fed.name)["aggregator"]["version"] == 2
    fed.start_coordinator()
    _run_to_end(fed)
    _assert_consistent(fed, 8)
    resumed = fed.events("coordinator.log", "coordinator_resumed")[0]
    assert resumed["checkpoint_version"] == 2 and resumed["replayed"] >= 2, resumed  # version 3 from the log


def _standby_takes_over(fed: LocalFederation, wait_s: float):
    """Pause the workers (so that the run cannot end first), start a replica coordinator on the same run
    directory, wait until it stands by, SIGKILL the active one, resume the workers; returns the replica."""
    active, workers = fed.coordinator, list(fed.workers.values())
    for w in workers:
        w.send_signal(signal.SIGSTOP)
    try:
        standby = fed.start_coordinator(log_name="coordinator-standby.log")
        fed.wait_for(lambda: fed.events("coordinator-standby.log", "coordinator_standby"), wait_s,
                     "the replica to stand by")
        assert standby.poll() is None
        LocalFederation.signal([active], signal.SIGKILL)
    finally:
        for w in workers:
            w.send_signal(signal.SIGCONT)
    return standby


def test_a_standby_coordinator_takes_over_when_the_active_one_dies(experiment, small_corpus_dir, tmp_path):
    fed = _federation(experiment, tmp_path, small_corpus_dir, [{"shard": "iid:1/2"}, {"shard": "iid:2/2"}],
                      **{"stop.max_versions": 10}).start()
    fed.wait_for(lambda: len(fed.versions()) >= 3, 180, "3 versions")
    standby = _standby_takes_over(fed, wait_s=120)
    _run_to_end(fed)
    assert standby.returncode == 0
    _assert_consistent(fed, 10)
    assert fed.events("coordinator-standby.log", "coordinator_resumed")[0]["version"] >= 3


def test_a_worker_away_for_many_versions_has_its_stale_update_dropped_and_catches_up(experiment, small_corpus_dir,
                                                                                    tmp_path):
    fed = _federation(experiment, tmp_path, small_corpus_dir, [
        {"shard": "iid:1/2", "env": {"MQFED_WORKER_DELAY_S": "3"}}, {"shard": "iid:2/2"}],
        **{"fedbuff.max_staleness": 2, "fedbuff.buffer_size": 1, "stop.max_versions": 24}).start()
    w1 = fed.workers["w1"]
    fed.wait_for(lambda: fed.events("worker-w1.log", "task_started"), 120, "w1 to start a task")
    w1.send_signal(signal.SIGSTOP)  # away: holds its task, says nothing
    try:
        fed.wait_for(lambda: len(fed.versions()) >= 6, 180, "6 versions without w1")
    finally:
        w1.send_signal(signal.SIGCONT)
    _run_to_end(fed)
    summary = _assert_consistent(fed, 24)
    assert summary["counters"]["stale_dropped"] >= 1, summary["counters"]
    published = fed.events("worker-w1.log", "update_published")
    stale, later = published[0], published[-1]
    assert later["base_version"] > stale["base_version"] + 2, "w1 did not catch up after coming back"


def test_tasks_nobody_takes_expire_and_are_reissued_then_the_run_completes(experiment, small_corpus_dir, tmp_path):
    fed = _federation(experiment, tmp_path, small_corpus_dir, [{"shard": "iid:1/2"}, {"shard": "iid:2/2"}],
                      **{"tasks.deadline_s": 3.0})
    fed.start_coordinator()
    conn = connect("test", device="faults", attempts=3)
    depths = []
    try:
        fed.wait_for(lambda: fed.events("coordinator.log", "tasks_expired"), 60, "tasks to expire")
        for _ in range(12):  # no worker yet: expired tasks are replaced, never piled up
            ch = conn.channel()
            depths.append(ch.queue_declare(experiment.tasks, passive=True).method.message_count)
            ch.close()
            time.sleep(0.5)
        ch = conn.channel()
        method, props, _ = ch.basic_get(experiment.dead_letters, auto_ack=True)
        assert method is not None, "expired tasks should be in the dead-letter queue"
        reason = props.headers["x-death"][0]["reason"]
        assert (reason.decode() if isinstance(reason, bytes) else reason) == "expired"
    finally:
        conn.close()
    # `concurrency` live tasks, plus replacements issued just before the broker drops the expired ones.
    assert max(depths) <= 4, depths
    for spec in fed.worker_specs:
        fed.start_worker(spec["node"])
    _run_to_end(fed)
    _assert_consistent(fed, 8)
    assert fed.summary()["counters"]["tasks_expired"] >= 2


def test_a_slow_consumer_holding_tasks_past_their_deadline_does_not_stall_the_run(experiment, small_corpus_dir,
                                                                                tmp_path):
    fed = _federation(experiment, tmp_path, small_corpus_dir, [
        {"shard": "iid:1/2", "env": {"MQFED_WORKER_DELAY_S": "12"}},
        {"shard": "iid:2/2", "env": {"MQFED_WORKER_DELAY_S": "1.5"}}],  # 10 versions take longer than 6 s
        **{"tasks.deadline_s": 6.0, "fedbuff.buffer_size": 1, "stop.max_versions": 10}).start()
    _run_to_end(fed)
    summary = _assert_consistent(fed, 10)
    assert summary["counters"]["tasks_expired"] >= 1
    workers = {w for e in fed.versions() for w in e["workers"]}
    assert "w2/cpu" in workers


# -- the write-ahead log: nothing the coordinator accepted is lost when it dies ----------------------------

_CHUNKED = {"MQFED_WORKER_INLINE_MAX_BYTES": "1024", "MQFED_WORKER_CHUNK_BYTES": "65536"}


def _leftover(fed: LocalFederation, queue: str) -> list:
    """Drain `queue` of the experiment: the decoded wire messages in it (chunks skipped)."""
    from common.wire import messages

    conn = connect("test", device="accounting", url=fed.env.get("AMQP_URL"), attempts=3)
    out = []
    try:
        ch = conn.channel()
        for method, props, body in ch.consume(queue, inactivity_timeout=2.0):  # the updates queue has a single
            if method is None:                                                   # active consumer: no basic.get
                return out
            ch.basic_ack(method.delivery_tag)
            if not (props.headers or {}).get("mqfed-transfer"):
                out.append(messages.decode(body))
        return out
    finally:
        conn.close()


def _account(fed: LocalFederation) -> None:
    """Every update a worker published under confirms ends applied exactly once, buffered in the final
    checkpoint, dropped as stale (valid, but too late: acknowledged and counted) or as answered (its task
    had an accepted update already: another trainer redid a task whose first worker died before its ack),
    or still in the updates queue; none is dead-lettered."""
    from common.wire import messages

    published = [(e["task_id"], e["worker"]) for spec in fed.worker_specs
                 for e in fed.events(f"worker-{spec['node']}.log", "update_published")]
    applied = _applied(fed)
    state = checkpoint.load(fed.run_dir / "checkpoint.pt", fed.name)
    buffered = [(t, w) for _e, t, w, *_ in state["aggregator"]["contributions"]]
    waiting = [(m.task_id, m.worker_id) for m in _leftover(fed, f"mqfed.{fed.name}.updates")
               if isinstance(m, messages.Update)]
    dead = _leftover(fed, f"mqfed.{fed.name}.dead-letters")
    assert [m for m in dead if isinstance(m, messages.Update)] == [], "an update was dead-lettered"
    assert len(applied) == len(set(applied)), "an update was applied twice"
    dropped = [(e["task_id"], e["worker_id"]) for e in fed.events("coordinator.log", "update_rejected")
               if e["reason"] in ("stale", "answered")]
    ends = applied + buffered + waiting + dropped
    lost = sorted(set(published) - set(ends))
    assert lost == [], f"confirmed updates neither applied, buffered nor waiting: {lost}"
    assert sorted(set(ends) - set(published)) == [], "an update was applied that no worker confirmed"
    assert fed.summary()["counters"]["dead_lettered"] == 0, fed.summary()


def _killed_before_any_checkpoint_then_resumed(fed: LocalFederation, failpoint: str, timeout: float = 180) -> None:
    """Start the coordinator with `failpoint` and the workers; once it died there (no checkpoint yet, so only
    the write-ahead log holds what it accepted), start it again and run to the end."""
    fed.start_coordinator(env={"MQFED_FAILPOINTS": failpoint})
    for spec in fed.worker_specs:
        fed.start_worker(spec["node"])
    fed.wait_for(lambda: fed.coordinator.poll() is not None, timeout, "the coordinator to die at its failpoint")
    assert fed.coordinator.returncode == -signal.SIGKILL
    assert not (fed.run_dir / "checkpoint.pt").exists(), "no checkpoint yet: only the log holds the updates"
    fed.start_coordinator()
    _run_to_end(fed, timeout)


@pytest.mark.parametrize("failpoint", ["coordinator.after_buffer=kill@5", "coordinator.mid_wal_append=kill@5"],
                         ids=["after-the-log", "mid-log-append"])
def test_a_coordinator_killed_between_checkpoints_loses_no_chunked_update(experiment, small_corpus_dir, tmp_path,
                                                                          failpoint):
    fed = _federation(experiment, tmp_path, small_corpus_dir, [{"shard": "iid:1/2", "env": _CHUNKED},
                                                               {"shard": "iid:2/2", "env": _CHUNKED}],
                      **{"tasks.codec": "none", "checkpoint.every_versions": 100, "fedbuff.buffer_size": 2})
    _killed_before_any_checkpoint_then_resumed(fed, failpoint)
    _assert_consistent(fed, 8)  # with the accounting of every confirmed update
    resumed = fed.events("coordinator.log", "coordinator_resumed")[0]
    assert resumed["replayed"] == (5 if "after_buffer" in failpoint else 4), resumed  # a torn append is not replayed
