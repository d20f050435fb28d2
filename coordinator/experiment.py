"""The experiment configuration: one TOML file, every key overridable by `MQFED_<SECTION>_<KEY>`.

Sections (all optional; defaults are the CPU demo's):

```toml
[experiment]          # name, seed, where the run directory goes
[model]               # common.learning.model.ModelSpec: preset / hub id / local path, freeze_feature_encoder
[data]                # the held-out sets the coordinator evaluates on (validation, test, unseen speakers)
[fedbuff]             # coordinator.aggregator.AggregatorConfig + mode and concurrency
[server_optimizer]    # coordinator.server_optim.ServerOptimizerConfig
[local]               # the local work each train task asks for (common.learning.training.TrainConfig fields)
[tasks]               # deadlines, evaluation cadence, codec
[stop]                # when the experiment ends
[metrics]             # common.metrics.MetricsSection: the coordinator's Prometheus endpoint (port 0: off)
```
Loaded with `common.config.load_config(ExperimentConfig, path)`; see docs/configuration.md for every key.
"""
from __future__ import annotations

import dataclasses
import re

from broker.topology import DEFAULT_MODEL_RETENTION_BYTES
from common.compression.codecs import DEFAULT_CODEC, parse_codec
from common.config import load_config, parse_overrides, rule, validate
from common.errors import InvalidValue
from common.learning.config import SCHEDULES
from common.learning.model import ModelSpec
from common.learning.training import TrainConfig
from common.metrics import MetricsSection
from common.wire.tensors import WIRE_FLOAT_DTYPES
from coordinator.aggregator import AggregatorConfig
from coordinator.dispatch import MODES
from coordinator.server_optim import ServerOptimizerConfig

_NAME_OK = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SPLIT_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")  # a `datasets` split name
_FEDBUFF = AggregatorConfig()  # the one source of the aggregator settings' defaults


@dataclasses.dataclass(frozen=True)
class ExperimentSection:
    """name: experiment name (queue prefix `mqfed.<name>.*`). run_dir: checkpoint, record, export
    (default `runs/<name>`). model_retention_bytes: how much of the model stream the broker keeps (old
    versions age out; a worker that wants one trains from the newest instead)."""

    name: str = "kws"
    run_dir: str = ""
    model_retention_bytes: int = rule(DEFAULT_MODEL_RETENTION_BYTES, gt=0)

    def __post_init__(self) -> None:
        validate(self, "experiment")
        if not _NAME_OK.match(self.name):
            raise InvalidValue(f"experiment.name {self.name!r} must match {_NAME_OK.pattern}")

    @property
    def run_path(self) -> str:
        return self.run_dir or f"runs/{self.name}"


@dataclasses.dataclass(frozen=True)
class DataSection:
    """path: a KS data set directory (`mqfed-worker data ...`). The coordinator tracks progress, picks the
    best model and checks `stop.target_accuracy` on `eval_split` (at most `eval_max_clips` clips of it,
    0: all), and reports the exported best model's accuracy on `test_split` at the end, and on
    `unseen_split` too (`unseen_accuracy`: speakers that share nothing with training) when the data set has
    that split (older corpora do not: then it is skipped with a log line; "" never evaluates it)."""

    path: str = ".cache/mqfed/synth-ks"
    eval_split: str = rule("validation", choices=("train", "validation", "test"))
    eval_max_clips: int = rule(0, ge=0)
    test_split: str = rule("test", choices=("train", "validation", "test"))
    unseen_split: str = "test_unseen"

    def __post_init__(self) -> None:
        validate(self, "data")
        if self.unseen_split and not _SPLIT_OK.match(self.unseen_split):
            raise InvalidValue(f"data.unseen_split {self.unseen_split!r} must match {_SPLIT_OK.pattern} (or be \"\")")


@dataclasses.dataclass(frozen=True)
class FedBuffSection:
    """mode: `async` (FedBuff) or `sync` (FedAvg rounds: K = concurrency, max_staleness = 0, constant
    staleness weight). concurrency: train tasks outstanding. The rest is AggregatorConfig's (its defaults
    and rules); in sync mode buffer_size, max_staleness and staleness are set by the mode."""

    mode: str = rule("async", choices=MODES)
    concurrency: int = rule(4, ge=1)
    buffer_size: int = _FEDBUFF.buffer_size
    max_staleness: int | None = _FEDBUFF.max_staleness
    staleness: str = _FEDBUFF.staleness
    staleness_a: float = _FEDBUFF.staleness_a
    staleness_b: float = _FEDBUFF.staleness_b
    sample_weighting: bool = _FEDBUFF.sample_weighting
    max_update_norm: float | None = _FEDBUFF.max_update_norm
    norm_bound_factor: float | None = _FEDBUFF.norm_bound_factor
    norm_bound_window: int = _FEDBUFF.norm_bound_window
    norm_bound_initial: float | None = _FEDBUFF.norm_bound_initial

    def __post_init__(self) -> None:
        validate(self, "fedbuff")
        self.aggregator_config()  # validates the rest, naming the field

    def aggregator_config(self, experiment: str | None = None) -> AggregatorConfig:
        if self.mode == "sync":
            return AggregatorConfig.synchronous(
                self.concurrency, sample_weighting=self.sample_weighting, max_update_norm=self.max_update_norm,
                norm_bound_factor=self.norm_bound_factor, norm_bound_window=self.norm_bound_window,
                norm_bound_initial=self.norm_bound_initial, experiment=experiment)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(AggregatorConfig) if hasattr(self, f.name)}
        return AggregatorConfig(**{**fields, "experiment": experiment})


