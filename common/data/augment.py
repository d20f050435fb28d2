"""Synthesis-time variety for the synthetic corpus (common/data/corpus.py): numpy only, no scipy.

Every transform is a pure function of its input and explicit parameters; the `draw_*` helpers turn a
`numpy.random.Generator` into those parameters, so a clip's augmentation is a pure function of
(rng, clip). Filtering is done in the frequency domain over the whole 1 s clip (zero-phase, exact
magnitude response), which is simpler than biquads and cheap for 16 000 samples.

- `speed`: resample-based speed change (duration and pitch move together, like a tape played fast).
- `tempo_stretch`: duration changes, pitch does not (WSOLA: overlap-add of Hann frames, each placed where
  it best continues the previous one).
- `formant_shift`: the spectral envelope (cepstrally smoothed log spectrum, per STFT frame) warped along
  the frequency axis, harmonics kept: a longer or shorter vocal tract at the same pitch.
- `room_impulse_response` / `reverberate`: a direct path plus exponentially decaying noise (-60 dB at
  RT60) at a given direct-to-reverberant ratio, applied by FFT convolution.
- `mic_response` / `apply_response`: a microphone: band limits (Butterworth-shaped magnitude) and
  peaking and shelf equalisation in dB.
- `hum`, `babble`, `clip_peaks`, `quantize`, `time_mask`: mains hum with harmonics, a mix of other
  words, hard clipping, coarse quantisation, silenced spans.
"""
from __future__ import annotations

import numpy as np

from common.data.audio import SAMPLE_RATE, resample

LN_1000 = float(np.log(1000.0))  # amplitude falls by 60 dB (x1/1000) over RT60


