"""The coordinator: the I/O shell around the pure aggregator and dispatcher, one process per experiment.

`Coordinator.run()` keeps the dispatcher's train tasks on the tasks queue, consumes updates (single active
consumer), buffers valid ones and acknowledges them only once a checkpoint holds them, and at each version
checkpoints, acknowledges, publishes the model, evaluates and records. One coordinator of a run directory is
active (an exclusive lock); a lost connection resumes from the checkpoint. docs/federation.md.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path

import torch

from broker import definitions, topology
from common.compression import codecs
from common.errors import MqfedError
from common.failpoints import failpoint
from common.learning.config import TrainConfig, decay_factor
from common.learning.model import build_model, parameter_count
from common.learning.training import evaluate
from common.logs import get_logger
from common.metrics import CoordinatorMetrics
from common.transport.connection import connect, run_forever, serve_while
from common.transport.consumer import Delivery, MessageConsumer, Outcome
from common.transport.model_store import ModelStore
from common.transport.publish import publish_message
from common.wire import messages
from common.wire.chunks import CompletedTransfer, Reassembler
from coordinator import checkpoint
from coordinator.aggregator import AggregationRecord, Aggregator, ClientUpdate, UpdateKey, UpdateRejected
from coordinator.dispatch import Dispatcher
from coordinator.evaluator import export_best, exported, has_split, load_clips
from coordinator.events import EventBook
from coordinator.experiment import ExperimentConfig
from coordinator.model_publisher import ModelPublisher
from coordinator.record import RunRecord
from coordinator.wal import WriteAheadLog

log = get_logger(__name__)


def reported_fetched_bytes(metrics: dict) -> int:
    """The model bytes an update says its task downloaded (the worker's word, for the run record only): 0
    unless a number in [0, 2**40)."""
    fetched = metrics.get("fetched_bytes", 0)
    ok = isinstance(fetched, (int, float)) and not isinstance(fetched, bool) and 0 <= fetched < 2**40
    return int(fetched) if ok else 0


class Stop(MqfedError):
    """Raised inside the loop when the experiment reached its stop condition."""


class Coordinator:
    """Runs one experiment (see the module doc). `run()` returns the summary dict."""

    def __init__(self, cfg: ExperimentConfig, url: str | None = None, node: str | None = None,
                 on_version=None, fresh: bool = False) -> None:
        self.cfg, self.url, self.node, self.fresh = cfg, url, node, fresh
        self.name = cfg.experiment.name
        self.topo = topology.Topology(self.name, model_retention_bytes=cfg.experiment.model_retention_bytes)
        self.run_dir = Path(cfg.experiment.run_path)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o700)  # checkpoints, the log and the run secret: the owner's only
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self.export_dir = self.run_dir / "export"
        self.record = RunRecord(self.run_dir / "record.jsonl")
        self.on_version = on_version
        self.model = build_model(cfg.model)
        self.model.eval()
        self.state = self.model.state_dict()
        self._model_is_initial = True  # no copy of the initial weights is kept: `_reset` rebuilds them
        self.numel = sum(t.numel() for t in self.state.values())
        self.eval_clips = load_clips(cfg, cfg.data.eval_split, cfg.data.eval_max_clips)
        self._stop_requested = threading.Event()
        self._lock_fd: int | None = None
        self.wal = WriteAheadLog(self.run_dir / "wal")
        self.spool_dir = self.run_dir / "spool"
        self.spool_dir.mkdir(exist_ok=True)
        self._writer: threading.Thread | None = None
        self.publisher: ModelPublisher | None = None  # per session (coordinator/model_publisher.py)
        self._writer_error: BaseException | None = None
        self.metrics = CoordinatorMetrics(lambda: self.version, lambda: self.aggregator.buffered,  # served by run()
                                          lambda: len(self.events.workers), lambda: self.last_eval)
        self._reset()

    # -- state -------------------------------------------------------------------------------------------
    def _reset(self, weights: bool = False) -> None:
        """Fresh in-memory state at version 0 (then `_resume` loads the checkpoint over it). weights: also
        the initial model weights (built again: presets from their seed, pretrained ones from their files)."""
        cfg = self.cfg
        if weights and not self._model_is_initial:
            with torch.no_grad():
                for name, t in build_model(cfg.model).state_dict().items():
                    self.state[name].copy_(t)
            self._model_is_initial = True
        self.aggregator = Aggregator(self.state, cfg.fedbuff.aggregator_config(self.name), cfg.server_optimizer)
        self.dispatcher = Dispatcher(cfg.fedbuff.mode, cfg.fedbuff.concurrency, cfg.tasks.deadline_s,
                                     secret=self._run_secret(), version_lag=cfg.tasks.version_lag)
        self.elapsed_before = 0.0
        self.best = {"accuracy": -1.0, "version": -1}
        self.last_eval: dict | None = None
        self.wal_seq = 0  # the last logged update the in-memory state holds
        self._ckpt_at = (0, time.monotonic())  # (version, time) of the last checkpoint
        self.window = {"wire": 0, "raw": 0, "fetched": 0}
        self.counters = {"dead_lettered": 0, "stale_dropped": 0, "codec_errors": 0, "tasks_expired": 0,
                         "answered_dropped": 0}
        self.events = EventBook(self.topo)

    def _checkpoint_state(self) -> dict:
        return {
            "experiment": self.name,
            # The live tensors, not copies: the model changes only at the next server step, which waits for
            # the writer (`_apply`), and the buffer is empty at a version (or no update comes any more).
            "aggregator": self.aggregator.state_dict(include_model=True, clone=False),
            "dispatcher": self.dispatcher.state_dict(),
            "elapsed_s": self.elapsed(),
            "best": dict(self.best),
            "counters": dict(self.counters),
            "workers": json.dumps(self.events.workers),
            "wal_seq": self.wal_seq,
        }

    def _resume(self) -> None:
        """The state the last checkpoint holds, then the write-ahead log past it replayed in order."""
        self._join_writer()
        state = checkpoint.load(self.ckpt_path, self.name)
        self._reset(weights=state is None)
        if state is not None:
            self._load(state)
            self._model_is_initial = False
        info = exported(self.export_dir)
        if info is not None and info["accuracy"] > self.best["accuracy"]:  # the evaluator's export can be newer
            self.best = {"accuracy": info["accuracy"], "version": info["version"]}
        self.record.truncate_after(self.version)
        replayed = self.wal.records(after=self.wal_seq)
        for rec in replayed:
            meta = {f.name: rec.meta[f.name] for f in dataclasses.fields(messages.Update) if f.name != "payload"}
            self._apply(messages.Update(**meta, payload=messages.PayloadRef(transfer_id="wal")), rec.read_payload(),
                        replayed=rec.seq)
        self._ckpt_at = (0 if state is None else int(state["aggregator"]["version"]), time.monotonic())
        if state is not None or replayed:
            log.info("coordinator_resumed", version=self.version, elapsed_s=round(self.elapsed_before, 1),
                     best=self.best, buffered=self.aggregator.buffered, replayed=len(replayed),
                     checkpoint_version=self._ckpt_at[0])

    def _load(self, state: dict) -> None:
        self.aggregator.load_state_dict(state["aggregator"])
        self.dispatcher.load_state_dict(state["dispatcher"])
        self.elapsed_before = float(state["elapsed_s"])
        self.best = dict(state["best"])
        self.counters.update(state["counters"])
        self.events.workers = json.loads(state["workers"])
        self.wal_seq = int(state["wal_seq"])

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self._session_start)

    @property
    def version(self) -> int:
        return self.aggregator.version

    # -- lifecycle ---------------------------------------------------------------------------------------
    def request_stop(self, *_args) -> None:
        """Stop after the current message (signal-safe): unacknowledged work is redelivered later."""
        self._stop_requested.set()

    def _acquire_lock(self) -> None:
        fd = os.open(self.run_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("coordinator_standby", run_dir=str(self.run_dir), reason="another coordinator holds the lock")
            while not self._stop_requested.is_set():
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.5)
            else:
                os.close(fd)
                raise Stop("stopped while standing by")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def run(self) -> dict:
        """Run until a stop condition or `request_stop()`; returns the summary."""
        self._session_start = time.monotonic()
        try:
            self._acquire_lock()
        except Stop:
            return {"stopped": "standby"}
        if self.fresh:
            self._start_over()
        self.run_id = self._run_id()
        try:
            self.metrics.serve(self.cfg.metrics.port, self.cfg.metrics.host)
            summary = run_forever(self._session, "coordinator", self.node, self.name, self.url,
                                  stop=self._stop_requested)
            return summary if summary is not None else self.summary("signal")
        finally:
            self.metrics.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _start_over(self) -> None:
        """Delete the experiment's queues, checkpoint, log, spools, record and run id: the next session starts
        at version 0."""
        conn = connect("coordinator", self.node, "fresh", self.url, attempts=3)
        try:
            topology.delete(conn.channel(), self.topo)
        finally:
            conn.close()
        for path in (self.ckpt_path, self.record.path, self.run_dir / "run-id", self.run_dir / "run-secret"):
            path.unlink(missing_ok=True)
        for directory in (self.wal.dir, self.spool_dir):
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
        self.wal = WriteAheadLog(self.wal.dir)
        log.info("experiment_reset", experiment=self.name, run_dir=str(self.run_dir))
        self.fresh = False

    def _run_id(self) -> str:
        """This run's id (`<run_dir>/run-id`, made at the run's first start; --fresh makes a new one)."""
        path = self.run_dir / "run-id"
        if not path.exists():
            tmp = path.with_name(f".run-id.{os.getpid()}")
            tmp.write_text(uuid.uuid4().hex[:16])
            os.replace(tmp, path)
        return path.read_text().strip()

    def _run_secret(self) -> bytes:
        """The key this run signs its task ids with (`<run_dir>/run-secret`, the owner's only; --fresh makes a
        new one)."""
        path = self.run_dir / "run-secret"
        if not path.exists():
            tmp = path.with_name(f".run-secret.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return path.read_bytes()

    def _session(self, conn) -> dict:
        """One broker connection's worth of work; resumes from the checkpoint and the log first."""
        self._resume()
        self._session_start = time.monotonic()
        ch = conn.channel()
        topology.declare(ch, self.topo)
        self.pub = conn.channel()
        self.pub.confirm_delivery()
        self.store = ModelStore(self.pub, self.topo, cache_dir=self.run_dir / "model-cache")
        latest = self.store.latest()
        if latest is not None and latest.version > self.version:
            raise checkpoint.CheckpointError(
                f"the broker holds model version {latest.version} of {self.name} but the checkpoint in"
                f" {self.run_dir} is at version {self.version}: point experiment.run_dir at this experiment's"
                f" run directory, or start over with --fresh (deletes the experiment's queues)")
        self.publisher = ModelPublisher(lambda: connect("coordinator", self.node, "models", self.url, attempts=3),
                                        self.topo, self.run_dir, self.run_dir / "model-cache")
        try:
            if latest is None or latest.version < self.version:
                self._publish_model()
                self.publisher.drain()  # workers need it first
            return self._serve(conn, ch)
        finally:
            self.publisher.close()
            self.publisher = None

    def _serve(self, conn, ch) -> dict:
        events = conn.channel()
        q = self.topo.listen(events, "coordinator", ("registration.#", "heartbeat.#", "metrics.#"))
        events.basic_consume(q, self._on_event, auto_ack=True)
        prefetch = max(16, 2 * self.aggregator.config.buffer_size + 8)
        if getattr(self, "consumer", None) is not None:
            self.consumer.release()  # the last session's spools stay on disk: recovered just below
        self.consumer = MessageConsumer(conn.channel(), self.topo.updates, self._on_update, prefetch=prefetch,
                                        reassembler=Reassembler(spill_threshold=0, spool_dir=str(self.spool_dir),
                                                                timeout_s=self.cfg.tasks.transfer_timeout_s,
                                                                journaled=True),
                                        consumer_tag=f"coordinator:{self.node or os.uname().nodename}:{os.getpid()}")
        self.metrics.track_consumer(self.consumer.stats)
        self.consumer.recover()
        log.info("coordinator_started", experiment=self.name, version=self.version, mode=self.cfg.fedbuff.mode,
                 params=parameter_count(self.model), concurrency=self.cfg.fedbuff.concurrency,
                 buffer_size=self.aggregator.config.buffer_size)
        try:
            while True:
                self._check_stop()
                self.publisher.check()
                self._dispatch()
                self.consumer.poll(conn, 0.2)
                expired = self.dispatcher.expire(time.time())
                if expired:
                    self.counters["tasks_expired"] += len(expired)
                    self.metrics.tasks_expired(len(expired))
                    log.warning("tasks_expired", count=len(expired), version=self.version)
        except Stop as stop:
            return self._finish(str(stop), conn, ch)

    def _check_stop(self) -> None:
        s = self.cfg.stop
        if self._stop_requested.is_set():
            raise Stop("signal")
        if s.max_versions and self.version >= s.max_versions:
            raise Stop("max_versions")
        if s.target_accuracy and self.best["accuracy"] >= s.target_accuracy:
            raise Stop("target_accuracy")
        if s.max_wall_s and self.elapsed() >= s.max_wall_s:
            raise Stop("max_wall_s")

    def _finish(self, reason: str, conn, ch) -> dict:
        """Checkpoint; unless stopped by a signal, evaluate the final version (when the evaluator has not) and
        test the exported best model, off this thread while it keeps the connection served. The last
        version is in the stream first (on a signal, a publication in flight may be cut short: see
        coordinator/model_publisher.py)."""
        if reason != "signal":
            self.publisher.drain()
        self._checkpoint(wait=True)
        self.aggregator.release_buffer()  # the run is over: room for the export test's model
        test = None
        if reason != "signal":
            ch.queue_purge(self.topo.tasks)  # nothing left for workers to do
            if self.last_eval is None or self.last_eval["version"] != self.version:
                serve_while(conn, self._evaluate, name="final-evaluation")
            test = serve_while(conn, self._test_export, name="test-export")
        summary = {**self.summary(reason), **(test or {})}
        if reason != "signal":
            self.record.append({"kind": "summary", **summary})
        log.info("coordinator_finished", **summary)
        return summary

    def _test_export(self) -> dict | None:
        """Load the exported best model the way a user would and evaluate it on the test split, and on the
        unseen-speaker split (`data.unseen_split`) when the data set has one (`unseen_accuracy`: None when not)."""
        if not self.export_dir.exists():
            return None
        from transformers import AutoModelForAudioClassification

        model = AutoModelForAudioClassification.from_pretrained(self.export_dir)
        out: dict = {}
        unseen = self.cfg.data.unseen_split
        for prefix, split in (("test", self.cfg.data.test_split), ("unseen", unseen)):
            if prefix == "unseen" and not has_split(self.cfg, split):
                log.info("export_unseen_skipped", split=split or None, path=self.cfg.data.path,
                         why="the data set has no such split" if split else "data.unseen_split is empty")
                out["unseen_accuracy"] = None
                continue
            result = evaluate(model, load_clips(self.cfg, split))
            log.info("export_tested", split=split, accuracy=round(result.accuracy, 4), version=self.best["version"])
            out.update({f"{prefix}_accuracy": round(result.accuracy, 4), f"{prefix}_loss": round(result.loss, 4),
                        f"{prefix}_per_class": {k: round(v, 4) for k, v in result.per_class.items()}})
        return out

    def summary(self, reason: str) -> dict:
        return {
            "reason": reason, "versions": self.version, "wall_s": round(self.elapsed(), 1),
            "best_accuracy": self.best["accuracy"], "best_version": self.best["version"],
            "final_accuracy": self.last_eval["accuracy"] if self.last_eval else None,
            "export": str(self.export_dir) if self.export_dir.exists() else None,
            "max_unserved_s": round(self.consumer.stats.max_unserved_s, 3) if hasattr(self, "consumer") else None,
            "counters": self.counts(),
            "workers": sorted(self.events.workers),
            "events_dropped": dict(self.events.dropped),
        }

    def counts(self) -> dict:
        """The run's cumulative counts so far (the summary's `counters`, and each version line's): the
        aggregator's, the coordinator's, tasks issued, and this session's consumer's dead letters by error."""
        return {**self.aggregator.counters, "rejected": dict(self.aggregator.counters["rejected"]), **self.counters,
                "issued": self.dispatcher.issued,
                "dead_letters_by_error": dict(self.consumer.stats.rejected) if hasattr(self, "consumer") else {}}

    # -- messages ----------------------------------------------------------------------------------------
    def task_local(self) -> TrainConfig:
        """The local training a task issued now asks for: `[local]`, its learning rate decayed by version."""
        t, local = self.cfg.tasks, self.cfg.local
        factor = decay_factor(t.lr_decay, self.version, t.lr_decay_versions, t.lr_floor)
        return local if factor == 1.0 else dataclasses.replace(local, learning_rate=local.learning_rate * factor)

    def _dispatch(self) -> None:
        for planned in self.dispatcher.to_issue(self.version, time.time()):
            task = messages.TrainTask(
                experiment=self.name, run_id=self.run_id, task_id=planned.task_id, min_version=planned.min_version,
                deadline_unix=planned.deadline_unix, codec=self.cfg.tasks.codec, model=self.cfg.model.name,
                freeze_feature_encoder=self.cfg.model.freeze_feature_encoder, local=self.task_local())
            publish_message(self.pub, self.topo.task_exchange, self.topo.TASKS_KEY, task, message_id=planned.task_id,
                            expiration=str(int(self.cfg.tasks.deadline_s * 1000)))
            self.metrics.tasks_issued()

    def _on_event(self, _ch, method, props, body) -> None:
        """One event, admitted by the event book (bounded, checked against the broker-validated sender)."""
        dropped = sum(self.events.dropped.values())
        got = self.events.admit(body, getattr(props, "user_id", None), self.version, time.time())
        if got is None:
            total = sum(self.events.dropped.values())
            if total > dropped and total & (total - 1) == 0:  # 1, 2, 4, 8...: a flood does not flood the log
                log.warning("events_dropped", total=total, by_reason=dict(self.events.dropped),
                            routing_key=method.routing_key[:128], user=str(getattr(props, "user_id", None))[:128])
            return
        if got.kind == "registration":
            w = self.events.workers[got.node]
            log.info("worker_registered", node=got.node, devices=w["devices"], shard=w["shard"],
                     shard_size=w["shard_size"])
        elif got.kind == "central_eval":
            self._evaluated(got.version, got.values["accuracy"], got.values["loss"])
        elif got.kind == "federated_eval":
            self.record.append({"kind": "federated_eval", "version": got.version, "worker": got.node,
                                "time_s": round(self.elapsed(), 2), **got.values})
            log.info("federated_eval", worker=got.node, version=got.version, **got.values)

    def _on_update(self, delivery: Delivery) -> Outcome:
        msg = delivery.message
        if not isinstance(msg, messages.Update):
            raise messages.InvalidField(f"{messages.type_tag(msg)} message on the updates queue")
        self._check_sender(msg, delivery.properties)
        if self.aggregator.seen(UpdateKey(msg.experiment, msg.task_id, msg.worker_id, msg.base_version)):
            self.dispatcher.finished(msg.task_id, False, self.version)
            self.metrics.dropped("duplicate")
            return Outcome.ACK  # applied already (a redelivery): its payload is not needed
        why = self.dispatcher.check(msg.task_id, self.version, self.aggregator.config.max_staleness)
        if why == "forged":
            raise messages.InvalidField(f"update from {msg.worker_id}: task {msg.task_id[:64]!r} was not issued by"
                                        f" this run")
        if why is not None:  # answered already by another update, or issued too long ago: dropped, counted
            self.counters["stale_dropped" if why == "stale" else "answered_dropped"] += 1
            self.metrics.dropped(why)
            log.warning("update_rejected", reason=why, task_id=msg.task_id, worker_id=msg.worker_id,
                        base_version=msg.base_version)
            return Outcome.ACK
        if msg.payload.transfer_id is not None and delivery.payload is None:
            raise messages.InvalidField(f"payload transfer {msg.payload.transfer_id} not received (or incomplete)")
        return self._apply(msg, delivery.payload if delivery.payload is not None else msg.payload.inline)

    def _check_sender(self, msg: messages.Update, props) -> None:
        """The update's worker must be the user the broker vouches for (its `user_id`): a worker node's user
        speaks only for that node; raises InvalidField (dead-lettered) otherwise."""
        who = definitions.sender_of(self.topo, getattr(props, "user_id", None))
        if who is None:
            raise messages.InvalidField(f"update {msg.task_id[:64]} has no user_id property: the broker cannot"
                                        f" vouch for its sender")
        if who.role == "worker" and msg.worker_id.split("/", 1)[0] != who.node:
            raise messages.InvalidField(f"update {msg.task_id[:64]} claims worker {msg.worker_id[:128]!r}, but the"
                                        f" broker vouches for user {who.user}")

    def _apply(self, msg: messages.Update, payload: bytes | CompletedTransfer, replayed: int = 0) -> Outcome:
        """Decode, validate and buffer one update; log it (unless `replayed`, its log sequence number) before
        it is acknowledged. Raises InvalidField for what is dead-lettered."""
        t0 = time.monotonic()
        data = payload.read_bytes() if isinstance(payload, CompletedTransfer) else payload
        version = self.version
        try:
            delta = codecs.decode(data, expected_codec=msg.codec, max_elements=self.numel)
            elements = sum(math.prod(v.shape) for v in delta.values())
            if msg.raw_bytes != 4 * elements:
                raise codecs.CodecError(f"raw_bytes={msg.raw_bytes}, but the payload decodes to {elements}"
                                        f" float32 values ({4 * elements} bytes)")
        except codecs.CodecError as exc:
            self.counters["codec_errors"] += 1
            self.metrics.rejected("codec")
            self.counters["dead_lettered"] += 1
            self.dispatcher.finished(msg.task_id, False, version)
            raise messages.InvalidField(f"update {msg.task_id} from {msg.worker_id}: payload: {exc}") from None
        # Replayed updates passed every check live; the log holds what was accepted (a new config must not
        # reject them now).
        update = ClientUpdate(msg.experiment, msg.task_id, msg.worker_id, msg.base_version, msg.num_samples, delta,
                              max_samples=None if replayed else self._max_samples(msg))
        t1 = time.monotonic()
        if self.aggregator.buffered + 1 >= self.aggregator.config.buffer_size:
            self._join_writer()  # this update may step the model, which the checkpoint being written reads
            if self.publisher is not None:  # None while the log is replayed
                self.publisher.wait_framed()  # ... and the version being published
        try:
            result = self.aggregator.add(update)
        except UpdateRejected as exc:
            self.dispatcher.finished(msg.task_id, False, version)
            if exc.reason == "stale":
                self.counters["stale_dropped"] += 1
                self.metrics.dropped("stale")
                return Outcome.ACK  # acknowledged, counted, dropped
            self.counters["dead_lettered"] += 1
            self.metrics.rejected(exc.reason)
            raise messages.InvalidField(f"update {msg.task_id} from {msg.worker_id} rejected: {exc}") from None
        self.dispatcher.finished(msg.task_id, result.status == "accepted", version)
        if result.status == "duplicate":
            self.metrics.dropped("duplicate")
            return Outcome.ACK
        t2 = time.monotonic()
        if replayed:
            self.wal_seq = replayed
        else:
            fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name != "payload"}
            self.wal_seq = self.wal.append(fields, payload)  # durable before the ack that follows
            arrived = payload.completed_at if isinstance(payload, CompletedTransfer) else t0
            now = time.monotonic()
            log.info("update_logged", task_id=msg.task_id, worker=msg.worker_id, seq=self.wal_seq,
                     wire_bytes=msg.wire_bytes, decode_s=round(t1 - t0, 4), aggregate_s=round(t2 - t1, 4),
                     log_s=round(now - t2, 4), buffered_after_s=round(t2 - arrived, 4),
                     durable_after_s=round(now - arrived, 4), stepped=result.record is not None)
            self.metrics.accepted(msg.worker_id.split("/", 1)[0], msg.wire_bytes, msg.raw_bytes,
                                  reported_fetched_bytes(msg.metrics), now - arrived)
            failpoint("coordinator.after_buffer")
        self.window["wire"] += msg.wire_bytes
        self.window["raw"] += msg.raw_bytes
        self.window["fetched"] += reported_fetched_bytes(msg.metrics)
        if result.record is not None:
            self._new_version(result.record, replaying=bool(replayed))
        elif result.refused is not None:
            self._step_refused(result.refused, self.wal_seq)
        return Outcome.ACK

    def _max_samples(self, msg: messages.Update) -> int | None:
        """The most samples a task of this run asks for: steps x batch, or for an epochs task the sender
        node's registered shard size (None while the node is not registered)."""
        local = self.cfg.local
        if local.steps:
            return local.steps * local.batch_size
        shard = self.events.workers.get(msg.worker_id.split("/", 1)[0], {}).get("shard_size")
        return local.total_steps(shard) * local.batch_size if isinstance(shard, int) and shard > 0 else None

    def _step_refused(self, refused, wal_seq: int) -> None:
        """A buffered step that was not finite: nothing applied (aggregator). Record it once (a replay finds
        the line of the live run), free its tasks' slots, start the next version's byte count afresh."""
        self.dispatcher.release(refused.task_ids)
        self.window = {"wire": 0, "raw": 0, "fetched": 0}
        if any(e.get("kind") == "step_refused" and e.get("wal_seq") == wal_seq for e in self.record.lines()):
            return
        self.metrics.dropped("step_refused", len(refused.task_ids))
        self.record.append({"kind": "step_refused", "version": refused.version, "wal_seq": wal_seq,
                            "time_s": round(self.elapsed(), 2), "tasks": list(refused.task_ids),
                            "workers": list(refused.worker_ids), "reason": refused.reason,
                            "detail": refused.detail[:500]})

    # -- versions ----------------------------------------------------------------------------------------
    def _evaluate(self) -> None:
        """The final version's evaluation, in this process (the run is over: nothing waits on it)."""
        result = evaluate(self.model, self.eval_clips)
        self._evaluated(self.version, result.accuracy, result.loss)
        if self.best["version"] == self.version:
            export_best(self.model, self.export_dir, {"experiment": self.name, "version": self.version,
                                                       "accuracy": result.accuracy})

    def _evaluated(self, version: int, accuracy: float, loss: float) -> None:
        """A central evaluation's result (the evaluator's, or the final one): record, best, last."""
        if self.last_eval is None or version >= self.last_eval["version"]:
            self.last_eval = {"version": version, "accuracy": accuracy, "loss": loss}
        if accuracy > self.best["accuracy"]:
            self.best = {"accuracy": accuracy, "version": version}
        self.record.append({"kind": "eval", "version": version, "time_s": round(self.elapsed(), 2),
                            "accuracy": round(accuracy, 4), "loss": round(loss, 4)})
        log.info("central_eval", version=version, accuracy=round(accuracy, 4), best=round(self.best["accuracy"], 4))

    def _publish_model(self) -> None:
        """Hand the current version to the publisher (its thread frames the live tensors into a file in
        `tasks.model_dtype`, no model-sized copy in memory, then writes the stream)."""
        self.publisher.submit(self.version, {n: t.detach() for n, t in self.state.items()}, self.cfg.tasks.model_dtype)

    def _new_version(self, record: AggregationRecord, replaying: bool = False) -> None:
        """Publish (workers need the model first), record, checkpoint when due (the evaluator evaluates it,
        in its own process). A version rebuilt from the log at resume is only recorded: its model was
        published, or the newest is at start."""
        self._model_is_initial = False
        self.dispatcher.forget_answered(self.version, self.aggregator.config.max_staleness)
        entry = {"version": record.version, "time_s": round(self.elapsed(), 2), "accuracy": None, "loss": None,
                 "staleness": list(record.staleness), "workers": list(record.worker_ids),
                 "tasks": list(record.task_ids), "updates": len(record.worker_ids),
                 "bytes_received": self.window["wire"], "raw_bytes": self.window["raw"],
                 "compression_ratio": round(self.window["raw"] / max(1, self.window["wire"]), 2),
                 "bytes_fetched": self.window["fetched"],
                 "delta_norm": round(record.delta_norm, 6), "counters": self.counts()}
        self.window = {"wire": 0, "raw": 0, "fetched": 0}
        if replaying:
            self.record.append(entry)
            return
        self.metrics.stepped(record.staleness)
        started = time.monotonic()
        self._publish_model()
        entry["publish_s"] = round(time.monotonic() - started, 3)
        self.record.append(entry)
        every_versions, every_s = self.cfg.checkpoint.every_versions, self.cfg.checkpoint.every_s
        if self.version - self._ckpt_at[0] >= every_versions or time.monotonic() - self._ckpt_at[1] >= every_s:
            self._checkpoint()
        fe = self.cfg.tasks.federated_eval_every
        if fe and record.version % fe == 0:
            self._issue_evaluations()
        log.info("version", **{k: entry[k] for k in ("version", "time_s", "accuracy", "staleness", "updates",
                                                    "publish_s")}, best=round(self.best["accuracy"], 4))
        if self.on_version is not None:
            self.on_version(entry)

    def _checkpoint(self, wait: bool = False) -> None:
        """Write a checkpoint of the state now, off this thread (one write at a time), then cut the log up to
        what it holds. wait: return only once it is on disk."""
        self._join_writer()
        state, seq, version = self._checkpoint_state(), self.wal_seq, self.version  # live tensors: see there
        self._ckpt_at = (version, time.monotonic())

        def write() -> None:
            try:
                started = time.monotonic()
                checkpoint.save(self.ckpt_path, state)
                self.wal.cut(seq)
                self.metrics.checkpoint_written(version)
                log.info("checkpoint_written", version=version, wal_seq=seq, bytes=self.ckpt_path.stat().st_size,
                         seconds=round(time.monotonic() - started, 3))
            except BaseException as exc:  # handed to the main thread at the next join
                self._writer_error = exc

        self._writer = threading.Thread(target=write, name="checkpoint-writer")
        self._writer.start()
        if wait:
            self._join_writer()

    def _join_writer(self) -> None:
        """Wait for the checkpoint being written; re-raise its error here."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._writer_error is not None:
            error, self._writer_error = self._writer_error, None
            raise error

    def _issue_evaluations(self) -> None:
        """One evaluate task per registered trainer (they answer with metrics on the events exchange)."""
        trainers = sum(len(w.get("devices", [])) for w in self.events.workers.values()) or 1
        self.events.expect_evaluations(self.version, trainers)
        for i in range(trainers):
            task = messages.EvaluateTask(self.name, f"eval-v{self.version}-{i}", self.version, "validation",
                                         time.time() + self.cfg.tasks.deadline_s)
            publish_message(self.pub, self.topo.task_exchange, self.topo.TASKS_KEY, task, message_id=task.task_id,
                            expiration=str(int(self.cfg.tasks.deadline_s * 1000)))


def install_signal_handlers(coordinator: Coordinator) -> None:
    signal.signal(signal.SIGTERM, coordinator.request_stop)
    signal.signal(signal.SIGINT, coordinator.request_stop)


