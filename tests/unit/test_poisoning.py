"""Updates cannot poison the model: the sample-count bound, the adaptive norm bound (and its checkpointed
history), and the refused step (a mean delta, new parameter or optimizer state that would not be finite is
never applied, and nothing is mutated), checked to the bit. Rules: docs/aggregation.md, "Poisoning bounds"."""
from __future__ import annotations

import math

import pytest
import torch

from coordinator.aggregator import (
    NORM_BOUND_INITIAL,
    Aggregator,
    AggregatorConfig,
    ClientUpdate,
    RefusedStep,
    UpdateKey,
    UpdateRejected,
)
from coordinator.server_optim import ServerOptimizer, ServerOptimizerConfig

SGD1 = ServerOptimizerConfig(name="sgd", lr=1.0)
OFF = dict(norm_bound_factor=None)  # the adaptive bound off: what the probes ran against
OPTIMIZERS = {
    "sgd": ServerOptimizerConfig(name="sgd", lr=1.0),
    "momentum": ServerOptimizerConfig(name="momentum", lr=0.5, momentum=0.9),
    "fedadam": ServerOptimizerConfig(name="fedadam", lr=0.1),
}


def model32(w=(1.0, 2.0), b=(0.5,)):
    return {"w": torch.tensor(w, dtype=torch.float32), "b": torch.tensor(b, dtype=torch.float32),
            "count": torch.tensor(3, dtype=torch.int64)}


def model64(w=(1.0, 2.0), b=(0.5,)):
    return {"w": torch.tensor(w, dtype=torch.float64), "b": torch.tensor(b, dtype=torch.float64)}


def upd(w, b, task="t", worker="w0", base=0, n=1, dtype=torch.float32, max_samples=None):
    delta = {"w": torch.tensor(w, dtype=dtype), "b": torch.tensor(b, dtype=dtype)}
    return ClientUpdate("exp", task, worker, base, n, delta, max_samples=max_samples)


def bits(state):
    """The exact bytes of every tensor (bitwise, unlike ==: -0.0 vs 0.0, NaN)."""
    return {k: (v.dtype, v.detach().numpy().tobytes()) for k, v in state.items()}


def optimizer_bits(agg):
    out = {}
    for index, entry in agg.optimizer.state_dict()["torch"]["state"].items():
        for key, value in entry.items():
            out[(index, key)] = value.numpy().tobytes() if isinstance(value, torch.Tensor) else value
    return out


# -- the probes -------------------------------------------------------------------------------------------


def test_the_3e38_pair_is_rejected_by_the_default_norm_bound():
    state = model32()
    before = bits(state)
    agg = Aggregator(state, AggregatorConfig(buffer_size=2), SGD1)
    for task in ("p1", "p2"):
        with pytest.raises(UpdateRejected) as err:
            agg.add(upd([3e38, 3e38], [3e38], task=task))
        assert err.value.reason == "norm"
        # no accepted norm yet: the bound is 10 x the model's norm sqrt(1 + 4 + 0.25) = 2.29129
        assert "10 x the model's L2 norm 2.29129" in err.value.message
    assert bits(state) == before and agg.version == 0 and agg.buffered == 0
    assert agg.counters["rejected"] == {"norm": 2} and agg.counters["accepted"] == 0


