"""Centralized baseline: the CPU preset trained on the whole synthetic train split, no federation.

    python tests/benchmarks/centralized.py [--data DIR] [--per-class 1000] [--steps 4000] [--lr 3e-3]
                                           [--schedule cosine] [--eval-every 250] [--threads 2]
                                           [--augment NAMES] [--augment-p P] [--speed LO,HI] [--eq-db DB] [--gain-db DB]
                                           [--noise-snr-db LO,HI] [--time-masks N] [--time-mask-ms MS]

The reference the federated runs are judged against. Trains `kws-tiny` with the same local-training code a
worker uses (common/learning/training.py), in one run with one learning-rate schedule (AdamW, warm-up, cosine decay
to near 0 at --steps), evaluates on the held-out-speaker test split every --eval-every steps, prints test
accuracy against wall time, then the final model's accuracy on the unseen-speaker split (--unseen-split,
speakers that share nothing with training; skipped on a corpus without it) overall and by voice family
(`klatt`, `accent`: docs/data.md), and ends with one JSON line `{"test_accuracy": ..., "unseen_accuracy": ...,
"unseen_by_family": {...}, "wall_s": ..., "params": ...}` (unseen_accuracy: null, unseen_by_family empty
without that split; wall_s: training + test evaluation, not the corpus nor the unseen-speaker evaluation).
--augment/--augment-p choose the corpus's synthesis-time augmentations (a corpus other than the default is
built beside --data), the rest the training-time ones (docs/augmentation.md); the JSON line says which.
The defaults take about 4 minutes on 2 idle cores, and 1 more to build the 12000-clip corpus the first time.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from common.data import corpus
from common.data.dataset import to_arrays
from common.data.espeak import unseen_voices
from common.learning.config import SCHEDULES, TrainConfig
from common.learning.model import ModelSpec, build_model, parameter_count
from common.learning.training import Clips, evaluate, train
from common.logs import configure

# Defaults for kws-tiny on the synthetic corpus (see common/learning/model.py PRESETS for what they reach).
STEPS = 4000
LEARNING_RATE = 3e-3
WARMUP = 100
SCHEDULE = "cosine"
AUGMENT_FIELDS = ("speed", "eq_db", "gain_db", "noise_snr_db", "time_masks", "time_mask_ms")


def _pair(text: str) -> tuple[float, float] | None:
    if text.lower() in ("", "none"):
        return None
    low, high = (float(v) for v in text.split(","))
    return low, high


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=".cache/mqfed/synth-ks")
    p.add_argument("--per-class", type=int, default=corpus.SynthSpec.per_class)
    p.add_argument("--seed", type=int, default=0, help="corpus, initial weights and (unless --train-seed) training")
    p.add_argument("--train-seed", type=int, default=None, help="batch order and augmentation draws")
    p.add_argument("--model", default="kws-tiny")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=LEARNING_RATE)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--schedule", default=SCHEDULE, choices=SCHEDULES)
    p.add_argument("--label-smoothing", type=float, default=TrainConfig.label_smoothing)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--unseen-split", default="test_unseen", help="the unseen-speaker split ('' : none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--augment", default=None,
                   help="synthesis-time augmentations (names or 'all', comma-separated; default: the corpus default;"
                        " '' none); a corpus other than the default is built in DATA-aug-<names>")
    p.add_argument("--augment-p", type=float, default=corpus.SynthSpec.augment_p)
    for flag, kind in (("--speed", "pair"), ("--eq-db", "float"), ("--gain-db", "float"), ("--noise-snr-db", "pair"),
                       ("--time-masks", "int"), ("--time-mask-ms", "float")):
        p.add_argument(flag, type={"pair": _pair, "float": float, "int": int}[kind], default=None,
                       help="training-time augmentation (docs/augmentation.md; default: TrainConfig's)")
    return p


def corpus_spec(args: argparse.Namespace) -> corpus.SynthSpec:
    """The corpus `args` ask for: the default one unless --augment or --augment-p say otherwise."""
    chosen = {} if args.augment is None else {"augment": args.augment}
    return corpus.SynthSpec(seed=args.seed, per_class=args.per_class, augment_p=args.augment_p, **chosen)


def corpus_dir(args: argparse.Namespace, spec: corpus.SynthSpec) -> str:
    """--data for the default corpus; a directory beside it for any other, named after its augmentations."""
    if spec == corpus.SynthSpec(seed=args.seed, per_class=args.per_class):
        return args.data
    return f"{args.data}-aug-{'-'.join(spec.augment) or 'none'}-p{spec.augment_p:g}"


def run(args: argparse.Namespace, quiet: bool = False) -> dict:
    """Train and test once as `args` say (the table printed unless `quiet`); the result as the JSON line has it."""
    say = (lambda *_a, **_k: None) if quiet else print
    torch.set_num_threads(args.threads)
    spec = corpus_spec(args)
    data = corpus_dir(args, spec)
    dd = corpus.build(data, spec, progress=not quiet)
    train_set, test_set = Clips.from_arrays(*to_arrays(dd["train"])), Clips.from_arrays(*to_arrays(dd["test"]))
    model = build_model(ModelSpec(args.model, seed=args.seed))
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup,
                         schedule=args.schedule, label_smoothing=args.label_smoothing,
                         seed=args.seed if args.train_seed is None else args.train_seed,
                         **{k: v for k in AUGMENT_FIELDS if (v := getattr(args, k)) is not None})
    say(f"centralized: {args.model} ({parameter_count(model):,} params), {len(train_set)} train clips,"
        f" {len(test_set)} test clips (unheard speakers), {args.threads} threads")
    say(f"  corpus {data}: augment {','.join(spec.augment) or 'none'} (p {spec.augment_p:g})\n  {config}")
    say(f"{'step':>6}{'wall s':>9}{'train loss':>12}{'test acc':>10}{'test loss':>11}")
    losses: list[float] = []
    state: dict = {}

    def on_step(step: int, total: int, loss: float) -> None:
        # one training run with one schedule; evaluation in between (its time counts in wall s)
        losses.append(loss)
        if step % args.eval_every == 0 or step == total:
            result = evaluate(model, test_set)
            wall = time.perf_counter() - start
            recent = losses[-args.eval_every:]
            train_loss = sum(recent) / len(recent)
            say(f"{step:>6}{wall:>9.1f}{train_loss:>12.4f}{result.accuracy:>10.4f}{result.loss:>11.4f}", flush=True)
            state.update(result=result, wall=wall, step=step)

    start = time.perf_counter()
    train(model, train_set, config, on_step=on_step)
    result = state["result"]
    worst = min(result.per_class, key=result.per_class.get)
    say(f"per class: worst {worst} {result.per_class[worst]:.3f}; "
        + " ".join(f"{k}={v:.2f}" for k, v in result.per_class.items()))
    unseen, by_family = None, {}
    if args.unseen_split and args.unseen_split in dd:
        split = dd[args.unseen_split]
        unseen = evaluate(model, Clips.from_arrays(*to_arrays(split)))
        families = {v.name: family for family, voices in unseen_voices().items() for v in voices}
        speakers = split["speaker"]
        for family in sorted(set(families.values())):
            part = split.select([i for i, s in enumerate(speakers) if families.get(s) == family])
            if len(part):
                by_family[family] = round(evaluate(model, Clips.from_arrays(*to_arrays(part))).accuracy, 4)
        say(f"unseen speakers ({args.unseen_split}, {unseen.samples} clips): accuracy {unseen.accuracy:.4f},"
            f" loss {unseen.loss:.4f}; by voice family: " + ", ".join(f"{k} {v:.4f}" for k, v in by_family.items()))
    else:
        say(f"unseen speakers: the corpus has no {args.unseen_split!r} split; skipped")
    return {"test_accuracy": round(result.accuracy, 4),
            "unseen_accuracy": round(unseen.accuracy, 4) if unseen is not None else None,
            "unseen_by_family": by_family,
            "wall_s": round(state["wall"], 1),
            "params": parameter_count(model), "steps": state["step"], "train_clips": len(train_set),
            "corpus_augment": list(spec.augment), "augment_p": spec.augment_p,
            "train_augment": {k: getattr(config, k) for k in AUGMENT_FIELDS}}


def main() -> None:
    args = parser().parse_args()
    configure(level="WARNING")
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
