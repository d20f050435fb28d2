"""Helpers for tests that run a real federation (coordinator/local_federation.py does the processes)."""
from __future__ import annotations

from pathlib import Path

from coordinator.local_federation import LocalFederation


def experiment_config(name: str, run_dir: Path, data: Path, **settings):
    """An ExperimentConfig for a small, fast federation on the corpus at `data` (settings: dotted keys)."""
    from common.config import load_config
    from coordinator.experiment import ExperimentConfig

    base = {"experiment.name": name, "experiment.run_dir": str(run_dir), "data.path": str(data),
            "fedbuff.concurrency": 2, "fedbuff.buffer_size": 2, "local.steps": 8, "local.batch_size": 16,
            "tasks.deadline_s": 60.0, "tasks.eval_every": 1, "stop.max_versions": 6}
    return load_config(ExperimentConfig, env={}, overrides={**base, **settings})


def federation(name: str, tmp_path: Path, data: Path, shards: list[str], **settings) -> LocalFederation:
    cfg = experiment_config(name, tmp_path / "run", data, **settings)
    return LocalFederation(cfg, data, [{"shard": s} for s in shards], least_privilege=True)


def applied_keys(fed: LocalFederation) -> list[tuple[str, str]]:
    """(task id, worker id) of every update the record says was applied."""
    return [(t, w) for e in fed.versions() for t, w in zip(e["tasks"], e["workers"])]
