"""Error feedback for compressed updates (EF-SGD, Karimireddy et al. 2019; DGC, Lin et al. 2018).

A trainer compresses ``delta + residual`` and keeps what compression dropped. Invariant (the tests check it):
the sum of raw deltas equals the sum of decoded updates delivered plus the residual, up to float32 rounding.
The residual changes only when its update is delivered (``prepare``, then ``commit`` after the confirm);
it belongs to one ``(experiment, codec)`` (a run's id is part of the experiment name the worker gives it) and
resets, with a log line, when either changes or an encode fails. ``save``/``load`` keep it across restarts
(atomically); everything else is pure. Decisions and reasoning: docs/compression.md#error-feedback.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping

import torch

from common.compression.codecs import (
    CodecError,
    CodecSpec,
    EncodedUpdate,
    encode,
    parse_codec,
)
from common.compression.sparse import SparseTensor
from common.logs import get_logger
from common.wire import envelope
from common.wire.tensors import decode_state, encode_state

log = get_logger(__name__)

MAGIC = b"MQEF"
FORMAT = 1
_MAX_META = 1 << 16


@dataclass(frozen=True)
class PendingResidual:
    """An encoded update and the residual it leaves once delivered (`ErrorFeedback.commit`)."""

    encoded: EncodedUpdate
    codec: str
    residual: dict[str, torch.Tensor]
    reset_reason: str | None


class ErrorFeedback:
    """The residual of one trainer, per parameter name, for one experiment.

    experiment: the experiment the residual belongs to (saved with it and checked by ``load``).
    """

    def __init__(self, experiment: str) -> None:
        if not isinstance(experiment, str) or not experiment:
            raise ValueError(f"experiment must be a non-empty string, got {experiment!r}")
        self.experiment = experiment
        #: Canonical spec of the codec the residual belongs to; None before the first compress/load.
        self.codec: str | None = None
        self._residual: dict[str, torch.Tensor] = {}

    @property
    def residual(self) -> Mapping[str, torch.Tensor]:
        """name -> float32 residual (empty means zero everywhere). Do not modify the tensors."""
        return dict(self._residual)

    def residual_norm(self) -> float:
        """L2 norm of the whole residual (float64 accumulation); 0.0 when it is zero."""
        return math.sqrt(sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in self._residual.values()))

    def reset(self, reason: str) -> None:
        """Forget the residual (log line ``error_feedback_reset`` with ``reason`` when there was one)."""
        if self._residual:
            log.warning("error_feedback_reset", experiment=self.experiment, codec=self.codec, reason=reason)
        self._residual = {}

    def compress(
        self, delta: Mapping[str, torch.Tensor], codec: str | CodecSpec, *, generator: torch.Generator | None = None
    ) -> EncodedUpdate:
        """`prepare` and `commit` at once: for callers whose update cannot fail to be delivered."""
        pending = self.prepare(delta, codec, generator=generator)
        self.commit(pending)
        return pending.encoded

    def prepare(
        self, delta: Mapping[str, torch.Tensor], codec: str | CodecSpec, *, generator: torch.Generator | None = None
    ) -> PendingResidual:
        """Encode ``delta + residual`` with ``codec``; the residual it would leave, ``(delta + residual) -
        decoded``, is returned with the encoding and takes effect only at ``commit`` (after the update's
        publisher confirm): an update that is never confirmed leaves the residual as it was.

        delta: name -> floating-point tensor (any dtype or device; not modified).
        codec: the codec spec (the task's ``codec``); a codec different from the residual's starts from zero.
        generator: passed to ``common.compression.codecs.encode`` (stochastic rounding).
        Raises CodecError (bad codec, non-finite values: the residual is reset then) or TypeError (an entry
        that is not a float tensor).
        """
        spec = parse_codec(codec)
        key = str(spec)
        base, reason = self._residual, None
        if base and key != self.codec:
            base, reason = {}, f"codec changed from {self.codec!r} to {key!r}"
        elif base and not self._matches(delta):
            base, reason = {}, "parameter names or shapes changed"
        corrected: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, d in delta.items():
                    if not isinstance(d, torch.Tensor) or not d.is_floating_point():
                        raise TypeError(f"{name}: expected a floating-point tensor, got {type(d).__name__}")
                    c = torch.empty(d.shape, dtype=torch.float32, device=d.device).copy_(d)
                    r = base.get(name)
                    if r is not None:
                        c.add_(r.to(d.device))
                    corrected[name] = c
                encoded = encode(corrected, spec, generator=generator)
                if spec.is_lossless:
                    return PendingResidual(encoded, key, {}, reason)
                for name, dec in encoded.decoded.items():
                    c = corrected[name]
                    if isinstance(dec, SparseTensor):
                        c.view(-1).index_add_(0, dec.indices, dec.values, alpha=-1)
                    else:
                        c.sub_(dec)
        except Exception as exc:
            self.reset(f"encode failed: {exc}")  # a non-finite sum may come from the residual itself
            raise
        return PendingResidual(encoded, key, corrected, reason)

    def commit(self, pending: PendingResidual) -> None:
        """Make ``pending``'s residual the residual: its update was delivered."""
        if pending.reset_reason:
            self.reset(pending.reset_reason)
        self.codec, self._residual = pending.codec, pending.residual

    def save(self, path: str | os.PathLike) -> None:
        """Write the residual, experiment and codec to ``path`` atomically (temporary file, fsync, rename).

        Layout (a common.wire.envelope): ``b"MQEF"`` | u32 LE meta length | msgpack ``{"format", "experiment",
        "codec"}`` | a common.wire.tensors frame of the residual. Raises OSError when the file cannot be written
        (the previous file, if any, is then left as it was).
        """
        path = os.fspath(path)
        prefix = envelope.pack(MAGIC, {"format": FORMAT, "experiment": self.experiment, "codec": self.codec})
        frame = encode_state({n: t.detach() for n, t in self._residual.items()})
        directory = os.path.dirname(os.path.abspath(path))
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(prefix)
                f.write(frame)  # written apart from the prefix: no copy of a residual that may be large
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:  # pragma: no cover - platforms without directory fds
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load(self, path: str | os.PathLike, codec: str | CodecSpec | None = None) -> bool:
        """Replace the residual with the one saved at ``path``; returns True when it was restored.

        codec: when given, a residual saved for another codec is not restored.
        A missing file, an unreadable one, another experiment or another codec leaves a zero residual and
        logs why (``error_feedback_reset``, or ``error_feedback_fresh`` for a missing file); nothing is
        raised for those. Raises CodecError only when ``codec`` itself is invalid.
        """
        want = str(parse_codec(codec)) if codec is not None else None
        self._residual = {}
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            log.info("error_feedback_fresh", experiment=self.experiment, path=os.fspath(path))
            return False
        except OSError as exc:
            return self._discard(path, f"unreadable residual file: {exc}")
        try:
            meta, residual = _parse_saved(data)
        except (ValueError, KeyError) as exc:
            return self._discard(path, f"corrupt residual file: {exc}")
        if meta["experiment"] != self.experiment:
            return self._discard(path, f"saved for experiment {meta['experiment']!r}")
        if want is not None and meta["codec"] != want:
            return self._discard(path, f"saved for codec {meta['codec']!r}, not {want!r}")
        self._residual, self.codec = residual, meta["codec"]
        log.info("error_feedback_restored", experiment=self.experiment, codec=self.codec,
                 tensors=len(residual), residual_norm=self.residual_norm())
        return True

    def _discard(self, path: str | os.PathLike, reason: str) -> bool:
        log.warning("error_feedback_reset", experiment=self.experiment, path=os.fspath(path), reason=reason)
        return False

    def _matches(self, delta: Mapping[str, torch.Tensor]) -> bool:
        if set(delta) != set(self._residual):
            return False
        return all(tuple(getattr(d, "shape", ())) == tuple(self._residual[n].shape) for n, d in delta.items())


def _parse_saved(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, residual) from a file written by ``ErrorFeedback.save``; raises ValueError."""
    meta, frame = envelope.unpack(data, MAGIC, ValueError, what="a residual file", max_header=_MAX_META, max_bin_len=0)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"unsupported format {meta.get('format') if isinstance(meta, dict) else meta!r:.40}")
    if not isinstance(meta.get("experiment"), str) or not (meta.get("codec") is None or isinstance(meta["codec"], str)):
        raise ValueError("meta lacks experiment or codec")
    if meta["codec"] is not None:
        try:
            meta["codec"] = str(parse_codec(meta["codec"]))
        except CodecError as exc:
            raise ValueError(str(exc)) from None
    residual = decode_state(frame)
    for name, t in residual.items():
        if t.dtype is not torch.float32:
            raise ValueError(f"{name}: residual is {t.dtype}, expected torch.float32")
    return meta, residual