def test_the_3e38_pair_valid_alone_overflows_together_and_is_refused_leaving_everything_as_it_was():
    state = model32()
    before = bits(state)
    agg = Aggregator(state, AggregatorConfig(buffer_size=2, staleness="constant", **OFF), SGD1)
    p1, p2 = upd([3e38, 3e38], [3e38], task="p1", worker="A"), upd([3e38, 3e38], [3e38], task="p2", worker="B")
    assert agg.validate(p1) == 0 and agg.validate(p2) == 0  # each alone is valid (finite, no bound set)
    first = agg.add(p1)
    assert (first.status, first.record, first.refused) == ("accepted", None, None)
    second = agg.add(p2)
    # 3e38 + 3e38 overflows float32 in the buffer: the mean is inf, the step is refused
    assert second.status == "refused" and second.record is None
    assert second.refused == RefusedStep(version=0, staleness=(0, 0), worker_ids=("A", "B"), task_ids=("p1", "p2"),
                                         num_samples=(1, 1), reason="mean_not_finite",
                                         detail="the mean delta of 'w' is not finite")
    assert bits(state) == before and agg.version == 0 and agg.buffered == 0
    assert agg.counters == {"accepted": 2, "duplicates": 0, "applied_updates": 0, "steps": 0, "step_refused": 2,
                            "rejected": {}}
    # their keys stay accepted: a redelivery (or a replay of the log) is a duplicate, never applied
    assert agg.add(p1).status == "duplicate" and agg.add(p2).status == "duplicate"
    assert bits(state) == before and agg.counters["duplicates"] == 2
    # an honest pair afterwards steps normally: mean w = ([1, 1] + [3, -1]) / 2 = [2, 0], b = (1 + 0) / 2
    agg.add(upd([1.0, 1.0], [1.0], task="h1"))
    rec = agg.add(upd([3.0, -1.0], [0.0], task="h2")).record
    assert rec is not None and rec.version == 1 and rec.task_ids == ("h1", "h2") and agg.version == 1
    assert state["w"].tolist() == [3.0, 2.0] and state["b"].tolist() == [1.0]
    assert agg.counters["steps"] == 1 and agg.counters["applied_updates"] == 2 and agg.counters["step_refused"] == 2


def test_a_sample_count_above_what_the_task_asked_for_is_rejected():
    agg = Aggregator(model32(), AggregatorConfig(buffer_size=2), SGD1)
    with pytest.raises(UpdateRejected) as err:
        agg.add(upd([0.1, 0.1], [0.1], task="greedy", n=2**63, max_samples=40 * 32))
    assert err.value.reason == "num_samples"
    assert err.value.message == "update claims 9223372036854775808 samples, the task asked for at most 1280"
    assert agg.counters["rejected"] == {"num_samples": 1} and agg.buffered == 0
    assert UpdateKey("exp", "greedy", "w0", 0) not in agg.applied_keys
    # exactly what the task asked for is fine; without max_samples the claim is not checked (as before)
    assert agg.add(upd([0.1, 0.1], [0.1], task="honest", n=1280, max_samples=1280)).status == "accepted"
    with pytest.raises(UpdateRejected, match="num_samples must be an int >= 1"):
        agg.add(upd([0.1, 0.1], [0.1], task="none", n=0, max_samples=1280))


# -- the adaptive norm bound -------------------------------------------------------------------------------


def test_the_defaults_turn_the_adaptive_bound_on():
    cfg = AggregatorConfig()
    assert (cfg.norm_bound_factor, cfg.norm_bound_window, cfg.norm_bound_initial) == (10.0, 50, NORM_BOUND_INITIAL)
    assert NORM_BOUND_INITIAL == 10.0
    agg = Aggregator(model64(w=(3.0, 0.0), b=(4.0,)), cfg, SGD1)
    assert agg.model_norm() == 5.0
    assert agg.norm_bound() == (50.0, "10 x the model's L2 norm 5 (no accepted update norm yet)")


def test_the_first_update_is_bounded_relative_to_the_model():
    cfg = AggregatorConfig(buffer_size=10, norm_bound_initial=2.0)  # ||model|| = 5: bound 10
    agg = Aggregator(model64(w=(3.0, 0.0), b=(4.0,)), cfg, SGD1)
    with pytest.raises(UpdateRejected) as err:
        agg.add(upd([0.0, 0.0], [10.01], task="big", dtype=torch.float64))
    assert err.value.reason == "norm"
    assert err.value.message == "update L2 norm 10.01 > 10 = 2 x the model's L2 norm 5 (no accepted update norm yet)"
    assert agg.norm_history == [] and agg.buffered == 0
    assert agg.add(upd([6.0, 0.0], [8.0], task="at", dtype=torch.float64)).status == "accepted"  # norm 10: at it
    assert agg.norm_history == [10.0]
    assert agg.norm_bound() == (100.0, "10 x the median 10 of the last 1 accepted update norms")


