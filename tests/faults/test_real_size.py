"""The size users run: the wav2vec2-base preset (94.6 M parameters, random init) in a real federation (a
coordinator and 2 worker processes over the real broker), where every model version is a 378 MB transfer
and updates sit at or above the inline limit. Tiny local work (one step of batch 2) keeps it to minutes on
2 cores. The coordinator is SIGKILLed after buffering and mid log append (no checkpoint yet: only the
write-ahead log holds what it accepted), mid-checkpoint (a 0.4 GB write torn) and while a standby waits;
a worker is SIGKILLed mid-upload; the broker is restarted. The accounting then proves every confirmed
update applied exactly once, still buffered or still waiting, none dead-lettered, and the run completes.
1.3-1.8 minutes each (`make test-faults` runs them; docs/faults.md)."""
from __future__ import annotations

import signal

import pytest

from coordinator import checkpoint
from coordinator.local_federation import LocalFederation
from faults.test_process_faults import (
    _FEDERATIONS,
    _assert_consistent,
    _federation,
    _held_task,
    _killed_before_any_checkpoint_then_resumed,
    _run_to_end,
    _standby_takes_over,
)

pytestmark = [pytest.mark.faults, pytest.mark.realsize]

REAL_SIZE = {"model.name": "wav2vec2-base", "local.steps": 1, "local.batch_size": 2, "local.warmup_steps": 0,
             "fedbuff.concurrency": 2, "fedbuff.buffer_size": 2, "fedbuff.max_staleness": 50,
             "tasks.eval_every": 0, "data.eval_max_clips": 12, "tasks.deadline_s": 600.0,
             "tasks.transfer_timeout_s": 300.0, "checkpoint.every_versions": 100, "stop.max_versions": 4}


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    yield
    while _FEDERATIONS:
        _FEDERATIONS.pop().stop()


@pytest.mark.parametrize("worker_env", [{}, {"MQFED_WORKER_INLINE_MAX_BYTES": "1024",
                                             "MQFED_WORKER_CHUNK_BYTES": "262144"}],
                         ids=["default-codec", "every-update-chunked"])
def test_wav2vec2_base_federation_survives_a_coordinator_killed_after_buffering(experiment, tiny_corpus_dir, tmp_path,
                                                                               worker_env):
    fed = _federation(experiment, tmp_path, tiny_corpus_dir, [{"shard": "iid:1/2", "env": worker_env},
                                                              {"shard": "iid:2/2", "env": worker_env}], **REAL_SIZE)
    # killed 1 update into version 2's buffer
    _killed_before_any_checkpoint_then_resumed(fed, "coordinator.after_buffer=kill@3", timeout=900)
    _assert_consistent(fed, 4)  # with the accounting of every confirmed update
    assert fed.events("coordinator.log", "coordinator_resumed")[0]["replayed"] == 3
    published = [e for spec in fed.worker_specs for e in fed.events(f"worker-{spec['node']}.log", "update_published")]
    if worker_env:
        assert all(e["wire_bytes"] > 1024 for e in published), "every update must travel in chunks"
    else:
        assert all(e["wire_bytes"] > 100_000 for e in published), published  # real-size deltas, not kws-tiny's


_CHUNKED = {"MQFED_WORKER_INLINE_MAX_BYTES": "1024", "MQFED_WORKER_CHUNK_BYTES": "262144"}


def test_wav2vec2_base_federation_survives_a_coordinator_killed_mid_log_append(experiment, tiny_corpus_dir, tmp_path):
    fed = _federation(experiment, tmp_path, tiny_corpus_dir, [{"shard": "iid:1/2", "env": _CHUNKED},
                                                              {"shard": "iid:2/2", "env": _CHUNKED}], **REAL_SIZE)
    # the 3rd update's payload is in the log, its commit mark is not: a torn append
    _killed_before_any_checkpoint_then_resumed(fed, "coordinator.mid_wal_append=kill@3", timeout=900)
    _assert_consistent(fed, 4)  # with the accounting of every confirmed update
    assert fed.events("coordinator.log", "coordinator_resumed")[0]["replayed"] == 2


