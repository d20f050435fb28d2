"""How the real coordinator scales with the number of workers (1, 10, 50, 100 by default), at kws-tiny and
wav2vec2-base shapes, beside the bare decode + aggregate rate of the same updates (the ceiling).

Each run starts the real coordinator as its own process (`LocalFederation(cfg, data, [])` +
`start_coordinator`: `fedbuff.concurrency` = workers, K = `fedbuff.buffer_size` = min(`--max-buffer`, workers),
the FedBuff paper's K = 10 at scale; `tasks.eval_every` 0, no evaluator; `max_staleness` 10^6) and that
many simulated workers. A simulated worker follows the real task protocol (worker/daemon.py) without
training: its own broker user (`broker.admin.add_worker`, removed at the end), its own connection and task
loop (`MessageConsumer` on the tasks queue, prefetch 1, manual ack); it registers and heartbeats, and for
each task publishes a real-size compressed update (a payload from a bank the parent encoded once with the
task's codec from random deltas of the model's real shapes, `coordinator_overhead._payloads`) under
confirms with `publish_payload` / `publish_message` (chunked above the worker's inline limit, as the worker
does), `base_version` = the task's `min_version`, `num_samples` = the steps x batch the task asked, the task's
signed id, then acks the task. It never loads or fetches a model. Workers share `--procs` processes, one
thread and one BlockingConnection per worker.

Measured per run, over the steady window (from the first model version after every worker is consuming to
the last version before the workers are stopped, `--seconds` later): accepted updates/s (`update_logged`
events) and versions/s (`version` events) from the coordinator's JSON log; latency from an update's publish
confirm (recorded by its worker) to its version's `version` event (the run record says which tasks each
version applied), median and p99; the mean staleness of the applied updates (run record);
the coordinator's CPU (/proc utime + stime, in cores) and peak RSS (VmHWM); where its time goes (decode,
aggregate, write-ahead log per update; the ingest thread's share of a model publish per version, `publish`:
`busy` is their sum over the window; the publisher thread's frame + stream write per version, `publisher`,
overlaps them);
the broker's CPU (its OS pid from the management API, when local), the simulated workers' CPU and the
whole machine's; peak broker queue depth (tasks, updates: ready + unacked; an update above the inline limit
is two messages, its chunk and itself) and broker memory (`mem_used`, of the whole broker: other users'
experiments count too), sampled from the management API every second over the whole run, start-up
included (the coordinator issues its tasks before the workers connect; RabbitMQ refreshes these figures
every few seconds).
The ceiling: `coordinator_overhead._bare` over the bank (cycled to 3 K updates, the first K left out, so
that the steady state's server steps are in it), in this process before the runs, on one torch thread like
the coordinator, updates per second of its total time, the median of `--repeat` runs.

Prints a table, writes a plot (updates/s against workers, one line per model, the ceilings dashed) to
`--plot`, and prints one JSON line last: the run at 100 workers and wav2vec2-base shapes (else the last run).
The whole default run (8 runs of `--seconds` 30 s of steady window plus start-up and teardown, the bank
encoding and the ceilings) took 7.0 min on the 2-core development machine, 9.3 min while other jobs shared it
(2026-12-03). Everything here shares those cores (coordinator, broker, workers, ceiling): the `machine
cores` column says how busy they were.

    python tests/benchmarks/scale.py [--models kws-tiny,wav2vec2-base] [--workers 1,10,50,100] [--seconds 30]
                                     [--max-buffer 10] [--procs 4] [--plot docs/img/scale.png]
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Only light imports up here: the simulated-worker processes are spawned and import this module (no torch).
from broker import topology
from common.transport.connection import close_quietly, connect
from common.transport.consumer import MessageConsumer, Outcome
from common.transport.publish import publish_message, publish_payload
from common.wire import messages

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- simulated workers (child processes) ---------------------------------------------------------------------
def _sim_worker(index: int, node: str, url: str, conf: dict, bank: list[bytes], stop, ready, out: list,
                errors: list) -> None:
    """One simulated worker: the real task loop (see the module doc) on its own connection, until `stop`."""
    exp = conf["experiment"]
    topo = topology.Topology(exp)
    worker_id = f"{node}/cpu"
    done = [0]
    conn = None
    try:
        conn = connect("worker", node, "cpu", url, attempts=5)
        topology.require(conn.channel(), topo)
        pub = conn.channel()
        pub.confirm_delivery()
        publish_message(pub, topo.events, f"registration.{node}", messages.Registration(
            exp, node, ["cpu"], "all", conf["shard_size"]), mandatory=False)

        def on_task(delivery) -> Outcome:
            task = delivery.message
            if not isinstance(task, messages.TrainTask) or task.experiment != exp:
                raise messages.InvalidField(f"not a train task of experiment {exp}: {type(task).__name__}")
            if task.deadline_unix < time.time():
                return Outcome.ACK
            if task.codec != conf["codec"]:
                raise RuntimeError(f"task asks codec {task.codec}, the bank holds {conf['codec']}")
            data = bank[(index + done[0]) % len(bank)]
            started = time.time()
            payload = publish_payload(pub, topo.update_exchange, topo.UPDATES_KEY, data,
                                      inline_max_bytes=conf["inline_max_bytes"], chunk_bytes=conf["chunk_bytes"])
            local = task.local
            samples = local.steps * local.batch_size if local.steps else local.batch_size
            publish_message(pub, topo.update_exchange, topo.UPDATES_KEY, messages.Update(
                experiment=exp, task_id=task.task_id, worker_id=worker_id, base_version=task.min_version,
                num_samples=samples, metrics={}, codec=task.codec, raw_bytes=conf["raw_bytes"],
                wire_bytes=len(data), payload=payload), message_id=task.task_id)
            confirmed = time.time()  # the channel confirms: basic_publish returned once the broker had it
            out.append((task.task_id, confirmed, round(confirmed - started, 4)))
            done[0] += 1
            return Outcome.ACK

        tasks = MessageConsumer(conn.channel(), topo.tasks, on_task, prefetch=1,
                                consumer_tag=f"{worker_id}:{os.getpid()}")
        with ready.get_lock():
            ready.value += 1
        last_beat = time.monotonic()
        while not stop.is_set():
            tasks.poll(conn, 0.25)
            if time.monotonic() - last_beat >= conf["heartbeat_s"]:
                publish_message(pub, topo.events, f"heartbeat.{node}", messages.Heartbeat(
                    exp, node, "cpu", time.time(), "idle"), mandatory=False)
                last_beat = time.monotonic()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which reports the run as failed
        errors.append(f"{node}: {type(exc).__name__}: {exc}"[:500])
    finally:
        if conn is not None:
            close_quietly(conn)


def _sim_process(first: int, workers: list[tuple[str, str]], conf: dict, bank_dir: str, stop, ready,
                 out_path: str) -> None:
    """A process of simulated workers: one thread (and connection) per (node, url); writes what they did
    to `out_path` when `stop` is set."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (Ctrl-C reaches the whole group)
    from common.logs import configure

    configure(level="ERROR", json=True)
    bank = [p.read_bytes() for p in sorted(Path(bank_dir).glob("*.bin"))]
    out: list = []
    errors: list = []
    threads = [threading.Thread(target=_sim_worker, args=(first + i, node, url, conf, bank, stop, ready, out, errors),
                                name=node, daemon=True) for i, (node, url) in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    Path(out_path).write_text(json.dumps({"published": out, "errors": errors}))


# -- measuring -----------------------------------------------------------------------------------------------
def _cpu_s(pid: int | None) -> float | None:
    """CPU seconds (utime + stime) of process `pid`, None once it is gone."""
    if not pid:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def _status_bytes(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


class Sampler(threading.Thread):
    """Every `period` s: the coordinator's CPU and RSS high-water mark, the simulated workers' CPU, the
    broker's CPU and the machine's; every second: the experiment's queue depths and the broker's memory."""

    def __init__(self, api, topo, coordinator_pid: int, period: float = 0.5) -> None:
        super().__init__(name="sampler", daemon=True)
        self.api, self.topo, self.pid, self.period = api, topo, coordinator_pid, period
        self.sim_pids: list[int] = []
        self.sim_cpu: dict[int, float] = {}
        self.broker_pid: int | None = None
        self.samples: list[dict] = []
        self.broker: list[dict] = []
        self.peak_rss = 0
        self.mgmt_errors = 0
        self.halt = threading.Event()

    def _broker_sample(self) -> None:
        from urllib.parse import quote

        vhost = quote("/", safe="")
        row = {"t": time.time()}
        try:
            for key, queue in (("tasks", self.topo.tasks), ("updates", self.topo.updates)):
                q = self.api.request("GET", f"/api/queues/{vhost}/{quote(queue, safe='')}")
                row[key] = (q.get("messages_ready") or 0) + (q.get("messages_unacknowledged") or 0)
            nodes = self.api.request("GET", "/api/nodes?columns=name,mem_used,os_pid") or []
            row["mem"] = sum(n.get("mem_used") or 0 for n in nodes)
            if self.broker_pid is None and len(nodes) == 1 and Path(f"/proc/{nodes[0].get('os_pid')}").exists():
                self.broker_pid = int(nodes[0]["os_pid"])
        except Exception:  # noqa: BLE001 - a missed sample (the queues exist only once the coordinator runs)
            self.mgmt_errors += bool(self.broker)
            return
        self.broker.append(row)

    def run(self) -> None:
        last_mgmt = 0.0
        while not self.halt.is_set():
            now = time.time()
            for pid in self.sim_pids:  # the last value read stays once a process is gone
                self.sim_cpu[pid] = _cpu_s(pid) or self.sim_cpu.get(pid, 0.0)
            self.samples.append({"t": now, "coord": _cpu_s(self.pid), "broker": _cpu_s(self.broker_pid),
                                 "sims": sum(self.sim_cpu.values()), "machine": _machine_busy_s()})
            self.peak_rss = max(self.peak_rss, _status_bytes(self.pid, "VmHWM"))
            if now - last_mgmt >= 1.0:
                last_mgmt = now
                self._broker_sample()
            self.halt.wait(self.period)

    def cores(self, key: str, t0: float, t1: float) -> float | None:
        """Average cores used by `key` between wall times t0 and t1 (from the samples nearest inside)."""
        inside = [s for s in self.samples if t0 <= s["t"] <= t1 and s[key] is not None]
        if len(inside) < 2 or inside[-1]["t"] <= inside[0]["t"]:
            return None
        return (inside[-1][key] - inside[0][key]) / (inside[-1]["t"] - inside[0]["t"])

    def peak(self, key: str) -> int:
        return max((r[key] for r in self.broker if key in r), default=0)


def _quantile(xs: list[float], q: float) -> float | None:
    """Nearest-rank quantile."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


# -- one run ---------------------------------------------------------------------------------------------------
def _make_users(api, topo, nodes: list[str]) -> dict[str, str]:
    """node -> AMQP URL of its own worker user (made through the management API)."""
    from broker import admin, definitions

    def make(node: str) -> tuple[str, str]:
        password = admin.add_worker(api, topo, node)
        return node, admin.user_url(definitions.worker_user(topo, node), password)

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(make, nodes))


def _remove_users(api, topo, nodes: list[str]) -> None:
    from broker import admin

    def revoke(node: str) -> None:
        try:
            admin.revoke_worker(api, topo, node)
        except admin.ManagementError as exc:
            print(f"scale: user of {node} not removed: {exc}", file=sys.stderr)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(revoke, nodes))


def run_one(args, model: str, workers: int, buffer_size: int, data: Path, bank_dir: Path, raw_bytes: int,
            worker_defaults: dict, tmp: Path) -> dict:
    """One coordinator and `workers` simulated workers for about `args.seconds` of steady window; the
    measurements (see the module doc)."""
    from coordinator_overhead import _unix

    from broker import admin
    from common.config import load_config
    from coordinator.experiment import ExperimentConfig
    from coordinator.local_federation import LocalFederation

    name = f"bench-scale-{uuid.uuid4().hex[:6]}"
    run_dir = tmp / name
    cfg = load_config(ExperimentConfig, env={}, overrides={
        "experiment.name": name, "experiment.run_dir": str(run_dir), "data.path": str(data),
        "experiment.model_retention_bytes": int(args.retention_gib * 2**30),
        "model.name": model, "fedbuff.concurrency": workers, "fedbuff.buffer_size": buffer_size,
        "fedbuff.max_staleness": 1_000_000, "tasks.eval_every": 0, "data.eval_max_clips": 12,
        "tasks.codec": args.codec, "stop.max_versions": 1_000_000})
    topo = topology.Topology(name)
    api = admin.Management()
    nodes = [f"sim{i + 1:03d}" for i in range(workers)]
    fed = LocalFederation(cfg, data, [])
    ctx = mp.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Value("i", 0)
    procs: list = []
    sampler = None
    made_users = False
    try:
        proc = fed.start_coordinator(env={"MQFED_LOG_LEVEL": "INFO"})
        sampler = Sampler(api, topo, proc.pid)
        sampler.start()
        fed.wait_for(lambda: fed.events("coordinator.log", "coordinator_started"), 600, "the coordinator")
        made_users = True
        urls = _make_users(api, topo, nodes)
        conf = {"experiment": name, "codec": args.codec, "raw_bytes": raw_bytes, "shard_size": 1000, **worker_defaults}
        nprocs = max(1, min(args.procs, workers))
        per = math.ceil(workers / nprocs)
        for p in range(nprocs):
            part = [(n, urls[n]) for n in nodes[p * per:(p + 1) * per]]
            if not part:
                continue
            child = ctx.Process(target=_sim_process, args=(p * per, part, conf, str(bank_dir), stop, ready,
                                                           str(run_dir / f"sim-{p}.json")), name=f"sim-{p}")
            child.start()
            procs.append(child)
        sampler.sim_pids = [c.pid for c in procs]
        fed.wait_for(lambda: ready.value >= workers or not all(c.is_alive() for c in procs), 300,
                     f"{workers} simulated workers")
        if ready.value < workers:
            raise RuntimeError(f"only {ready.value} of {workers} simulated workers started")
        all_ready = time.time()

        def first_version() -> bool:
            return any(_unix(e["timestamp"]) >= all_ready for e in fed.events("coordinator.log", "version"))

        fed.wait_for(first_version, 600, "the first model version")
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the coordinator exited with {proc.returncode}")
            if not all(c.is_alive() for c in procs):
                raise RuntimeError("a simulated-worker process died")
            time.sleep(0.5)
        stopping = time.time()  # the steady window ends here: the workers stop, the queue drains
        stop.set()
        for c in procs:
            c.join(60)
        fed.stop()
    except BaseException:
        kept = Path(tempfile.gettempdir()) / f"mqfed-scale-failed-{name}"  # the run's tmp dir goes with us
        kept.mkdir(exist_ok=True)
        for path in [*run_dir.glob("*.log"), *run_dir.glob("*.jsonl"), *run_dir.glob("*.toml"), *run_dir.glob("sim-*")]:
            shutil.copy(path, kept)
        print(f"scale: run {name} failed; its logs are in {kept}", file=sys.stderr)
        raise
    finally:
        stop.set()
        for c in procs:
            c.join(10)
            if c.is_alive():
                c.terminate()
                c.join(10)
        fed.stop()
        if sampler is not None:
            sampler.halt.set()
            sampler.join()
        try:
            fed.delete_queues()
        finally:
            if made_users:
                _remove_users(api, topo, nodes)

    published: dict[str, tuple[float, float]] = {}
    errors: list[str] = []
    for c in range(len(procs)):
        path = run_dir / f"sim-{c}.json"
        got = json.loads(path.read_text()) if path.exists() else {"published": [], "errors": [f"sim-{c}: no result"]}
        published.update({t: (at, took) for t, at, took in got["published"]})
        errors += got["errors"]
    logged = fed.events("coordinator.log", "update_logged")
    versions = fed.events("coordinator.log", "version")
    rejected = fed.events("coordinator.log", "update_rejected")
    dead = fed.events("coordinator.log", "message_dead_lettered")
    checkpoints = fed.events("coordinator.log", "checkpoint_written")
    out = fed.events("coordinator.log", "model_version_out")  # the publisher thread: frame + stream write
    recorded = {e["version"]: e for e in fed.versions()}
    shutil.rmtree(run_dir, ignore_errors=True)

    steady = [e for e in versions if all_ready <= _unix(e["timestamp"]) <= stopping]
    if len(steady) < 2:
        raise RuntimeError(f"{model}, {workers} workers: {len(steady)} model versions in {args.seconds} s; give"
                           f" --seconds more")
    t0, t1 = _unix(steady[0]["timestamp"]), _unix(steady[-1]["timestamp"])
    window = max(t1 - t0, 1e-9)
    in_window = [e for e in logged if t0 < _unix(e["timestamp"]) <= t1]
    latencies = []
    for e in steady[1:]:
        applied = _unix(e["timestamp"])
        latencies += [applied - published[t][0] for t in recorded.get(e["version"], {}).get("tasks", [])
                      if t in published]
    staleness = [s for e in steady[1:] for s in recorded.get(e["version"], {}).get("staleness", [])]
    per_update = {k: statistics.mean(e[k] for e in in_window) if in_window else None
                  for k in ("decode_s", "aggregate_s", "log_s")}
    publish = [e["publish_s"] for e in steady[1:] if e.get("publish_s") is not None]
    busy = (sum(e["decode_s"] + e["aggregate_s"] + e["log_s"] for e in in_window) + sum(publish)) / window
    ckpt_s = [e["seconds"] for e in checkpoints if t0 < _unix(e["timestamp"]) <= t1]
    publisher = [e["frame_s"] + e["stream_s"] for e in out if t0 < _unix(e["timestamp"]) <= t1]
    return {
        "model": model, "workers": workers, "buffer_size": buffer_size, "window_s": round(window, 2),
        "updates": len(in_window), "versions": len(steady) - 1,
        "updates_per_s": len(in_window) / window, "versions_per_s": (len(steady) - 1) / window,
        "latency_p50_s": _quantile(latencies, 0.5), "latency_p99_s": _quantile(latencies, 0.99),
        "latency_samples": len(latencies), "staleness_mean": statistics.mean(staleness) if staleness else None,
        "worker_publish_s": statistics.median(took for _, took in published.values()) if published else None,
        "coordinator_cpu_s": (sampler.cores("coord", t0, t1) or 0.0) * window,
        "coordinator_cores": sampler.cores("coord", t0, t1), "coordinator_peak_rss_bytes": sampler.peak_rss,
        "coordinator_busy": busy, "decode_s": per_update["decode_s"], "aggregate_s": per_update["aggregate_s"],
        "wal_s": per_update["log_s"], "model_publish_s": statistics.median(publish) if publish else None,
        "publisher_s": statistics.median(publisher) if publisher else None,
        "checkpoints": len(ckpt_s), "checkpoint_s": statistics.median(ckpt_s) if ckpt_s else None,
        "broker_cores": sampler.cores("broker", t0, t1), "sim_cores": sampler.cores("sims", t0, t1),
        "machine_cores": sampler.cores("machine", t0, t1),
        "broker_peak_mem_bytes": sampler.peak("mem"), "tasks_queue_peak": sampler.peak("tasks"),
        "updates_queue_peak": sampler.peak("updates"), "management_misses": sampler.mgmt_errors,
        "rejected": len(rejected), "dead_lettered": sum(e.get("count", 1) for e in dead),
        "worker_errors": errors[:5], "worker_error_count": len(errors),
    }


# -- the ceiling, the report -------------------------------------------------------------------------------------
def ceiling(state: dict, bank: list[bytes], buffer_size: int, repeat: int) -> float:
    """Updates/s of bare decode + aggregate over the bank cycled to 3 K updates (at least the bank), on one
    torch thread as the coordinator runs (LocalFederation's children: OMP_NUM_THREADS=1), leaving out the
    first K (the first step allocates the aggregator's buffers, once per run in the coordinator); the
    median of `repeat` runs."""
    import torch
    from coordinator_overhead import _bare

    numel = sum(t.numel() for t in state.values())
    n = max(len(bank), 3 * buffer_size)
    payloads = [bank[i % len(bank)] for i in range(n)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [_bare(state, payloads, buffer_size, numel)[buffer_size:] for _ in range(repeat)]
    finally:
        torch.set_num_threads(threads)
    return statistics.median(len(times) / sum(times) for times in runs)


def _fmt(x, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale if scale != 1.0 else x, spec)


def print_table(rows: list[dict]) -> None:
    cols = [("model", "model", "s"), ("workers", "workers", "d"), ("K", "buffer_size", "d"),
            ("upd/s", "updates_per_s", ".2f"), ("ceiling", "ceiling_updates_per_s", ".2f"), ("ratio", "ratio", ".3f"),
            ("ver/s", "versions_per_s", ".3f"), ("lat p50 s", "latency_p50_s", ".2f"),
            ("lat p99 s", "latency_p99_s", ".2f"), ("stale", "staleness_mean", ".1f"),
            ("coord cores", "coordinator_cores", ".2f"),
            ("coord busy", "coordinator_busy", ".2f"), ("coord RSS GiB", "coordinator_peak_rss_bytes", ".2f"),
            ("publish s/ver", "model_publish_s", ".2f"), ("publisher s/ver", "publisher_s", ".2f"),
            ("WAL ms/upd", "wal_s", ".1f"),
            ("decode ms/upd", "decode_s", ".1f"), ("broker cores", "broker_cores", ".2f"),
            ("sim cores", "sim_cores", ".2f"), ("machine cores", "machine_cores", ".2f"),
            ("tasks q", "tasks_queue_peak", "d"), ("updates q", "updates_queue_peak", "d"),
            ("broker MiB", "broker_peak_mem_bytes", ".0f"), ("updates", "updates", "d")]
    scale = {"coordinator_peak_rss_bytes": 2**-30, "broker_peak_mem_bytes": 2**-20, "wal_s": 1000, "decode_s": 1000}
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        cells.append([r[k] if f == "s" else _fmt(r.get(k), f, scale.get(k, 1.0)) for _, k, f in cols])
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))


def plot(rows: list[dict], path: Path, max_buffer: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["workers"])
        xs = [r["workers"] for r in mine]
        color = f"C{i}"
        ax.plot(xs, [r["updates_per_s"] for r in mine], "o-", color=color, label=f"{model}: coordinator")
        ax.plot(xs, [r["ceiling_updates_per_s"] for r in mine], "--", color=color,
                label=f"{model}: bare decode + aggregate (ceiling)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    counts = sorted({r["workers"] for r in rows})
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"simulated workers (concurrency; K = min({max_buffer}, workers))")
    ax.set_ylabel("accepted updates / s")
    ax.set_title("mqfed coordinator throughput against workers (real broker, 2 CPU cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _raise_exit(signum, _frame) -> None:
    raise SystemExit(128 + signum)  # SIGTERM: unwind, so every run cleans up after itself


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="kws-tiny,wav2vec2-base")
    p.add_argument("--workers", default="1,10,50,100")
    p.add_argument("--seconds", type=float, default=30.0, help="steady window per run, after the first version")
    p.add_argument("--max-buffer", type=int, default=10, help="K = min(this, workers)")
    p.add_argument("--bank", type=int, default=8, help="distinct payloads per model")
    p.add_argument("--repeat", type=int, default=3, help="runs of the bare baseline")
    p.add_argument("--procs", type=int, default=4, help="processes the simulated workers share")
    p.add_argument("--retention-gib", type=float, default=2.0, help="model stream retention per run")
    p.add_argument("--codec", default=None, help="default: the project's default codec")
    p.add_argument("--plot", default="docs/img/scale.png")
    p.add_argument("--rows", default=None, help="also write every run's measurements to this JSON file")
    args = p.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    counts = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    if not models or not counts or min(counts) < 1 or args.max_buffer < 1 or args.seconds <= 0 or args.procs < 1:
        p.error("need models, worker counts >= 1, --max-buffer >= 1, --seconds > 0, --procs >= 1")
    signal.signal(signal.SIGTERM, _raise_exit)
    started = time.monotonic()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # the small eval corpus, made below

    from coordinator_overhead import _payloads

    from broker import admin, ensure
    from common.compression import codecs
    from common.data import corpus
    from common.logs import configure
    from worker.config import WorkerSection

    args.codec = args.codec or codecs.DEFAULT_CODEC
    configure(level="WARNING")
    if not ensure.ensure():
        raise SystemExit("no broker (see README, Broker and containers)")
    admin.Management().request("GET", "/api/overview")  # the management API must answer (users, depths)
    defaults = WorkerSection(node="sim")
    worker_defaults = {"inline_max_bytes": defaults.inline_max_bytes, "chunk_bytes": defaults.chunk_bytes,
                       "heartbeat_s": defaults.heartbeat_s}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mqfed-scale-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "synth-ks"
        corpus.build(data, corpus.SynthSpec(seed=0, per_class=4, eval_per_class=2), progress=False)
        for model in models:
            print(f"{model}: encoding {args.bank} updates of its real shapes with {args.codec} ...", flush=True)
            state, bank = _payloads(model, args.bank, args.codec)
            numel = sum(t.numel() for t in state.values())
            bank_dir = tmp / f"bank-{model}"
            bank_dir.mkdir()
            for i, data_bytes in enumerate(bank):
                (bank_dir / f"{i:03d}.bin").write_bytes(data_bytes)
            ks = sorted({min(args.max_buffer, w) for w in counts})
            ceilings = {k: ceiling(state, bank, k, args.repeat) for k in ks}
            print(f"{model}: {numel / 1e6:.2f} M parameters, updates of {statistics.median(map(len, bank)) / 2**20:.2f}"
                  f" MiB; bare decode + aggregate " + ", ".join(f"K={k}: {v:.1f} updates/s" for k, v in ceilings.items()),
                  flush=True)
            del state, bank
            for w in counts:
                k = min(args.max_buffer, w)
                print(f"{model}: {w} workers, K = {k} ...", flush=True)
                t = time.monotonic()
                row = run_one(args, model, w, k, data, bank_dir, 4 * numel, worker_defaults, tmp)
                row["ceiling_updates_per_s"] = ceilings[k]
                row["ratio"] = row["updates_per_s"] / ceilings[k]
                rows.append(row)
                print(f"  {row['updates_per_s']:.2f} updates/s, {row['versions_per_s']:.3f} versions/s over"
                      f" {row['window_s']:.0f} s, latency p50 {_fmt(row['latency_p50_s'])} s, run"
                      f" {time.monotonic() - t:.0f} s", flush=True)
                if row["worker_error_count"] or row["rejected"] or row["dead_lettered"]:
                    print(f"  WARNING: {row['worker_error_count']} worker errors {row['worker_errors']},"
                          f" {row['rejected']} rejected, {row['dead_lettered']} dead-lettered", flush=True)
    print(f"\nscale: real coordinator + simulated workers, {args.codec}, steady windows of ~{args.seconds:.0f} s,"
          f" wall {time.monotonic() - started:.0f} s")
    print_table(rows)
    plot(rows, Path(args.plot), args.max_buffer)
    print(f"plot: {args.plot}")
    if args.rows:
        Path(args.rows).write_text(json.dumps(rows, indent=1))
    pick = next((r for r in rows if r["workers"] == 100 and r["model"] == "wav2vec2-base"), rows[-1])
    keys = ("workers", "updates_per_s", "ceiling_updates_per_s", "ratio", "versions_per_s", "latency_p50_s",
            "latency_p99_s", "staleness_mean", "coordinator_cpu_s", "coordinator_peak_rss_bytes", "broker_peak_mem_bytes", "model",
            "buffer_size", "window_s", "updates", "coordinator_cores", "coordinator_busy", "model_publish_s",
            "broker_cores", "machine_cores", "tasks_queue_peak", "updates_queue_peak")
    print(json.dumps({k: round(pick[k], 4) if isinstance(pick[k], float) else pick[k] for k in keys}))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every run cleaned up after itself on the way out
        raise SystemExit("scale: interrupted") from None
