"""The learning rate each train task asks for, decayed by model version (tasks.lr_decay)."""
import math
import types

import pytest

from common.config import ConfigError
from common.errors import InvalidValue
from common.learning.config import TrainConfig, decay_factor
from coordinator.experiment import load_experiment
from coordinator.server import Coordinator


@pytest.mark.parametrize("done, expected", [(0, 1.0), (25, 0.1 + 0.9 * (0.5 + 0.5 * math.cos(math.pi / 4))),
                                            (50, 0.55), (100, 0.1), (250, 0.1), (-3, 1.0)])
def test_cosine_to_the_number(done, expected):
    assert decay_factor("cosine", done, 100, 0.1) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("done, expected", [(0, 1.0), (10, 0.82), (50, 0.1), (51, 0.1)])
def test_linear_to_the_number(done, expected):
    assert decay_factor("linear", done, 50, 0.1) == pytest.approx(expected, abs=1e-12)


def test_constant_is_one_everywhere():
    assert {decay_factor("constant", v, 10, 0.5) for v in (0, 5, 10, 10**9)} == {1.0}


def test_monotone_and_never_below_the_floor():
    values = [decay_factor("cosine", v, 80, 0.05) for v in range(0, 200)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert min(values) == pytest.approx(0.05)


def test_unknown_schedule_is_refused_by_name():
    with pytest.raises(InvalidValue, match="step"):
        decay_factor("step", 1, 10, 0.1)


def _local_at(version: int, *overrides: str) -> TrainConfig:
    cfg = load_experiment(None, ["local.learning_rate=0.002", *overrides])
    return Coordinator.task_local(types.SimpleNamespace(cfg=cfg, version=version))


def test_tasks_carry_the_decayed_rate_and_nothing_else_changes():
    base = _local_at(0)
    assert _local_at(37) == base  # constant: [local] as configured
    decayed = _local_at(40, "tasks.lr_decay=\"cosine\"", "tasks.lr_decay_versions=80", "tasks.lr_floor=0.1")
    assert decayed.learning_rate == pytest.approx(0.002 * 0.55)
    assert decayed == TrainConfig(**{**base.__dict__, "learning_rate": decayed.learning_rate})
    assert _local_at(500, "tasks.lr_decay=\"linear\"", "tasks.lr_decay_versions=80").learning_rate == \
        pytest.approx(0.0002)


@pytest.mark.parametrize("key, value", [("tasks.lr_decay", "\"step\""), ("tasks.lr_decay_versions", "0"),
                                        ("tasks.lr_floor", "0"), ("tasks.lr_floor", "1.5"),
                                        ("tasks.lr_floor", "-0.1")])
def test_bad_decay_settings_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[1]):
        load_experiment(None, [f"{key}={value}"])
