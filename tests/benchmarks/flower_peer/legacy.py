"""The legacy arm's processes: Flower's deprecated `start_server` with a FedAvg subclass, and long-lived
`start_client` NumPyClients over gRPC (grpc-bidi: the server pushes, nobody polls).

    python -m flower_peer.legacy server RUN_DIR PORT
    python -m flower_peer.legacy client RUN_DIR PORT INDEX

RUN_DIR holds params.json and receives events.jsonl (see `task.Rounds`); the clip cache is
<work_dir>/cache. The runner starts and stops these processes.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

from flwr.client import NumPyClient, start_client
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig, start_server
from flwr.server.strategy import FedAvg

from flower_peer import task

warnings.filterwarnings("ignore", category=DeprecationWarning)


class PeerFedAvg(FedAvg):
    """Flower's FedAvg (weighted by num_examples, every client every round, no federated evaluation) that
    starts the clock at round 1's dispatch and, once a round's aggregate exists, records and evaluates it
    (`task.Rounds.finish`); after a stop it configures no more rounds."""

    def __init__(self, rounds: task.Rounds, clients: int) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients, min_evaluate_clients=0,
                         min_available_clients=clients, accept_failures=False,
                         initial_parameters=ndarrays_to_parameters(list(rounds.initial().values())),
                         on_fit_config_fn=lambda server_round: {"server_round": server_round})
        self.rounds, self.clients = rounds, clients
        self.bytes_down = 0

    def configure_fit(self, server_round, parameters, client_manager):
        if self.rounds.stopped:
            return []
        if server_round == 1:
            client_manager.wait_for(self.clients, timeout=86400)
            self.rounds.begin()
        self.rounds.dispatching()
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.bytes_down = task.nbytes(parameters_to_ndarrays(parameters)) * len(instructions)
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        if failures:
            raise RuntimeError(f"round {server_round}: {len(failures)} client failures: {failures[:2]!r}")
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        received_wall = time.time()  # all results are in (approximately: after FedAvg's aggregation)
        clients = [{**res.metrics, "received_wall": received_wall} for _, res in results]
        bytes_up = sum(task.nbytes(parameters_to_ndarrays(res.parameters)) for _, res in results)
        self.rounds.finish(server_round, parameters_to_ndarrays(parameters), [c["task_s"] for c in clients],
                           self.bytes_down, bytes_up, clients)
        return parameters, metrics

    def evaluate(self, server_round, parameters):
        return None  # done in aggregate_fit, with the clock paused


class PeerClient(NumPyClient):
    """Client `index`: its shard and model stay in memory between rounds."""

    def __init__(self, p: task.Params, cache: Path, index: int) -> None:
        self.p, self.index = p, index
        self.model = task.build(p.model)
        self.clips = task.load_cached(task.part_path(cache, index, p.clients))

    def get_parameters(self, config):
        return list(task.weights(self.model).values())

    def fit(self, parameters, config):
        called = time.time()
        task.load_weights(self.model, parameters)
        samples, metrics = task.run_task(self.model, self.clips, self.p, self.index, int(config["server_round"]))
        metrics.update(node=self.index, called_wall=called, reply_wall=time.time())
        return list(task.weights(self.model).values()), samples, metrics


def main(argv: list[str]) -> None:
    role, run_dir, port = argv[0], Path(argv[1]), int(argv[2])
    p = task.load_params(run_dir / "params.json")
    cache = Path(p.work_dir) / "cache"
    task.set_threads()
    if role == "server":
        rounds = task.Rounds(p, run_dir / "events.jsonl", cache)
        try:
            start_server(server_address=f"127.0.0.1:{port}", config=ServerConfig(num_rounds=p.max_rounds),
                         strategy=PeerFedAvg(rounds, p.clients))
        except BaseException as exc:
            if not rounds.stopped:
                rounds.error(f"server: {type(exc).__name__}: {exc}")
            raise
    else:
        client = PeerClient(p, cache, int(argv[3]))
        start_client(server_address=f"127.0.0.1:{port}", client=client.to_client(), insecure=True)


if __name__ == "__main__":
    main(sys.argv[1:])
