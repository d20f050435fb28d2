"""The coordinator's model publisher (coordinator/model_publisher.py) on the real broker: versions in order,
in the dtype asked, framed from the tensors as they were when submitted; its errors reach the caller."""
from __future__ import annotations

import pytest
import torch

from common.transport.connection import connect
from common.transport.model_store import ModelStore
from common.wire.tensors import decode_state
from coordinator.model_publisher import ModelPublisher

pytestmark = pytest.mark.integration


def test_versions_go_out_in_order_in_float16_from_the_tensors_as_they_were_when_framed(connection, topo, tmp_path):
    state = {"w": torch.linspace(-1, 1, 300_000), "big": torch.full((10,), 1e6), "step": torch.tensor([7])}
    pub = ModelPublisher(lambda: connect("test", device="models", attempts=3), topo, tmp_path, tmp_path / "cache")
    try:
        expected = {}
        for v in (1, 2, 3):
            pub.submit(v, state, "float16")
            pub.wait_framed()
            expected[v] = {n: t.clone() for n, t in state.items()}
            state["w"].add_(1.0)  # the next "server step": allowed once framed
        pub.drain()
        assert pub.published_version == 3
    finally:
        pub.close()
    reader = ModelStore(connection.channel(), topo, cache_dir=tmp_path / "reader")
    assert reader.latest().version == 3
    for v, want in expected.items():
        got = decode_state(reader.fetch(v).path.read_bytes())
        assert got["w"].dtype is torch.float16 and torch.equal(got["w"], want["w"].half())
        assert got["big"].dtype is torch.float32 and torch.equal(got["big"], want["big"])  # beyond float16
        assert torch.equal(got["step"], want["step"])
    assert not list(tmp_path.glob(".model-v*.tmp")), "a framed file was left behind"


def test_an_error_of_the_publisher_reaches_the_ingest_thread(topo, tmp_path):
    def refuse():
        raise ConnectionRefusedError("no broker here")

    pub = ModelPublisher(refuse, topo, tmp_path, tmp_path / "cache")
    try:
        with pytest.raises(ConnectionRefusedError, match="no broker here"):
            pub.submit(1, {"w": torch.zeros(4)}, "float32")
            pub.drain()
        with pytest.raises(ConnectionRefusedError):
            pub.check()
    finally:
        pub.close()
        pub.close()  # idempotent
