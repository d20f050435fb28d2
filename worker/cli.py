"""`mqfed-worker`: the worker daemon and its data tools.

  mqfed-worker data synth --out DIR [--seed N] [--per-class N]     make the synthetic KS corpus (cached;
        [--augment speed,tempo,...|all|none] [--augment-p P] [--augment-eval] [--no-unseen]    docs/data.md)
  mqfed-worker data speech-commands --src DIR --out DIR             convert Speech Commands v0.01 (SUPERB KS)
  mqfed-worker data hub --source superb|speech_commands --out DIR   fetch SUPERB KS from the Hugging Face hub
  mqfed-worker data show DIR [--shard SPEC]                         splits, label counts, speakers of a data set
  mqfed-worker run --config worker.toml [--devices cpu|cuda:0,...]  the daemon (see worker/daemon.py)

Every `data` command writes a `datasets.DatasetDict` that `datasets.load_from_disk(DIR)` opens.
"""
from __future__ import annotations

import argparse
import os
import sys

from common.errors import MqfedError
from common.logs import configure, get_logger

log = get_logger(__name__)


def _data(args: argparse.Namespace) -> int:
    from datasets import load_from_disk

    from common.data import corpus, speech_commands
    from common.data.dataset import DataError, check_splits, label_counts, present_splits
    from common.data.shards import select_shard

    if args.data_command == "synth":
        chosen = {k: v for k, v in (("per_class", args.per_class), ("augment", args.augment)) if v is not None}
        dd = corpus.build(args.out, corpus.SynthSpec(seed=args.seed, eval_per_class=args.eval_per_class, **chosen,
                                                     augment_p=args.augment_p, augment_eval=args.augment_eval,
                                                     unseen=args.unseen))
        out = args.out
    elif args.data_command == "speech-commands":
        dd = speech_commands.load_directory(args.src)
        dd.save_to_disk(args.out)
        out = args.out
    elif args.data_command == "hub":
        dd = speech_commands.load_hub(args.source)
        dd.save_to_disk(args.out)
        out = args.out
    else:
        try:
            dd = load_from_disk(args.dir)
        except FileNotFoundError as exc:
            raise DataError(str(exc)) from None
        check_splits(dd, args.dir)
        out = args.dir
    for split in present_splits(dd):
        ds = dd[split] if not getattr(args, "shard", None) else select_shard(dd[split], args.shard, split)
        counts = label_counts(ds)
        print(f"{split:<11}{len(ds):>7} clips {len(set(ds['speaker'])):>5} speakers  "
              + " ".join(f"{k}={v}" for k, v in counts.items()))
    print(f"data set: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mqfed-worker", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="make, convert or inspect keyword-spotting data sets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    synth = dsub.add_parser("synth", help="synthetic KS corpus from espeak-ng (offline)")
    synth.add_argument("--out", required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--per-class", type=int, default=None, help="training clips per label (default: 1000)")
    synth.add_argument("--eval-per-class", type=int, default=None, help="validation/test/test_unseen clips per label")
    synth.add_argument("--augment", default=None, metavar="NAMES",
                       help="comma-separated synthesis-time augmentations: speed, tempo, formant, reverb, band, "
                            "noise, mask, voices, all, or none (default: none)")
    synth.add_argument("--augment-p", type=float, default=0.5, help="probability of each augmentation per clip")
    synth.add_argument("--augment-eval", action="store_true", help="augment validation/test/test_unseen clips too")
    synth.add_argument("--no-unseen", dest="unseen", action="store_false",
                       help="leave out the test_unseen split (held-out voice families)")
    sc = dsub.add_parser("speech-commands", help="Speech Commands v0.01 directory, SUPERB KS protocol")
    sc.add_argument("--src", required=True)
    sc.add_argument("--out", required=True)
    hub = dsub.add_parser("hub", help="SUPERB KS or Speech Commands v0.01 from the Hugging Face hub")
    hub.add_argument("--source", choices=["superb", "speech_commands"], default="superb")
    hub.add_argument("--out", required=True)
    show = dsub.add_parser("show", help="summarise a prepared data set")
    show.add_argument("dir")
    show.add_argument("--shard", default=None, help="e.g. iid:1/2, dirichlet:1/4:alpha=0.5, speaker:2/3")
    run = sub.add_parser("run", help="run the worker daemon")
    run.add_argument("--config", default=None, help="worker TOML file")
    run.add_argument("--devices", default=None, help="cpu, or cuda:0,cuda:1 (one trainer per device)")
    run.add_argument("--node", default=None)
    run.add_argument("--data", default=None)
    run.add_argument("--shard", default=None)
    run.add_argument("--experiment", default=None)
    args = p.parse_args(argv)
    configure()
    try:
        if args.command == "data":
            return _data(args)
        from worker import daemon

        os.umask(0o077)  # model cache and error-feedback residuals: the owner's only (docs/security.md)
        return daemon.main(args)
    except MqfedError as exc:
        command = f"data {args.data_command}" if args.command == "data" else args.command
        print(f"mqfed-worker {command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
