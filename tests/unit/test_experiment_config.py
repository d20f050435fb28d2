"""The coordinator's ExperimentConfig and the worker's WorkerConfig through common.config.load_config:
every section from a file, defaults, each impossible value refused naming its key or section, unknown
keys with a suggestion, environment and --set overrides, sync mode's aggregator settings, TOML round trip."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, dump_toml, load_config, parse_overrides
from common.learning.training import TrainConfig
from coordinator.aggregator import AggregatorConfig
from coordinator.experiment import ExperimentConfig
from worker.config import WorkerConfig

EVERY_SECTION = """
[experiment]
name = "kws-sweep_1"
run_dir = "/tmp/runs/kws-sweep_1"
model_retention_bytes = 1000000

[model]
name = "kws-small"
freeze_feature_encoder = true
seed = 7

[data]
path = "/data/ks"
eval_split = "test"
eval_max_clips = 500
test_split = "validation"

[fedbuff]
mode = "async"
concurrency = 8
buffer_size = 3
max_staleness = 5
staleness = "hinge"
staleness_a = 2.0
staleness_b = 1
sample_weighting = false
max_update_norm = 50.0

[server_optimizer]
name = "fedadam"
lr = 0.01
beta1 = 0.8
beta2 = 0.95
eps = 1e-4

[local]
steps = 0
epochs = 1.5
batch_size = 16
learning_rate = 1e-4
warmup_steps = 10
schedule = "cosine"
weight_decay = 0.01
max_grad_norm = "none"
optimizer = "sgd"
time_shift_s = 0.0

[tasks]
deadline_s = 120
eval_every = 5
federated_eval_every = 10
codec = "topk:0.1+fp16+zlib"

