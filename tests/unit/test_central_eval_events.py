"""The coordinator takes the evaluator's results from the events exchange: valid ones are recorded and drive
the best model and the target-accuracy stop; impossible ones (an accuracy outside [0, 1], a non-finite loss,
a version not made yet) are logged and ignored."""
from __future__ import annotations

import math
import time
import types

import pytest

from common.config import load_config
from common.wire import messages
from coordinator.experiment import ExperimentConfig
from coordinator.record import RunRecord
from coordinator.server import Coordinator


@pytest.fixture
def coordinator(tiny_corpus_dir, tmp_path, torch_single_thread):
    cfg = load_config(ExperimentConfig, env={}, overrides={
        "experiment.name": "evals", "experiment.run_dir": str(tmp_path / "run"), "data.path": str(tiny_corpus_dir),
        "data.eval_max_clips": 12})
    coord = Coordinator(cfg)
    coord._session_start = time.monotonic()
    coord.aggregator.version = 3  # three versions made
    return coord


def _event(coord, version: int, accuracy: float, loss: float) -> None:
    body = messages.encode(messages.Metrics("evals", "evaluator", version, {"accuracy": accuracy, "loss": loss},
                                            time.time()))
    coord._on_event(None, types.SimpleNamespace(routing_key="metrics.evaluator"),
                    types.SimpleNamespace(user_id="mqfed-evals-coordinator"), body)


@pytest.mark.parametrize("version, accuracy, loss", [(2, 7.0, 0.5), (2, -0.1, 0.5), (2, 0.5, math.nan),
                                                     (2, math.nan, 0.5), (9, 0.9, 0.5)],
                         ids=["accuracy-above-1", "negative-accuracy", "nan-loss", "nan-accuracy", "future-version"])
def test_an_impossible_evaluation_is_ignored(coordinator, version, accuracy, loss):
    _event(coordinator, version, accuracy, loss)
    assert coordinator.best["accuracy"] == -1.0 and coordinator.last_eval is None
    assert [e for e in RunRecord(coordinator.record.path).lines() if e.get("kind") == "eval"] == []


def test_a_valid_evaluation_is_recorded_and_becomes_the_best(coordinator):
    _event(coordinator, 2, 0.75, 0.5)
    _event(coordinator, 3, 0.5, 0.9)
    assert coordinator.best == {"accuracy": 0.75, "version": 2}
    assert coordinator.last_eval == {"version": 3, "accuracy": 0.5, "loss": 0.9}
    evals = [(e["version"], e["accuracy"]) for e in RunRecord(coordinator.record.path).lines() if e.get("kind") == "eval"]
    assert evals == [(2, 0.75), (3, 0.5)]
