"""Integration fixtures: a real RabbitMQ (started by broker.ensure when none answers), one experiment name
per test (`it-<session>-<n>`) so runs never collide, and everything declared is deleted afterwards."""
from __future__ import annotations

import itertools
import uuid

import pytest

from broker import ensure, topology
from common.amqp import connect

SESSION = uuid.uuid4().hex[:8]
_counter = itertools.count()


@pytest.fixture(scope="session")
def broker_url():
    from common.amqp import amqp_url

    if not ensure.ensure():
        pytest.fail(ensure.HOW_TO.format(url=amqp_url()), pytrace=False)  # never skip silently
    return amqp_url()


@pytest.fixture
def connection(broker_url):
    conn = connect("test", device="pytest", attempts=3)
    yield conn
    if conn.is_open:
        conn.close()


@pytest.fixture
def topo(connection):
    t = topology.Topology(f"it-{SESSION}-{next(_counter)}", model_retention_bytes=2 * 1024**3)
    ch = connection.channel()
    topology.declare(ch, t)
    ch.close()
    yield t
    cleanup = connect("test", device="cleanup", attempts=3)
    topology.delete(cleanup.channel(), t)
    cleanup.close()


@pytest.fixture
def experiment(broker_url):
    """A fresh experiment name whose queues the code under test declares itself; deleted afterwards."""
    t = topology.Topology(f"it-{SESSION}-{next(_counter)}")
    yield t
    cleanup = connect("test", device="cleanup", attempts=3)
    topology.delete(cleanup.channel(), t)
    cleanup.close()


@pytest.fixture(scope="session")
def small_corpus_dir(tmp_path_factory):
    """A synthetic corpus big enough to learn from in a minute: 30 training, 10 validation/test clips per label."""
    from common import synth_corpus

    out = tmp_path_factory.mktemp("small-corpus") / "synth-ks"
    synth_corpus.build(out, synth_corpus.SynthSpec(seed=1, per_class=30, eval_per_class=10), progress=False)
    return out