[stop]
max_versions = 0
target_accuracy = 0.9
max_wall_s = 3600
"""


def _toml(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _refused(cls, tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cls, _toml(tmp_path, text), env={})
    return str(info.value)


# -- ExperimentConfig --------------------------------------------------------------------------------------

def test_every_section_loads_from_a_file(tmp_path):
    cfg = load_config(ExperimentConfig, _toml(tmp_path, EVERY_SECTION), env={})
    assert cfg.experiment.name == "kws-sweep_1" and cfg.experiment.run_path == "/tmp/runs/kws-sweep_1"
    assert cfg.experiment.model_retention_bytes == 1_000_000
    assert (cfg.model.name, cfg.model.freeze_feature_encoder, cfg.model.seed) == ("kws-small", True, 7)
    assert (cfg.data.path, cfg.data.eval_split, cfg.data.eval_max_clips, cfg.data.test_split) == \
        ("/data/ks", "test", 500, "validation")
    f = cfg.fedbuff
    assert (f.mode, f.concurrency, f.buffer_size, f.max_staleness, f.staleness) == ("async", 8, 3, 5, "hinge")
    assert (f.staleness_a, f.staleness_b, f.sample_weighting, f.max_update_norm) == (2.0, 1.0, False, 50.0)
    assert type(f.staleness_b) is float  # an int given for a float field becomes a float
    s = cfg.server_optimizer
    assert (s.name, s.lr, s.beta1, s.beta2, s.eps) == ("fedadam", 0.01, 0.8, 0.95, 1e-4)
    loc = cfg.local
    assert (loc.steps, loc.epochs, loc.batch_size, loc.learning_rate, loc.warmup_steps) == (0, 1.5, 16, 1e-4, 10)
    assert (loc.schedule, loc.weight_decay, loc.max_grad_norm, loc.optimizer, loc.time_shift_s) == \
        ("cosine", 0.01, None, "sgd", 0.0)
    t = cfg.tasks
    assert (t.deadline_s, t.eval_every, t.federated_eval_every, t.codec) == (120.0, 5, 10, "topk:0.1+fp16+zlib")
    assert (cfg.stop.max_versions, cfg.stop.target_accuracy, cfg.stop.max_wall_s) == (0, 0.9, 3600.0)
    agg = f.aggregator_config("kws-sweep_1")
    assert agg == AggregatorConfig(buffer_size=3, max_staleness=5, staleness="hinge", staleness_a=2.0,
                                   staleness_b=1.0, sample_weighting=False, max_update_norm=50.0,
                                   experiment="kws-sweep_1")
    assert isinstance(loc, TrainConfig)  # [local] is the worker's TrainConfig itself


def test_defaults_load_without_a_file():
    cfg = load_config(ExperimentConfig, env={})
    assert cfg == ExperimentConfig()
    assert cfg.experiment.run_path == "runs/kws"
    assert (cfg.fedbuff.mode, cfg.fedbuff.concurrency, cfg.fedbuff.buffer_size) == ("async", 4, 2)
    assert cfg.fedbuff.aggregator_config().buffer_size == 2


def test_an_empty_file_loads_the_defaults(tmp_path):
    assert load_config(ExperimentConfig, _toml(tmp_path, ""), env={}) == ExperimentConfig()


@pytest.mark.parametrize("section, line, names", [
    ("fedbuff", 'mode = "fast"', "fedbuff.mode"),
    ("fedbuff", "concurrency = 0", "fedbuff.concurrency"),
    ("fedbuff", "concurrency = true", "fedbuff.concurrency"),
    ("fedbuff", "buffer_size = 0", "buffer_size"),
    ("fedbuff", 'staleness = "cubic"', "'cubic'"),
    ("fedbuff", "max_staleness = -1", "max_staleness"),
    ("server_optimizer", 'name = "rmsprop"', "'rmsprop'"),
    ("server_optimizer", "lr = -1", "lr"),
    ("local", "learning_rate = 0", "learning_rate"),
    ("local", 'schedule = "cosine-ish"', "schedule"),
    ("local", "batch_size = 0", "batch_size"),
    ("tasks", 'codec = "gzip"', "'gzip'"),
    ("tasks", "deadline_s = 0", "tasks.deadline_s"),
    ("tasks", "eval_every = -1", "tasks.eval_every"),
    ("stop", "max_versions = 0\ntarget_accuracy = 0\nmax_wall_s = 0", "at least one of"),
    ("stop", "target_accuracy = 1.5", "stop.target_accuracy"),
    ("stop", "max_wall_s = inf", "stop.max_wall_s"),
    ("data", 'eval_split = "dev"', "data.eval_split"),
    ("data", 'test_split = "holdout"', "data.test_split"),
    ("data", "eval_max_clips = -5", "data.eval_max_clips"),
    ("experiment", 'name = "Bad Name"', "experiment.name"),
    ("experiment", "model_retention_bytes = 0", "experiment.model_retention_bytes"),
])
def test_impossible_values_are_refused_naming_key_and_section(tmp_path, section, line, names):
    msg = _refused(ExperimentConfig, tmp_path, f"[{section}]\n{line}\n")
    assert msg.startswith(section), msg  # the section (or the dotted key) comes first
    assert names in msg, msg
    assert "exp.toml" in msg, msg  # and where the value came from


def test_unknown_key_is_refused_with_a_suggestion(tmp_path):
    msg = _refused(ExperimentConfig, tmp_path, "[fedbuff]\nbufer_size = 3\n")
    assert "fedbuff.bufer_size" in msg and "did you mean buffer_size?" in msg, msg


def test_unknown_section_is_refused_with_a_suggestion(tmp_path):
    msg = _refused(ExperimentConfig, tmp_path, "[fedbuf]\nbuffer_size = 3\n")
    assert "fedbuf" in msg and "did you mean fedbuff?" in msg, msg


def test_environment_overrides_the_file(tmp_path):
    path = _toml(tmp_path, "[fedbuff]\nbuffer_size = 3\nconcurrency = 6\n")
    cfg = load_config(ExperimentConfig, path, env={"MQFED_FEDBUFF_BUFFER_SIZE": "5", "MQFED_STOP_MAX_WALL_S": "90"})
    assert (cfg.fedbuff.buffer_size, cfg.fedbuff.concurrency, cfg.stop.max_wall_s) == (5, 6, 90.0)
    msg = str(pytest.raises(ConfigError, load_config, ExperimentConfig, path,
                            env={"MQFED_FEDBUFF_BUFFER_SIZE": "0"}).value)
    assert "fedbuff" in msg and "MQFED_FEDBUFF_BUFFER_SIZE" in msg, msg


def test_set_overrides_are_parsed_as_typed_toml_values(tmp_path):
    sets = parse_overrides(["fedbuff.buffer_size=4", "experiment.name=abc", "stop.max_wall_s=1.5",
                       "fedbuff.sample_weighting=false", 'tasks.codec="none"', "fedbuff.max_update_norm = 2"])
    assert sets == {"fedbuff.buffer_size": 4, "experiment.name": "abc", "stop.max_wall_s": 1.5,
                    "fedbuff.sample_weighting": False, "tasks.codec": "none", "fedbuff.max_update_norm": 2}
    assert type(sets["fedbuff.buffer_size"]) is int and type(sets["stop.max_wall_s"]) is float
    path = _toml(tmp_path, "[fedbuff]\nbuffer_size = 3\n")
    cfg = load_config(ExperimentConfig, path, env={"MQFED_FEDBUFF_BUFFER_SIZE": "5"}, overrides=sets)
    assert cfg.fedbuff.buffer_size == 4  # --set beats the environment, which beats the file
    assert (cfg.experiment.name, cfg.stop.max_wall_s, cfg.tasks.codec) == ("abc", 1.5, "none")
    assert cfg.fedbuff.max_update_norm == 2.0 and cfg.fedbuff.sample_weighting is False
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["fedbuff.buffer_size"])


def test_sync_mode_sets_k_staleness_and_weighting_whatever_the_file_says(tmp_path):
    path = _toml(tmp_path, """
