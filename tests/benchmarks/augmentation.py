"""Each augmentation's effect: the centralized baseline with the whole set, then each one switched off in turn.

    python tests/benchmarks/augmentation.py [--steps 2000] [--jobs 2] [--seeds 1]
                                            [--augment LIST] [--train-augment LIST] [--data DIR]

Every row trains kws-tiny with tests/benchmarks/centralized.py's `run` (the worker's training code, the same
initial weights, seed, steps and cosine schedule; one thread per job, `--jobs` rows at once) and tests the
final model on `test` (unheard voices of the training voice families) and `test_unseen` (voice families
and an accent no training clip has). Rows: the whole set (the synthesis-time augmentations `--augment`,
default all eight, and the training-time ones `--train-augment`, default all five at TRAIN_SET's
settings), each of them off in turn, and none at all. A synthesis-time row builds its own corpus beside
`--data` first (about a minute each on 2 cores). `--seeds N` repeats every row with training seeds 0..N-1
(the corpus stays the same) and reports medians and ranges. Prints the table, then one JSON line
`{"rows": {name: {"test": ..., "unseen": ...}}, ...}`.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import statistics
import time

import centralized

from common.data import corpus
from common.logs import configure

# training-time augmentation: name in the table -> the TrainConfig fields it sets (off: their defaults)
TRAIN_AUGMENTATIONS = {"train-speed": ("speed",), "train-eq": ("eq_db",), "train-gain": ("gain_db",),
                       "train-noise": ("noise_snr_db",), "train-masks": ("time_masks", "time_mask_ms")}
# the whole training-time set (docs/augmentation.md's example)
TRAIN_SET = {"speed": [0.9, 1.1], "eq_db": 10.0, "gain_db": 6.0, "noise_snr_db": [15.0, 40.0], "time_masks": 2, "time_mask_ms": 40.0}


def _flags(synth: tuple[str, ...], train: dict, args: argparse.Namespace, seed: int) -> list[str]:
    out = ["--data", args.data, "--steps", str(args.steps), "--eval-every", str(args.steps), "--threads", "1",
           "--seed", "0", "--augment", ",".join(synth), "--augment-p", str(args.augment_p)]
    for field, value in train.items():
        flag = "--" + field.replace("_", "-")
        out += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return out + ["--train-seed", str(seed)] if seed else out


def _build(flags: list[str]) -> None:
    configure(level="WARNING")
    a = centralized.parser().parse_args(flags)
    spec = centralized.corpus_spec(a)
    corpus.build(centralized.corpus_dir(a, spec), spec, progress=False)


def _train(flags: list[str]) -> dict:
    configure(level="WARNING")
    return centralized.run(centralized.parser().parse_args(flags), quiet=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=".cache/mqfed/synth-ks")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--augment", default="all", help="the synthesis-time set (default: all)")
    p.add_argument("--augment-p", type=float, default=corpus.SynthSpec.augment_p)
    p.add_argument("--train-augment", default=None,
                   help='the training-time set as JSON, e.g. \'{"speed": [0.9, 1.1]}\' (default: TRAIN_SET)')
    args = p.parse_args()
    synth = corpus.SynthSpec(augment=args.augment).augment
    train = json.loads(args.train_augment) if args.train_augment is not None else TRAIN_SET

    rows: dict[str, tuple[tuple[str, ...], dict]] = {"all": (synth, train)}
    for name in synth:
        rows[f"no {name}"] = (tuple(a for a in synth if a != name), train)
    for name, fields in TRAIN_AUGMENTATIONS.items():
        if any(f in train for f in fields):
            rows[f"no {name}"] = (synth, {k: v for k, v in train.items() if k not in fields})
    rows = {name: row for name, row in rows.items() if row != ((), {})}  # a set of one: its "no" row is "none"
    rows["none"] = ((), {})
    print(f"augmentation ablation: {len(rows)} rows x {args.seeds} seed(s), {args.steps} steps each, {args.jobs} at once;"
          f" corpus set {','.join(synth) or 'none'} (p {args.augment_p:g}), training set {train or 'none'}", flush=True)

    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        corpora = {s for s, _ in rows.values()}
        list(pool.map(_build, [_flags(s, {}, args, 0) for s in corpora]))  # each corpus once, before training
        print(f"{len(corpora)} corpora ready in {time.perf_counter() - started:.0f} s", flush=True)
        jobs = {pool.submit(_train, _flags(s, t, args, seed)): (name, seed)
                for name, (s, t) in rows.items() for seed in range(args.seeds)}
        results: dict[tuple[str, int], dict] = {}
        for job in cf.as_completed(jobs):  # a line per row as it ends, then the table
            name, seed = jobs[job]
            got = results[(name, seed)] = job.result()
            print(f"  {name} (seed {seed}): test {got['test_accuracy']:.3f}, unseen {got['unseen_accuracy']:.3f}"
                  f" [{time.perf_counter() - started:.0f} s]", flush=True)

    def summary(name: str, key: str) -> tuple[float, float, float]:
        values = [results[(name, seed)][key] for seed in range(args.seeds)]
        return statistics.median(values), min(values), max(values)

    table = {name: {k: summary(name, f"{k}_accuracy") for k in ("test", "unseen")} for name in rows}
    base = table["all"]
    print(f"\n{'row':<16}{'test':>8}{'unseen':>9}{'gap':>7}{'d test':>9}{'d unseen':>10}"
          + ("   (medians; ranges over seeds)" if args.seeds > 1 else ""))
    for name, r in table.items():
        t, u = r["test"][0], r["unseen"][0]
        spread = f"   test {r['test'][1]:.3f}-{r['test'][2]:.3f} unseen {r['unseen'][1]:.3f}-{r['unseen'][2]:.3f}"
        print(f"{name:<16}{t:>8.3f}{u:>9.3f}{t - u:>7.3f}{t - base['test'][0]:>+9.3f}{u - base['unseen'][0]:>+10.3f}"
              + (spread if args.seeds > 1 else ""))
    print(f"({time.perf_counter() - started:.0f} s in all)")
    print(json.dumps({"rows": {n: {"test": r["test"][0], "unseen": r["unseen"][0],
                                   "test_range": r["test"][1:], "unseen_range": r["unseen"][1:]} for n, r in table.items()},
                      "steps": args.steps, "seeds": args.seeds, "augment": list(synth), "augment_p": args.augment_p,
                      "train_augment": train}))


if __name__ == "__main__":
    main()