def test_without_an_initial_factor_or_with_a_zero_model_the_first_update_has_no_adaptive_bound():
    zero = Aggregator({"w": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)},
                      AggregatorConfig(buffer_size=10), SGD1)
    assert zero.norm_bound() is None
    assert zero.add(upd([1e6, 0.0], [0.0], task="a", dtype=torch.float64)).status == "accepted"
    unbounded = Aggregator(model64(), AggregatorConfig(buffer_size=10, norm_bound_initial=None), SGD1)
    assert unbounded.norm_bound() is None
    assert unbounded.add(upd([1e6, 0.0], [0.0], task="a", dtype=torch.float64)).status == "accepted"
    # the absolute bound applies besides, and first
    capped = Aggregator(model64(), AggregatorConfig(buffer_size=10, norm_bound_initial=None, max_update_norm=5.0), SGD1)
    with pytest.raises(UpdateRejected, match="max_update_norm 5"):
        capped.add(upd([6.0, 0.0], [0.0], task="a", dtype=torch.float64))


def _seeded(window=5, norms=(1.0, 2.0, 3.0, 4.0, 5.0), **cfg):
    """An aggregator (no step taken: K = 100) whose history holds `norms` (one-coordinate deltas)."""
    config = AggregatorConfig(buffer_size=100, norm_bound_window=window, norm_bound_initial=None, **cfg)
    agg = Aggregator(model64(), config, SGD1)
    for i, norm in enumerate(norms):
        assert agg.add(upd([norm, 0.0], [0.0], task=f"s{i}", dtype=torch.float64)).status == "accepted"
    return agg


def test_an_update_above_factor_times_the_median_of_accepted_norms_is_rejected():
    agg = _seeded()  # median of 1..5 is 3: the bound is 30
    with pytest.raises(UpdateRejected) as err:
        agg.add(upd([0.0, 0.0], [30.03], task="x10.01", dtype=torch.float64))
    assert err.value.reason == "norm"
    assert err.value.message == "update L2 norm 30.03 > 30 = 10 x the median 3 of the last 5 accepted update norms"
    assert agg.counters["rejected"] == {"norm": 1} and agg.buffered == 5
    assert agg.norm_history == [1.0, 2.0, 3.0, 4.0, 5.0]  # a rejected norm never enters
    assert agg.add(upd([0.0, 0.0], [29.97], task="x9.99", dtype=torch.float64)).status == "accepted"
    assert agg.norm_history == [2.0, 3.0, 4.0, 5.0, 29.97]


def test_the_window_slides():
    agg = _seeded(window=3, norms=(1.0, 1.0, 1.0))
    with pytest.raises(UpdateRejected, match="median 1 of the last 3"):
        agg.add(upd([80.0, 0.0], [0.0], task="early", dtype=torch.float64))
    agg.add(upd([9.0, 0.0], [0.0], task="a", dtype=torch.float64))  # 9 <= 10: [1, 1, 9], median 1
    agg.add(upd([9.0, 0.0], [0.0], task="b", dtype=torch.float64))  # [1, 9, 9], median 9: the 1s slide out
    assert agg.norm_history == [1.0, 9.0, 9.0]
    agg.add(upd([1.0, 0.0], [0.0], task="c", dtype=torch.float64))  # [9, 9, 1]: the oldest 1 went
    assert agg.norm_history == [9.0, 9.0, 1.0] and agg.norm_bound()[0] == 90.0
    assert agg.add(upd([80.0, 0.0], [0.0], task="late", dtype=torch.float64)).status == "accepted"
    assert agg.norm_history == [9.0, 1.0, 80.0]


