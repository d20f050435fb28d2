"""The demo's experiment settings load as the demo loads them (coordinator/demo.py)."""
import json

from coordinator.demo import DEMO_SETTINGS
from coordinator.experiment import load_experiment


def test_demo_settings_are_a_valid_experiment():
    cfg = load_experiment(None, [f"{k}={json.dumps(v)}" for k, v in DEMO_SETTINGS.items()])
    assert cfg.fedbuff.mode == "async" and cfg.stop.target_accuracy == 0.98 and cfg.stop.max_versions == 0
    # each measured in 6-minute demos (docs/augmentation.md, "The demo's settings"): updates uncompressed beyond
    # float16, random equalisation the only augmentation, the learning rate decayed by version
    assert cfg.tasks.codec == "fp16" and cfg.local.eq_db == 10.0 and cfg.local.augments
    assert not (cfg.local.speed or cfg.local.gain_db or cfg.local.noise_snr_db or cfg.local.time_masks)
    assert cfg.tasks.lr_decay == "cosine" and cfg.tasks.lr_decay_versions == 300 and cfg.local.learning_rate == 3e-3
    assert cfg.model.name == "kws-fast"  # the preset with 1.8x kws-tiny's training speed
    assert cfg.local.keep_optimizer  # each worker's AdamW moments kept from task to task
    assert cfg.fedbuff.buffer_size == 1 and cfg.tasks.eval_every == 8  # each update a version, every 8th evaluated
