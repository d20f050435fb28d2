"""Synthesis-time variety of the synthetic corpus (common/data/augment.py, the `augment` fields of
SynthSpec) and its second held-out split `test_unseen`: each transform measured to the number, the
defaults byte-identical to the format-1 corpus, held-out voice families disjoint from the others."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from datasets import load_from_disk

from common.data import augment, corpus
from common.data.audio import CLIP_SAMPLES, SAMPLE_RATE
from common.data.corpus import AUGMENTATIONS, UNSEEN, SynthSpec
from common.data.dataset import SPLITS, check_splits, label_counts
from common.data.espeak import (
    KLATT_VARIANTS,
    UNSEEN_LANGUAGE,
    Synthesizer,
    VariantBank,
    Voice,
    derived_variant,
    english_voices,
    unseen_voices,
)
from common.data.labels import KS_LABELS
from worker import cli

# sha256 over (audio float32 bytes, labels int64 bytes, speakers, words) of each split of
# SynthSpec(seed=0, per_class=4, eval_per_class=2) (the `tiny_spec` fixture), computed once with the
# format-1 code (git 0513070, before augmentation and test_unseen existed).
GOLDEN_TINY = {
    "train": "463273e9d3c03f002ec386355023104a82148809cb27a978e91a49392df4cc37",
    "validation": "6d9d2c3396eb3aeef75ea74354113b27c276c00f8044dd9e96723b6646ffbe7b",
    "test": "b112e97cf42a045291f35def874f62b4ae28d6a8f5b75faeac29171adfc4466a",
}
RATE = SAMPLE_RATE


def _split_hash(ds) -> str:
    table = ds.with_format("numpy")[:]
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(np.asarray(table["audio"], dtype=np.float32)).tobytes())
    h.update(np.asarray(table["label"], dtype=np.int64).tobytes())
    h.update("\n".join(ds["speaker"]).encode())
    h.update("\n".join(ds["word"]).encode())
    return h.hexdigest()


def _audio(ds) -> np.ndarray:
    return np.asarray(ds.with_format("numpy")["audio"], dtype=np.float32)


def _sine(hz: float, n: int = RATE) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(n) / RATE)).astype(np.float32)


def _dominant_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / RATE)[np.argmax(spectrum)])


# --- the transforms -------------------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [0.85, 1.15])
def test_speed_changes_duration_and_pitch_by_the_factor(factor):
    y = augment.speed(_sine(440), factor)
    assert y.size == round(RATE / factor)
    assert _dominant_hz(y) == pytest.approx(440 * factor, abs=2)


@pytest.mark.parametrize("factor", [0.75, 1.35])
def test_tempo_changes_duration_but_not_pitch_or_level(factor):
    y = augment.tempo_stretch(_sine(440), factor)
    assert y.size == round(RATE / factor)
    assert _dominant_hz(y) == pytest.approx(440, abs=2)
    inner = y[1000:-1000]
    assert np.sqrt(np.mean(inner ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_formant_shift_moves_the_envelope_and_keeps_the_harmonics():
    # A 160 Hz pulse train through one resonance at 1 kHz: after a 1.25 shift the envelope peaks at
    # 1.25 kHz while the spectrum still has its energy on the 160 Hz harmonics.
    pulses = np.zeros(RATE, np.float32)
    pulses[::100] = 1.0
    freqs = np.fft.rfftfreq(RATE, 1 / RATE)
    voiced = augment.apply_response(pulses, 1 + 20 * np.exp(-0.5 * ((freqs - 1000) / 150) ** 2))
    shifted = augment.formant_shift(voiced, 1.25)
    assert shifted.size == voiced.size

    def envelope_peak(x):
        spec, _, _ = augment._stft(x.astype(np.float64), 512, 128)
        env = augment.spectral_envelope(np.log(np.abs(spec) + 1e-9), 30).mean(axis=0)
        return float(np.fft.rfftfreq(512, 1 / RATE)[np.argmax(env)])

    assert envelope_peak(voiced) == pytest.approx(1000, abs=40)
    assert envelope_peak(shifted) == pytest.approx(1250, abs=40)
    spectrum = np.abs(np.fft.rfft(shifted))
    assert spectrum[1280] > 20 * spectrum[1200]  # harmonic 8 vs half-way between harmonics 7 and 8


@pytest.mark.parametrize("rt60,drr_db", [(0.3, 0.0), (0.8, 10.0)])
def test_room_impulse_response_decays_60_db_at_rt60_with_the_direct_to_reverb_ratio(rt60, drr_db):
    h = augment.room_impulse_response(np.random.default_rng(1), rt60, drr_db)
    assert h.size == round(1.5 * rt60 * RATE) and h[0] > 0
    assert np.sum(h.astype(np.float64) ** 2) == pytest.approx(1.0, rel=1e-5)
    assert 10 * np.log10(h[0] ** 2 / np.sum(h[1:].astype(np.float64) ** 2)) == pytest.approx(drr_db, abs=1e-3)
    # Schroeder backward integration of the reverberant tail: T30 extrapolated to 60 dB is RT60.
    tail = h.astype(np.float64).copy()
    tail[0] = 0
    edc = np.cumsum((tail ** 2)[::-1])[::-1]
    edc_db = 10 * np.log10(edc / edc[0])
    t5, t35 = np.argmax(edc_db < -5) / RATE, np.argmax(edc_db < -35) / RATE
    assert 2 * (t35 - t5) == pytest.approx(rt60, rel=0.05)


def test_reverberation_keeps_the_length_and_spreads_an_impulse_over_time():
    x = np.zeros(RATE, np.float32)
    x[1000] = 1.0
    h = augment.room_impulse_response(np.random.default_rng(0), 0.5, 0.0)
    y = augment.reverberate(x, h)
    assert y.size == RATE
    np.testing.assert_allclose(y[1000:1000 + h.size], h, atol=1e-6)
    assert np.abs(y[:1000]).max() < 1e-6  # causal (FFT round-off aside)


def test_mic_band_limits_remove_energy_outside_the_band():
    freqs = np.fft.rfftfreq(RATE, 1 / RATE)
    response = augment.mic_response(freqs, 300.0, 2000.0, order=4)
    at = {f: response[f] for f in (100, 300, 1000, 2000, 6000)}
    assert 20 * np.log10(at[300]) == pytest.approx(-3.01, abs=0.05)
    assert 20 * np.log10(at[2000]) == pytest.approx(-3.01, abs=0.05)
    assert 20 * np.log10(at[1000]) == pytest.approx(0, abs=0.1)
    assert 20 * np.log10(at[100]) < -37 and 20 * np.log10(at[6000]) < -37
    noise = np.random.default_rng(0).standard_normal(RATE).astype(np.float32)
    spec_in, spec_out = np.abs(np.fft.rfft(noise)) ** 2, np.abs(np.fft.rfft(augment.apply_response(noise, response))) ** 2
    outside = (freqs < 100) | (freqs > 6000)
    assert spec_out[outside].sum() < 2e-4 * spec_in[outside].sum()


def test_mic_equalisation_peaks_and_tilt_have_their_gain_in_db():
    freqs = np.array([250.0, 1000.0, 2000.0, 4000.0])
    flat = dict(low_hz=1e-3, high_hz=1e9, order=1)
    peak = augment.mic_response(freqs, peaks=((2000.0, 9.0, 1.0),), **flat)
    assert 20 * np.log10(peak[2]) == pytest.approx(9.0, abs=1e-3)
    assert 20 * np.log10(peak[1]) == pytest.approx(9.0 * np.exp(-2), abs=1e-3)  # one octave off, width 1 octave
    tilt = augment.mic_response(freqs, tilt_db=6.0, **flat)
    assert 20 * np.log10(tilt[1]) == pytest.approx(0, abs=1e-6)
    assert 20 * np.log10(tilt[3]) == pytest.approx(3 * np.tanh(2), abs=1e-3)
    assert 20 * np.log10(tilt[0]) == pytest.approx(-3 * np.tanh(2), abs=1e-3)


def test_hum_babble_clipping_quantisation_and_masks():
    wave = augment.hum(RATE, 50.0, np.array([1.0, 0.3]), np.zeros(2))
    assert np.sqrt(np.mean(wave ** 2)) == pytest.approx(1.0, rel=1e-4) and _dominant_hz(wave) == pytest.approx(50, abs=1)
    words = [np.ones(100, np.float32), 2 * np.ones(50, np.float32)]
    mix = augment.babble(1000, words, [950, 10])
    assert np.flatnonzero(mix).tolist() == list(range(0, 60)) + list(range(950, 1000))  # the first word wraps
    assert np.sqrt(np.mean(mix ** 2)) == pytest.approx(1.0, rel=1e-5)
    x = _sine(440)
    assert np.abs(augment.clip_peaks(x, 0.4)).max() == pytest.approx(0.2, rel=1e-6)
    q = augment.quantize(x, 8)
    np.testing.assert_array_equal(q * 128, np.round(q * 128)) and np.abs(q - x).max() <= 1 / 256 + 1e-7
    masked = augment.time_mask(x, [(100, 50), (-10, 20)])
    assert not masked[100:150].any() and not masked[:10].any() and masked[10:100].any()
    np.testing.assert_array_equal(masked[150:], x[150:])


def test_derived_variant_scales_formants_and_pitch_of_its_base():
    base = "language variant\nname male3\ngender male\npitch 80 120\nformant 1 96 97 100\nformant 3 96 103 100\n"
    text = derived_variant(base, ".m3_mq1", (1.1, 1.2, 1.25), 1.5, roughness=2, flutter=10)
    lines = text.splitlines()
    assert lines[:2] == ["language variant", "name .m3_mq1"] and "gender male" in lines
    assert {"formant 1 106 97 100", "formant 2 120 100 100", "formant 3 120 103 100", "pitch 120 180",
            "roughness 2", "flutter 10"} <= set(lines)
    assert "name male3" not in lines


# --- the spec -------------------------------------------------------------------------------------------

def test_synth_spec_augmentations_are_off_by_default_and_validated():
    spec = SynthSpec()
    assert spec.augment == () and spec.augment_p == 0.5 and spec.unseen and not spec.augment_eval
    assert SynthSpec(augment=("all",)).augment == AUGMENTATIONS
    assert SynthSpec(augment="none").augment == SynthSpec(augment=()).augment == SynthSpec(augment="").augment == ()
    with pytest.raises(ValueError, match="none cannot go with other names"):
        SynthSpec(augment="none,reverb")
    assert SynthSpec(augment="reverb, speed").augment == ("speed", "reverb")  # canonical order
    with pytest.raises(ValueError, match=r"SynthSpec\.augment.*'echo'"):
        SynthSpec(augment=("reverb", "echo"))
    with pytest.raises(ValueError, match="augment_p"):
        SynthSpec(augment_p=0.0)
    with pytest.raises(ValueError, match="augment_p"):
        SynthSpec(augment_p=1.5)


# --- the corpus -----------------------------------------------------------------------------------------

def test_default_corpus_train_validation_test_are_byte_identical_to_format_1(tiny_corpus, tiny_spec):
    assert (tiny_spec.seed, tiny_spec.per_class, tiny_spec.eval_per_class, tiny_spec.augment) == (0, 4, 2, ())
    assert {split: _split_hash(tiny_corpus[split]) for split in SPLITS} == GOLDEN_TINY


def test_unseen_split_is_sized_like_test_and_its_voice_families_are_in_no_other_split(tiny_corpus, tiny_spec):
    check_splits(tiny_corpus)
    assert label_counts(tiny_corpus[UNSEEN]) == {name: tiny_spec.eval_per_class for name in KS_LABELS}
    unseen = set(tiny_corpus[UNSEEN]["speaker"])
    others = set().union(*(tiny_corpus[s]["speaker"] for s in SPLITS))
    assert unseen and not unseen & others

    def family(name: str) -> set[str]:
        language, variant = name.split("+", 1)
        return ({"klatt"} if variant in KLATT_VARIANTS else set()) | ({"accent"} if language == UNSEEN_LANGUAGE else set())

    assert all(family(name) for name in unseen)
    assert not any(family(name) for name in others)
    # The whole voice lists, not only the voices this tiny corpus drew.
    assert not any(family(v.name) for v in english_voices())
    held_out = unseen_voices()
    # No voice of the other splits uses the held-out Klatt modes (1-3) through its variant file either.
    for variant in {v.variant for v in english_voices()}:
        modes = [line.split()[1:2] for line in VariantBank.variant_text(variant).splitlines() if line.startswith("klatt")]
        assert all(m not in (["1"], ["2"], ["3"]) for m in modes), variant
    assert all("klatt" in family(v.name) for v in held_out["klatt"])
    assert all("accent" in family(v.name) for v in held_out["accent"])


@pytest.mark.parametrize("voice", [Voice("en-us", k) for k in KLATT_VARIANTS] + [Voice(UNSEEN_LANGUAGE, "m3"),
                                                                                 Voice(UNSEEN_LANGUAGE, "f2")],
                         ids=lambda v: v.name)
def test_unseen_voices_produce_speech_like_audio(voice):
    synth = Synthesizer()
    x = synth.speak("yes", voice)
    assert 0.2 * synth.sample_rate < x.size < 1.5 * synth.sample_rate
    assert np.sqrt(np.mean(x ** 2)) > 0.01
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / synth.sample_rate)
    assert spectrum[(freqs > 80) & (freqs < 5000)].sum() > 0.8 * spectrum.sum()  # speech band energy


def test_klatt_noise_does_not_depend_on_other_synthesizers_in_the_process():
    # Klatt voices draw noise from the C library's process-wide rand(); each Synthesizer keeps its own state.
    voice = Voice("en-us-nyc", "caleb")  # klatt 6, breath 100
    fresh = Synthesizer().speak("bird", voice)
    busy, other = Synthesizer(), Synthesizer()
    for word in ("one", "two"):
        other.speak(word, Voice("en-us", "klatt2"))
    np.testing.assert_array_equal(busy.speak("bird", voice), fresh)


def test_corpus_builds_with_every_augmentation_on_deterministically():
    spec = SynthSpec(seed=5, per_class=1, eval_per_class=1, augment=("all",), augment_p=1.0, augment_eval=True)
    dd = corpus.generate(spec, progress=False)
    check_splits(dd)
    assert set(dd) == {*SPLITS, UNSEEN}
    for split in dd:
        audio = _audio(dd[split])
        assert audio.shape == (len(KS_LABELS), CLIP_SAMPLES) and np.isfinite(audio).all() and np.abs(audio).max() <= 1
        assert (np.abs(audio).max(axis=1) > 0).all()
    # `voices` adds derived speakers (".<variant>_mqN") beside each split's own voices.
    derived = {s for s in dd["train"]["speaker"] if "_mq" in s} | {s for s in dd["test"]["speaker"] if "_mq" in s}
    assert derived
    again = corpus.generate(spec, progress=False)
    for split in dd:
        assert _split_hash(again[split]) == _split_hash(dd[split])
    base = {s.replace(".", "").rsplit("_mq", 1)[0] for s in dd["train"]["speaker"]}
    held = {s.replace(".", "").rsplit("_mq", 1)[0] for split in ("validation", "test") for s in dd[split]["speaker"]}
    assert not base & held  # derived speakers stay in their base voice's split


def test_one_augmentation_changes_the_audio_but_not_words_speakers_or_other_splits(tiny_corpus, tiny_spec):
    spec = SynthSpec(seed=tiny_spec.seed, per_class=tiny_spec.per_class, eval_per_class=tiny_spec.eval_per_class,
                     augment=("reverb",), unseen=False)
    dd = corpus.generate(spec, progress=False)
    assert set(dd) == set(SPLITS)
    assert dd["train"]["word"] == tiny_corpus["train"]["word"]
    assert dd["train"]["speaker"] == tiny_corpus["train"]["speaker"]
    assert not np.array_equal(_audio(dd["train"]), _audio(tiny_corpus["train"]))
    for split in ("validation", "test"):  # training clips only, by default
        assert _split_hash(dd[split]) == GOLDEN_TINY[split]


def test_every_augmentation_varies_training_clips_only(tiny_corpus, tiny_spec):
    dd = corpus.generate(SynthSpec(seed=tiny_spec.seed, per_class=tiny_spec.per_class,
                                   eval_per_class=tiny_spec.eval_per_class, augment="all", unseen=False),
                         progress=False)
    assert dd["train"]["word"] == tiny_corpus["train"]["word"]
    assert not np.array_equal(_audio(dd["train"]), _audio(tiny_corpus["train"]))
    assert set(dd["train"]["speaker"]) - set(tiny_corpus["train"]["speaker"])  # `voices`: generated speakers
    for split in ("validation", "test"):  # the same words by the same speakers; espeak-ng's audio depends on
        assert dd[split]["word"] == tiny_corpus[split]["word"]  # what it spoke before, so not the same bytes
        assert dd[split]["speaker"] == tiny_corpus[split]["speaker"]


def test_cache_stamp_records_the_augmentations_and_rebuilds_when_they_change(tmp_path):
    out = tmp_path / "synth"
    corpus.build(out, SynthSpec(seed=3, per_class=1, eval_per_class=1, unseen=False), progress=False)
    assert set(load_from_disk(str(out))) == set(SPLITS)
    spec = SynthSpec(seed=3, per_class=1, eval_per_class=1, augment=("band", "mask"))
    rebuilt = corpus.build(out, spec, progress=False)
    assert UNSEEN in rebuilt
    stamp = json.loads((out / corpus.STAMP).read_text())
    assert stamp["format"] == corpus.FORMAT == 3 and stamp["augment"] == ["band", "mask"] and stamp["unseen"] is True
    again = corpus.build(out, spec, progress=False)  # same spec: the cache, tuple vs JSON list and all
    np.testing.assert_array_equal(_audio(again["train"]), _audio(rebuilt["train"]))


def test_worker_data_synth_command_takes_augmentation_flags(tmp_path, capsys):
    out = tmp_path / "cli-synth"
    rc = cli.main(["data", "synth", "--out", str(out), "--per-class", "1", "--eval-per-class", "1",
                   "--augment", "speed,noise", "--augment-p", "1", "--no-unseen"])
    assert rc == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[:3]] == list(SPLITS)
    stamp = json.loads((out / corpus.STAMP).read_text())
    assert stamp["augment"] == ["speed", "noise"] and stamp["augment_p"] == 1.0 and stamp["unseen"] is False
    rc = cli.main(["data", "synth", "--out", str(tmp_path / "none"), "--per-class", "1", "--eval-per-class", "1",
                   "--augment", "none", "--no-unseen"])
    assert rc == 0 and json.loads((tmp_path / "none" / corpus.STAMP).read_text())["augment"] == []
    rc = cli.main(["data", "synth", "--out", str(tmp_path / "bad"), "--per-class", "1", "--augment", "echo"])
    assert rc == 2 and "'echo'" in capsys.readouterr().err
