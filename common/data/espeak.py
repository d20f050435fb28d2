"""Speech synthesis with libespeak-ng through ctypes (no root, no subprocess per word).

The library and its voice data come from the `espeakng-loader` PyPI package; a system libespeak-ng
(Debian's `espeak-ng`) is used when the package is missing. One `Synthesizer` per process: espeak-ng
keeps global state, so it is not thread-safe.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import MqfedError

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 3, 4
_POS_CHARACTER = 1
_ESPEAK_CHARS_AUTO = 0
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class SynthesisUnavailable(MqfedError, RuntimeError):
    """libespeak-ng could not be found or initialised."""


def _locate() -> tuple[str, str | None]:
    try:
        import espeakng_loader

        return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
    except ImportError:
        path = ctypes.util.find_library("espeak-ng")
        if path is None:
            raise SynthesisUnavailable(
                "libespeak-ng not found: `pip install espeakng-loader` or `apt-get install espeak-ng`"
            ) from None
        return path, None


def _load_private(lib_path: str) -> ctypes.CDLL:
    """Load a private copy of libespeak-ng, so each Synthesizer starts from the library's initial state.

    espeak-ng keeps static state between utterances that no API resets (the pitch flutter index, the
    wave generator's gain and phase), so the same word comes out slightly different depending on what
    was spoken before in the process. A fresh copy makes a sequence of calls reproducible. A bare library
    name (system install found by ctypes.util) is loaded as is.
    """
    if not os.path.isfile(lib_path):
        return ctypes.CDLL(lib_path)
    with tempfile.TemporaryDirectory(prefix="mqfed-espeak-") as tmp:
        private = os.path.join(tmp, os.path.basename(lib_path))
        shutil.copyfile(lib_path, private)
        return ctypes.CDLL(private)  # stays mapped after the file is removed


class _PrivateRand:
    """The C library's rand() state for one Synthesizer, swapped in while it speaks.

    libespeak-ng's Klatt voices (the `klatt*` variants and others with a `klatt` line, e.g. caleb) draw
    noise from the C library's process-wide rand(), which every library copy shares. Each Synthesizer
    gets its own state, seeded 1 like a fresh process's, so its output depends only on its own call
    sequence: two synthesizers in one process, or a corpus made twice, give the same bytes as one
    synthesizer in a fresh process. Without glibc's initstate/setstate this does nothing."""

    def __init__(self) -> None:
        self._state = ctypes.create_string_buffer(256)
        self._saved: int | None = None
        self._setstate: Any = None
        try:
            libc = ctypes.CDLL(None)
            self._initstate, self._setstate = libc.initstate, libc.setstate
        except (OSError, AttributeError):
            return
        self._initstate.argtypes = [ctypes.c_uint, ctypes.c_void_p, ctypes.c_size_t]
        self._initstate.restype = ctypes.c_void_p
        self._setstate.argtypes = [ctypes.c_void_p]
        self._setstate.restype = ctypes.c_void_p
        previous = self._initstate(1, ctypes.addressof(self._state), 128)  # 128 bytes: glibc's default TYPE_3
        self._setstate(previous)

    def __enter__(self) -> None:
        if self._setstate is not None:
            self._saved = self._setstate(ctypes.addressof(self._state))

    def __exit__(self, *exc: object) -> None:
        if self._setstate is not None and self._saved is not None:
            self._setstate(self._saved)
            self._saved = None


@dataclass(frozen=True)
class Voice:
    """A speaker: an espeak-ng language voice with a voice variant, e.g. `en-us+f3`."""

    language: str
    variant: str

    @property
    def name(self) -> str:
        return f"{self.language}+{self.variant}"


class Synthesizer:
    """Speaks single words to float32 arrays at the library's native sample rate."""

    def __init__(self, data_path: str | None = None) -> None:
        """data_path: an espeak-ng-data directory to use instead of the installed one (e.g. a `VariantBank`'s)."""
        lib_path, installed = _locate()
        data_path = data_path or installed
        try:
            self._lib = _load_private(lib_path)
        except OSError as exc:
            raise SynthesisUnavailable(f"cannot load {lib_path}: {exc}") from exc
        data_dir = os.path.dirname(data_path).encode() if data_path else None
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_dir, 0)
        if rate <= 0:
            raise SynthesisUnavailable(f"espeak_Initialize failed ({rate}) with data {data_path}")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []

        def collect(wav, numsamples, _events):
            if numsamples > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
            return 0

        self._callback = _CALLBACK(collect)  # keep a reference: the C side holds the pointer
        self._lib.espeak_SetSynthCallback(self._callback)
        self._rand = _PrivateRand()

    def speak(self, text: str, voice: Voice, rate_wpm: int = 175, pitch: int = 50, pitch_range: int = 50) -> np.ndarray:
        """Synthesize `text` with `voice`; returns float32 samples in [-1, 1] at `self.sample_rate`."""
        if self._lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise SynthesisUnavailable(f"espeak-ng has no voice {voice.name!r}")
        self._lib.espeak_SetParameter(_ESPEAK_RATE, int(rate_wpm), 0)
        self._lib.espeak_SetParameter(_ESPEAK_PITCH, int(pitch), 0)
        self._lib.espeak_SetParameter(_ESPEAK_RANGE, int(pitch_range), 0)
        if hasattr(self._lib, "espeak_ng_SetRandSeed"):  # espeak-ng >= 1.52; Initialize seeds it with time()
            self._lib.espeak_ng_SetRandSeed(ctypes.c_long(0))
        self._chunks = []
        data = text.encode() + b"\0"
        with self._rand:
            err = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_AUTO, None, None)
            if err != 0:
                raise SynthesisUnavailable(f"espeak_Synth failed ({err}) for {text!r} with {voice.name}")
            self._lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


