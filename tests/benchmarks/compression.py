"""Update compression on wav2vec2-base's parameter shapes: encode/decode time and wire size per codec.

    python tests/benchmarks/compression.py [--codecs none,fp16,...] [--repeat 1] [--threads N]

The shapes come from ``Wav2Vec2ForSequenceClassification(Wav2Vec2Config())`` built on torch's meta device
(nothing downloaded, no memory for weights): 94.5 M float parameters, 378 MB as dense fp32. The delta is
synthetic: per tensor, Gaussian noise with a per-tensor scale drawn log-uniformly in [1e-5, 1e-3] (what a
few local SGD steps give), a conservative input for the lossless stages (random mantissas do not compress).
For each codec: encode time (``common.compression.codecs.encode``, everything from tensors to bytes), decode time
(``common.compression.codecs.decode``, bytes to dense tensors / SparseTensors, all checks included), add time (adding
the decoded update into a dense float32 buffer as the aggregator does: ``index_add_`` for sparse
entries), wire bytes and raw/wire ratio; then the time of one ``ErrorFeedback.compress`` with the default
codec. Times are the best of --repeat runs on this machine's CPU (--threads 1 gives steadier figures on a
shared machine: torch's OpenMP threads degrade badly when another process holds the cores).

Second section: on the demo task (coordinator and 2 worker processes over the real broker, speaker shards,
kws-tiny; coordinator/local_federation.py), one federation per codec for --versions versions (same work,
same seeds), uncompressed first; the test accuracy of each exported best model and its drop in points
against uncompressed (--accuracy-codecs, default the default codec; '' skips the section).

Prints the tables, then one JSON line for the default codec:
``{"codec": ..., "ratio": ..., "encode_s": ..., "decode_s": ..., "accuracy_drop_pts": ...}`` (ratio: on
wav2vec2-base's shapes; demo_ratio: what the demo's small model achieved). main() runs ``SECTIONS`` in
order and merges what each returns into that line.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Callable

import torch

from common.compression.codecs import DEFAULT_CODEC, decode, encode
from common.compression.error_feedback import ErrorFeedback
from common.compression.sparse import SparseTensor

MB = 1e6
CODECS = [
    "none",
    "fp16",
    "bf16",
    "int8",
    "int8:round=stochastic",
    "topk:0.01",
    "topk:0.01+int8",
    "topk:0.01+int8+zlib",
    "topk:0.01+int8+lzma",
    "topk:0.001+int8+zlib",
]


def wav2vec2_base_shapes() -> dict[str, tuple[int, ...]]:
    """Float parameter name -> shape of ``Wav2Vec2ForSequenceClassification(Wav2Vec2Config())`` (meta device)."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    with torch.device("meta"):
        model = Wav2Vec2ForSequenceClassification(Wav2Vec2Config())
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.is_floating_point()}


