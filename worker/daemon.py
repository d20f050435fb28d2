"""The worker daemon: one `Trainer` (its own connection and task loop) per device.

A trainer registers and heartbeats, follows the model index, and takes one task at a time (prefetch 1): it
trains from the newest model it can get, publishes the compressed delta under confirms and acknowledges
the task only then; on SIGTERM it returns the task to the queue. Nothing is lost when it dies at any
point: the broker hands the task to another trainer. docs/federation.md#one-update-end-to-end.

No task can take a trainer down: a task it cannot run (unknown model, a model version that does not fit
the model named, options that fail, any exception in training) is dead-lettered and the trainer takes the
next one; a task whose deadline passes while it runs is stopped there and acknowledged unanswered
(`Trainer._on_task` lists every outcome; docs/federation.md#tasks-that-fail-or-expire).
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import signal
import threading
import time
import zlib
from pathlib import Path

import pika.exceptions
import torch

from broker import topology
from common.compression.error_feedback import ErrorFeedback
from common.config import ConfigError
from common.data.dataset import DataError, to_arrays
from common.data.shards import ShardSpec, select_shard
from common.errors import MqfedError
from common.failpoints import failpoint
from common.learning.model import ModelLoadError, ModelSpec, build_model
from common.learning.training import Clips, evaluate, train
from common.logs import configure, get_logger
from common.metrics import WorkerMetrics
from common.transport.connection import RETRYABLE, run_forever, serve_while
from common.transport.consumer import Delivery, MessageConsumer, Outcome
from common.transport.model_store import ModelNotFound, ModelStore, default_cache_dir
from common.transport.publish import publish_message, publish_payload
from common.wire import messages
from common.wire.tensors import decode_state
from worker.config import WorkerConfig

log = get_logger(__name__)


class TaskAborted(MqfedError):
    """Training stopped because the daemon is shutting down."""


class TaskExpired(MqfedError):
    """The task's deadline passed while it ran (`stage`: fetching, training, straggling, publishing,
    evaluating; at `step` of `total`, None where unknown): the coordinator has forgotten it and issued
    another, so it is acknowledged without an answer."""

    def __init__(self, task, stage: str, step: int = 0, total: int | None = None) -> None:
        self.stage, self.step, self.total = stage, step, total
        self.late_s = time.time() - task.deadline_unix
        super().__init__(f"task {task.task_id} passed its deadline {self.late_s:.1f} s ago while {stage}"
                         f" (step {step}/{total if total is not None else '?'})")


def check_deadline(task, stage: str, step: int = 0, total: int | None = None) -> None:
    """Raise TaskExpired when `task`'s deadline has passed (this machine's clock against the coordinator's)."""
    if time.time() > task.deadline_unix:
        raise TaskExpired(task, stage, step, total)


# Errors of the connection, not of the task: never dead-letter for them. They propagate: `run_forever`
# reconnects (RETRYABLE) and the unacknowledged task comes back through the broker.
_BROKER_ERRORS = RETRYABLE + (pika.exceptions.AMQPError,)


def _chunk_failpoints(index: int, count: int) -> None:
    failpoint("worker.after_chunk")
    if index == 0 and count > 1:
        failpoint("worker.after_first_chunk")


def gpu_memory(device: str):
    """A reader of (allocated, reserved) bytes on `device` for the metrics (read at scrape time; 0 before CUDA
    starts); None for a CPU trainer."""
    if not device.startswith("cuda"):
        return None
    index = int(device[5:])
    return lambda: (torch.cuda.memory_allocated(index), torch.cuda.memory_reserved(index))


def load_shards(data: str, shard: str) -> tuple[Clips, Clips | None]:
    """(train clips, validation clips or None) of `shard` of the data set at `data`. Raises DataError."""
    from datasets import load_from_disk

    try:
        dd = load_from_disk(data)
    except FileNotFoundError:
        raise DataError(f"worker.data {data!r}: no data set there (make one with `mqfed-worker data synth`)") from None
    spec = ShardSpec.parse(shard)
    train_clips = Clips.from_arrays(*to_arrays(select_shard(dd["train"], spec, "train")))
    try:
        val = Clips.from_arrays(*to_arrays(select_shard(dd["validation"], spec, "validation")))
    except (DataError, KeyError):
        val = None
    return train_clips, val


