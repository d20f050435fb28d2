"""How a trainer settles a task it cannot run, one that expires while it runs, and one cut short (worker/daemon.py
`Trainer._on_task`), without a broker: a real `Trainer` (its loop bypassed) with the kws-tiny model, a few
random clips, model versions handed in by `_fetch` and a channel that records what is published."""
from __future__ import annotations

import threading
import time
import types

import pika.exceptions
import pytest
import torch
from structlog.testing import capture_logs

from broker.topology import Topology
from common.learning.config import TrainConfig
from common.learning.model import ModelLoadError, ModelSpec, build_model
from common.learning.training import Clips
from common.metrics import WorkerMetrics
from common.transport.consumer import Outcome
from common.wire import messages
from worker import daemon
from worker.config import WorkerSection
from worker.daemon import TaskAborted, TaskExpired, Trainer

CODEC = "topk:0.1+int8"


class Recorder:
    """A confirming channel that keeps what is published, decoded."""

    def __init__(self) -> None:
        self.published: list[messages.Message] = []

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False):
        if not (properties and properties.headers):  # chunks (none at this size) are not messages
            self.published.append(messages.decode(body))

    def updates(self) -> list[messages.Update]:
        return [m for m in self.published if isinstance(m, messages.Update)]


@pytest.fixture(scope="module")
def version0():
    return {n: t.detach().clone() for n, t in build_model(ModelSpec("kws-tiny"), weights=False).state_dict().items()}


def _worker(**settings) -> WorkerSection:
    return WorkerSection(node="unit", experiment="exp", inline_max_bytes=4 * 1024 * 1024, **settings)


def _make_trainer(ef_path, version0) -> Trainer:
    t = Trainer.__new__(Trainer)
    t.w = _worker()
    t.worker_id, t.device, t.topo = "unit/cpu", "cpu", Topology("exp")
    t.ef, t.ef_path, t.opt_state = None, ef_path, None
    t.stop_event = threading.Event()
    t.model, t.model_key, t.base, t.base_run, t.fetched_bytes = None, None, None, None, 0
    t.status, t.tasks_done = "idle", 0
    t.metrics = WorkerMetrics("unit", "cpu")
    gen = torch.Generator().manual_seed(0)
    t.train_clips = Clips(torch.randn(16, 16000, generator=gen), torch.randint(0, 12, (16,), generator=gen))
    t.val_clips = Clips(torch.randn(8, 16000, generator=gen), torch.randint(0, 12, (8,), generator=gen))
    t.pub = Recorder()
    t.versions = {0: version0}
    t._fetch = lambda min_version: (0, t.versions[0])

    def wait_for(fn, *args):  # no connection to serve: run it here
        t.abort = threading.Event()
        return fn(*args)

    t._wait_for = wait_for
    return t


@pytest.fixture
def trainer(tmp_path, version0, torch_single_thread):
    return _make_trainer(tmp_path / "residual.bin", version0)


def _train(task_id: str, model: str = "kws-tiny", deadline_s: float = 600.0, run: str = "run-1",
           **local) -> messages.TrainTask:
    return messages.TrainTask("exp", run, task_id, 0, time.time() + deadline_s, CODEC, model, False,
                              TrainConfig(**{"steps": 2, "batch_size": 4, **local}))


def _on(trainer, task) -> Outcome:
    return Trainer._on_task(trainer, types.SimpleNamespace(message=task))


def _events(logs, event):
    return [e for e in logs if e["event"] == event]


# -- what raises where: the outcome ---------------------------------------------------------------------------

@pytest.mark.parametrize("error, outcome, traceback", [
    (ModelLoadError("model 'x' is neither a preset nor loadable"), Outcome.DEAD_LETTER, False),
    (ValueError("Overflow when unpacking long long"), Outcome.DEAD_LETTER, True),
    (RuntimeError("size mismatch"), Outcome.DEAD_LETTER, True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), Outcome.DEAD_LETTER, True),
    (TaskAborted(), Outcome.REQUEUE, None),
])
def test_every_exception_a_task_raises_settles_it_and_the_trainer_lives_on(trainer, error, outcome, traceback):
    def raise_it(_task):
        raise error

    trainer._train_task = raise_it
    with capture_logs() as logs:
        assert _on(trainer, _train("t1")) is outcome
    assert trainer.status == "idle" and trainer.tasks_done == 0
    if outcome is Outcome.DEAD_LETTER:
        (failed,) = _events(logs, "task_failed")
        assert failed["task_id"] == "t1" and failed["error_type"] == type(error).__name__
        assert str(error) in failed["error"]
        assert (failed["exc_info"] is error) if traceback else failed["exc_info"] is False


