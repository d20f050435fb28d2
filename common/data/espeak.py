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

    def __init__(self) -> None:
        lib_path, data_path = _locate()
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
        err = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_AUTO, None, None)
        if err != 0:
            raise SynthesisUnavailable(f"espeak_Synth failed ({err}) for {text!r} with {voice.name}")
        self._lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


def english_voices() -> list[Voice]:
    """Every (English language, voice variant) pair the installed espeak-ng data offers."""
    languages = ["en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan"]
    _, data_path = _locate()
    variants: list[str] = []
    if data_path:
        vdir = os.path.join(data_path, "voices", "!v")
        if os.path.isdir(vdir):
            variants = sorted(os.listdir(vdir))
    if not variants:
        variants = [f"m{i}" for i in range(1, 8)] + [f"f{i}" for i in range(1, 5)]
    # Skip novelty variants that are not speech-like.
    skip = {"Demonic", "UniRobot", "anikaRobot", "croak", "whisper", "whisperf", "klatt", "klatt2",
            "klatt3", "klatt4", "klatt5", "klatt6", "Storm", "Tweaky", "kaukovalta"}
    return [Voice(lang, var) for lang in languages for var in variants if var not in skip]
