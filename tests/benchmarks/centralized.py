"""Centralized baseline: the CPU preset trained on the whole synthetic train split, no federation.

    python tests/benchmarks/centralized.py [--data DIR] [--per-class 300] [--minutes 5] [--threads 2]

The reference the federated runs are judged against. Trains `kws-tiny` with the same local-training code a
worker uses (common/training.py), evaluates on the held-out-speaker test split every --eval-every steps,
prints test accuracy against wall time, and ends with one JSON line
`{"test_accuracy": ..., "wall_s": ..., "params": ...}` (wall_s: training + evaluation, not the corpus).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from common import synth_corpus  # noqa: E402
from common.kws_dataset import to_arrays  # noqa: E402
from common.logs import configure  # noqa: E402
from common.model import ModelSpec, build_model, parameter_count  # noqa: E402
from common.training import Clips, TrainConfig, evaluate, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=".cache/mqfed/synth-ks")
    p.add_argument("--per-class", type=int, default=synth_corpus.SynthSpec.per_class)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="kws-tiny")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    configure(level="WARNING")
    torch.set_num_threads(args.threads)
    dd = synth_corpus.build(args.data, synth_corpus.SynthSpec(seed=args.seed, per_class=args.per_class))
    train_set, test_set = Clips.from_arrays(*to_arrays(dd["train"])), Clips.from_arrays(*to_arrays(dd["test"]))
    model = build_model(ModelSpec(args.model, seed=args.seed))
    print(f"centralized: {args.model} ({parameter_count(model):,} params), {len(train_set)} train clips,"
          f" {len(test_set)} test clips (unheard speakers), {args.threads} threads")
    print(f"{'step':>6}{'wall s':>9}{'train loss':>12}{'test acc':>10}{'test loss':>11}")
    wall, step, result = 0.0, 0, None
    while step < args.steps:
        chunk = min(args.eval_every, args.steps - step)
        config = TrainConfig(steps=chunk, batch_size=args.batch_size, learning_rate=args.lr,
                             warmup_steps=50 if step == 0 else 0, seed=args.seed + step)
        t0 = time.perf_counter()
        tr = train(model, train_set, config)
        result = evaluate(model, test_set)
        wall += time.perf_counter() - t0
        step += chunk
        print(f"{step:>6}{wall:>9.1f}{tr.loss:>12.4f}{result.accuracy:>10.4f}{result.loss:>11.4f}", flush=True)
    worst = min(result.per_class, key=result.per_class.get)
    print(f"per class: worst {worst} {result.per_class[worst]:.3f}; "
          + " ".join(f"{k}={v:.2f}" for k, v in result.per_class.items()))
    print(json.dumps({"test_accuracy": round(result.accuracy, 4), "wall_s": round(wall, 1),
                      "params": parameter_count(model), "steps": step, "train_clips": len(train_set)}))


if __name__ == "__main__":
    main()