ENGLISH_LANGUAGES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan")
# Kept out of train/validation/test: the held-out accent of the `test_unseen` split.
UNSEEN_LANGUAGE = "en-gb-x-gbcwmd"
# espeak-ng's Klatt-synthesis variants whose Klatt modes (1-3) no other variant uses: `test_unseen` only.
KLATT_VARIANTS = ("klatt", "klatt2", "klatt3")
# Klatt modes 4-6 are also those of ordinary-named variants in train (caleb, david, announcer, robosoft, ...),
# so these three are in no split.
KLATT_SHARED = ("klatt4", "klatt5", "klatt6")
# Novelty variants that are not speech-like: in no split.
NOT_SPEECH = ("Demonic", "UniRobot", "anikaRobot", "croak", "whisper", "whisperf", "Storm", "Tweaky", "kaukovalta")


def data_path() -> str | None:
    """The installed espeak-ng-data directory (None: a system library that finds its own)."""
    return _locate()[1]


def variants() -> list[str]:
    """The installed voice variants that sound like speech and use the default (formant) synthesizer."""
    path = data_path()
    found: list[str] = []
    if path:
        vdir = os.path.join(path, "voices", "!v")
        if os.path.isdir(vdir):
            found = sorted(os.listdir(vdir))
    if not found:
        found = [f"m{i}" for i in range(1, 8)] + [f"f{i}" for i in range(1, 5)]
    return [v for v in found if v not in NOT_SPEECH + KLATT_VARIANTS + KLATT_SHARED]


def english_voices() -> list[Voice]:
    """Every (English language, voice variant) pair the installed espeak-ng data offers, Klatt variants and
    the West Midlands accent (`UNSEEN_LANGUAGE`) excepted: the speakers of train/validation/test."""
    return [Voice(lang, var) for lang in ENGLISH_LANGUAGES for var in variants()]


