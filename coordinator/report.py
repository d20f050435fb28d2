"""Reports of a run record (coordinator/record.py): what `mqfed-coordinator report` prints and draws.

`build(lines)` turns the record's lines (dicts) into the report model, plain values only: the version table,
central and federated evaluations, staleness (histogram and per version), updates per worker over time,
bytes per version and compression ratio, and the dropped / duplicate / dead-lettered counts over time. It is
pure and takes any record: a finished run (a `summary` line), one still going or crashed (none), versions
not evaluated yet, no federated evaluations, version lines written again by a resumed run (the last one
counts), an empty record, and records older than the per-version `counters` field (the counts then come from
the summary, or are "n/a"). `render_text` and `render_json` print it; `write_plots` and `write_html` draw it
(matplotlib, imported there only: text and JSON need none); `lock_held` tells a running run from one that
ended without a summary. docs/operations.md#reports.
"""
from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

#: The counts plotted over time: (key in the record's `counters`, label). A validation reject that is not
#: "stale" is dead-lettered (and counted there); a stale one is dropped (counted in `stale_dropped`).
COUNTS = (
    ("stale_dropped", "dropped: too stale"),
    ("answered_dropped", "dropped: task answered already"),
    ("duplicates", "duplicates (redelivered, not applied again)"),
    ("dead_lettered", "dead-lettered (refused updates)"),
    ("tasks_expired", "tasks expired (re-issued)"),
    ("step_refused", "updates in refused steps"),
)

STATES = {
    "empty": "empty record: no version yet",
    "running": "running: a coordinator holds the run directory's lock (no summary line yet)",
    "ended without summary": "ended without a summary line: crashed, or stopped by a signal (`run` resumes it from"
                             " its checkpoint)",
    "no summary": "no summary line: the run is still going, or ended without one (crashed, or stopped by a signal)",
}


# -- the model (pure) ------------------------------------------------------------------------------------
def version_lines(lines: Iterable[dict]) -> list[dict]:
    """The version lines by version; a version written twice (a resumed run made it again) counts once, as
    its last line says."""
    found: dict[int, dict] = {}
    for e in lines:
        if e.get("kind") is None and isinstance(e.get("version"), int):
            found[e["version"]] = e
    return [found[v] for v in sorted(found)]


def summary_line(lines: Iterable[dict]) -> dict | None:
    """The last `summary` line, without its `kind`; None when there is none."""
    found = [e for e in lines if e.get("kind") == "summary"]
    return {k: v for k, v in found[-1].items() if k != "kind"} if found else None


def _times(versions: Sequence[dict]) -> dict[int, float]:
    return {e["version"]: e["time_s"] for e in versions}


def central_evals(lines: Iterable[dict], versions: Sequence[dict]) -> dict:
    """The central evaluations by version: `eval` lines (the last of a version counts), and the accuracy and
    loss of version lines that carry them (records from before the evaluator had its own process). `time_s`:
    when the version was made (the `eval` line's own time when the record has no line for the version);
    `learned_s`: when the coordinator learned the result."""
    found = {e["version"]: e for e in versions if e.get("accuracy") is not None}
    found.update({e["version"]: e for e in lines if e.get("kind") == "eval"})
    times = _times(versions)
    order = sorted(found)
    return {"version": order, "time_s": [times.get(v, found[v]["time_s"]) for v in order],
            "learned_s": [found[v]["time_s"] for v in order],
            "accuracy": [found[v]["accuracy"] for v in order], "loss": [found[v]["loss"] for v in order]}


def _mean(values: Sequence[float], weights: Sequence[float]) -> float | None:
    if not values:
        return None
    if len(weights) == len(values) and sum(weights) > 0:
        return sum(v * w for v, w in zip(values, weights)) / sum(weights)
    return sum(values) / len(values)


