"""Config loading: defaults < TOML file < environment < overrides, strict checking with the key and its
source named, __post_init__ errors wrapped with the section, and dump_toml/load_config round trips."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from common.config import ConfigError, config_to_dict, dump_toml, load_config


@dataclass(frozen=True)
class Retry:
    attempts: int = 3
    backoff_s: float = 0.5


@dataclass(frozen=True)
class Fedbuff:
    buffer_size: int = 10
    server_lr: float = 1.0
    max_staleness: int | None = 20
    staleness: Literal["constant", "polynomial"] = "polynomial"

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ValueError(f"Fedbuff.buffer_size must be an int >= 1, got {self.buffer_size}")


@dataclass(frozen=True)
class Worker:
    node: str = "local"
    devices: tuple[str, ...] = ("cpu",)
    data_dir: Path = Path("data")
    retry: Retry = field(default_factory=Retry)


@dataclass(frozen=True)
class Experiment:
    name: str = "exp"
    seed: int = 0
    enabled: bool = True
    notes: str | None = None
    tags: list[str] = field(default_factory=list)
    class_weights: dict[str, float] = field(default_factory=dict)
    shape: tuple[int, float] = (1, 2.0)
    fedbuff: Fedbuff = field(default_factory=Fedbuff)
    worker: Worker = field(default_factory=lambda: Worker(node="default-node", retry=Retry(attempts=5)))


@dataclass(frozen=True)
class Required:
    url: str
    port: int = 5672
    vhost: str | None = "/"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"Required.port must be in 1..65535, got {self.port}")


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _refused(*args, **kwargs) -> str:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


def test_defaults_without_file_env_or_overrides():
    assert load_config(Experiment, env={}) == Experiment()


def test_file_overrides_defaults_and_keeps_the_rest(tmp_path):
    path = _toml(tmp_path, 'name = "ks"\ntags = ["a", "b"]\n[fedbuff]\nbuffer_size = 8\n')
    cfg = load_config(Experiment, path, env={})
    assert cfg == Experiment(name="ks", tags=["a", "b"], fedbuff=Fedbuff(buffer_size=8))


def test_env_overrides_file(tmp_path):
    path = _toml(tmp_path, 'name = "ks"\n[fedbuff]\nbuffer_size = 8\nserver_lr = 0.1\n')
    cfg = load_config(Experiment, path, env={"MQFED_FEDBUFF_BUFFER_SIZE": "4", "MQFED_NAME": "from-env"})
    assert (cfg.name, cfg.fedbuff.buffer_size, cfg.fedbuff.server_lr) == ("from-env", 4, 0.1)


def test_override_dict_beats_env_and_file(tmp_path):
    path = _toml(tmp_path, "[fedbuff]\nbuffer_size = 8\n")
    cfg = load_config(Experiment, path, env={"MQFED_FEDBUFF_BUFFER_SIZE": "4"},
                      overrides={"fedbuff.buffer_size": 2, "seed": 7})
    assert (cfg.fedbuff.buffer_size, cfg.seed) == (2, 7)


def test_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("MQFED_SEED", "11")
    assert load_config(Experiment).seed == 11


def test_env_prefix_is_configurable():
    cfg = load_config(Experiment, env={"KWS_SEED": "3", "MQFED_SEED": "4"}, env_prefix="KWS_")
    assert cfg.seed == 3


def test_env_values_are_parsed_as_toml_values():
    cfg = load_config(Experiment, env={
        "MQFED_SEED": "4", "MQFED_FEDBUFF_SERVER_LR": "0.5", "MQFED_ENABLED": "false",
        "MQFED_TAGS": '["a", "b"]', "MQFED_NOTES": '"quoted"', "MQFED_CLASS_WEIGHTS": "{yes = 2, no = 0.5}",
        "MQFED_WORKER_DEVICES": '["cuda:0", "cuda:1"]', "MQFED_SHAPE": "[3, 4]"})
    assert (cfg.seed, cfg.fedbuff.server_lr, cfg.enabled, cfg.tags, cfg.notes) == (4, 0.5, False, ["a", "b"], "quoted")
    assert cfg.class_weights == {"yes": 2.0, "no": 0.5} and cfg.worker.devices == ("cuda:0", "cuda:1")
    assert cfg.shape == (3, 4.0) and isinstance(cfg.shape[1], float)


def test_env_values_that_are_not_toml_or_do_not_fit_are_bare_strings():
    cfg = load_config(Experiment, env={"MQFED_WORKER_NODE": "node-a", "MQFED_NAME": "123",
                                       "MQFED_NOTES": "true", "MQFED_WORKER_DATA_DIR": "/srv/data"})
    assert (cfg.worker.node, cfg.name, cfg.notes, cfg.worker.data_dir) == ("node-a", "123", "true", Path("/srv/data"))


def test_env_value_of_wrong_type_refused_naming_key_and_variable():
    msg = _refused(Experiment, env={"MQFED_FEDBUFF_BUFFER_SIZE": "four"})
    assert "fedbuff.buffer_size" in msg and "MQFED_FEDBUFF_BUFFER_SIZE" in msg and "'four'" in msg


def test_unknown_key_in_file_refused_with_suggestion(tmp_path):
    msg = _refused(Experiment, _toml(tmp_path, "[fedbuff]\nbufer_size = 4\n"))
    assert "fedbuff.bufer_size: unknown key; did you mean buffer_size?" in msg and str(tmp_path / "exp.toml") in msg
    assert "did you mean fedbuff?" in _refused(Experiment, _toml(tmp_path, "[fedbuf]\nbuffer_size = 4\n"))
    assert "worker.retry.attempt: unknown key; did you mean attempts?" in _refused(
        Experiment, _toml(tmp_path, "[worker.retry]\nattempt = 4\n"))
    assert "did you mean" not in _refused(Experiment, _toml(tmp_path, "zzz = 1\n"))


def test_unknown_override_key_refused_with_suggestion():
    msg = _refused(Experiment, overrides={"fedbuff.server_rl": 0.1})
    assert msg == "fedbuff.server_rl: unknown key; did you mean server_lr? (from override)"


@pytest.mark.parametrize("line, key, got", [
    ('name = 3', "name", "got int 3"),
    ('seed = "3"', "seed", "got str '3'"),
    ('seed = true', "seed", "got bool True"),
    ('seed = 1.5', "seed", "got float 1.5"),
    ('enabled = 1', "enabled", "got int 1"),
    ('tags = ["a", 2]', "tags[1]", "got int 2"),
    ('tags = "a"', "tags", "got str 'a'"),
    ('shape = [1, 2, 3]', "shape", "got list"),
    ('class_weights = {a = "x"}', "class_weights.a", "got str 'x'"),
    ('[fedbuff]\nserver_lr = "fast"', "fedbuff.server_lr", "got str 'fast'"),
    ('[fedbuff]\nstaleness = "hinge"', "fedbuff.staleness", "got str 'hinge'"),
])
def test_wrong_type_in_file_refused_naming_key_and_file(tmp_path, line, key, got):
    path = _toml(tmp_path, line + "\n")
    msg = _refused(Experiment, path)
    assert msg.startswith(f"{key}: expected ") and got in msg and f"(from {path})" in msg


def test_wrong_type_in_override_refused_naming_override():
    assert _refused(Experiment, overrides={"fedbuff.buffer_size": "4"}) == \
        "fedbuff.buffer_size: expected int, got str '4' (from override)"
    assert "fedbuff.buffer_size" in _refused(Experiment, overrides={"fedbuff.buffer_size": None})


def test_int_is_accepted_for_float(tmp_path):
    cfg = load_config(Experiment, _toml(tmp_path, "[fedbuff]\nserver_lr = 2\n"), env={})
    assert cfg.fedbuff.server_lr == 2.0 and isinstance(cfg.fedbuff.server_lr, float)


def test_section_given_as_value_refused(tmp_path):
    path = _toml(tmp_path, "fedbuff = 3\n")
    assert _refused(Experiment, path) == f"fedbuff: is a section, expected a table, got int 3 (from {path})"
    assert "worker.retry: is a section" in _refused(Experiment, overrides={"worker.retry": 2})


def test_value_given_as_table_refused(tmp_path):
    msg = _refused(Experiment, _toml(tmp_path, "[fedbuff.buffer_size]\nx = 1\n"))
    assert msg.startswith("fedbuff.buffer_size: expected int, got dict")


def test_nested_sections_two_levels_from_every_layer(tmp_path):
    path = _toml(tmp_path, '[worker]\nnode = "n1"\n[worker.retry]\nattempts = 9\n')
    cfg = load_config(Experiment, path, env={"MQFED_WORKER_RETRY_BACKOFF_S": "2"},
                      overrides={"worker.devices": ["cuda:0"]})
    assert cfg.worker == Worker(node="n1", devices=("cuda:0",), retry=Retry(attempts=9, backoff_s=2.0))


def test_partly_set_section_starts_from_the_fields_default():
    cfg = load_config(Experiment, env={}, overrides={"worker.retry.backoff_s": 1.0})
    assert cfg.worker == Worker(node="default-node", retry=Retry(attempts=5, backoff_s=1.0))


def test_optional_none(tmp_path):
    assert load_config(Experiment, env={}).notes is None
    assert load_config(Experiment, _toml(tmp_path, 'notes = "n"\n'), env={}).notes == "n"
    env = {"MQFED_NOTES": "", "MQFED_FEDBUFF_MAX_STALENESS": "None"}
    cfg = load_config(Experiment, _toml(tmp_path, 'notes = "n"\n[fedbuff]\nmax_staleness = 3\n'), env=env)
    assert (cfg.notes, cfg.fedbuff.max_staleness) == (None, None)
    assert load_config(Experiment, env={"MQFED_NOTES": '"none"'}).notes == "none"
    assert load_config(Experiment, env={}, overrides={"fedbuff.max_staleness": None}).fedbuff.max_staleness is None
    # TOML has no null: "none" is None where a string is not a valid value, and a string where it is
    cfg = load_config(Experiment, _toml(tmp_path, 'notes = "none"\n[fedbuff]\nmax_staleness = "none"\n'), env={})
    assert (cfg.notes, cfg.fedbuff.max_staleness) == ("none", None)


def test_none_refused_for_non_optional_fields():
    assert "got str 'none'" in _refused(Experiment, env={"MQFED_SEED": "none"})
    assert load_config(Experiment, env={"MQFED_NAME": ""}).name == ""
    assert "name: expected str, got NoneType None (from override)" in _refused(Experiment, overrides={"name": None})


def test_post_init_error_wrapped_naming_the_section(tmp_path):
    path = _toml(tmp_path, "[fedbuff]\nbuffer_size = 0\n")
    msg = _refused(Experiment, path)
    assert msg == f"fedbuff: Fedbuff.buffer_size must be an int >= 1, got 0 (from {path})"
    assert "MQFED_FEDBUFF_BUFFER_SIZE" in _refused(Experiment, env={"MQFED_FEDBUFF_BUFFER_SIZE": "-1"})


def test_post_init_error_of_the_top_level_wrapped():
    msg = _refused(Required, env={"MQFED_URL": "amqp://h"}, overrides={"port": 0})
    assert msg == "top level: Required.port must be in 1..65535, got 0 (from MQFED_URL, override)"


def test_required_key_missing_named():
    assert _refused(Required).startswith("url: required")
    assert load_config(Required, env={"MQFED_URL": "amqp://h"}) == Required(url="amqp://h")


def test_missing_file_refused(tmp_path):
    assert _refused(Experiment, tmp_path / "nope.toml") == \
        f"{tmp_path / 'nope.toml'}: cannot read config file: No such file or directory"


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = _toml(tmp_path, 'name = "ks"\n\n[fedbuff\nbuffer_size = 4\n')
    msg = _refused(Experiment, path)
    assert msg.startswith(f"{path}: invalid TOML") and "line 3" in msg


def test_unknown_prefixed_env_ignored_and_refused_when_strict():
    env = {"MQFED_LOG_LEVEL": "debug", "MQFED_FEDBUF_BUFFER_SIZE": "4", "PATH": "/bin"}
    assert load_config(Experiment, env=env) == Experiment()
    msg = _refused(Experiment, env=env, strict_env=True)
    assert msg.startswith("MQFED_") and "matches no config key" in msg
    msg = _refused(Experiment, env={"MQFED_FEDBUF_BUFFER_SIZE": "4"}, strict_env=True)
    assert "did you mean MQFED_FEDBUFF_BUFFER_SIZE?" in msg
    assert load_config(Experiment, env={"PATH": "/bin", "MQFED_SEED": "1"}, strict_env=True).seed == 1


def test_dump_load_round_trip(tmp_path):
    cfg = Experiment(
        name='tricky "name"\n\t\\ é \x7f \x01', seed=-3, enabled=False, notes="n",
        tags=["a b", "", "ünï"], class_weights={"yes": 1.5, "no key?": 1e-300, "x.y": math.inf},
        shape=(7, -0.0), fedbuff=Fedbuff(buffer_size=3, server_lr=1e-05, max_staleness=None, staleness="constant"),
        worker=Worker(node="n", devices=(), data_dir=Path("/srv/d"), retry=Retry(attempts=1, backoff_s=1e16)))
    text = dump_toml(cfg)
    assert "notes" in text and 'max_staleness = "none"' in text
    assert load_config(Experiment, _toml(tmp_path, text), env={}) == cfg
    assert load_config(Experiment, _toml(tmp_path, dump_toml(Experiment())), env={}) == Experiment()
    assert "notes" not in dump_toml(Experiment())  # None with a None default is omitted


def test_dump_refuses_none_it_cannot_write_back():
    with pytest.raises(ConfigError, match="vhost: None cannot be written"):
        dump_toml(Required(url="u", vhost=None))


def test_config_to_dict_is_plain_and_json_serialisable():
    d = config_to_dict(Experiment())
    assert d["worker"] == {"node": "default-node", "devices": ["cpu"], "data_dir": "data",
                           "retry": {"attempts": 5, "backoff_s": 0.5}}
    assert d["notes"] is None and d["shape"] == [1, 2.0]
    assert json.loads(json.dumps(d)) == d


def test_not_a_dataclass_is_a_type_error():
    with pytest.raises(TypeError):
        load_config(dict, env={})
