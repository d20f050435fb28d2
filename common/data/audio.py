"""Audio helpers shared by every data source: decode, resample, fit to the 1 s window, normalise.

Keyword-spotting clips are 16 kHz mono float32, exactly `CLIP_SAMPLES` long. Decoding uses soundfile
(libsndfile), never torchcodec. Resampling is band-limited (FFT, the same method as
`scipy.signal.resample`), vectorised in numpy.
"""
from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

import numpy as np

from common.errors import MqfedError

if TYPE_CHECKING:
    import torch

SAMPLE_RATE = 16_000
CLIP_SAMPLES = SAMPLE_RATE  # one second


class AudioFormatError(MqfedError, ValueError):
    """A file or buffer that is not usable audio (unreadable, multi-channel, empty); the message names it."""


def resample(samples: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of a 1-D signal from `from_rate` to `to_rate` Hz (float32 out)."""
    samples = np.asarray(samples, dtype=np.float32)
    if from_rate == to_rate or samples.size == 0:
        return samples
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    n_out = max(1, int(round(samples.size * to_rate / from_rate)))
    spectrum = np.fft.rfft(samples)
    keep = n_out // 2 + 1
    out_spec = np.zeros(keep, dtype=np.complex64)
    m = min(keep, spectrum.size)
    out_spec[:m] = spectrum[:m]
    return (np.fft.irfft(out_spec, n=n_out) * (n_out / samples.size)).astype(np.float32)


def decode_wav(source: str | os.PathLike | bytes, name: str | None = None, *,
               resample_to: int | None = SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """Decode a wav/flac file or its bytes to mono float32 at `resample_to` Hz (None: keep the rate).

    Decided: a clip at another sample rate is resampled (callers log it); a clip with more than one
    channel is refused, because a keyword recording with several channels is not what KS expects and
    mixing them silently could hide a broken export. Raises AudioFormatError naming the file.
    """
    import soundfile

    label = name or (os.fspath(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        data, rate = soundfile.read(io.BytesIO(source) if isinstance(source, bytes) else source,
                                    dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises RuntimeError/LibsndfileError/TypeError
        raise AudioFormatError(f"{label}: cannot decode audio ({exc})") from None
    if data.shape[1] != 1:
        raise AudioFormatError(f"{label}: {data.shape[1]} channels; keyword clips must be mono")
    samples = data[:, 0]
    if resample_to is not None and rate != resample_to:
        samples, rate = resample(samples, rate, resample_to), resample_to
    return samples, int(rate)


def fit_clip(samples: np.ndarray, length: int = CLIP_SAMPLES, offset: int | None = None) -> np.ndarray:
    """Pad with zeros or crop to exactly `length` samples.

    offset: where the clip starts inside the window (padding) or where the window starts inside the clip
    (cropping); None centres it.
    """
    samples = np.asarray(samples, dtype=np.float32)
    out = np.zeros(length, dtype=np.float32)
    n = samples.size
    if n <= length:
        start = (length - n) // 2 if offset is None else min(max(offset, 0), length - n)
        out[start:start + n] = samples
    else:
        start = (n - length) // 2 if offset is None else min(max(offset, 0), n - length)
        out[:] = samples[start:start + length]
    return out


def normalize(batch: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Zero mean, unit variance per clip (last dim), as `Wav2Vec2FeatureExtractor(do_normalize=True)` does."""
    mean = batch.mean(-1, keepdim=True)
    var = batch.var(-1, unbiased=False, keepdim=True)
    return (batch - mean) / (var + eps).sqrt()
