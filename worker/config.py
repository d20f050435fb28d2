"""The worker daemon's configuration: `[worker]` in a TOML file, `MQFED_WORKER_<KEY>` in the environment,
`mqfed-worker run --<key>` on the command line (in that order of precedence, lowest first).

```toml
[worker]
node = "gpu-node-3"              # default: the host name
experiment = "kws"
devices = ["cuda:0", "cuda:1"]   # or ["cpu"]: one trainer process per device
data = "/data/kws"               # a KS data set directory (mqfed-worker data ...)
shard = "speaker:1/4"            # which part of it this node trains on (common/data/shards.py)
cache_dir = ""                   # model versions and error-feedback residuals; default $XDG_CACHE_HOME/mqfed
threads = 0                      # CPU threads per trainer (0: cores / CPU trainers)
slowdown = 1.0                   # experiments: take this many times as long per task (a straggler)
delay_s = 0.0                    # experiments: plus this many seconds per task
heartbeat_s = 10.0
inline_max_bytes = 1048576       # update payloads up to this size ride inside the update message (<= 63 MiB)
chunk_bytes = 8388608            # larger ones travel in chunks of this size (below the broker's limit)
```
"""
from __future__ import annotations

import dataclasses
import math
import socket

from common.wire.messages import MAX_MESSAGE_BYTES
from common.data.shards import ShardSpec

INLINE_LIMIT = MAX_MESSAGE_BYTES - 1024 * 1024  # the largest inline update payload (see inline_max_bytes)


@dataclasses.dataclass(frozen=True)
class WorkerSection:
    node: str = dataclasses.field(default_factory=socket.gethostname)
    experiment: str = "kws"
    devices: list[str] = dataclasses.field(default_factory=lambda: ["cpu"])
    data: str = ".cache/mqfed/synth-ks"
    shard: str = "all"
    cache_dir: str = ""
    threads: int = 0
    slowdown: float = 1.0
    delay_s: float = 0.0
    heartbeat_s: float = 10.0
    inline_max_bytes: int = 1024 * 1024
    chunk_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if not self.node or any(c in self.node for c in " /#*"):
            raise ValueError(f"worker.node {self.node!r} must be non-empty without spaces, '/', '#' or '*'")
        if not self.devices:
            raise ValueError("worker.devices is empty; give cpu or cuda:N")
        for d in self.devices:
            if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit()):
                raise ValueError(f"worker.devices: {d!r} is neither cpu nor cuda:N")
        if len(set(self.devices)) != len(self.devices):
            raise ValueError(f"worker.devices lists a device twice: {self.devices}")
        ShardSpec.parse(self.shard)
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"worker.threads must be an int >= 0, got {self.threads!r}")
        # An inline payload rides inside the update message, which the coordinator refuses above
        # MAX_MESSAGE_BYTES: leave room for the message's other fields.
        limits = {"inline_max_bytes": (INLINE_LIMIT, "64 MiB - 1 MiB"), "chunk_bytes": (64 * 1024 * 1024, "64 MiB")}
        for name, (high, shown) in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1024 <= value <= high:
                raise ValueError(f"worker.{name} must be an int in [1024, {shown}], got {value!r}")
        for name, low in (("slowdown", 1.0), ("delay_s", 0.0), ("heartbeat_s", 0.1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
                raise ValueError(f"worker.{name} must be a finite number >= {low}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    worker: WorkerSection = dataclasses.field(default_factory=WorkerSection)
