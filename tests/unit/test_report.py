"""`mqfed-coordinator report` (coordinator/report.py): the report model from record lines, to the number, for
a finished run, a running one, a crashed one (torn last line), a resumed one, an empty record and records
older than the per-version counters; the text, JSON and HTML forms; the PNGs the CLI writes."""
from __future__ import annotations

import base64
import fcntl
import json
import math
import os

import pytest

from coordinator import report
from coordinator.cli import main
from coordinator.record import RunRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _counters(stale=0, answered=0, duplicates=0, dead=0, expired=0, refused=0) -> dict:
    return {"accepted": 0, "duplicates": duplicates, "applied_updates": 0, "steps": 0, "step_refused": refused,
            "rejected": {}, "dead_lettered": dead, "stale_dropped": stale, "codec_errors": 0,
            "tasks_expired": expired, "answered_dropped": answered, "issued": 0, "dead_letters_by_error": {}}


def _version(v, staleness, workers, time_s=None, wire=100, raw=400, fetched=1000, counters=None, accuracy=None):
    e = {"version": v, "time_s": 10.0 * v if time_s is None else time_s, "accuracy": accuracy, "loss": None,
         "staleness": staleness, "workers": workers, "tasks": [f"t{v}{w}" for w in workers],
         "updates": len(workers), "bytes_received": wire, "raw_bytes": raw,
         "compression_ratio": round(raw / wire, 2), "bytes_fetched": fetched, "delta_norm": 0.5}
    if counters is not None:
        e["counters"] = counters
    return e


def _eval(v, accuracy, loss, time_s):
    return {"kind": "eval", "version": v, "time_s": time_s, "accuracy": accuracy, "loss": loss}


def _fed(v, worker, accuracy, loss, samples, time_s):
    return {"kind": "federated_eval", "version": v, "worker": worker, "time_s": time_s, "val_accuracy": accuracy,
            "val_loss": loss, "val_samples": samples}


SUMMARY = {"kind": "summary", "reason": "max_versions", "versions": 4, "wall_s": 41.0, "best_accuracy": 0.75,
           "best_version": 4, "final_accuracy": 0.75, "export": "runs/x/export",
           "counters": {**_counters(stale=2, answered=1, duplicates=3, dead=1, expired=4, refused=0),
                        "dead_letters_by_error": {"InvalidField": 1}},
           "test_accuracy": 0.7}


def finished() -> list[dict]:
    """Four versions from w1 and w2 (w2 joins late), evaluated at 2 and 4, federated evaluation at 2."""
    return [
        _version(1, [0, 1], ["w1", "w1"], wire=100, raw=1000, fetched=0, counters=_counters()),
        _version(2, [0, 0], ["w1", "w2"], wire=200, raw=1000, fetched=500, counters=_counters(duplicates=1)),
        _eval(2, 0.5, 1.5, 25.0),
        _fed(2, "w1", 0.4, 2.0, 30, 26.0), _fed(2, "w2", 0.8, 1.0, 10, 27.0),
        _version(3, [2, 0], ["w2", "w1"], wire=250, raw=1000, fetched=0,
                 counters=_counters(stale=2, duplicates=1, dead=1)),
        {"kind": "step_refused", "version": 3, "wal_seq": 9, "time_s": 35.0, "tasks": [], "workers": [],
         "reason": "non_finite", "detail": ""},
        _version(4, [1, 3], ["w2", "w2"], wire=500, raw=1000, fetched=2000,
                 counters=_counters(stale=2, answered=1, duplicates=3, dead=1, expired=4)),
        _eval(4, 0.75, 0.9, 44.5),
        SUMMARY,
    ]


# -- the model, to the number ----------------------------------------------------------------------------
def test_a_finished_run_reports_its_state_summary_and_evaluations():
    m = report.build(finished())
    assert m["state"] == "finished" and m["summary"] == {k: v for k, v in SUMMARY.items() if k != "kind"}
    assert (m["versions"], m["last_version"], m["last_time_s"]) == (4, 4, 40.0)
    assert m["central_eval"] == {"version": [2, 4], "time_s": [20.0, 40.0], "learned_s": [25.0, 44.5],
                                 "accuracy": [0.5, 0.75], "loss": [1.5, 0.9]}
    # weighted by val_samples: (0.4*30 + 0.8*10) / 40 = 0.5; (2.0*30 + 1.0*10) / 40 = 1.75
    assert m["federated_eval"] == {"version": [2], "time_s": [20.0], "accuracy": [pytest.approx(0.5)],
                                   "loss": [pytest.approx(1.75)], "workers": [2]}
    assert m["table"]["accuracy"] == [None, 0.5, None, 0.75]


