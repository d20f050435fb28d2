"""A RabbitMQ cluster losing a node during a run (docs/cluster.md), on three private nodes
(tests/faults/private_broker.py `PrivateCluster`), never the shared broker.

Every process is given the list of the three nodes (AMQP_URL = their URLs, comma-separated) and runs as
its generated least-privilege user. The node killed is the one that holds the leader of the updates queue:
every update a worker confirmed and the coordinator has not applied yet lives in that queue, so its Raft
leader moving to another node is what could lose or duplicate one. RabbitMQ places a new queue's leader
(and a stream's writer) on the node of the client that declares it (`client-local`), so this is also the
node the coordinator declared the experiment on, the one its connection is on unless it reconnected
since, and the writer of the model streams: one kill makes the queues, the streams and the coordinator's
connection fail over together (the test checks that the coordinator was connected there). What must hold:
RabbitMQ's defaults replicated the updates queue and the models stream on all three nodes; the run
completes and every process exits 0; versions 1..N once each; the accounting of
`test_process_faults._assert_consistent` (every confirmed update applied once, buffered, dropped as
stale/answered or still queued; nothing dead-lettered); the coordinator lost its connection and resumed;
the updates queue got a new leader on a surviving node and versions kept coming while the node was down;
the restarted node rejoined the queue and versions kept coming with all three.
"""
from __future__ import annotations

import time
import urllib.parse

import pytest

from coordinator.local_federation import LocalFederation
from faults.test_process_faults import FAST, _assert_consistent, _run_to_end

pytestmark = pytest.mark.faults

VERSIONS = 36
WORKER_DELAY_S = "0.5"  # per task: about a version a second, so the run outlasts the node's absence
WHILE_DOWN = 6  # versions the cluster must make on two nodes before the dead one comes back
AFTER_BACK = 3  # and with the three again


def _federation(cluster, tmp_path, corpus) -> LocalFederation:
    from common.config import load_config
    from coordinator.experiment import ExperimentConfig

    cfg = load_config(ExperimentConfig, env={}, overrides={
        "experiment.name": "cluster-kill", "experiment.run_dir": str(tmp_path / "run"), "data.path": str(corpus),
        **FAST, "stop.max_versions": VERSIONS})
    workers = [{"shard": f"iid:{i}/2", "env": {"MQFED_WORKER_DELAY_S": WORKER_DELAY_S}} for i in (1, 2)]
    return LocalFederation(cfg, corpus, workers, least_privilege=True,
                           env={"AMQP_URL": cluster.url, "MQFED_MANAGEMENT_URL": cluster.management_url})


def _queue(api, name: str) -> dict:
    """The management API's view of queue or stream `name` (members, online, leader; a stream's writer is
    its `node`). Filled from statistics a few seconds old."""
    return api.request("GET", f"/api/queues/%2F/{urllib.parse.quote(name, safe='')}")


def _coordinator_nodes(api, fed: LocalFederation) -> set[str]:
    """The cluster nodes the coordinator's main connections are on (as the management statistics last saw);
    its model publisher's (`coordinator:<node>:models`) may be on another node."""
    conns = api.request("GET", "/api/connections?columns=name,user,node,client_properties") or []
    return {c["node"] for c in conns if c.get("user") == fed.users["coordinator"]
            and not (c.get("client_properties") or {}).get("connection_name", "").endswith(":models")}


