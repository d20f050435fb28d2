"""A synthetic SUPERB-KS corpus made offline with espeak-ng (common/data/espeak.py); docs/data.md.

Every clip: one word spoken by one speaker (an espeak-ng English voice + voice variant, e.g.
`en-gb-scotland+f3`) at a random speed, pitch and pitch range; silence trimmed, scaled to a random peak,
placed at a random offset in the 1 s window, plus coloured noise (white, pink or brown) at a random SNR.
`_unknown_` clips speak one of Speech Commands v0.01's auxiliary words; `_silence_` clips are noise
alone, at levels from near-silent to loud.

Speakers are split between train/validation/test (80/10/10 of the voices, shuffled by the seed), so no
speaker is in two splits and test accuracy is accuracy on unheard voices. A fourth split, `test_unseen`,
holds voice families no other split uses (Klatt-synthesis variants, the West Midlands accent): accuracy
on another synthesis engine and accent. Synthesis-time augmentations (`SynthSpec.augment`: speed, tempo,
formant, reverb, band, noise, mask, voices; common/data/augment.py) are off by default, which gives
format 1's train/validation/test byte for byte (the README's ablation says why). Everything is a
pure function of the spec: the same spec gives the same bytes. `build()` caches the result in a directory
(`datasets.load_from_disk(DIR)` opens it) and reuses it when the spec matches.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from datasets import DatasetDict, load_from_disk
from tqdm.auto import tqdm

from common.config import rule, validate
from common.data import augment
from common.data.audio import CLIP_SAMPLES, SAMPLE_RATE, resample
from common.data.dataset import SPLITS, DataError, check_splits, make_dataset
from common.data.espeak import (
    Synthesizer,
    VariantBank,
    Voice,
    derived_variant,
    english_voices,
    unseen_voices,
)
from common.data.labels import AUXILIARY_WORDS, KS_LABELS, SILENCE, UNKNOWN
from common.errors import InvalidValue
from common.logs import get_logger

log = get_logger(__name__)
STAMP = "mqfed-synth.json"
FORMAT = 3  # 2: the test_unseen split and the augmentation fields; 3: milder augmentation ranges
_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


AUGMENTATIONS = ("speed", "tempo", "formant", "reverb", "band", "noise", "mask", "voices")
UNSEEN = "test_unseen"


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    """What a synthetic corpus is made from.

    seed: everything random derives from it (speaker split, voices, placement, noise).
    per_class: training clips per label (twelve labels).
    eval_per_class: validation, test and test_unseen clips per label each (default: per_class // 4, at
        least 10).
    augment: synthesis-time variety to add, names from AUGMENTATIONS (or "all", or "none"); default none,
        which keeps train/validation/test byte-identical to format 1. docs/data.md says what each does.
    augment_p: the probability that each chosen augmentation is applied to a clip.
    augment_eval: augment validation/test/test_unseen clips too (default: training clips only).
    unseen: add the `test_unseen` split, whose speakers share no voice family with the other splits.
    """

    seed: int = rule(0, ge=0)
    per_class: int = rule(1000, ge=1)
    eval_per_class: int | None = rule(None, ge=1)
    augment: tuple[str, ...] = ()
    augment_p: float = rule(0.5, gt=0, le=1)
    augment_eval: bool = False
    unseen: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.augment, (list, str)):  # from TOML or a single name
            names = self.augment.split(",") if isinstance(self.augment, str) else self.augment
            object.__setattr__(self, "augment", tuple(n.strip() for n in names if n.strip()))
        validate(self)
        names = set(self.augment)
        unknown = sorted(names - set(AUGMENTATIONS) - {"all", "none"})
        if unknown:
            raise InvalidValue(f"SynthSpec.augment must name augmentations from {', '.join(AUGMENTATIONS)} "
                               f"(or all, or none), got {', '.join(map(repr, unknown))}")
        if "none" in names and len(names) > 1:
            raise InvalidValue(f"SynthSpec.augment: none cannot go with other names, got {sorted(names)}")
        chosen = AUGMENTATIONS if "all" in names else tuple(a for a in AUGMENTATIONS if a in names)
        object.__setattr__(self, "augment", chosen)

    def count(self, split: str) -> int:
        if split == "train":
            return self.per_class
        return self.eval_per_class or max(10, self.per_class // 4)

    def splits(self) -> tuple[str, ...]:
        return SPLITS + ((UNSEEN,) if self.unseen else ())


# The corpus the federation benchmarks (async_vs_sync, compression, downlink, peer_flower) measure on, and the
# directory they keep it in: 300 training clips per label, as when their README figures were taken (the
# default, which the demo uses, has 1000 since issue 16).
BENCHMARK_SPEC = SynthSpec(per_class=300)
BENCHMARK_DIR = ".cache/mqfed/synth-ks-300"


def split_speakers(voices: list[Voice], seed: int) -> dict[str, list[Voice]]:
    """Shuffle the voices with `seed` and cut them 80/10/10 into train/validation/test (disjoint)."""
    order = np.random.default_rng([seed, 0]).permutation(len(voices))
    n_train = int(len(voices) * _SPLIT_FRACTIONS[0])
    n_val = int(len(voices) * _SPLIT_FRACTIONS[1])
    cuts = {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {split: [voices[i] for i in sorted(idx)] for split, idx in cuts.items()}


def colored_noise(rng: np.random.Generator, n: int, beta: float) -> np.ndarray:
    """Unit-RMS noise with power spectrum ~ 1/f**beta (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n)
    freqs[0] = freqs[1]
    noise = np.fft.irfft(spectrum / freqs ** (beta / 2), n=n)
    return (noise / (np.sqrt(np.mean(noise ** 2)) + 1e-12)).astype(np.float32)


