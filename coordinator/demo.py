"""`mqfed-coordinator demo`: the whole federation on one machine, over the real broker.

1. make sure a broker answers (broker/ensure.py starts a local one when it can);
2. make the synthetic KS corpus (cached in --data);
3. write the demo experiment's config into its run directory (`runs/demo-<time>/experiment.toml`);
4. start the coordinator and --workers worker daemons as separate processes (`mqfed-coordinator run`,
   `mqfed-worker run`), each worker on its own speakers (`speaker:i/N`), one CPU thread each;
5. show progress (version, accuracy, workers, staleness) until the coordinator stops (target accuracy or
   --minutes), stop the workers with SIGTERM, print a summary table and, last, one JSON line
   `{"test_accuracy": ..., "wall_s": ..., "versions": ..., "export": "PATH"}`.
Logs of every process are in the run directory. The experiment's queues are deleted afterwards (--keep
leaves them for the management UI).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from common.config import dump_toml
from common.logs import get_logger

log = get_logger(__name__)

# The demo experiment (see docs/configuration.md for every key); --set KEY=VALUE changes any of it.
DEMO_SETTINGS = {
    "fedbuff.mode": "async",
    "fedbuff.concurrency": 2,
    "fedbuff.buffer_size": 2,
    "fedbuff.max_staleness": 8,
    "tasks.eval_every": 2,
    "tasks.deadline_s": 120.0,
    "stop.target_accuracy": 0.95,
    "stop.max_versions": 0,
}


def _spawn(argv: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _stop(procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(args: argparse.Namespace) -> int:
    from broker import ensure, topology
    from common import synth_corpus
    from common.amqp import amqp_url, connect
    from coordinator.cli import load_experiment

    if not ensure.ensure():
        print(ensure.HOW_TO.format(url=ensure.redact(amqp_url())), file=sys.stderr)
        return 1
    synth_corpus.build(args.data)
    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(args.run_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {**DEMO_SETTINGS, "experiment.name": name, "experiment.run_dir": str(run_dir),
                "data.path": args.data, "stop.max_wall_s": args.minutes * 60}
    cfg = load_experiment(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()] + list(args.set))
    config_path = run_dir / "experiment.toml"
    config_path.write_text(dump_toml(cfg))
    env = {**os.environ, "MQFED_LOG_JSON": "1", "MQFED_WORKER_THREADS": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    py = sys.executable
    print(f"demo {name}: coordinator + {args.workers} workers over {ensure.redact(amqp_url())}; logs in {run_dir}")
    print(f"management UI: http://localhost:15672 (queues mqfed.{name}.*)")
    started = time.monotonic()
    coordinator = _spawn([py, "-m", "coordinator.cli", "run", "--config", str(config_path)],
                         run_dir / "coordinator.log", env)
    workers = [
        _spawn([py, "-m", "worker.cli", "run", "--experiment", name, "--data", args.data,
                "--shard", f"speaker:{i + 1}/{args.workers}", "--node", f"demo-w{i + 1}"],
               run_dir / f"worker-{i + 1}.log", env)
        for i in range(args.workers)
    ]
    record = run_dir / "record.jsonl"
    seen = 0
    bar = tqdm(total=int(args.minutes * 60), desc="demo", unit="s", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s {postfix}")
    try:
        while coordinator.poll() is None:
            time.sleep(1.0)
            bar.update(min(bar.total, int(time.monotonic() - started)) - bar.n)
            lines = record.read_text().splitlines() if record.exists() else []
            for line in lines[seen:]:
                entry = json.loads(line)
                if entry.get("kind") is None and entry.get("accuracy") is not None:
                    bar.set_postfix_str(f"v{entry['version']} acc {entry['accuracy']:.3f} workers "
                                        f"{len(set(entry['workers']))} staleness {entry['staleness']}")
            seen = len(lines)
            if time.monotonic() - started > args.minutes * 60 + 120:
                print("coordinator overran its time limit; stopping it", file=sys.stderr)
                _stop([coordinator])
    except KeyboardInterrupt:
        _stop([coordinator])
    finally:
        bar.close()
        _stop(workers)
        if coordinator.poll() is None:
            _stop([coordinator])
    wall = time.monotonic() - started
    summary = _read_summary(record)
    if not args.keep:
        conn = connect("demo", device="teardown", attempts=3)
        topology.delete(conn.channel(), topology.Topology(name))
        conn.close()
    if summary is None:
        print(f"the coordinator ended without a summary (exit {coordinator.returncode}); see {run_dir}/coordinator.log",
              file=sys.stderr)
        return 1
    _print_table(summary, record, wall)
    print(json.dumps({"test_accuracy": summary.get("test_accuracy"), "wall_s": round(wall, 1),
                      "versions": summary["versions"], "export": summary["export"]}))
    return 0


def _read_summary(record: Path) -> dict | None:
    if not record.exists():
        return None
    lines = [json.loads(x) for x in record.read_text().splitlines() if x.strip()]
    summaries = [e for e in lines if e.get("kind") == "summary"]
    return summaries[-1] if summaries else None


def _print_table(summary: dict, record: Path, wall: float) -> None:
    versions = [json.loads(x) for x in record.read_text().splitlines() if x.strip()]
    versions = [e for e in versions if e.get("kind") is None]
    per_worker: dict[str, int] = {}
    for e in versions:
        for w in e["workers"]:
            per_worker[w] = per_worker.get(w, 0) + 1
    stale = [s for e in versions for s in e["staleness"]]
    counters = summary["counters"]
    rows = [
        ("stopped because", summary["reason"]),
        ("model versions", summary["versions"]),
        ("wall time", f"{wall:.0f} s"),
        ("best validation accuracy", f"{summary['best_accuracy']:.4f} (version {summary['best_version']})"),
        ("test accuracy (exported model)", f"{summary.get('test_accuracy', float('nan')):.4f}"),
        ("updates applied", counters.get("applied_updates")),
        ("updates per worker", ", ".join(f"{w}: {n}" for w, n in sorted(per_worker.items()))),
        ("mean staleness", f"{sum(stale) / len(stale):.2f}" if stale else "-"),
        ("stale dropped / duplicates / dead-lettered",
         f"{counters.get('stale_dropped')} / {counters.get('duplicates')} / {counters.get('dead_lettered')}"),
        ("compression", f"{sum(e['raw_bytes'] for e in versions) / max(1, sum(e['bytes_received'] for e in versions)):.0f}x"),
        ("exported model", summary["export"]),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
