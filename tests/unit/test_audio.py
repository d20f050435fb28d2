"""Audio helpers (common/data/audio.py): fitting clips to the 1 s window, per-clip normalisation, band-limited
resampling and wav decoding with errors that name the file."""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import torch

from common.data.audio import CLIP_SAMPLES, SAMPLE_RATE, AudioFormatError, decode_wav, fit_clip, normalize, resample


def _dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[np.argmax(spectrum)])


def _wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_fit_clip_pads_a_short_clip_centred_with_zeros():
    out = fit_clip(np.ones(10, dtype=np.float32), length=20)
    assert out.dtype == np.float32 and out.shape == (20,)
    assert out[5:15].tolist() == [1.0] * 10
    assert not out[:5].any() and not out[15:].any()


def test_fit_clip_crops_a_long_clip_around_its_centre():
    out = fit_clip(np.arange(30, dtype=np.float32), length=10)
    assert out.tolist() == list(range(10, 20))


def test_fit_clip_places_the_clip_at_an_offset_clamped_to_the_window():
    short = np.ones(4, dtype=np.float32)
    assert np.flatnonzero(fit_clip(short, length=10, offset=0)).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(fit_clip(short, length=10, offset=100)).tolist() == [6, 7, 8, 9]
    assert fit_clip(np.arange(30, dtype=np.float32), length=10, offset=0).tolist() == list(range(10))
    assert fit_clip(np.arange(30, dtype=np.float32), length=10, offset=99).tolist() == list(range(20, 30))


def test_fit_clip_keeps_a_clip_of_exactly_one_second():
    clip = np.random.default_rng(0).standard_normal(CLIP_SAMPLES).astype(np.float32)
    np.testing.assert_array_equal(fit_clip(clip), clip)


def test_normalize_gives_zero_mean_unit_variance_per_row():
    g = torch.Generator().manual_seed(0)
    batch = torch.randn(3, 1000, generator=g) * torch.tensor([[0.1], [1.0], [50.0]]) + torch.tensor([[3.0], [-2.0], [0.5]])
    out = normalize(batch)
    torch.testing.assert_close(out.mean(-1), torch.zeros(3), atol=1e-4, rtol=0)  # float32 rounding
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def test_normalize_leaves_a_silent_row_finite():
    assert torch.isfinite(normalize(torch.zeros(2, 100))).all()


def test_resample_keeps_a_sine_at_its_frequency_and_amplitude():
    rate = 22_050
    t = np.arange(rate) / rate  # 1 s
    sine = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    out = resample(sine, rate, SAMPLE_RATE)
    assert out.dtype == np.float32 and out.size == SAMPLE_RATE
    assert _dominant_hz(out, SAMPLE_RATE) == pytest.approx(440.0, abs=1.0)
    assert np.sqrt(np.mean(out ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_resample_upsamples_too():
    t = np.arange(8_000) / 8_000
    out = resample(np.sin(2 * np.pi * 1000.0 * t), 8_000, SAMPLE_RATE)
    assert out.size == SAMPLE_RATE
    assert _dominant_hz(out, SAMPLE_RATE) == pytest.approx(1000.0, abs=1.0)


def test_resample_at_the_same_rate_is_the_identity():
    x = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(resample(x, SAMPLE_RATE, SAMPLE_RATE), x)


def test_resample_refuses_non_positive_rates():
    with pytest.raises(ValueError, match="positive"):
        resample(np.ones(10), 0, SAMPLE_RATE)


def test_decode_wav_reads_mono_16k_from_a_file_and_from_bytes(tmp_path):
    clip = (0.25 * np.sin(np.arange(1600) / 7)).astype(np.float32)
    path = tmp_path / "clip.wav"
    soundfile.write(path, clip, SAMPLE_RATE)
    from_file, rate = decode_wav(path)
    from_bytes, rate2 = decode_wav(path.read_bytes())
    assert rate == rate2 == SAMPLE_RATE
    assert from_file.dtype == np.float32 and from_file.shape == (1600,)
    np.testing.assert_allclose(from_file, clip, atol=1e-4)
    np.testing.assert_array_equal(from_file, from_bytes)


def test_decode_wav_resamples_to_16k_unless_told_not_to():
    data = _wav_bytes(np.zeros(22_050, dtype=np.float32), 22_050)
    assert decode_wav(data)[0].size == SAMPLE_RATE
    samples, rate = decode_wav(data, resample_to=None)
    assert rate == 22_050 and samples.size == 22_050


def test_decode_wav_refuses_a_file_that_is_not_audio_naming_it(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not a wav file\n")
    with pytest.raises(AudioFormatError, match="notes.wav"):
        decode_wav(path)
    with pytest.raises(AudioFormatError, match="upload-7"):
        decode_wav(b"garbage bytes", name="upload-7")


def test_decode_wav_refuses_a_stereo_file_naming_it(tmp_path):
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.zeros((1600, 2), dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioFormatError, match=r"stereo\.wav.*2 channels"):
        decode_wav(path)