def speed(x: np.ndarray, factor: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Play `x` `factor` times faster (factor > 1: shorter and higher); length round(len / factor)."""
    if factor <= 0:
        raise ValueError(f"speed factor must be > 0, got {factor}")
    if x.size == 0 or factor == 1.0:
        return np.asarray(x, dtype=np.float32)
    n_out = max(1, int(round(x.size / factor)))
    return resample(x, x.size, n_out)


def tempo_stretch(x: np.ndarray, factor: float, frame: int = 512, tolerance: int = 128) -> np.ndarray:
    """Speak `x` `factor` times faster at the same pitch (WSOLA); length round(len / factor)."""
    if factor <= 0:
        raise ValueError(f"tempo factor must be > 0, got {factor}")
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0 or factor == 1.0:
        return x
    hop = frame // 2
    n_out = max(1, int(round(x.size / factor)))
    n_frames = (n_out + hop) // hop + 2
    # Output sample o sits at out[o + hop] (frame k starts at output time (k - 1) * hop, so the first
    # samples are covered by two frames); input sample i sits at xp[i + pad].
    pad = tolerance + int(np.ceil(hop * factor)) + frame
    tail = int(np.ceil((n_frames * hop + frame) * factor)) + tolerance + frame
    xp = np.concatenate([np.zeros(pad, np.float32), x, np.zeros(max(0, tail - x.size), np.float32)])
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame) / frame)).astype(np.float32)  # periodic Hann
    out = np.zeros(n_frames * hop + frame, np.float32)
    weight = np.zeros_like(out)
    prev = -1
    for k in range(n_frames):
        nominal = pad + int(round((k - 1) * hop * factor))
        if prev < 0:
            pos = nominal
        else:
            target = xp[prev + hop:prev + hop + frame]
            region = xp[nominal - tolerance:nominal + tolerance + frame]
            pos = nominal - tolerance + int(np.argmax(np.correlate(region, target, mode="valid")))
        out[k * hop:k * hop + frame] += xp[pos:pos + frame] * window
        weight[k * hop:k * hop + frame] += window
        prev = pos
    y = out[hop:hop + n_out] / np.maximum(weight[hop:hop + n_out], 1e-3)
    return y.astype(np.float32)


def _stft(x: np.ndarray, frame: int, hop: int) -> tuple[np.ndarray, np.ndarray, int]:
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame) / frame)
    n = x.size
    n_frames = int(np.ceil((n + frame) / hop)) + 1
    xp = np.zeros((n_frames - 1) * hop + frame)
    xp[frame:frame + n] = x
    idx = np.arange(frame)[None, :] + hop * np.arange(n_frames)[:, None]
    return np.fft.rfft(xp[idx] * window, axis=1), window, n_frames


def _istft(spec: np.ndarray, window: np.ndarray, hop: int, n: int) -> np.ndarray:
    frame = window.size
    frames = np.fft.irfft(spec, n=frame, axis=1) * window
    total = (spec.shape[0] - 1) * hop + frame
    out = np.zeros(total)
    weight = np.zeros(total)
    for k in range(spec.shape[0]):
        out[k * hop:k * hop + frame] += frames[k]
        weight[k * hop:k * hop + frame] += window ** 2
    return (out[frame:frame + n] / np.maximum(weight[frame:frame + n], 1e-8)).astype(np.float32)


def spectral_envelope(log_mag: np.ndarray, lifter: int) -> np.ndarray:
    """Cepstrally smoothed log magnitude (keep quefrencies below `lifter`), along the last axis."""
    cep = np.fft.irfft(log_mag, axis=-1)
    cep[..., lifter:cep.shape[-1] - lifter + 1] = 0
    return np.fft.rfft(cep, axis=-1).real


def formant_shift(x: np.ndarray, ratio: float, frame: int = 512, hop: int = 128, lifter: int = 30) -> np.ndarray:
    """Move the spectral envelope (formants) by `ratio` in frequency, keeping harmonics (pitch) and length."""
    if ratio <= 0:
        raise ValueError(f"formant ratio must be > 0, got {ratio}")
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0 or ratio == 1.0:
        return x
    spec, window, _ = _stft(x.astype(np.float64), frame, hop)
    log_mag = np.log(np.abs(spec) + 1e-9)
    env = spectral_envelope(log_mag, lifter)
    bins = np.arange(env.shape[1], dtype=np.float64)
    src = bins / ratio  # the new envelope at bin b is the old one at b / ratio
    warped = np.stack([np.interp(src, bins, row, right=row[-1] - 10.0) for row in env])
    return _istft(spec * np.exp(warped - env), window, hop, x.size)


def room_impulse_response(rng: np.random.Generator, rt60: float, drr_db: float, rate: int = SAMPLE_RATE,
                          onset_s: float = 0.002) -> np.ndarray:
    """A synthetic room: a unit direct path at t=0, then from `onset_s` Gaussian noise whose amplitude
    decays by 60 dB at `rt60` s (length 1.5 * rt60), scaled so direct/reverberant energy is `drr_db`;
    the whole response is normalised to unit energy."""
    if rt60 <= 0:
        raise ValueError(f"rt60 must be > 0, got {rt60}")
    n = max(2, int(round(1.5 * rt60 * rate)))
    t = np.arange(n) / rate
    tail = rng.standard_normal(n) * np.exp(-LN_1000 * t / rt60)
    tail[t < onset_s] = 0.0
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail ** 2))
    h = tail
    h[0] = 1.0
    return (h / np.sqrt(np.sum(h ** 2))).astype(np.float32)


def convolve(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Linear convolution by FFT, cut to len(x) (the tail past the clip is dropped)."""
    n = x.size + h.size - 1
    size = 1 << (n - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[:x.size]
    return y.astype(np.float32)


def reverberate(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    return convolve(np.asarray(x, dtype=np.float32), h)


def mic_response(freqs: np.ndarray, low_hz: float, high_hz: float, order: int = 2,
                 peaks: tuple[tuple[float, float, float], ...] = (), tilt_db: float = 0.0) -> np.ndarray:
    """Magnitude response at `freqs` (Hz): Butterworth-shaped high-pass at `low_hz` and low-pass at
    `high_hz` of `order`, times peaking bands (centre Hz, gain dB, bandwidth in octaves; Gaussian in
    log-frequency) and a tilt (a shelf: +-tilt_db/2 above/below 1 kHz, smooth over two octaves)."""
    f = np.maximum(np.asarray(freqs, dtype=np.float64), 1e-3)
    mag = 1 / np.sqrt(1 + (low_hz / f) ** (2 * order)) / np.sqrt(1 + (f / high_hz) ** (2 * order))
    octaves = np.log2(f / 1000.0)
    gain_db = tilt_db / 2 * np.tanh(octaves)
    for centre, gain, width in peaks:
        gain_db = gain_db + gain * np.exp(-0.5 * (np.log2(f / centre) / (width / 2)) ** 2)
    return mag * 10 ** (gain_db / 20)


def apply_response(x: np.ndarray, response: np.ndarray) -> np.ndarray:
    """Filter `x` by the magnitude `response` on its rfft bins (zero phase)."""
    return np.fft.irfft(np.fft.rfft(x) * response, n=x.size).astype(np.float32)


def hum(n: int, base_hz: float, harmonics: np.ndarray, phases: np.ndarray, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mains hum: `base_hz` and its multiples with amplitudes `harmonics`, unit RMS."""
    t = np.arange(n) / rate
    y = sum(a * np.sin(2 * np.pi * base_hz * (k + 1) * t + p) for k, (a, p) in enumerate(zip(harmonics, phases)))
    y = np.asarray(y, dtype=np.float64)
    return (y / (np.sqrt(np.mean(y ** 2)) + 1e-12)).astype(np.float32)


def babble(n: int, words: list[np.ndarray], offsets: list[int]) -> np.ndarray:
    """Other words overlapping in the background: each word at its offset (wrapped into the window), unit RMS."""
    y = np.zeros(n, np.float32)
    for word, offset in zip(words, offsets):
        word = word[:n]
        idx = (np.arange(word.size) + offset) % n
        y[idx] += word
    rms = float(np.sqrt(np.mean(y ** 2)))
    return y / rms if rms > 0 else y


def clip_peaks(x: np.ndarray, fraction: float) -> np.ndarray:
    """Hard clipping at `fraction` of the peak (an overdriven cheap microphone or preamp)."""
    level = fraction * float(np.abs(x).max())
    return np.clip(x, -level, level).astype(np.float32) if level > 0 else x


def quantize(x: np.ndarray, bits: int) -> np.ndarray:
    """Round to a `bits`-bit grid over [-1, 1] (a cheap converter)."""
    step = 2.0 ** (1 - bits)
    return (np.round(x / step) * step).astype(np.float32)


def time_mask(x: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Silence the sample spans [start, start + length) (dropouts)."""
    y = np.array(x, dtype=np.float32, copy=True)
    for start, length in spans:
        y[max(start, 0):max(start + length, 0)] = 0.0
    return y
