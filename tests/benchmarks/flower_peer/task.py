"""What both Flower arms run, all of it mqfed's machine learning: the parameters, the on-disk clip cache,
one client's local training and the server's clock, evaluation and stopping rule. No Flower here.

Child processes import this module (PYTHONPATH holds tests/benchmarks); torch and transformers load lazily,
so the runner's own process stays light.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from common.learning.config import TrainConfig
from common.learning.model import ModelSpec

CACHE_FORMAT = 1  # bump when the cache files change


@dataclasses.dataclass(frozen=True)
class Params:
    """One run of one arm. `data`: the KS DatasetDict on disk; `work_dir`: every file the arm writes;
    client i of `clients` trains on shard iid:{i+1}/{clients}, the last one `slowdown` times slower; central
    evaluation on `eval_clips` validation clips after every round; stop at `target` accuracy, `max_rounds`
    rounds or `max_s` seconds of the clock (evaluation excluded)."""

    data: str
    work_dir: str
    clients: int = 4
    slowdown: float = 4.0
    local: TrainConfig = TrainConfig(steps=40)
    model: ModelSpec = ModelSpec()
    eval_clips: int = 300
    target: float = 0.8
    max_rounds: int = 60
    max_s: float = 1200.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Params:
        d = json.loads(text)
        return cls(**{**d, "local": TrainConfig(**d["local"]), "model": ModelSpec(**d["model"])})

    def slowdown_of(self, index: int) -> float:
        """Client `index`'s slowdown: `slowdown` for the last client, 1 for the others."""
        return self.slowdown if index == self.clients - 1 else 1.0


def load_params(path: str | os.PathLike) -> Params:
    return Params.from_json(Path(path).read_text())


# -- the clip cache ------------------------------------------------------------------------------------------
def part_path(cache: Path, index: int, clients: int) -> Path:
    return cache / f"train-iid-{index + 1}-of-{clients}.npz"


def eval_path(cache: Path, eval_clips: int) -> Path:
    return cache / f"validation-{eval_clips}.npz"


def prepare_cache(p: Params, cache: Path) -> Path:
    """Write (once) every client's training shard and the evaluation subset as uncompressed .npz under
    `cache`; returns `cache`. The shards are exactly `worker.daemon.load_shards(data, "iid:i/n")`'s, the
    subset exactly the coordinator evaluator's (`coordinator.evaluator.load_clips`). A cache made from another
    data set or format is rebuilt."""
    cache.mkdir(parents=True, exist_ok=True)
    stamp = {"format": CACHE_FORMAT, "data": os.path.realpath(p.data),
             "data_mtime": os.path.getmtime(os.path.join(p.data, "dataset_dict.json"))}
    stamp_path = cache / "stamp.json"
    if not stamp_path.exists() or json.loads(stamp_path.read_text()) != stamp:
        for old in cache.glob("*.npz"):
            old.unlink()
        stamp_path.write_text(json.dumps(stamp))
    todo = [i for i in range(p.clients) if not part_path(cache, i, p.clients).exists()]
    if todo:
        from worker.daemon import load_shards

        for i in todo:
            clips, _ = load_shards(p.data, f"iid:{i + 1}/{p.clients}")
            _save(part_path(cache, i, p.clients), clips)
    if not eval_path(cache, p.eval_clips).exists():
        from coordinator.evaluator import load_clips

        cfg = SimpleNamespace(data=SimpleNamespace(path=p.data))  # all load_clips reads of a config
        _save(eval_path(cache, p.eval_clips), load_clips(cfg, "validation", max_clips=p.eval_clips))
    return cache


def _save(path: Path, clips) -> None:
    tmp = path.with_name(f".{path.stem}-{os.getpid()}.npz")
    np.savez(tmp, audio=clips.audio.numpy(), labels=clips.labels.numpy())
    os.replace(tmp, path)


def load_cached(path: Path):
    """The `Clips` saved at `path` by `prepare_cache`."""
    from common.learning.training import Clips

    with np.load(path) as z:
        return Clips.from_arrays(z["audio"], z["labels"])


# -- models as arrays ----------------------------------------------------------------------------------------
def set_threads() -> None:
    """One torch thread per process, as mqfed's workers and evaluator have (OMP_NUM_THREADS=1 too)."""
    import torch

    torch.set_num_threads(1)


def build(spec: ModelSpec):
    from common.learning.model import build_model

    return build_model(spec)


def weights(model) -> dict[str, np.ndarray]:
    """The model's floating-point state (what federated averaging moves; for kws-tiny all of it) as numpy."""
    from common.learning.model import float_state

    return {k: v.numpy() for k, v in float_state(model).items()}


def load_weights(model, arrays: dict[str, np.ndarray] | list[np.ndarray]) -> None:
    """Load `weights(model)`-shaped arrays (a dict, or a list in its key order) into `model`."""
    import torch

    names = list(weights(model)) if isinstance(arrays, list) else None
    items = zip(names, arrays) if names is not None else arrays.items()
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in items}, strict=True)