@dataclasses.dataclass(frozen=True)
class TasksSection:
    """deadline_s: a train task not answered by then is re-issued. eval_every: central evaluation every
    that many versions (0: only at the end). federated_eval_every: evaluate tasks on the workers' local
    validation shards every that many versions (0: never). codec: update compression
    (common/compression/codecs.py). transfer_timeout_s: a chunked update that makes no progress for this
    long is dead-lettered (its worker died mid-upload; the task comes back through the queue).
    model_dtype: the precision model versions travel in to workers and the evaluator (the coordinator keeps
    float32; a tensor the dtype cannot hold travels as float32). version_lag: a worker may train from a
    cached version up to this many versions older than the newest at issue instead of downloading the
    newest (async mode). docs/federation.md, Downlink. lr_decay, lr_decay_versions, lr_floor: each train
    task's `local.learning_rate` times `decay_factor(lr_decay, version at issue, lr_decay_versions, lr_floor)`
    (common/learning/config.py): `constant` (the default) leaves it as configured; `cosine` or `linear`
    falls to `lr_floor` of it at version `lr_decay_versions` and stays there (docs/federation.md)."""

    deadline_s: float = rule(600.0, gt=0)
    eval_every: int = rule(1, ge=0)
    federated_eval_every: int = rule(0, ge=0)
    codec: str = DEFAULT_CODEC
    transfer_timeout_s: float = rule(120.0, gt=0)
    model_dtype: str = rule("float16", choices=WIRE_FLOAT_DTYPES)
    version_lag: int = rule(0, ge=0)
    lr_decay: str = rule("constant", choices=SCHEDULES)
    lr_decay_versions: int = rule(100, ge=1)
    lr_floor: float = rule(0.1, gt=0, le=1)

    def __post_init__(self) -> None:
        validate(self, "tasks")
        parse_codec(self.codec)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """A full checkpoint after `every_versions` versions or `every_s` seconds since the last, whichever comes
    first, and at the end; between checkpoints the write-ahead log holds every accepted update."""

    every_versions: int = rule(10, ge=1)
    every_s: float = rule(60.0, gt=0)

    def __post_init__(self) -> None:
        validate(self, "checkpoint")


@dataclasses.dataclass(frozen=True)
class StopSection:
    """The experiment ends at the first of: `max_versions` versions, central test accuracy >=
    `target_accuracy`, `max_wall_s` seconds (0 disables a condition; at least one must be set)."""

    max_versions: int = rule(200, ge=0)
    target_accuracy: float = rule(0.0, ge=0, le=1)
    max_wall_s: float = rule(0.0, ge=0)

    def __post_init__(self) -> None:
        validate(self, "stop")
        if not (self.max_versions or self.target_accuracy or self.max_wall_s):
            raise InvalidValue("stop: set at least one of max_versions, target_accuracy, max_wall_s")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    experiment: ExperimentSection = ExperimentSection()
    model: ModelSpec = ModelSpec()
    data: DataSection = DataSection()
    fedbuff: FedBuffSection = FedBuffSection()
    server_optimizer: ServerOptimizerConfig = ServerOptimizerConfig()
    # The local work each train task asks for: common.learning.training.TrainConfig's fields (the worker
    # seeds each task from this seed, its own id and the task id).
    local: TrainConfig = TrainConfig(steps=40)
    tasks: TasksSection = TasksSection()
    checkpoint: CheckpointSection = CheckpointSection()
    stop: StopSection = StopSection()
    metrics: MetricsSection = MetricsSection()


def load_experiment(path: str | None, sets: list[str] | None = None) -> ExperimentConfig:
    """The experiment config from defaults, the TOML file at `path`, MQFED_ variables and `--set` pairs.
    Raises ConfigError naming the key and its source."""
    return load_config(ExperimentConfig, path, overrides=parse_overrides(sets or []))

