"""The demo's experiment settings load as the demo loads them (coordinator/demo.py)."""
import json

from coordinator.demo import DEMO_SETTINGS
from coordinator.experiment import load_experiment


def test_demo_settings_are_a_valid_experiment():
    cfg = load_experiment(None, [f"{k}={json.dumps(v)}" for k, v in DEMO_SETTINGS.items()])
    assert cfg.fedbuff.mode == "async" and cfg.stop.target_accuracy == 0.98 and cfg.stop.max_versions == 0
    # constant learning rate, no augmentation: both measured better on this budget (README, Demo)
    assert cfg.tasks.lr_decay == "constant" and not cfg.local.augments