[fedbuff]
mode = "sync"
concurrency = 5
buffer_size = 2
max_staleness = 10
staleness = "hinge"
staleness_a = 3.0
sample_weighting = true
max_update_norm = 7.5
""")
    cfg = load_config(ExperimentConfig, path, env={})
    agg = cfg.fedbuff.aggregator_config("e")
    assert agg == AggregatorConfig(buffer_size=5, max_staleness=0, staleness="constant", staleness_a=0.5,
                                   staleness_b=0.0, sample_weighting=True, max_update_norm=7.5, experiment="e")
    assert agg == AggregatorConfig.synchronous(5, max_update_norm=7.5, experiment="e")


def test_dump_toml_loads_back_equal(tmp_path):
    every = load_config(ExperimentConfig, _toml(tmp_path, EVERY_SECTION), env={})
    unbounded = load_config(ExperimentConfig, env={}, overrides={"fedbuff.max_staleness": "none"})
    assert unbounded.fedbuff.max_staleness is None and every.local.max_grad_norm is None
    for cfg in (ExperimentConfig(), every, unbounded):
        again = load_config(ExperimentConfig, _toml(tmp_path, dump_toml(cfg), "dumped.toml"), env={})
        assert again == cfg


# -- WorkerConfig --------------------------------------------------------------------------------------------

WORKER = """
[worker]
node = "gpu-node-3"
experiment = "kws-sweep_1"
devices = ["cuda:0", "cuda:1"]
data = "/data/kws"
shard = "speaker:1/4"
cache_dir = "/tmp/cache"
threads = 2
slowdown = 3
delay_s = 0.5
heartbeat_s = 5
"""


def test_worker_config_loads_from_a_file_and_round_trips(tmp_path):
    cfg = load_config(WorkerConfig, _toml(tmp_path, WORKER), env={})
    w = cfg.worker
    assert (w.node, w.experiment, w.devices, w.data, w.shard) == \
        ("gpu-node-3", "kws-sweep_1", ["cuda:0", "cuda:1"], "/data/kws", "speaker:1/4")
    assert (w.cache_dir, w.threads, w.slowdown, w.delay_s, w.heartbeat_s) == ("/tmp/cache", 2, 3.0, 0.5, 5.0)
    assert load_config(WorkerConfig, _toml(tmp_path, dump_toml(cfg), "dumped.toml"), env={}) == cfg
    env = {"MQFED_WORKER_DEVICES": '["cpu"]', "MQFED_WORKER_SLOWDOWN": "2"}
    over = load_config(WorkerConfig, _toml(tmp_path, WORKER), env=env, overrides={"worker.threads": 1})
    assert (over.worker.devices, over.worker.slowdown, over.worker.threads) == (["cpu"], 2.0, 1)


def test_worker_defaults_load():
    cfg = load_config(WorkerConfig, env={})
    assert cfg.worker.devices == ["cpu"] and cfg.worker.shard == "all" and cfg.worker.node


@pytest.mark.parametrize("line, names", [
    ('devices = ["gpu0"]', "'gpu0'"),
    ('devices = ["cuda:x"]', "'cuda:x'"),
    ('devices = ["cuda:0", "cpu", "cuda:0"]', "twice"),
    ("devices = []", "worker.devices"),
    ('shard = "iid:3/2"', "'iid:3/2'"),
    ('shard = "iid"', "'iid'"),
    ("slowdown = 0.5", "worker.slowdown"),
    ("delay_s = -1", "worker.delay_s"),
    ("heartbeat_s = 0", "worker.heartbeat_s"),
    ("threads = -1", "worker.threads"),
    ('node = "gpu node"', "worker.node"),
    ('node = ""', "worker.node"),
    ('node = "a/b"', "worker.node"),
])
def test_worker_impossible_values_are_refused(tmp_path, line, names):
    msg = _refused(WorkerConfig, tmp_path, f"[worker]\n{line}\n")
    assert msg.startswith("worker"), msg
    assert names in msg, msg


def test_worker_unknown_key_is_refused_with_a_suggestion(tmp_path):
    msg = _refused(WorkerConfig, tmp_path, '[worker]\ndevice = ["cpu"]\n')
    assert "worker.device" in msg and "did you mean devices?" in msg, msg
