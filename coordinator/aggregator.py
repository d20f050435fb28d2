"""The FedBuff aggregator (Nguyen et al., AISTATS 2022) as pure code: values in, values out; no broker, no
disk, no clock.

Contract: a client update carries ``delta = trained - base``; ``add`` validates it (raising `UpdateRejected`
with a reason from ``REASONS``, counted), weights it by staleness and sample count, buffers it, and at K
updates hands the mean ``sum_i w_i delta_i / sum_i p_i`` to the server optimizer as ``grad = -mean``.
An update whose key was accepted already is a ``duplicate``, never applied twice; keys older than
``max_staleness`` are forgotten below a durable floor. Poisoning bounds: a sample count above what the task
asked for, or a norm above ``max_update_norm`` or the adaptive bound (``norm_bound_factor`` x the median
norm of recent accepted updates; before any, ``norm_bound_initial`` x the model's norm) is rejected; a step
whose mean delta, new parameters or new optimizer state would not be finite is refused (`RefusedStep`)
without changing the model or the optimizer. Reasoning: docs/aggregation.md.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol, Union

import torch

from common.compression.sparse import SparseTensor  # noqa: F401  (re-exported for the aggregator's callers)
from common.config import rule, validate
from common.errors import MqfedError
from common.logs import get_logger
from coordinator.server_optim import ServerOptimizer, ServerOptimizerConfig
from coordinator.staleness import STALENESS_WEIGHTINGS, make_staleness_weight

if TYPE_CHECKING:  # annotations only (postponed): typing.TypeIs is 3.13+
    from typing_extensions import TypeIs

log = get_logger(__name__)

#: Reason codes carried by UpdateRejected (and counted in Aggregator.counters["rejected"]).
REASONS = (
    "experiment",      # the update belongs to another experiment
    "future_version",  # base_version is newer than the server's version
    "stale",           # staleness above config.max_staleness
    "unknown_param",   # a name the model does not have
    "missing_param",   # a floating-point parameter of the model has no delta
    "not_float",       # a delta for a non-floating-point model entry (those never aggregate)
    "shape",           # shape differs from the parameter's (sparse: bad indices/values layout too)
    "dtype",           # dtype differs from the parameter's (sparse: indices not int64)
    "index",           # a sparse index outside [0, numel)
    "nan",             # a NaN or infinite value
    "norm",            # L2 norm of the whole update above max_update_norm or the adaptive bound
    "num_samples",     # num_samples < 1, or above the max_samples the task allowed
)


#: ``AggregatorConfig.norm_bound_initial``'s default: the first updates of a run (before any accepted norm
#: exists) may move the model by at most this times its own L2 norm. Measured on real local training (the
#: default task, 40 AdamW steps at 2e-3): ||delta|| / ||model|| = 0.12-0.20 for kws-tiny (0.37-0.38 at 160
#: steps), 0.45 for wav2vec2-base; 10 leaves a margin of over 20x (docs/aggregation.md, "Poisoning bounds").
NORM_BOUND_INITIAL = 10.0


class UpdateRejected(MqfedError, ValueError):
    """An update failed validation and was not buffered. ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class SparseLike(Protocol):
    """Anything shaped like ``common.compression.sparse.SparseTensor`` (a codec's own sparse type qualifies)."""

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]


DeltaValue = Union[torch.Tensor, SparseLike]


def _is_sparse(x: object) -> TypeIs[SparseLike]:
    return not isinstance(x, torch.Tensor) and all(hasattr(x, a) for a in ("indices", "values", "shape"))


