"""The experiment configuration: one TOML file, every key overridable by `MQFED_<SECTION>_<KEY>`.

Sections (all optional; defaults are the CPU demo's):

```toml
[experiment]          # name, seed, where the run directory goes
[model]               # common.learning.model.ModelSpec: preset / hub id / local path, freeze_feature_encoder
[data]                # the held-out set the coordinator evaluates on
[fedbuff]             # coordinator.aggregator.AggregatorConfig + mode and concurrency
[server_optimizer]    # coordinator.server_optim.ServerOptimizerConfig
[local]               # the local work each train task asks for (common.learning.training.TrainConfig fields)
[tasks]               # deadlines, evaluation cadence, codec
[stop]                # when the experiment ends
```
Loaded with `common.config.load_config(ExperimentConfig, path)`; see docs/configuration.md for every key.
"""
from __future__ import annotations

import dataclasses
import math
import re

from broker.topology import DEFAULT_MODEL_RETENTION_BYTES
from common.compression.codecs import DEFAULT_CODEC, parse_codec
from common.learning.model import ModelSpec
from common.learning.training import TrainConfig
from coordinator.aggregator import AggregatorConfig
from coordinator.dispatch import MODES
from coordinator.server_optim import ServerOptimizerConfig

_NAME_OK = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _positive(section: str, name: str, value, allow_zero: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{section}.{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ExperimentSection:
    """name: experiment name (queue prefix `mqfed.<name>.*`). run_dir: checkpoint, record, export
    (default `runs/<name>`). model_retention_bytes: how much of the model stream the broker keeps (old
    versions age out; a worker that wants one trains from the newest instead)."""

    name: str = "kws"
    run_dir: str = ""
    model_retention_bytes: int = DEFAULT_MODEL_RETENTION_BYTES

    def __post_init__(self) -> None:
        if not _NAME_OK.match(self.name):
            raise ValueError(f"experiment.name {self.name!r} must match {_NAME_OK.pattern}")
        _positive("experiment", "model_retention_bytes", self.model_retention_bytes)

    @property
    def run_path(self) -> str:
        return self.run_dir or f"runs/{self.name}"


@dataclasses.dataclass(frozen=True)
class DataSection:
    """path: a KS data set directory (`mqfed-worker data ...`). The coordinator tracks progress, picks the
    best model and checks `stop.target_accuracy` on `eval_split` (at most `eval_max_clips` clips of it,
    0: all), and reports the exported best model's accuracy on `test_split` at the end."""

    path: str = ".cache/mqfed/synth-ks"
    eval_split: str = "validation"
    eval_max_clips: int = 0
    test_split: str = "test"

    def __post_init__(self) -> None:
        for name in ("eval_split", "test_split"):
            if getattr(self, name) not in ("train", "validation", "test"):
                raise ValueError(f"data.{name} must be train, validation or test, got {getattr(self, name)!r}")
        _positive("data", "eval_max_clips", self.eval_max_clips, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class FedBuffSection:
    """mode: `async` (FedBuff) or `sync` (FedAvg rounds: K = concurrency, max_staleness = 0, constant
    staleness weight). concurrency: train tasks outstanding. The rest is AggregatorConfig's; in sync mode
    buffer_size, max_staleness and staleness are set by the mode."""

    mode: str = "async"
    concurrency: int = 4
    buffer_size: int = 2
    max_staleness: int | None = 10
    staleness: str = "polynomial"
    staleness_a: float = 0.5
    staleness_b: float = 0.0
    sample_weighting: bool = True
    max_update_norm: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"fedbuff.mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ValueError(f"fedbuff.concurrency must be an int >= 1, got {self.concurrency!r}")
        self.aggregator_config()  # validates the rest, naming the field

    def aggregator_config(self, experiment: str | None = None) -> AggregatorConfig:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(AggregatorConfig) if hasattr(self, f.name)}
        fields["experiment"] = experiment
        if self.mode == "sync":
            return AggregatorConfig.synchronous(self.concurrency, sample_weighting=self.sample_weighting,
                                                max_update_norm=self.max_update_norm, experiment=experiment)
        return AggregatorConfig(**fields)


@dataclasses.dataclass(frozen=True)
class TasksSection:
    """deadline_s: a train task not answered by then is re-issued. eval_every: central evaluation every
    that many versions (0: only at the end). federated_eval_every: evaluate tasks on the workers' local
    validation shards every that many versions (0: never). codec: update compression
    (common/compression/codecs.py). transfer_timeout_s: a chunked update that makes no progress for this long is
    dead-lettered (its worker died mid-upload; the task comes back through the queue)."""

    deadline_s: float = 600.0
    eval_every: int = 1
    federated_eval_every: int = 0
    codec: str = DEFAULT_CODEC
    transfer_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        _positive("tasks", "deadline_s", self.deadline_s)
        _positive("tasks", "transfer_timeout_s", self.transfer_timeout_s)
        _positive("tasks", "eval_every", self.eval_every, allow_zero=True)
        _positive("tasks", "federated_eval_every", self.federated_eval_every, allow_zero=True)
        parse_codec(self.codec)


@dataclasses.dataclass(frozen=True)
class StopSection:
    """The experiment ends at the first of: `max_versions` versions, central test accuracy >=
    `target_accuracy`, `max_wall_s` seconds (0 disables a condition; at least one must be set)."""

    max_versions: int = 200
    target_accuracy: float = 0.0
    max_wall_s: float = 0.0

    def __post_init__(self) -> None:
        _positive("stop", "max_versions", self.max_versions, allow_zero=True)
        _positive("stop", "max_wall_s", self.max_wall_s, allow_zero=True)
        if not 0 <= self.target_accuracy <= 1:
            raise ValueError(f"stop.target_accuracy must be in [0, 1], got {self.target_accuracy!r}")
        if not (self.max_versions or self.target_accuracy or self.max_wall_s):
            raise ValueError("stop: set at least one of max_versions, target_accuracy, max_wall_s")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    experiment: ExperimentSection = ExperimentSection()
    model: ModelSpec = ModelSpec()
    data: DataSection = DataSection()
    fedbuff: FedBuffSection = FedBuffSection()
    server_optimizer: ServerOptimizerConfig = ServerOptimizerConfig()
    # The local work each train task asks for: common.learning.training.TrainConfig's fields (the worker seeds
    # each task from this seed, its own id and the task id).
    local: TrainConfig = TrainConfig(steps=40)
    tasks: TasksSection = TasksSection()
    stop: StopSection = StopSection()
