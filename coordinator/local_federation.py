"""A federation on one machine: the coordinator and worker daemons as separate processes over the real
broker, each logging JSON lines to its own file in the run directory. Used by `mqfed-coordinator demo`,
the integration and fault tests and the benchmarks, so they all run exactly what a user runs
(`python -m coordinator.cli run`, `python -m worker.cli run`)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.config import dump_toml
from coordinator.record import RunRecord

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict:
    """Environment for the children: JSON logs, one torch thread each, offline hub, no progress bars."""
    return {**os.environ, "MQFED_LOG_JSON": "1", "MQFED_WORKER_THREADS": "1", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), **extra}


def read_record(run_dir: str | os.PathLike) -> list[dict]:
    """The run record's entries (a torn last line is skipped)."""
    return RunRecord(Path(run_dir) / "record.jsonl").lines()


class LocalFederation:
    """Start/stop a coordinator and workers for experiment config `cfg` (its run_dir holds all files).

    workers: one dict per worker with `shard` and optional `node`, `slowdown`, `delay_s`, `devices`, `env`
    (extra environment, e.g. `MQFED_FAILPOINTS` for a fault test).
    env: extra environment for every process (e.g. `AMQP_URL` of another broker, or a cluster's nodes
      comma-separated: docs/cluster.md); per-process env wins.
    least_privilege: run every process as the experiment's generated broker users (one per worker node, the
      coordinator's for the coordinator and the evaluator), made at `start` through the management API
      (broker/admin.py: `MQFED_MANAGEMENT_URL` in `env` or the environment, one API or several
      comma-separated) and deleted by `stop`; else as AMQP_URL's user. Each user's AMQP_URL (`urls`) is
      AMQP_URL with that user's credentials in every node's URL.
    """

    def __init__(self, cfg, data: str | os.PathLike, workers: list[dict], env: dict[str, str] | None = None,
                 least_privilege: bool = False) -> None:
        self.cfg = cfg
        self.name = cfg.experiment.name
        self.run_dir = Path(cfg.experiment.run_path)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data = str(data)
        self.worker_specs = [{"node": f"w{i + 1}", **w} for i, w in enumerate(workers)]
        self.env = dict(env or {})
        self.config_path = self.run_dir / "experiment.toml"
        self.config_path.write_text(dump_toml(cfg))
        self.coordinator: subprocess.Popen | None = None
        self.evaluator: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.processes: list[subprocess.Popen] = []  # everything started, replaced workers and replicas included
        self.least_privilege = least_privilege
        self.users: dict[str, str] = {}  # "coordinator" or a worker node -> the broker user made for it
        self.urls: dict[str, str] = {}  # the same -> its AMQP_URL, while that user exists

    def _management(self):
        from broker import admin

        return admin.Management(self.env.get("MQFED_MANAGEMENT_URL"), amqp=self.env.get("AMQP_URL"))

    def _url(self, who: str) -> dict[str, str]:
        """AMQP_URL for `who` (the coordinator or a worker node): its own broker user, made on first use."""
        if not self.least_privilege:
            return {}
        if who not in self.urls:
            from broker import admin, definitions, topology

            topo, api = topology.Topology(self.name), self._management()
            if who == "coordinator":
                user, password = definitions.coordinator_user(topo), admin.add_coordinator(api, topo)
            else:
                user, password = definitions.worker_user(topo, who), admin.add_worker(api, topo, who)
            self.users[who], self.urls[who] = user, admin.user_url(user, password, self.env.get("AMQP_URL"))
        return {"AMQP_URL": self.urls[who]}

    def provision(self) -> "LocalFederation":
        """Make every broker user now (least_privilege; else nothing): e.g. before the broker goes away."""
        for who in ("coordinator", *(w["node"] for w in self.worker_specs)):
            self._url(who)
        return self

    def remove_users(self) -> None:
        """Delete the broker users `least_privilege` made (their connections are closed); `users` keeps their
        names."""
        from broker import admin

        api = self._management()
        try:
            for who in self.urls:
                api.delete_user(self.users[who])
        except admin.ManagementError as exc:  # the broker is gone (a fault test): its users go with it
            print(f"LocalFederation: broker users of {self.name} not removed: {exc}", file=sys.stderr)
        self.urls.clear()

    def _spawn(self, argv: list[str], log_name: str, **env: str) -> subprocess.Popen:
        log = open(self.run_dir / log_name, "ab")
        proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=log, stderr=subprocess.STDOUT,
                                env=child_env(**{**self.env, **env}), cwd=ROOT, start_new_session=True)
        self.processes.append(proc)
        return proc

    def start_coordinator(self, *extra: str, env: dict | None = None, log_name: str = "coordinator.log") -> subprocess.Popen:
        self.coordinator = self._spawn(["coordinator.cli", "run", "--config", str(self.config_path), *extra],
                                       log_name, **{**self._url("coordinator"), **(env or {})})
        return self.coordinator

    def start_evaluator(self, env: dict | None = None) -> subprocess.Popen:
        self.evaluator = self._spawn(["coordinator.cli", "evaluate", "--config", str(self.config_path)],
                                     "evaluator.log", **{**self._url("coordinator"), **(env or {})})
        return self.evaluator

    def start_worker(self, node: str) -> subprocess.Popen:
        spec = next(w for w in self.worker_specs if w["node"] == node)
        argv = ["worker.cli", "run", "--experiment", self.name, "--data", self.data, "--shard", spec["shard"],
                "--node", node]
        if "devices" in spec:
            argv += ["--devices", spec["devices"]]
        env = {"MQFED_WORKER_CACHE_DIR": str(self.run_dir / "cache" / node),
               "MQFED_WORKER_SLOWDOWN": str(spec.get("slowdown", 1.0)),
               "MQFED_WORKER_DELAY_S": str(spec.get("delay_s", 0.0)), **self._url(node), **spec.get("env", {})}
        self.workers[node] = self._spawn(argv, f"worker-{node}.log", **env)
        return self.workers[node]

    def start(self) -> "LocalFederation":
        """The coordinator, the evaluator (when the experiment evaluates: `tasks.eval_every` > 0), the workers."""
        self.start_coordinator()
        if self.cfg.tasks.eval_every:
            self.start_evaluator()
        for spec in self.worker_specs:
            self.start_worker(spec["node"])
        return self

    def record(self) -> list[dict]:
        return read_record(self.run_dir)

    def versions(self) -> list[dict]:
        return RunRecord(self.run_dir / "record.jsonl").versions()

    def summary(self) -> dict | None:
        found = [e for e in self.record() if e.get("kind") == "summary"]
        return found[-1] if found else None

    def events(self, log_name: str, event: str) -> list[dict]:
        """The JSON log lines with `event` in the run directory's log file `log_name` (e.g. coordinator.log)."""
        path = self.run_dir / log_name
        out = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line from a library that does not log JSON
                continue
            if entry.get("event") == event:
                out.append(entry)
        return out

    def wait_for(self, condition, timeout: float, what: str) -> None:
        """Poll `condition()` until true; raise AssertionError on timeout or when a process dies badly."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            for p in [self.coordinator, self.evaluator, *self.workers.values()]:
                if p is not None and p.poll() not in (None, 0):
                    raise AssertionError(f"waiting for {what}: {' '.join(p.args[2:5])} exited with {p.returncode}"
                                         f" (logs in {self.run_dir})")
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (logs in {self.run_dir})")

    def wait_coordinator(self, timeout: float) -> int:
        return self.coordinator.wait(timeout)

    @staticmethod
    def signal(procs, sig: int = signal.SIGTERM, timeout: float = 30.0) -> list[int | None]:
        """Send `sig` to each live process and wait for it (SIGKILL after `timeout`); return codes."""
        procs = [p for p in procs if p is not None]
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

    def stop(self) -> None:
        """SIGTERM the workers, then the coordinators (whatever of what it started still runs), then delete the
        broker users made for them; idempotent."""
        workers = [p for p in self.processes if p.args[2] == "worker.cli"]  # args: python -m <module> ...
        self.signal(workers)
        self.signal([p for p in self.processes if p not in workers])
        if self.urls:
            self.remove_users()

    def delete_queues(self) -> None:
        """Delete the experiment's queues and exchanges (as AMQP_URL's user, an operator)."""
        from broker import topology
        from common.transport.connection import connect

        conn = connect("local-federation", device="teardown", url=self.env.get("AMQP_URL"), attempts=3)
        try:
            topology.delete(conn.channel(), topology.Topology(self.name))
        finally:
            conn.close()

    def run_to_end(self, timeout: float) -> "LocalFederation":
        """`start`, wait for the coordinator to finish (at most `timeout` s), `stop` the rest and delete the
        experiment's queues; the run directory stays."""
        self.start()
        try:
            self.wait_coordinator(timeout)
        finally:
            self.stop()
            self.delete_queues()
        return self

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()
