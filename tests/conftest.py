"""Fixtures shared by every test directory.

`tiny_corpus`: the synthetic KS corpus (common/data/corpus.py) for `tiny_spec`: four training clips and
two validation/test/test_unseen clips per label (120 clips, about a second of espeak-ng), built once per session
into a temporary directory (`tiny_corpus_dir`) and opened with `load_from_disk`.
`small_corpus_dir`: a synthetic corpus big enough to learn from in a minute (30 training, 10
validation/test clips per label), built once per session.

`torch_single_thread`: torch on one intra-op thread for the duration of a test. The CI and development
machines have two cores shared with other jobs; with two OpenMP threads each contended step of the tiny
model runs ~25x slower than on one thread, so tests that train or run the model use this.

Broker fixtures (tests/integration and tests/faults): a real RabbitMQ (started by broker.ensure when none
answers; a test never skips silently when there is none), one experiment name per test
(`it-<session>-<n>`) so runs never collide, and everything declared is deleted afterwards.
`broker_url`: the URL, once the broker answers. `connection`: a fresh connection per test. `topo`: an
experiment whose topology the fixture declares. `experiment`: a fresh experiment name whose queues the
code under test declares itself.
"""
from __future__ import annotations

import itertools
import uuid

import pytest

SESSION = uuid.uuid4().hex[:8]
_counter = itertools.count()


@pytest.fixture(scope="session")
def tiny_spec():
    from common.data.corpus import SynthSpec

    return SynthSpec(seed=0, per_class=4, eval_per_class=2)


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory, tiny_spec):
    from common.data import corpus

    out = tmp_path_factory.mktemp("corpus") / "synth-ks"
    corpus.build(out, tiny_spec, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_corpus(tiny_corpus_dir):
    from datasets import load_from_disk

    return load_from_disk(str(tiny_corpus_dir))


@pytest.fixture(scope="session")
def small_corpus_dir(tmp_path_factory):
    """A synthetic corpus big enough to learn from in a minute: 30 training, 10 validation/test clips per label."""
    from common.data import corpus

    out = tmp_path_factory.mktemp("small-corpus") / "synth-ks"
    corpus.build(out, corpus.SynthSpec(seed=1, per_class=30, eval_per_class=10), progress=False)
    return out


@pytest.fixture
def torch_single_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- broker --------------------------------------------------------------------------------------------------

def new_topology(**kwargs):
    """A Topology with a fresh experiment name (`it-<session>-<n>`); nothing declared."""
    from broker import topology

    return topology.Topology(f"it-{SESSION}-{next(_counter)}", **kwargs)


def delete_topology(t) -> None:
    from broker import topology
    from common.transport.connection import connect

    cleanup = connect("test", device="cleanup", attempts=3)
    try:
        topology.delete(cleanup.channel(), t)
    finally:
        cleanup.close()


@pytest.fixture(scope="session")
def broker_url():
    from broker import ensure
    from common.transport.connection import amqp_url

    if not ensure.ensure():
        pytest.fail(ensure.HOW_TO.format(url=amqp_url()), pytrace=False)  # never skip silently
    return amqp_url()


@pytest.fixture
def connection(broker_url):
    from common.transport.connection import connect

    conn = connect("test", device="pytest", attempts=3)
    yield conn
    if conn.is_open:
        conn.close()


@pytest.fixture
def topo(connection):
    from broker import topology

    t = new_topology(model_retention_bytes=2 * 1024**3)
    ch = connection.channel()
    topology.declare(ch, t)
    ch.close()
    yield t
    delete_topology(t)


@pytest.fixture
def experiment(broker_url):
    """A fresh experiment name whose queues the code under test declares itself; deleted afterwards."""
    t = new_topology()
    yield t
    delete_topology(t)
