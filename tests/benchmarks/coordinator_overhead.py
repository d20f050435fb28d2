"""What the coordinator's ingest path costs at real size (wav2vec2-base by default), beside the bare decode +
aggregate of the same updates measured in the same run.

The real coordinator runs as its own process (`python -m coordinator.cli run`) over the real broker; this
script publishes `--updates` compressed updates of the model's real shapes (random deltas through the default
codec: ~2 MB each at wav2vec2-base, so chunked, as real ones are) the way a worker does, under confirms, and
reads the coordinator's JSON log: per update, the time from its last chunk to buffered and to durable (the
write-ahead log); per version, the server step and the model publish; each checkpoint written; the longest
time the connection went unserved; its RSS (sampled every 0.1 s) at its peak while ingesting and over the whole
run (which ends with the final evaluation and a test of the export); the bytes it wrote to disk. The baseline
decodes and aggregates the same payloads in this process, `--repeat` times. Prints a table, then one JSON line.

    python tests/benchmarks/coordinator_overhead.py [--model wav2vec2-base] [--updates 24] [--buffer-size 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch

from broker import ensure, topology
from common.compression import codecs
from common.config import load_config
from common.data import corpus
from common.learning.model import ModelSpec, build_model, float_state
from common.logs import configure
from common.transport.connection import connect
from common.transport.publish import publish_message, publish_payload
from common.wire import messages
from coordinator.aggregator import Aggregator, AggregatorConfig, ClientUpdate
from coordinator.dispatch import Dispatcher
from coordinator.experiment import ExperimentConfig
from coordinator.local_federation import LocalFederation
from coordinator.server_optim import ServerOptimizerConfig


def _payloads(model_name: str, count: int, codec: str) -> tuple[dict, list[bytes]]:
    state = float_state(build_model(ModelSpec(model_name)))
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        delta = {n: torch.randn(t.shape, generator=gen) * 1e-3 for n, t in state.items()}
        out.append(codecs.encode(delta, codec).data)
    return state, out


def _bare(state: dict, payloads: list[bytes], buffer_size: int, numel: int) -> list[float]:
    """Seconds per update of decode + aggregate (server steps included) on a fresh copy of the model."""
    agg = Aggregator({n: t.clone() for n, t in state.items()},
                     AggregatorConfig(buffer_size=buffer_size, max_staleness=None), ServerOptimizerConfig())
    times = []
    for i, data in enumerate(payloads):
        t0 = time.perf_counter()
        delta = codecs.decode(data, max_elements=numel)
        agg.add(ClientUpdate("bench", f"t{i}", "bench/cpu", agg.version, 10, delta))
        times.append(time.perf_counter() - t0)
    return times


def _rss(pid: int) -> int:
    """The current resident set of process `pid` (VmRSS), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _unix(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wav2vec2-base")
    p.add_argument("--updates", type=int, default=24)
    p.add_argument("--buffer-size", type=int, default=2)
    p.add_argument("--checkpoint-every", type=int, default=4, help="checkpoint.every_versions")
    p.add_argument("--codec", default=codecs.DEFAULT_CODEC)
    p.add_argument("--repeat", type=int, default=3, help="runs of the bare baseline")
    args = p.parse_args()
    if args.updates < args.buffer_size or args.buffer_size < 1 or args.repeat < 1:
        p.error("need --updates >= --buffer-size >= 1 and --repeat >= 1")
    configure(level="WARNING")
    if not ensure.ensure():
        raise SystemExit("no broker (see README, Broker and containers)")
    print(f"making {args.updates} updates of {args.model} shapes with {args.codec} ...", flush=True)
    state, payloads = _payloads(args.model, args.updates, args.codec)
    numel = sum(t.numel() for t in state.values())
    model_bytes = 4 * numel
    bare_runs = [_bare(state, payloads, args.buffer_size, numel) for _ in range(args.repeat)]
    bare = statistics.median(statistics.median(r) for r in bare_runs)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synth-ks"
        corpus.build(data, corpus.SynthSpec(seed=0, per_class=4, eval_per_class=2), progress=False)
        name = f"bench-overhead-{uuid.uuid4().hex[:6]}"
        versions = args.updates // args.buffer_size
        cfg = load_config(ExperimentConfig, env={}, overrides={
            "experiment.name": name, "experiment.run_dir": str(Path(tmp) / "run"), "data.path": str(data),
            "model.name": args.model, "fedbuff.concurrency": args.buffer_size, "fedbuff.buffer_size": args.buffer_size,
            "fedbuff.max_staleness": 10_000, "tasks.eval_every": 0, "data.eval_max_clips": 12,
            "checkpoint.every_versions": args.checkpoint_every, "tasks.codec": args.codec,
            "stop.max_versions": versions})
        fed = LocalFederation(cfg, data, [])
        proc = fed.start_coordinator(env={"MQFED_LOG_LEVEL": "INFO"})
        topo = topology.Topology(name)
        try:
            fed.wait_for(lambda: fed.events("coordinator.log", "coordinator_started"), 600, "the coordinator")
            # task ids as the coordinator signs them (its run secret; a real worker gets them from its tasks)
            signer = Dispatcher(secret=(Path(tmp) / "run" / "run-secret").read_bytes())
            conn = connect("bench", device="publisher", attempts=3)
            ch = conn.channel()
            ch.confirm_delivery()
            for i, data_bytes in enumerate(payloads):
                ref = publish_payload(ch, topo.update_exchange, topo.UPDATES_KEY, data_bytes,
                                      inline_max_bytes=1024 * 1024, chunk_bytes=8 * 1024 * 1024)
                publish_message(ch, topo.update_exchange, topo.UPDATES_KEY, messages.Update(
                    name, signer.task_id(10_000 + i, 0), "bench/cpu", 0, 10, {}, args.codec, model_bytes,
                    len(data_bytes), ref))
            conn.close()
            samples = []  # (wall time, RSS) every 0.1 s: the peak while ingesting, and over the whole run
            while proc.poll() is None:
                samples.append((time.time(), _rss(proc.pid)))
                time.sleep(0.1)
        finally:
            fed.stop()
            fed.delete_queues()
        logged = fed.events("coordinator.log", "update_logged")
        steps = fed.events("coordinator.log", "version")
        out = fed.events("coordinator.log", "model_version_out")
        ckpts = fed.events("coordinator.log", "checkpoint_written")
        summary = fed.summary() or {}
        ingest_end = max((_unix(e["timestamp"]) for e in steps), default=float("inf"))
        peak = max((r for _, r in samples), default=0)
        peak_ingest = max((r for t, r in samples if t <= ingest_end), default=0)

    durable = [e["durable_after_s"] for e in logged]
    buffered = [e["buffered_after_s"] for e in logged if not e["stepped"]]
    stepped = [e["aggregate_s"] for e in logged if e["stepped"]]
    publish = [e["publish_s"] for e in steps]  # the ingest thread's share
    publisher = [e["frame_s"] + e["stream_s"] for e in out]  # the publisher thread, overlapping ingest
    disk = sum(e["wire_bytes"] for e in logged) + sum(e["bytes"] for e in ckpts)

    def ms(xs: list[float]) -> str:
        return f"{1000 * statistics.median(xs):8.1f} ms (min {1000 * min(xs):.1f}, max {1000 * max(xs):.1f})" if xs else "-"

    rows = [
        ("updates accepted / versions", f"{len(logged)} / {len(steps)}"),
        ("bare decode + aggregate per update", f"{1000 * bare:8.1f} ms (median of {args.repeat} runs)"),
        ("last chunk -> buffered (no step)", ms(buffered)),
        ("last chunk -> durable (write-ahead log)", ms(durable)),
        ("server step (in the update that fills K)", ms(stepped)),
        ("model publish per version, ingest thread", ms(publish)),
        ("model publish per version, publisher thread", ms(publisher)),
        ("checkpoint write (off the ingest thread)", ms([e["seconds"] for e in ckpts])),
        ("longest time the connection went unserved", f"{summary.get('max_unserved_s')} s"),
        ("coordinator peak RSS while ingesting", f"{peak_ingest / 2**30:.2f} GiB = {peak_ingest / model_bytes:.2f} x"
                                                 " the fp32 model"),
        ("coordinator peak RSS, whole run", f"{peak / 2**30:.2f} GiB = {peak / model_bytes:.2f} x (the end: final"
                                            " evaluation, export test)"),
        ("disk written per version", f"{disk / max(1, len(steps)) / 2**20:.1f} MiB (log + checkpoints)"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\ncoordinator overhead: {args.model}, {numel / 1e6:.1f} M parameters, {args.codec}, K = {args.buffer_size}")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    ingest_ratio = bare / statistics.median(durable) if durable else 0.0
    print(json.dumps({"ingest_ratio": round(ingest_ratio, 3), "max_unserved_s": summary.get("max_unserved_s"),
                      "peak_rss_x_model": round(peak_ingest / model_bytes, 2),
                      "peak_rss_x_model_whole_run": round(peak / model_bytes, 2), "bare_update_s": round(bare, 4),
                      "durable_after_s": round(statistics.median(durable), 4) if durable else None,
                      "publish_s": round(statistics.median(publish), 3) if publish else None,
                      "publisher_s": round(statistics.median(publisher), 3) if publisher else None,
                      "disk_bytes_per_version": int(disk / max(1, len(steps))), "updates": len(logged),
                      "versions": len(steps), "model": args.model, "params": numel}))


if __name__ == "__main__":
    main()
