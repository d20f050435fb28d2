"""Local training and evaluation (common/learning/training.py): config validation naming the field, step/epoch
arithmetic, weights that change and repeat bit for bit on CPU, empty and non-finite data refused, and
evaluation's accuracy, per-class accuracy and an oracle model's perfect score. A slow test checks that
the tiny model learns the synthetic corpus."""
from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.data import corpus
from common.data.dataset import DataError, to_arrays
from common.data.labels import KS_LABELS
from common.learning.model import ModelSpec, build_model
from common.learning.training import Clips, TrainConfig, _lr_factor, evaluate, train

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def clips(tiny_corpus) -> Clips:
    return Clips.from_arrays(*to_arrays(tiny_corpus["train"]))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- TrainConfig ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("steps", -1), ("steps", 1.5), ("steps", True),
    ("epochs", -1.0), ("epochs", math.nan), ("epochs", math.inf), ("epochs", True),
    ("batch_size", 0), ("batch_size", 4.0), ("batch_size", True),
    ("learning_rate", 0.0), ("learning_rate", -1e-3), ("learning_rate", math.nan), ("learning_rate", math.inf),
    ("learning_rate", True), ("learning_rate", "1e-3"),
    ("warmup_steps", -1), ("schedule", "cosine-ish"), ("weight_decay", -0.1), ("max_grad_norm", 0.0),
    ("max_grad_norm", -1.0), ("max_grad_norm", math.nan), ("max_grad_norm", True), ("optimizer", "adam"),
    ("time_shift_s", -0.1), ("seed", -1), ("seed", 0.5),
    ("label_smoothing", -0.1), ("label_smoothing", 1.0), ("label_smoothing", True),
    ("keep_optimizer", 1), ("keep_optimizer", "yes"),
])
def test_train_config_refuses_a_bad_value_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}\b"):
        TrainConfig(**{"steps": 1, field: value})


def test_train_config_needs_steps_or_epochs():
    with pytest.raises(ValueError, match="steps.*epochs"):
        TrainConfig()
    TrainConfig(steps=1)
    TrainConfig(epochs=0.5)


def test_total_steps_from_steps_or_epochs():
    assert TrainConfig(steps=5, epochs=3.0, batch_size=4).total_steps(10) == 5  # steps win
    assert TrainConfig(epochs=1.0, batch_size=4).total_steps(10) == 3  # ceil(10 / 4)
    assert TrainConfig(epochs=2.5, batch_size=4).total_steps(10) == 7  # ceil(25 / 4)
    assert TrainConfig(epochs=1.0, batch_size=5).total_steps(10) == 2
    assert TrainConfig(epochs=0.01, batch_size=4).total_steps(10) == 1  # at least one step


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decaying_schedules_warm_up_then_fall_to_near_zero_at_the_last_step(schedule):
    config = TrainConfig(steps=100, warmup_steps=10, schedule=schedule)
    factors = [_lr_factor(step, 100, config) for step in range(100)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))  # non-increasing after the warm-up
    assert 0 < factors[-1] <= 1 / 90 and factors[10] > 0.95
    # a warm-up as long as the task is capped at half of it, so the decay still happens; one step still moves
    long = [_lr_factor(step, 8, TrainConfig(steps=8, warmup_steps=50, schedule=schedule)) for step in range(8)]
    assert long[3] == 1.0 and 0 < long[-1] <= 0.25
    assert _lr_factor(0, 1, TrainConfig(steps=1, schedule=schedule)) > 0


def test_constant_schedule_after_warm_up():
    config = TrainConfig(steps=20, warmup_steps=4)
    assert [_lr_factor(step, 20, config) for step in range(20)] == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 17)


# --- train ----------------------------------------------------------------------------------------------

def test_train_changes_the_weights_and_reports_loss_samples_seconds_and_steps(clips):
    model = build_model(ModelSpec("kws-tiny"))
    before = _state(model)
    seen = []
    result = train(model, clips, TrainConfig(steps=2, batch_size=4), on_step=lambda *a: seen.append(a))
    assert result.steps == 2 and result.samples == 8
    assert result.seconds > 0 and result.samples_per_s > 0
    assert math.isfinite(result.loss) and 0 < result.loss < 2 * math.log(len(KS_LABELS))
    assert [(s, t) for s, t, _ in seen] == [(1, 2), (2, 2)]
    assert result.loss == pytest.approx(np.mean([loss for _, _, loss in seen]))
    after = _state(model)
    assert not _same(before, after)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_train_runs_the_steps_that_epochs_ask_for():
    rng = np.random.default_rng(0)
    ten = Clips.from_arrays(rng.standard_normal((10, 16_000)).astype(np.float32), np.arange(10) % 12)
    result = train(build_model(ModelSpec("kws-tiny")), ten, TrainConfig(epochs=1.0, batch_size=4, time_shift_s=0.0))
    assert (result.steps, result.samples) == (3, 12)
    three = Clips(ten.audio[:3], ten.labels[:3])  # fewer clips than a batch: each step takes them all
    result = train(build_model(ModelSpec("kws-tiny")), three, TrainConfig(steps=2, batch_size=4))
    assert (result.steps, result.samples) == (2, 6)


