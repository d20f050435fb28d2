"""Update compression on wav2vec2-base: encode/decode time, wire size and error per codec, on a synthetic and
a real delta; and what the codec costs in accuracy on the demo federation, over repeated paired runs.

    python tests/benchmarks/compression.py [--codecs none,fp16,...] [--repeat 2] [--threads N]
        [--sections codecs,real,accuracy] [--versions 80] [--accuracy-repeat 3] [--smoke]

Section ``codecs`` (synthetic delta): the shapes come from ``Wav2Vec2ForSequenceClassification(Wav2Vec2Config())``
built on torch's meta device (nothing downloaded, no memory for weights): 94.5 M float parameters, 378 MB
as dense fp32. The delta is synthetic: per tensor, Gaussian noise with a per-tensor scale drawn
log-uniformly in [1e-5, 1e-3], a conservative input for the lossless stages (random mantissas do not
compress). For each codec: encode time (``common.compression.codecs.encode``, everything from tensors to
bytes), decode time (``common.compression.codecs.decode``, bytes to dense tensors / SparseTensors, all checks
included), add time (adding the decoded update into a dense float32 buffer as the aggregator does:
``index_add_`` for sparse entries), wire bytes, raw/wire ratio and the relative L2 error of the decoded delta,
``||decoded - delta|| / ||delta||`` over the whole model; then the time of one ``ErrorFeedback.compress``
with the default codec. Times are the best of --repeat runs on this machine's CPU (--threads 1 gives
steadier figures on a shared machine: torch's OpenMP threads degrade badly when another process holds
the cores).

Section ``real`` (real delta): the ``wav2vec2-base`` preset (common/learning/model.py, random init, seed
--seed, feature encoder trainable, 12 KS labels) trained locally with ``common.learning.training.train``
for --real-steps AdamW steps of --real-batch clips at --real-lr (default 1e-4, the rate TrainConfig
suggests for wav2vec2 fine-tuning) on --real-shard of the corpus (``worker.daemon.load_shards``); the
delta is ``trained - initial`` over the float state entries, exactly what a worker sends. On CPU
wav2vec2-base trains at 1-2 clips/s (1.1 with --threads 1 on a shared 2-core machine), so the default
4 x 4 clips take 10-30 s and the whole section 1-2 min (numpy's generator is seeded too: transformers
draws the SpecAugment masks from it, so the delta is repeatable). The same columns as the synthetic table (``synth err``: the synthetic delta's error, for
comparison), and the share of the delta's energy (sum of squares) held by its top 1 % of entries,
globally and per tensor (per tensor is what ``topk:0.01`` keeps), for the real and the synthetic delta:
a larger share in the real delta means top-k loses less on it than on the synthetic input (the synthetic
input is conservative for top-k), a smaller one that the synthetic input flatters top-k. One delta of a
few steps from random init; a pretrained model's or a longer task's delta may be shaped differently.

Section ``accuracy``: on the demo task (coordinator and 2 worker processes over the real broker, speaker
shards, kws-tiny; coordinator/local_federation.py, which deletes each federation's queues when it ends),
one federation per codec for --versions versions, uncompressed first, repeated --accuracy-repeat times with
the order alternating (none, codec / codec, none / ...: drift on a shared machine hits both alike). Repeat
r uses ``model.seed = local.seed = --seed + r`` for every codec, so the runs of one repeat are paired (same
initial weights, same seed settings; the asynchronous schedule and the task ids, signed with a per-run
secret, still differ, so a pair is not bit-identical). Reported per codec: the median test accuracy of the
exported best model and its range, and the accuracy drop in points against uncompressed as the median of
the paired differences with their range (--accuracy-codecs, default the default codec; '' skips the
section).

--smoke runs everything at toy size (3 versions, 2 repeats, 1 timing run, 3 codecs, 1 real step of 2
clips) unless the flags are given explicitly; --sections runs a subset, in the order of ``SECTIONS``.

Prints the tables, then one JSON line for the default codec:
``{"codec": ..., "ratio": ..., "encode_s": ..., "decode_s": ..., "rel_error": ..., "real_ratio": ...,
"real_rel_error": ..., "accuracy_drop_pts": ..., "accuracy_drop_range": [min, max], "accuracy_repeats": N, ...}``
(ratio: on wav2vec2-base's shapes, synthetic delta; real_*: on the real delta; demo_ratio: what the demo's
small model achieved). main() runs ``SECTIONS`` in order and merges what each returns into that line.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Callable

import numpy as np
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
SMOKE = {"versions": 3, "accuracy_repeat": 2, "repeat": 1, "codecs": ["none", "topk:0.01", DEFAULT_CODEC],
         "real_steps": 1, "real_batch": 2}


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


def rel_error(delta: dict[str, torch.Tensor], decoded: dict) -> float:
    """``||decoded - delta|| / ||delta||`` over all tensors (float64 sums; sparse entries never densified)."""
    err = total = 0.0
    for name, true in delta.items():
        flat, value = true.reshape(-1), decoded[name]
        sq = float(flat.square().sum(dtype=torch.float64))
        total += sq
        if isinstance(value, SparseTensor):  # dropped entries' energy + the kept entries' error
            kept = flat[value.indices]
            err += sq - float(kept.square().sum(dtype=torch.float64))
            err += float((kept - value.values).square().sum(dtype=torch.float64))
        else:
            err += float((value.reshape(-1) - flat).square().sum(dtype=torch.float64))
    return math.sqrt(max(0.0, err) / total) if total else 0.0


def top_energy_share(delta: dict[str, torch.Tensor], fraction: float = 0.01) -> tuple[float, float]:
    """(global, per tensor): the share of ``delta``'s energy (sum of squares) held by its largest-magnitude
    ``fraction`` of entries, taken over the whole delta and tensor by tensor (as ``topk`` selects)."""
    total = sum(float(t.square().sum(dtype=torch.float64)) for t in delta.values())
    flat = torch.cat([t.reshape(-1) for t in delta.values()]).abs_()
    top = torch.topk(flat, max(1, round(fraction * flat.numel())), sorted=False).values
    global_sq = float(top.square().sum(dtype=torch.float64))
    flat = top = None
    per_sq = sum(float(torch.topk(t.reshape(-1).abs(), max(1, round(fraction * t.numel())), sorted=False)
                       .values.square().sum(dtype=torch.float64)) for t in delta.values())
    return (global_sq / total, per_sq / total) if total else (0.0, 0.0)


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


def _measure(delta: dict[str, torch.Tensor], spec: str, repeat: int) -> tuple[dict, dict]:
    """(JSON-ready row, decoded update) for `delta` encoded with `spec`."""
    enc_s, enc = _best(lambda: encode(delta, spec), repeat)
    dec_s, dec = _best(lambda: decode(enc.data, spec), repeat)
    row = {"codec": enc.codec, "ratio": round(enc.ratio, 1), "encode_s": round(enc_s, 3),
           "decode_s": round(dec_s, 3), "wire_bytes": enc.wire_bytes, "rel_error": round(rel_error(delta, dec), 4)}
    return row, dec


def _chosen(results: dict[str, dict]) -> dict:
    """The default codec's row, or the first one when the default was not measured."""
    return results.get(DEFAULT_CODEC) or next(iter(results.values()))