class Trainer:
    """The task loop for one device (see the module doc)."""

    def __init__(self, cfg: WorkerConfig, device: str, url: str | None = None) -> None:
        w = cfg.worker
        self.cfg, self.w, self.device, self.url = cfg, w, device, url
        self.worker_id = f"{w.node}/{device}"
        self.topo = topology.Topology(w.experiment)
        self.cache_dir = Path(w.cache_dir) if w.cache_dir else default_cache_dir()
        self.ef_path = self.cache_dir / w.experiment / f"residual-{w.node}-{device.replace(':', '')}.bin"
        if device.startswith("cuda") and (not torch.cuda.is_available() or int(device[5:]) >= torch.cuda.device_count()):
            raise ConfigError(f"worker.devices: {device} is not available (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r},"
                               f" {torch.cuda.device_count() if torch.cuda.is_available() else 0} visible GPUs)")
        self.train_clips, self.val_clips = load_shards(w.data, w.shard)
        self.ef: ErrorFeedback | None = None  # the residual of the run the last task belonged to
        self.opt_state: tuple[tuple, dict] | None = None  # ((run, model key, optimizer), its state) after the last training
        self.stop_event = threading.Event()
        self.model = None
        self.model_key: tuple | None = None
        self.base: tuple[int, dict[str, torch.Tensor]] | None = None  # (version, state) of the last fetch
        self.base_run: str | None = None  # the run it belongs to (a fresh start numbers versions from 0 again)
        self.fetched_bytes = 0  # model bytes downloaded for the current task
        self.status = "idle"
        self.tasks_done = 0
        # What heartbeats say besides the status (`mqfed-coordinator status --watch`): the task running now, the
        # samples/s of the last training, and the last update published (task id, base version, time.time()).
        self.task_id = ""
        self.samples_per_s = 0.0
        self.last_update: tuple[str, int, float] = ("", -1, 0.0)
        self.metrics = WorkerMetrics(w.node, device, lambda: self.base[0] if self.base is not None else None,
                                     lambda: self.status == "busy", gpu_memory(device))  # served by _trainer_main
        log.info("trainer_ready", worker=self.worker_id, shard=w.shard, train_clips=len(self.train_clips),
                 val_clips=len(self.val_clips) if self.val_clips else 0)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def request_stop(self, *_args) -> None:
        self.stop_event.set()

    def run(self) -> None:
        """Serve tasks until SIGTERM/`request_stop()`; reconnects with back-off when the broker goes away."""
        run_forever(self._session, "worker", self.w.node, self.device, self.url, stop=self.stop_event,
                    retry_on=(topology.ExperimentNotDeclared,), worker=self.worker_id)

    def _session(self, conn) -> None:
        self.conn = conn
        topology.require(conn.channel(), self.topo)
        self.pub = conn.channel()
        self.pub.confirm_delivery()
        self.store = ModelStore(conn.channel(), self.topo, cache_dir=self.cache_dir,
                                cache_versions=self.w.cache_versions)
        self.store.follow(conn.channel())
        self._register()
        tasks = MessageConsumer(conn.channel(), self.topo.tasks, self._on_task, prefetch=1,
                                consumer_tag=f"{self.worker_id}:{os.getpid()}")
        last_beat = 0.0
        while not self.stop_event.is_set():
            tasks.poll(conn, 0.5)
            if time.monotonic() - last_beat >= self.w.heartbeat_s:
                self._heartbeat()
                last_beat = time.monotonic()
        log.info("worker_stopping", worker=self.worker_id, tasks_done=self.tasks_done)

    # -- events --------------------------------------------------------------------------------------------
    def _publish_event(self, key: str, msg) -> None:
        publish_message(self.pub, self.topo.events, f"{key}.{self.w.node}", msg, mandatory=False)

    def _register(self) -> None:
        self._publish_event("registration", messages.Registration(
            self.w.experiment, self.w.node, [self.device], self.w.shard, len(self.train_clips)))

    def _heartbeat(self) -> None:
        task, base, when = self.last_update
        self._publish_event("heartbeat", messages.Heartbeat(
            self.w.experiment, self.w.node, self.device, time.time(), self.status, task_id=self.task_id,
            samples_per_s=self.samples_per_s, last_update_task=task, last_update_base=base, last_update_unix=when))

    # -- tasks ---------------------------------------------------------------------------------------------
    def _on_task(self, delivery: Delivery) -> Outcome:
        """Run one task and say how its delivery is settled; whatever the task, the trainer lives on.

        - Not a task of this experiment, or undecodable: dead-lettered (MessageError, logged by the consumer).
        - Past its deadline on arrival: acked unrun (`task_expired_on_arrival`).
        - Its deadline passes while it runs (checked at every training step, in a straggler's sleep, at every
          evaluation batch, after the fetch and before the answer is published): stopped there and acked
          without an answer (`task_expired`, with the stage and the step reached). The coordinator's
          dispatcher forgot the task at its deadline and issued a replacement: nobody expects the answer.
        - Cut short by a stop (SIGTERM): requeued, for another trainer (`task_returned`).
        - Cannot be run here: dead-lettered and the next task taken (`task_failed` with the error and its
          type; with the traceback unless it is an MqfedError). That is any `Exception` the task raises: a
          model name that is neither a preset nor loadable offline (ModelLoadError), a model version that
          does not fit the model named (ModelLoadError: missing keys, shapes), options that fail for this
          model, diverged training (TrainingDiverged), an unknown codec, and any other exception raised in
          training (a RuntimeError from torch, ...). A `torch.cuda.OutOfMemoryError` is one too: the task is
          dead-lettered (redelivered here it would fail again; the dead-letter queue keeps it to be looked
          at). A half-loaded model is never reused (see `_load_state`).
        - The connection lost, or a channel error (pika errors, RETRYABLE): propagates; `run_forever`
          reconnects and the unacknowledged task comes back through the broker. KeyboardInterrupt and
          SystemExit propagate too.

        A dead-lettered task reaches `mqfed.<exp>.dead-letters` with RabbitMQ's `x-death` header (queue,
        reason "rejected", count) and its body unchanged; a reject carries no reason of ours, so the reason
        is in this trainer's `task_failed` line, under the task id."""
        task = delivery.message
        if not isinstance(task, (messages.TrainTask, messages.EvaluateTask)) or task.experiment != self.w.experiment:
            self.metrics.task_failed("not_a_task")
            raise messages.InvalidField(f"not a task of experiment {self.w.experiment}: {type(task).__name__}")
        if task.deadline_unix < time.time():
            log.info("task_expired_on_arrival", task_id=task.task_id, worker=self.worker_id)
            self.metrics.task_failed("expired_on_arrival")
            return Outcome.ACK
        self.status, self.task_id = "busy", task.task_id
        try:
            if isinstance(task, messages.TrainTask):
                self._train_task(task)
            else:
                self._evaluate_task(task)
        except TaskAborted:
            self.metrics.task_failed("returned")
            log.info("task_returned", task_id=task.task_id, worker=self.worker_id, reason="shutting down")
            return Outcome.REQUEUE
        except TaskExpired as exc:
            self.metrics.task_failed("expired")
            log.warning("task_expired", task_id=task.task_id, worker=self.worker_id, stage=exc.stage, step=exc.step,
                        total=exc.total, late_s=round(exc.late_s, 2))
            return Outcome.ACK
        except _BROKER_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - a task must not take the trainer down (see the docstring)
            self._task_failed(task, exc)
            return Outcome.DEAD_LETTER
        finally:
            self.status, self.task_id = "idle", ""
        failpoint("worker.before_task_ack")
        self.tasks_done += 1
        self.metrics.task_done("train" if isinstance(task, messages.TrainTask) else "evaluate")
        return Outcome.ACK

    def _task_failed(self, task, exc: Exception) -> None:
        """Log why `task` is dead-lettered; after a failure on a GPU, give its cached memory back."""
        self.metrics.task_failed(type(exc).__name__)
        log.error("task_failed", task_id=task.task_id, worker=self.worker_id, error=f"{type(exc).__name__}: {exc}",
                  error_type=type(exc).__name__, exc_info=False if isinstance(exc, MqfedError) else exc)
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _wait_for(self, fn, *args):
        """`fn(*args)` off this thread while the connection is served, heartbeating at once (the task it runs)
        and every `heartbeat_s` (a timer the connection's event processing runs on this thread); training
        checks `self.abort`."""
        self.abort = threading.Event()
        timer = None

        def beat():
            nonlocal timer
            self._heartbeat()
            timer = self.conn.call_later(self.w.heartbeat_s, beat)

        timer = self.conn.call_later(0, beat)
        try:
            return serve_while(self.conn, fn, *args, abort=self.abort, name=f"train-{self.device}")
        finally:
            if self.conn.is_open:
                self.conn.remove_timeout(timer)

    def _model_for(self, name: str, freeze_feature_encoder: bool) -> torch.nn.Module:
        """The model architecture a task names: the trainer's model when it is that one, else a new one
        (kept by `_load_state` once a model version loaded into it); raises ModelLoadError."""
        if self.model is not None and self.model_key == (name, freeze_feature_encoder):
            return self.model
        return build_model(ModelSpec(name, freeze_feature_encoder), weights=False)

    def _fetch(self, min_version: int) -> tuple[int, dict[str, torch.Tensor]]:
        """(version, state) to train from: the version this trainer holds when it is >= min_version (no
        download), else the newest we can get, preferably >= min_version. Sets `fetched_bytes`."""
        self.fetched_bytes = 0
        if self.base is not None and self.base[0] >= min_version:
            return self.base
        deadline = time.monotonic() + 2.0
        while (self.store.newest is None or self.store.newest.version < min_version) and time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.1)
        ann = self.store.newest
        if ann is None:
            ann = self.store.latest()
            if ann is None:
                raise ModelNotFound(f"no model published for {self.w.experiment} yet")
        if self.base is not None and self.base[0] == ann.version:
            return self.base
        try:
            fetched = self.store.fetch(announcement=ann)
        except ModelNotFound as exc:  # aged out of the stream: take the newest there is
            log.warning("model_version_unavailable", version=ann.version, error=str(exc))
            fetched = self.store.fetch()
        version = fetched.announcement.version
        self.fetched_bytes = 0 if fetched.from_cache else fetched.announcement.size_bytes
        self.metrics.fetched(self.fetched_bytes)
        if version < min_version:
            log.warning("training_behind", worker=self.worker_id, base_version=version, min_version=min_version)
        self.base = (version, decode_state(fetched.path.read_bytes()))
        return self.base

    def _train_task(self, task: messages.TrainTask) -> None:
        """Train from the newest version, publish the delta. Raises TaskExpired when the deadline passes
        (before anything is published), TaskAborted on a stop, anything else when the task cannot be run."""
        key = (task.model, task.freeze_feature_encoder)
        model = self._model_for(*key)
        if self.base_run != task.run_id:
            self.base, self.base_run = None, task.run_id
        version, base = self._fetch(task.min_version)
        check_deadline(task, "fetching")
        self._load_state(model, key, version, base)
        log.info("task_started", task_id=task.task_id, worker=self.worker_id, base_version=version,
                 min_version=task.min_version)
        # Every task its own seed (batch order, augmentation), repeatable from the experiment's seed.
        seed = zlib.crc32(f"{task.local.seed}/{self.worker_id}/{task.task_id}".encode()) & 0x7FFFFFFF
        config = dataclasses.replace(task.local, seed=seed)

        def check_abort():
            if self.stop_event.is_set() or self.abort.is_set():
                raise TaskAborted()

        progress = [0, None]  # (steps done, steps in all): how far it got, for `task_expired`

        def on_step(step, total, _loss):
            failpoint("worker.during_training")
            progress[:] = [step, total]
            check_abort()
            check_deadline(task, "training", step, total)

        # local.keep_optimizer: go on from the optimizer state of this run's last training of this model; an
        # interrupted training leaves none behind (its moments were updated in place), so the next starts fresh
        owner = (task.run_id, key, config.optimizer)
        prior = self.opt_state[1] if config.keep_optimizer and self.opt_state and self.opt_state[0] == owner else None
        self.opt_state = None

        def work():
            result = train(model, self.train_clips, config, self.device, on_step=on_step, optimizer_state=prior)
            if config.keep_optimizer:
                self.opt_state = (owner, result.optimizer_state)
            end = time.monotonic() + (self.w.slowdown - 1.0) * result.seconds + self.w.delay_s
            while time.monotonic() < end:  # a straggler (experiments): sleep, abortable
                check_abort()
                check_deadline(task, "straggling", *progress)
                time.sleep(min(0.1, max(0.0, end - time.monotonic())))
            return result

        result = self._wait_for(work)
        self.metrics.trained(result.samples, result.seconds)
        trained = model.state_dict()
        delta = {n: (trained[n].detach().float().cpu() - base[n].float()) for n in base if base[n].is_floating_point()}
        ef = self._residual_for(task.run_id)
        pending = ef.prepare(delta, task.codec)
        encoded = pending.encoded
        check_deadline(task, "publishing", *progress)  # late: answer nothing (the residual stays as it was)
        payload = publish_payload(self.pub, self.topo.update_exchange, self.topo.UPDATES_KEY, encoded.data,
                                  inline_max_bytes=self.w.inline_max_bytes, chunk_bytes=self.w.chunk_bytes,
                                  after_chunk=_chunk_failpoints)
        update = messages.Update(
            experiment=self.w.experiment, task_id=task.task_id, worker_id=self.worker_id, base_version=version,
            num_samples=result.samples, metrics={"loss": result.loss, "seconds": result.seconds,
                                                 "samples_per_s": result.samples_per_s, "behind": float(max(0, task.min_version - version)),
                                                 "fetched_bytes": float(self.fetched_bytes)},
            codec=encoded.codec, raw_bytes=encoded.raw_bytes, wire_bytes=encoded.wire_bytes, payload=payload)
        publish_message(self.pub, self.topo.update_exchange, self.topo.UPDATES_KEY, update, message_id=task.task_id)
        self.last_update, self.samples_per_s = (task.task_id, version, time.time()), result.samples_per_s
        self.metrics.published(encoded.wire_bytes)
        ef.commit(pending)  # confirmed: what compression dropped waits for the next update
        try:
            ef.save(self.ef_path)
        except OSError as exc:  # answered: the task is done (not dead-lettered); the file is one update behind
            log.warning("residual_not_saved", task_id=task.task_id, worker=self.worker_id, path=str(self.ef_path),
                        error=f"{type(exc).__name__}: {exc}")
        log.info("update_published", task_id=task.task_id, worker=self.worker_id, base_version=version,
                 loss=round(result.loss, 4), seconds=round(result.seconds, 2), wire_bytes=encoded.wire_bytes,
                 ratio=round(encoded.ratio, 1))

    def _load_state(self, model: torch.nn.Module, key: tuple, version: int, state: dict[str, torch.Tensor]) -> None:
        """Load model version `version` into `model` and keep it as `self.model` for `key` (what the task
        named). A version that does not fit (a task naming another model than the one trained: missing keys,
        other shapes) raises ModelLoadError; `load_state_dict` has copied what fitted by then, so a cached model
        it half-loaded is dropped, and the next task starts from a clean build. A model that was never cached
        (built for this task) is simply not kept: the trainer's previous model stays as it was."""
        try:
            model.load_state_dict(state)
        except Exception as exc:
            if model is self.model:
                self.model, self.model_key = None, None
            if isinstance(exc, RuntimeError):  # what load_state_dict raises for missing keys and other shapes
                why = " ".join(line.strip() for line in str(exc).splitlines()[:3])[:500]
                raise ModelLoadError(f"model version {version} does not fit model {key[0]!r}: {why}") from exc
            raise
        self.model, self.model_key = model, key

    def _residual_for(self, run_id: str) -> ErrorFeedback:
        """The error-feedback residual of run `run_id`: restored from disk when saved by that run, else zero."""
        owner = f"{self.w.experiment}@{run_id}"
        if self.ef is None or self.ef.experiment != owner:
            self.ef = ErrorFeedback(owner)
            self.ef.load(self.ef_path)
        return self.ef

    def _evaluate_task(self, task: messages.EvaluateTask) -> None:
        """Evaluate a version on this trainer's validation shard (the model of its last train task, else the
        default preset), publish a Metrics event. Raises TaskExpired, TaskAborted, or why it cannot be run."""
        if self.val_clips is None:
            raise DataError(f"{self.worker_id} has no validation shard to evaluate on")
        key = self.model_key if self.model is not None and self.model_key is not None else (ModelSpec.name, False)
        model = self._model_for(*key)
        version, base = self._fetch(task.version)
        check_deadline(task, "fetching")
        self._load_state(model, key, version, base)

        def on_batch(done, total):
            if self.stop_event.is_set() or self.abort.is_set():
                raise TaskAborted()
            check_deadline(task, "evaluating", done, total)

        result = self._wait_for(lambda: evaluate(model, self.val_clips, self.device, on_batch=on_batch))
        check_deadline(task, "publishing", len(self.val_clips), len(self.val_clips))
        self._publish_event("metrics", messages.Metrics(
            self.w.experiment, self.worker_id, version,
            {"val_accuracy": result.accuracy, "val_loss": result.loss, "val_samples": float(result.samples)}, time.time()))