def test_staleness_histogram_and_per_version():
    m = report.build(finished())
    # staleness seen: 0,1 | 0,0 | 2,0 | 1,3 -> 0: 4, 1: 2, 2: 1, 3: 1
    assert m["staleness"]["histogram"] == {"staleness": [0, 1, 2, 3], "updates": [4, 2, 1, 1]}
    per = m["staleness"]["per_version"]
    assert per["mean"] == [0.5, 0.0, 1.0, 2.0] and per["max"] == [1, 0, 2, 3]
    assert per["rolling_mean"] == [0.5, 0.25, 0.5, 0.875]  # all 10-version windows: the running mean
    window_2 = report.staleness_per_version(report.version_lines(finished()), window=2)["rolling_mean"]
    assert window_2 == [0.5, 0.25, 0.5, 1.5]  # version 4: (2 + 0 + 1 + 3) / 4


def test_updates_per_worker_over_time_are_cumulative_and_start_at_zero_for_late_workers():
    upw = report.build(finished())["updates_per_worker"]
    assert upw == {"version": [1, 2, 3, 4], "time_s": [10.0, 20.0, 30.0, 40.0],
                   "workers": {"w1": [2, 3, 4, 4], "w2": [0, 1, 2, 4]}}


def test_bytes_per_version_and_compression_ratio():
    b = report.build(finished())["bytes"]
    assert b["bytes_received"] == [100, 200, 250, 500] and b["raw_bytes"] == [1000] * 4
    assert b["bytes_fetched"] == [0, 500, 0, 2000]
    assert b["compression_ratio"] == [10.0, 5.0, 4.0, 2.0]
    assert b["total"] == {"bytes_received": 1050, "raw_bytes": 4000, "bytes_fetched": 2500,
                          "compression_ratio": 3.81}  # 4000 / 1050


def test_counts_over_time_from_the_version_lines_and_final_from_the_summary():
    c = report.build(finished())["counts"]
    assert c["source"] == "versions" and c["time_s"] == [10.0, 20.0, 30.0, 40.0]
    assert c["series"]["stale_dropped"] == [0, 0, 2, 2]
    assert c["series"]["duplicates"] == [0, 1, 1, 3]
    assert c["series"]["dead_lettered"] == [0, 0, 1, 1]
    assert c["series"]["answered_dropped"] == [0, 0, 0, 1] and c["series"]["tasks_expired"] == [0, 0, 0, 4]
    assert c["final"] == {"stale_dropped": 2, "answered_dropped": 1, "duplicates": 3, "dead_lettered": 1,
                          "tasks_expired": 4, "step_refused": 0}
    assert c["dead_letters_by_error"] == {"InvalidField": 1} and c["steps_refused"] == 1


def test_a_running_run_has_no_summary_and_counts_from_its_last_version():
    lines = [e for e in finished() if e.get("kind") != "summary"]
    m = report.build(lines, running=True)
    assert m["state"] == "running" and m["summary"] is None
    assert m["counts"]["final"]["duplicates"] == 3 and m["counts"]["final"]["tasks_expired"] == 4
    assert report.build(lines, running=False)["state"] == "ended without summary"
    assert report.build(lines)["state"] == "no summary"
    assert report.build(finished(), running=False)["state"] == "finished"


def test_a_crashed_run_with_a_torn_last_line(tmp_path):
    record = RunRecord(tmp_path / "record.jsonl")
    for e in finished()[:3]:
        record.append(e)
    with open(record.path, "a") as f:
        f.write(json.dumps(_version(3, [0], ["w1"]))[:30])  # the crash came mid-write
    m = report.build(record.lines(), running=False)
    assert m["state"] == "ended without summary" and m["versions"] == 2
    assert m["staleness"]["histogram"]["updates"] == [3, 1]
    assert m["central_eval"]["version"] == [2] and m["federated_eval"]["version"] == []


def test_versions_not_evaluated_yet_and_no_federated_evaluation():
    m = report.build([_version(1, [0], ["w1"]), _version(2, [1], ["w1"])])
    assert m["central_eval"] == {"version": [], "time_s": [], "learned_s": [], "accuracy": [], "loss": []}
    assert m["federated_eval"]["version"] == [] and m["table"]["accuracy"] == [None, None]