def section_codecs(args: argparse.Namespace) -> dict:
    """Encode/decode/add time, wire size and error per codec on the synthetic delta; returns the default
    codec's JSON fields (and leaves each codec's row and the delta's top-1 % energy shares in
    ``args.synthetic`` for the real-delta section)."""
    shapes = wav2vec2_base_shapes()
    delta = synthetic_delta(shapes)
    numel = sum(t.numel() for t in delta.values())
    print(f"wav2vec2-base, synthetic delta: {len(delta)} float tensors, {numel / 1e6:.1f} M parameters, "
          f"{4 * numel / MB:.1f} MB as fp32; torch {torch.__version__}, {torch.get_num_threads()} threads")
    buffer = {n: torch.zeros(s) for n, s in shapes.items()}
    print(f"{'codec':<28}{'wire MB':>10}{'ratio':>9}{'encode s':>10}{'decode s':>10}{'add s':>8}{'rel err':>9}")
    results = {}
    for spec in args.codecs:
        row, dec = _measure(delta, spec, args.repeat)
        results[spec] = row
        add_s, _ = _best(lambda: _add_into(buffer, dec), 1)
        print(f"{spec:<28}{row['wire_bytes'] / MB:>10.2f}{row['ratio']:>9.1f}{row['encode_s']:>10.3f}"
              f"{row['decode_s']:>10.3f}{add_s:>8.3f}{row['rel_error']:>9.4f}", flush=True)
        dec = None  # free it before the next codec
    buffer = None
    ef = ErrorFeedback("bench")
    ef.compress(delta, DEFAULT_CODEC)  # first call copies the delta into the residual
    ef_s, _ = _best(lambda: ef.compress(delta, DEFAULT_CODEC), args.repeat)
    print(f"ErrorFeedback.compress with {DEFAULT_CODEC} (residual add + encode + residual update): {ef_s:.3f} s")
    ef = None
    args.synthetic = {"rows": results, "top1": top_energy_share(delta)}
    chosen = _chosen(results)
    return {k: chosen[k] for k in ("codec", "ratio", "encode_s", "decode_s", "rel_error")}


