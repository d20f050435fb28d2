"""Model versions published off the coordinator's ingest thread (docs/federation.md, Publishing versions).

A thread of its own with a broker connection of its own takes versions in order: it frames the model's
live tensors into a file (`write_state`, in `tasks.model_dtype`), then appends that file to the model stream
(`ModelStore.publish`) while the ingest thread goes on decoding and buffering updates. The tensors change
only at the next server step, which must wait until they are framed (`wait_framed`); the stream write, the
longer part, overlaps ingestion. Between versions the thread keeps its connection served (heartbeats).

An error of the thread (its connection lost included) is re-raised on the ingest thread by the next
`check`, `submit`, `wait_framed` or `drain`, so the coordinator's session ends and starts over as for any
error of its own connection; a version whose publication was cut short is published again at the next
session's start when it is the newest (see `Coordinator._session`).
"""
from __future__ import annotations

import collections
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from broker.topology import Topology
from common.logs import get_logger
from common.transport.model_store import ModelStore
from common.wire.tensors import narrowed_dtypes, write_state

log = get_logger(__name__)


class ModelPublisher:
    """One thread, one connection (`connect()` opens it in the thread), versions published in submit order.

    published_version: the newest version whose announcement is in the index stream (None: none yet by
    this publisher).
    """

    def __init__(self, connect: Callable, topo: Topology, work_dir: Path, cache_dir: Path) -> None:
        self._connect, self.topo, self.work_dir, self.cache_dir = connect, topo, work_dir, cache_dir
        self.published_version: int | None = None
        self._jobs: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._framing = 0  # submitted versions not yet framed
        self._pending = 0  # submitted versions not yet published
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="model-publisher", daemon=True)
        self._thread.start()

    # -- the ingest thread's side ---------------------------------------------------------------------------
    def check(self) -> None:
        """Re-raise the publisher's error, if it had one."""
        if self._error is not None:
            raise self._error

    def submit(self, version: int, state: dict[str, torch.Tensor], dtype: str) -> None:
        """Publish `state` (live tensors: do not change them before `wait_framed`) as `version`, its float32
        tensors in `dtype` where they fit (`narrowed_dtypes`)."""
        with self._cond:
            self.check()
            self._jobs.append((version, state, dtype))
            self._framing += 1
            self._pending += 1
            self._cond.notify_all()

    def wait_framed(self) -> None:
        """Return once every submitted version's tensors are in its file (they may change now)."""
        self._wait(lambda: self._framing == 0)

    def drain(self) -> None:
        """Return once every submitted version is in the stream and announced."""
        self._wait(lambda: self._pending == 0)

    def _wait(self, done: Callable[[], bool]) -> None:
        with self._cond:
            while not done():
                self.check()
                if not self._thread.is_alive():
                    raise RuntimeError("the model publisher stopped with versions still to publish")
                self._cond.wait(0.1)
            self.check()

    def close(self) -> None:
        """Stop the thread once the version it is framing is framed (the caller may change the tensors
        afterwards); a publication in flight ends on its own (a whole, correct version) or with its
        connection. Idempotent."""
        with self._cond:
            self._closed = True
            dropped = len(self._jobs)
            self._jobs.clear()
            self._framing -= dropped
            self._pending -= dropped
            self._cond.notify_all()
            while self._framing and self._thread.is_alive() and self._error is None:
                self._cond.wait(0.1)
        self._thread.join(timeout=10.0)

    # -- the publisher thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        conn = None
        try:
            conn = self._connect()
            channel = conn.channel()
            channel.confirm_delivery()
            store = ModelStore(channel, self.topo, cache_dir=self.cache_dir)
            served = time.monotonic()
            while True:
                with self._cond:
                    if not self._jobs and not self._closed:
                        self._cond.wait(0.5)  # a submit wakes it at once
                    job = self._jobs.popleft() if self._jobs else None
                    if job is None and self._closed:
                        return
                if job is not None:
                    self._publish(store, *job)
                if time.monotonic() - served >= 1.0:  # heartbeats between versions (no wait: time_limit=0)
                    conn.process_data_events(time_limit=0)
                    served = time.monotonic()
        except BaseException as exc:  # handed to the ingest thread (check)
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            if conn is not None and conn.is_open:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass

    def _publish(self, store: ModelStore, version: int, state: dict, dtype: str) -> None:
        path = self.work_dir / f".model-v{version}.{os.getpid()}.tmp"
        try:
            started = time.monotonic()
            try:
                with open(path, "wb") as f:
                    write_state(state, f, narrowed_dtypes(state, dtype))
            finally:
                with self._cond:
                    self._framing -= 1
                    self._cond.notify_all()
            framed = time.monotonic()
            store.publish(version, path)
            with self._cond:
                self.published_version = version
                self._pending -= 1
                self._cond.notify_all()
            log.info("model_version_out", version=version, frame_s=round(framed - started, 3),
                     stream_s=round(time.monotonic() - framed, 3))
        finally:
            path.unlink(missing_ok=True)
