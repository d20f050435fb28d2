"""A worker's error-feedback residual changes only once its update is confirmed: an upload that fails half-way
leaves it as it was (the task comes back through the queue and is redone from the same residual)."""
from __future__ import annotations

import types

import pika.exceptions
import pytest
import torch

from common.learning.config import TrainConfig
from common.metrics import WorkerMetrics
from common.wire import messages
from worker.daemon import Trainer


class FailingChannel:
    """Publishes into a list; the `fail_at`-th publish (1-based) loses the connection."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.published: list = []
        self.fail_at = fail_at

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False):
        if self.fail_at is not None and len(self.published) + 1 == self.fail_at:
            raise pika.exceptions.StreamLostError("Stream connection lost: ConnectionResetError(104)")
        self.published.append((properties.headers if properties else None, body))


def _trainer(tmp_path, pub):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    trainer = types.SimpleNamespace(
        w=types.SimpleNamespace(experiment="exp", inline_max_bytes=1024, chunk_bytes=1024, slowdown=1.0, delay_s=0.0),
        worker_id="w1/cpu", topo=types.SimpleNamespace(update_exchange="x", UPDATES_KEY="updates"), pub=pub, ef=None, opt_state=None,
        ef_path=tmp_path / "residual.bin", device="cpu", stop_event=types.SimpleNamespace(is_set=lambda: False),
        fetched_bytes=0, base=None, base_run=None, metrics=WorkerMetrics("w1", "cpu"))
    trainer._model_for = lambda name, freeze: model
    trainer._fetch = lambda version: (0, base)
    trainer._residual_for = lambda run_id: Trainer._residual_for(trainer, run_id)
    trainer.model = trainer.model_key = None
    trainer._load_state = lambda *args: Trainer._load_state(trainer, *args)

    def wait_for(fn, *args):  # "training": a fixed step away from the base
        with torch.no_grad():
            model.load_state_dict(base)
            model.weight.add_(torch.linspace(-1, 1, 64 * 64).view(64, 64))
        return types.SimpleNamespace(samples=4, loss=1.0, seconds=0.1, samples_per_s=40.0)

    trainer._wait_for = wait_for
    return trainer


def _task(task_id: str) -> messages.TrainTask:
    return messages.TrainTask("exp", "run-1", task_id, 0, 4e9, "topk:0.1+int8", "kws-tiny", False,
                              TrainConfig(steps=1))


def test_an_upload_that_fails_half_way_leaves_the_residual_as_it_was(tmp_path):
    ok = FailingChannel()
    trainer = _trainer(tmp_path, ok)
    Trainer._train_task(trainer, _task("t1"))  # a delivered update: its residual is committed and saved
    before = {n: t.clone() for n, t in trainer.ef.residual.items()}
    assert before and sum(1 for headers, _ in ok.published if headers) >= 2  # the update went in chunks
    saved = trainer.ef_path.read_bytes()

    trainer.pub = FailingChannel(fail_at=2)  # the second chunk of the next update never gets out
    with pytest.raises(pika.exceptions.StreamLostError):
        Trainer._train_task(trainer, _task("t2"))
    assert set(trainer.ef.residual) == set(before)
    assert all(torch.equal(trainer.ef.residual[n], before[n]) for n in before)
    assert trainer.ef_path.read_bytes() == saved

    trainer.pub = FailingChannel()  # the task comes back and is redone: the same update as if nothing failed
    Trainer._train_task(trainer, _task("t2"))
    reference = _trainer(tmp_path / "ref", FailingChannel())
    (tmp_path / "ref").mkdir()
    Trainer._train_task(reference, _task("t1"))
    Trainer._train_task(reference, _task("t2"))
    assert trainer.pub.published[-2][1] == reference.pub.published[-2][1]  # the last chunk, byte for byte