def unseen_voices() -> dict[str, list[Voice]]:
    """The `test_unseen` speakers by family, sharing no voice family with `english_voices()`:
    `klatt`: every English accent (the held-out one included) with each Klatt-synthesis variant;
    `accent`: the held-out accent `UNSEEN_LANGUAGE` with every ordinary variant."""
    return {
        "klatt": [Voice(lang, var) for lang in ENGLISH_LANGUAGES + (UNSEEN_LANGUAGE,) for var in KLATT_VARIANTS],
        "accent": [Voice(UNSEEN_LANGUAGE, var) for var in variants()],
    }


def derived_variant(text: str, name: str, formant_scale: tuple[float, ...], pitch_scale: float,
                    roughness: int | None = None, flutter: int | None = None) -> str:
    """A voice-variant file like `text` (an espeak-ng `!v` variant) with formants 1..len(formant_scale)
    moved by those factors (frequency percentages scaled), base pitch and range scaled by `pitch_scale`,
    and optionally another roughness/flutter: a new speaker built from an existing one."""
    lines = [line for line in text.splitlines() if line.split()[:1] != ["name"]]
    formants: dict[int, list[str]] = {}
    pitch = ["82", "118"]  # espeak-ng's default base and top pitch (Hz)
    rest: list[str] = []
    for line in lines:
        words = line.split()
        if words[:1] == ["formant"] and len(words) >= 5:
            formants[int(words[1])] = words[2:]
        elif words[:1] == ["pitch"] and len(words) >= 3:
            pitch = words[1:3]
        elif words[:1] not in (["roughness"], ["flutter"]) or (roughness is None and flutter is None):
            rest.append(line)
    out = [f"name {name}"] + [line for line in rest if line.split()[:2] != ["language", "variant"]]
    out.insert(0, "language variant")
    for n, scale in enumerate(formant_scale, start=1):
        freq, height, width, *more = formants.get(n, ["100", "100", "100"])
        formants[n] = [str(max(1, round(float(freq) * scale))), height, width, *more]
    out += [f"formant {n} {' '.join(formants[n])}" for n in sorted(formants)]
    out.append(f"pitch {round(float(pitch[0]) * pitch_scale)} {round(float(pitch[1]) * pitch_scale)}")
    if roughness is not None:
        out.append(f"roughness {roughness}")
    if flutter is not None:
        out.append(f"flutter {flutter}")
    return "\n".join(out) + "\n"


class VariantBank:
    """A private espeak-ng-data directory: the installed one (symlinked, nothing copied) plus generated
    voice variants. Give `path` to `Synthesizer(data_path=...)`; `close()` removes it."""

    def __init__(self, generated: dict[str, str]) -> None:
        src = data_path()
        if not src:
            raise SynthesisUnavailable("generated voice variants need the espeakng-loader voice data")
        self._root = tempfile.mkdtemp(prefix="mqfed-espeak-data-")
        self.path = os.path.join(self._root, "espeak-ng-data")
        os.makedirs(os.path.join(self.path, "voices", "!v"))
        for entry in os.listdir(src):
            if entry != "voices":
                os.symlink(os.path.join(src, entry), os.path.join(self.path, entry))
        for entry in os.listdir(os.path.join(src, "voices")):
            if entry != "!v":
                os.symlink(os.path.join(src, "voices", entry), os.path.join(self.path, "voices", entry))
        vdir = os.path.join(src, "voices", "!v")
        for entry in os.listdir(vdir):
            os.symlink(os.path.join(vdir, entry), os.path.join(self.path, "voices", "!v", entry))
        for name, text in generated.items():
            with open(os.path.join(self.path, "voices", "!v", name), "w") as f:
                f.write(text)

    @staticmethod
    def variant_text(variant: str) -> str:
        """The installed variant file's text ("" when there is none)."""
        src = data_path()
        path = os.path.join(src, "voices", "!v", variant) if src else ""
        return open(path).read() if path and os.path.isfile(path) else ""

    def close(self) -> None:
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> VariantBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
