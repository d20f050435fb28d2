"""Staleness weighting for buffered asynchronous aggregation (FedBuff / FedAsync).

An update trained from model version ``v_base`` that reaches the coordinator while it holds version
``v_now`` has staleness ``s = v_now - v_base`` (an int, ``s >= 0``; the aggregator rejects ``s < 0``
before any weighting happens). A staleness weighting maps ``s`` to a factor in ``(0, 1]`` that scales
the update's contribution to the buffer.

The choice is a plain dict from name to factory, ``STALENESS_WEIGHTINGS``. Every factory takes the
same two keyword parameters ``a`` and ``b`` (those it does not use are ignored) and returns a function
``int -> float``:

``constant``    ``1``                                          (FedAvg / no discounting)
``polynomial``  ``(1 + s) ** -a``                              (a >= 0; a = 0.5 is ``1/sqrt(1+s)``,
                                                                 the FedBuff paper's choice)
``hinge``       ``1 if s <= b else 1 / (a * (s - b) + 1)``     (a >= 0, b >= 0; FedAsync, Xie et al. 2019)

To add one: write ``def my_weighting(a: float, b: float) -> StalenessWeight`` and register it in
``STALENESS_WEIGHTINGS``. Factories must return values in ``(0, 1]`` for every ``s >= 0`` so that the
aggregator's normalisation (see docs/aggregation.md) never grows an update.
"""
from __future__ import annotations

import math
from typing import Callable

StalenessWeight = Callable[[int], float]


def _check_staleness(s: int) -> int:
    if isinstance(s, bool) or not isinstance(s, int):
        raise TypeError(f"staleness must be an int, got {type(s).__name__}")
    if s < 0:
        raise ValueError(f"staleness must be >= 0, got {s}")
    return s


def constant(a: float = 0.0, b: float = 0.0) -> StalenessWeight:
    """Weight 1 whatever the staleness (``a`` and ``b`` are ignored)."""

    def weight(s: int) -> float:
        _check_staleness(s)
        return 1.0

    return weight


def polynomial(a: float = 0.5, b: float = 0.0) -> StalenessWeight:
    """``(1 + s) ** -a``; ``b`` is ignored. ``a = 0`` is constant, ``a = 0.5`` is ``1/sqrt(1+s)``."""
    _check_param("a", a)

    def weight(s: int) -> float:
        return float((1.0 + _check_staleness(s)) ** (-a))

    return weight


def hinge(a: float = 10.0, b: float = 4.0) -> StalenessWeight:
    """``1`` while ``s <= b``, then ``1 / (a * (s - b) + 1)``: no penalty up to ``b``, then hyperbolic decay."""
    _check_param("a", a)
    _check_param("b", b)

    def weight(s: int) -> float:
        s = _check_staleness(s)
        if s <= b:
            return 1.0
        return 1.0 / (a * (s - b) + 1.0)

    return weight


def _check_param(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"staleness parameter {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"staleness parameter {name} must be finite and >= 0, got {value}")


STALENESS_WEIGHTINGS: dict[str, Callable[..., StalenessWeight]] = {
    "constant": constant,
    "polynomial": polynomial,
    "hinge": hinge,
}


def make_staleness_weight(name: str, a: float, b: float) -> StalenessWeight:
    """The weighting registered as ``name``, built with parameters ``a`` and ``b``.

    Raises ValueError naming the known weightings when ``name`` is not registered, and ValueError/TypeError
    when ``a`` or ``b`` is negative, non-finite or not a number.
    """
    try:
        factory = STALENESS_WEIGHTINGS[name]
    except KeyError:
        known = ", ".join(sorted(STALENESS_WEIGHTINGS))
        raise ValueError(f"unknown staleness weighting {name!r} (known: {known})") from None
    return factory(a=a, b=b)
