"""Helpers for tests that run a real federation: coordinator and workers as separate processes over the
real broker, each with its own log file in the test's tmp directory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.config import dump_toml

ROOT = Path(__file__).resolve().parents[2]


def experiment_config(name: str, run_dir: Path, data: Path, **settings):
    """An ExperimentConfig for a small, fast federation on the corpus at `data` (settings: dotted keys)."""
    from common.config import load_config
    from coordinator.experiment import ExperimentConfig

    base = {"experiment.name": name, "experiment.run_dir": str(run_dir), "data.path": str(data),
            "fedbuff.concurrency": 2, "fedbuff.buffer_size": 2, "local.steps": 8, "local.batch_size": 16,
            "tasks.deadline_s": 60.0, "tasks.eval_every": 1, "stop.max_versions": 6}
    return load_config(ExperimentConfig, env={}, overrides={**base, **settings})


def write_config(cfg, path: Path) -> Path:
    path.write_text(dump_toml(cfg))
    return path


def env() -> dict:
    return {**os.environ, "MQFED_LOG_JSON": "1", "MQFED_WORKER_THREADS": "1", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}


def start_coordinator(config: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "coordinator.cli", "run", "--config", str(config), *extra],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env(), cwd=ROOT)


def start_worker(experiment: str, data: Path, shard: str, node: str, log: Path, cache: Path,
                 *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "worker.cli", "run", "--experiment", experiment, "--data", str(data),
                             "--shard", shard, "--node", node, *extra],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env={**env(), "MQFED_WORKER_CACHE_DIR": str(cache)}, cwd=ROOT)


def record(run_dir: Path) -> list[dict]:
    path = run_dir / "record.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def versions(run_dir: Path) -> list[dict]:
    return [e for e in record(run_dir) if e.get("kind") is None]


def wait_for(condition, timeout: float, what: str, procs: list[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for p in procs:
            if p.poll() is not None and p.returncode not in (0, None):
                raise AssertionError(f"{what}: process {p.args[:4]} exited with {p.returncode}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def stop(procs: list[subprocess.Popen], sig: int = signal.SIGTERM, timeout: float = 30.0) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def log_events(path: Path, event: str) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("event") == event:
            out.append(entry)
    return out
