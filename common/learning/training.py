"""Local training and evaluation of a KS classifier: what a worker runs per task and the coordinator
runs for central evaluation. No broker, no disk.

`train(model, clips, config, device)` trains `model` in place with AdamW (or SGD), linear warm-up and an
optional linear or cosine decay, gradient clipping, optional label smoothing, a random time shift and the
optional augmentations of `augment` (speed, gain, noise, time masks; off by default); on CUDA under bf16
autocast. On CPU it is repeatable: the same seed, data and config give
the same weights. `evaluate` gives accuracy, loss and per-class accuracy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from common.data.audio import SAMPLE_RATE, normalize
from common.data.dataset import DataError
from common.data.labels import KS_LABELS
from common.errors import MqfedError
from common.learning.config import TrainConfig


class TrainingDiverged(MqfedError, FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class Clips:
    """A training or evaluation set in memory: audio (N, 16000) float32 and labels (N,) int64."""

    audio: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.audio.dim() != 2 or self.labels.dim() != 1 or self.audio.shape[0] != self.labels.shape[0]:
            raise DataError(f"clips: audio {tuple(self.audio.shape)} and labels {tuple(self.labels.shape)} disagree")

    @classmethod
    def from_arrays(cls, audio: np.ndarray, labels: np.ndarray) -> "Clips":
        return cls(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)),
                   torch.from_numpy(np.asarray(labels, dtype=np.int64)))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the steps
    samples: int  # clips seen (with repeats)
    seconds: float
    steps: int
    # the optimizer's state after the last step (`optimizer.state_dict()`, tensors on the training device),
    # for the next `train` of the same model and parameters to go on from
    optimizer_state: dict | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float
    samples: int
    per_class: dict[str, float]  # accuracy per label (NaN where the label has no clips)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """The learning-rate multiplier at 0-based `step` of `total`: linear warm-up from 1/warmup to 1, then
    1 (constant) or a linear/cosine decay whose last step gets 1/(decay steps + 1) or less: near 0, never
    exactly 0 (a one-step task still moves)."""
    warmup = config.warmup_steps if config.schedule == "constant" else min(config.warmup_steps, total // 2)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = (step - warmup + 1) / (total - warmup + 1)  # in (0, 1): 1/(n+1) ... n/(n+1)
    if config.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _shift(batch: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Roll each clip by its own random offset in [-max_shift, max_shift] (zeros come in; vectorised)."""
    if max_shift <= 0:
        return batch
    n, length = batch.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 1), generator=gen)
    src = torch.arange(length).unsqueeze(0) - shifts
    valid = (src >= 0) & (src < length)
    return torch.where(valid, batch.gather(1, src.clamp(0, length - 1)), torch.zeros((), dtype=batch.dtype))


