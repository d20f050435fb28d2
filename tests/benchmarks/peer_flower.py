"""mqfed beside Flower on the same task: FedBuff, synchronous FedAvg, Flower FedAvg (deployment runtime) and
Flower's legacy gRPC server/clients, each repeated, the order alternating.

    pip install -e ".[peer]"            # flwr, for this benchmark only
    python tests/benchmarks/peer_flower.py [--data DIR] [--clients 4] [--slowdown 4] [--target 0.8]
                                           [--repeat 3] [--arms mqfed_async,mqfed_sync,flower,flower_legacy]

The same task on every side: the kws-tiny preset (the same initial weights), --clients clients on the same
IID shards of the synthetic train split, the same local work per task (common.learning.training.train with
the experiment's default TrainConfig: steps, batch, AdamW, learning rate; seeds from the repeat's seed), the
last client --slowdown times slower in the same way (it sleeps (slowdown - 1) x its training time), FedAvg
weighted by samples, and the same central evaluation (the same validation subset, every `clients` applied
updates, off the clock). mqfed arms: tests/benchmarks/async_vs_sync.py's `run_arm`. Flower arms:
tests/benchmarks/flower_peer/ (its README says how Flower is set up and given its best chance).

Measured per arm, median and range over --repeat runs: time to target (the moment the first model reaching
--target was made), versions or rounds to target, per-round overhead (a round's time beyond its slowest
client's work, rounds 2 on; synchronous arms), model bytes per round (down + up per `clients` applied
updates) and CPU seconds of every process the arm ran (mqfed's include the RabbitMQ node's; Flower's its
SuperLink, SuperNodes and app processes). Prints a table, then one JSON line {"mqfed_async_s", "mqfed_sync_s",
"flower_s", "flower_legacy_s", "speedup_vs_flower", ...} (medians; speedup_vs_flower = flower_s / mqfed_async_s,
sync_vs_legacy = mqfed_sync_s / flower_legacy_s).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import uuid

from async_vs_sync import med, round_overhead_s, run_arm, spread

from broker import ensure
from common.data import corpus
from common.learning.model import ModelSpec
from common.logs import configure
from common.transport.connection import amqp_url
from coordinator.experiment import ExperimentConfig

ARMS = ("mqfed_async", "mqfed_sync", "flower", "flower_legacy")
SYNC_ARMS = ("mqfed_sync", "flower", "flower_legacy")


def run_flower(arm: str, args, seed: int) -> dict:
    """One Flower arm, in the shape of run_arm's result (rounds with end_s, max_task_s, bytes)."""
    try:
        from flower_peer import runner
    except ImportError as exc:
        raise SystemExit(f"the Flower arms need flwr: pip install -e '.[peer]' ({exc})") from None
    local = ExperimentConfig().local
    local = dataclasses.replace(local, seed=seed, **({"steps": args.local_steps} if args.local_steps else {}))
    work_dir = os.path.join(args.run_root, f"bench-{arm}-{uuid.uuid4().hex[:6]}")
    params = runner.Params(data=args.data, work_dir=work_dir, clients=args.clients, slowdown=args.slowdown,
                           local=local, model=ModelSpec(seed=seed), eval_clips=args.eval_clips, target=args.target,
                           max_rounds=args.max_rounds, max_s=args.max_minutes * 60)
    out = (runner.run_deployment if arm == "flower" else runner.run_legacy)(params)
    rounds = [{"version": r["round"], "end_s": r["end_s"], "updates": args.clients, "max_task_s": r["max_task_s"],
               "bytes": r["bytes_down"] + r["bytes_up"]} for r in out["rounds"]]
    return {**out, "arm": arm, "versions_to_target": out["rounds_to_target"], "rounds": rounds,
            "updates_to_target": out["rounds_to_target"] * args.clients if out["rounds_to_target"] else None,
            "run_dir": work_dir}


def run(arm: str, args, seed: int) -> dict:
    if arm.startswith("mqfed_"):
        return run_arm(arm.removeprefix("mqfed_"), args.data, args.run_root, args.clients, args.slowdown, args.target,
                       args.max_minutes * 60, args.eval_clips, args.local_steps, "none", seed=seed)
    return run_flower(arm, args, seed)


