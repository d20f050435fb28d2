"""Update compression on wav2vec2-base's parameter shapes: encode/decode time and wire size per codec.

    python tests/benchmarks/compression.py [--codecs none,fp16,...] [--repeat 1] [--threads N]

The shapes come from ``Wav2Vec2ForSequenceClassification(Wav2Vec2Config())`` built on torch's meta device
(nothing downloaded, no memory for weights): 94.5 M float parameters, 378 MB as dense fp32. The delta is
synthetic: per tensor, Gaussian noise with a per-tensor scale drawn log-uniformly in [1e-5, 1e-3] (what a
few local SGD steps give), a conservative input for the lossless stages (random mantissas do not compress).
For each codec: encode time (``common.codecs.encode``, everything from tensors to bytes), decode time
(``common.codecs.decode``, bytes to dense tensors / SparseTensors, all checks included), add time (adding
the decoded update into a dense float32 buffer as the aggregator does: ``index_add_`` for sparse
entries), wire bytes and raw/wire ratio; then the time of one ``ErrorFeedback.compress`` with the default
codec. Times are the best of --repeat runs on this machine's CPU (--threads 1 gives steadier figures on a
shared machine: torch's OpenMP threads degrade badly when another process holds the cores).

Prints a table, then one JSON line for the default codec:
``{"codec": ..., "ratio": ..., "encode_s": ..., "decode_s": ...}``. main() runs its sections in order and
merges what each returns into that line, so further sections (e.g. final accuracy per codec on the demo
federation, adding ``accuracy_drop_pts``) append to ``SECTIONS``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from common.codecs import DEFAULT_CODEC, encode, decode  # noqa: E402
from common.error_feedback import ErrorFeedback  # noqa: E402
from common.sparse import SparseTensor  # noqa: E402

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
        del enc, dec
    ef = ErrorFeedback("bench")
    ef.compress(delta, DEFAULT_CODEC)  # first call copies the delta into the residual
    ef_s, _ = _best(lambda: ef.compress(delta, DEFAULT_CODEC), args.repeat)
    print(f"ErrorFeedback.compress with {DEFAULT_CODEC} (residual add + encode + residual update): {ef_s:.3f} s")
    chosen = results.get(DEFAULT_CODEC)
    if chosen is None:  # default not in --codecs: report the first one
        chosen = next(iter(results.values()))
    return {k: chosen[k] for k in ("codec", "ratio", "encode_s", "decode_s")}


#: Benchmark sections, run in order; each returns fields merged into the final JSON line.
SECTIONS: list[Callable[[argparse.Namespace], dict]] = [section_codecs]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codecs", type=lambda s: s.split(","), default=CODECS,
                        help="comma-separated codec specs (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
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