def nbytes(arrays) -> int:
    """Payload bytes of a dict or list of arrays (their `nbytes`, no framing)."""
    values = arrays.values() if isinstance(arrays, dict) else arrays
    return int(sum(np.asarray(a).nbytes for a in values))


# -- one client's task ---------------------------------------------------------------------------------------
def task_seed(local: TrainConfig, node: int, server_round: int) -> int:
    """The seed of client `node`'s task in `server_round` (batch order, augmentation)."""
    return zlib.crc32(f"{local.seed}/{node}/{server_round}".encode()) & 0x7FFFFFFF


def run_task(model, clips, p: Params, node: int, server_round: int) -> tuple[int, dict[str, float]]:
    """Train `model` in place as mqfed's worker does (`train`, then a straggler sleeps (slowdown - 1) x the
    training seconds); returns (num_examples = samples seen, metrics: loss, train_s, task_s, and the wall
    times task_start and task_end for the overhead breakdown)."""
    from common.learning.training import train

    config = dataclasses.replace(p.local, seed=task_seed(p.local, node, server_round))
    task_start = time.time()
    result = train(model, clips, config, "cpu")
    start = time.perf_counter()
    time.sleep(max(0.0, (p.slowdown_of(node) - 1.0) * result.seconds))
    task_s = result.seconds + time.perf_counter() - start
    return result.samples, {"loss": result.loss, "train_s": result.seconds, "task_s": task_s,
                            "task_start": task_start, "task_end": time.time()}


def process_started() -> float:
    """Wall time at which this process was created (from /proc: its start in clock ticks after boot)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = time.time() - float(Path("/proc/uptime").read_text().split()[0])
    return boot + ticks / os.sysconf("SC_CLK_TCK")


# -- the server's clock, evaluation and stopping rule ----------------------------------------------------------
class Rounds:
    """The server side both arms share. `begin()` at the dispatch of round 1 starts the clock (t = 0);
    `finish(...)` once a round's aggregate exists records its end time, pauses the clock to evaluate it,
    appends a `round` line to the events file and returns why to stop (None: go on). Events (JSON lines):
    `t0` (wall time), `round`, `end` (reason: target, max_rounds, max_s), `error`."""

    def __init__(self, p: Params, events: str | os.PathLike, cache: str | os.PathLike) -> None:
        self.p, self.events = p, Path(events)
        self.clips = load_cached(eval_path(Path(cache), p.eval_clips))
        self.model = build(p.model)
        self.t0: float | None = None
        self.dispatch_wall = 0.0
        self.paused = 0.0
        self.stopped: str | None = None

    def initial(self) -> dict[str, np.ndarray]:
        """The initial global model: `build_model(p.model)`'s deterministic init."""
        return weights(self.model)

    def clock(self) -> float:
        assert self.t0 is not None, "begin() first"
        return time.perf_counter() - self.t0 - self.paused

    def begin(self) -> None:
        self.t0 = time.perf_counter()
        self.emit({"event": "t0", "wall": time.time()})

    def dispatching(self) -> None:
        """Call as a round's dispatch begins (after `begin()` for round 1)."""
        self.dispatch_wall = time.time()

    def finish(self, server_round: int, arrays, task_s: list[float], bytes_down: int, bytes_up: int,
               clients: list[dict] | None = None) -> str | None:
        """Record round `server_round` (its aggregate `arrays`, its clients' task seconds, optionally their
        metrics for the overhead breakdown) and evaluate it; returns the stop reason, if any (also written as
        an `end` event)."""
        from common.learning.training import evaluate

        end_s, aggregated_wall = self.clock(), time.time()
        start, cpu0 = time.perf_counter(), time.process_time()
        load_weights(self.model, arrays)
        accuracy = evaluate(self.model, self.clips, "cpu").accuracy
        eval_s = time.perf_counter() - start
        self.paused += eval_s
        self.emit({"event": "round", "round": server_round, "end_s": end_s, "accuracy": accuracy, "eval_s": eval_s,
                   "max_task_s": max(task_s, default=0.0), "bytes_down": bytes_down, "bytes_up": bytes_up,
                   "eval_cpu_s": time.process_time() - cpu0, "dispatch_wall": self.dispatch_wall,
                   "aggregated_wall": aggregated_wall, "clients": clients or []})
        if accuracy >= self.p.target:
            self.stopped = "target"
        elif server_round >= self.p.max_rounds:
            self.stopped = "max_rounds"
        elif self.clock() >= self.p.max_s:
            self.stopped = "max_s"
        if self.stopped:
            self.emit({"event": "end", "reason": self.stopped})
        return self.stopped

    def error(self, message: str) -> None:
        self.emit({"event": "error", "message": message})

    def emit(self, event: dict) -> None:
        with self.events.open("a") as f:
            f.write(json.dumps(event) + "\n")