@pytest.mark.parametrize("error", [pika.exceptions.StreamLostError("connection reset"),
                                   pika.exceptions.ChannelClosedByBroker(406, "PRECONDITION_FAILED"),
                                   KeyboardInterrupt(), SystemExit(1)])
def test_a_lost_connection_and_an_interrupt_are_not_the_tasks_fault_and_propagate(trainer, error):
    """Not dead-lettered: the connection is reconnected (or the process ends) and the unacknowledged task comes
    back through the broker."""
    def raise_it(_task):
        raise error

    trainer._train_task = raise_it
    with pytest.raises(type(error)):
        _on(trainer, _train("t1"))
    assert trainer.status == "idle"


# -- real training ------------------------------------------------------------------------------------------

def test_an_exception_in_training_dead_letters_the_task_and_the_next_one_trains(trainer):
    # Valid TrainConfig values that torch cannot take: AdamW overflows (RuntimeError), the time shift overflows
    # torch.randint (ValueError). Neither is an MqfedError; both used to take the trainer down.
    with capture_logs() as logs:
        assert _on(trainer, _train("lr", learning_rate=1e300)) is Outcome.DEAD_LETTER
        assert _on(trainer, _train("shift", time_shift_s=1e300)) is Outcome.DEAD_LETTER
        assert _on(trainer, _train("good")) is Outcome.ACK
    assert [e["error_type"] for e in _events(logs, "task_failed")] == ["RuntimeError", "ValueError"]
    assert [u.task_id for u in trainer.pub.updates()] == ["good"] and trainer.tasks_done == 1


def test_a_model_version_that_does_not_fit_is_dead_lettered_and_poisons_no_later_task(trainer, version0, tmp_path):
    reference = _make_trainer(tmp_path / "reference.bin", version0)
    assert _on(trainer, _train("warm")) is Outcome.ACK
    cached = trainer.model
    assert cached is not None and trainer.model_key == ("kws-tiny", False)

    # A version of another shape into the cached model: load_state_dict copies what fits, then raises.
    name = "classifier.weight"
    trainer.versions[0] = {**version0, name: torch.zeros(version0[name].shape[0] + 1, version0[name].shape[1])}
    with capture_logs() as logs:
        assert _on(trainer, _train("misfit")) is Outcome.DEAD_LETTER
    (failed,) = _events(logs, "task_failed")
    assert failed["error_type"] == "ModelLoadError" and "does not fit model 'kws-tiny'" in failed["error"]
    assert trainer.model is None and trainer.model_key is None  # the half-loaded model is not kept

    # The next task gets a clean model and makes exactly the update a trainer that never saw the misfit makes.
    trainer.versions[0] = version0
    assert _on(trainer, _train("after")) is Outcome.ACK
    assert trainer.model is not cached
    assert _on(reference, _train("warm")) is Outcome.ACK and _on(reference, _train("after")) is Outcome.ACK
    mine, theirs = trainer.pub.updates()[-1], reference.pub.updates()[-1]
    assert mine.task_id == theirs.task_id == "after" and mine.payload == theirs.payload


def test_a_task_naming_a_model_that_does_not_fit_leaves_the_trainers_model_as_it_was(trainer, monkeypatch):
    assert _on(trainer, _train("warm")) is Outcome.ACK
    cached, key = trainer.model, trainer.model_key
    real_build = daemon.build_model
    monkeypatch.setattr(daemon, "build_model", lambda spec, weights=True: torch.nn.Linear(2, 2)
                        if spec.name == "other" else real_build(spec, weights))
    with capture_logs() as logs:
        assert _on(trainer, _train("other", model="other")) is Outcome.DEAD_LETTER
        assert _on(trainer, _train("unknown", model="no such model")) is Outcome.DEAD_LETTER  # no hub lookup
    assert [e["error_type"] for e in _events(logs, "task_failed")] == ["ModelLoadError", "ModelLoadError"]
    assert trainer.model is cached and trainer.model_key == key
    assert _on(trainer, _train("good")) is Outcome.ACK
    assert [u.task_id for u in trainer.pub.updates()] == ["warm", "good"]


