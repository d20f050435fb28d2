"""Bad configuration is refused at start: the real CLIs (`python -m coordinator.cli run`, `python -m
worker.cli run`) given an unknown key, a value of the wrong type or an impossible value, in the TOML file,
in an MQFED_ environment variable or a --set override, exit with status 2 and a one-line error on stderr
that names the key (and where the value came from), without a traceback, and declare nothing on the broker
(the experiment's queues do not exist afterwards: a passive queue_declare answers 404).

The processes run two at a time (each imports torch and transformers before it reads its configuration:
several seconds of CPU each on a shared machine), so each CLI runs once per kind of fault and layer; the
other faults go through the same loader in-process (`common.config.load_config`, which both CLIs call).
"""
from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import uuid

import pika
import pytest

from broker import topology
from common.transport.connection import connect
from coordinator.local_federation import ROOT, child_env

pytestmark = pytest.mark.faults

SESSION = uuid.uuid4().hex[:6]


def _coordinator(toml: str = "", env: dict | None = None, args: tuple = ()) -> dict:
    return {"cli": "coordinator", "toml": toml, "env": env or {}, "args": args}


def _worker(toml: str = "", env: dict | None = None, args: tuple = ()) -> dict:
    return {"cli": "worker", "toml": toml, "env": env or {}, "args": args}


# case: (how to start, what stderr must contain). Each CLI, once per kind of fault and layer.
CASES = {
    "coordinator-unknown-key": (_coordinator("[fedbuff]\nbuffersize = 4\n"),
                                ["fedbuff.buffersize: unknown key; did you mean buffer_size?", "(from "]),
    "coordinator-wrong-type": (_coordinator('[fedbuff]\nbuffer_size = "four"\n'),
                               ["fedbuff.buffer_size: expected int, got str 'four'"]),
    "coordinator-impossible-value": (_coordinator("[stop]\ntarget_accuracy = 1.5\n"),
                                     ["stop.target_accuracy must be in [0, 1], got 1.5"]),
    "coordinator-env-impossible": (_coordinator(env={"MQFED_FEDBUFF_MAX_STALENESS": "-1"}),
                                   ["max_staleness must be an int >= 0 or None, got -1", "MQFED_FEDBUFF_MAX_STALENESS"]),
    "coordinator-override-unknown-key": (_coordinator(args=("--set", "fedbuff.bufer_size=3")),
                                         ["fedbuff.bufer_size: unknown key; did you mean buffer_size? (from override)"]),
    "worker-unknown-key": (_worker('[worker]\nnode_name = "n1"\n'),
                           ["worker.node_name: unknown key; did you mean node?"]),
    "worker-wrong-type": (_worker('[worker]\nheartbeat_s = "often"\n'),
                          ["worker.heartbeat_s: expected float, got str 'often'"]),
    "worker-impossible-value": (_worker("[worker]\nchunk_bytes = 10\n"),
                                ["worker.chunk_bytes must be an int in [1024, 64 MiB], got 10"]),
    "worker-env-wrong-type": (_worker(env={"MQFED_WORKER_THREADS": "many"}),
                              ["worker.threads: expected int, got str 'many' (from MQFED_WORKER_THREADS)"]),
}

