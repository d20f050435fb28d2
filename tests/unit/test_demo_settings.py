"""The demo's experiment settings load as the demo loads them (coordinator/demo.py)."""
import json

from coordinator.demo import DEMO_SETTINGS
from coordinator.experiment import load_experiment


def test_demo_settings_are_a_valid_experiment_with_decay_and_training_augmentation():
    cfg = load_experiment(None, [f"{k}={json.dumps(v)}" for k, v in DEMO_SETTINGS.items()])
    assert cfg.fedbuff.mode == "async" and cfg.tasks.lr_decay == "cosine" and cfg.tasks.lr_decay_versions > 0
    assert cfg.local.augments and cfg.local.speed == (0.9, 1.1) and cfg.local.time_masks == 2