# -- deadlines ----------------------------------------------------------------------------------------------

def test_a_deadline_passing_mid_training_stops_it_and_acks_the_task_without_an_update(trainer):
    with capture_logs() as logs:
        started = time.monotonic()
        assert _on(trainer, _train("late", deadline_s=1.0, steps=100_000)) is Outcome.ACK
        assert time.monotonic() - started < 10
        assert _on(trainer, _train("next")) is Outcome.ACK
    (expired,) = _events(logs, "task_expired")
    assert expired["task_id"] == "late" and expired["stage"] == "training"
    assert 0 < expired["step"] < expired["total"] == 100_000 and expired["late_s"] >= 0
    assert [u.task_id for u in trainer.pub.updates()] == ["next"]
    assert trainer.tasks_done == 1  # the expired task is not counted as done


def test_a_deadline_passing_while_straggling_or_before_publishing_publishes_nothing(trainer, monkeypatch):
    trainer.w = _worker(delay_s=30.0)  # a straggler: trains, then sleeps 30 s
    with capture_logs() as logs:
        started = time.monotonic()
        assert _on(trainer, _train("straggler", deadline_s=2.0)) is Outcome.ACK
        assert time.monotonic() - started < 10
    assert [e["stage"] for e in _events(logs, "task_expired")] == ["straggling"]

    # Trained in time, late once compressed: nothing goes out, the residual stays as it was.
    trainer.w = _worker()
    task = _train("slow-upload", deadline_s=2.0)
    real_prepare = daemon.ErrorFeedback.prepare

    def slow_prepare(self, delta, codec):
        time.sleep(max(0.0, task.deadline_unix - time.time()) + 0.05)
        return real_prepare(self, delta, codec)

    monkeypatch.setattr(daemon.ErrorFeedback, "prepare", slow_prepare)
    with capture_logs() as logs:
        assert _on(trainer, task) is Outcome.ACK
    (expired,) = _events(logs, "task_expired")
    assert expired["stage"] == "publishing" and expired["step"] == expired["total"] == 2
    assert trainer.pub.updates() == [] and not trainer.ef.residual


def test_an_evaluation_past_its_deadline_publishes_no_metrics_and_a_stop_returns_it(trainer):
    task = messages.EvaluateTask("exp", "e1", 0, "validation", time.time() + 1.0)

    def slow(fn, *args):  # the deadline passes before the first batch is checked
        trainer.abort = threading.Event()
        time.sleep(max(0.0, task.deadline_unix - time.time()) + 0.05)
        return fn(*args)

    trainer._wait_for = slow
    with capture_logs() as logs:
        assert _on(trainer, task) is Outcome.ACK
    (expired,) = _events(logs, "task_expired")
    assert expired["stage"] == "evaluating" and expired["step"] == expired["total"] == 8
    assert trainer.pub.published == []

    trainer.stop_event.set()
    assert _on(trainer, messages.EvaluateTask("exp", "e2", 0, "validation", time.time() + 60)) is Outcome.REQUEUE
    trainer.stop_event.clear()
    assert _on(trainer, messages.EvaluateTask("exp", "e3", 0, "validation", time.time() + 60)) is Outcome.ACK
    (metrics,) = trainer.pub.published
    assert isinstance(metrics, messages.Metrics) and metrics.values["val_samples"] == 8.0


def test_task_expired_says_how_far_the_task_got():
    task = _train("t", deadline_s=-2.0)
    exc = TaskExpired(task, "training", 7, 40)
    assert (exc.stage, exc.step, exc.total) == ("training", 7, 40) and exc.late_s >= 2.0
    assert "step 7/40" in str(exc) and "training" in str(exc)
    with pytest.raises(TaskExpired):
        daemon.check_deadline(task, "fetching")
    daemon.check_deadline(_train("u"), "fetching")  # in time: nothing