def to_target(r: dict) -> list[dict]:
    """The rounds (versions) up to the one that reached the target (all of them when none did)."""
    n = r["versions_to_target"]
    return [x for x in r["rounds"] if n is None or x["version"] <= n]


def mb_per_round(r: dict, clients: int) -> float | None:
    rows = to_target(r)
    updates = sum(x["updates"] for x in rows)
    return sum(x["bytes"] for x in rows) / updates * clients / 1e6 if updates else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=corpus.BENCHMARK_DIR)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--slowdown", type=float, default=4.0)
    p.add_argument("--target", type=float, default=0.8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--max-minutes", type=float, default=20.0)
    p.add_argument("--max-rounds", type=int, default=60)
    p.add_argument("--eval-clips", type=int, default=300)
    p.add_argument("--local-steps", type=int, default=0, help="0: the experiment default")
    p.add_argument("--run-root", default="runs/bench")
    args = p.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known: {', '.join(ARMS)}")
    configure(level="WARNING")
    if not ensure.ensure():
        raise SystemExit(ensure.HOW_TO.format(url=ensure.redact(amqp_url())))
    corpus.build(args.data, corpus.BENCHMARK_SPEC)
    results: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(args.repeat):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            got = run(arm, args, seed=r)
            results[arm].append(got)
            print(f"repeat {r + 1}/{args.repeat} {arm}: to target {got['time_to_target_s']} s, "
                  f"{got['versions_to_target']} versions/rounds, cpu {got['cpu_s']} s, wall {got['wall_s']} s",
                  file=sys.stderr, flush=True)
    cap = args.max_minutes * 60
    times = {a: [x["time_to_target_s"] for x in rs] for a, rs in results.items()}
    overhead = {a: [round_overhead_s(to_target(x)) for x in rs] if a in SYNC_ARMS else [] for a, rs in results.items()}
    mb = {a: [mb_per_round(x, args.clients) for x in rs] for a, rs in results.items()}
    cpu = {a: [x["cpu_s"] for x in rs] for a, rs in results.items()}
    print(f"\n{args.clients} clients, the last {args.slowdown:g}x slower; target validation accuracy {args.target}; "
          f"median (range) of {args.repeat} runs each")
    print(f"{'arm':<15}{'to target s':>22}{'versions/rounds':>17}{'overhead s/round':>23}{'MB/round':>19}"
          f"{'CPU s':>18}")
    for a, rs in results.items():
        print(f"{a:<15}{spread(times[a]):>22}{spread([x['versions_to_target'] for x in rs]):>17}"
              f"{spread(overhead[a], '{:.2f}') if a in SYNC_ARMS else '-':>23}{spread(mb[a], '{:.2f}'):>19}"
              f"{spread(cpu[a]):>18}")

    def capped(a: str) -> float | None:
        return med([t if t is not None else cap for t in times[a]]) if a in times else None

    line = {f"{a}_s": _round(capped(a)) for a in ARMS}  # mqfed_async_s, mqfed_sync_s, flower_s, flower_legacy_s
    if line["flower_s"] and line["mqfed_async_s"]:
        line["speedup_vs_flower"] = round(line["flower_s"] / line["mqfed_async_s"], 2)
    if line["mqfed_sync_s"] and line["flower_legacy_s"]:
        line["sync_vs_legacy"] = round(line["mqfed_sync_s"] / line["flower_legacy_s"], 3)
    line.update({"ranges_s": {a: [_round(min(v)), _round(max(v))] for a, v in times.items() if v and None not in v},
                 "not_reached": {a: sum(t is None for t in v) for a, v in times.items()},
                 "rounds_to_target": {a: med(x["versions_to_target"] for x in rs) for a, rs in results.items()},
                 "overhead_s_per_round": {a: _round(med(v), 3) for a, v in overhead.items() if v},
                 "mb_per_round": {a: _round(med(v), 3) for a, v in mb.items()},
                 "cpu_s": {a: _round(med(v), 1) for a, v in cpu.items()},
                 "repeats": args.repeat, "clients": args.clients, "slowdown": args.slowdown, "target": args.target})
    print(json.dumps(line))


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


if __name__ == "__main__":
    main()