def test_zero_norms_stay_out_of_the_history_and_the_history_is_kept_with_the_bound_off():
    agg = _seeded(norms=(2.0, 0.0, 0.0, 0.0), norm_bound_factor=None)  # zeros would pull the median to 0
    assert agg.norm_history == [2.0] and agg.norm_bound() is None and agg.buffered == 4


def test_state_dict_round_trip_restores_the_history_and_the_same_decisions():
    agg = _seeded()
    saved = agg.state_dict()
    assert saved["norm_history"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    resumed = Aggregator(model64(), agg.config, SGD1)
    resumed.load_state_dict(saved)
    assert resumed.norm_history == agg.norm_history
    for a in (agg, resumed):
        with pytest.raises(UpdateRejected, match="30.03 > 30 = 10 x the median 3"):
            a.add(upd([0.0, 0.0], [30.03], task="x10.01", dtype=torch.float64))
        assert a.add(upd([0.0, 0.0], [29.97], task="x9.99", dtype=torch.float64)).status == "accepted"
    assert resumed.norm_history == agg.norm_history and resumed.counters == agg.counters
    # a resumed run with a smaller window keeps the newest norms; a state from before the history starts over
    narrow = Aggregator(model64(), AggregatorConfig(buffer_size=100, norm_bound_window=3), SGD1)
    narrow.load_state_dict(saved)
    assert narrow.norm_history == [3.0, 4.0, 5.0]
    old = {k: v for k, v in saved.items() if k != "norm_history"}
    old["contributions"] = [row[:8] for row in saved["contributions"]]
    fresh = Aggregator(model64(), agg.config, SGD1)
    fresh.load_state_dict(old)
    assert fresh.norm_history == [] and fresh.buffered == 5


def test_replaying_the_same_updates_over_a_checkpoint_makes_the_same_decisions():
    gen = torch.Generator().manual_seed(3)
    scales = [1.0, 1.5, 0.8, 30.0, 1.2, 0.9, 14.0, 1.1, 500.0, 1.0, 0.7, 2.0, 9.0, 1.3]
    stream = [(i, torch.randn(2, generator=gen, dtype=torch.float64) * s, torch.randn(1, generator=gen, dtype=torch.float64) * s)
              for i, s in enumerate(scales)]
    cfg = AggregatorConfig(buffer_size=3, norm_bound_window=4, norm_bound_factor=3.0, norm_bound_initial=1.0)

    def feed(agg, items):
        out = []
        for i, w, b in items:
            try:
                result = agg.add(ClientUpdate("exp", f"t{i}", "w", agg.version, 1 + i, {"w": w, "b": b}))
                out.append((result.status, result.record))
            except UpdateRejected as exc:
                out.append(exc.message)
        return out

    live = Aggregator(model64(), cfg, OPTIMIZERS["fedadam"])
    head = feed(live, stream[:6])
    saved = live.state_dict()
    tail = feed(live, stream[6:])
    assert any(isinstance(x, str) and "median" in x for x in head + tail)  # the bound did reject some
    replayed = Aggregator(model64(), cfg, OPTIMIZERS["fedadam"])
    replayed.load_state_dict(saved)
    assert feed(replayed, stream[6:]) == tail
    assert bits(replayed.state) == bits(live.state) and optimizer_bits(replayed) == optimizer_bits(live)
    assert replayed.norm_history == live.norm_history and replayed.counters == live.counters


# -- the refused step ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_step_that_would_make_a_parameter_or_the_optimizer_state_non_finite_is_refused_untouched(name):
    # w[0] sits near float32's max; a finite mean delta of 1e38 would overflow it (sgd, momentum) or overflow
    # Adam's second moment (1e38 ** 2): refused, with the model and the optimizer state as they were.
    cfg = AggregatorConfig(buffer_size=1, staleness="constant", **OFF)
    honest = [upd([1.0, 1.0], [1.0], task="h1"), upd([-2.0, 0.5], [0.25], task="h2", base=1)]
    agg = Aggregator(model32(w=(3e38, 1.0)), cfg, OPTIMIZERS[name])
    reference = Aggregator(model32(w=(3e38, 1.0)), cfg, OPTIMIZERS[name])  # never sees the poisoned update
    agg.add(honest[0])
    reference.add(honest[0])
    model_before, optimizer_before = bits(agg.state), optimizer_bits(agg)
    assert optimizer_before or name == "sgd"  # momentum buffer / Adam moments exist now
    result = agg.add(upd([1e38, 0.0], [0.0], task="poison", worker="evil", base=1))
    assert result.status == "refused" and result.staleness == 0 and result.weight == 1.0
    expected = ("state_not_finite", "optimizer state 'exp_avg_sq' of 'w' would not be finite after the step") \
        if name == "fedadam" else ("param_not_finite", "parameter 'w' would not be finite after the step")
    assert (result.refused.reason, result.refused.detail) == expected
    assert result.refused.version == 1 and result.refused.worker_ids == ("evil",)
    assert bits(agg.state) == model_before and optimizer_bits(agg) == optimizer_before
    assert agg.version == 1 and agg.buffered == 0
    assert agg.counters["step_refused"] == 1 and agg.counters["steps"] == 1 and agg.counters["applied_updates"] == 1
    # the next step is exactly the one the never-poisoned aggregator takes
    agg.add(honest[1])
    reference.add(honest[1])
    assert agg.version == reference.version == 2
    assert bits(agg.state) == bits(reference.state) and optimizer_bits(agg) == optimizer_bits(reference)


def test_a_refused_steps_norms_leave_the_history():
    agg = Aggregator(model32(w=(3e38, 1.0)), AggregatorConfig(buffer_size=2, staleness="constant", **OFF), SGD1)
    agg.add(upd([3.0, 0.0], [4.0], task="a"))
    agg.add(upd([0.0, 0.0], [2.0], task="b"))
    assert agg.norm_history == [5.0, 2.0] and agg.version == 1
    agg.add(upd([1e38, 0.0], [0.0], task="c"))
    assert agg.norm_history == [5.0, 2.0, float(torch.tensor(1e38))]  # 1e38 as float32 holds it
    assert agg.add(upd([1e38, 0.0], [0.0], task="d")).status == "refused"
    assert agg.norm_history == [5.0, 2.0]
    # a window narrower than the buffer: what is left of the refused norms goes, nothing more
    narrow = Aggregator(model32(w=(3e38, 1.0)), AggregatorConfig(buffer_size=2, norm_bound_window=1, **OFF), SGD1)
    narrow.add(upd([1e38, 0.0], [0.0], task="c"))
    assert narrow.add(upd([1e38, 0.0], [0.0], task="d")).status == "refused"
    assert narrow.norm_history == []


def test_a_refused_step_replays_identically_from_a_checkpoint_taken_mid_buffer():
    cfg = AggregatorConfig(buffer_size=2, staleness="constant", **OFF)
    items = [upd([1.0, 1.0], [1.0], task="a"), upd([1.0, -1.0], [0.0], task="b"),
             upd([3e38, 3e38], [3e38], task="c", base=1), upd([3e38, 3e38], [3e38], task="d", base=1),
             upd([2.0, 2.0], [2.0], task="e", base=1), upd([0.0, 2.0], [0.0], task="f", base=1)]
    live = Aggregator(model32(), cfg, OPTIMIZERS["momentum"])
    for u in items[:3]:
        live.add(u)
    saved = live.state_dict()  # c waits in the buffer
    tail = [live.add(u) for u in items[3:]]
    assert [r.status for r in tail] == ["refused", "accepted", "accepted"] and live.version == 2
    replayed = Aggregator(model32(), cfg, OPTIMIZERS["momentum"])
    replayed.load_state_dict(saved)
    assert [replayed.add(u) for u in items[3:]] == tail
    assert bits(replayed.state) == bits(live.state) and optimizer_bits(replayed) == optimizer_bits(live)
    assert replayed.counters == live.counters and replayed.counters["step_refused"] == 2
    assert replayed.add(items[2]).status == "duplicate" and replayed.add(items[3]).status == "duplicate"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_check_step_is_a_dry_run_that_agrees_with_the_step(name):
    gen = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(5, 4, generator=gen), "b": torch.randn(3, generator=gen)}
    opt = ServerOptimizer(params, OPTIMIZERS[name])
    for _ in range(3):
        delta = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        before = bits(params)
        state_before = opt.state_dict()
        assert opt.check_step(delta) is None
        assert bits(params) == before  # the dry run moved nothing...
        after_dry = opt.state_dict()
        assert state_before["torch"]["state"].keys() == after_dry["torch"]["state"].keys()
        for index, entry in state_before["torch"]["state"].items():  # ...and left the state as it was
            for key, value in entry.items():
                other = after_dry["torch"]["state"][index][key]
                assert (torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other)
        opt.step(delta)
    with pytest.raises(KeyError, match="no delta for parameter 'b'"):
        opt.check_step({"a": torch.zeros(5, 4)})
    assert opt.check_step({"a": torch.full((5, 4), float("inf")), "b": torch.zeros(3)})[0] in (
        "param_not_finite", "state_not_finite")