@dataclass(frozen=True)
class UpdateKey:
    """What makes an update unique: redeliveries of the same update carry the same key."""

    experiment: str
    task_id: str
    worker_id: str
    base_version: int


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution: ``delta[name] = trained[name] - base[name]`` for every float parameter.

    num_samples: how many training examples the client used (the sample weight ``n_i``), as it says.
    max_samples: the most the task could have used (the caller computes it from the task's local settings);
        an update claiming more is rejected (``num_samples``). None: not checked.
    """

    experiment: str
    task_id: str
    worker_id: str
    base_version: int
    num_samples: int
    delta: Mapping[str, DeltaValue]
    max_samples: int | None = None

    @property
    def key(self) -> UpdateKey:
        return UpdateKey(self.experiment, self.task_id, self.worker_id, self.base_version)


class AppliedKeys:
    """The set of update keys already accepted, for at-most-once application under redelivery.

    ``prune(below)`` forgets keys whose base version is below ``below``: with a finite ``max_staleness``
    such updates are rejected as stale anyway, so the set stays bounded.
    """

    def __init__(self, keys: Iterable[UpdateKey] = ()) -> None:
        self._keys: set[UpdateKey] = set(keys)
        #: Keys with a base version below this were forgotten (`prune`): whether such an update was applied
        #: is no longer known, so none is ever applied again, whatever the config of a resumed run says.
        self.floor = 0

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: UpdateKey) -> bool:
        """Record ``key``; returns False if it was already there."""
        if key in self._keys:
            return False
        self._keys.add(key)
        return True

    def prune(self, below_version: int) -> int:
        """Forget keys with ``base_version < below_version``; returns how many were dropped."""
        old = {k for k in self._keys if k.base_version < below_version}
        self._keys -= old
        self.floor = max(self.floor, below_version)
        return len(old)

    def state_dict(self) -> dict:
        """``{"keys": sorted [experiment, task_id, worker_id, base_version] lists, "floor": int}``."""
        return {"keys": sorted([k.experiment, k.task_id, k.worker_id, k.base_version] for k in self._keys),
                "floor": self.floor}

    def load_state_dict(self, state: Mapping | Iterable[Iterable]) -> None:
        """Restore a ``state_dict`` (or the bare key list of format 1, whose floor was not kept)."""
        keys = state["keys"] if isinstance(state, Mapping) else state
        self.floor = int(state["floor"]) if isinstance(state, Mapping) else 0
        self._keys = {UpdateKey(str(e), str(t), str(w), int(v)) for e, t, w, v in keys}


@dataclass(frozen=True)
class AggregatorConfig:
    """FedBuff settings, validated once at construction (errors name the field).

    buffer_size: K, accepted updates per server step (>= 1).
    max_staleness: updates with ``s > max_staleness`` are dropped and counted (>= 0); None = no limit.
    staleness: staleness weighting name (``coordinator.staleness.STALENESS_WEIGHTINGS``).
    staleness_a, staleness_b: the weighting's parameters (>= 0); polynomial uses ``a``, hinge ``a`` and ``b``.
    sample_weighting: weight each update by its ``num_samples``.
    max_update_norm: reject updates whose global L2 norm exceeds this (> 0); None = no bound.
    norm_bound_factor: the adaptive bound: reject an update whose global L2 norm exceeds this factor times
        the median norm of the last ``norm_bound_window`` accepted updates (> 0); None = off.
    norm_bound_window: how many accepted updates' norms that median is taken over (>= 1).
    norm_bound_initial: while no accepted norm is known (the first updates of a run), the adaptive bound is
        this factor times the L2 norm of the model's floating-point state (> 0); None = no bound then.
        Measured ratios ||delta|| / ||model|| and the choice: docs/aggregation.md, "Poisoning bounds".
    experiment: if set, updates for another experiment are rejected (reason ``experiment``).
    """

    buffer_size: int = rule(2, ge=1)
    max_staleness: int | None = rule(10, ge=0)
    staleness: str = rule("polynomial", choices=tuple(sorted(STALENESS_WEIGHTINGS)))
    staleness_a: float = rule(0.5, ge=0)
    staleness_b: float = rule(0.0, ge=0)
    sample_weighting: bool = True
    max_update_norm: float | None = rule(None, gt=0)
    norm_bound_factor: float | None = rule(10.0, gt=0)
    norm_bound_window: int = rule(50, ge=1)
    norm_bound_initial: float | None = rule(NORM_BOUND_INITIAL, gt=0)
    experiment: str | None = None

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def synchronous(cls, concurrency: int, **overrides) -> "AggregatorConfig":
        """Synchronous FedAvg on the same machinery: K = concurrency, no staleness, constant weighting."""
        settings: dict[str, Any] = dict(buffer_size=concurrency, max_staleness=0, staleness="constant", sample_weighting=True)
        settings.update(overrides)
        return cls(**settings)


@dataclass(frozen=True)
class AggregationRecord:
    """What one server step applied.

    version: the new global version (after the step).
    staleness, worker_ids, task_ids, num_samples, weights: per applied update, in arrival order;
        ``weights[i] = staleness_weight(staleness[i]) * (num_samples[i] if sample weighting else 1)``.
    normalizer: ``sum_i (num_samples[i] if sample weighting else 1)``; the applied delta is
        ``sum_i weights[i] * delta_i / normalizer``.
    delta_norm: L2 norm of that applied (mean) delta.
    """

    version: int
    staleness: tuple[int, ...]
    worker_ids: tuple[str, ...]
    task_ids: tuple[str, ...]
    num_samples: tuple[int, ...]
    weights: tuple[float, ...]
    normalizer: float
    delta_norm: float


@dataclass(frozen=True)
class RefusedStep:
    """A server step that was not taken: its mean delta, a new parameter or the optimizer's new state would
    not have been finite. The model, the optimizer state and the version stay as they were; the buffer was
    emptied and its updates' keys stay accepted (a redelivery is a duplicate, never applied).

    version: the global version, unchanged (the step would have made ``version + 1``).
    staleness, worker_ids, task_ids, num_samples: per refused update, in arrival order.
    reason: ``mean_not_finite`` | ``param_not_finite`` | ``state_not_finite``; detail: which tensor.
    """

    version: int
    staleness: tuple[int, ...]
    worker_ids: tuple[str, ...]
    task_ids: tuple[str, ...]
    num_samples: tuple[int, ...]
    reason: str
    detail: str


@dataclass(frozen=True)
class AddResult:
    """Outcome of ``Aggregator.add``: status ``accepted``, ``duplicate`` or ``refused``.

    accepted: buffered; ``record`` is set when this update completed the buffer and the step was taken.
    refused: accepted, and it completed the buffer, but the step was refused (``refused`` says why): nothing
        was applied, the buffer is empty, the update's key stays accepted.
    """

    status: str
    staleness: int | None = None
    weight: float | None = None
    record: AggregationRecord | None = None
    refused: RefusedStep | None = None


@dataclass
class _Contribution:
    key: UpdateKey
    staleness: int
    num_samples: int
    weight: float
    share: float
    norm: float = 0.0  # its L2 norm; > 0 when it entered the norm history


def _sq_norm(t: torch.Tensor) -> float:
    """Squared L2 norm, accumulated in float64."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2


def _per_update(contributions) -> dict[str, tuple]:
    """The per-update columns an AggregationRecord and a RefusedStep share, in arrival order."""
    return {"staleness": tuple(c.staleness for c in contributions),
            "worker_ids": tuple(c.key.worker_id for c in contributions),
            "task_ids": tuple(c.key.task_id for c in contributions),
            "num_samples": tuple(c.num_samples for c in contributions)}


def _enters_history(norm: float) -> bool:
    """Whether an accepted update's norm enters the norm history: a zero norm would pull the median (and the
    bound) to 0, and no honest update has an infinite one."""
    return 0.0 < norm < math.inf


def _new_counters() -> dict:
    return {"accepted": 0, "duplicates": 0, "applied_updates": 0, "steps": 0, "step_refused": 0, "rejected": {}}


class Aggregator:
    """The FedBuff buffer in front of a server optimizer.

    global_state: the model's state (name -> tensor). Floating-point entries are the parameters the
        server updates, in place; the aggregator keeps references, so the caller sees every step. Other
        entries are left unchanged.
    config, optimizer: see AggregatorConfig, ServerOptimizerConfig.
    version: the version ``global_state`` has (0 for a fresh model).
    """

    def __init__(
        self,
        global_state: Mapping[str, torch.Tensor],
        config: AggregatorConfig | None = None,
        optimizer: ServerOptimizerConfig | None = None,
        version: int = 0,
    ) -> None:
        self.config = config or AggregatorConfig()
        self.state = dict(global_state)
        self.params = {n: t for n, t in self.state.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
        self.optimizer = ServerOptimizer(self.params, optimizer or ServerOptimizerConfig())
        self.version = int(version)
        self.applied_keys = AppliedKeys()
        self.counters = _new_counters()
        self._weight_fn = make_staleness_weight(self.config.staleness, self.config.staleness_a, self.config.staleness_b)
        self._buffer: dict[str, torch.Tensor] | None = None
        self._contributions: list[_Contribution] = []
        #: L2 norms of the last ``norm_bound_window`` accepted updates (those of a refused step taken out
        #: again), oldest first: the adaptive bound's median. Checkpointed, so a replay decides the same.
        self._norms: deque[float] = deque(maxlen=self.config.norm_bound_window)

    # -- public API ---------------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """How many accepted updates wait in the buffer."""
        return len(self._contributions)

    @property
    def norm_history(self) -> list[float]:
        """The accepted update norms the adaptive bound takes its median of, oldest first (a copy)."""
        return list(self._norms)

    def staleness_weight(self, staleness: int) -> float:
        return self._weight_fn(staleness)

    def model_norm(self) -> float:
        """L2 norm of the model's floating-point state (float64 accumulation)."""
        return math.sqrt(sum(_sq_norm(p) for p in self.params.values()))

    def norm_bound(self) -> tuple[float, str] | None:
        """The adaptive bound the next update's L2 norm must not exceed, and how it was reached; None when
        there is none: ``norm_bound_factor`` is None, or no norm is accepted yet and ``norm_bound_initial``
        is None or the model's norm is 0. (``max_update_norm`` applies besides, on its own.)"""
        cfg = self.config
        if cfg.norm_bound_factor is None:
            return None
        if self._norms:
            median = statistics.median(self._norms)
            return (cfg.norm_bound_factor * median,
                    f"{cfg.norm_bound_factor:g} x the median {median:.6g} of the last {len(self._norms)}"
                    " accepted update norms")
        if cfg.norm_bound_initial is None:
            return None
        model_norm = self.model_norm()
        if not model_norm > 0:
            return None
        return (cfg.norm_bound_initial * model_norm,
                f"{cfg.norm_bound_initial:g} x the model's L2 norm {model_norm:.6g} (no accepted update norm yet)")

    def validate(self, update: ClientUpdate) -> int:
        """Check ``update`` against the model and config without changing anything; returns its staleness.

        Raises UpdateRejected (not counted here; ``add`` counts) for the first problem found.
        """
        return self._validate(update)[0]

    def _validate(self, update: ClientUpdate) -> tuple[int, float]:
        """`validate`, returning (staleness, the update's global L2 norm)."""
        cfg = self.config
        if cfg.experiment is not None and update.experiment != cfg.experiment:
            raise UpdateRejected("experiment", f"update is for {update.experiment!r}, not {cfg.experiment!r}")
        if isinstance(update.num_samples, bool) or not isinstance(update.num_samples, int) or update.num_samples < 1:
            raise UpdateRejected("num_samples", f"num_samples must be an int >= 1, got {update.num_samples!r}")
        if update.max_samples is not None and update.num_samples > update.max_samples:
            raise UpdateRejected("num_samples", f"update claims {update.num_samples} samples, the task asked for"
                                                f" at most {update.max_samples}")
        staleness = self.version - update.base_version
        if staleness < 0:
            raise UpdateRejected(
                "future_version", f"base_version {update.base_version} is newer than server version {self.version}"
            )
        if cfg.max_staleness is not None and staleness > cfg.max_staleness:
            raise UpdateRejected("stale", f"staleness {staleness} > max_staleness {cfg.max_staleness}")
        delta = update.delta
        for name in delta:
            if name not in self.state:
                raise UpdateRejected("unknown_param", f"{name!r} is not a parameter of the model")
            if name not in self.params:
                raise UpdateRejected("not_float", f"{name!r} is not a floating-point parameter; it never aggregates")
        missing = [n for n in self.params if n not in delta]
        if missing:
            raise UpdateRejected("missing_param", f"no delta for {len(missing)} parameter(s), first {missing[0]!r}")
        sq_norm = 0.0
        for name, value in delta.items():
            sq_norm += self._check_tensor(name, value, self.params[name])
        norm = math.sqrt(sq_norm)
        if cfg.max_update_norm is not None and not norm <= cfg.max_update_norm:
            raise UpdateRejected("norm", f"update L2 norm {norm:.6g} > max_update_norm {cfg.max_update_norm:.6g}")
        bound = self.norm_bound()
        if bound is not None and not norm <= bound[0]:
            raise UpdateRejected("norm", f"update L2 norm {norm:.6g} > {bound[0]:.6g} = {bound[1]}")
        return staleness, norm

    def add(self, update: ClientUpdate) -> AddResult:
        """Validate and buffer ``update``; take a server step when the buffer holds K updates.

        Returns ``AddResult("duplicate")`` if the update's key was already accepted (counted, not applied),
        otherwise ``AddResult("accepted", staleness, weight, record)`` with ``record`` set when this update
        completed the buffer and the step was taken, or ``AddResult("refused", staleness, weight,
        refused=RefusedStep)`` when it completed the buffer but the step was refused (see `aggregate`).
        Raises UpdateRejected (counted) when validation fails; the buffer is untouched then.
        """
        key = update.key
        if self.seen(key):
            return AddResult("duplicate")
        try:
            if key.base_version < self.applied_keys.floor:
                raise UpdateRejected("stale", f"base_version {key.base_version} is below {self.applied_keys.floor},"
                                              " the oldest version whose applied updates are remembered")
            staleness, norm = self._validate(update)
        except UpdateRejected as exc:
            rejected = self.counters["rejected"]
            rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
            log.warning("update_rejected", reason=exc.reason, detail=exc.message, **asdict(key))
            raise
        share = float(update.num_samples) if self.config.sample_weighting else 1.0
        weight = self._weight_fn(staleness) * share
        self._accumulate(update.delta, weight)
        self.applied_keys.add(key)
        if _enters_history(norm):
            self._norms.append(norm)
        self._contributions.append(_Contribution(key, staleness, update.num_samples, weight, share, norm))
        self.counters["accepted"] += 1
        log.debug("update_buffered", staleness=staleness, weight=weight, norm=norm, buffered=self.buffered,
                  **asdict(key))
        if self.buffered < self.config.buffer_size:
            return AddResult("accepted", staleness=staleness, weight=weight)
        outcome = self.aggregate()
        if isinstance(outcome, RefusedStep):
            return AddResult("refused", staleness=staleness, weight=weight, refused=outcome)
        return AddResult("accepted", staleness=staleness, weight=weight, record=outcome)

    def release_buffer(self) -> bool:
        """Free the accumulation buffer (a model-sized tensor per parameter) when it holds nothing; the next
        ``add`` allocates it again. Returns whether it was freed."""
        if self._contributions:
            return False
        self._buffer = None
        return True

    def seen(self, key: UpdateKey) -> bool:
        """Was the update with ``key`` accepted already? (counted and logged as a duplicate when it was)"""
        if key not in self.applied_keys:
            return False
        self.counters["duplicates"] += 1
        log.info("update_duplicate", **asdict(key))
        return True

    def aggregate(self) -> AggregationRecord | RefusedStep:
        """Apply the buffered weighted mean through the server optimizer now, bump the version, clear the buffer.

        Before anything is applied, the mean delta, every parameter the optimizer would produce and its new
        state are checked finite (a dry run, one tensor at a time: `ServerOptimizer.check_step`). If one is
        not, the step is refused: the model, the optimizer state and the version stay exactly as they were,
        the buffer is emptied (its updates' keys stay accepted, their norms leave the norm history), its
        updates are counted in ``counters["step_refused"]``, and a `RefusedStep` is returned instead of the
        `AggregationRecord`.

        ``add`` calls this when K updates are buffered; call it directly to flush a partial buffer (for
        example at the end of an experiment). Raises RuntimeError when the buffer is empty; when the server
        optimizer raises, the buffer is left as it was (up to rounding) for a retry.
        """
        if not self._contributions or self._buffer is None:
            raise RuntimeError("aggregate: the buffer is empty")
        normalizer = sum(c.share for c in self._contributions)
        # Divide in place: the buffer is cleared right after, and a model-sized copy is saved.
        mean = self._buffer
        for b in mean.values():
            b.div_(normalizer)
        delta_norm = math.sqrt(sum(_sq_norm(t) for t in mean.values()))
        try:
            problem = self._check_step(mean, delta_norm)
            if problem is None:  # the buffer is the gradient: no model-sized copy
                self.optimizer.step(mean, in_place=True, delta_l2=delta_norm)
        except Exception:
            for b in mean.values():  # leave the buffer as it was (up to rounding) for a retry
                b.mul_(normalizer)
            raise
        if problem is not None:
            return self._refuse(*problem)
        self.version += 1
        contributions = self._contributions
        record = AggregationRecord(
            version=self.version,
            **_per_update(contributions),
            weights=tuple(c.weight for c in contributions),
            normalizer=normalizer,
            delta_norm=delta_norm,
        )
        self._contributions = []
        for b in self._buffer.values():
            b.zero_()
        self.counters["steps"] += 1
        self.counters["applied_updates"] += len(contributions)
        if self.config.max_staleness is not None:
            self.applied_keys.prune(self.version - self.config.max_staleness)
        log.info(
            "server_step",
            version=self.version,
            updates=len(contributions),
            staleness=list(record.staleness),
            delta_norm=delta_norm,
        )
        return record

    def state_dict(self, include_model: bool = True, clone: bool = True) -> dict:
        """Everything needed to resume exactly: version, buffer, counters, applied keys, norm history, optimizer
        state.

        include_model: also copy the global state (leave it out when the checkpoint stores the model
            elsewhere and the resumed Aggregator is built from that copy).
        clone: copy the tensors (model, buffer, optimizer state). False hands out the live tensors, with no
            memory spent: valid only until the next ``add`` or ``aggregate`` changes them.
        """
        state = {
            "format": 1,
            "config": asdict(self.config),
            "version": self.version,
            "counters": {**self.counters, "rejected": dict(self.counters["rejected"])},
            "applied_keys": self.applied_keys.state_dict(),
            "norm_history": list(self._norms),
            "contributions": [
                [c.key.experiment, c.key.task_id, c.key.worker_id, c.key.base_version, c.staleness, c.num_samples, c.weight, c.share,
                 c.norm]
                for c in self._contributions
            ],
            "buffer": (
                {n: b.detach().clone() if clone else b.detach() for n, b in self._buffer.items()}
                if self._contributions and self._buffer is not None
                else {}
            ),
            "optimizer": self.optimizer.state_dict(copy=clone),
        }
        if include_model:
            state["model"] = {n: t.detach().clone() if clone else t.detach() for n, t in self.state.items()}
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a ``state_dict``. The model entries (if saved) are copied into the existing tensors in place.
        The norm history keeps its newest ``norm_bound_window`` entries (this object's config).

        The config is this object's own (a resumed run may change K or the weighting); the saved config is
        kept in the state only for inspection. Raises ValueError when names or shapes do not match.
        """
        if state.get("format") != 1:
            raise ValueError(f"unsupported aggregator state format {state.get('format')!r}")
        model = state.get("model")
        if model is not None:
            if set(model) != set(self.state):
                raise ValueError("aggregator state: saved model has different entries")
            for name, saved in model.items():
                if tuple(saved.shape) != tuple(self.state[name].shape):
                    raise ValueError(f"aggregator state: {name!r} shape {tuple(saved.shape)} differs from the model's")
        buffer = state.get("buffer") or {}
        if buffer and set(buffer) != set(self.params):
            raise ValueError("aggregator state: buffer names differ from the model's float parameters")
        self.optimizer.load_state_dict(state["optimizer"])
        if model is not None:
            with torch.no_grad():
                for name, saved in model.items():
                    self.state[name].copy_(saved)
            self.optimizer.forget_magnitudes()
        self.version = int(state["version"])
        counters = state["counters"]
        self.counters = {**_new_counters(), **counters, "rejected": dict(counters.get("rejected", {}))}
        self.applied_keys.load_state_dict(state["applied_keys"])
        # A state saved before the norm history existed has none (and 8-field contributions): the bound
        # starts over from the model's norm, as on a fresh run.
        self._norms = deque((float(x) for x in state.get("norm_history", ())), maxlen=self.config.norm_bound_window)
        self._contributions = [
            _Contribution(UpdateKey(str(row[0]), str(row[1]), str(row[2]), int(row[3])), int(row[4]), int(row[5]),
                          float(row[6]), float(row[7]), float(row[8]) if len(row) > 8 else 0.0)
            for row in state["contributions"]
        ]
        if buffer:
            target = self._ensure_buffer()
            for name, saved in buffer.items():
                target[name].copy_(saved)
        elif self._buffer is not None:
            for b in self._buffer.values():
                b.zero_()

    # -- internals ----------------------------------------------------------------------------------------

    def _check_step(self, mean: Mapping[str, torch.Tensor], norm: float) -> tuple[str, str] | None:
        """(reason, detail) when the step along ``mean`` (L2 norm ``norm``, accumulated in float64, so finite
        exactly when every entry is) must be refused, else None. Changes nothing."""
        if not math.isfinite(norm):
            name = next(n for n, b in mean.items() if not bool(torch.isfinite(b).all()))
            return "mean_not_finite", f"the mean delta of {name!r} is not finite"
        return self.optimizer.check_step(mean, delta_l2=norm)

    def _refuse(self, reason: str, detail: str) -> RefusedStep:
        """Empty the buffer without applying it (see `aggregate`)."""
        contributions = self._contributions
        refused = RefusedStep(
            version=self.version,
            **_per_update(contributions),
            reason=reason,
            detail=detail,
        )
        self._contributions = []
        if self._buffer is not None:
            for b in self._buffer.values():
                b.zero_()
        # The buffered updates were the last ones accepted, so their norms are the newest in the history
        # (unless the window was smaller than the buffer): take them out, the bound never learns from them.
        for _ in range(min(sum(_enters_history(c.norm) for c in contributions), len(self._norms))):
            self._norms.pop()
        self.counters["step_refused"] += len(contributions)
        log.warning("step_refused", version=self.version, updates=len(contributions), reason=reason, detail=detail,
                    workers=list(refused.worker_ids), tasks=list(refused.task_ids))
        return refused

    @staticmethod
    def _check_tensor(name: str, value: object, param: torch.Tensor) -> float:
        """Validate one delta entry; returns its squared L2 norm (float64 accumulation)."""
        if _is_sparse(value):
            indices, values, shape = value.indices, value.values, tuple(value.shape)
            if not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor):
                raise UpdateRejected("shape", f"{name!r}: sparse indices and values must be tensors")
            if shape != tuple(param.shape):
                raise UpdateRejected("shape", f"{name!r}: sparse shape {shape}, expected {tuple(param.shape)}")
            if indices.dtype != torch.int64:
                raise UpdateRejected("dtype", f"{name!r}: sparse indices are {indices.dtype}, expected torch.int64")
            if values.dtype != param.dtype:
                raise UpdateRejected("dtype", f"{name!r}: values are {values.dtype}, expected {param.dtype}")
            if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
                raise UpdateRejected("shape", f"{name!r}: sparse indices and values must be 1-D of equal length")
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= param.numel()):
                raise UpdateRejected("index", f"{name!r}: sparse index outside [0, {param.numel()})")
            if not bool(torch.isfinite(values).all()):
                raise UpdateRejected("nan", f"{name!r}: non-finite values")
            if indices.numel() == 0:
                return 0.0
            # Repeated indices sum, so the norm is that of the coalesced vector (O(nnz), no dense copy).
            unique, inverse = torch.unique(indices, return_inverse=True)
            coalesced = torch.zeros(unique.numel(), dtype=torch.float64, device=values.device)
            coalesced.index_add_(0, inverse, values.double())
            return _sq_norm(coalesced)
        if not isinstance(value, torch.Tensor):
            raise UpdateRejected("dtype", f"{name!r}: expected a tensor or SparseTensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(param.shape):
            raise UpdateRejected("shape", f"{name!r}: shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        if value.dtype != param.dtype:
            raise UpdateRejected("dtype", f"{name!r}: dtype {value.dtype}, expected {param.dtype}")
        if not bool(torch.isfinite(value).all()):
            raise UpdateRejected("nan", f"{name!r}: non-finite values")
        return _sq_norm(value)

    def _ensure_buffer(self) -> dict[str, torch.Tensor]:
        if self._buffer is None:
            # Accumulate in at least float32 so fp16/bf16 parameters do not lose the sum.
            self._buffer = {
                n: torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)
                for n, p in self.params.items()
            }
        return self._buffer

    def _accumulate(self, delta: Mapping[str, DeltaValue], weight: float) -> None:
        buffer = self._ensure_buffer()
        with torch.no_grad():
            for name, value in delta.items():
                buf = buffer[name]
                if _is_sparse(value):
                    values = value.values.to(device=buf.device, dtype=buf.dtype)
                    indices = value.indices.to(buf.device)
                    buf.view(-1).index_add_(0, indices, values, alpha=weight)
                else:
                    buf.add_(value.to(device=buf.device, dtype=buf.dtype), alpha=weight)
