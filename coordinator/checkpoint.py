"""The coordinator's checkpoint: one file, written atomically at every version, read back on restart.

Contents (a dict of tensors, lists, numbers and strings): the aggregator state (model, server-optimizer
state, version, buffer, counters, applied update keys), the dispatcher state (outstanding tasks), the
best accuracy and model so far, and the run's bookkeeping. Written with `torch.save` to a temporary file
beside the target, fsynced, renamed over it, and the directory fsynced: a crash at any point leaves
either the old or the new checkpoint, never a torn one. Read with `torch.load(weights_only=True)`, which
refuses anything but tensors and plain containers, so a checkpoint cannot run code when loaded.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from common.errors import MqfedError
from common.failpoints import failpoint

FORMAT = 1


class CheckpointError(MqfedError, RuntimeError):
    """The checkpoint exists but cannot be used (unreadable, another experiment, another format)."""


def save(path: str | os.PathLike, state: dict) -> None:
    """Write `state` to `path` atomically (see the module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        failpoint("coordinator.before_checkpoint_rename")
        os.replace(tmp, path)
    except BaseException:  # a failed save (disk full, signal) leaves the old checkpoint and no stray file
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for stray in path.parent.glob(f".{path.name}.*.tmp"):  # left by a coordinator killed mid-write
        stray.unlink(missing_ok=True)


def load(path: str | os.PathLike, experiment: str) -> dict | None:
    """The checkpoint at `path`, or None when there is none. Raises CheckpointError when it is unusable."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format') if isinstance(state, dict) else '?'},"
                              f" this coordinator reads {FORMAT}")
    if state.get("experiment") != experiment:
        raise CheckpointError(f"checkpoint {path} belongs to experiment {state.get('experiment')!r}, not {experiment!r}")
    return state