def _speed(batch: torch.Tensor, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """Resample each clip by its own factor f in [low, high] (linear interpolation: f > 1 is faster and higher),
    then centre-crop or zero-pad the content (length/f samples) back to the clip length (vectorised)."""
    n, length = batch.shape
    factor = low + (high - low) * torch.rand((n, 1), generator=gen, dtype=torch.float64)
    content = torch.floor(length / factor)  # samples the resampled clip has
    offset = torch.div(length - content, 2, rounding_mode="floor")  # < 0: centre crop
    src = (torch.arange(length, dtype=torch.float64).unsqueeze(0) - offset) * factor  # where output j reads
    valid = (src >= 0) & (src <= length - 1)
    left = src.floor().clamp(0, length - 1).long()
    right = (left + 1).clamp(max=length - 1)
    frac = (src - left).clamp(0, 1).to(batch.dtype)
    out = batch.gather(1, left) * (1 - frac) + batch.gather(1, right) * frac
    return torch.where(valid, out, torch.zeros((), dtype=batch.dtype))


def _gain(batch: torch.Tensor, max_db: float, gen: torch.Generator) -> torch.Tensor:
    """Scale each clip by 10^(g/20), g uniform in [-max_db, max_db] dB, clipped to [-1, 1] like a recording."""
    db = (2 * torch.rand((batch.shape[0], 1), generator=gen) - 1) * max_db
    return (batch * torch.pow(10.0, db / 20)).clamp(-1.0, 1.0)


def _noise(batch: torch.Tensor, low_db: float, high_db: float, gen: torch.Generator) -> torch.Tensor:
    """Add white Gaussian noise to each clip at an SNR drawn uniformly from [low_db, high_db]: the noise is scaled
    to exactly the clip's mean power / 10^(SNR/10) (a silent clip stays silent)."""
    n = batch.shape[0]
    snr_db = low_db + (high_db - low_db) * torch.rand((n, 1), generator=gen)
    noise = torch.randn(batch.shape, generator=gen, dtype=batch.dtype)
    signal_power = batch.double().pow(2).mean(-1, keepdim=True)
    noise_power = noise.double().pow(2).mean(-1, keepdim=True)
    scale = (signal_power / (noise_power * torch.pow(10.0, snr_db.double() / 10))).sqrt()
    return batch + (noise.double() * scale).to(batch.dtype)


EQ_ANCHORS_HZ = (62.5, 125.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0)


def _equalize(batch: torch.Tensor, max_db: float, gen: torch.Generator) -> torch.Tensor:
    """Colour each clip as a random microphone or room would: a gain uniform in [-max_db, max_db] dB at each
    octave of `EQ_ANCHORS_HZ`, linear in log frequency between them (flat beyond), applied zero-phase in the
    frequency domain; the clip's power is kept."""
    n, length = batch.shape
    gains_db = (2 * torch.rand((n, len(EQ_ANCHORS_HZ)), generator=gen) - 1) * max_db
    curve_db = gains_db @ _eq_interpolation(length)  # (n, frequency bins)
    spectrum = torch.fft.rfft(batch, dim=-1) * torch.exp(curve_db * (math.log(10) / 20))
    out = torch.fft.irfft(spectrum, n=length, dim=-1)
    power_in = batch.pow(2).mean(-1, keepdim=True)
    power_out = out.pow(2).mean(-1, keepdim=True)
    return out * (power_in / power_out.clamp_min(1e-30)).sqrt()


@functools.lru_cache(maxsize=4)
def _eq_interpolation(length: int) -> torch.Tensor:
    """(anchors, rfft bins) weights: row k is anchor k's share of each bin's gain (linear in log frequency)."""
    freqs = torch.fft.rfftfreq(length, 1.0 / SAMPLE_RATE, dtype=torch.float64)
    position = torch.log2(freqs.clamp(EQ_ANCHORS_HZ[0], EQ_ANCHORS_HZ[-1]) / EQ_ANCHORS_HZ[0])  # anchor index
    left = position.floor().long().clamp(max=len(EQ_ANCHORS_HZ) - 2)
    frac = position - left
    weights = torch.zeros((len(EQ_ANCHORS_HZ), freqs.numel()), dtype=torch.float64)
    bins = torch.arange(freqs.numel())
    weights[left, bins] = 1 - frac
    weights[left + 1, bins] += frac
    return weights.float()


def _time_mask(batch: torch.Tensor, masks: int, max_width: int, gen: torch.Generator) -> torch.Tensor:
    """Zero `masks` spans per clip, each of a width uniform in [0, max_width] samples at a uniform start
    (SpecAugment's time masking on the waveform; spans may overlap). Vectorised with a difference array."""
    n, length = batch.shape
    width = torch.randint(0, max_width + 1, (n, masks), generator=gen)
    start = (torch.rand((n, masks), generator=gen) * (length - width + 1)).long().clamp(max=length)
    delta = torch.zeros((n, length + 1), dtype=torch.int32)
    delta.scatter_add_(1, start, torch.ones_like(start, dtype=torch.int32))
    delta.scatter_add_(1, (start + width).clamp(max=length), -torch.ones_like(start, dtype=torch.int32))
    covered = delta.cumsum(1)[:, :length] > 0
    return batch.masked_fill(covered, 0.0)


def augment(batch: torch.Tensor, config: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """`config`'s augmentation of a (N, samples) batch of raw clips, before the time shift and normalisation:
    speed perturbation, equalisation, gain, additive noise, time masking, each only when on (what is off draws nothing from
    `gen`, so with all off training is what it was without them)."""
    if config.speed is not None:
        batch = _speed(batch, *config.speed, gen)
    if config.eq_db:
        batch = _equalize(batch, config.eq_db, gen)
    if config.gain_db:
        batch = _gain(batch, config.gain_db, gen)
    if config.noise_snr_db is not None:
        batch = _noise(batch, *config.noise_snr_db, gen)
    if config.time_masks and config.time_mask_ms:
        batch = _time_mask(batch, config.time_masks, int(config.time_mask_ms * SAMPLE_RATE / 1000), gen)
    return batch


def train(model: torch.nn.Module, clips: Clips, config: TrainConfig, device: str | torch.device = "cpu",
          on_step: Callable[[int, int, float], None] | None = None,
          optimizer_state: dict | None = None) -> TrainResult:
    """Train `model` in place on `clips`; returns loss, samples, seconds and steps.

    on_step(step, total, loss) is called after each step (progress bars, heartbeats). optimizer_state: an
    earlier result's `optimizer_state` for the same model (same trainable parameters, same optimizer) to go on
    from, moments and step counts included, instead of a fresh optimizer; the learning rate is still this
    config's schedule.
    Raises DataError when `clips` is empty, TrainingDiverged when the loss becomes non-finite.
    """
    if len(clips) == 0:
        raise DataError("cannot train on an empty shard")
    device = torch.device(device)
    model.to(device).train()
    total = config.total_steps(len(clips))
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if config.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=config.learning_rate, momentum=0.9, weight_decay=config.weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
        for group in opt.param_groups:
            group["weight_decay"] = config.weight_decay
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    max_shift = int(config.time_shift_s * SAMPLE_RATE)
    order = torch.randperm(len(clips), generator=gen)
    pos, loss_sum, samples = 0, 0.0, 0
    start = time.perf_counter()
    for step in range(total):
        if pos + config.batch_size > len(order) and pos > 0:
            order, pos = torch.randperm(len(clips), generator=gen), 0
        idx = order[pos:pos + config.batch_size]
        pos += config.batch_size
        x = normalize(_shift(augment(clips.audio[idx], config, gen), max_shift, gen)).to(device, non_blocking=True)
        y = clips.labels[idx].to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = config.learning_rate * _lr_factor(step, total, config)
        with _autocast(device):
            logits = model(input_values=x).logits
        loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()
        loss_value = float(loss.detach())
        loss_sum += loss_value
        samples += int(idx.numel())
        if on_step is not None:
            on_step(step + 1, total, loss_value)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return TrainResult(loss_sum / total, samples, time.perf_counter() - start, total, opt.state_dict())


@torch.no_grad()
def evaluate(model: torch.nn.Module, clips: Clips, device: str | torch.device = "cpu",
             batch_size: int = 128, on_batch: Callable[[int, int], None] | None = None) -> EvalResult:
    """Accuracy, mean loss and per-class accuracy of `model` on `clips`. Raises DataError when empty.

    on_batch(clips done, clips in all) is called after each batch (a worker checks its task's deadline);
    what it raises stops the evaluation."""
    if len(clips) == 0:
        raise DataError("cannot evaluate on an empty split")
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    preds, loss_sum = [], 0.0
    try:
        for start in range(0, len(clips), batch_size):
            x = normalize(clips.audio[start:start + batch_size]).to(device)
            y = clips.labels[start:start + batch_size].to(device)
            with _autocast(device):
                logits = model(input_values=x).logits.float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(-1).cpu())
            if on_batch is not None:
                on_batch(min(start + batch_size, len(clips)), len(clips))
    finally:
        model.train(was_training)
    pred = torch.cat(preds)
    correct = pred == clips.labels
    n_labels = len(KS_LABELS)
    totals = torch.bincount(clips.labels, minlength=n_labels).double()
    hits = torch.bincount(clips.labels[correct], minlength=n_labels).double()
    per_class = {name: (float(h / t) if t else float("nan")) for name, h, t in zip(KS_LABELS, hits, totals)}
    return EvalResult(float(correct.double().mean()), loss_sum / len(clips), len(clips), per_class)
