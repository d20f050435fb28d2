"""The ClientApp: one train message = one mqfed local task on the node's cached shard. Flower starts a fresh
process for every message, so each call builds the model and loads the shard (from the .npz cache)."""
from __future__ import annotations

import time
from pathlib import Path

from flower_peer import task
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

task.set_threads()
app = ClientApp()
IMPORTED = time.time()  # this process's start and imports: for the overhead breakdown


@app.train()
def train(msg: Message, context: Context) -> Message:
    called = time.time()
    p = task.load_params(Path(str(context.run_config["run-dir"])) / "params.json")
    index = int(context.node_config["partition-id"])
    model = task.build(p.model)
    task.load_weights(model, {k: a.numpy() for k, a in msg.content["arrays"].items()})
    clips = task.load_cached(task.part_path(Path(p.work_dir) / "cache", index, p.clients))
    samples, metrics = task.run_task(model, clips, p, index, int(msg.content["config"]["server-round"]))
    arrays = ArrayRecord(array_dict={k: Array(v) for k, v in task.weights(model).items()})
    metrics.update(node=index, started_wall=task.process_started(), imported_wall=IMPORTED, called_wall=called,
                   reply_wall=time.time())
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({**metrics, "num-examples": samples})})
    return Message(content=content, reply_to=msg)
