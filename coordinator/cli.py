"""`mqfed-coordinator`: run an experiment, watch the federation, export, report.

  mqfed-coordinator run --config experiment.toml [--fresh] [--set KEY=VALUE ...]
  mqfed-coordinator evaluate --config experiment.toml [--device cuda:0]   the central evaluator (own process)
  mqfed-coordinator demo [--workers 2] [--minutes 6]     the whole thing on this machine (see coordinator/demo.py)
  mqfed-coordinator status --experiment NAME [--seconds 5]   queues, workers, versions, live
  mqfed-coordinator status --experiment NAME --watch [--interval 2]   the same, redrawn until Ctrl-C
  mqfed-coordinator export --config experiment.toml --out DIR  the checkpoint's model, save_pretrained
  mqfed-coordinator report RUN_DIR [--format text|json|html] [--out DIR]   the run record: table, JSON, plots

`--set fedbuff.buffer_size=4` overrides one key (a TOML value); MQFED_<SECTION>_<KEY> does the same from
the environment. AMQP_URL names the broker.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from common.errors import MqfedError
from common.logs import configure, get_logger
from coordinator.experiment import load_experiment

log = get_logger(__name__)


def cmd_run(args: argparse.Namespace) -> int:
    from coordinator.server import Coordinator, install_signal_handlers

    cfg = load_experiment(args.config, args.set)
    coordinator = Coordinator(cfg, fresh=args.fresh)
    install_signal_handlers(coordinator)
    summary = coordinator.run()
    print(json.dumps(summary))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import signal

    import torch

    from common.config import ConfigError
    from coordinator.evaluator import Evaluator

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA device is visible here")
    evaluator = Evaluator(load_experiment(args.config, args.set), device=args.device)
    signal.signal(signal.SIGTERM, evaluator.request_stop)
    signal.signal(signal.SIGINT, evaluator.request_stop)
    evaluator.run()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from common.learning.model import build_model, save_model
    from coordinator import checkpoint

    cfg = load_experiment(args.config, args.set)
    path = f"{cfg.experiment.run_path}/checkpoint.pt"
    state = checkpoint.load(path, cfg.experiment.name)
    if state is None:
        print(f"mqfed-coordinator export: no checkpoint at {path}", file=sys.stderr)
        return 2
    model = build_model(cfg.model)
    model.load_state_dict(state["aggregator"]["model"])
    save_model(model, args.out)
    print(f"exported version {state['aggregator']['version']} to {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from coordinator import report
    from coordinator.record import RunRecord

    lines = RunRecord(Path(args.run_dir) / "record.jsonl").lines()
    if not lines:
        print(f"no run record in {args.run_dir}", file=sys.stderr)
        return 2
    model = report.build(lines, running=report.lock_held(args.run_dir))
    if args.format == "json":
        print(report.render_json({"run_dir": str(args.run_dir), **model}))
        return 0
    if args.format == "text":
        sys.stdout.write(report.render_text(model))
        if model["summary"] is None:
            print(report.STATES[model["state"]], file=sys.stderr)
        return 0
    try:
        import matplotlib  # noqa: F401  (the plots need it; text and JSON do not)
    except ImportError:
        print("mqfed-coordinator report --format html needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run_dir) / "report"
    for path in report.write_html(model, out, title=f"mqfed run {Path(args.run_dir).resolve().name}"):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mqfed-coordinator", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment (resumes from its checkpoint)")
    run.add_argument("--config", default=None, help="experiment TOML")
    run.add_argument("--fresh", action="store_true", help="start over: delete the experiment's queues and checkpoint")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev = sub.add_parser("evaluate", help="the central evaluator: follow the model stream, evaluate, report")
    ev.add_argument("--config", default=None, help="experiment TOML (the coordinator's)")
    ev.add_argument("--device", default="cpu", help="cpu or cuda:N")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo = sub.add_parser("demo", help="synthetic corpus, coordinator and workers on this machine")
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--minutes", type=float, default=6.0)
    demo.add_argument("--data", default=".cache/mqfed/synth-ks")
    demo.add_argument("--run-dir", default="runs")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--keep", action="store_true", help="keep the experiment's queues afterwards")
    status = sub.add_parser("status", help="watch an experiment: queues, workers, versions")
    status.add_argument("--experiment", required=True)
    status.add_argument("--seconds", type=float, default=5.0, help="listen this long (one snapshot)")
    status.add_argument("--watch", action="store_true", help="redraw until Ctrl-C/SIGTERM: in place on a"
                        " terminal, timestamped lines in a log (docs/operations.md#watching-a-federation)")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between redraws (--watch)")
    export = sub.add_parser("export", help="export the checkpoint's model with save_pretrained")
    export.add_argument("--config", default=None)
    export.add_argument("--out", required=True)
    export.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    report = sub.add_parser("report", help="a run record: table, JSON, or plots and an HTML page",
                            description="Report a run (finished, running or crashed) from RUN_DIR/record.jsonl.")
    report.add_argument("run_dir")
    report.add_argument("--format", choices=("text", "json", "html"), default="text",
                        help="text: the version table, then the summary as JSON (default); json: the report model"
                             " as one JSON object; html: PNG plots and one self-contained report.html (matplotlib)")
    report.add_argument("--out", default=None, help="html: the directory for the PNGs and report.html"
                                                    " (default RUN_DIR/report)")
    args = p.parse_args(argv)
    configure()
    if args.command in ("run", "evaluate", "demo", "export"):
        os.umask(0o077)  # run directories, checkpoints and exports: the owner's only (docs/security.md)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "demo":
            from coordinator import demo as demo_mod

            return demo_mod.main(args)
        if args.command == "status":
            from coordinator import status as status_mod

            return status_mod.main(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        return cmd_report(args)
    except MqfedError as exc:
        print(f"mqfed-coordinator {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
