"""The keyword-spotting data set format every source produces (Arrow, via `datasets`).

Columns:
- `audio`: 16 000 float32 samples (1 s at 16 kHz, mono), a fixed-length list feature. Not the
  `datasets.Audio` feature: decoding that needs torchcodec, which does not load against every torch;
  sources decode with soundfile (common/data/audio.py) instead.
- `label`: ClassLabel in SUPERB KS order (common/data/labels.py).
- `speaker`: who spoke it (a voice+variant for synthetic data, the hash prefix for Speech Commands).
- `word`: the word spoken (`""` for `_silence_`), so `_unknown_` clips say what they were.

Splits are `train`, `validation`, `test` in a `DatasetDict` (required), optionally with `test_unseen`:
a second held-out split whose speakers share no voice family with the others (the synthetic corpus makes
it; docs/data.md). Shards are only ever drawn from `train` and `validation`.
"""
from __future__ import annotations

from typing import Sequence as Seq

import numpy as np
import pyarrow as pa
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    DatasetInfo,
    Features,
    Sequence,
    Value,
)

from common.data.audio import CLIP_SAMPLES
from common.data.labels import KS_LABELS
from common.errors import MqfedError

SPLITS = ("train", "validation", "test")
OPTIONAL_SPLITS = ("test_unseen",)
FEATURES = Features({
    "audio": Sequence(Value("float32"), length=CLIP_SAMPLES),
    "label": ClassLabel(names=list(KS_LABELS)),
    "speaker": Value("string"),
    "word": Value("string"),
})


class DataError(MqfedError, ValueError):
    """A data set that does not have the keyword-spotting format, or a split/shard that is empty."""


def make_dataset(audio: np.ndarray, labels: Seq[int], speakers: Seq[str], words: Seq[str],
                 description: str = "") -> Dataset:
    """Build a KS `Dataset` from an (N, 16000) float32 array and per-clip labels, speakers and words."""
    audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1, CLIP_SAMPLES)
    n = audio.shape[0]
    if not (len(labels) == len(speakers) == len(words) == n):
        raise DataError(f"make_dataset: {n} clips but {len(labels)} labels, {len(speakers)} speakers, {len(words)} words")
    table = pa.table({
        "audio": pa.FixedSizeListArray.from_arrays(pa.array(audio.reshape(-1)), CLIP_SAMPLES),
        "label": pa.array(np.asarray(labels, dtype=np.int64)),
        "speaker": pa.array(list(speakers), type=pa.string()),
        "word": pa.array(list(words), type=pa.string()),
    })
    return Dataset(table, info=DatasetInfo(features=FEATURES, description=description))


def check_format(ds: Dataset, name: str = "data set") -> None:
    """Raise DataError naming what is wrong when `ds` lacks the KS columns or label names."""
    missing = [c for c in ("audio", "label") if c not in ds.column_names]
    if missing:
        raise DataError(f"{name}: missing column(s) {missing}; has {ds.column_names}")
    label = ds.features["label"]
    if not isinstance(label, ClassLabel) or list(label.names) != list(KS_LABELS):
        raise DataError(f"{name}: 'label' must be ClassLabel{list(KS_LABELS)}, got {label}")
    audio = ds.features["audio"]
    if getattr(audio, "length", None) != CLIP_SAMPLES:
        raise DataError(f"{name}: 'audio' must hold {CLIP_SAMPLES} float32 samples per clip, got {audio}")


def to_arrays(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(audio (N, 16000) float32, labels (N,) int64) for training; one pass over the Arrow data."""
    check_format(ds)
    table = ds.with_format("numpy")[:]
    return np.asarray(table["audio"], dtype=np.float32).reshape(-1, CLIP_SAMPLES), np.asarray(table["label"], dtype=np.int64)


def label_counts(ds: Dataset) -> dict[str, int]:
    """How many clips of each label (every label listed, zeros included)."""
    counts = np.bincount(np.asarray(ds["label"], dtype=np.int64), minlength=len(KS_LABELS))
    return {name: int(c) for name, c in zip(KS_LABELS, counts)}


def present_splits(dd: DatasetDict) -> tuple[str, ...]:
    """The required splits, then the optional ones `dd` has."""
    return SPLITS + tuple(s for s in OPTIONAL_SPLITS if s in dd)


def check_splits(dd: DatasetDict, name: str = "data set") -> None:
    """Every required split present; it and every optional split present in KS format and not empty.
    Other extra splits are left alone."""
    for split in present_splits(dd):
        if split not in dd:
            raise DataError(f"{name}: no {split!r} split (has {list(dd)})")
        check_format(dd[split], f"{name}[{split}]")
        if len(dd[split]) == 0:
            raise DataError(f"{name}[{split}] is empty")
