"""Run one Flower arm of the peer benchmark and measure it (README.md in this folder says how and why).

    python tests/benchmarks/flower_peer/runner.py --arm deployment|legacy [--target 0.3] [--clients 4] ...

`run_deployment(p)` and `run_legacy(p)` return {"arm", "time_to_target_s", "rounds_to_target", "rounds",
"cpu_s", "wall_s", "startup_s", "best_accuracy", ...}. Each runs the arm in an inner process of its own
(this file, --inner), a child subreaper that starts, stops and reaps every process of the arm, so that
`cpu_s` covers all of them, grandchildren included; afterwards no process of the run is left (checked by
an environment marker; any found is killed and listed under "survivors").
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `flower_peer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flower_peer import procs  # noqa: E402
from flower_peer.task import Params, load_params, prepare_cache  # noqa: E402

HERE = Path(__file__).resolve().parent
APP_DIR = HERE / "app"
BENCH_DIR = HERE.parent
REPO = HERE.parents[2]
VENV_BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flower-superexec, flwr live here

SUPEREXEC_POLL_S = 0.25  # the SuperNodes' FLWR_SUPEREXEC_TASK_POLL_INTERVAL (Flower: 1 s, minimum 0.01)
REPLY_POLL_S = 0.1  # the ServerApp's pull interval for replies (Flower's send_and_receive: 3 s)
STARTUP_LIMIT_S = 600.0  # launch to round 1's dispatch
STOP_SLACK_S = 300.0  # beyond max_s and the evaluations, before the runner gives up on the server

__all__ = ["Params", "run_deployment", "run_legacy"]


def run_deployment(p: Params, *, superexec_poll_s: float = SUPEREXEC_POLL_S, reply_poll_s: float = REPLY_POLL_S) -> dict:
    """Flower's deployment runtime: a SuperLink, `p.clients` SuperNodes, `flwr run` of the app in app/.
    Raises RuntimeError when the run fails (the message names the log to read)."""
    return _run("deployment", p, {"superexec_poll_s": superexec_poll_s, "reply_poll_s": reply_poll_s})


def run_legacy(p: Params) -> dict:
    """Flower's legacy `start_server` and long-lived `start_client` processes over gRPC. Raises RuntimeError
    when the run fails."""
    return _run("legacy", p, {})


# -- the outer side: in the caller's process ------------------------------------------------------------------
def _run(arm: str, p: Params, options: dict) -> dict:
    run_id = f"{arm}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    run_dir = Path(p.work_dir).resolve() / run_id
    run_dir.mkdir(parents=True)
    p = dataclasses.replace(p, data=os.path.abspath(p.data), work_dir=str(Path(p.work_dir).resolve()))
    (run_dir / "params.json").write_text(p.to_json())
    (run_dir / "options.json").write_text(json.dumps({"arm": arm, "run_id": run_id, **options}))
    env = {**os.environ, procs.MARKER: run_id, "PYTHONPATH": _pythonpath()}
    with (run_dir / "inner.log").open("ab") as log:
        inner = subprocess.Popen([sys.executable, str(HERE / "runner.py"), "--inner", str(run_dir)], env=env,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        inner.wait(timeout=STARTUP_LIMIT_S + 3 * p.max_s + 2 * STOP_SLACK_S)
    except BaseException:  # a timeout, or Ctrl-C: the inner process stops the arm on SIGTERM
        os.killpg(inner.pid, signal.SIGTERM)
        try:
            inner.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(inner.pid, signal.SIGKILL)
            inner.wait()
        raise
    finally:
        left = procs.survivors(run_id)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    result_path = run_dir / "result.json"
    if inner.returncode != 0 or not result_path.exists():
        tail = (run_dir / "inner.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"flower arm {arm} failed (exit {inner.returncode}; logs in {run_dir}):\n{tail}")
    result = json.loads(result_path.read_text())
    result["survivors"] = [procs.command(pid) or str(pid) for pid in left]
    return result


def _pythonpath() -> str:
    extra = os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(BENCH_DIR), str(REPO)] + ([extra] if extra else []))


# -- the inner side: a process of its own, child subreaper of the arm's processes ------------------------------
def _inner(run_dir: Path) -> None:
    options = json.loads((run_dir / "options.json").read_text())
    p = load_params(run_dir / "params.json")
    prepare_cache(p, Path(p.work_dir) / "cache")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": _pythonpath()}
    signal.signal(signal.SIGTERM, _interrupted)
    sup = procs.Supervisor(run_dir / "logs", env)
    launched = time.time()
    try:
        if options["arm"] == "deployment":
            watch = _launch_deployment(p, sup, run_dir, options)
        else:
            watch = _launch_legacy(p, sup, run_dir)
        events = _follow(p, sup, run_dir / "events.jsonl", watch, launched)
    finally:
        killed = sup.stop()
    wall_s = time.time() - launched
    result = _result(options["arm"], p, events, sup.cpu_s(), wall_s, launched)
    result.update(stop_reason=events[-1].get("reason"), killed=killed, run_dir=str(run_dir),
                  settings={k: v for k, v in options.items() if k not in ("arm", "run_id")})
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))


def _interrupted(*_args) -> None:
    raise KeyboardInterrupt("SIGTERM")


def _launch_deployment(p: Params, sup: procs.Supervisor, run_dir: Path, options: dict) -> list[str]:
    """SuperLink, SuperNodes, then `flwr run`; returns the names of the processes that must stay up."""
    homes = run_dir / "flwr-home"
    poll = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(options["superexec_poll_s"])}
    link = procs.free_port()
    sup.start("superlink", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                            "--port", str(link)], env={"FLWR_HOME": str(homes / "superlink")}, cwd=str(run_dir))
    for i in range(p.clients):
        sup.start(f"supernode-{i}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                                     "--port", str(procs.free_port()),
                                     "--node-config", f"partition-id={i} num-partitions={p.clients}"],
                  env={"FLWR_HOME": str(homes / f"supernode-{i}"), **poll}, cwd=str(run_dir))
    deadline = time.monotonic() + 60
    while not procs.port_open(link):
        if time.monotonic() > deadline or sup.returncode("superlink") is not None:
            raise RuntimeError(f"the SuperLink did not open port {link}: see {sup.log_dir}/superlink.log")
        sup.reap()
        time.sleep(0.05)
    cli_home = homes / "cli"
    cli_home.mkdir(parents=True, exist_ok=True)
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "peer"\n\n[superlink.peer]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    run_config = f"run-dir={json.dumps(str(run_dir))} reply-poll-s={float(options['reply_poll_s'])}"
    sup.start("flwr-run", ["flwr", "run", str(APP_DIR), "peer", "--run-config", run_config],
              env={"FLWR_HOME": str(cli_home)}, cwd=str(run_dir))
    return ["superlink"] + [f"supernode-{i}" for i in range(p.clients)]


def _launch_legacy(p: Params, sup: procs.Supervisor, run_dir: Path) -> list[str]:
    port = procs.free_port()
    base = [sys.executable, "-m", "flower_peer.legacy"]
    sup.start("server", base + ["server", str(run_dir), str(port)], cwd=str(run_dir))
    deadline = time.time() + STARTUP_LIMIT_S  # the legacy start_client does not retry a refused connection
    while not procs.port_open(port):
        sup.reap()
        if sup.returncode("server") is not None or time.time() > deadline:
            raise RuntimeError(f"the legacy server did not listen on {port}: see {sup.log_dir}/server.log")
        time.sleep(0.2)
    for i in range(p.clients):
        sup.start(f"client-{i}", base + ["client", str(run_dir), str(port), str(i)], cwd=str(run_dir))
    return ["server"] + [f"client-{i}" for i in range(p.clients)]


def _follow(p: Params, sup: procs.Supervisor, path: Path, watch: list[str], launched: float) -> list[dict]:
    """The server's events until its `end` event; raises RuntimeError on an `error` event, a watched process
    that exits, `flwr run` failing, or a deadline (STARTUP_LIMIT_S to t0; then max_s + evaluation + slack)."""
    events: list[dict] = []
    offset = 0
    while True:
        sup.reap()
        if path.exists():
            with path.open() as f:
                f.seek(offset)
                while (line := f.readline()).endswith("\n"):
                    events.append(json.loads(line))
                    offset = f.tell()
        kinds = [e["event"] for e in events]
        if "error" in kinds:
            raise RuntimeError(f"the server failed: {events[kinds.index('error')]['message']} (logs in {sup.log_dir})")
        if "end" in kinds:
            return events
        for name in watch + (["flwr-run"] if "flwr-run" in sup.procs else []):
            code = sup.returncode(name)
            if code is not None and (name != "flwr-run" or code != 0):
                raise RuntimeError(f"{name} exited with {code} before the end: see {sup.log_dir}/{name}.log")
        if "t0" not in kinds:
            if time.time() - launched > STARTUP_LIMIT_S:
                raise RuntimeError(f"round 1 not dispatched {STARTUP_LIMIT_S:.0f} s after launch (logs in {sup.log_dir})")
        else:
            t0 = events[kinds.index("t0")]["wall"]
            evals = sum(e.get("eval_s", 0.0) for e in events)
            if time.time() - t0 > p.max_s + evals + STOP_SLACK_S:
                raise RuntimeError(f"the server did not stop {STOP_SLACK_S:.0f} s after max_s (logs in {sup.log_dir})")
        time.sleep(0.1)


def _result(arm: str, p: Params, events: list[dict], cpu_s: float, wall_s: float, launched: float) -> dict:
    t0 = next(e["wall"] for e in events if e["event"] == "t0")
    keys = ("round", "end_s", "accuracy", "eval_s", "max_task_s", "bytes_down", "bytes_up")
    rounds = [{k: e[k] for k in keys} for e in events if e["event"] == "round"]
    hit = next((r for r in rounds if r["accuracy"] >= p.target), None)
    return {"arm": "flower" if arm == "deployment" else "flower_legacy",
            "time_to_target_s": hit["end_s"] if hit else None, "rounds_to_target": hit["round"] if hit else None,
            "rounds": rounds, "cpu_s": cpu_s, "wall_s": wall_s, "startup_s": t0 - launched,
            "best_accuracy": max((r["accuracy"] for r in rounds), default=0.0),
            "eval_cpu_s": sum(e["eval_cpu_s"] for e in events if e["event"] == "round"),
            "overhead_s": [round(b["end_s"] - a["end_s"] - b["max_task_s"], 3) for a, b in zip(rounds, rounds[1:])],
            "breakdown": _breakdown([e for e in events if e["event"] == "round"])}


def _breakdown(rounds: list[dict]) -> dict:
    """Medians over rounds 2.. of where a round's time goes on its slowest client's path (wall seconds):
    to_client (dispatch until the client process exists, or until fit is called: legacy), client_start
    (process start to our ClientApp imported: interpreter, Flower, FAB install, torch/transformers),
    to_task (call to training start: model build, weights and shard loading), task, back (task end until
    the aggregate exists: reply, transport, polls, aggregation)."""
    parts: dict[str, list[float]] = {}
    for e in rounds[1:]:
        if not e.get("clients"):
            continue
        c = max(e["clients"], key=lambda c: c["task_end"])
        first = c.get("started_wall", c["called_wall"])
        steps = {"to_client": first - e["dispatch_wall"], "to_task": c["task_start"] - c["called_wall"],
                 "task": c["task_end"] - c["task_start"], "back": e["aggregated_wall"] - c["task_end"]}
        if "started_wall" in c:
            steps["client_start"] = c["imported_wall"] - c["started_wall"]
        for k, v in steps.items():
            parts.setdefault(k, []).append(v)
    return {k: round(statistics.median(v), 3) for k, v in parts.items()}


# -- command line ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """`--arm deployment|legacy` with Params as flags: runs it and prints the result as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inner", help=argparse.SUPPRESS)
    ap.add_argument("--arm", choices=("deployment", "legacy"))
    ap.add_argument("--data", default=str(REPO / ".cache/mqfed/synth-ks-300"))  # corpus.BENCHMARK_DIR
    ap.add_argument("--work-dir", default=str(REPO / "runs/flower-peer"))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--slowdown", type=float, default=4.0)
    ap.add_argument("--local-steps", type=int, default=40)
    ap.add_argument("--eval-clips", type=int, default=300)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--max-rounds", type=int, default=60)
    ap.add_argument("--max-s", type=float, default=1200.0)
    ap.add_argument("--superexec-poll-s", type=float, default=SUPEREXEC_POLL_S)
    ap.add_argument("--reply-poll-s", type=float, default=REPLY_POLL_S)
    args = ap.parse_args(argv)
    if args.inner:
        _inner(Path(args.inner))
        return
    if not args.arm:
        ap.error("--arm is required")
    from common.learning.config import TrainConfig

    p = Params(data=args.data, work_dir=args.work_dir, clients=args.clients, slowdown=args.slowdown,
               local=TrainConfig(steps=args.local_steps), eval_clips=args.eval_clips, target=args.target,
               max_rounds=args.max_rounds, max_s=args.max_s)
    if args.arm == "deployment":
        result = run_deployment(p, superexec_poll_s=args.superexec_poll_s, reply_poll_s=args.reply_poll_s)
    else:
        result = run_legacy(p)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
