"""The keyword-spotting classifier: a Hugging Face `Wav2Vec2ForSequenceClassification`.

`build_model(ModelSpec(name=...))` takes either
- a preset name from `PRESETS` (random init from a `Wav2Vec2Config`, nothing downloaded): `kws-tiny`
  (~0.2 M parameters, trains on 2 CPU cores in minutes), `kws-fast` (the same with 40 ms frames, 1.8x its
  training speed; the demo's model) or `wav2vec2-base` (the base architecture,
  94.5 M parameters, for GPU throughput and codec benchmarks), or
- anything `AutoModelForAudioClassification.from_pretrained` takes: a hub id (`facebook/wav2vec2-base`)
  or a local directory, offline with `HF_HUB_OFFLINE=1`. The twelve KS labels are set on the head.

`save_model(model, dir)` writes the model and its `Wav2Vec2FeatureExtractor` with `save_pretrained`, so
`transformers.pipeline("audio-classification", model=dir)` loads it. Input normalisation (zero mean,
unit variance per clip) is the feature extractor's `do_normalize=True`, done in torch by
`common.data.audio.normalize` during training and evaluation.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForAudioClassification,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForSequenceClassification,
)

from common.data.audio import SAMPLE_RATE
from common.data.labels import ID2LABEL, KS_LABELS, LABEL2ID
from common.errors import MqfedError

_LABELS: dict[str, Any] = dict(num_labels=len(KS_LABELS), label2id=dict(LABEL2ID), id2label=dict(ID2LABEL))

# A four-layer feature encoder on raw 16 kHz audio (kernels 40/8/4/4, strides 20/4/2/2: 2.5 ms windows
# every 1.25 ms, then 5, 10 and 20 ms frames; ~2.4x the training throughput of the wav2vec2 7-layer
# stack at 32 channels), one pre-LN transformer layer 128 wide, a 128-wide classifier projection.
# 0.23 M parameters, ~470 clips/s of `train()` on one idle CPU thread (batch 32). On the synthetic corpus
# (12000 training clips, unheard voices, tests/benchmarks/centralized.py defaults: AdamW 3e-3, cosine over
# 4000 steps, label smoothing 0.1): 88% test accuracy after 1000 steps, 95% after 2000, 97% after 4000 (245 s).
_KWS_TINY: dict[str, Any] = dict(
    conv_dim=(32, 64, 64, 64), conv_kernel=(40, 8, 4, 4), conv_stride=(20, 4, 2, 2),
    hidden_size=128, num_hidden_layers=1, num_attention_heads=4, intermediate_size=256,
    do_stable_layer_norm=True, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16,
    classifier_proj_size=128,
    hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
    final_dropout=0.0, layerdrop=0.0, apply_spec_augment=False,
)

PRESETS: dict[str, dict[str, Any]] = {
    "kws-tiny": _KWS_TINY,
    # kws-tiny with a first convolution twice as long at twice the stride (5 ms windows every 2.5 ms, so 40 ms
    # frames): 1.7x kws-tiny's `train()` steps per second on one CPU thread (818 against 472 clips/s, batch 32,
    # tests/benchmarks/worker_throughput.py), 1,280 parameters more. The demo's model: in about the same training
    # time it ends as accurate on the test split and about 2.5 points higher on test_unseen (README, Data and model).
    "kws-fast": {**_KWS_TINY, "conv_kernel": (80, 8, 4, 4), "conv_stride": (40, 4, 2, 2)},
    # The base architecture (Wav2Vec2Config defaults), random init.
    "wav2vec2-base": dict(),
}


class ModelLoadError(MqfedError, OSError):
    """A model name that is neither a preset nor loadable (hub id or local directory)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model to build.

    name: a `PRESETS` key, a hub id or a local directory.
    freeze_feature_encoder: freeze the convolutional feature encoder (usual wav2vec2 fine-tuning).
    seed: initialisation seed for presets (every process building the same spec gets the same weights).
    """

    name: str = "kws-tiny"
    freeze_feature_encoder: bool = False
    seed: int = 0


def build_model(spec: ModelSpec = ModelSpec(), weights: bool = True) -> Wav2Vec2ForSequenceClassification:
    """A KS classifier for `spec` (see the module doc). Raises ModelLoadError naming the model.

    weights=False builds a hub/local model from its config only (random init, nothing but the config
    read): what a worker needs before it loads a model version from the coordinator.
    """
    if spec.name in PRESETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = Wav2Vec2ForSequenceClassification(Wav2Vec2Config(**PRESETS[spec.name], **_LABELS))
    else:
        try:
            if weights:
                model = AutoModelForAudioClassification.from_pretrained(spec.name, **_LABELS)
            else:
                config = AutoConfig.from_pretrained(spec.name, **_LABELS)
                model = AutoModelForAudioClassification.from_config(config)
        except OSError as exc:
            known = ", ".join(PRESETS)
            raise ModelLoadError(f"model {spec.name!r} is neither a preset ({known}) nor loadable: {exc}") from exc
    _no_waveform_gradient(model)
    if spec.freeze_feature_encoder:
        model.freeze_feature_encoder()
    return model


def _no_waveform_gradient(model: PreTrainedModel) -> None:
    """Stop the feature encoder from asking for the gradient of its input audio in training.

    Hugging Face's `Wav2Vec2FeatureEncoder` marks the raw waveform `requires_grad` (for its reentrant gradient
    checkpointing, which mqfed does not use), so every backward pass also computes a gradient for each of the
    batch's 16000 input samples that nothing reads: a third of a kws-fast training step on the CPU. The weights'
    gradients are the same without it (tests/unit/test_model.py). A model without that encoder is left as is. A
    caller that turns on reentrant gradient checkpointing (`use_reentrant=True`; transformers' default is not) must
    set the flag back, or the first convolution gets no gradient.
    """
    encoder = getattr(getattr(model, "wav2vec2", None), "feature_extractor", None)
    if encoder is not None and hasattr(encoder, "_requires_grad"):
        encoder._requires_grad = False


def feature_extractor() -> Wav2Vec2FeatureExtractor:
    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                    do_normalize=True, return_attention_mask=False)


def save_model(model: PreTrainedModel, out_dir: str | os.PathLike) -> str:
    """`save_pretrained` the model and its feature extractor into `out_dir`; returns the path."""
    out_dir = os.fspath(out_dir)
    model.save_pretrained(out_dir)
    feature_extractor().save_pretrained(out_dir)
    return out_dir


def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's floating-point state entries (what federated averaging moves), detached, on CPU."""
    return {n: t.detach().to("cpu") for n, t in model.state_dict().items() if t.is_floating_point()}


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