def federated_evals(lines: Iterable[dict], versions: Sequence[dict]) -> dict:
    """The workers' evaluations on their own validation shards, one point per version: accuracy and loss
    averaged over the workers that answered, weighted by their `val_samples` (a plain mean when a worker
    did not say)."""
    by_version: dict[int, dict[str, dict]] = {}
    for e in lines:
        if e.get("kind") == "federated_eval":
            by_version.setdefault(e["version"], {})[str(e.get("worker"))] = e  # a worker answering twice: last
    times = _times(versions)
    out: dict[str, list] = {"version": [], "time_s": [], "accuracy": [], "loss": [], "workers": []}
    for v in sorted(by_version):
        answers = list(by_version[v].values())
        samples = [a["val_samples"] for a in answers if isinstance(a.get("val_samples"), (int, float))]
        acc = [a["val_accuracy"] for a in answers if a.get("val_accuracy") is not None]
        loss = [a["val_loss"] for a in answers if a.get("val_loss") is not None]
        out["version"].append(v)
        out["time_s"].append(times.get(v, max(a["time_s"] for a in answers)))
        out["accuracy"].append(_mean(acc, samples if len(acc) == len(answers) else []))
        out["loss"].append(_mean(loss, samples if len(loss) == len(answers) else []))
        out["workers"].append(len(answers))
    return out


def staleness_histogram(versions: Sequence[dict]) -> dict:
    """Applied updates by staleness, every staleness from 0 to the largest seen."""
    seen = [s for e in versions for s in e.get("staleness", [])]
    counts = [0] * (max(seen) + 1 if seen else 0)
    for s in seen:
        counts[s] += 1
    return {"staleness": list(range(len(counts))), "updates": counts}


#: Versions the rolling mean of staleness spans.
ROLLING_VERSIONS = 10


def staleness_per_version(versions: Sequence[dict], window: int = ROLLING_VERSIONS) -> dict:
    """Mean and largest staleness of each version's applied updates, and `rolling_mean`: the mean over the
    applied updates of the last `window` versions (versions that list none are left out)."""
    kept = [e for e in versions if e.get("staleness")]
    rolling = []
    for i in range(len(kept)):
        recent = [s for e in kept[max(0, i + 1 - window):i + 1] for s in e["staleness"]]
        rolling.append(sum(recent) / len(recent))
    return {"version": [e["version"] for e in kept], "time_s": [e["time_s"] for e in kept],
            "mean": [sum(e["staleness"]) / len(e["staleness"]) for e in kept],
            "max": [max(e["staleness"]) for e in kept], "rolling_mean": rolling}


def updates_per_worker(versions: Sequence[dict]) -> dict:
    """Each worker's (trainer's) applied updates so far, after each version."""
    names = sorted({w for e in versions for w in e.get("workers", [])})
    totals = dict.fromkeys(names, 0)
    series: dict[str, list[int]] = {w: [] for w in names}
    for e in versions:
        for w in e.get("workers", []):
            totals[w] += 1
        for w in names:
            series[w].append(totals[w])
    return {"version": [e["version"] for e in versions], "time_s": [e["time_s"] for e in versions],
            "workers": series}


def bytes_per_version(versions: Sequence[dict]) -> dict:
    """Wire bytes of each version's applied updates, their size as float32 (raw), the model bytes their tasks
    downloaded, the compression ratio (raw / wire); `total`: the same over the run."""
    wire = [int(e.get("bytes_received", 0)) for e in versions]
    raw = [int(e.get("raw_bytes", 0)) for e in versions]
    fetched = [int(e.get("bytes_fetched", 0)) for e in versions]
    return {"version": [e["version"] for e in versions], "bytes_received": wire, "raw_bytes": raw,
            "bytes_fetched": fetched, "compression_ratio": [round(r / max(1, w), 2) for r, w in zip(raw, wire)],
            "total": {"bytes_received": sum(wire), "raw_bytes": sum(raw), "bytes_fetched": sum(fetched),
                      "compression_ratio": round(sum(raw) / max(1, sum(wire)), 2)}}