def test_a_node_killed_mid_run_loses_no_update_and_the_run_completes(private_cluster, small_corpus_dir, tmp_path):
    from broker import admin

    cluster = private_cluster
    nodes = sorted(n.nodename for n in cluster.nodes)
    api = admin.Management(cluster.management_url, amqp=cluster.url)
    fed = _federation(cluster, tmp_path, small_corpus_dir)
    updates, models = f"mqfed.{fed.name}.updates", f"mqfed.{fed.name}.models"
    started = time.monotonic()
    try:
        fed.start()
        fed.wait_for(lambda: len(fed.versions()) >= 2 and _coordinator_nodes(api, fed)
                     and _queue(api, models).get("members"), 240, "2 versions, seen by the management API")
        # RabbitMQ 3.10's defaults on three nodes: every quorum queue and stream has a replica on each.
        before, stream = _queue(api, updates), _queue(api, models)
        assert sorted(before["members"]) == nodes and sorted(stream["members"]) == nodes, (before, stream)
        leader = before["leader"]
        victim = cluster.node_of(leader)
        assert _coordinator_nodes(api, fed) == {leader}, "the coordinator declared the queues where it is connected"
        at_kill = len(fed.versions())
        cluster.kill(victim)
        killed_at = time.monotonic()

        fed.wait_for(lambda: len(fed.versions()) >= at_kill + WHILE_DOWN, 240,
                     f"{WHILE_DOWN} more versions with node {victim + 1} down")
        fed.wait_for(lambda: _queue(api, updates)["leader"] not in ("", None, leader), 60,
                     "the updates queue's new leader")
        after = _queue(api, updates)
        assert after["leader"] in after["online"] and leader not in after["online"], after
        down_s = time.monotonic() - killed_at

        cluster.start(victim)
        fed.wait_for(lambda: sorted(_queue(api, updates).get("online") or []) == nodes, 120,
                     f"node {victim + 1} back in the updates queue")
        back = len(fed.versions())
        fed.wait_for(lambda: len(fed.versions()) >= min(VERSIONS, back + AFTER_BACK), 120,
                     f"{AFTER_BACK} versions with node {victim + 1} back")
        _run_to_end(fed, timeout=300)
    finally:
        fed.stop()
    took = time.monotonic() - started

    assert back < VERSIONS, "the run finished before the node came back: nothing was tested after it"
    _assert_consistent(fed, VERSIONS)  # the accounting: nothing lost, nothing applied twice
    codes = [p.returncode for p in (fed.coordinator, *fed.workers.values())]
    assert codes == [0, 0, 0], f"exit codes coordinator, w1, w2: {codes} (logs in {fed.run_dir})"
    # the coordinator lost its connection with the node and resumed on another one
    assert fed.events("coordinator.log", "coordinator_connection_lost"), "the coordinator never reconnected"
    assert fed.events("coordinator.log", "coordinator_resumed"), "the coordinator did not resume"
    writer = "there too" if stream["node"] == leader else f"on {stream['node']}"
    print(f"\ncluster test: node {victim + 1} SIGKILLed after version {at_kill} (the updates queue's leader and"
          f" the coordinator's node; the models stream's writer {writer}); restarted {down_s:.0f} s later, back"
          f" in the queue at version {back}; the federation took {took:.0f} s")


def test_a_client_given_the_list_connects_when_the_first_node_is_down(private_cluster, monkeypatch):
    """The first node listed (and tried first) is dead: connect() goes on to the next one at once, and
    `mqfed-broker ensure`'s probe and the management client do the same."""
    from broker import admin, ensure, topology
    from common.transport import connection

    cluster = private_cluster
    cluster.kill(0)
    monkeypatch.setattr(connection, "_next_node", {})
    monkeypatch.setattr(connection, "_failed_at", {})
    monkeypatch.setattr(connection.random, "randrange", lambda n: 0)  # this process starts at node 1
    began = time.monotonic()
    conn = connection.connect("test", device="cluster", url=cluster.url, attempts=1)
    took = time.monotonic() - began
    try:
        assert conn._impl.params.port == cluster.nodes[1].port  # noqa: SLF001 - which node it reached
        assert took < 5.0, f"connecting past the dead node took {took:.1f} s"
        topo = topology.Topology("cluster-first-down")
        ch = conn.channel()
        topology.declare(ch, topo)  # queues and streams made with one node of three down
        ch.confirm_delivery()
        ch.basic_publish(topo.task_exchange, topo.TASKS_KEY, b"x", mandatory=True)
        method, _props, body = ch.basic_get(topo.tasks, auto_ack=True)
        assert method is not None and body == b"x"
    finally:
        conn.close()
    assert connection.node_order([connection._address(p) for p in connection.node_parameters("t", url=cluster.url)])[-1] == 0
    assert ensure.probe(cluster.url) is True
    assert admin.Management(cluster.management_url, amqp=cluster.url).request("GET", "/api/overview")["cluster_name"]
