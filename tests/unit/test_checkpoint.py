"""The coordinator's checkpoint: atomic save, exact load, refusal of another experiment's, another
format's, a corrupt or a code-carrying file (CheckpointError naming the problem), and a crash during a
save leaving the previous checkpoint intact."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from coordinator import checkpoint
from coordinator.checkpoint import FORMAT, CheckpointError

RAN: list[str] = []


def _run_code() -> str:
    RAN.append("ran")
    return "pwned"


class Payload:
    """Unpickling this calls `_run_code`: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (_run_code, ())


def _state(experiment: str = "exp", version: int = 3) -> dict:
    return {
        "experiment": experiment,
        "aggregator": {
            "version": version,
            "model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(5)},
            "applied_keys": [["exp", "t1", "w1", 2], ["exp", "t2", "w2", 3]],
            "buffer": {},
        },
        "dispatcher": {"mode": "sync", "round": version, "outstanding": {"t3": [3, math.inf], "t4": [3, 1e9 + 0.5]}},
        "elapsed_s": 12.25,
        "best": {"accuracy": 0.875, "version": 2},
        "workers": '{"node-1": {"devices": ["cpu"]}}',
        "flags": [True, None, "x", 1.5, [1, [2, 3]]],
    }


def _assert_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    else:
        assert type(a) is type(b) and a == b


def _leftovers(directory: Path, keep: str = "ckpt.pt") -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != keep)


def test_round_trip_keeps_tensors_nested_containers_strings_and_floats(tmp_path):
    path = tmp_path / "run" / "ckpt.pt"  # the directory is made
    checkpoint.save(path, _state())
    loaded = checkpoint.load(path, "exp")
    assert loaded["format"] == FORMAT
    del loaded["format"]
    _assert_equal(_state(), loaded)
    assert loaded["dispatcher"]["outstanding"]["t3"][1] == math.inf


def test_save_replaces_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, _state(version=3))
    checkpoint.save(path, _state(version=4))
    assert checkpoint.load(path, "exp")["aggregator"]["version"] == 4


def test_missing_file_loads_as_none(tmp_path):
    assert checkpoint.load(tmp_path / "nothing-here.pt", "exp") is None


def test_another_experiments_checkpoint_is_refused_naming_both(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, _state("other-exp"))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path, "exp")
    msg = str(info.value)
    assert "'other-exp'" in msg and "'exp'" in msg and str(path) in msg, msg


@pytest.mark.parametrize("corrupt", ["garbage", "truncated", "empty"])
def test_corrupt_file_is_refused_naming_the_path(tmp_path, corrupt):
    path = tmp_path / "ckpt.pt"
    if corrupt == "garbage":
        path.write_bytes(os.urandom(64) + b"not a checkpoint" * 10)
    else:
        checkpoint.save(path, _state())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if corrupt == "truncated" else b"")
    with pytest.raises(CheckpointError, match="unreadable") as info:
        checkpoint.load(path, "exp")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content, shown", [
    ({"format": FORMAT + 1, "experiment": "exp"}, f"format {FORMAT + 1}"),
    ({"experiment": "exp"}, "format None"),
    ([FORMAT, "exp"], "format ?"),
])
def test_another_format_is_refused(tmp_path, content, shown):
    path = tmp_path / "ckpt.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path, "exp")
    msg = str(info.value)
    assert shown in msg and f"reads {FORMAT}" in msg and str(path) in msg, msg


def test_save_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    for version in range(3):
        checkpoint.save(path, _state(version=version))
    assert _leftovers(tmp_path) == []


def test_crash_before_the_rename_keeps_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, _state(version=3))
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        checkpoint.save(path, _state(version=4))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert checkpoint.load(path, "exp")["aggregator"]["version"] == 3
    assert _leftovers(tmp_path) == []  # the half-done temporary file is cleaned up


def test_crash_while_writing_keeps_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, _state(version=3))

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # a signal arriving mid-write

    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, _state(version=4))
    monkeypatch.undo()
    assert checkpoint.load(path, "exp")["aggregator"]["version"] == 3
    assert _leftovers(tmp_path) == []


def test_a_killed_writers_temporary_file_does_not_disturb_load_or_the_next_save(tmp_path):
    """A process killed mid-write leaves its garbage under the temporary name; the checkpoint is whole."""
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, _state(version=3))
    (tmp_path / f".ckpt.pt.{os.getpid()}.tmp").write_bytes(b"\x00garbage from a killed writer")
    assert checkpoint.load(path, "exp")["aggregator"]["version"] == 3
    checkpoint.save(path, _state(version=4))  # same pid: the temporary name is reused and renamed away
    assert checkpoint.load(path, "exp")["aggregator"]["version"] == 4
    assert _leftovers(tmp_path) == []


def test_a_checkpoint_cannot_run_code_when_loaded(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"format": FORMAT, "experiment": "exp", "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="unreadable") as info:
        checkpoint.load(path, "exp")
    assert str(path) in str(info.value)
    assert RAN == []
    # The file really carries code: an unrestricted load would have run it.
    assert torch.load(path, weights_only=False)["x"] == "pwned" and RAN == ["ran"]
    RAN.clear()
