"""Fixtures of the fault suite.

`private_broker`: a throwaway RabbitMQ node of its own (tests/faults/private_broker.py: own node name,
port, distribution port and data directory under a temporary directory) for tests that stop, kill or
restart the broker; the machine's shared broker is never touched. It runs the management plugin on a port of
its own, so that federations on it run as the generated least-privilege users. Stopped and removed after the test,
whatever happened. The test is skipped (with the reason) only when RabbitMQ is not installed; a node that
is installed but does not start fails the test.
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
