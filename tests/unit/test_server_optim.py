"""Server optimizers: torch.optim steps on the negated delta, checked against hand-computed numbers."""
from __future__ import annotations

import math

import pytest
import torch

from coordinator.server_optim import SERVER_OPTIMIZERS, ServerOptimizer, ServerOptimizerConfig


def _params(*values):
    return {"p": torch.tensor(values, dtype=torch.float64)}


def _delta(*values):
    return {"p": torch.tensor(values, dtype=torch.float64)}


def test_sgd_moves_parameters_along_the_delta_scaled_by_lr():
    params = _params(1.0, 2.0)
    opt = ServerOptimizer(params, ServerOptimizerConfig(name="sgd", lr=0.5))
    opt.step(_delta(0.2, -0.4))
    # p + lr * d = [1 + 0.1, 2 - 0.2]
    assert params["p"].tolist() == pytest.approx([1.1, 1.8], abs=1e-15)


def test_sgd_with_lr_one_lands_exactly_on_base_plus_delta():
    params = {"p": torch.tensor([0.25, -3.0, 7.5])}
    opt = ServerOptimizer(params, ServerOptimizerConfig(name="sgd", lr=1.0))
    opt.step({"p": torch.tensor([0.5, 1.0, -0.25])})
    assert torch.equal(params["p"], torch.tensor([0.75, -2.0, 7.25]))


def test_sgd_ignores_the_momentum_setting():
    params = _params(0.0)
    opt = ServerOptimizer(params, ServerOptimizerConfig(name="sgd", lr=1.0, momentum=0.9))
    opt.step(_delta(1.0))
    opt.step(_delta(1.0))
    assert params["p"].tolist() == [2.0]  # with momentum it would be 1 + 1.9


def test_momentum_accumulates_the_previous_delta():
    params = _params(0.0, 0.0)
    opt = ServerOptimizer(params, ServerOptimizerConfig(name="momentum", lr=0.1, momentum=0.9))
    opt.step(_delta(1.0, 2.0))
    # buf = g = -d1 = [-1, -2]; p = -0.1 * buf
    assert params["p"].tolist() == pytest.approx([0.1, 0.2], abs=1e-15)
    opt.step(_delta(1.0, 0.0))
    # buf = 0.9 * [-1, -2] + [-1, 0] = [-1.9, -1.8]; p = [0.1, 0.2] + 0.1 * [1.9, 1.8]
    assert params["p"].tolist() == pytest.approx([0.29, 0.38], abs=1e-15)


