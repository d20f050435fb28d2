"""Staleness weightings against hand-computed values."""
from __future__ import annotations

import pytest

from coordinator.staleness import STALENESS_WEIGHTINGS, constant, hinge, make_staleness_weight, polynomial


def test_constant_weighting_is_one_for_every_staleness():
    w = constant()
    assert [w(s) for s in (0, 1, 7, 1000)] == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("a", "s", "expected"),
    [
        (0.5, 0, 1.0),       # (1+0)^-0.5
        (0.5, 3, 0.5),       # 1/sqrt(4)
        (0.5, 8, 1 / 3),     # 1/sqrt(9)
        (1.0, 4, 0.2),       # 1/5
        (2.0, 1, 0.25),      # 1/2^2
        (0.0, 50, 1.0),      # a = 0 is constant
    ],
)
def test_polynomial_weighting_is_one_plus_s_to_the_minus_a(a, s, expected):
    assert polynomial(a=a)(s) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("a", "b", "s", "expected"),
    [
        (10.0, 4.0, 0, 1.0),
        (10.0, 4.0, 4, 1.0),          # s <= b: no penalty
        (10.0, 4.0, 5, 1 / 11),       # 1/(10*1+1)
        (10.0, 4.0, 6, 1 / 21),       # 1/(10*2+1)
        (0.5, 2.0, 6, 1 / 3),         # 1/(0.5*4+1)
        (1.0, 0.0, 1, 0.5),           # 1/(1*1+1)
    ],
)
def test_hinge_weighting_is_flat_up_to_b_then_hyperbolic(a, b, s, expected):
    assert hinge(a=a, b=b)(s) == pytest.approx(expected, rel=1e-12)


def test_weightings_are_a_plain_name_to_factory_dict():
    assert set(STALENESS_WEIGHTINGS) == {"constant", "polynomial", "hinge"}
    assert make_staleness_weight("polynomial", 0.5, 0.0)(3) == pytest.approx(0.5)
    assert make_staleness_weight("hinge", 10.0, 4.0)(5) == pytest.approx(1 / 11)
    assert make_staleness_weight("constant", 3.0, 3.0)(9) == 1.0


@pytest.mark.parametrize("name", ["constant", "polynomial", "hinge"])
def test_every_weighting_stays_in_zero_one(name):
    w = make_staleness_weight(name, 2.0, 1.0)
    values = [w(s) for s in range(200)]
    assert all(0.0 < v <= 1.0 for v in values)
    assert values == sorted(values, reverse=True)  # never increases with staleness


def test_unknown_weighting_name_is_rejected_listing_known_ones():
    with pytest.raises(ValueError, match="unknown staleness weighting 'linear'.*constant, hinge, polynomial"):
        make_staleness_weight("linear", 1.0, 0.0)


@pytest.mark.parametrize(("a", "b"), [(-0.1, 0.0), (float("nan"), 0.0), (1.0, -1.0), (float("inf"), 0.0)])
def test_negative_or_non_finite_parameters_are_rejected(a, b):
    with pytest.raises(ValueError):
        hinge(a=a, b=b)


def test_negative_staleness_is_an_error_not_a_weight():
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        polynomial(0.5)(-1)
    with pytest.raises(TypeError):
        hinge()(1.5)
