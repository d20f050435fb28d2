"""Fixtures of the fault suite.

`private_broker`: a throwaway RabbitMQ node of its own (tests/faults/private_broker.py: own node name,
port, distribution port and data directory under a temporary directory) for tests that stop, kill or
restart the broker; the machine's shared broker is never touched. It runs the management plugin on a port of
its own, so that federations on it run as the generated least-privilege users. Stopped and removed after the test,
whatever happened. The test is skipped (with the reason) only when RabbitMQ is not installed; a node that
is installed but does not start fails the test.

`private_cluster`: three such nodes joined into one RabbitMQ cluster (`PrivateCluster`: one Erlang cookie,
`rabbitmqctl join_cluster`, the management API on every node), for tests that kill one node of a cluster;
`url` is the comma-separated list of its nodes. Stopped (every node SIGKILLed, nothing left running) and
removed after the test; skipped and failed as `private_broker` is.
"""
from __future__ import annotations

import pytest


@pytest.fixture
def private_broker():
    from .private_broker import BrokerUnavailable, PrivateBroker

    try:
        node = PrivateBroker(management=True)  # federations on it run as the generated users (broker/admin.py)
    except BrokerUnavailable as exc:
        pytest.skip(f"no private RabbitMQ node for this fault test: {exc}")
    try:
        node.start()
        yield node
    finally:
        node.close()


@pytest.fixture
def private_cluster():
    from .private_broker import BrokerUnavailable, PrivateCluster

    try:
        cluster = PrivateCluster(3, management=True)
    except BrokerUnavailable as exc:
        pytest.skip(f"no private RabbitMQ cluster for this fault test: {exc}")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
