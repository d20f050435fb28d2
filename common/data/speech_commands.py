"""Real keyword-spotting data: a Speech Commands v0.01 directory (SUPERB KS protocol) or the HF hub.

Local directory (the `speech_commands_v0.01` tarball unpacked), SUPERB KS protocol:
- the ten keywords keep their label; every other word folder becomes `_unknown_`;
- `validation_list.txt` and `testing_list.txt` name the validation and test clips, the rest is train;
- `_background_noise_/*.wav` are cut into 1 s `_silence_` clips, assigned to train/validation/test
  80/10/10 by a hash of (file, clip index), so the assignment never changes;
- the speaker is the file name's hash prefix (`<speaker>_nohash_<n>.wav`), as the data set defines it.
Clips not at 16 kHz are resampled (and counted in a warning); multi-channel files are refused
(common/data/audio.py). A clip shorter than 1 s is zero-padded, a longer one centre-cropped.

Hub: `superb` / `ks` or `google/speech_commands` / `v0.01` through `datasets.load_dataset` (works when
the hub or a local HF cache is reachable; `HF_DATASETS_OFFLINE=1` uses the cache only). The audio column
is cast to `Audio(decode=False)` and decoded here with soundfile, so torchcodec is never needed; labels
map by name (keywords keep theirs, `_silence_` stays, any other word is `_unknown_`).
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict
from tqdm.auto import tqdm

from common.data.audio import CLIP_SAMPLES, SAMPLE_RATE, decode_wav, fit_clip, resample
from common.data.dataset import DataError, check_splits, make_dataset
from common.data.labels import KEYWORDS, LABEL2ID, SILENCE, UNKNOWN
from common.logs import get_logger

log = get_logger(__name__)
BACKGROUND = "_background_noise_"
HUB_SOURCES = {"superb": ("superb", "ks"), "speech_commands": ("google/speech_commands", "v0.01")}


def ks_label(word: str) -> int:
    """SUPERB KS label id of a Speech Commands word or label name."""
    if word in KEYWORDS or word == SILENCE:
        return LABEL2ID[word]
    return LABEL2ID[UNKNOWN]


def _read_list(path: Path) -> set[str]:
    if not path.exists():
        raise DataError(f"{path.parent}: {path.name} is missing; a Speech Commands v0.01 directory has it")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _silence_split(name: str, index: int) -> str:
    bucket = zlib.crc32(f"{name}:{index}".encode()) % 10
    return "train" if bucket < 8 else ("validation" if bucket == 8 else "test")


def load_directory(root: str | os.PathLike, progress: bool = True) -> DatasetDict:
    """Speech Commands v0.01 at `root` as a KS DatasetDict (see the module doc). Raises DataError."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Speech Commands directory {root} does not exist (or is not a directory)")
    val, test = _read_list(root / "validation_list.txt"), _read_list(root / "testing_list.txt")
    words = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != BACKGROUND and not p.name.startswith("."))
    if not words:
        raise DataError(f"{root}: no word folders (expected yes/, no/, ... as in Speech Commands v0.01)")
    missing = [w for w in KEYWORDS if w not in words]
    if missing:
        raise DataError(f"{root}: keyword folder(s) {missing} missing")
    files = [(w, p) for w in words for p in sorted((root / w).glob("*.wav"))]
    parts: dict[str, dict[str, list]] = {s: {"audio": [], "label": [], "speaker": [], "word": []} for s in ("train", "validation", "test")}
    resampled = 0
    for word, path in tqdm(files, desc=f"decoding {root.name}", unit="clip", disable=not progress):
        rel = f"{word}/{path.name}"
        samples, rate = decode_wav(path, rel, resample_to=None)
        if rate != SAMPLE_RATE:
            resampled += 1
            samples = resample(samples, rate)
        split = "test" if rel in test else "validation" if rel in val else "train"
        part = parts[split]
        part["audio"].append(fit_clip(samples))
        part["label"].append(ks_label(word))
        part["speaker"].append(path.name.split("_nohash_")[0])
        part["word"].append(word)
    for path in sorted((root / BACKGROUND).glob("*.wav")) if (root / BACKGROUND).is_dir() else []:
        samples, _ = decode_wav(path, f"{BACKGROUND}/{path.name}")
        for i in range(samples.size // CLIP_SAMPLES):
            part = parts[_silence_split(path.name, i)]
            part["audio"].append(samples[i * CLIP_SAMPLES:(i + 1) * CLIP_SAMPLES])
            part["label"].append(LABEL2ID[SILENCE])
            part["speaker"].append(f"{BACKGROUND}/{path.stem}")
            part["word"].append("")
    if resampled:
        log.warning("speech_commands_resampled", root=str(root), clips=resampled, to_hz=SAMPLE_RATE)
    dd = DatasetDict({
        split: make_dataset(np.stack(p["audio"]) if p["audio"] else np.zeros((0, CLIP_SAMPLES), np.float32),
                            p["label"], p["speaker"], p["word"], description=f"Speech Commands v0.01 at {root}")
        for split, p in parts.items()
    })
    check_splits(dd, str(root))
    return dd


def convert_hub_split(ds: Dataset, name: str = "hub data set") -> Dataset:
    """Turn a hub KS/Speech Commands split (audio column cast to `Audio(decode=False)`) into our format."""
    from datasets import Audio

    if "audio" not in ds.column_names or "label" not in ds.column_names:
        raise DataError(f"{name}: expected 'audio' and 'label' columns, has {ds.column_names}")
    if not isinstance(ds.features["audio"], Audio) or ds.features["audio"].decode:
        ds = ds.cast_column("audio", Audio(decode=False))
    names = ds.features["label"].names
    clips, labels, speakers, words = [], [], [], []
    for i, row in enumerate(ds):
        audio = row["audio"]
        source = audio.get("bytes") or audio.get("path")
        if source is None:
            raise DataError(f"{name}: row {i} has neither audio bytes nor a path")
        samples, _ = decode_wav(source, f"{name}[{i}] {audio.get('path') or ''}".strip())
        word = names[row["label"]]
        # Hub silence rows are long background recordings in some versions: take the first second.
        clips.append(fit_clip(samples, offset=0 if word == SILENCE else None))
        labels.append(ks_label(word))
        speakers.append(str(row.get("speaker_id") or ""))
        words.append("" if word == SILENCE else word)
    return make_dataset(np.stack(clips) if clips else np.zeros((0, CLIP_SAMPLES), np.float32),
                        labels, speakers, words, description=name)


def load_hub(source: str = "superb", cache_dir: str | None = None) -> DatasetDict:
    """Load SUPERB KS (`superb`) or Speech Commands v0.01 (`speech_commands`) from the HF hub/cache."""
    from datasets import load_dataset

    if source not in HUB_SOURCES:
        raise DataError(f"unknown hub source {source!r}; known: {sorted(HUB_SOURCES)}")
    path, config = HUB_SOURCES[source]
    try:
        raw = load_dataset(path, config, cache_dir=cache_dir)
    except Exception as exc:
        raise DataError(f"cannot load {path}/{config} from the Hugging Face hub or cache: {exc}") from exc
    dd = DatasetDict({split: convert_hub_split(raw[split], f"{path}/{config}[{split}]") for split in raw})
    check_splits(dd, f"{path}/{config}")
    return dd