def test_wav2vec2_base_federation_survives_a_coordinator_killed_mid_checkpoint(experiment, tiny_corpus_dir, tmp_path):
    fed = _federation(experiment, tmp_path, tiny_corpus_dir, [{"shard": "iid:1/2"}, {"shard": "iid:2/2"}],
                      **{**REAL_SIZE, "checkpoint.every_versions": 1})
    fed.start_coordinator(env={"MQFED_FAILPOINTS": "coordinator.before_checkpoint_rename=kill@2"})
    for spec in fed.worker_specs:
        fed.start_worker(spec["node"])
    fed.wait_for(lambda: fed.coordinator.poll() is not None, 900, "the coordinator to die mid-checkpoint")
    assert fed.coordinator.returncode == -signal.SIGKILL
    assert checkpoint.load(fed.run_dir / "checkpoint.pt", fed.name)["aggregator"]["version"] == 1
    fed.start_coordinator()
    _run_to_end(fed, timeout=900)
    _assert_consistent(fed, 4)  # the checkpoint of version 2 was torn: version 1's and the log serve
    resumed = fed.events("coordinator.log", "coordinator_resumed")[0]
    assert resumed["checkpoint_version"] == 1 and resumed["replayed"] >= 2, resumed


def test_wav2vec2_base_a_standby_coordinator_takes_over_when_the_active_one_dies(experiment, tiny_corpus_dir,
                                                                                  tmp_path):
    fed = _federation(experiment, tmp_path, tiny_corpus_dir, [{"shard": "iid:1/2"}, {"shard": "iid:2/2"}],
                      **REAL_SIZE).start()
    fed.wait_for(lambda: len(fed.versions()) >= 1, 900, "a version")
    standby = _standby_takes_over(fed, wait_s=600)
    _run_to_end(fed, timeout=900)
    assert standby.returncode == 0
    _assert_consistent(fed, 4)  # with the accounting of every confirmed update
    assert fed.events("coordinator-standby.log", "coordinator_resumed")[0]["version"] >= 1


def test_wav2vec2_base_worker_killed_mid_upload_loses_no_task(experiment, tiny_corpus_dir, tmp_path):
    fed = _federation(experiment, tmp_path, tiny_corpus_dir, [
        {"shard": "iid:1/2", "env": {**_CHUNKED, "MQFED_FAILPOINTS": "worker.after_first_chunk=kill@1"}},  # 1st upload
        {"shard": "iid:2/2", "env": _CHUNKED}], **{**REAL_SIZE, "tasks.transfer_timeout_s": 20.0}).start()
    fed.wait_for(lambda: fed.workers["w1"].poll() is not None, 900, "w1 to die mid-upload")
    held = _held_task(fed, "w1")
    _run_to_end(fed, timeout=900)
    _assert_consistent(fed, 4)  # with the accounting: the partial upload was never confirmed, nothing lost
    assert held in {t for e in fed.versions() for t in e["tasks"]}, "the task the killed worker held was lost"
    assert any(e["error"] == "IncompleteTransfer" for e in fed.events("coordinator.log", "transfer_dropped"))


def test_wav2vec2_base_federation_survives_a_broker_restart(private_broker, tiny_corpus_dir, tmp_path):
    """RabbitMQ (a private node) restarted after the first version: 378 MB versions in a stream that must
    survive it, every process reconnecting, the coordinator resuming from its log."""
    from common.config import load_config
    from coordinator.experiment import ExperimentConfig

    cfg = load_config(ExperimentConfig, env={}, overrides={
        "experiment.name": "realsize-restart", "experiment.run_dir": str(tmp_path / "run"),
        "data.path": str(tiny_corpus_dir), **REAL_SIZE})
    fed = LocalFederation(cfg, tiny_corpus_dir, [{"shard": "iid:1/2"}, {"shard": "iid:2/2"}], least_privilege=True,
                          env={"AMQP_URL": private_broker.url, "MQFED_MANAGEMENT_URL": private_broker.management_url})
    _FEDERATIONS.append(fed)
    fed.start()
    fed.wait_for(lambda: len(fed.versions()) >= 1, 900, "a version")
    private_broker.restart()
    _run_to_end(fed, timeout=900)
    _assert_consistent(fed, 4)  # with the accounting of every confirmed update
    assert fed.events("coordinator.log", "coordinator_connection_lost"), "the coordinator never noticed"
