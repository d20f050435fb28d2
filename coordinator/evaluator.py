"""Central evaluation as its own process: `mqfed-coordinator evaluate` follows the experiment's model stream,
evaluates every `tasks.eval_every`-th version (the newest such one when it falls behind) on its own device,
publishes the result on the events exchange (`metrics.evaluator`), where the coordinator reads it for its
run record and its target-accuracy stop, and exports the best model. Evaluating never delays the
coordinator's ingest. docs/federation.md#evaluation.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from broker import topology
from common.data.dataset import DataError, to_arrays
from common.learning.model import build_model, save_model
from common.learning.training import Clips, evaluate
from common.logs import get_logger
from common.transport.connection import run_forever, serve_while
from common.transport.model_store import ModelNotFound, ModelStore
from common.transport.publish import publish_message
from common.wire import messages
from common.wire.tensors import decode_state
from coordinator.events import EVALUATOR
from coordinator.experiment import ExperimentConfig

log = get_logger(__name__)
SOURCE = EVALUATOR  # Metrics.source of central evaluations


def load_clips(cfg: ExperimentConfig, split_name: str, max_clips: int = 0) -> Clips:
    """`split_name` of the experiment's data set (a seeded subset of `max_clips` when > 0)."""
    from datasets import load_from_disk

    try:
        split = load_from_disk(cfg.data.path)[split_name]
    except FileNotFoundError:
        raise DataError(f"data.path {cfg.data.path!r}: no data set there (make one with `mqfed-worker data synth`)") from None
    except KeyError:
        raise DataError(f"data.path {cfg.data.path!r} has no {split_name!r} split") from None
    if max_clips and len(split) > max_clips:
        split = split.select(np.sort(np.random.default_rng(0).permutation(len(split))[:max_clips]))
    return Clips.from_arrays(*to_arrays(split))


def has_split(cfg: ExperimentConfig, split_name: str) -> bool:
    """Whether the experiment's data set has `split_name` (False for "" and where there is no data set)."""
    from datasets import load_from_disk

    if not split_name:
        return False
    try:
        return split_name in load_from_disk(cfg.data.path)
    except FileNotFoundError:
        return False


def export_best(model, export_dir: Path, info: dict) -> None:
    """Replace `export_dir` with `model` (`save_pretrained` + feature extractor) and `mqfed.json` (`info`),
    atomically by renames: a reader sees the old export or the new one, never half of one."""
    tmp = export_dir.with_name(f".{export_dir.name}-{os.getpid()}")
    save_model(model, tmp)
    (tmp / "mqfed.json").write_text(json.dumps(info))
    old = export_dir.with_name(f".{export_dir.name}-old-{os.getpid()}")
    if export_dir.exists():
        os.replace(export_dir, old)
    os.replace(tmp, export_dir)
    shutil.rmtree(old, ignore_errors=True)


def exported(export_dir: Path) -> dict | None:
    """The `mqfed.json` of the export in `export_dir` (experiment, version, accuracy), None when there is none."""
    path = export_dir / "mqfed.json"
    return json.loads(path.read_text()) if path.exists() else None


class Evaluator:
    """Evaluates an experiment's versions as they are published (see the module doc). `run()` until `stop`."""

    def __init__(self, cfg: ExperimentConfig, device: str = "cpu", url: str | None = None,
                 node: str | None = None) -> None:
        self.cfg, self.device, self.url, self.node = cfg, device, url, node
        self.name = cfg.experiment.name
        self.topo = topology.Topology(self.name)
        self.run_dir = Path(cfg.experiment.run_path)
        self.every = cfg.tasks.eval_every or 1
        self.clips = load_clips(cfg, cfg.data.eval_split, cfg.data.eval_max_clips)
        self.model = build_model(cfg.model, weights=False).to(device)
        self.model.eval()
        best = exported(self.run_dir / "export")
        self.best = best["accuracy"] if best else -1.0
        self.done = -1  # the last version evaluated
        self.stop = threading.Event()

    def request_stop(self, *_args) -> None:
        self.stop.set()

    def run(self) -> None:
        run_forever(self._session, SOURCE, self.node, self.device, self.url, stop=self.stop,
                    retry_on=(topology.ExperimentNotDeclared,))

    def _session(self, conn) -> None:
        topology.require(conn.channel(), self.topo)
        pub = conn.channel()
        pub.confirm_delivery()
        store = ModelStore(conn.channel(), self.topo, cache_dir=self.run_dir / "eval-cache", cache_versions=2)
        store.follow(conn.channel())
        log.info("evaluator_started", experiment=self.name, device=self.device, every=self.every,
                 clips=len(self.clips))
        while not self.stop.is_set():
            conn.process_data_events(time_limit=0.5)
            ann = store.newest
            if ann is None:
                continue
            wanted = ann.version - ann.version % self.every  # the newest version asked for
            if wanted > self.done and wanted > 0:
                self._evaluate(conn, pub, store, ann if wanted == ann.version else wanted)

    def _evaluate(self, conn, pub, store: ModelStore, version: messages.ModelVersion | int) -> None:
        try:
            fetched = store.fetch(announcement=version) if isinstance(version, messages.ModelVersion) \
                else store.fetch(version)
        except ModelNotFound as exc:  # aged out of the stream: the next wanted version will do
            log.warning("evaluation_skipped", version=version if isinstance(version, int) else version.version,
                        error=str(exc))
            self.done = version if isinstance(version, int) else version.version
            return
        v = fetched.announcement.version
        self.model.load_state_dict(decode_state(fetched.path.read_bytes()))
        started = time.monotonic()
        result = serve_while(conn, evaluate, self.model, self.clips, self.device, name="evaluate")
        seconds = time.monotonic() - started
        self.done = v
        publish_message(pub, self.topo.events, f"metrics.{SOURCE}", messages.Metrics(
            self.name, SOURCE, v, {"accuracy": result.accuracy, "loss": result.loss,
                                   "samples": float(result.samples), "seconds": seconds}, time.time()),
            mandatory=False)
        log.info("evaluated", version=v, accuracy=round(result.accuracy, 4), loss=round(result.loss, 4),
                 seconds=round(seconds, 2))
        if result.accuracy > self.best:
            self.best = result.accuracy
            export_best(self.model, self.run_dir / "export",
                        {"experiment": self.name, "version": v, "accuracy": result.accuracy})