def test_old_version_lines_that_carry_their_accuracy_count_as_evaluations():
    m = report.build([_version(1, [0], ["w1"], accuracy=0.3), _version(2, [0], ["w1"]), _eval(2, 0.4, 1.0, 22.0)])
    assert m["central_eval"]["version"] == [1, 2] and m["central_eval"]["accuracy"] == [0.3, 0.4]


def test_a_version_written_again_by_a_resumed_run_counts_once_as_its_last_line_says():
    lines = [_version(1, [0], ["w1"]), _version(2, [0], ["w1"], wire=50), _version(2, [1], ["w2"], wire=70)]
    m = report.build(lines)
    assert m["versions"] == 2 and m["bytes"]["bytes_received"] == [100, 70]
    assert m["updates_per_worker"]["workers"] == {"w1": [1, 1], "w2": [0, 1]}


def test_an_empty_record():
    m = report.build([])
    assert m["state"] == "empty" and m["versions"] == 0 and m["last_version"] is None
    assert m["staleness"]["histogram"] == {"staleness": [], "updates": []}
    assert m["bytes"]["total"] == {"bytes_received": 0, "raw_bytes": 0, "bytes_fetched": 0, "compression_ratio": 0.0}
    assert m["counts"]["source"] is None and set(m["counts"]["final"].values()) == {None}
    assert report.render_text(m).count("\n") == 1  # the header only
    assert json.loads(report.render_json(m))["state"] == "empty"


def test_an_old_record_without_counters_takes_the_summary_or_says_n_a():
    old = [{k: v for k, v in e.items() if k != "counters" or e.get("kind") == "summary"} for e in finished()]
    c = report.build(old)["counts"]
    assert c["source"] == "summary" and c["series"]["duplicates"] == [] and c["final"]["duplicates"] == 3
    c = report.build([e for e in old if e.get("kind") != "summary"])["counts"]
    assert c["source"] is None and c["final"]["dead_lettered"] is None
    assert ("dead-lettered (refused updates)", None) in report.count_rows(report.build(old[:2]))


# -- text and JSON ---------------------------------------------------------------------------------------
def test_render_text_is_the_table_report_always_printed_then_the_summary():
    text = report.render_text(report.build(finished()))
    lines = text.splitlines()
    assert lines[0] == " version   time s  accuracy  updates       staleness   ratio  workers"
    assert lines[1] == "       1     10.0         -        2          [0, 1]    10.0  w1"
    assert lines[2] == "       2     20.0    0.5000        2          [0, 0]     5.0  w1,w2"
    assert json.loads(lines[-1]) == SUMMARY and len(lines) == 6


def test_render_json_is_strict_json_without_nan():
    lines = [_version(1, [0], ["w1"]), _eval(1, 0.1, math.nan, 12.0)]
    out = report.render_json(report.build(lines))
    assert "NaN" not in out and json.loads(out)["central_eval"]["loss"] == [None]


def test_human_byte_ticks():
    assert [report._human_bytes(v) for v in (500, 1500, 2e6, 3e9)] == ["500 B", "1.5 kB", "2 MB", "3 GB"]


def test_lock_held(tmp_path):
    assert report.lock_held(tmp_path) is None  # no lock file
    fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert report.lock_held(tmp_path) is False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the coordinator holds it
        assert report.lock_held(tmp_path) is True
    finally:
        os.close(fd)
    assert report.lock_held(tmp_path) is False


# -- the CLI ---------------------------------------------------------------------------------------------
def _run_dir(tmp_path, lines):
    record = RunRecord(tmp_path / "run" / "record.jsonl")
    for e in lines:
        record.append(e)
    return tmp_path / "run"


@pytest.mark.parametrize("lines", [finished(), finished()[:3], [_version(1, [0], ["w1"])]],
                         ids=["finished", "running", "one-version-no-eval"])
