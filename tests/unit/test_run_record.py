"""The run record (one JSON line per version): append and read back, a line torn by a crash skipped,
truncation on resume keeping versions (and federated evaluations) up to the checkpoint's."""
from __future__ import annotations

import json

from coordinator.record import RunRecord


def _version(v: int, accuracy: float | None = None) -> dict:
    return {"version": v, "time_s": 1.5 * v, "accuracy": accuracy, "loss": None, "staleness": [0, 1],
            "workers": ["a", "b"], "tasks": [f"t{v}a", f"t{v}b"], "updates": 2, "bytes_received": 100 * v,
            "raw_bytes": 400 * v, "compression_ratio": 4.0, "delta_norm": 0.5}


def _fed_eval(v: int) -> dict:
    return {"kind": "federated_eval", "version": v, "worker": "a", "time_s": 2.0 * v, "val_accuracy": 0.5}


SUMMARY = {"kind": "summary", "reason": "max_versions", "versions": 4, "best_accuracy": 0.75}


def test_append_then_lines_reads_back_in_order(tmp_path):
    record = RunRecord(tmp_path / "run" / "record.jsonl")  # the directory is made
    assert record.lines() == []  # nothing written yet
    entries = [_version(1, 0.25), _fed_eval(1), _version(2), SUMMARY]
    for e in entries:
        record.append(e)
    assert record.lines() == entries
    text = record.path.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 4
    assert [json.loads(line) for line in text.splitlines()] == entries


def test_a_torn_last_line_is_skipped(tmp_path):
    record = RunRecord(tmp_path / "record.jsonl")
    record.append(_version(1))
    record.append(_version(2))
    with open(record.path, "a") as f:
        f.write(json.dumps(_version(3))[:25])  # the crash came mid-write
    assert record.lines() == [_version(1), _version(2)]


def test_a_line_appended_after_a_torn_line_is_kept(tmp_path):
    record = RunRecord(tmp_path / "record.jsonl")
    record.append(_version(1))
    with open(record.path, "a") as f:
        f.write('{"version": 2, "ti')
    record.append(_version(2))
    assert record.lines() == [_version(1), _version(2)]


def test_truncate_after_keeps_versions_and_federated_evals_up_to_v(tmp_path):
    record = RunRecord(tmp_path / "record.jsonl")
    for e in [_version(1), _fed_eval(1), _version(2), _fed_eval(2), _version(3), _fed_eval(3), _version(4),
              SUMMARY]:
        record.append(e)
    record.truncate_after(2)
    assert record.lines() == [_version(1), _fed_eval(1), _version(2), _fed_eval(2)]
    assert not (tmp_path / "record.tmp").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["record.jsonl"]
    record.append(_version(3, 0.5))  # the resumed run makes version 3 again
    assert record.lines()[-1] == _version(3, 0.5) and len(record.lines()) == 5


def test_truncate_after_drops_a_torn_line_and_the_summary(tmp_path):
    record = RunRecord(tmp_path / "record.jsonl")
    record.append(_version(1))
    record.append(SUMMARY)
    with open(record.path, "a") as f:
        f.write('{"version": 2, "ti')
    record.truncate_after(5)
    assert record.lines() == [_version(1)]
    assert record.path.read_text() == json.dumps(_version(1)) + "\n"


def test_truncate_after_minus_one_empties_the_record(tmp_path):
    record = RunRecord(tmp_path / "record.jsonl")
    for v in range(3):
        record.append(_version(v))
    record.append(_fed_eval(0))
    record.truncate_after(-1)
    assert record.lines() == [] and record.path.read_text() == ""
    fresh = RunRecord(tmp_path / "new" / "record.jsonl")
    fresh.truncate_after(-1)  # a fresh run without a record: nothing to drop, no error
    assert fresh.lines() == []