def test_train_is_bit_for_bit_repeatable_on_cpu_with_the_same_seed(clips):
    config = TrainConfig(steps=2, batch_size=4, seed=7)
    runs = []
    for _ in range(2):
        model = build_model(ModelSpec("kws-tiny"))
        result = train(model, clips, config)
        runs.append((_state(model), result.loss))
    assert _same(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    other = build_model(ModelSpec("kws-tiny"))
    train(other, clips, TrainConfig(steps=2, batch_size=4, seed=8))
    assert not _same(runs[0][0], _state(other))


class Probe(torch.nn.Module):
    """A linear read-out of each clip's first 64 samples: no dropout, so training is a function of the steps."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(64, len(KS_LABELS))

    def forward(self, input_values: torch.Tensor):
        return types.SimpleNamespace(logits=self.linear(input_values[:, :64]))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_going_on_from_an_optimizer_state_is_one_longer_training(clips, optimizer):
    """Full batches (order does not matter), constant rate: 2 steps, then 2 more from the first training's
    optimizer state, end where 4 steps in one go do; 2 + 2 with a fresh optimizer each end elsewhere."""
    some = Clips(clips.audio[:8], clips.labels[:8])
    config = TrainConfig(steps=2, batch_size=8, time_shift_s=0.0, optimizer=optimizer, weight_decay=0.01)
    whole = Probe()
    train(whole, some, TrainConfig(**{**config.__dict__, "steps": 4}))
    resumed, fresh = Probe(), Probe()
    first = train(resumed, some, config)
    second = train(resumed, some, config, optimizer_state=first.optimizer_state)
    train(fresh, some, config)
    train(fresh, some, config)
    for name, value in _state(whole).items():
        torch.testing.assert_close(_state(resumed)[name], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_state(fresh)["linear.weight"], _state(whole)["linear.weight"], rtol=1e-5, atol=1e-6)
    if optimizer == "adamw":
        assert [float(s["step"]) for s in second.optimizer_state["state"].values()] == [4.0, 4.0]


def test_train_on_an_empty_shard_raises_data_error():
    empty = Clips(torch.zeros(0, 16_000), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(DataError, match="empty"):
        train(build_model(ModelSpec("kws-tiny")), empty, TrainConfig(steps=1))


def test_clips_refuse_audio_and_labels_that_disagree():
    with pytest.raises(DataError, match="disagree"):
        Clips(torch.zeros(3, 16_000), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_raises_floating_point_error_before_touching_the_weights(bad):
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal((8, 16_000))).astype(np.float32)
    audio[5, 8_000] = bad
    model = build_model(ModelSpec("kws-tiny"))
    before = _state(model)
    with pytest.raises(FloatingPointError, match="step 0"):
        train(model, Clips.from_arrays(audio, np.arange(8)), TrainConfig(steps=3, batch_size=8))
    assert _same(before, _state(model))


# --- evaluate -------------------------------------------------------------------------------------------

class Oracle(torch.nn.Module):
    """Logits that pick the true label of each clip, in the order evaluate() feeds them."""

    def __init__(self, labels: torch.Tensor) -> None:
        super().__init__()
        self.labels, self.pos = labels, 0

    def forward(self, input_values: torch.Tensor):
        y = self.labels[self.pos:self.pos + input_values.shape[0]]
        self.pos += input_values.shape[0]
        return types.SimpleNamespace(logits=10.0 * F.one_hot(y, len(KS_LABELS)).float())


def test_evaluate_gives_accuracy_loss_and_accuracy_for_every_label(clips):
    model = build_model(ModelSpec("kws-tiny"))
    model.train()
    result = evaluate(model, clips, batch_size=20)
    assert 0.0 <= result.accuracy <= 1.0 and result.samples == len(clips)
    assert math.isfinite(result.loss) and result.loss > 0
    assert list(result.per_class) == list(KS_LABELS)
    assert all(0.0 <= v <= 1.0 for v in result.per_class.values())
    per_label = len(clips) // len(KS_LABELS)  # the tiny corpus is balanced
    assert result.accuracy == pytest.approx(sum(result.per_class.values()) / len(KS_LABELS))
    assert all((v * per_label) == round(v * per_label) for v in result.per_class.values())
    assert model.training  # evaluate puts the model back in the mode it found


def test_evaluate_of_a_model_that_knows_the_answers_is_perfect(clips):
    result = evaluate(Oracle(clips.labels), clips, batch_size=7)
    assert result.accuracy == 1.0 and result.samples == len(clips)
    assert result.per_class == {name: 1.0 for name in KS_LABELS}
    assert result.loss < 1e-3


def test_evaluate_reports_nan_for_labels_without_clips_and_refuses_an_empty_split(clips):
    some = Clips(clips.audio[:3], torch.tensor([0, 0, 1]))
    wrong = Oracle(torch.tensor([0, 2, 1]))  # right, wrong, right
    result = evaluate(wrong, some)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.per_class["yes"] == 0.5 and result.per_class["no"] == 1.0
    assert all(math.isnan(result.per_class[name]) for name in KS_LABELS[2:])
    with pytest.raises(DataError, match="empty"):
        evaluate(wrong, Clips(torch.zeros(0, 16_000), torch.zeros(0, dtype=torch.int64)))


@pytest.mark.slow
def test_tiny_model_learns_the_synthetic_corpus():
    dd = corpus.generate(corpus.SynthSpec(seed=0, per_class=8, eval_per_class=1), progress=False)
    train_clips = Clips.from_arrays(*to_arrays(dd["train"]))
    model = build_model(ModelSpec("kws-tiny"))
    before = evaluate(model, train_clips)
    result = train(model, train_clips, TrainConfig(steps=150, batch_size=16, learning_rate=3e-3, warmup_steps=10))
    after = evaluate(model, train_clips)
    assert after.loss < before.loss and result.loss < math.log(len(KS_LABELS))
    assert after.accuracy >= 3 / len(KS_LABELS)  # chance is 1/12