def _count_values(counters: dict) -> dict[str, int]:
    return {key: int(counters.get(key, 0)) for key, _ in COUNTS}


def counts(versions: Sequence[dict], summary: dict | None, steps_refused: int = 0) -> dict:
    """The counts of COUNTS over time, from the version lines' cumulative `counters` (those that have them);
    `final`: the summary's when there is one, else the last version line's; None for each ("n/a") when the
    record has neither. `source`: "versions", "summary" (an older record: totals only) or None.
    steps_refused: the record's `step_refused` lines."""
    kept = [e for e in versions if isinstance(e.get("counters"), dict)]
    series = {key: [_count_values(e["counters"])[key] for e in kept] for key, _ in COUNTS}
    last = summary.get("counters") if summary and isinstance(summary.get("counters"), dict) else None
    if last is None and kept:
        last = kept[-1]["counters"]
    dead_letters = (last or {}).get("dead_letters_by_error") or {}
    return {"source": "versions" if kept else ("summary" if last is not None else None),
            "version": [e["version"] for e in kept], "time_s": [e["time_s"] for e in kept], "series": series,
            "final": _count_values(last) if last is not None else dict.fromkeys((k for k, _ in COUNTS), None),
            "dead_letters_by_error": dict(dead_letters), "steps_refused": steps_refused}


def version_table(versions: Sequence[dict], evals: dict) -> dict:
    """The per-version columns the text table prints (accuracy: the evaluator's, None when not evaluated)."""
    accuracy = dict(zip(evals["version"], evals["accuracy"]))
    return {"version": [e["version"] for e in versions], "time_s": [e["time_s"] for e in versions],
            "accuracy": [accuracy.get(e["version"]) for e in versions],
            "updates": [e.get("updates", len(e.get("workers", []))) for e in versions],
            "staleness": [list(e.get("staleness", [])) for e in versions],
            "compression_ratio": [e.get("compression_ratio", 1) for e in versions],
            "workers": [sorted(set(e.get("workers", []))) for e in versions]}


def run_state(lines: Sequence[dict], summary: dict | None, running: bool | None) -> str:
    """"finished" (a summary line), "running" (none, and a coordinator holds the run directory's lock),
    "ended without summary" (none, and no coordinator holds it: crashed, or stopped by a signal), "no summary"
    (none, and whether one runs is not known), or "empty"."""
    if not lines:
        return "empty"
    if summary is not None:
        return "finished"
    return {True: "running", False: "ended without summary", None: "no summary"}[running]


def build(lines: Sequence[dict], running: bool | None = None) -> dict:
    """The report model of a run record's lines (see the module doc). running: whether a coordinator holds
    the run directory's lock (`lock_held`), None when not known."""
    versions = version_lines(lines)
    summary = summary_line(lines)
    evals = central_evals(lines, versions)
    counted = counts(versions, summary, sum(1 for e in lines if e.get("kind") == "step_refused"))
    return {"state": run_state(lines, summary, running), "summary": summary,
            "versions": len(versions), "last_version": versions[-1]["version"] if versions else None,
            "last_time_s": versions[-1]["time_s"] if versions else None,
            "table": version_table(versions, evals), "central_eval": evals,
            "federated_eval": federated_evals(lines, versions),
            "staleness": {"histogram": staleness_histogram(versions), "per_version": staleness_per_version(versions)},
            "updates_per_worker": updates_per_worker(versions), "bytes": bytes_per_version(versions),
            "counts": counted}


