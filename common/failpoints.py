"""Failpoints: named places in the daemons where a fault test can make the process die for real.

`MQFED_FAILPOINTS="worker.after_chunk=kill@2,coordinator.before_checkpoint_rename=kill"` makes the
process SIGKILL itself the 2nd time it passes `failpoint("worker.after_chunk")`, and the 1st time it passes
`coordinator.before_checkpoint_rename`. Unset (always, outside the fault suite) a failpoint costs one dict
lookup. The fault tests (tests/faults/) use them to kill a worker mid-upload, between publishing its update
and acknowledging its task, and a coordinator mid-aggregation or mid-checkpoint write: places a test cannot
hit reliably by sending a signal from outside.

Failpoints in the code:
    worker.during_training        after a training step (the task is held, unacknowledged)
    worker.after_chunk            after each chunk of an update payload is confirmed
    worker.after_first_chunk      after the first chunk of an update payload of 2 or more chunks: the
                                  upload is partial whatever the payload's size
    worker.before_task_ack        after the update is confirmed, before the task is acknowledged
    coordinator.after_buffer      after an update was added to the FedBuff buffer (mid-aggregation)
    coordinator.before_checkpoint_rename  checkpoint written to its temporary file, not yet renamed
"""
from __future__ import annotations

import os
import signal

_SPEC: dict[str, int] | None = None
_HITS: dict[str, int] = {}


def _parse(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, action = item.partition("=")
        verb, _, nth = (action or "kill").partition("@")
        if verb != "kill" or (nth and not nth.isdigit()):
            raise ValueError(f"MQFED_FAILPOINTS: {item!r} (expected name=kill or name=kill@N)")
        out[name] = int(nth or 1)
    return out


def failpoint(name: str) -> None:
    """Die here (SIGKILL, no clean-up) when MQFED_FAILPOINTS arms `name` and this is the armed hit."""
    global _SPEC
    if _SPEC is None:
        _SPEC = _parse(os.environ.get("MQFED_FAILPOINTS", ""))
    if name not in _SPEC:
        return
    _HITS[name] = _HITS.get(name, 0) + 1
    if _HITS[name] == _SPEC[name]:
        os.kill(os.getpid(), signal.SIGKILL)
