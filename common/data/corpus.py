"""A synthetic SUPERB-KS corpus made offline with espeak-ng (common/data/espeak.py).

Every clip: one word spoken by one speaker (an espeak-ng English voice + voice variant, e.g.
`en-gb-scotland+f3`) at a random speed, pitch and pitch range; silence trimmed, scaled to a random peak,
placed at a random offset in the 1 s window, plus coloured noise (white, pink or brown) at a random SNR.
`_unknown_` clips speak one of Speech Commands v0.01's auxiliary words; `_silence_` clips are noise
alone, at levels from near-silent to loud.

Speakers are split between train/validation/test (80/10/10 of the voices, shuffled by the seed), so no
speaker is in two splits and test accuracy is accuracy on unheard voices. Everything is a pure function
of (seed, per_class, eval_per_class): the same spec gives the same bytes. `build()` caches the result in a
directory (`datasets.load_from_disk(DIR)` opens it) and reuses it when the spec matches.
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
from common.data.audio import CLIP_SAMPLES, SAMPLE_RATE, resample
from common.data.dataset import SPLITS, DataError, check_splits, make_dataset
from common.data.espeak import Synthesizer, Voice, english_voices
from common.data.labels import AUXILIARY_WORDS, KS_LABELS, SILENCE, UNKNOWN
from common.logs import get_logger

log = get_logger(__name__)
STAMP = "mqfed-synth.json"
FORMAT = 1
_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    """What a synthetic corpus is made from.

    seed: everything random derives from it (speaker split, voices, placement, noise).
    per_class: training clips per label (twelve labels).
    eval_per_class: validation and test clips per label each (default: per_class // 4, at least 10).
    """

    seed: int = rule(0, ge=0)
    per_class: int = rule(300, ge=1)
    eval_per_class: int | None = rule(None, ge=1)

    def __post_init__(self) -> None:
        validate(self)

    def count(self, split: str) -> int:
        if split == "train":
            return self.per_class
        return self.eval_per_class or max(10, self.per_class // 4)


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


def render_clip(synth: Synthesizer, rng: np.random.Generator, label: str, voice: Voice) -> tuple[np.ndarray, str]:
    """One 1 s clip of `label` spoken by `voice` (or noise for `_silence_`); returns (clip, word)."""
    clip = np.zeros(CLIP_SAMPLES, dtype=np.float32)
    word = ""
    if label != SILENCE:
        word = str(rng.choice(AUXILIARY_WORDS)) if label == UNKNOWN else label
        speech = synth.speak(word, voice, rate_wpm=int(rng.integers(110, 260)), pitch=int(rng.integers(10, 90)),
                             pitch_range=int(rng.integers(10, 90)))
        speech = _trim(resample(speech, synth.sample_rate, SAMPLE_RATE))[:CLIP_SAMPLES]
        if speech.size == 0:
            raise DataError(f"espeak-ng produced no audio for {word!r} with {voice.name}")
        speech *= rng.uniform(0.1, 0.9) / (np.abs(speech).max() + 1e-12)
        start = int(rng.integers(0, CLIP_SAMPLES - speech.size + 1))
        clip[start:start + speech.size] = speech
        rms = float(np.sqrt(np.mean(speech ** 2)))
        noise_rms = rms / 10 ** (rng.uniform(5.0, 40.0) / 20)
    else:
        noise_rms = 10 ** rng.uniform(-4.0, -1.0)
    clip += colored_noise(rng, CLIP_SAMPLES, float(rng.choice([0.0, 1.0, 2.0]))) * noise_rms
    return np.clip(clip, -1.0, 1.0), word


def generate(spec: SynthSpec, progress: bool = True) -> DatasetDict:
    """Make the corpus in memory (see the module doc). Deterministic in `spec`."""
    synth = Synthesizer()
    voices = english_voices()
    if len(voices) < 10:
        raise DataError(f"espeak-ng offers only {len(voices)} English voices; need at least 10 for three speaker splits")
    speakers = split_speakers(voices, spec.seed)
    total = sum(spec.count(s) * len(KS_LABELS) for s in SPLITS)
    bar = tqdm(total=total, desc="synthesizing KS corpus", unit="clip", disable=not progress)
    out = {}
    for split_no, split in enumerate(SPLITS):
        n = spec.count(split)
        audio = np.zeros((n * len(KS_LABELS), CLIP_SAMPLES), dtype=np.float32)
        labels: list[int] = []
        names: list[str] = []
        words: list[str] = []
        for label_no, label in enumerate(KS_LABELS):
            for i in range(n):
                rng = np.random.default_rng([spec.seed, 1 + split_no, label_no, i])
                voice = speakers[split][int(rng.integers(len(speakers[split])))]
                audio[len(labels)], word = render_clip(synth, rng, label, voice)
                labels.append(label_no)
                names.append(voice.name)
                words.append(word)
                bar.update()
        out[split] = make_dataset(audio, labels, names, words,
                                  description=f"mqfed synthetic KS corpus {dataclasses.asdict(spec)}")
    bar.close()
    return DatasetDict(out)


def _stamp(spec: SynthSpec) -> dict:
    return {"format": FORMAT, **dataclasses.asdict(spec)}


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
    log.info("synth_corpus_written", path=str(out), **{s: len(dd[s]) for s in SPLITS})
    return load_from_disk(str(out))
