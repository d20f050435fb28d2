"""FedBuff against synchronous FedAvg on the same task, the same code and the same machine, one after the other.

    python tests/benchmarks/async_vs_sync.py [--data DIR] [--workers 4] [--slowdown 4] [--target 0.8]
                                             [--max-minutes 10]

Both runs: the CPU preset, --workers worker daemons (one CPU thread each) on IID shards of the synthetic
train split, the last of them --slowdown times slower (it sleeps (slowdown - 1) x its training time per
task: a slower node, not a busier CPU), the same local work per task and the same server optimizer. FedBuff:
concurrency = workers, buffer K = workers // 2, staleness weight 1/sqrt(1+s), max staleness 8. Sync:
rounds of `workers` tasks, K = workers, max staleness 0 (coordinator/experiment.py, fedbuff.mode). Time to
target = experiment time of the first version whose validation accuracy (central evaluation, every
version) reaches --target. Prints a table, then one JSON line {"async_s", "sync_s", "speedup", ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import uuid

from broker import ensure
from common.config import load_config
from common.data import corpus
from common.logs import configure
from common.transport.connection import amqp_url
from coordinator.experiment import ExperimentConfig
from coordinator.local_federation import LocalFederation


def run(mode: str, args, run_root: str) -> dict:
    name = f"bench-{mode}-{uuid.uuid4().hex[:6]}"
    settings = {
        "experiment.name": name, "experiment.run_dir": os.path.join(run_root, name), "data.path": args.data,
        "data.eval_max_clips": args.eval_clips, "fedbuff.mode": mode, "fedbuff.concurrency": args.workers,
        "fedbuff.buffer_size": max(1, args.workers // 2), "fedbuff.max_staleness": 8,
        "tasks.eval_every": 1, "tasks.deadline_s": 300.0, "tasks.codec": args.codec,
        "stop.target_accuracy": args.target, "stop.max_versions": 0, "stop.max_wall_s": args.max_minutes * 60,
    }
    if args.local_steps:
        settings["local.steps"] = args.local_steps
    cfg = load_config(ExperimentConfig, env={}, overrides=settings)
    workers = [{"shard": f"iid:{i + 1}/{args.workers}"} for i in range(args.workers)]
    workers[-1]["slowdown"] = args.slowdown
    started = time.monotonic()
    fed = LocalFederation(cfg, args.data, workers).run_to_end(timeout=args.max_minutes * 60 + 300)
    versions = fed.versions()
    reached = [e for e in versions if e.get("accuracy") is not None and e["accuracy"] >= args.target]
    per_worker: dict[str, int] = {}
    for e in versions:
        for w in e["workers"]:
            per_worker[w] = per_worker.get(w, 0) + 1
    summary = fed.summary() or {}
    return {
        "mode": mode, "time_to_target_s": reached[0].get("eval_time_s", reached[0]["time_s"]) if reached else None,
        "versions_to_target": reached[0]["version"] if reached else None, "versions": len(versions),
        "updates": sum(per_worker.values()), "slow_worker_updates": per_worker.get(f"w{args.workers}/cpu", 0),
        "best_accuracy": summary.get("best_accuracy"), "test_accuracy": summary.get("test_accuracy"),
        "mean_staleness": (sum(s for e in versions for s in e["staleness"]) / max(1, sum(len(e["staleness"]) for e in versions))),
        "wall_s": round(time.monotonic() - started, 1), "run_dir": str(fed.run_dir),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=".cache/mqfed/synth-ks")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--slowdown", type=float, default=4.0)
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--max-minutes", type=float, default=10.0)
    p.add_argument("--eval-clips", type=int, default=300)
    p.add_argument("--local-steps", type=int, default=0, help="0: the experiment default")
    p.add_argument("--codec", default="none", help="update codec for both runs (compression is measured elsewhere)")
    p.add_argument("--run-root", default="runs/bench")
    args = p.parse_args()
    configure(level="WARNING")
    if not ensure.ensure():
        raise SystemExit(ensure.HOW_TO.format(url=ensure.redact(amqp_url())))
    corpus.build(args.data)
    results = [run(mode, args, args.run_root) for mode in ("async", "sync")]
    print(f"\n{args.workers} workers, w{args.workers} {args.slowdown:g}x slower, target validation accuracy {args.target}")
    print(f"{'mode':<7}{'to target s':>12}{'versions':>10}{'updates':>9}{'slow w.':>9}{'staleness':>11}"
          f"{'best acc':>10}{'test acc':>10}")
    for r in results:
        t = f"{r['time_to_target_s']:.0f}" if r["time_to_target_s"] is not None else "not reached"
        print(f"{r['mode']:<7}{t:>12}{r['versions_to_target'] or r['versions']:>10}{r['updates']:>9}"
              f"{r['slow_worker_updates']:>9}{r['mean_staleness']:>11.2f}{r['best_accuracy'] or 0:>10.4f}"
              f"{r['test_accuracy'] or 0:>10.4f}")
    a, s = results
    # A run that never reached the target counts as its whole time limit (the speedup is then a lower bound).
    a_s = a["time_to_target_s"] or args.max_minutes * 60
    s_s = s["time_to_target_s"] or args.max_minutes * 60
    print(json.dumps({"async_s": a["time_to_target_s"], "sync_s": s["time_to_target_s"], "speedup": round(s_s / a_s, 2),
                      "lower_bound": s["time_to_target_s"] is None, "target": args.target, "workers": args.workers,
                      "slowdown": args.slowdown}))


if __name__ == "__main__":
    main()
