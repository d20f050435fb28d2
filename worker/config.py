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
cache_versions = 3               # model versions kept in the cache (the newest; older ones are deleted)
threads = 0                      # CPU threads per trainer (0: cores / CPU trainers)
slowdown = 1.0                   # experiments: take this many times as long per task (a straggler)
delay_s = 0.0                    # experiments: plus this many seconds per task
heartbeat_s = 10.0
inline_max_bytes = 1048576       # update payloads up to this size ride inside the update message (<= 63 MiB)
chunk_bytes = 8388608            # larger ones travel in chunks of this size (below the broker's limit)
metrics_port = 0                 # Prometheus endpoint: the trainer of devices[i] serves on metrics_port + i (0: off)
metrics_host = "127.0.0.1"       # the address it listens on
```
"""
from __future__ import annotations

import dataclasses
import socket

from common.config import rule, validate
from common.data.shards import ShardSpec
from common.errors import InvalidValue
from common.metrics import check_host
from common.wire.messages import MAX_MESSAGE_BYTES

INLINE_LIMIT = MAX_MESSAGE_BYTES - 1024 * 1024  # the largest inline update payload (see inline_max_bytes)


@dataclasses.dataclass(frozen=True)
class WorkerSection:
    node: str = dataclasses.field(default_factory=socket.gethostname)
    experiment: str = "kws"
    devices: list[str] = dataclasses.field(default_factory=lambda: ["cpu"])
    data: str = ".cache/mqfed/synth-ks"
    shard: str = "all"
    cache_dir: str = ""
    cache_versions: int = rule(3, ge=1)
    threads: int = rule(0, ge=0)
    slowdown: float = rule(1.0, ge=1.0)
    delay_s: float = rule(0.0, ge=0.0)
    heartbeat_s: float = rule(10.0, ge=0.1)
    # An inline payload rides inside the update message, which the coordinator refuses above
    # MAX_MESSAGE_BYTES: leave room for the message's other fields.
    inline_max_bytes: int = rule(1024 * 1024, ge=1024, le=INLINE_LIMIT, what="an int in [1024, 64 MiB - 1 MiB]")
    chunk_bytes: int = rule(8 * 1024 * 1024, ge=1024, le=MAX_MESSAGE_BYTES, what="an int in [1024, 64 MiB]")
    # Prometheus metrics (docs/operations.md#metrics): one endpoint per trainer process, devices[i] on
    # metrics_port + i; 0: none.
    metrics_port: int = rule(0, ge=0, le=65535, what="a port in [0, 65535] (0: off)")
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        validate(self, "worker")
        if not self.node or any(c in self.node for c in " /#*"):
            raise InvalidValue(f"worker.node {self.node!r} must be non-empty without spaces, '/', '#' or '*'")
        if not self.devices:
            raise InvalidValue("worker.devices is empty; give cpu or cuda:N")
        for d in self.devices:
            if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit()):
                raise InvalidValue(f"worker.devices: {d!r} is neither cpu nor cuda:N")
        if len(set(self.devices)) != len(self.devices):
            raise InvalidValue(f"worker.devices lists a device twice: {self.devices}")
        ShardSpec.parse(self.shard)
        check_host(self.metrics_host, "worker.metrics_host")
        if self.metrics_port and self.metrics_port + len(self.devices) - 1 > 65535:
            raise InvalidValue(f"worker.metrics_port {self.metrics_port} + {len(self.devices) - 1} (one port per"
                               f" device) is above 65535")

    def metrics_port_of(self, device: str) -> int:
        """The metrics port of the trainer of `device` (0: none)."""
        return self.metrics_port + self.devices.index(device) if self.metrics_port else 0


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    worker: WorkerSection = dataclasses.field(default_factory=WorkerSection)