def test_the_cli_writes_valid_pngs_and_one_self_contained_html_page(tmp_path, capsys, lines):
    pytest.importorskip("matplotlib")
    run_dir = _run_dir(tmp_path, lines)
    assert main(["report", str(run_dir), "--format", "html"]) == 0
    printed = capsys.readouterr().out.split()
    out = run_dir / "report"
    assert printed == [str(out / name) for name, _ in report.PLOTS] + [str(out / "report.html")]
    page = (out / "report.html").read_text()
    for name, heading in report.PLOTS:
        png = (out / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 1000, name
        assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
        assert f"<h2>{heading}</h2>" in page
    assert page.count("data:image/png;base64,") == len(report.PLOTS) and "<img src=\"report-" not in page


def test_the_cli_html_goes_to_out_and_an_empty_model_still_draws(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = _run_dir(tmp_path, [_fed(1, "w1", 0.5, 1.0, 3, 1.0)])  # lines, but no version yet
    assert main(["report", str(run_dir), "--format", "html", "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "report.html").exists() and not (run_dir / "report").exists()
    paths = report.write_plots(report.build([]), tmp_path / "empty")
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in paths)
    capsys.readouterr()


def test_the_cli_json_and_text(tmp_path, capsys):
    run_dir = _run_dir(tmp_path, finished())
    assert main(["report", str(run_dir), "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    got = json.loads(out)
    assert got["run_dir"] == str(run_dir) and got["state"] == "finished" and got["versions"] == 4
    assert got["staleness"]["histogram"]["updates"] == [4, 2, 1, 1]
    assert main(["report", str(run_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.out == report.render_text(report.build(finished())) and captured.err == ""


def test_the_cli_says_when_there_is_no_summary_and_refuses_a_directory_without_a_record(tmp_path, capsys):
    run_dir = _run_dir(tmp_path, finished()[:2])
    assert main(["report", str(run_dir)]) == 0
    assert report.STATES["no summary"] in capsys.readouterr().err  # no lock file: not known whether it runs
    for fmt in ("text", "json", "html"):
        assert main(["report", str(tmp_path / "nothing"), "--format", fmt]) == 2
        assert "no run record" in capsys.readouterr().err


def test_the_page_tables():
    m = report.build(finished())
    rows = dict(report.status_rows(m))
    assert rows["state"] == "finished" and rows["stopped by"] == "max_versions"
    assert rows["best validation accuracy"] == "75.0%" and rows["test accuracy of the export"] == "70.0%"
    assert rows["updates on the wire"] == "1.05 kB (1050 B)" and rows["compression ratio (whole run)"] == "3.81x"
    assert rows["model downloads of the applied updates' tasks"] == "2.5 kB (2500 B)"
    counted = dict(report.count_rows(m))
    assert counted["duplicates (redelivered, not applied again)"] == 3 and counted["tasks expired (re-issued)"] == 4
    assert counted["dead letters by error (the consumer's, last session)"] == "InvalidField: 1"
    running = dict(report.status_rows(report.build(finished()[:2], running=True)))
    assert running["state"] == report.STATES["running"] and "stopped by" not in running
    page = report.html_page(m, [("A <plot>", PNG_MAGIC)], "run <x>")
    assert "<h1>run &lt;x&gt;</h1>" in page and "<h2>A &lt;plot&gt;</h2>" in page
    assert f'src="data:image/png;base64,{base64.b64encode(PNG_MAGIC).decode()}"' in page


def test_the_coordinator_writes_its_counts_into_every_version_line(tiny_corpus_dir, tmp_path, torch_single_thread):
    import time

    from common.config import load_config
    from coordinator.aggregator import AggregationRecord
    from coordinator.experiment import ExperimentConfig
    from coordinator.server import Coordinator

    cfg = load_config(ExperimentConfig, env={}, overrides={
        "experiment.name": "counts", "experiment.run_dir": str(tmp_path / "run"), "data.path": str(tiny_corpus_dir),
        "data.eval_max_clips": 4})
    coord = Coordinator(cfg)
    coord._session_start = time.monotonic()
    coord.counters["stale_dropped"] += 2
    coord.aggregator.counters["duplicates"] += 1
    coord._new_version(AggregationRecord(1, (0, 1), ("w1/cpu", "w2/cpu"), ("t1", "t2"), (8, 8), (1.0, 0.7), 2.0, 0.5),
                       replaying=True)
    lines = RunRecord(tmp_path / "run" / "record.jsonl").lines()
    assert lines[-1]["counters"] == coord.counts() == coord.summary("signal")["counters"]
    assert lines[-1]["counters"]["stale_dropped"] == 2 and lines[-1]["counters"]["duplicates"] == 1
    c = report.build(lines)["counts"]
    assert c["source"] == "versions" and c["series"]["stale_dropped"] == [2] and c["series"]["duplicates"] == [1]
