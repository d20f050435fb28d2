"""The pretrained recipe as a ready experiment (docker/config/experiment-pretrained.toml, docs/pretrained.md), offline:
a small randomly initialised wav2vec2 saved with `save_pretrained` into a directory stands in for
`facebook/wav2vec2-base`. The config validates with model.name pointed at that directory; `build_model` loads it
with the feature encoder frozen; a local training step with the recipe's TrainConfig runs on CPU and leaves the
frozen encoder as it was; the evaluator builds the same model from the directory's config and evaluates it."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import DatasetDict
from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification, Wav2Vec2Model

from common.config import load_config
from common.data.dataset import make_dataset
from common.data.labels import KS_LABELS
from common.learning.model import PRESETS, ModelSpec, build_model, feature_extractor, float_state
from common.learning.training import evaluate, train
from coordinator.evaluator import Evaluator, load_clips
from coordinator.experiment import ExperimentConfig

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "docker" / "config" / "experiment-pretrained.toml"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def ks_data(tmp_path_factory) -> Path:
    """A KS data set of random clips: two per label in each split."""
    out = tmp_path_factory.mktemp("ks") / "ks"
    rng = np.random.default_rng(0)
    parts = {}
    for split in ("train", "validation", "test"):
        labels = np.arange(2 * len(KS_LABELS)) % len(KS_LABELS)
        audio = (0.1 * rng.standard_normal((len(labels), 16_000))).astype(np.float32)
        parts[split] = make_dataset(audio, labels, [f"{split}-{i % 4}" for i in range(len(labels))],
                                    [KS_LABELS[k] for k in labels])
    DatasetDict(parts).save_to_disk(str(out))
    return out


def save_local_model(out: Path, head: bool) -> Path:
    """A kws-tiny-sized wav2vec2 saved as a hub checkpoint would be: headless (`Wav2Vec2Model`, like
    facebook/wav2vec2-base) or a sequence classifier, with its feature extractor."""
    torch.manual_seed(1)
    config = Wav2Vec2Config(**PRESETS["kws-tiny"])
    model = Wav2Vec2ForSequenceClassification(Wav2Vec2Config(**PRESETS["kws-tiny"], num_labels=len(KS_LABELS))) \
        if head else Wav2Vec2Model(config)
    model.save_pretrained(out)
    feature_extractor().save_pretrained(out)
    return out


def recipe(model_dir: Path, data: Path, run_dir: Path) -> ExperimentConfig:
    return load_config(ExperimentConfig, RECIPE, env={}, overrides={
        "model.name": str(model_dir), "data.path": str(data), "experiment.run_dir": str(run_dir)})


def test_the_recipe_config_is_the_hugging_face_audio_classification_recipe():
    cfg = load_config(ExperimentConfig, RECIPE, env={})
    assert cfg.model == ModelSpec("facebook/wav2vec2-base", freeze_feature_encoder=True, seed=0)
    local = cfg.local
    assert (local.learning_rate, local.batch_size, local.optimizer, local.schedule) == (3e-5, 128, "adamw", "linear")
    assert local.warmup_steps == math.ceil(0.1 * local.steps)  # warmup ratio 0.1 of each task
    assert (local.weight_decay, local.max_grad_norm, local.label_smoothing, local.time_shift_s) == (0.0, 1.0, 0.0, 0.0)
    assert not local.augments
    assert cfg.stop.max_versions * local.steps == 2000  # ~5 epochs of SUPERB KS at 128 clips a step
    assert cfg.data.unseen_split == "test_unseen"


@pytest.mark.parametrize("head", [False, True], ids=["headless-like-the-hub-base", "sequence-classifier"])
def test_a_local_pretrained_directory_trains_with_the_recipe_and_the_evaluator_loads_it(tmp_path, ks_data, head):
    model_dir = save_local_model(tmp_path / "wav2vec2-local", head)
    cfg = recipe(model_dir, ks_data, tmp_path / "run")
    assert cfg.model.name == str(model_dir) and cfg.model.freeze_feature_encoder

    model = build_model(cfg.model)
    assert model.config.num_labels == len(KS_LABELS) and model.config.id2label[0] == KS_LABELS[0]
    encoder = dict(model.wav2vec2.feature_extractor.named_parameters())
    assert encoder and not any(p.requires_grad for p in encoder.values())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("wav2vec2.feature_extractor."))
    saved = Wav2Vec2Model.from_pretrained(model_dir) if not head else \
        Wav2Vec2ForSequenceClassification.from_pretrained(model_dir).wav2vec2
    conv = "feature_extractor.conv_layers.0.conv.weight"
    assert torch.equal(model.wav2vec2.state_dict()[conv], saved.state_dict()[conv])  # the pretrained weights

    before = {n: t.clone() for n, t in float_state(model).items()}  # float_state aliases on CPU
    one_step = dataclasses.replace(cfg.local, steps=1)  # the recipe's settings, one step of a task
    result = train(model, load_clips(cfg, "train"), one_step, "cpu")
    assert result.steps == 1 and result.samples == 2 * len(KS_LABELS) and math.isfinite(result.loss)
    after = float_state(model)
    frozen = [f"wav2vec2.feature_extractor.{n}" for n in encoder]
    assert all(torch.equal(before[n], after[n]) for n in frozen)  # the frozen encoder did not move
    assert any(not torch.equal(before[n], after[n]) for n in after if n.startswith("classifier."))

    evaluator = Evaluator(cfg, device="cpu")  # builds the model from the directory's config, then a version
    evaluator.model.load_state_dict(after)
    ours, theirs = evaluate(model, evaluator.clips), evaluate(evaluator.model, evaluator.clips)
    assert ours.accuracy == theirs.accuracy and ours.loss == pytest.approx(theirs.loss, rel=1e-6)
    assert len(evaluator.clips) == 2 * len(KS_LABELS)  # the validation split, all of it (eval_max_clips = 0)
