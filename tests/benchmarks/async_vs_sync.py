"""FedBuff against synchronous FedAvg on the same task, the same code and the same machine, repeated.

    python tests/benchmarks/async_vs_sync.py [--data DIR] [--workers 4] [--slowdown 4] [--target 0.8]
                                             [--repeat 3] [--max-minutes 15]

Both arms: the CPU preset, --workers worker daemons (one CPU thread each) on IID shards of the synthetic
train split, the last of them --slowdown times slower (it sleeps (slowdown - 1) x its training time per
task: a slower node, not a busier CPU), the same local work per task and the same server optimizer. FedBuff:
concurrency = workers, buffer K = workers // 2, staleness weight 1/sqrt(1+s), max staleness 8. Sync:
rounds of `workers` tasks, K = workers, max staleness 0 (coordinator/experiment.py, fedbuff.mode).
Central evaluation at the same cadence per applied update in both arms (every `workers` updates: every
version in sync, every workers/K versions in async), off the critical path (the evaluator process).
Time to target = experiment time at which the coordinator made the first evaluated version whose
validation accuracy reaches --target (when the model existed, not when its evaluation came back: the same
rule as tests/benchmarks/peer_flower.py's Flower arms). The arms alternate order from repeat to repeat.
Prints a table (median and range over repeats), then one JSON line {"async_s", "sync_s", "speedup", ...}.
`run_arm` is also peer_flower.py's mqfed arms.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
import uuid
from pathlib import Path

from broker import ensure
from common.config import load_config
from common.data import corpus
from common.logs import configure
from common.transport.connection import amqp_url
from coordinator.experiment import ExperimentConfig
from coordinator.local_federation import LocalFederation

CLK_TCK = os.sysconf("SC_CLK_TCK")


def broker_cpu_s() -> float:
    """CPU seconds (utime + stime) of the local RabbitMQ node(s) (every beam.smp process), 0 when none is
    readable."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(beam.smp)" in text:
            fields = text.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def children_cpu_s() -> float:
    """CPU seconds of every child process this process has waited for (their own waited-for children
    included)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_arm(mode: str, data: str, run_root: str, workers: int = 4, slowdown: float = 4.0, target: float = 0.8,
            max_s: float = 900.0, eval_clips: int = 300, local_steps: int = 0, codec: str = "none",
            seed: int = 0) -> dict:
    """One federation in `mode` (async | sync) until `target` or `max_s`; what it took (see the module doc).
    `rounds`: per version, its time, the slowest of its updates' task seconds (training x the worker's
    slowdown) and its bytes (updates received + model bytes their tasks fetched)."""
    name = f"bench-{mode}-{uuid.uuid4().hex[:6]}"
    buffer = workers if mode == "sync" else max(1, workers // 2)
    settings = {
        "experiment.name": name, "experiment.run_dir": os.path.join(run_root, name), "data.path": data,
        "data.eval_max_clips": eval_clips, "fedbuff.mode": mode, "fedbuff.concurrency": workers,
        "fedbuff.buffer_size": max(1, workers // 2), "fedbuff.max_staleness": 8,
        "tasks.eval_every": max(1, round(workers / buffer)), "tasks.deadline_s": 300.0, "tasks.codec": codec,
        "stop.target_accuracy": target, "stop.max_versions": 0, "stop.max_wall_s": max_s,
        "model.seed": seed, "local.seed": seed,
    }
    if local_steps:
        settings["local.steps"] = local_steps
    cfg = load_config(ExperimentConfig, env={}, overrides=settings)
    specs = [{"shard": f"iid:{i + 1}/{workers}"} for i in range(workers)]
    specs[-1]["slowdown"] = slowdown
    cpu0, broker0, started = children_cpu_s(), broker_cpu_s(), time.monotonic()
    fed = LocalFederation(cfg, data, specs).run_to_end(timeout=max_s + 300)
    wall_s = time.monotonic() - started
    cpu_s = children_cpu_s() - cpu0 + broker_cpu_s() - broker0
    task_s = {}  # task id -> seconds of work on its worker (training x slowdown)
    for spec in fed.worker_specs:
        for e in fed.events(f"worker-{spec['node']}.log", "update_published"):
            task_s[e["task_id"]] = e["seconds"] * spec.get("slowdown", 1.0)
    versions = fed.versions()
    reached = [e for e in versions if e.get("accuracy") is not None and e["accuracy"] >= target]
    per_worker: dict[str, int] = {}
    for e in versions:
        for w in e["workers"]:
            per_worker[w] = per_worker.get(w, 0) + 1
    summary = fed.summary() or {}
    updates = sum(per_worker.values())
    staleness = [s for e in versions for s in e["staleness"]]
    return {
        "arm": f"mqfed_{mode}", "time_to_target_s": reached[0]["time_s"] if reached else None,
        "versions_to_target": reached[0]["version"] if reached else None,
        "updates_to_target": sum(len(e["workers"]) for e in versions if e["version"] <= reached[0]["version"]) if reached else None,
        "versions": len(versions), "updates": updates,
        "slow_worker_updates": per_worker.get(f"w{workers}/cpu", 0), "best_accuracy": summary.get("best_accuracy"),
        "test_accuracy": summary.get("test_accuracy"), "mean_staleness": sum(staleness) / max(1, len(staleness)),
        "rounds": [{"version": e["version"], "end_s": e["time_s"], "updates": len(e["workers"]),
                    "max_task_s": max((task_s.get(t, 0.0) for t in e.get("tasks", [])), default=0.0),
                    "bytes": (e.get("bytes_received") or 0) + (e.get("bytes_fetched") or 0)} for e in versions],
        "cpu_s": round(cpu_s, 1), "wall_s": round(wall_s, 1), "run_dir": str(fed.run_dir),
    }


def round_overhead_s(rounds: list[dict], upto: int | None = None) -> float | None:
    """Median over rounds 2..`upto` of (round time - its slowest task's seconds): what a synchronous round
    costs beyond its straggler's work (round 1 also carries start-up, so it is left out)."""
    rows = rounds[:upto] if upto else rounds
    gaps = [b["end_s"] - a["end_s"] - b["max_task_s"] for a, b in zip(rows, rows[1:]) if b["max_task_s"]]
    return statistics.median(gaps) if gaps else None


def med(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values, fmt: str = "{:.0f}") -> str:
    """'median (min-max)' of the values that are not None, with how many were None."""
    got = [v for v in values if v is not None]
    if not got:
        return "not reached"
    text = fmt.format(statistics.median(got))
    if len(got) > 1:
        text += f" ({fmt.format(min(got))}-{fmt.format(max(got))})"
    missing = len(values) - len(got)
    return text + (f", {missing} not reached" if missing else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=corpus.BENCHMARK_DIR)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--slowdown", type=float, default=4.0)
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-minutes", type=float, default=15.0)
    p.add_argument("--eval-clips", type=int, default=300)
    p.add_argument("--local-steps", type=int, default=0, help="0: the experiment default")
    p.add_argument("--codec", default="none", help="update codec for both runs (compression is measured elsewhere)")
    p.add_argument("--run-root", default="runs/bench")
    args = p.parse_args()
    configure(level="WARNING")
    if not ensure.ensure():
        raise SystemExit(ensure.HOW_TO.format(url=ensure.redact(amqp_url())))
    corpus.build(args.data, corpus.BENCHMARK_SPEC)
    results: dict[str, list[dict]] = {"async": [], "sync": []}
    for r in range(args.repeat):
        for mode in ("async", "sync") if r % 2 == 0 else ("sync", "async"):
            results[mode].append(run_arm(mode, args.data, args.run_root, args.workers, args.slowdown, args.target,
                                         args.max_minutes * 60, args.eval_clips, args.local_steps, args.codec, seed=r))
    print(f"\n{args.workers} workers, w{args.workers} {args.slowdown:g}x slower, target validation accuracy "
          f"{args.target}; median (range) of {args.repeat} runs")
    print(f"{'mode':<7}{'to target s':>20}{'versions':>14}{'slow w. upd.':>14}{'staleness':>16}{'test acc':>22}")
    for mode, rs in results.items():
        print(f"{mode:<7}{spread([x['time_to_target_s'] for x in rs]):>20}"
              f"{spread([x['versions_to_target'] for x in rs]):>14}{spread([x['slow_worker_updates'] for x in rs]):>14}"
              f"{spread([x['mean_staleness'] for x in rs], '{:.2f}'):>16}"
              f"{spread([x['test_accuracy'] for x in rs], '{:.3f}'):>22}")
    # A run that never reached the target counts as its whole time limit (the speedup is then a lower bound).
    cap = args.max_minutes * 60
    a_s = med([x["time_to_target_s"] or cap for x in results["async"]])
    s_s = med([x["time_to_target_s"] or cap for x in results["sync"]])
    pairs = [(s["time_to_target_s"] or cap) / (a["time_to_target_s"] or cap) for a, s in zip(results["async"], results["sync"])]
    print(json.dumps({"async_s": a_s, "sync_s": s_s, "speedup": round(s_s / a_s, 2),
                      "speedup_range": [round(min(pairs), 2), round(max(pairs), 2)], "repeats": args.repeat,
                      "lower_bound": any(x["time_to_target_s"] is None for x in results["sync"]),
                      "target": args.target, "workers": args.workers, "slowdown": args.slowdown}))


if __name__ == "__main__":
    main()