def synthetic_delta(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Gaussian delta per tensor, scale log-uniform in [1e-5, 1e-3] (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    delta = {}
    for name, shape in shapes.items():
        scale = 10 ** (-5 + 2 * float(torch.rand((), generator=g)))
        delta[name] = torch.randn(shape, generator=g).mul_(scale)
    return delta


def _best(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeat):
        out = None  # let the previous result go before the next run
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _add_into(buffer: dict[str, torch.Tensor], decoded: dict) -> None:
    for name, value in decoded.items():
        if isinstance(value, SparseTensor):
            buffer[name].view(-1).index_add_(0, value.indices, value.values)
        else:
            buffer[name].add_(value)


def section_codecs(args: argparse.Namespace) -> dict:
    """Encode/decode/add time and wire size per codec; returns the default codec's JSON fields."""
    shapes = wav2vec2_base_shapes()
    delta = synthetic_delta(shapes)
    numel = sum(t.numel() for t in delta.values())
    print(f"wav2vec2-base: {len(delta)} float tensors, {numel / 1e6:.1f} M parameters, "
          f"{4 * numel / MB:.1f} MB as fp32; torch {torch.__version__}, {torch.get_num_threads()} threads")
    buffer = {n: torch.zeros(s) for n, s in shapes.items()}
    print(f"{'codec':<28}{'wire MB':>10}{'ratio':>9}{'encode s':>10}{'decode s':>10}{'add s':>8}")
    results = {}
    for spec in args.codecs:
        enc_s, enc = _best(lambda: encode(delta, spec), args.repeat)
        dec_s, dec = _best(lambda: decode(enc.data, spec), args.repeat)
        add_s, _ = _best(lambda: _add_into(buffer, dec), 1)
        results[spec] = {"codec": enc.codec, "ratio": round(enc.ratio, 1), "encode_s": round(enc_s, 3),
                         "decode_s": round(dec_s, 3), "wire_bytes": enc.wire_bytes}
        print(f"{spec:<28}{enc.wire_bytes / MB:>10.2f}{enc.ratio:>9.1f}{enc_s:>10.3f}{dec_s:>10.3f}{add_s:>8.3f}",
              flush=True)
        enc = dec = None  # free both before the next codec
    ef = ErrorFeedback("bench")
    ef.compress(delta, DEFAULT_CODEC)  # first call copies the delta into the residual
    ef_s, _ = _best(lambda: ef.compress(delta, DEFAULT_CODEC), args.repeat)
    print(f"ErrorFeedback.compress with {DEFAULT_CODEC} (residual add + encode + residual update): {ef_s:.3f} s")
    chosen = results.get(DEFAULT_CODEC)
    if chosen is None:  # default not in --codecs: report the first one
        chosen = next(iter(results.values()))
    return {k: chosen[k] for k in ("codec", "ratio", "encode_s", "decode_s")}


def _federated_accuracy(codec: str, args: argparse.Namespace) -> dict:
    """One demo federation (2 worker processes, speaker shards, the CPU preset) with `codec`, for a fixed
    number of versions; returns the exported best model's test accuracy and the wire/raw bytes it moved."""
    import uuid

    from common.config import load_config
    from coordinator.demo import DEMO_SETTINGS
    from coordinator.experiment import ExperimentConfig
    from coordinator.local_federation import LocalFederation

    name = f"bench-codec-{uuid.uuid4().hex[:6]}"
    settings = {**DEMO_SETTINGS, "experiment.name": name, "experiment.run_dir": f"runs/bench/{name}",
                "data.path": args.data, "tasks.codec": codec, "stop.target_accuracy": 0.0,
                "stop.max_versions": args.versions, "stop.max_wall_s": 0.0}
    cfg = load_config(ExperimentConfig, env={}, overrides=settings)
    fed = LocalFederation(cfg, args.data, [{"shard": "speaker:1/2"}, {"shard": "speaker:2/2"}]).run_to_end(3600)
    summary, versions = fed.summary() or {}, fed.versions()
    wire, raw = sum(e["bytes_received"] for e in versions), sum(e["raw_bytes"] for e in versions)
    return {"test_accuracy": summary.get("test_accuracy"), "best_val": summary.get("best_accuracy"),
            "time_s": versions[-1]["time_s"] if versions else None, "ratio": raw / max(1, wire), "run_dir": str(fed.run_dir)}


def section_accuracy(args: argparse.Namespace) -> dict:
    """Final accuracy per codec on the demo task (same versions, same seeds), against uncompressed."""
    if not args.accuracy_codecs:
        return {}
    from broker import ensure
    from common.data import corpus

    if not ensure.ensure():
        raise SystemExit("no broker for the accuracy section (see `mqfed-broker ensure`)")
    corpus.build(args.data)
    codecs = ["none"] + [c for c in args.accuracy_codecs if c != "none"]
    print(f"\ndemo task: 2 workers (speaker shards), kws-tiny, {args.versions} versions each, test accuracy of the"
          " exported best model")
    print(f"{'codec':<28}{'test acc':>10}{'drop pts':>10}{'ratio':>9}{'time s':>9}")
    rows = {}
    for codec in codecs:
        r = rows[codec] = _federated_accuracy(codec, args)
        drop = 100 * (rows["none"]["test_accuracy"] - r["test_accuracy"])
        r["drop_pts"] = round(drop, 2)
        print(f"{codec:<28}{r['test_accuracy']:>10.4f}{drop:>10.2f}{r['ratio']:>9.1f}{r['time_s']:>9.0f}", flush=True)
    chosen = rows.get(DEFAULT_CODEC, rows[codecs[-1]])
    return {"accuracy_drop_pts": chosen["drop_pts"], "demo_ratio": round(chosen["ratio"], 1),
            "accuracy_uncompressed": rows["none"]["test_accuracy"], "accuracy_codec": chosen["test_accuracy"]}


#: Benchmark sections, run in order; each returns fields merged into the final JSON line.
SECTIONS: list[Callable[[argparse.Namespace], dict]] = [section_codecs, section_accuracy]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codecs", type=lambda s: s.split(","), default=CODECS,
                        help="comma-separated codec specs (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--accuracy-codecs", type=lambda s: [c for c in s.split(",") if c], default=[DEFAULT_CODEC],
                        help="codecs whose final accuracy on the demo task is compared with none ('' skips)")
    parser.add_argument("--versions", type=int, default=80, help="model versions per accuracy run")
    parser.add_argument("--data", default=".cache/mqfed/synth-ks")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary: dict = {}
    for section in SECTIONS:
        summary.update(section(args))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