def test_a_flushed_partial_buffer_can_be_refused_too():
    agg = Aggregator(model32(), AggregatorConfig(buffer_size=5, **OFF), SGD1)
    agg.add(upd([3e38, 0.0], [0.0], task="a", n=2))  # weight 2: 6e38 overflows the buffer alone
    outcome = agg.aggregate()
    assert isinstance(outcome, RefusedStep) and outcome.task_ids == ("a",) and outcome.reason == "mean_not_finite"
    assert agg.version == 0 and agg.buffered == 0 and agg.counters["step_refused"] == 1
    with pytest.raises(RuntimeError, match="empty"):
        agg.aggregate()


@pytest.mark.parametrize("config", [ServerOptimizerConfig("sgd", lr=1.0), ServerOptimizerConfig("sgd", lr=3.0),
                                    ServerOptimizerConfig("momentum", lr=1.0, momentum=0.9),
                                    ServerOptimizerConfig("momentum", lr=2.0, momentum=0.5, nesterov=True)],
                         ids=["sgd", "sgd-lr3", "momentum", "nesterov"])
def test_the_magnitude_bounds_of_check_step_agree_with_the_dry_run(config):
    """`check_step`'s fast path (bounds on the largest magnitudes, carried from step to step) never says
    finite where the dry run says not: the same answers with the delta's L2 norm given and without,
    near float32's largest value and far from it, over several steps."""
    big = torch.finfo(torch.float32).max
    gen = torch.Generator().manual_seed(0)
    for scale_p, scale_d in [(1.0, 1e-3), (big / 4, big / 40), (big / 2, big / 30), (big * 0.9, big * 0.02),
                             (1.0, big / 80), (big / 16, big / 160)]:
        p = {"a": torch.rand(8, generator=gen) * scale_p, "b": -torch.rand(3, generator=gen) * scale_p}
        opt = ServerOptimizer({k: v.clone() for k, v in p.items()}, config)
        for _ in range(6):
            d = {"a": torch.rand(8, generator=gen) * scale_d, "b": -torch.rand(3, generator=gen) * scale_d}
            l2 = math.sqrt(sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in d.values()))
            fast, slow = opt.check_step(d, delta_l2=l2), opt.check_step(d)
            assert fast == slow, (scale_p, scale_d, fast, slow)
            if slow is not None:
                break
            opt.step(d, delta_l2=l2)
