"""The run record: one JSON object per line, one line per model version, `eval` lines (the evaluator's
results, which come after their version's line), `federated_eval` lines and a final summary line.

Each version line: `version`, `time_s` (seconds of experiment time), `accuracy` / `loss` (null: the
evaluator reports them later, in an `eval` line; `versions()` joins them), `staleness` (of each applied
update), `workers` and `tasks` (theirs), `updates`, `bytes_received` (wire bytes of the applied updates),
`raw_bytes`, `compression_ratio`, `bytes_fetched` (model bytes the applied updates' tasks downloaded, as
their workers report), `delta_norm`, `publish_s` (the ingest thread's time handing the version to the
model publisher; its log line `model_version_out` has the publication's), `counters` (the run's cumulative
counts so far, the summary's `counters` as of this version: `accepted`, `duplicates`, `applied_updates`,
`steps`, `step_refused`, `rejected` (by reason), `dead_lettered`, `stale_dropped`, `codec_errors`,
`tasks_expired`, `answered_dropped`, `issued`, `dead_letters_by_error` (this session's consumer); records
written before it have none: `coordinator/report.py` then takes the summary's). Lines are appended and
flushed as versions happen; on resume, lines for versions newer than the checkpoint are dropped (they are
made again). `mqfed-coordinator report RUN_DIR` prints and plots the record (coordinator/report.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class RunRecord:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, entry: dict) -> None:
        line = json.dumps(entry) + "\n"
        with open(self.path, "a+b") as f:  # writes go to the end whatever the read position
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":  # the last line was torn by a crash: keep it apart from this one
                    line = "\n" + line
            f.write(line.encode())

    def lines(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a crash mid-write
                continue
        return out

    def versions(self) -> list[dict]:
        """The version lines, each with the accuracy and loss of its `eval` line when there is one (and that
        line's `time_s` as `eval_time_s`: when the coordinator learned it)."""
        lines = self.lines()
        evals = {e["version"]: e for e in lines if e.get("kind") == "eval"}
        out = []
        for e in lines:
            if e.get("kind") is None:
                found = evals.get(e["version"])
                out.append({**e, "accuracy": found["accuracy"], "loss": found["loss"],
                            "eval_time_s": found["time_s"]} if found else e)
        return out

    def truncate_after(self, version: int) -> None:
        """Keep only version lines up to `version` (used when resuming from a checkpoint)."""
        kept = [e for e in self.lines() if "version" in e and e["version"] <= version and e.get("kind") != "summary"]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in kept))
        os.replace(tmp, self.path)

