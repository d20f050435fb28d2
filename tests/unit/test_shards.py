"""Worker shards (common/data/shards.py): spec parsing, exact partitions of a split by every kind, reproducibility
from the spec string alone, speaker-disjoint and label-skewed shards, and empty shards refused."""
from __future__ import annotations

import re

import numpy as np
import pytest
from datasets import Dataset

from common.data.dataset import DataError
from common.data.shards import ShardSpec, select_shard, shard_indices

N_LABELS = 12


def _split(n_per_label: int = 50, n_speakers: int = 30, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(N_LABELS), n_per_label)
    rng.shuffle(labels)
    speakers = [f"spk{int(i)}" for i in rng.integers(0, n_speakers, labels.size)]
    return labels, speakers


def _label_hist(labels: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels, minlength=N_LABELS).astype(float)
    return counts / counts.sum()


@pytest.mark.parametrize("text, expected", [
    ("all", ShardSpec()),
    ("iid:1/2", ShardSpec("iid", 1, 2)),
    ("dirichlet:2/4:alpha=0.3:seed=5", ShardSpec("dirichlet", 2, 4, alpha=0.3, seed=5)),
    ("speaker:1/3", ShardSpec("speaker", 1, 3)),
    (" iid:3/3:seed=7 ", ShardSpec("iid", 3, 3, seed=7)),
])
def test_shard_spec_parses_kind_rank_world_and_options(text, expected):
    spec = ShardSpec.parse(text)
    assert spec == expected
    assert ShardSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text", ["iid:0/2", "iid:3/2", "foo:1/2", "iid:1/2:beta=1", "iid", "iid:1-2", "iid:a/2",
                                  "dirichlet:1/2:alpha=0", "dirichlet:1/2:alpha=x", "iid:1/2:seed"])
def test_bad_shard_spec_raises_value_error_naming_it(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        ShardSpec.parse(text)


@pytest.mark.parametrize("kind", ["iid", "dirichlet:alpha=0.3", "speaker"])
@pytest.mark.parametrize("world", [1, 3, 4])
def test_all_ranks_of_a_world_partition_the_rows_exactly(kind, world):
    labels, speakers = _split()
    name, _, options = kind.partition(":")
    shards = [shard_indices(labels, speakers, ShardSpec.parse(f"{name}:{r}/{world}" + (f":{options}" if options else "")))
              for r in range(1, world + 1)]
    everything = np.concatenate(shards)
    assert everything.size == labels.size  # disjoint ...
    np.testing.assert_array_equal(np.sort(everything), np.arange(labels.size))  # ... and covering
    for shard in shards:
        np.testing.assert_array_equal(shard, np.sort(shard))


def test_all_is_the_whole_split():
    labels, speakers = _split()
    np.testing.assert_array_equal(shard_indices(labels, speakers, ShardSpec.parse("all")), np.arange(labels.size))


@pytest.mark.parametrize("text", ["iid:2/3:seed=4", "dirichlet:2/3:alpha=0.5:seed=4", "speaker:2/3:seed=4"])
def test_shard_is_reproducible_from_its_spec_alone(text):
    labels, speakers = _split()
    first = shard_indices(labels, speakers, ShardSpec.parse(text))
    again = shard_indices(labels.copy(), list(speakers), ShardSpec.parse(str(ShardSpec.parse(text))))
    other_seed = shard_indices(labels, speakers, ShardSpec.parse(text.replace("seed=4", "seed=5")))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_seed)


def test_speaker_shards_share_no_speaker():
    labels, speakers = _split()
    world = 4
    shards = [shard_indices(labels, speakers, ShardSpec("speaker", r, world)) for r in range(1, world + 1)]
    owned = [{speakers[i] for i in idx} for idx in shards]
    assert all(owned)
    for a in range(world):
        for b in range(a + 1, world):
            assert not owned[a] & owned[b]
    assert set().union(*owned) == set(speakers)


def test_dirichlet_with_small_alpha_is_label_skewed_compared_with_iid():
    labels, speakers = _split(n_per_label=100)
    world, overall = 4, _label_hist(labels)

    def mean_skew(text: str) -> float:
        """Mean total-variation distance of the shards' label distributions from the split's."""
        shards = [shard_indices(labels, speakers, ShardSpec.parse(text.format(r=r))) for r in range(1, world + 1)]
        return float(np.mean([0.5 * np.abs(_label_hist(labels[idx]) - overall).sum() for idx in shards]))

    iid, skewed = mean_skew("iid:{r}/4"), mean_skew("dirichlet:{r}/4:alpha=0.1")
    assert iid < 0.1
    assert skewed > 0.4 and skewed > 4 * iid


def test_select_shard_takes_the_rows_of_the_spec(tiny_corpus):
    train = tiny_corpus["train"]
    spec = "dirichlet:1/2:alpha=0.5:seed=1"
    shard = select_shard(train, spec, "train")
    idx = shard_indices(np.asarray(train["label"]), train["speaker"], ShardSpec.parse(spec))
    assert shard["label"] == [train["label"][i] for i in idx]
    assert select_shard(train, ShardSpec.parse(spec))["speaker"] == shard["speaker"]
    halves = [select_shard(train, f"speaker:{r}/2") for r in (1, 2)]
    assert len(halves[0]) + len(halves[1]) == len(train)
    assert not set(halves[0]["speaker"]) & set(halves[1]["speaker"])


def test_empty_shard_raises_data_error_naming_the_spec(tiny_corpus):
    train = tiny_corpus["train"]
    world = len(set(train["speaker"])) + 1  # more ranks than speakers: the last rank gets nobody
    with pytest.raises(DataError, match=re.escape(f"speaker:{world}/{world}")):
        select_shard(train, f"speaker:{world}/{world}", "train")


def test_speaker_shard_of_a_split_without_speakers_is_refused():
    ds = Dataset.from_dict({"label": [0, 1, 2]})
    with pytest.raises(DataError, match="speaker"):
        select_shard(ds, "speaker:1/2")
