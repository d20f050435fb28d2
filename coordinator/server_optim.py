"""Server optimizers: apply the aggregated client delta to the global model with ``torch.optim``.

Following FLSim (flsim/optimizers/async_aggregators.py), the server does no optimizer math itself. The
aggregated delta ``d`` (``trained - base``, the direction a client moved its copy of the model; see
coordinator/aggregator.py) is a *descent* direction, so it is the negation of a pseudo-gradient:

    param.grad = -d
    optimizer.step()          # a torch.optim optimizer with the server learning rate

With ``sgd`` this is ``param <- param + lr * d``: at ``lr = 1.0`` the global model becomes exactly the
(weighted) mean of the client models, i.e. FedAvg. ``momentum`` is ``torch.optim.SGD`` with momentum
(FedAvgM, Hsu et al. 2019) and ``fedadam`` is ``torch.optim.Adam`` (FedAdam, Reddi et al. 2021, "Adaptive
Federated Optimization"; torch's Adam also applies bias correction, which the paper's Algorithm 2 omits:
with it the first step moves every coordinate by ``lr * d / (|d| + eps)``, i.e. about ``lr``).

The optimizer updates the tensors it is given *in place* (under ``torch.no_grad``); they must be
floating-point leaf tensors. The choice is a plain dict from name to factory, ``SERVER_OPTIMIZERS``.
``check_step`` is a dry run of ``step``: the same torch code on a copy of one parameter and its state at a
time, to learn whether the step would leave anything non-finite before the real one changes anything.
"""
from __future__ import annotations

import copy as _copy
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from common.config import rule, validate
from common.errors import InvalidValue


def _sgd(params: list[torch.Tensor], cfg: ServerOptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.0)


