"""Model bytes the workers download per accepted update, and what cutting them costs in accuracy.

Each arm runs the demo's federation (coordinator/demo.py DEMO_SETTINGS: 2 workers on their own speakers,
K = 2, the demo's corpus) to a fixed number of versions, so accuracy compares at equal versions whatever
else runs on the machine. Arms are `tasks.model_dtype` x `tasks.version_lag` (docs/federation.md,
Downlink): `float32:0` is the old behaviour (every task downloads the newest full-precision version),
`float16:0` the default. Bytes come from the run record (each update reports the model bytes its task
downloaded; the evaluator's downloads are not counted, it is one central reader). `--model wav2vec2-base`
runs a real-size arm set instead (2 workers, one local step, 4 versions: bytes only, the random-init model
learns nothing in 4 versions). Arms alternate over `--repeat` rounds; medians and ranges. Prints a table,
then one JSON line.

    python tests/benchmarks/downlink.py [--arms float32:0,float16:0,float16:1] [--versions 40] [--repeat 2]
    python tests/benchmarks/downlink.py --model wav2vec2-base --versions 4 --repeat 1   # ~2 min per arm
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path

from broker import ensure
from common.config import load_config
from common.data import corpus
from common.logs import configure
from common.transport.connection import amqp_url
from coordinator.demo import DEMO_SETTINGS
from coordinator.experiment import ExperimentConfig
from coordinator.local_federation import LocalFederation

REAL_SIZE = {"model.name": "wav2vec2-base", "local.steps": 1, "local.batch_size": 2, "local.warmup_steps": 0,
             "fedbuff.concurrency": 2, "fedbuff.buffer_size": 2, "fedbuff.max_staleness": 50, "tasks.eval_every": 0,
             "data.eval_max_clips": 12, "tasks.deadline_s": 600.0, "checkpoint.every_versions": 100}


def run(arm: str, args: argparse.Namespace) -> dict:
    dtype, lag = arm.split(":")
    name = f"bench-downlink-{uuid.uuid4().hex[:6]}"
    settings = {**(REAL_SIZE if args.model == "wav2vec2-base" else {**DEMO_SETTINGS, "model.name": args.model}),
                "experiment.name": name, "experiment.run_dir": str(Path(args.run_root) / name), "data.path": args.data,
                "stop.max_versions": args.versions, "stop.target_accuracy": 0.0, "tasks.model_dtype": dtype,
                "tasks.version_lag": int(lag)}
    cfg = load_config(ExperimentConfig, env={}, overrides=settings)
    workers = [{"shard": f"speaker:{i + 1}/{args.workers}", "node": f"w{i + 1}"} for i in range(args.workers)]
    started = time.monotonic()
    fed = LocalFederation(cfg, args.data, workers, least_privilege=ensure.management_answers(amqp_url()))
    fed.run_to_end(timeout=3600)
    versions = fed.versions()
    summary = fed.summary() or {}
    updates = sum(e["updates"] for e in versions)
    stale = [s for e in versions for s in e["staleness"]]
    return {"arm": arm, "versions": len(versions), "updates": updates,
            "bytes_per_update": sum(e.get("bytes_fetched", 0) for e in versions) / max(1, updates),
            "test_accuracy": summary.get("test_accuracy"), "best_accuracy": summary.get("best_accuracy"),
            "mean_staleness": sum(stale) / max(1, len(stale)), "wall_s": round(time.monotonic() - started, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="kws-tiny")
    p.add_argument("--arms", default="float32:0,float16:0,float16:1", help="model_dtype:version_lag,...")
    p.add_argument("--versions", type=int, default=40)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default=corpus.BENCHMARK_DIR)
    p.add_argument("--run-root", default="runs/bench")
    args = p.parse_args()
    arms = args.arms.split(",")
    configure(level="WARNING")
    if not ensure.ensure():
        raise SystemExit(ensure.HOW_TO.format(url=ensure.redact(amqp_url())))
    corpus.build(args.data, corpus.BENCHMARK_SPEC)
    results: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(args.repeat):
        for arm in (arms if r % 2 == 0 else arms[::-1]):  # alternate the order: drift hits every arm alike
            results[arm].append(run(arm, args))
            print(json.dumps(results[arm][-1]), flush=True)

    def med(arm: str, key: str) -> float:
        return statistics.median(x[key] or 0.0 for x in results[arm])

    def spread(arm: str, key: str, fmt: str) -> str:
        xs = [x[key] or 0.0 for x in results[arm]]
        return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"

    base = med(arms[0], "bytes_per_update")
    print(f"\ndownlink: {args.model}, {args.workers} workers, {args.versions} versions, {args.repeat} runs per arm"
          " (median, range)")
    print(f"{'dtype:lag':<11}{'MB per update':>26}{'cut':>7}{'test accuracy':>26}{'staleness':>22}")
    for arm in arms:
        cut = base / max(1.0, med(arm, "bytes_per_update"))
        mb = [x["bytes_per_update"] / 1e6 for x in results[arm]]
        print(f"{arm:<11}{f'{statistics.median(mb):.3f} ({min(mb):.3f}-{max(mb):.3f})':>26}{cut:>6.2f}x"
              f"{spread(arm, 'test_accuracy', '.4f'):>26}{spread(arm, 'mean_staleness', '.2f'):>22}")
    print(json.dumps({"model": args.model, "baseline": arms[0], "arms": {
        arm: {"bytes_per_update": round(med(arm, "bytes_per_update")), "cut": round(base / max(1.0, med(arm, "bytes_per_update")), 2),
              "test_accuracy": round(med(arm, "test_accuracy"), 4), "test_accuracy_range":
              [min(x["test_accuracy"] or 0 for x in results[arm]), max(x["test_accuracy"] or 0 for x in results[arm])],
              "mean_staleness": round(med(arm, "mean_staleness"), 2)} for arm in arms}}))


if __name__ == "__main__":
    main()
