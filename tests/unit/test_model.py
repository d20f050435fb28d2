"""The KS classifier factory (common/learning/model.py): the tiny presets, the twelve KS labels on the head, seeded
initialisation, freezing the feature encoder, offline errors for unknown names, and the exported
directory that `transformers.pipeline("audio-classification")` and `build_model` load back."""
from __future__ import annotations

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers

from common.data.labels import ID2LABEL, KS_LABELS, LABEL2ID
from common.learning.model import ModelSpec, build_model, float_state, parameter_count, save_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture
def hub_offline(monkeypatch):
    """HF_HUB_OFFLINE=1; huggingface_hub reads the variable at import, so its constant is set as well."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module", params=["kws-tiny", "kws-fast"])  # kws-fast: the demo's export
def saved_dir(tmp_path_factory, request):
    model = build_model(ModelSpec(request.param, seed=3))
    return save_model(model, tmp_path_factory.mktemp("model") / request.param), model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_preset_has_about_a_tenth_of_a_million_parameters():
    assert 50_000 <= parameter_count(build_model(ModelSpec("kws-tiny"))) <= 250_000


def test_fast_preset_is_the_tiny_one_with_half_the_frames():
    """kws-fast: the first convolution twice as long (80 taps) at twice the stride, everything else kws-tiny's."""
    tiny, fast = build_model(ModelSpec("kws-tiny")), build_model(ModelSpec("kws-fast"))
    assert parameter_count(fast) - parameter_count(tiny) == 40 * 32  # 40 more taps for each of 32 channels
    frames = [int(m.wav2vec2._get_feat_extract_output_lengths(16_000)) for m in (tiny, fast)]
    assert frames == [48, 23]
    assert fast(input_values=torch.zeros(2, 16_000)).logits.shape == (2, 12)


def test_model_head_has_the_twelve_ks_labels():
    model = build_model(ModelSpec("kws-tiny"))
    assert model.config.num_labels == len(KS_LABELS) == 12
    assert {int(k): v for k, v in model.config.id2label.items()} == ID2LABEL
    assert model.config.label2id == LABEL2ID
    logits = model(input_values=torch.zeros(2, 16_000)).logits
    assert logits.shape == (2, 12)


def test_same_seed_gives_the_same_weights_and_another_seed_different_ones():
    a, b = build_model(ModelSpec("kws-tiny", seed=1)), build_model(ModelSpec("kws-tiny", seed=1))
    assert _same_weights(a, b)
    assert not _same_weights(a, build_model(ModelSpec("kws-tiny", seed=2)))


def test_building_a_model_leaves_the_global_torch_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(ModelSpec("kws-tiny", seed=9))
    assert torch.equal(torch.rand(3), expected)


def test_freeze_feature_encoder_leaves_the_conv_encoder_without_grad():
    frozen = build_model(ModelSpec("kws-tiny", freeze_feature_encoder=True))
    encoder = list(frozen.wav2vec2.feature_extractor.parameters())
    assert encoder and not any(p.requires_grad for p in encoder)
    encoder_ids = {id(p) for p in encoder}
    assert all(p.requires_grad for p in frozen.parameters() if id(p) not in encoder_ids)
    assert all(p.requires_grad for p in build_model(ModelSpec("kws-tiny")).parameters())


def test_training_asks_no_gradient_of_the_input_audio_and_the_weights_get_the_same_gradients():
    """build_model stops the feature encoder from marking the waveform `requires_grad` (a third of a kws-fast step
    on the CPU, module doc); every weight's gradient is what Hugging Face's default computes, to float rounding."""
    x, y = torch.randn(4, 16_000, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 3, 7, 11])
    seen = []

    def grads(model):
        model.train()
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(input_values=x).logits, y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}  # not the unused mask

    ours, default = build_model(ModelSpec("kws-fast", seed=4)), build_model(ModelSpec("kws-fast", seed=4))
    default.wav2vec2.feature_extractor._requires_grad = True  # Hugging Face's default
    first_conv = ours.wav2vec2.feature_extractor.conv_layers[0]
    first_conv.register_forward_pre_hook(lambda _module, args: seen.append(args[0].requires_grad))
    g_ours, g_default = grads(ours), grads(default)
    assert seen == [False]
    assert g_ours.keys() == g_default.keys() and "wav2vec2.feature_extractor.conv_layers.0.conv.weight" in g_ours
    assert all(torch.allclose(g_ours[n], g_default[n], rtol=1e-5, atol=1e-7) for n in g_ours)


def test_unknown_model_name_raises_os_error_naming_it(hub_offline):
    with pytest.raises(OSError, match="'no-such-org/no-such-kws-model'"):
        build_model(ModelSpec("no-such-org/no-such-kws-model"))


def test_missing_local_model_directory_raises_os_error_naming_it(hub_offline, tmp_path):
    missing = str(tmp_path / "not-a-model")
    with pytest.raises(OSError, match="not-a-model"):
        build_model(ModelSpec(missing))


def test_saved_model_loads_in_the_audio_classification_pipeline(saved_dir):
    path, _ = saved_dir
    classify = transformers.pipeline("audio-classification", model=path, device="cpu")
    clip = (0.1 * np.random.default_rng(0).standard_normal(16_000)).astype(np.float32)
    # transformers 5 takes the plain array and {"raw", "sampling_rate"} at 16 kHz without torchcodec.
    for inputs in (clip, {"raw": clip, "sampling_rate": 16_000}):
        top = classify(inputs)
        assert top and top[0]["label"] in KS_LABELS
        assert sum(r["score"] for r in top) <= 1.0 + 1e-6
    everything = classify(clip, top_k=12)
    assert sorted(r["label"] for r in everything) == sorted(KS_LABELS)


def test_saved_model_loads_back_through_build_model_offline(saved_dir, hub_offline):
    path, original = saved_dir
    loaded = build_model(ModelSpec(path))
    assert _same_weights(loaded, original)
    assert loaded.config.label2id == LABEL2ID
    x = torch.randn(2, 16_000, generator=torch.Generator().manual_seed(0))
    original.eval(), loaded.eval()
    torch.testing.assert_close(loaded(input_values=x).logits, original(input_values=x).logits)


def test_float_state_holds_every_floating_entry_detached_on_cpu():
    model = build_model(ModelSpec("kws-tiny"))
    state = float_state(model)
    assert state.keys() == {k for k, v in model.state_dict().items() if v.is_floating_point()}
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