def real_delta(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], object]:
    """(delta, TrainResult): the wav2vec2-base preset trained from its random init for a few steps (module doc)."""
    from common.data import corpus
    from common.learning.config import TrainConfig
    from common.learning.model import ModelSpec, build_model, float_state
    from common.learning.training import train
    from worker.daemon import load_shards

    corpus.build(args.data, corpus.BENCHMARK_SPEC)
    clips, _ = load_shards(args.data, args.real_shard)
    np.random.seed(args.seed)  # transformers draws wav2vec2's SpecAugment masks from numpy's global generator
    model = build_model(ModelSpec(name="wav2vec2-base", seed=args.seed))
    base = {n: t.clone() for n, t in float_state(model).items()}
    config = TrainConfig(steps=args.real_steps, batch_size=args.real_batch, learning_rate=args.real_lr,
                         seed=args.seed)
    result = train(model, clips, config, "cpu")
    trained = float_state(model)
    return {n: trained[n] - base[n] for n in base}, result


def section_real(args: argparse.Namespace) -> dict:
    """The codecs on a real wav2vec2-base delta (module doc); returns real_* JSON fields for the default codec."""
    delta, result = real_delta(args)
    numel = sum(t.numel() for t in delta.values())
    nonzero = sum(int(t.count_nonzero()) for t in delta.values())
    zero_tensors = sum(1 for t in delta.values() if not t.any())
    norm = math.sqrt(sum(float(t.square().sum(dtype=torch.float64)) for t in delta.values()))
    print(f"\nwav2vec2-base, real delta: random init (seed {args.seed}), {result.steps} AdamW steps x "
          f"{args.real_batch} clips at lr {args.real_lr:g} on {args.real_shard} of {args.data}: {result.samples}"
          f" clips in {result.seconds:.1f} s ({result.samples_per_s:.2f} clips/s), loss {result.loss:.3f};"
          f" {len(delta)} tensors, {numel / 1e6:.1f} M entries ({100 * nonzero / numel:.1f} % nonzero,"
          f" {zero_tensors} tensors all zero), L2 norm {norm:.4g}", flush=True)
    synthetic = getattr(args, "synthetic", None) or {}
    synth_rows = synthetic.get("rows", {})
    print(f"{'codec':<28}{'wire MB':>10}{'ratio':>9}{'encode s':>10}{'decode s':>10}{'rel err':>9}{'synth err':>11}")
    results = {}
    for spec in args.codecs:
        row, _ = _measure(delta, spec, args.repeat)  # the decoded update goes at once
        results[spec] = row
        synth = synth_rows.get(spec, {}).get("rel_error")
        print(f"{spec:<28}{row['wire_bytes'] / MB:>10.2f}{row['ratio']:>9.1f}{row['encode_s']:>10.3f}"
              f"{row['decode_s']:>10.3f}{row['rel_error']:>9.4f}{'-' if synth is None else f'{synth:.4f}':>11}",
              flush=True)
    real_top = top_energy_share(delta)
    delta = None
    synth_top = synthetic.get("top1") or top_energy_share(synthetic_delta(wav2vec2_base_shapes()))
    print(f"top 1 % of entries hold, of the delta's energy: real {100 * real_top[0]:.1f} % globally,"
          f" {100 * real_top[1]:.1f} % per tensor; synthetic {100 * synth_top[0]:.1f} % globally,"
          f" {100 * synth_top[1]:.1f} % per tensor (per tensor: what topk:0.01 keeps)")
    chosen = _chosen(results)
    return {"real_ratio": chosen["ratio"], "real_rel_error": chosen["rel_error"], "real_encode_s": chosen["encode_s"],
            "real_decode_s": chosen["decode_s"], "real_top1_energy": round(real_top[0], 4),
            "synthetic_top1_energy": round(synth_top[0], 4), "real_top1_energy_per_tensor": round(real_top[1], 4),
            "synthetic_top1_energy_per_tensor": round(synth_top[1], 4), "real_steps": result.steps,
            "real_batch": args.real_batch}


