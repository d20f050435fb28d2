"""The second held-out split (`data.unseen_split`, default `test_unseen`: speakers that share nothing with training):
the coordinator tests the exported model on it beside the test split and writes `unseen_accuracy` into the
summary; a data set without that split (older corpora) is skipped with a log line and `unseen_accuracy` None;
the demo's summary table prints it on its own row and the report page shows it."""
from __future__ import annotations

import time

import numpy as np
import pytest
from datasets import DatasetDict, load_from_disk
from structlog.testing import capture_logs

from common.config import ConfigError, load_config
from common.data.dataset import make_dataset, to_arrays
from common.data.labels import KS_LABELS
from common.learning.model import ModelSpec, build_model
from common.learning.training import Clips, evaluate
from coordinator import demo
from coordinator.evaluator import export_best, has_split
from coordinator.experiment import ExperimentConfig
from coordinator.report import SUMMARY_ROWS
from coordinator.server import Coordinator

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def tiny_dataset(out, splits=("train", "validation", "test", "test_unseen"), per_label: int = 1, seed: int = 0):
    """A KS data set of random clips, `per_label` clips of each label per split (the unseen split's clips are
    louder, so a model scores it differently from the test split)."""
    rng = np.random.default_rng(seed)
    parts = {}
    for i, split in enumerate(splits):
        n = per_label * len(KS_LABELS)
        audio = ((0.1 + i) * rng.standard_normal((n, 16_000))).astype(np.float32)
        labels = np.arange(n) % len(KS_LABELS)
        parts[split] = make_dataset(audio, labels, [f"{split}-spk{j % 3}" for j in range(n)],
                                    [KS_LABELS[k] for k in labels])
    DatasetDict(parts).save_to_disk(str(out))
    return out


def _coordinator(tmp_path, data, **settings) -> Coordinator:
    cfg = load_config(ExperimentConfig, env={}, overrides={
        "experiment.name": "unseen", "experiment.run_dir": str(tmp_path / "run"), "data.path": str(data), **settings})
    coord = Coordinator(cfg)
    coord._session_start = time.monotonic()
    coord.best = {"accuracy": 0.5, "version": 1}
    export_best(build_model(ModelSpec("kws-tiny", seed=3)), coord.export_dir, {"version": 1})
    return coord


def test_the_export_is_tested_on_the_unseen_speaker_split_beside_the_test_split(tmp_path):
    data = tiny_dataset(tmp_path / "ks")
    coord = _coordinator(tmp_path, data)
    with capture_logs() as logs:
        out = coord._test_export()
    assert out is not None
    model = build_model(ModelSpec("kws-tiny", seed=3))
    dd = load_from_disk(str(data))
    for prefix, split in (("test", "test"), ("unseen", "test_unseen")):
        expected = evaluate(model, Clips.from_arrays(*to_arrays(dd[split])))
        assert out[f"{prefix}_accuracy"] == round(expected.accuracy, 4)
        assert out[f"{prefix}_loss"] == round(expected.loss, 4)
        assert list(out[f"{prefix}_per_class"]) == list(KS_LABELS)
    assert out["test_loss"] != out["unseen_loss"]  # two different splits
    assert [e["split"] for e in logs if e["event"] == "export_tested"] == ["test", "test_unseen"]
    summary = {**coord.summary("max_versions"), **out}
    assert summary["unseen_accuracy"] == out["unseen_accuracy"] and "test_accuracy" in summary


def test_a_data_set_without_the_unseen_split_is_skipped_with_a_log_line(tmp_path):
    data = tiny_dataset(tmp_path / "old", splits=("train", "validation", "test"))
    coord = _coordinator(tmp_path, data)
    with capture_logs() as logs:
        out = coord._test_export()
    assert out is not None and out["unseen_accuracy"] is None and out["test_accuracy"] is not None
    assert not any(k.startswith("unseen_") and k != "unseen_accuracy" for k in out)
    skipped = [e for e in logs if e["event"] == "export_unseen_skipped"]
    assert len(skipped) == 1 and skipped[0]["split"] == "test_unseen"
    assert [e["split"] for e in logs if e["event"] == "export_tested"] == ["test"]


def test_an_empty_unseen_split_setting_never_evaluates_it_and_a_bad_name_is_refused(tmp_path):
    data = tiny_dataset(tmp_path / "ks")
    out = _coordinator(tmp_path, data, **{"data.unseen_split": ""})._test_export()
    assert out is not None and out["unseen_accuracy"] is None
    with pytest.raises(ConfigError, match="data.unseen_split"):
        load_config(ExperimentConfig, env={}, overrides={"data.unseen_split": "../etc"})
    assert has_split(load_config(ExperimentConfig, env={}, overrides={"data.path": str(data)}), "test_unseen")
    assert not has_split(load_config(ExperimentConfig, env={}, overrides={"data.path": str(tmp_path / "none")}),
                         "test_unseen")


def test_the_demo_table_prints_the_unseen_accuracy_on_its_own_row(capsys):
    summary = {"reason": "target_accuracy", "versions": 3, "best_accuracy": 0.9, "best_version": 2,
               "test_accuracy": 0.91, "unseen_accuracy": 0.8123, "export": "runs/x/export",
               "counters": {"applied_updates": 6}}
    demo._print_table(summary, [], 12.0)
    rows = capsys.readouterr().out.splitlines()
    assert any(r.startswith("test accuracy (exported model)") and r.endswith("0.9100") for r in rows)
    assert any(r.startswith("unseen-speaker accuracy (exported model)") and r.endswith("0.8123") for r in rows)
    demo._print_table({**summary, "unseen_accuracy": None}, [], 12.0)
    rows = capsys.readouterr().out.splitlines()
    assert any(r.startswith("unseen-speaker accuracy (exported model)")
               and r.endswith("- (the data set has no unseen-speaker split)") for r in rows)


def test_the_report_page_shows_the_unseen_accuracy():
    keys = [k for k, _, _ in SUMMARY_ROWS]
    assert keys.index("unseen_accuracy") == keys.index("test_accuracy") + 1
