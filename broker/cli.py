"""`mqfed-broker`: set up an experiment's topology, print its definitions.json, make sure a broker runs.

  mqfed-broker setup --experiment NAME        declare queues/exchanges/bindings (idempotent)
  mqfed-broker teardown --experiment NAME     delete them
  mqfed-broker definitions --experiment NAME [--worker-password P --coordinator-password P] [--vhost /]
  mqfed-broker ensure                         start a local broker if none answers (see broker/ensure.py)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from broker import definitions, ensure, topology
from common.logs import configure
from common.transport.connection import connect


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mqfed-broker", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("setup", "teardown", "definitions"):
        s = sub.add_parser(name)
        s.add_argument("--experiment", default=os.environ.get("MQFED_EXPERIMENT", "default"))
        s.add_argument("--model-retention-bytes", type=int, default=topology.DEFAULT_MODEL_RETENTION_BYTES)
    d = sub.choices["definitions"]
    d.add_argument("--vhost", default="/")
    d.add_argument("--worker-password", default=os.environ.get("MQFED_WORKER_PASSWORD"))
    d.add_argument("--coordinator-password", default=os.environ.get("MQFED_COORDINATOR_PASSWORD"))
    sub.add_parser("ensure")
    args = p.parse_args(argv)
    configure()
    if args.command == "ensure":
        return ensure.main()
    topo = topology.Topology(args.experiment, model_retention_bytes=args.model_retention_bytes)
    if args.command == "definitions":
        pw = {r: v for r, v in (("worker", args.worker_password), ("coordinator", args.coordinator_password)) if v}
        json.dump(definitions.build(topo, vhost=args.vhost, passwords=pw or None), sys.stdout, indent=2)
        print()
        return 0
    conn = connect("mqfed-broker", device=args.command, attempts=3)
    try:
        ch = conn.channel()
        (topology.declare if args.command == "setup" else topology.delete)(ch, topo)
        print(f"{args.command}: {len(topo.queues())} queues, {len(topo.exchanges())} exchanges for {topo.prefix}")
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