#: More faults, through the same loader the CLIs call (common.config.load_config), in-process: fast.
#: case: (config class name, TOML text, environment, what the error must contain)
LOADER_CASES = {
    "unknown-section": ("experiment", "[fedbuf]\nbuffer_size = 4\n", {}, ["fedbuf: unknown key; did you mean fedbuff?"]),
    "bool-for-int": ("experiment", "[local]\nsteps = true\n", {}, ["local.steps: expected int, got bool"]),
    "section-given-a-value": ("experiment", "fedbuff = 3\n", {}, ["fedbuff: is a section, expected a table"]),
    "zero-buffer-size": ("experiment", "[fedbuff]\nbuffer_size = 0\n", {},
                         ["fedbuff:", "buffer_size must be an int >= 1, got 0"]),
    "zero-transfer-timeout": ("experiment", "[tasks]\ntransfer_timeout_s = 0.0\n", {},
                              ["tasks.transfer_timeout_s must be a finite number > 0, got 0.0"]),
    "unknown-codec": ("experiment", '[tasks]\ncodec = "gzip"\n', {}, ["tasks:", "unknown stage 'gzip'"]),
    "unknown-model-dtype": ("experiment", '[tasks]\nmodel_dtype = "float8"\n', {},
                            ["tasks.model_dtype must be one of float32, float16, bfloat16, got 'float8'"]),
    "negative-version-lag": ("experiment", "", {"MQFED_TASKS_VERSION_LAG": "-1"},
                             ["tasks.version_lag must be an int >= 0, got -1", "MQFED_TASKS_VERSION_LAG"]),
    "no-stop-condition": ("experiment", "[stop]\nmax_versions = 0\n", {},
                          ["stop: set at least one of max_versions, target_accuracy, max_wall_s"]),
    "bad-experiment-name": ("experiment", '[experiment]\nname = "My Experiment"\n', {},
                            ["experiment.name 'My Experiment' must match"]),
    "env-wrong-type": ("experiment", "", {"MQFED_FEDBUFF_BUFFER_SIZE": "many"},
                       ["fedbuff.buffer_size: expected int, got str 'many' (from MQFED_FEDBUFF_BUFFER_SIZE)"]),
    "worker-bad-device": ("worker", '[worker]\ndevices = ["gpu0"]\n', {}, ["worker.devices: 'gpu0'"]),
    "worker-bad-shard": ("worker", '[worker]\nshard = "iid:3/2"\n', {}, ["worker:", "(from "]),
    "worker-env-impossible": ("worker", "", {"MQFED_WORKER_HEARTBEAT_S": "0"},
                              ["worker.heartbeat_s must be a finite number >= 0.1, got 0", "MQFED_WORKER_HEARTBEAT_S"]),
    "worker-inline-above-message-limit": ("worker", "[worker]\ninline_max_bytes = 67108864\n", {},
                                          ["worker.inline_max_bytes must be an int in [1024, 64 MiB - 1 MiB]"]),
    "zero-checkpoint-cadence": ("experiment", "[checkpoint]\nevery_versions = 0\n", {},
                                ["checkpoint.every_versions must be an int >= 1, got 0"]),
    "infinite-checkpoint-period": ("experiment", "", {"MQFED_CHECKPOINT_EVERY_S": "inf"},
                                   ["checkpoint.every_s must be a finite number > 0, got inf",
                                    "MQFED_CHECKPOINT_EVERY_S"]),
    "worker-no-model-cache": ("worker", "[worker]\ncache_versions = 0\n", {},
                              ["worker.cache_versions must be an int >= 1, got 0"]),
    "zero-norm-bound-factor": ("experiment", "[fedbuff]\nnorm_bound_factor = 0.0\n", {},
                               ["norm_bound_factor must be a finite number > 0 or None, got 0.0", "(from "]),
    "env-zero-norm-bound-window": ("experiment", "", {"MQFED_FEDBUFF_NORM_BOUND_WINDOW": "0"},
                                   ["norm_bound_window must be an int >= 1, got 0", "MQFED_FEDBUFF_NORM_BOUND_WINDOW"]),
    "negative-norm-bound-initial": ("experiment", "[fedbuff]\nnorm_bound_initial = -1.0\n", {},
                                    ["norm_bound_initial must be a finite number > 0 or None, got -1.0"]),
    "metrics-port-out-of-range": ("experiment", "[metrics]\nport = 70000\n", {},
                                  ["metrics.port must be a port in [0, 65535] (0: off), got 70000", "(from "]),
    "env-metrics-port-not-a-number": ("experiment", "", {"MQFED_METRICS_PORT": "http"},
                                      ["metrics.port: expected int, got str 'http' (from MQFED_METRICS_PORT)"]),
    "env-metrics-host-with-spaces": ("experiment", "", {"MQFED_METRICS_HOST": "0.0.0.0 --evil"},
                                     ["metrics.host must be a host name or an IP address", "MQFED_METRICS_HOST"]),
    "worker-metrics-port-out-of-range": ("worker", "[worker]\nmetrics_port = -1\n", {},
                                         ["worker.metrics_port must be a port in [0, 65535] (0: off), got -1"]),
    "worker-metrics-ports-past-65535": ("worker", '[worker]\nmetrics_port = 65535\ndevices = ["cuda:0", "cuda:1"]\n',
                                        {}, ["worker.metrics_port 65535 + 1 (one port per device) is above 65535"]),
    "worker-env-metrics-host-a-url": ("worker", "", {"MQFED_WORKER_METRICS_HOST": "http://0.0.0.0/"},
                                      ["worker.metrics_host must be a host name or an IP address",
                                       "MQFED_WORKER_METRICS_HOST"]),
}