def test_fedadam_first_step_is_lr_times_delta_over_abs_delta_plus_eps():
    params = _params(1.0, 2.0)
    cfg = ServerOptimizerConfig(name="fedadam", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    opt = ServerOptimizer(params, cfg)
    opt.step(_delta(0.5, -2.0))
    # g = [-0.5, 2]; m_hat = g, v_hat = g^2 after bias correction; p -= lr * g / (|g| + eps)
    expected = [1.0 + 0.1 * 0.5 / 0.501, 2.0 - 0.1 * 2.0 / 2.001]
    assert params["p"].tolist() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx([1.0998003992, 1.9000499750], abs=1e-10)


def test_fedadam_second_step_uses_bias_corrected_moments():
    params = _params(1.0, 2.0)
    opt = ServerOptimizer(params, ServerOptimizerConfig(name="fedadam", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3))
    opt.step(_delta(0.5, -2.0))
    after_first = params["p"].tolist()
    opt.step(_delta(0.0, -1.0))
    # Hand computation, g1 = [-0.5, 2], g2 = [0, 1]:
    m = [0.9 * 0.1 * -0.5 + 0.1 * 0.0, 0.9 * 0.1 * 2.0 + 0.1 * 1.0]            # [-0.045, 0.28]
    v = [0.99 * 0.01 * 0.25 + 0.01 * 0.0, 0.99 * 0.01 * 4.0 + 0.01 * 1.0]      # [0.002475, 0.0496]
    m_hat = [x / (1 - 0.9**2) for x in m]
    v_hat = [x / (1 - 0.99**2) for x in v]
    expected = [p - 0.1 * mh / (math.sqrt(vh) + 1e-3) for p, mh, vh in zip(after_first, m_hat, v_hat)]
    assert m == pytest.approx([-0.045, 0.28])
    assert v == pytest.approx([0.002475, 0.0496])
    assert params["p"].tolist() == pytest.approx(expected, abs=1e-12)


def test_step_updates_the_callers_tensors_in_place_and_leaves_no_grad():
    t = torch.tensor([1.0])
    opt = ServerOptimizer({"p": t}, ServerOptimizerConfig(lr=1.0))
    opt.step({"p": torch.tensor([2.0])})
    assert t.tolist() == [3.0]
    assert t.grad is None


def test_delta_is_cast_to_the_parameter_dtype():
    params = {"p": torch.tensor([1.0, 1.0], dtype=torch.float16)}
    opt = ServerOptimizer(params, ServerOptimizerConfig(lr=1.0))
    opt.step({"p": torch.tensor([0.5, -0.5], dtype=torch.float32)})
    assert params["p"].dtype == torch.float16
    assert params["p"].tolist() == [1.5, 0.5]


def test_step_with_missing_or_misshaped_delta_changes_nothing():
    params = {"a": torch.tensor([1.0]), "b": torch.tensor([2.0, 3.0])}
    opt = ServerOptimizer(params, ServerOptimizerConfig(lr=1.0))
    with pytest.raises(KeyError, match="'b'"):
        opt.step({"a": torch.tensor([1.0])})
    with pytest.raises(ValueError, match="shape"):
        opt.step({"a": torch.tensor([1.0]), "b": torch.tensor([1.0])})
    assert params["a"].tolist() == [1.0] and params["b"].tolist() == [2.0, 3.0]


def test_non_float_parameters_are_refused():
    with pytest.raises(TypeError, match="'count'"):
        ServerOptimizer({"count": torch.tensor([1])}, ServerOptimizerConfig())


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_state_dict_round_trip_resumes_identically(name):
    cfg = ServerOptimizerConfig(name=name, lr=0.05, momentum=0.8, beta1=0.8, beta2=0.95, eps=1e-4)
    deltas = [_delta(0.3, -0.1), _delta(-0.2, 0.4), _delta(0.1, 0.1)]
    ref = _params(1.0, -1.0)
    ref_opt = ServerOptimizer(ref, cfg)
    ref_opt.step(deltas[0])
    saved_state = ref_opt.state_dict()
    saved_params = ref["p"].clone()
    for d in deltas[1:]:
        ref_opt.step(d)

    resumed = {"p": saved_params}
    opt = ServerOptimizer(resumed, cfg)
    opt.load_state_dict(saved_state)
    for d in deltas[1:]:
        opt.step(d)
    assert torch.equal(resumed["p"], ref["p"])


def test_state_dict_is_a_copy_unaffected_by_later_steps():
    params = _params(0.0)
    opt = ServerOptimizer(params, ServerOptimizerConfig(name="momentum", lr=1.0, momentum=0.5))
    opt.step(_delta(1.0))
    state = opt.state_dict()
    buf_before = state["torch"]["state"][0]["momentum_buffer"].clone()
    opt.step(_delta(1.0))
    assert torch.equal(state["torch"]["state"][0]["momentum_buffer"], buf_before)


def test_loading_state_from_another_optimizer_or_parameter_set_fails():
    opt = ServerOptimizer(_params(1.0), ServerOptimizerConfig(name="fedadam", lr=0.1))
    opt.step(_delta(1.0))
    with pytest.raises(ValueError, match="fedadam"):
        ServerOptimizer(_params(1.0), ServerOptimizerConfig(name="sgd")).load_state_dict(opt.state_dict())
    other = ServerOptimizer({"q": torch.tensor([1.0])}, ServerOptimizerConfig(name="fedadam", lr=0.1))
    with pytest.raises(ValueError, match="different set of parameters"):
        other.load_state_dict(opt.state_dict())


def test_loaded_state_keeps_the_current_learning_rate():
    opt = ServerOptimizer(_params(0.0), ServerOptimizerConfig(name="sgd", lr=0.5))
    state = opt.state_dict()
    params = _params(0.0)
    resumed = ServerOptimizer(params, ServerOptimizerConfig(name="sgd", lr=2.0))
    resumed.load_state_dict(state)
    resumed.step(_delta(1.0))
    assert params["p"].tolist() == [2.0]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "adagrad"}, "name"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": -0.5}, "beta2"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_invalid_config_is_rejected_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"ServerOptimizerConfig\.{field}"):
        ServerOptimizerConfig(**kwargs)


def test_config_defaults_are_plain_fedavg_sgd():
    cfg = ServerOptimizerConfig()
    assert (cfg.name, cfg.lr) == ("sgd", 1.0)


@pytest.mark.parametrize("name", ["sgd", "momentum", "fedadam"])
def test_an_in_place_step_moves_the_parameters_alike_and_gives_the_delta_back(name):
    cfg = ServerOptimizerConfig(name=name, lr=0.5)
    copied, borrowed = ({"p": torch.tensor([1.0, -2.0, 3.0])} for _ in range(2))
    delta = {"p": torch.tensor([0.5, 0.25, -1.0])}
    ServerOptimizer(copied, cfg).step(delta)
    lent = {"p": delta["p"].clone()}
    ServerOptimizer(borrowed, cfg).step(lent, in_place=True)
    assert torch.equal(borrowed["p"], copied["p"]) and torch.equal(lent["p"], delta["p"])