def _momentum(params: list[torch.Tensor], cfg: ServerOptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _fedadam(params: list[torch.Tensor], cfg: ServerOptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


SERVER_OPTIMIZERS: dict[str, Callable[[list[torch.Tensor], ServerOptimizerConfig], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "momentum": _momentum,
    "fedadam": _fedadam,
}


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """How the server applies the aggregated delta.

    name: ``sgd`` | ``momentum`` | ``fedadam`` (see ``SERVER_OPTIMIZERS``).
    lr: the server learning rate (> 0). ``sgd`` with ``lr = 1.0`` is plain FedAvg/FedBuff.
    momentum: used by ``momentum`` only, in ``[0, 1)``.
    nesterov: Nesterov momentum, ``momentum`` only.
    beta1, beta2: Adam's decay rates, ``fedadam`` only, each in ``[0, 1)``.
    eps: Adam's denominator term (``tau`` in Reddi et al.), ``fedadam`` only, > 0. Reddi et al. tune it
        in ``[1e-7, 1e-1]``; larger values make the step less adaptive. Default ``1e-3`` after their
        recommendation.
    """

    name: str = rule("sgd", choices=tuple(SERVER_OPTIMIZERS))
    lr: float = rule(1.0, gt=0)
    momentum: float = rule(0.9, ge=0, lt=1)
    nesterov: bool = False
    beta1: float = rule(0.9, ge=0, lt=1)
    beta2: float = rule(0.99, ge=0, lt=1)
    eps: float = rule(1e-3, gt=0)

    def __post_init__(self) -> None:
        validate(self)
        if self.name == "momentum" and self.nesterov and self.momentum == 0:
            raise InvalidValue("ServerOptimizerConfig.nesterov needs momentum > 0")



class ServerOptimizer:
    """A ``torch.optim`` optimizer bound to the global model's floating-point tensors.

    params: name -> tensor, updated in place by ``step``. The names fix the order used in
        ``state_dict`` (torch's optimizer state is keyed by position), so a resumed server must be built
        with the same names; ``load_state_dict`` checks this.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], config: ServerOptimizerConfig) -> None:
        self.config = config
        self._names = list(params)
        self._params = [params[n] for n in self._names]
        for name, p in zip(self._names, self._params):
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                raise TypeError(f"server optimizer parameter {name!r} must be a floating-point tensor")
        if not self._params:
            raise ValueError("server optimizer needs at least one floating-point parameter")
        self._optimizer = SERVER_OPTIMIZERS[config.name](self._params, config)
        self._bounds: tuple[float, float] | None = None  # see _magnitudes

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def step(self, delta: Mapping[str, torch.Tensor], in_place: bool = False, delta_l2: float | None = None) -> None:
        """Move the parameters along ``delta`` (``trained - base`` direction) through the optimizer.

        delta: name -> tensor for every parameter name (same shapes; cast to each parameter's dtype and
            device). Raises KeyError naming a missing parameter, ValueError on a shape mismatch; nothing is
            changed in either case.
        in_place: use the delta tensors themselves as the (negated) gradients where dtype and device allow,
            instead of a model-sized copy; they hold ``delta`` again when this returns or raises.
        delta_l2: the delta's L2 norm, to carry the magnitude bounds of `check_step` (else they are
            measured again at the next check).
        """
        self._check_delta(delta)
        after = self._bounded_step(delta_l2) if delta_l2 is not None else None
        self._bounds = None  # unknown until the step is through
        borrowed = []
        for name, p in zip(self._names, self._params):
            d = delta[name].detach()
            if in_place and d.dtype == p.dtype and d.device == p.device:
                p.grad = d.neg_()
                borrowed.append(d)
            else:
                p.grad = d.to(device=p.device, dtype=p.dtype).neg()
        try:
            self._optimizer.step()
            self._bounds = after
        finally:
            for p in self._params:
                p.grad = None
            for d in borrowed:
                d.neg_()

    def check_step(self, delta: Mapping[str, torch.Tensor], delta_l2: float | None = None) -> tuple[str, str] | None:
        """Would ``step(delta)`` leave a non-finite parameter or optimizer state? Changes nothing.

        For ``sgd`` and ``momentum`` given `delta_l2` (the delta's L2 norm, which bounds its largest entry),
        bounds on the largest magnitudes settle it without touching the tensors (`_bounded_step`). Else a
        dry run: for one parameter at a time, a fresh optimizer of the same kind and settings steps a copy
        of it (and of its state) along its delta, by the same torch code as ``step``, and the results are
        checked. Returns None when all would be finite, else
        ``("param_not_finite" | "state_not_finite", detail)`` for the first that would not. Memory: one
        parameter, its state and its gradient at a time, never a model-sized copy. Raises like ``step`` on a
        missing name or a shape.
        """
        self._check_delta(delta)
        if delta_l2 is not None and self._bounded_step(delta_l2) is not None:
            return None
        hyper = {k: v for k, v in self._optimizer.param_groups[0].items() if k != "params"}
        for name, p in zip(self._names, self._params):
            scratch = p.detach().clone()
            dry = SERVER_OPTIMIZERS[self.config.name]([scratch], self.config)
            dry.param_groups[0].update(hyper)  # the settings in force (the learning rate, for one)
            state = self._optimizer.state.get(p)
            if state:
                dry.state[scratch] = {k: v.detach().clone() if isinstance(v, torch.Tensor) else _copy.deepcopy(v)
                                      for k, v in state.items()}
            scratch.grad = delta[name].detach().to(device=p.device, dtype=p.dtype).neg()
            dry.step()
            if not bool(torch.isfinite(scratch).all()):
                return "param_not_finite", f"parameter {name!r} would not be finite after the step"
            for key, value in dry.state[scratch].items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    return "state_not_finite", f"optimizer state {key!r} of {name!r} would not be finite after the step"
        return None

    def forget_magnitudes(self) -> None:
        """The parameters were changed from outside (loaded): `check_step` measures them again."""
        self._bounds = None

    def _magnitudes(self) -> tuple[float, float]:
        """(upper bounds on) the largest |parameter| and |momentum buffer| entry: exact after a pass over them
        when unknown, else carried from step to step (`step` with `delta_l2`)."""
        if self._bounds is None:
            def amax(t: torch.Tensor) -> float:
                return float(torch.linalg.vector_norm(t.detach(), ord=float("inf"))) if t.numel() else 0.0

            buffers = [self._optimizer.state.get(p, {}).get("momentum_buffer") for p in self._params]
            self._bounds = (max(map(amax, self._params)), max((amax(b) for b in buffers if b is not None), default=0.0))
        return self._bounds

    def _bounded_step(self, delta_l2: float) -> tuple[float, float] | None:
        """For ``sgd`` and ``momentum``: the magnitude bounds after a step along a delta of L2 norm
        `delta_l2` (which bounds its largest entry) when they stay below half the dtype's largest value, so
        that the step cannot overflow; else None ("not proven", never "would overflow")."""
        if self.config.name not in ("sgd", "momentum") or not math.isfinite(delta_l2):
            return None
        pm, bm = self._magnitudes()
        lr = self._optimizer.param_groups[0]["lr"]
        limit = min(torch.finfo(p.dtype).max for p in self._params) / 2
        if self.config.name == "sgd":
            moved, buffer = delta_l2, 0.0
        else:
            buffer = self.config.momentum * bm + delta_l2
            moved = delta_l2 + self.config.momentum * buffer if self.config.nesterov else buffer
        after = (pm + lr * moved, buffer)
        return after if all(math.isfinite(x) and x < limit for x in after) else None

    def _check_delta(self, delta: Mapping[str, torch.Tensor]) -> None:
        for name, p in zip(self._names, self._params):
            if name not in delta:
                raise KeyError(f"server step: no delta for parameter {name!r}")
            d = delta[name]
            if tuple(d.shape) != tuple(p.shape):
                raise ValueError(f"server step: delta {name!r} has shape {tuple(d.shape)}, expected {tuple(p.shape)}")

    def state_dict(self, copy: bool = True) -> dict:
        """The optimizer state: config name, names, torch state; a deep copy (safe to keep while stepping on)
        unless `copy` is False (the live tensors: valid until the next step)."""
        torch_state = self._optimizer.state_dict()
        return {"name": self.config.name, "names": list(self._names),
                "torch": _copy.deepcopy(torch_state) if copy else torch_state}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a ``state_dict``; raises ValueError if it was taken from another optimizer or parameter set.

        The learning rate and other hyper-parameters come from this object's config, not from the saved
        state, so a resumed run may change them deliberately.
        """
        if state.get("name") != self.config.name:
            raise ValueError(f"optimizer state is for {state.get('name')!r}, this server uses {self.config.name!r}")
        if list(state.get("names", [])) != self._names:
            raise ValueError("optimizer state was saved for a different set of parameters")
        torch_state = _copy.deepcopy(dict(state["torch"]))
        groups = []
        for saved, current in zip(torch_state["param_groups"], self._optimizer.state_dict()["param_groups"]):
            groups.append({**current, "params": saved["params"]})
        torch_state["param_groups"] = groups
        self._optimizer.load_state_dict(torch_state)
        self.forget_magnitudes()