def _experiment(case: str) -> topology.Topology:
    return topology.Topology(f"badcfg-{SESSION}-{sorted(CASES).index(case)}")


def _run(case: str, tmp_path) -> subprocess.CompletedProcess:
    spec, _ = CASES[case]
    name = _experiment(case).experiment
    path = tmp_path / f"{case}.toml"
    if spec["cli"] == "coordinator":
        head = f'[experiment]\nname = "{name}"\nrun_dir = "{tmp_path / case}"\n\n'
        argv = ["coordinator.cli", "run", "--config", str(path), *spec["args"]]
    else:
        head = f'[worker]\nexperiment = "{name}"\ndata = "{tmp_path / "no-data"}"\n\n'
        argv = ["worker.cli", "run", "--config", str(path), *spec["args"]]
    toml, table = spec["toml"], "worker" if spec["cli"] == "worker" else "experiment"
    if toml.startswith(f"[{table}]\n"):  # the head's table: continue it
        toml = toml[len(table) + 3:]
    path.write_text(head + toml)
    env = {k: v for k, v in child_env().items() if not k.startswith("MQFED_") or k in ("MQFED_LOG_JSON",)}
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**env, **spec["env"]})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, broker_url):
    """Every case's finished process (run two at a time)."""
    tmp = tmp_path_factory.mktemp("bad-config")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(_run, case, tmp) for case in CASES}
        return {case: f.result() for case, f in futures.items()}


def _declared(topo: topology.Topology) -> list[str]:
    """The experiment's queues that exist on the broker (passive declare; 404 closes the channel)."""
    conn = connect("test", device="bad-config", attempts=3)
    found = []
    try:
        for queue in topo.queues():
            ch = conn.channel()
            try:
                ch.queue_declare(queue.name, passive=True)
                found.append(queue.name)
                ch.close()
            except pika.exceptions.ChannelClosedByBroker as exc:
                assert exc.reply_code == 404, exc
    finally:
        conn.close()
    return found


@pytest.mark.parametrize("case", CASES)
def test_bad_configuration_is_refused_at_start_naming_the_key_and_touching_nothing(runs, case):
    _, expected = CASES[case]
    done = runs[case]
    assert done.returncode == 2, f"exit {done.returncode}\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr, done.stderr
    for text in expected:
        assert text in done.stderr, f"{text!r} not in stderr: {done.stderr}"
    assert _declared(_experiment(case)) == []


def test_a_misspelt_key_in_the_environment_is_refused_naming_the_variable(tmp_path):
    from common.config import ConfigError, load_config
    from coordinator.experiment import ExperimentConfig

    with pytest.raises(ConfigError, match="MQFED_FEDBUFF_BUFER_SIZE"):
        load_config(ExperimentConfig, env={"MQFED_FEDBUFF_BUFER_SIZE": "4"})


@pytest.mark.parametrize("case", LOADER_CASES)
def test_bad_configuration_is_refused_by_the_loader_naming_the_key(case, tmp_path):
    from common.config import ConfigError, load_config
    from coordinator.experiment import ExperimentConfig
    from worker.config import WorkerConfig

    kind, toml, env, expected = LOADER_CASES[case]
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as refused:
        load_config(ExperimentConfig if kind == "experiment" else WorkerConfig, path, env=env)
    for text in expected:
        assert text in str(refused.value)