# -- process management ------------------------------------------------------------------------------------
def _trainer_main(cfg: WorkerConfig, device: str, url: str | None, threads: int) -> None:
    configure()
    torch.set_num_threads(threads)
    trainer = Trainer(cfg, device, url)
    signal.signal(signal.SIGTERM, trainer.request_stop)
    signal.signal(signal.SIGINT, trainer.request_stop)
    # One endpoint per trainer process: devices[i] on worker.metrics_port + i (docs/operations.md#metrics).
    trainer.metrics.serve(cfg.worker.metrics_port_of(device), cfg.worker.metrics_host, key="worker.metrics_port")
    try:
        trainer.run()
    finally:
        trainer.metrics.close()


def threads_per_trainer(cfg: WorkerConfig) -> int:
    if cfg.worker.threads:
        return cfg.worker.threads
    cpu_trainers = sum(1 for d in cfg.worker.devices if d == "cpu") or 1
    return max(1, (os.cpu_count() or 1) // cpu_trainers)


def run_daemon(cfg: WorkerConfig, url: str | None = None) -> int:
    """Run one trainer per device until SIGTERM; returns an exit status."""
    threads = threads_per_trainer(cfg)
    devices = cfg.worker.devices
    if len(devices) == 1:
        _trainer_main(cfg, devices[0], url, threads)
        return 0
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_trainer_main, args=(cfg, d, url, threads), name=f"trainer-{d}") for d in devices]
    for p in procs:
        p.start()

    def forward(signum, _frame):
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for p in procs:
        p.join()
    return max((p.exitcode or 0) for p in procs)


def main(args: argparse.Namespace) -> int:
    """`mqfed-worker run`: the config from file, MQFED_WORKER_ variables and flags, then the daemon. Raises
    MqfedError (ConfigError, DataError, ...) for the CLI to print."""
    from common.config import load_config

    overrides = {f"worker.{k}": v for k, v in (("node", args.node), ("data", args.data), ("shard", args.shard),
                                                ("experiment", args.experiment)) if v is not None}
    if args.devices:
        overrides["worker.devices"] = [d.strip() for d in args.devices.split(",") if d.strip()]
    return run_daemon(load_config(WorkerConfig, args.config, overrides=overrides))