def test_a_residual_that_cannot_be_saved_after_the_update_went_out_does_not_undo_the_answer(trainer, tmp_path):
    trainer.ef_path = tmp_path / "no-such-dir" / "residual.bin"
    with capture_logs() as logs:
        assert _on(trainer, _train("answered")) is Outcome.ACK  # answered once: not dead-lettered too
    assert [u.task_id for u in trainer.pub.updates()] == ["answered"] and trainer.tasks_done == 1
    assert _events(logs, "residual_not_saved") and not _events(logs, "task_failed")
    assert trainer.ef.residual  # kept in memory for the next update


def test_a_trainer_holding_a_version_the_task_accepts_trains_from_it_without_downloading(trainer, version0):
    trainer.base = (3, version0)  # no store, no connection: a download would raise AttributeError
    assert Trainer._fetch(trainer, 3) == (3, version0) and trainer.fetched_bytes == 0
    assert Trainer._fetch(trainer, 1) == (3, version0)  # older than what it holds: a lagging task


def test_the_update_reports_the_model_bytes_its_task_downloaded(trainer):
    trainer.fetched_bytes = 0

    def fetch(min_version):
        trainer.fetched_bytes = 12345
        return 0, trainer.versions[0]

    trainer._fetch = fetch
    assert _on(trainer, _train("t1")) is Outcome.ACK
    assert trainer.pub.updates()[0].metrics["fetched_bytes"] == 12345.0


def test_a_version_held_from_another_run_is_not_trained_from(trainer, version0):
    """A fresh start numbers versions from 0 again: version 3 of the last run is not version 3 of this one."""
    trainer.base, trainer.base_run = (3, {n: t + 1 for n, t in version0.items()}), "an-earlier-run"
    seen = []

    def fetch(min_version):
        seen.append(trainer.base)
        return 0, trainer.versions[0]

    trainer._fetch = fetch
    assert _on(trainer, _train("t1")) is Outcome.ACK
    assert seen == [None] and trainer.base_run == "run-1"


@pytest.mark.parametrize("value, counted", [(189e6, 189_000_000), (0.0, 0), (-5.0, 0), (float("nan"), 0),
                                            (float("inf"), 0), (2.0**40, 0), (True, 0), ("1e9", 0), (None, 0)])
def test_the_coordinator_counts_only_plausible_reported_download_bytes(value, counted):
    from coordinator.server import reported_fetched_bytes

    assert reported_fetched_bytes({"fetched_bytes": value}) == counted
    assert reported_fetched_bytes({}) == 0


# -- local.keep_optimizer ------------------------------------------------------------------------------------

def _steps(trainer) -> list[float]:
    """The step count in the optimizer state the trainer holds (every parameter's)."""
    return sorted({float(s["step"]) for s in trainer.opt_state[1]["state"].values()})


def test_a_trainer_keeps_its_optimizer_state_between_the_tasks_of_a_run_and_model_only(trainer):
    assert _on(trainer, _train("t1", keep_optimizer=True)) is Outcome.ACK and _steps(trainer) == [2.0]
    assert _on(trainer, _train("t2", keep_optimizer=True)) is Outcome.ACK and _steps(trainer) == [4.0]
    assert _on(trainer, _train("t3", keep_optimizer=True, run="run-2")) is Outcome.ACK  # another run: fresh
    assert _steps(trainer) == [2.0]
    assert _on(trainer, _train("t4", keep_optimizer=True, run="run-2", optimizer="sgd")) is Outcome.ACK
    assert trainer.opt_state[0] == ("run-2", ("kws-tiny", False), "sgd")
    assert _on(trainer, _train("t5")) is Outcome.ACK and trainer.opt_state is None  # off: nothing held
    assert [u.task_id for u in trainer.pub.updates()] == ["t1", "t2", "t3", "t4", "t5"]


def test_a_training_cut_short_leaves_no_optimizer_state_and_the_next_task_starts_fresh(trainer):
    assert _on(trainer, _train("t1", keep_optimizer=True)) is Outcome.ACK and _steps(trainer) == [2.0]
    assert _on(trainer, _train("late", deadline_s=1.0, steps=100_000, keep_optimizer=True)) is Outcome.ACK
    assert trainer.opt_state is None  # its moments moved in place part of the way: not gone on from
    assert _on(trainer, _train("t2", keep_optimizer=True)) is Outcome.ACK and _steps(trainer) == [2.0]
