"""`mqfed-coordinator demo`: the whole federation on one machine, over the real broker.

1. make sure a broker answers (broker/ensure.py starts a local one when it can);
2. make the synthetic KS corpus (cached in --data);
3. write the demo experiment's config into its run directory (`runs/demo-<time>/experiment.toml`);
4. start the coordinator and --workers worker daemons as separate processes (`mqfed-coordinator run`,
   `mqfed-worker run`; coordinator/local_federation.py), each worker on its own speakers
   (`speaker:i/N`), one CPU thread each;
5. show progress (version, accuracy, workers, staleness) until the coordinator stops (target accuracy or
   --minutes), stop the workers with SIGTERM, print a summary table and, last, one JSON line
   `{"test_accuracy": ..., "unseen_accuracy": ..., "wall_s": ..., "versions": ..., "export": "PATH"}`
   (`unseen_accuracy`: on the corpus's unseen-speaker split, null when it has none).
Logs of every process are in the run directory. The experiment's queues are deleted afterwards (--keep
leaves them for the management UI).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from coordinator.local_federation import LocalFederation

# The demo experiment (see docs/configuration.md for every key); --set KEY=VALUE changes any of it. Why these
# values (each measured in 6-minute demos): docs/augmentation.md, "The demo's settings".
DEMO_SETTINGS = {
    "model.name": "kws-fast",
    "fedbuff.mode": "async",
    "fedbuff.concurrency": 2,
    "fedbuff.buffer_size": 1,
    "fedbuff.max_staleness": 8,
    "local.learning_rate": 3e-3,
    "local.eq_db": 10.0,
    "local.keep_optimizer": True,
    "tasks.codec": "fp16",
    "tasks.lr_decay": "cosine",
    "tasks.lr_decay_versions": 300,
    "tasks.eval_every": 8,
    "tasks.deadline_s": 120.0,
    "data.eval_max_clips": 1200,
    "stop.target_accuracy": 0.98,
    "stop.max_versions": 0,
}


def main(args: argparse.Namespace) -> int:
    from broker import ensure
    from common.data import corpus
    from common.transport.connection import amqp_url, broker_user
    from coordinator.experiment import load_experiment

    if not ensure.ensure():
        print(ensure.HOW_TO.format(url=ensure.redact(amqp_url())), file=sys.stderr)
        return 1
    corpus.build(args.data)
    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = {**DEMO_SETTINGS, "experiment.name": name, "experiment.run_dir": str(Path(args.run_dir) / name),
                # the coordinator's clock starts after its start-up and stops before testing the export
                "data.path": args.data, "stop.max_wall_s": max(30.0, args.minutes * 60 - 20)}
    cfg = load_experiment(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()] + list(args.set))
    # As a deployment runs: each process as its own least-privilege broker user (docs/security.md), made
    # through the management API when it answers; else as AMQP_URL's user.
    users = ensure.management_answers(amqp_url())
    fed = LocalFederation(cfg, args.data, [{"shard": f"speaker:{i + 1}/{args.workers}", "node": f"demo-w{i + 1}"}
                                           for i in range(args.workers)], least_privilege=users)
    print(f"demo {name}: coordinator + evaluator + {args.workers} workers over {ensure.redact(amqp_url())}"
          f" ({'each as its own broker user' if users else 'as ' + broker_user()}); logs in {fed.run_dir}")
    print(f"management UI: http://localhost:15672 (queues mqfed.{name}.*)")
    started = time.monotonic()
    fed.start()
    bar = tqdm(total=int(args.minutes * 60), desc="demo", unit="s", mininterval=1 if sys.stderr.isatty() else 30,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s {postfix}")
    try:
        while fed.coordinator.poll() is None:
            time.sleep(1.0)
            bar.update(min(bar.total, int(time.monotonic() - started)) - bar.n)
            evaluated = [e for e in fed.versions() if e.get("accuracy") is not None]
            if evaluated:
                e = evaluated[-1]
                bar.set_postfix_str(f"v{e['version']} acc {e['accuracy']:.3f} workers {len(set(e['workers']))}"
                                    f" staleness {e['staleness']}")
            if time.monotonic() - started > args.minutes * 60 + 120:
                print("coordinator overran its time limit; stopping it", file=sys.stderr)
                fed.signal([fed.coordinator])
    except KeyboardInterrupt:
        pass
    finally:
        bar.close()
        fed.stop()
    wall = time.monotonic() - started
    summary = fed.summary()
    if not args.keep:
        fed.delete_queues()
    if summary is None:
        print(f"the coordinator ended without a summary (exit {fed.coordinator.returncode});"
              f" see {fed.run_dir}/coordinator.log", file=sys.stderr)
        return 1
    _print_table(summary, fed.versions(), wall)
    print(json.dumps({"test_accuracy": summary.get("test_accuracy"), "unseen_accuracy": summary.get("unseen_accuracy"),
                      "wall_s": round(wall, 1), "versions": summary["versions"], "export": summary["export"]}))
    return 0


def _print_table(summary: dict, versions: list[dict], wall: float) -> None:
    per_worker: dict[str, int] = {}
    for e in versions:
        for w in e["workers"]:
            per_worker[w] = per_worker.get(w, 0) + 1
    stale = [s for e in versions for s in e["staleness"]]
    reached = [e for e in versions if (e.get("accuracy") or 0) >= 0.9]
    counters = summary["counters"]
    rows = [
        ("stopped because", summary["reason"]),
        ("model versions", summary["versions"]),
        ("wall time", f"{wall:.0f} s"),
        ("best validation accuracy", f"{summary['best_accuracy']:.4f} (version {summary['best_version']})"),
        ("first >= 90% validation accuracy", f"{reached[0].get('eval_time_s', reached[0]['time_s']):.0f} s"
                                              f" (version {reached[0]['version']})"
                                              if reached else "not reached"),
        ("test accuracy (exported model)", f"{summary.get('test_accuracy', float('nan')):.4f}"),
        ("unseen-speaker accuracy (exported model)", f"{summary['unseen_accuracy']:.4f}"
         if summary.get("unseen_accuracy") is not None else "- (the data set has no unseen-speaker split)"),
        ("updates applied", counters.get("applied_updates")),
        ("updates per worker", ", ".join(f"{w}: {n}" for w, n in sorted(per_worker.items()))),
        ("mean staleness", f"{sum(stale) / len(stale):.2f}" if stale else "-"),
        ("stale dropped / duplicates / dead-lettered",
         f"{counters.get('stale_dropped')} / {counters.get('duplicates')} / {counters.get('dead_lettered')}"),
        ("rejected by reason / refused steps", f"{counters.get('rejected') or {}} / {counters.get('step_refused', 0)}"),
        ("compression", f"{sum(e['raw_bytes'] for e in versions) / max(1, sum(e['bytes_received'] for e in versions)):.0f}x"),
        ("exported model", summary["export"]),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
