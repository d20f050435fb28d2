"""A worker's local-training throughput and peak memory on one device, beside a bare training loop.

    python tests/benchmarks/worker_throughput.py [--model wav2vec2-base] [--device cuda:0|cpu]
                                                 [--batch-size 32] [--steps 20] [--warmup 3]

mqfed: `common.learning.training.train` (what a worker trainer runs per task: per-clip normalisation, time-shift
augmentation, AdamW, gradient clipping, bf16 autocast on CUDA), on random 1 s clips. Baseline, in the same
run on the same model and batches: a bare fp32 loop (forward, cross-entropy, backward, AdamW step, nothing
else). On CUDA the ratio is what bf16 autocast and the extras give together; on the CPU (no autocast) it is
the cost of the extras. The model is a preset (`wav2vec2-base`: the base architecture, 94.4 M parameters,
random init, nothing downloaded; `kws-tiny`) or anything `common.learning.model.build_model` takes. `--warmup` steps
of each loop are not timed (CUDA kernels, allocator). Peak memory: `torch.cuda.max_memory_allocated` on
CUDA, the process's peak RSS on the CPU (for mqfed's loop only: it ran first, and RSS peaks never go down). Prints a table, then one JSON line
{"model", "device", "samples_per_s", "baseline_samples_per_s", "ratio", "peak_mem_mb", ...}.
"""
from __future__ import annotations

import argparse
import json
import resource
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="wav2vec2-base")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on CUDA, 4 on the CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per loop (default: 20 on CUDA, 3 on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 on CUDA, 1 on the CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size if args.batch_size is not None else (32 if cuda else 4)
    steps = args.steps if args.steps is not None else (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    for flag, value in (("--batch-size", batch), ("--steps", steps), ("--warmup", warmup)):
        if value < 1:  # ours() starts its clock at the end of step `warmup`
            p.error(f"{flag} must be >= 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n = batch * 4
    clips = Clips(torch.randn(n, SAMPLE_RATE, generator=gen) * 0.1, torch.randint(0, 12, (n,), generator=gen))
    spec = ModelSpec(name=args.model)

    model = build_model(spec)
    params = parameter_count(model)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ours_sps = ours(model, clips, batch, steps, warmup, device)
    ours_peak = _peak_mb(device)
    del model
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base_sps = bare_loop(build_model(spec), clips, batch, steps, warmup, device)
    base_peak = _peak_mb(device) if cuda else None  # RSS peaks never go down: no separate figure on the CPU

    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    precision = "bf16 autocast" if cuda else "fp32"
    print(f"{args.model} ({params / 1e6:.1f} M parameters), batch {batch} x 1 s, {steps} timed steps on {name}")
    print(f"{'loop':<34}{'samples/s':>11}{'peak MB':>10}")
    print(f"{'mqfed train() (' + precision + ')':<34}{ours_sps:>11.1f}{ours_peak:>10.0f}")
    print(f"{'bare fp32 loop':<34}{base_sps:>11.1f}{'' if base_peak is None else f'{base_peak:.0f}':>10}")
    summary = {"model": args.model, "device": name, "batch_size": batch, "params": params,
               "samples_per_s": round(ours_sps, 2), "baseline_samples_per_s": round(base_sps, 2),
               "ratio": round(ours_sps / base_sps, 3), "peak_mem_mb": round(ours_peak),
               "baseline_peak_mem_mb": None if base_peak is None else round(base_peak), "precision": precision}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