def _federated_accuracy(codec: str, seed: int, args: argparse.Namespace) -> dict:
    """One demo federation (2 worker processes, speaker shards, the CPU preset) with `codec` and seeds `seed`,
    for a fixed number of versions; returns the exported best model's test accuracy and the wire/raw bytes
    it moved. `LocalFederation.run_to_end` stops the processes and deletes the experiment's queues."""
    import uuid

    from common.config import load_config
    from coordinator.demo import DEMO_SETTINGS
    from coordinator.experiment import ExperimentConfig
    from coordinator.local_federation import LocalFederation

    name = f"bench-codec-{uuid.uuid4().hex[:6]}"
    settings = {**DEMO_SETTINGS, "experiment.name": name, "experiment.run_dir": f"runs/bench/{name}",
                "data.path": args.data, "tasks.codec": codec, "stop.target_accuracy": 0.0,
                "stop.max_versions": args.versions, "stop.max_wall_s": 0.0, "model.seed": seed, "local.seed": seed}
    cfg = load_config(ExperimentConfig, env={}, overrides=settings)
    fed = LocalFederation(cfg, args.data, [{"shard": "speaker:1/2"}, {"shard": "speaker:2/2"}]).run_to_end(3600)
    summary, versions = fed.summary() or {}, fed.versions()
    if summary.get("test_accuracy") is None:
        raise SystemExit(f"accuracy run {codec} (seed {seed}): no test accuracy in the run record (logs in {fed.run_dir})")
    wire, raw = sum(e["bytes_received"] for e in versions), sum(e["raw_bytes"] for e in versions)
    return {"test_accuracy": summary["test_accuracy"], "best_val": summary.get("best_accuracy"),
            "time_s": versions[-1]["time_s"] if versions else None, "ratio": raw / max(1, wire), "run_dir": str(fed.run_dir)}


def _med_range(xs: list[float], fmt: str) -> str:
    return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}} to {max(xs):{fmt}})"


