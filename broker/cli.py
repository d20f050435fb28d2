"""`mqfed-broker`: set up an experiment's topology, print its definitions.json, make sure a broker runs.

  mqfed-broker setup --experiment NAME        declare queues/exchanges/bindings (idempotent)
  mqfed-broker teardown --experiment NAME     delete them
  mqfed-broker definitions --experiment NAME [--worker NODE=PASSWORD ...] [--coordinator-password P] [--vhost /]
  mqfed-broker add-worker --experiment NAME --node NODE [--vhost /]      a worker node's user (prints its AMQP_URL)
  mqfed-broker revoke-worker --experiment NAME --node NODE               delete it, close its connections
  mqfed-broker add-coordinator --experiment NAME [--vhost /]             the coordinator's user
  mqfed-broker ensure                         start a local broker if none answers (see broker/ensure.py)

add-/revoke- talk to the management API (broker/admin.py: MQFED_MANAGEMENT_URL, _USER, _PASSWORD).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from broker import admin, definitions, ensure, topology
from common.errors import MqfedError
from common.logs import configure
from common.transport.connection import connect


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mqfed-broker", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("setup", "teardown", "definitions", "add-worker", "revoke-worker", "add-coordinator"):
        s = sub.add_parser(name)
        s.add_argument("--experiment", default=os.environ.get("MQFED_EXPERIMENT", "default"))
        s.add_argument("--model-retention-bytes", type=int, default=topology.DEFAULT_MODEL_RETENTION_BYTES)
        if name in ("definitions", "add-worker", "add-coordinator"):
            s.add_argument("--vhost", default="/")
        if name in ("add-worker", "revoke-worker"):
            s.add_argument("--node", required=True)
    d = sub.choices["definitions"]
    d.add_argument("--worker", action="append", default=[], metavar="NODE=PASSWORD",
                   help="a worker node's user (repeat for each node)")
    d.add_argument("--coordinator-password", default=os.environ.get("MQFED_COORDINATOR_PASSWORD"))
    sub.add_parser("ensure")
    args = p.parse_args(argv)
    configure()
    if args.command == "ensure":
        return ensure.main()
    try:
        topo = topology.Topology(args.experiment, model_retention_bytes=args.model_retention_bytes)
        if args.command == "definitions":
            workers = dict(w.split("=", 1) for w in args.worker if "=" in w)
            if len(workers) != len(args.worker):
                p.error("--worker takes NODE=PASSWORD")
            doc = definitions.build(topo, vhost=args.vhost, workers=workers,
                                    coordinator_password=args.coordinator_password)
            json.dump(doc, sys.stdout, indent=2)
            print()
            return 0
        if args.command in ("add-worker", "revoke-worker", "add-coordinator"):
            return _users(args, topo)
    except MqfedError as exc:
        print(f"mqfed-broker {args.command}: {exc}", file=sys.stderr)
        return 2
    conn = connect("mqfed-broker", device=args.command, attempts=3)
    try:
        ch = conn.channel()
        (topology.declare if args.command == "setup" else topology.delete)(ch, topo)
        print(f"{args.command}: {len(topo.queues())} queues, {len(topo.exchanges())} exchanges for {topo.prefix}")
    finally:
        conn.close()
    return 0


def _users(args, topo: topology.Topology) -> int:
    api = admin.Management()
    if args.command == "revoke-worker":
        found = admin.revoke_worker(api, topo, args.node)
        print(f"{definitions.worker_user(topo, args.node)}: {'revoked' if found else 'no such user'}")
        return 0 if found else 1
    if args.command == "add-worker":
        user, password = definitions.worker_user(topo, args.node), admin.add_worker(api, topo, args.node, vhost=args.vhost)
    else:
        user, password = definitions.coordinator_user(topo), admin.add_coordinator(api, topo, vhost=args.vhost)
    print(f"AMQP_URL={admin.user_url(user, password)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
