"""Tasks cannot poison a worker: one real trainer process (`python -m worker.cli run`, as a user runs it) on
the real broker, fed tasks by the test playing an attacker or a misconfigured coordinator (guest publishes
straight onto the experiment's tasks queue).

Every task published ends exactly once in one of three places, and the same trainer process lives through
all of them: dead-lettered (a task it cannot run: `mqfed.<exp>.dead-letters`, with RabbitMQ's x-death),
answered (an `Update` on the updates queue) or acknowledged as expired (its deadline passed mid-training:
no update, a `task_expired` log line). worker/daemon.py `Trainer._on_task`.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from common.learning.config import TrainConfig
from common.learning.model import ModelSpec, build_model
from common.transport.model_store import ModelStore
from common.transport.publish import publish_message
from common.wire import messages
from common.wire.tensors import encode_state
from coordinator.local_federation import ROOT, child_env

pytestmark = pytest.mark.integration

NODE = "poison"
WORKER_ID = f"{NODE}/cpu"
CODEC = "topk:0.1+int8"  # a kws-tiny update of a few tens of kB: inline, one message on the updates queue


class Worker:
    """One trainer process and its JSON log."""

    def __init__(self, topo, data, tmp_path) -> None:
        self.log_path = tmp_path / "worker.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "run", "--experiment", topo.experiment, "--data", str(data),
                 "--shard", "all", "--node", NODE], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env=child_env(MQFED_WORKER_CACHE_DIR=str(tmp_path / "cache")), start_new_session=True)

    def events(self, event: str) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("event") == event:
                out.append(entry)
        return out

    def check_alive(self, what: str) -> None:
        if self.proc.poll() is not None:
            tail = "\n".join(self.log_path.read_text().splitlines()[-30:])
            raise AssertionError(f"the trainer died (exit {self.proc.returncode}) waiting for {what}:\n{tail}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


class Queues:
    """What arrives on the dead-letter and updates queues (consumed: the updates queue is single-active-consumer,
    which refuses basic.get), collected as the test goes."""

    def __init__(self, connection, topo) -> None:
        self.connection = connection
        self.dead: list[tuple[dict, messages.Message]] = []  # (headers, task)
        self.updates: list[messages.Update] = []
        ch = connection.channel()
        ch.basic_consume(topo.dead_letters, lambda _c, _m, props, body: self.dead.append(
            (props.headers or {}, messages.decode(body))), auto_ack=True)
        ch.basic_consume(topo.updates, lambda _c, _m, _p, body: self.updates.append(messages.decode(body)),
                         auto_ack=True)

    def drain(self, seconds: float = 0.2) -> None:
        self.connection.process_data_events(time_limit=seconds)

    def wait(self, worker: Worker, what: str, condition, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain()
            if condition():
                return
            worker.check_alive(what)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (log: {worker.log_path})")

    def dead_ids(self) -> list[str]:
        return [task.task_id for _, task in self.dead]

    def update_ids(self) -> list[str]:
        return [u.task_id for u in self.updates]


def _task(topo, name: str, model: str = "kws-tiny", deadline_s: float = 120.0, **local) -> messages.TrainTask:
    config = TrainConfig(**{"steps": 2, "batch_size": 4, **local})
    return messages.TrainTask(topo.experiment, "run-poison", f"{name}-{uuid.uuid4().hex[:8]}", 0,
                              time.time() + deadline_s, CODEC, model, False, config)


def test_tasks_a_trainer_cannot_run_are_dead_lettered_and_expired_ones_acked_while_it_lives_on(
        connection, topo, tiny_corpus_dir, tmp_path):
    store = ModelStore(connection.channel(), topo, cache_dir=tmp_path / "store")
    store.publish(0, encode_state(build_model(ModelSpec("kws-tiny"), weights=False).state_dict()))
    worker = Worker(topo, tiny_corpus_dir, tmp_path)
    queues = Queues(connection, topo)
    pub = connection.channel()
    pub.confirm_delivery()
    published: dict[str, str] = {}  # task id -> the outcome it must have

    def send(task: messages.TrainTask, outcome: str) -> messages.TrainTask:
        publish_message(pub, topo.task_exchange, topo.TASKS_KEY, task)
        published[task.task_id] = outcome
        return task

    try:
        # (a) a model that is not there: a hub name that cannot be loaded offline, an unknown preset
        for name, model in (("hub", "facebook/does-not-exist"), ("preset", "kws-huge")):
            bad = send(_task(topo, f"unknown-{name}", model=model), "dead")
            queues.wait(worker, f"{bad.task_id} dead-lettered", lambda t=bad: t.task_id in queues.dead_ids())
        good = send(_task(topo, "good-1"), "update")
        queues.wait(worker, f"the update of {good.task_id}", lambda: good.task_id in queues.update_ids())
        # a model that exists but is not the one the version was trained as: a shape mismatch on loading
        # (wav2vec2-base against the kws-tiny version), which crashed trainers before
        bad = send(_task(topo, "other-model", model="wav2vec2-base"), "dead")
        queues.wait(worker, f"{bad.task_id} dead-lettered", lambda: bad.task_id in queues.dead_ids())
        # (b) options valid for TrainConfig that make training raise: AdamW cannot take a learning rate of
        # 1e300 (a RuntimeError from torch, not an MqfedError)
        bad = send(_task(topo, "bad-options", learning_rate=1e300), "dead")
        queues.wait(worker, f"{bad.task_id} dead-lettered", lambda: bad.task_id in queues.dead_ids())
        # (c) a deadline that falls mid-training: 5 s out (the idle trainer takes it within 0.5 s), 100 000 steps
        late = send(_task(topo, "expires", deadline_s=5.0, steps=100_000), "expired")
        queues.wait(worker, f"{late.task_id} expired",
                    lambda: any(e["task_id"] == late.task_id for e in worker.events("task_expired")))
        good = send(_task(topo, "good-2"), "update")
        queues.wait(worker, f"the update of {good.task_id}", lambda: good.task_id in queues.update_ids())
        worker.check_alive("the end")
    finally:
        code = worker.stop()
    assert code == 0

    # The accounting: every task published ended exactly once, where it should.
    queues.drain(1.0)
    expired = [e["task_id"] for e in worker.events("task_expired")]
    ended = {"dead": queues.dead_ids(), "update": queues.update_ids(), "expired": expired}
    for outcome, ids in ended.items():
        assert sorted(ids) == sorted(t for t, o in published.items() if o == outcome), outcome
    assert sorted(sum(ended.values(), [])) == sorted(published)  # each once, nothing else
    assert pub.queue_declare(topo.tasks, passive=True).method.message_count == 0  # acked or dead-lettered
    assert not worker.events("task_expired_on_arrival") and not worker.events("task_returned")

    # Dead-lettered once each, by a reject from the tasks queue, never redelivered first.
    for headers, task in queues.dead:
        (death,) = headers["x-death"]
        assert (death["queue"], death["reason"], death["count"]) == (topo.tasks, "rejected", 1), task.task_id
        assert "x-delivery-count" not in headers or headers["x-delivery-count"] == 0, headers
    # Why is in the trainer's log: the error and its type, with a traceback for what is not an MqfedError.
    failed = {e["task_id"]: e for e in worker.events("task_failed")}
    assert sorted(failed) == sorted(queues.dead_ids())
    by_name = {task.task_id.rsplit("-", 1)[0]: failed[task.task_id] for _, task in queues.dead}
    assert by_name["unknown-hub"]["error_type"] == by_name["unknown-preset"]["error_type"] == "ModelLoadError"
    assert "facebook/does-not-exist" in by_name["unknown-hub"]["error"]
    assert by_name["other-model"]["error_type"] == "ModelLoadError" and "does not fit" in by_name["other-model"]["error"]
    assert by_name["bad-options"]["error_type"] == "RuntimeError"  # from torch, not an MqfedError
    assert "Traceback" in by_name["bad-options"].get("exception", "")
    assert "exception" not in by_name["unknown-hub"]

    # The deadline stopped training part-way, and nothing was answered for it.
    (stop,) = worker.events("task_expired")
    assert stop["stage"] == "training" and 0 < stop["step"] < stop["total"] == 100_000, stop
    # One trainer throughout: it never died, restarted or reconnected, and answered after every failure.
    assert len(worker.events("trainer_ready")) == 1 and not worker.events("worker_connection_lost")
    assert {u.worker_id for u in queues.updates} == {WORKER_ID}
