"""`mqfed-coordinator status --experiment NAME`: the federation as the broker sees it, live.

Listens to the experiment's events exchange for --seconds (registrations, heartbeats, metrics, model
versions) on a temporary queue, reads queue depths, and prints: queues (messages ready, consumers), the
newest model version, and one row per worker trainer (node, device, status, shard, seconds since its
last heartbeat). Needs only read access plus a temporary queue, so it can run beside a
live experiment from any machine.
"""
from __future__ import annotations

import argparse
import time

from broker import topology
from common.transport.connection import connect
from common.wire import messages


def main(args: argparse.Namespace) -> int:
    topo = topology.Topology(args.experiment)
    conn = connect("status", device=args.experiment, attempts=3)
    ch = conn.channel()
    q = topo.listen(ch, "status", ("#",))
    trainers: dict[tuple[str, str], dict] = {}
    latest: dict = {}

    def on_event(_ch, _method, _props, body):
        try:
            msg = messages.decode(body)
        except messages.MessageError:
            return
        if isinstance(msg, messages.Registration):
            for d in msg.devices:
                trainers.setdefault((msg.node, d), {}).update(shard=msg.shard, shard_size=msg.shard_size)
        elif isinstance(msg, messages.Heartbeat):
            trainers.setdefault((msg.node, msg.device), {}).update(status=msg.status, seen=msg.sent_unix)
        elif isinstance(msg, messages.ModelVersion):
            latest.update(version=msg.version, size=msg.size_bytes)

    ch.basic_consume(q, on_event, auto_ack=True)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        conn.process_data_events(time_limit=min(0.5, max(0.0, deadline - time.monotonic())))
    print(f"experiment {args.experiment}")
    print(f"{'queue':<34}{'ready':>8}{'consumers':>10}")
    for queue in topo.queues():
        if queue.arguments.get("x-queue-type") == "stream":
            continue
        ok = conn.channel()
        decl = ok.queue_declare(queue.name, passive=True).method
        print(f"{queue.name:<34}{decl.message_count:>8}{decl.consumer_count:>10}")
        ok.close()
    if latest:
        print(f"newest model version announced while listening: {latest['version']} ({latest['size']} bytes)")
    print(f"{'node':<20}{'device':<10}{'status':<8}{'last seen':>10}  shard")
    now = time.time()
    for (node, device), info in sorted(trainers.items()):
        seen = f"{now - info['seen']:.0f}s ago" if "seen" in info else "-"
        print(f"{node:<20}{device:<10}{info.get('status', '?'):<8}{seen:>10}  {info.get('shard', '?')}"
              f" ({info.get('shard_size', '?')} clips)")
    if not trainers:
        print(f"(no worker heartbeat in {args.seconds:.0f} s)")
    conn.close()
    return 0
