"""A worker's local-training throughput and peak memory on one device, beside a bare training loop.

    python tests/benchmarks/worker_throughput.py [--model wav2vec2-base] [--device cuda:0|cpu]
                                                 [--batch-size 32] [--steps 20] [--warmup 3] [--repeats 3]

mqfed: `common.learning.training.train` (what a worker trainer runs per task: per-clip normalisation, time-shift
augmentation, AdamW, gradient clipping, bf16 autocast on CUDA), on random 1 s clips. Baseline, in the same
run on the same model and batches: a bare fp32 loop (forward, cross-entropy, backward, AdamW step, nothing
else) on the model as `build_model` makes it. On CUDA the ratio is what bf16 autocast and the extras give
together; on the CPU (no autocast) it is the cost of the extras. A third row is the bare loop on the model as
Hugging Face makes it, whose feature encoder also computes the gradient of the input waveform
(`build_model` turns that off: common/learning/model.py); `hf_default_ratio` is the bare loop's speed over
it. The loops run `--repeats` times, interleaved; each figure is the median, with the range. The model is a
preset (`wav2vec2-base`: the base architecture, 94.4 M parameters, random init, nothing downloaded; `kws-tiny`)
or anything `common.learning.model.build_model` takes. `--warmup` steps
of each loop are not timed (CUDA kernels, allocator). Peak memory: `torch.cuda.max_memory_allocated` on
CUDA, the process's peak RSS on the CPU (for mqfed's loop only: it ran first, and RSS peaks never go down). Prints a table, then one JSON line
{"model", "device", "samples_per_s", "baseline_samples_per_s", "ratio", "hf_default_ratio", "peak_mem_mb", ...}.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from common.data.audio import SAMPLE_RATE
from common.learning.model import ModelSpec, build_model, parameter_count
from common.learning.training import Clips, TrainConfig, train


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(model: torch.nn.Module, clips: Clips, batch: int, steps: int, warmup: int,
              device: torch.device) -> float:
    """Samples/s of a plain fp32 loop over the same clips (the first `warmup` steps untimed)."""
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        i = (step * batch) % (len(clips) - batch + 1)
        x = clips.audio[i:i + batch].to(device)
        y = clips.labels[i:i + batch].to(device)
        loss = F.cross_entropy(model(input_values=x).logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def ours(model: torch.nn.Module, clips: Clips, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    """Samples/s of `common.learning.training.train`, timed from the end of step `warmup` (on_step) to the end."""
    marks: dict[int, float] = {}

    def on_step(step: int, _total: int, _loss: float) -> None:
        if step == warmup:
            _sync(device)
            marks["start"] = time.perf_counter()

    train(model, clips, TrainConfig(steps=warmup + steps, batch_size=batch, learning_rate=1e-4), device,
          on_step=on_step)
    _sync(device)
    return steps * batch / (time.perf_counter() - marks["start"])


def _hf_default(model: torch.nn.Module) -> torch.nn.Module:
    """`model` as Hugging Face builds it: the feature encoder marks the waveform requires_grad in training."""
    model.wav2vec2.feature_extractor._requires_grad = any(
        p.requires_grad for p in model.wav2vec2.feature_extractor.parameters())
    return model


def _median_range(values: list[float]) -> tuple[float, float, float]:
    values = sorted(values)
    return statistics.median(values), values[0], values[-1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="wav2vec2-base")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on CUDA, 4 on the CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per loop (default: 20 on CUDA, 3 on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on CUDA, 1 on the CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each loop, interleaved (median and range)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size if args.batch_size is not None else (32 if cuda else 4)
    steps = args.steps if args.steps is not None else (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    for flag, value in (("--batch-size", batch), ("--steps", steps), ("--warmup", warmup),
                        ("--repeats", args.repeats)):
        if value < 1:  # ours() starts its clock at the end of step `warmup`
            p.error(f"{flag} must be >= 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n = batch * 4
    clips = Clips(torch.randn(n, SAMPLE_RATE, generator=gen) * 0.1, torch.randint(0, 12, (n,), generator=gen))
    spec = ModelSpec(name=args.model)

    params = parameter_count(build_model(spec))
    runs: dict[str, list[float]] = {"ours": [], "bare": [], "hf_default": []}
    ours_peak, base_peak = 0.0, None
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        runs["ours"].append(ours(build_model(spec), clips, batch, steps, warmup, device))
        ours_peak = max(ours_peak, _peak_mb(device))
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        runs["bare"].append(bare_loop(build_model(spec), clips, batch, steps, warmup, device))
        if cuda:  # RSS peaks never go down: no separate figure on the CPU
            base_peak = max(base_peak or 0.0, _peak_mb(device))
        runs["hf_default"].append(bare_loop(_hf_default(build_model(spec)), clips, batch, steps, warmup, device))
    ours_sps, base_sps, hf_sps = (_median_range(runs[k]) for k in ("ours", "bare", "hf_default"))

    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    precision = "bf16 autocast" if cuda else "fp32"
    print(f"{args.model} ({params / 1e6:.1f} M parameters), batch {batch} x 1 s, {steps} timed steps on {name}, "
          f"{args.repeats} repeats (median, range)")
    print(f"{'loop':<50}{'samples/s':>24}{'peak MB':>10}")
    for label, (med, low, high), peak in (
            (f"mqfed train() ({precision})", ours_sps, f"{ours_peak:.0f}"),
            ("bare fp32 loop", base_sps, "" if base_peak is None else f"{base_peak:.0f}"),
            ("bare fp32 loop, Hugging Face's waveform gradient", hf_sps, "")):
        print(f"{label:<50}{f'{med:.1f} ({low:.1f}-{high:.1f})':>24}{peak:>10}")
    summary = {"model": args.model, "device": name, "batch_size": batch, "params": params, "repeats": args.repeats,
               "samples_per_s": round(ours_sps[0], 2), "baseline_samples_per_s": round(base_sps[0], 2),
               "ratio": round(ours_sps[0] / base_sps[0], 3),
               "hf_default_samples_per_s": round(hf_sps[0], 2), "hf_default_ratio": round(base_sps[0] / hf_sps[0], 3),
               "samples_per_s_range": [round(v, 2) for v in ours_sps[1:]],
               "baseline_range": [round(v, 2) for v in base_sps[1:]],
               "hf_default_range": [round(v, 2) for v in hf_sps[1:]], "peak_mem_mb": round(ours_peak),
               "baseline_peak_mem_mb": None if base_peak is None else round(base_peak), "precision": precision}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