def lock_held(run_dir: str | Path) -> bool | None:
    """Whether a coordinator holds `run_dir`'s lock (it runs), by trying a shared lock for an instant; None
    when there is no lock file or it cannot be opened. A coordinator starting in that instant stands by
    for half a second (server.py `_acquire_lock`)."""
    import fcntl
    import os

    try:
        fd = os.open(Path(run_dir) / "lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)  # closing releases a lock taken
    return False


# -- text and JSON -----------------------------------------------------------------------------------------
def render_text(model: dict) -> str:
    """The version table (as `report` always printed it), then the summary line as JSON when there is one."""
    t = model["table"]
    out = [f"{'version':>8}{'time s':>9}{'accuracy':>10}{'updates':>9}{'staleness':>16}{'ratio':>8}  workers"]
    for i, version in enumerate(t["version"]):
        acc = f"{t['accuracy'][i]:.4f}" if t["accuracy"][i] is not None else "-"
        out.append(f"{version:>8}{t['time_s'][i]:>9.1f}{acc:>10}{t['updates'][i]:>9}{str(t['staleness'][i]):>16}"
                   f"{t['compression_ratio'][i]:>8.1f}  {','.join(t['workers'][i])}")
    if model["summary"] is not None:
        out.append(json.dumps({"kind": "summary", **model["summary"]}))
    return "\n".join(out) + "\n"


def finite(value: Any) -> Any:
    """`value` with every float that is not finite (a diverged loss) replaced by None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def render_json(model: dict) -> str:
    """The model as one line of strict JSON (no NaN or Infinity)."""
    return json.dumps(finite(model), allow_nan=False)


# -- plots and the HTML page ------------------------------------------------------------------------------
#: The plots, in page order: (file name, heading).
PLOTS = (
    ("report-accuracy.png", "Validation accuracy"),
    ("report-loss.png", "Validation loss"),
    ("report-staleness.png", "Staleness of applied updates"),
    ("report-updates-per-worker.png", "Updates per worker"),
    ("report-bytes.png", "Bytes per version and compression"),
    ("report-counts.png", "Dropped, duplicate and dead-lettered"),
)


def _present(xs: Sequence, ys: Sequence) -> tuple[list, list]:
    """The points whose y is a number (not None, finite)."""
    kept = [(x, y) for x, y in zip(xs, ys) if isinstance(y, (int, float)) and math.isfinite(y)]
    return [x for x, _ in kept], [y for _, y in kept]


def _no_data(ax, what: str = "no data yet") -> None:
    ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="0.4")


def _legend(ax, always: bool = False) -> None:
    """A legend when the axes show more than one series (or one whose name the axis labels do not say)."""
    if len(ax.get_legend_handles_labels()[0]) > (0 if always else 1):
        ax.legend(fontsize="small")


def _human_bytes(value: float, _pos: object = None) -> str:
    """A byte count for people: 1.5 kB, 20 MB, 561 kB (powers of 1000, 3 significant digits)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:g} B"