def _trim(speech: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    loud = np.flatnonzero(np.abs(speech) > threshold * (np.abs(speech).max() + 1e-12))
    return speech[loud[0]:loud[-1] + 1] if loud.size else speech[:0]


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


class Augmenter:
    """Synthesis-time variety for one split (the ranges: docs/data.md). `start(key)` before each clip: the
    augmentations of a clip are a pure function of (key, clip), each with its own random stream, so
    switching one on or off changes no other's draws and leaves the clip's word, voice and placement as
    they are without augmentation."""

    # name -> stream number; `voices` acts on the speaker pool, not on clips.
    CLIP_AUGMENTATIONS = ("speed", "tempo", "formant", "reverb", "band", "noise", "mask")

    def __init__(self, chosen: tuple[str, ...], p: float, babble_voices: list[Voice],
                 data_path: str | None = None) -> None:
        self.chosen = set(chosen)
        self.p = p
        self.babble_voices = babble_voices
        self._data_path = data_path
        self._babble_synth: Synthesizer | None = None
        self._rngs: dict[str, np.random.Generator] = {}
        self._on: dict[str, bool] = {}

    def start(self, key: list[int]) -> None:
        self._rngs = {name: np.random.default_rng(key + [100 + k]) for k, name in enumerate(self.CLIP_AUGMENTATIONS)}
        self._on = {name: name in self.chosen and bool(self._rngs[name].random() < self.p) for name in self._rngs}

    def speech(self, speech: np.ndarray) -> np.ndarray:
        """The dry word (16 kHz, untrimmed): formant shift, tempo, speed."""
        if self._on["formant"]:
            speech = augment.formant_shift(speech, _log_uniform(self._rngs["formant"], 0.85, 1.2))
        if self._on["tempo"]:
            speech = augment.tempo_stretch(speech, _log_uniform(self._rngs["tempo"], 0.85, 1.2))
        if self._on["speed"]:
            speech = augment.speed(speech, self._rngs["speed"].uniform(0.88, 1.12))
        return speech

    def placed(self, clip: np.ndarray, start: int, size: int) -> np.ndarray:
        """The word in its window, before noise: time masks over the word, then the room."""
        if self._on["mask"]:
            rng = self._rngs["mask"]
            length = int(rng.uniform(0.01, 0.04) * SAMPLE_RATE)
            spans = [(int(rng.integers(start - length // 2, start + max(size - length // 2, 1))), length)]
            clip = augment.time_mask(clip, spans)
        if self._on["reverb"]:
            rng = self._rngs["reverb"]
            h = augment.room_impulse_response(rng, _log_uniform(rng, 0.1, 0.8), rng.uniform(0.0, 15.0))
            clip = augment.reverberate(clip, h)
        return clip

    def noise(self, clip: np.ndarray, speech_rms: float | None, noise_rms: float) -> np.ndarray:
        """More noise types: babble of other words and mains hum (speech clips), hum (silence)."""
        if not self._on["noise"]:
            return clip
        rng = self._rngs["noise"]
        kind = str(rng.choice(["babble", "hum", "both"])) if speech_rms is not None else "hum"
        if kind in ("babble", "both"):
            assert speech_rms is not None
            words = [self._babble_word(rng) for _ in range(int(rng.integers(3, 7)))]
            offsets = [int(rng.integers(0, CLIP_SAMPLES)) for _ in words]
            level = speech_rms / 10 ** (rng.uniform(15.0, 30.0) / 20)
            clip = clip + augment.babble(CLIP_SAMPLES, words, offsets) * level
        if kind in ("hum", "both"):
            base = float(rng.choice([50.0, 60.0]))
            harmonics = rng.uniform(0, 1, 6) * 0.7 ** np.arange(6)
            wave = augment.hum(CLIP_SAMPLES, base, harmonics, rng.uniform(0, 2 * np.pi, 6))
            level = (speech_rms / 10 ** (rng.uniform(15.0, 40.0) / 20) if speech_rms is not None
                     else noise_rms * rng.uniform(0.3, 3.0))
            clip = clip + wave * level
        return clip

    def mic(self, clip: np.ndarray) -> np.ndarray:
        """The microphone and converter: band limits and equalisation, then (noise) clipping or quantisation."""
        if self._on["band"]:
            rng = self._rngs["band"]
            low, high = _log_uniform(rng, 50.0, 300.0), _log_uniform(rng, 3400.0, 7800.0)
            order = int(rng.choice([1, 2, 4]))
            peaks = tuple((_log_uniform(rng, 150.0, 6000.0), float(rng.uniform(-9.0, 9.0)), float(rng.uniform(0.5, 2.0)))
                          for _ in range(int(rng.integers(0, 3))))
            response = augment.mic_response(np.fft.rfftfreq(CLIP_SAMPLES, 1 / SAMPLE_RATE), low, high, order, peaks,
                                            float(rng.uniform(-6.0, 6.0)))
            peak = float(np.abs(clip).max())
            clip = augment.apply_response(clip, response)
            clip *= peak / (float(np.abs(clip).max()) + 1e-12)  # the microphone colours, the gain stays
        if self._on["noise"]:
            rng = self._rngs["noise"]
            converter = str(rng.choice(["none", "clip", "quantize"], p=[0.5, 0.25, 0.25]))
            if converter == "clip":
                clip = augment.clip_peaks(clip, rng.uniform(0.3, 0.8))
            elif converter == "quantize":
                clip = augment.quantize(clip, int(rng.integers(8, 13)))
        return clip

    def _babble_word(self, rng: np.random.Generator) -> np.ndarray:
        if self._babble_synth is None:  # its own library copy: the main synthesizer's sequence stays as it is
            self._babble_synth = Synthesizer(self._data_path)
        voice = self.babble_voices[int(rng.integers(len(self.babble_voices)))]
        word = str(rng.choice(AUXILIARY_WORDS))
        speech = self._babble_synth.speak(word, voice, rate_wpm=int(rng.integers(110, 260)),
                                          pitch=int(rng.integers(10, 90)), pitch_range=int(rng.integers(10, 90)))
        speech = resample(speech, self._babble_synth.sample_rate, SAMPLE_RATE)
        return speech * (rng.uniform(0.3, 1.0) / (np.abs(speech).max() + 1e-12))


def render_clip(synth: Synthesizer, rng: np.random.Generator, label: str, voice: Voice,
                aug: Augmenter | None = None) -> tuple[np.ndarray, str]:
    """One 1 s clip of `label` spoken by `voice` (or noise for `_silence_`); returns (clip, word).
    `aug` (already `start`ed for this clip) adds variety; `rng`'s draws are the same with or without it."""
    clip = np.zeros(CLIP_SAMPLES, dtype=np.float32)
    word = ""
    rms: float | None = None
    if label != SILENCE:
        word = str(rng.choice(AUXILIARY_WORDS)) if label == UNKNOWN else label
        speech = synth.speak(word, voice, rate_wpm=int(rng.integers(110, 260)), pitch=int(rng.integers(10, 90)),
                             pitch_range=int(rng.integers(10, 90)))
        speech = resample(speech, synth.sample_rate, SAMPLE_RATE)
        if aug is not None:
            speech = aug.speech(speech)
        speech = _trim(speech)[:CLIP_SAMPLES]
        if speech.size == 0:
            raise DataError(f"espeak-ng produced no audio for {word!r} with {voice.name}")
        speech *= rng.uniform(0.1, 0.9) / (np.abs(speech).max() + 1e-12)
        start = int(rng.integers(0, CLIP_SAMPLES - speech.size + 1))
        clip[start:start + speech.size] = speech
        rms = float(np.sqrt(np.mean(speech ** 2)))
        noise_rms = rms / 10 ** (rng.uniform(5.0, 40.0) / 20)
        if aug is not None:
            clip = aug.placed(clip, start, speech.size)
    else:
        noise_rms = 10 ** rng.uniform(-4.0, -1.0)
    clip += colored_noise(rng, CLIP_SAMPLES, float(rng.choice([0.0, 1.0, 2.0]))) * noise_rms
    if aug is not None:
        clip = aug.mic(aug.noise(clip, rms, noise_rms))
    return np.clip(clip, -1.0, 1.0).astype(np.float32, copy=False), word


def derived_variants(seed: int, base: list[str], per_variant: int = 3) -> dict[str, str]:
    """The `voices` augmentation's new speakers: `per_variant` variants made from each base variant
    (formants moved together by 0.88-1.15 and each by a further +-3 %, pitch scaled by 0.8-1.25, random
    roughness and flutter); name -> variant file text."""
    out = {}
    for v_no, variant in enumerate(base):
        text = VariantBank.variant_text(variant)
        for j in range(per_variant):
            rng = np.random.default_rng([seed, 99, v_no, j])
            common_scale = rng.uniform(0.88, 1.15)
            scales = tuple(float(common_scale * rng.uniform(0.97, 1.03)) for _ in range(5))
            out[f".{variant}_mq{j + 1}"] = derived_variant(
                text, f".{variant}_mq{j + 1}", scales, float(rng.uniform(0.8, 1.25)),
                roughness=int(rng.integers(0, 5)), flutter=int(rng.integers(0, 31)))
    return out


def split_voices(spec: SynthSpec) -> tuple[dict[str, list[Voice]], dict[str, str]]:
    """The speakers of each split and, with the `voices` augmentation, the generated variant files."""
    voices = english_voices()
    if len(voices) < 10:
        raise DataError(f"espeak-ng offers only {len(voices)} English voices; need at least 10 for three speaker splits")
    speakers = split_speakers(voices, spec.seed)
    generated: dict[str, str] = {}
    if "voices" in spec.augment:
        generated = derived_variants(spec.seed, sorted({v.variant for v in voices}))
        by_base: dict[str, list[str]] = {}
        for name in generated:
            by_base.setdefault(name[1:].rsplit("_mq", 1)[0], []).append(name)
        for split in (SPLITS if spec.augment_eval else ("train",)):
            speakers[split] = speakers[split] + [Voice(v.language, d) for v in speakers[split] for d in by_base[v.variant]]
    if spec.unseen:
        families = unseen_voices()
        speakers[UNSEEN] = families["klatt"] + families["accent"]
    return speakers, generated


def generate(spec: SynthSpec, progress: bool = True) -> DatasetDict:
    """Make the corpus in memory (see the module doc). Deterministic in `spec`."""
    speakers, generated = split_voices(spec)
    families = list(unseen_voices().values())
    bank = VariantBank(generated) if generated else None
    try:
        synth = Synthesizer(bank.path if bank else None)
        total = sum(spec.count(s) * len(KS_LABELS) for s in spec.splits())
        bar = tqdm(total=total, desc="synthesizing KS corpus", unit="clip", disable=not progress)
        out = {}
        for split_no, split in enumerate(spec.splits()):
            n = spec.count(split)
            pool = speakers[split]
            aug = None
            if spec.augment and (split == "train" or spec.augment_eval):
                aug = Augmenter(spec.augment, spec.augment_p, pool, bank.path if bank else None)
            audio = np.zeros((n * len(KS_LABELS), CLIP_SAMPLES), dtype=np.float32)
            labels: list[int] = []
            names: list[str] = []
            words: list[str] = []
            for label_no, label in enumerate(KS_LABELS):
                for i in range(n):
                    key = [spec.seed, 1 + split_no, label_no, i]
                    rng = np.random.default_rng(key)
                    if split == UNSEEN:  # each family half the time, however many voices it has
                        family = families[int(rng.integers(len(families)))]
                        voice = family[int(rng.integers(len(family)))]
                    else:
                        voice = pool[int(rng.integers(len(pool)))]
                    if aug is not None:
                        aug.start(key)
                    audio[len(labels)], word = render_clip(synth, rng, label, voice, aug)
                    labels.append(label_no)
                    names.append(voice.name)
                    words.append(word)
                    bar.update()
            out[split] = make_dataset(audio, labels, names, words,
                                      description=f"mqfed synthetic KS corpus {dataclasses.asdict(spec)}")
        bar.close()
    finally:
        if bank is not None:
            bank.close()
    return DatasetDict(out)


def _stamp(spec: SynthSpec) -> dict:
    return json.loads(json.dumps({"format": FORMAT, **dataclasses.asdict(spec)}))  # tuples as JSON lists


def build(out_dir: str | os.PathLike, spec: SynthSpec = SynthSpec(), progress: bool = True) -> DatasetDict:
    """The corpus for `spec` in `out_dir`: reused when the directory holds the same spec, else made and
    written atomically (to a temporary directory beside it, then renamed). A non-empty `out_dir` that is
    not a corpus (no stamp file) is never replaced: DataError."""
    out = Path(out_dir)
    stamp_path = out / STAMP
    if stamp_path.exists():
        try:
            if json.loads(stamp_path.read_text()) == _stamp(spec):
                dd = load_from_disk(str(out))
                check_splits(dd, str(out))
                log.info("synth_corpus_cached", path=str(out), train=len(dd["train"]))
                return dd
        except (OSError, ValueError) as exc:
            log.warning("synth_corpus_cache_unusable", path=str(out), error=str(exc))
        log.info("synth_corpus_rebuild", path=str(out), reason="spec differs or cache unreadable")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not a synthetic KS corpus (no {STAMP}); not replacing it")
    dd = generate(spec, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    dd.save_to_disk(str(tmp))
    (tmp / STAMP).write_text(json.dumps(_stamp(spec)))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("synth_corpus_written", path=str(out), **{s: len(dd[s]) for s in dd})
    return load_from_disk(str(out))
