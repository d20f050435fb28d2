"""The ServerApp: its own round loop around Flower's message-API `FedAvg` (configure_train, exchange,
aggregate_train), so that it stops at the target; the clock, evaluation and stop rule are `task.Rounds`."""
from __future__ import annotations

import time
from pathlib import Path

from flower_peer import task
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


def to_record(arrays: dict) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})


def to_numpy(record: ArrayRecord) -> dict:
    return {k: a.numpy() for k, a in record.items()}


def exchange(grid: Grid, messages: list[Message], poll_s: float) -> list[Message]:
    """Push `messages` and return every reply: pulled every `poll_s` s (Grid.push_messages/pull_messages),
    or with Flower's own `send_and_receive` (which pulls every 3 s) when `poll_s` <= 0."""
    if poll_s <= 0:
        return list(grid.send_and_receive(messages))
    waiting = set(grid.push_messages(messages))
    replies: list[Message] = []
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if waiting:
            time.sleep(poll_s)
    return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_dir = Path(str(context.run_config["run-dir"]))
    p = task.load_params(run_dir / "params.json")
    task.set_threads()
    rounds = task.Rounds(p, run_dir / "events.jsonl", Path(p.work_dir) / "cache")
    try:
        train_loop(grid, p, rounds, float(context.run_config["reply-poll-s"]))
    except BaseException as exc:
        rounds.error(f"ServerApp: {type(exc).__name__}: {exc}")
        raise


def train_loop(grid: Grid, p: task.Params, rounds: task.Rounds, poll_s: float) -> None:
    """Rounds of FedAvg over all `p.clients` nodes until `rounds.finish` says stop."""
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=p.clients, min_evaluate_nodes=0,
                      min_available_nodes=p.clients)
    while len(list(grid.get_node_ids())) < p.clients:
        time.sleep(0.1)
    arrays = rounds.initial()
    record = to_record(arrays)
    for server_round in range(1, p.max_rounds + 1):
        if server_round == 1:
            rounds.begin()
        rounds.dispatching()
        messages = list(strategy.configure_train(server_round, record, ConfigRecord(), grid))
        bytes_down = task.nbytes(arrays) * len(messages)
        replies = exchange(grid, messages, poll_s)
        failed = [m.error.reason for m in replies if m.has_error()]
        if failed or len(replies) != len(messages):
            raise RuntimeError(f"round {server_round}: {len(replies)} replies to {len(messages)}, errors {failed}")
        received_wall = time.time()
        clients = [{**dict(m.content["metrics"]), "received_wall": received_wall} for m in replies]
        task_s = [c["task_s"] for c in clients]
        bytes_up = sum(task.nbytes(to_numpy(m.content["arrays"])) for m in replies)
        record, _ = strategy.aggregate_train(server_round, replies)
        arrays = to_numpy(record)
        if rounds.finish(server_round, arrays, task_s, bytes_down, bytes_up, clients):
            return