def _integer_x(ax) -> None:
    """Model versions: whole numbers on the x axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _blank(ax) -> None:
    """No ticks: axes that say there is nothing to show."""
    ax.set_xticks([])
    ax.set_yticks([])


def _accuracy(fig, model: dict) -> None:
    from matplotlib.ticker import PercentFormatter

    central, fed = model["central_eval"], model["federated_eval"]
    test = (model["summary"] or {}).get("test_accuracy")
    for ax, x, xlabel in zip(fig.subplots(1, 2), ("time_s", "version"), ("wall time (s)", "model version")):
        ax.plot(*_present(central[x], central["accuracy"]), marker=".", label="central (evaluator, validation split)")
        if fed["version"]:
            ax.plot(*_present(fed[x], fed["accuracy"]), marker="s", ms=4,
                    label="federated (workers' validation shards, mean)")
        if isinstance(test, (int, float)) and central["version"]:
            ax.axhline(test, color="0.3", ls="--", lw=1, label=f"test accuracy of the export ({test:.1%})")
            shown = [a for a in central["accuracy"] + fed["accuracy"] if isinstance(a, (int, float))] + [test]
            ax.set_ylim(top=min(1.02, max(shown) + 0.04))  # the test line clear of the frame
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
        if x == "version":
            _integer_x(ax)
        ax.set_title(f"Accuracy against {'wall time' if x == 'time_s' else 'versions'}")
        ax.grid(alpha=0.3)
        _legend_or_none(ax, bool(central["version"] or fed["version"]))


def _legend_or_none(ax, evaluated: bool) -> None:
    """The legend of an evaluation plot, or "no evaluation yet" on a blank axis."""
    if evaluated:
        _legend(ax, always=True)
    else:
        _no_data(ax, "no evaluation yet")
        _blank(ax)


def _loss(fig, model: dict) -> None:
    ax = fig.subplots()
    central, fed = model["central_eval"], model["federated_eval"]
    ax.plot(*_present(central["version"], central["loss"]), marker=".", label="central (evaluator, validation split)")
    if fed["version"]:
        ax.plot(*_present(fed["version"], fed["loss"]), marker="s", ms=4,
                label="federated (workers' validation shards, mean)")
    ax.set(xlabel="model version", ylabel="cross-entropy loss (nats per clip)", title="Validation loss")
    _integer_x(ax)
    ax.grid(alpha=0.3)
    _legend_or_none(ax, bool(central["version"] or fed["version"]))


def _staleness(fig, model: dict) -> None:
    from matplotlib.ticker import MaxNLocator

    hist, per = model["staleness"]["histogram"], model["staleness"]["per_version"]
    left, right = fig.subplots(1, 2)
    left.bar(hist["staleness"], hist["updates"], color="tab:blue")
    for s, n in zip(hist["staleness"], hist["updates"]):
        left.annotate(str(n), (s, n), ha="center", va="bottom", fontsize="small")
    left.set(xlabel="staleness (versions behind at arrival)", ylabel="applied updates",
             title="Staleness of applied updates")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.margins(y=0.12)
    right.plot(per["time_s"], per["max"], ls="none", marker=".", color="tab:orange", label="largest per version")
    right.plot(per["time_s"], per["rolling_mean"], color="tab:blue",
               label=f"mean over the last {ROLLING_VERSIONS} versions")
    right.set(xlabel="wall time (s)", ylabel="staleness (versions behind)", title="Staleness over time")
    right.set_ylim(bottom=-0.05, top=max(per["max"], default=1) * 1.15 + 0.1)
    for ax in (left, right):
        if not hist["updates"]:
            _no_data(ax, "no version yet")
            _blank(ax)
        ax.grid(alpha=0.3)
        ax.set_axisbelow(True)
    if hist["updates"]:
        _legend(right)


def _updates_per_worker(fig, model: dict) -> None:
    from matplotlib.ticker import MaxNLocator

    ax = fig.subplots()
    upw = model["updates_per_worker"]
    styles = ("-", "--", ":", "-.")  # workers that keep pace have the same counts: keep each line visible
    for i, (name, series) in enumerate(upw["workers"].items()):
        ax.step(upw["time_s"], series, where="post", ls=styles[i % len(styles)], lw=max(1.2, 3 - 0.6 * i),
                marker="." if len(series) <= 60 else None, ms=4, label=f"{name} ({series[-1]})")
    many = len(upw["workers"]) > 12  # a legend of 100 trainers hides the plot: the title counts them
    ax.set(xlabel="wall time (s)", ylabel="updates applied (cumulative)",
           title=f"Updates per worker ({len(upw['workers'])} trainers)" if many else "Updates per worker")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if not upw["workers"]:
        _no_data(ax, "no version yet")
        _blank(ax)
    elif not many:
        _legend(ax, always=True)


def _bytes(fig, model: dict) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    b = model["bytes"]
    left, right = fig.subplots(1, 2)
    for key, label in (("raw_bytes", "updates as float32 (uncompressed)"),
                       ("bytes_fetched", "model downloads of their tasks (downlink)"),
                       ("bytes_received", "updates on the wire (uplink)")):
        xs, ys = _present(b["version"], [v if v > 0 else None for v in b[key]])  # log scale: no zeros
        if ys:
            left.plot(xs, ys, label=label)
    left.set(xlabel="model version", ylabel="bytes per version (log scale)", title="Bytes per version")
    if any(v > 0 for key in ("raw_bytes", "bytes_fetched", "bytes_received") for v in b[key]):
        left.set_yscale("log")
        left.yaxis.set_major_formatter(FuncFormatter(_human_bytes))
        left.yaxis.set_minor_formatter(NullFormatter())
        low, high = left.get_ylim()
        left.set_ylim(low / 2, high * 4)  # room for the legend above the lines
    right.plot(b["version"], b["compression_ratio"], color="tab:green",
               label=f"per version (whole run: {b['total']['compression_ratio']:g}x)")
    right.set(xlabel="model version", ylabel="compression ratio (raw / wire bytes, x)",
              title="Compression ratio of the applied updates")
    right.set_ylim(bottom=0, top=max(b["compression_ratio"], default=1) * 1.3)
    for ax in (left, right):
        _integer_x(ax)
        if b["version"]:
            ax.legend(fontsize="small", loc="upper right" if ax is left else "lower right")
        else:
            _no_data(ax, "no version yet")
            _blank(ax)
        ax.grid(alpha=0.3)


def _counts(fig, model: dict) -> None:
    from matplotlib.ticker import MaxNLocator

    c = model["counts"]
    ax = fig.subplots()
    labels = dict(COUNTS)
    if c["source"] == "versions":
        styles = ("-", "--", ":", "-.")  # counts that stay equal (often all 0) draw over each other
        for i, (key, series) in enumerate(c["series"].items()):
            ax.step(c["time_s"], series, where="post", ls=styles[i % len(styles)], lw=max(1.2, 2.8 - 0.3 * i),
                    marker=".", ms=5, label=f"{labels[key]} ({series[-1]})")
        ax.set(xlabel="wall time (s)", ylabel="count (cumulative)", title="Dropped, duplicate and dead-lettered")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        top = max((max(v) for v in c["series"].values()), default=0)
        ax.set_ylim(bottom=-0.05 * max(1, top), top=max(1, top) * 1.6)  # room for the legend above the lines
        ax.legend(fontsize="small", loc="upper left")
    elif c["source"] == "summary":
        keys = [k for k, _ in COUNTS]
        ax.barh([labels[k] for k in keys], [c["final"][k] for k in keys], color="tab:orange")
        for i, k in enumerate(keys):
            ax.annotate(f" {c['final'][k]}", (c["final"][k], i), va="center", fontsize="small")
        ax.invert_yaxis()
        ax.set(xlabel="count (whole run)", title="Dropped, duplicate and dead-lettered: run totals\n"
               "(summary line; this record has no counts per version)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0, max(1, *(c["final"][k] for k in keys)) * 1.15)
    else:
        _no_data(ax, "n/a: this record has no counts yet (no per-version counters, no summary line)")
        ax.set(xlabel="wall time (s)", ylabel="count (cumulative)", title="Dropped, duplicate and dead-lettered")
        _blank(ax)
    ax.grid(alpha=0.3)


_DRAW = {"report-accuracy.png": (_accuracy, (11, 4)), "report-loss.png": (_loss, (6.5, 4)),
         "report-staleness.png": (_staleness, (11, 4)), "report-updates-per-worker.png": (_updates_per_worker, (6.5, 4)),
         "report-bytes.png": (_bytes, (11, 4)), "report-counts.png": (_counts, (9, 4))}


def write_plots(model: dict, out_dir: str | Path, dpi: int = 100) -> list[Path]:
    """Draw every plot of PLOTS into `out_dir` as PNG (matplotlib's Agg canvas, no display needed); returns
    their paths in page order."""
    from matplotlib.figure import Figure  # lazily: text and JSON reports need no matplotlib

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, _ in PLOTS:
        draw, size = _DRAW[name]
        fig = Figure(figsize=size, layout="constrained")
        draw(fig, model)
        fig.savefig(out / name, dpi=dpi, format="png")
        paths.append(out / name)
    return paths


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _rows(pairs: Iterable[tuple[str, Any]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in pairs)


#: Summary keys the page shows: (key, label, format: "pct", "s" or None).
SUMMARY_ROWS = (("reason", "stopped by", None), ("versions", "versions", None), ("wall_s", "wall time (s)", "s"),
                ("best_accuracy", "best validation accuracy", "pct"), ("best_version", "best version", None),
                ("final_accuracy", "final validation accuracy", "pct"),
                ("test_accuracy", "test accuracy of the export", "pct"),
                ("unseen_accuracy", "unseen-speaker accuracy of the export", "pct"), ("export", "export", None))


def _pct(value: Any) -> Any:
    return f"{value:.1%}" if isinstance(value, (int, float)) and math.isfinite(value) else value


def _bytes_cell(value: int) -> str:
    return f"{_human_bytes(float(value))} ({value} B)" if value >= 1000 else f"{value} B"


def status_rows(model: dict) -> list[tuple[str, Any]]:
    """The page's first table: the run's state, its last version, its summary's headline figures (when it
    finished) and its bytes."""
    s = model["summary"]
    rows: list[tuple[str, Any]] = [("state", "finished" if s is not None else STATES[model["state"]]),
                                   ("versions recorded", model["versions"]), ("last version", model["last_version"]),
                                   ("last version at (s)", model["last_time_s"])]
    if s is not None:
        rows += [(label, _pct(s[key]) if fmt == "pct" else s[key]) for key, label, fmt in SUMMARY_ROWS if key in s]
    total = model["bytes"]["total"]
    rows += [("updates on the wire", _bytes_cell(total["bytes_received"])),
             ("updates as float32", _bytes_cell(total["raw_bytes"])),
             ("compression ratio (whole run)", f"{total['compression_ratio']:g}x"),
             ("model downloads of the applied updates' tasks", _bytes_cell(total["bytes_fetched"]))]
    return rows


def count_rows(model: dict) -> list[tuple[str, Any]]:
    """The page's counts table: the summary's counts, else the last version line's; n/a when the record has
    neither."""
    c = model["counts"]
    by_error = ", ".join(f"{k}: {v}" for k, v in sorted(c["dead_letters_by_error"].items())) or "none"
    return [(label, c["final"][key]) for key, label in COUNTS] + [
        ("refused steps (step_refused lines)", c["steps_refused"]),
        ("dead letters by error (the consumer's, last session)", by_error if c["source"] else None)]


def html_page(model: dict, images: Sequence[tuple[str, bytes]], title: str) -> str:
    """One self-contained page: the tables, then each (heading, PNG bytes) as a data URI."""
    figures = "".join(f'<h2>{html.escape(h)}</h2><img alt="{html.escape(h)}" '
                      f'src="data:image/png;base64,{base64.b64encode(png).decode()}">\n' for h, png in images)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em;max-width:1150px}table{border-collapse:collapse}"
            "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}th{background:#f4f4f4;font-weight:normal}"
            "img{max-width:100%}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n<table>{_rows(status_rows(model))}</table>\n"
            f"<h2>Counts</h2>\n<table>{_rows(count_rows(model))}</table>\n{figures}</body></html>\n")


def write_html(model: dict, out_dir: str | Path, title: str, dpi: int = 100) -> list[Path]:
    """The PNGs (write_plots) and `report.html` embedding them, in `out_dir`; returns the PNGs' paths, then
    the page's."""
    pngs = write_plots(model, out_dir, dpi=dpi)
    page = Path(out_dir) / "report.html"
    page.write_text(html_page(model, [(h, p.read_bytes()) for (_, h), p in zip(PLOTS, pngs)], title))
    return [*pngs, page]
