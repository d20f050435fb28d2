"""Fixtures shared by every test directory.

`tiny_corpus`: the synthetic KS corpus (common/synth_corpus.py) for `tiny_spec`: four training clips and
two validation/test clips per label (96 clips, well under a second of espeak-ng), built once per session
into a temporary directory (`tiny_corpus_dir`) and opened with `load_from_disk`.

`torch_single_thread`: torch on one intra-op thread for the duration of a test. The CI and development
machines have two cores shared with other jobs; with two OpenMP threads each contended step of the tiny
model runs ~25x slower than on one thread, so tests that train or run the model use this.
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_spec():
    from common.synth_corpus import SynthSpec

    return SynthSpec(seed=0, per_class=4, eval_per_class=2)


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory, tiny_spec):
    from common import synth_corpus

    out = tmp_path_factory.mktemp("corpus") / "synth-ks"
    synth_corpus.build(out, tiny_spec, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_corpus(tiny_corpus_dir):
    from datasets import load_from_disk

    return load_from_disk(str(tiny_corpus_dir))


@pytest.fixture
def torch_single_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