def section_accuracy(args: argparse.Namespace) -> dict:
    """Test accuracy per codec on the demo task over --accuracy-repeat paired, order-alternating repeats."""
    if not args.accuracy_codecs or args.accuracy_repeat < 1:
        return {}
    from broker import ensure
    from common.data import corpus

    if not ensure.ensure():
        raise SystemExit("no broker for the accuracy section (see `mqfed-broker ensure`)")
    corpus.build(args.data, corpus.BENCHMARK_SPEC)
    codecs = ["none"] + [c for c in args.accuracy_codecs if c != "none"]
    n = args.accuracy_repeat
    print(f"\ndemo task: 2 workers (speaker shards), kws-tiny, {args.versions} versions per run, {n} repeats per"
          f" codec (order alternating; repeat r: seeds {args.seed} + r), test accuracy of the exported best model")
    print(f"{'repeat':>6}  {'codec':<28}{'seed':>5}{'test acc':>10}{'ratio':>9}{'time s':>9}")
    runs: dict[str, list[dict]] = {c: [] for c in codecs}
    for r in range(n):
        seed = args.seed + r
        for codec in (codecs if r % 2 == 0 else codecs[::-1]):
            x = _federated_accuracy(codec, seed, args)
            runs[codec].append(x)
            time_s = f"{x['time_s']:.0f}" if x["time_s"] is not None else "-"
            print(f"{r + 1:>6}  {codec:<28}{seed:>5}{x['test_accuracy']:>10.4f}{x['ratio']:>9.1f}{time_s:>9}",
                  flush=True)
    base = [x["test_accuracy"] for x in runs["none"]]
    print(f"\nper codec over {n} repeats: median (min to max); drop = uncompressed - codec, paired by repeat")
    print(f"{'codec':<28}{'test accuracy':>28}{'drop, points':>28}{'ratio':>9}")
    rows = {}
    for codec in codecs:
        accs = [x["test_accuracy"] for x in runs[codec]]
        drops = [100 * (b - a) for b, a in zip(base, accs)]
        ratio = statistics.median(x["ratio"] for x in runs[codec])
        rows[codec] = {"accs": accs, "drops": drops, "ratio": ratio}
        print(f"{codec:<28}{_med_range(accs, '.4f'):>28}{_med_range(drops, '.2f'):>28}{ratio:>9.1f}", flush=True)
    chosen = rows.get(DEFAULT_CODEC, rows[codecs[-1]])
    return {"accuracy_drop_pts": round(statistics.median(chosen["drops"]), 2),
            "accuracy_drop_range": [round(min(chosen["drops"]), 2), round(max(chosen["drops"]), 2)],
            "accuracy_repeats": n, "accuracy_versions": args.versions, "demo_ratio": round(chosen["ratio"], 1),
            "accuracy_uncompressed": round(statistics.median(base), 4),
            "accuracy_uncompressed_range": [min(base), max(base)],
            "accuracy_codec": round(statistics.median(chosen["accs"]), 4),
            "accuracy_codec_range": [min(chosen["accs"]), max(chosen["accs"])]}


#: Benchmark sections, run in order; each returns fields merged into the final JSON line. --sections names
#: them without the ``section_`` prefix.
SECTIONS: list[Callable[[argparse.Namespace], dict]] = [section_codecs, section_real, section_accuracy]


def _section_name(section: Callable) -> str:
    return section.__name__.removeprefix("section_")


def main(argv: list[str] | None = None) -> dict:
    names = [_section_name(s) for s in SECTIONS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codecs", type=lambda s: s.split(","), default=CODECS,
                        help="comma-separated codec specs (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per timing; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--sections", type=lambda s: [x for x in s.split(",") if x], default=names,
                        help=f"sections to run, comma-separated, from {','.join(names)} (default: all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="real delta: model init and training seed; accuracy: repeat r uses seed + r")
    parser.add_argument("--real-steps", type=int, default=4, help="real delta: local AdamW steps")
    parser.add_argument("--real-batch", type=int, default=4, help="real delta: clips per step")
    parser.add_argument("--real-lr", type=float, default=1e-4, help="real delta: learning rate")
    parser.add_argument("--real-shard", default="speaker:1/2", help="real delta: the training clips' shard")
    parser.add_argument("--accuracy-codecs", type=lambda s: [c for c in s.split(",") if c], default=[DEFAULT_CODEC],
                        help="codecs whose final accuracy on the demo task is compared with none ('' skips)")
    parser.add_argument("--versions", type=int, default=80, help="model versions per accuracy run")
    parser.add_argument("--accuracy-repeat", type=int, default=3,
                        help="accuracy runs per codec, paired with an uncompressed run each, order alternating")
    parser.add_argument("--smoke", action="store_true",
                        help=f"toy sizes for a quick check ({SMOKE}); explicit flags still win")
    parser.add_argument("--data", default=".cache/mqfed/synth-ks-300")  # corpus.BENCHMARK_DIR
    args = parser.parse_args(argv)
    if args.smoke:  # parse again with the smoke defaults underneath the flags given
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in names]
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)} (known: {', '.join(names)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.synthetic = {}
    summary: dict = {}
    for section in SECTIONS:
        if _section_name(section) in args.sections:
            summary.update(section(args))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
