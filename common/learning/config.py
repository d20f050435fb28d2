"""Local training settings: what a train task asks a worker to do. No torch: the wire format carries them."""
from __future__ import annotations

import dataclasses
import math

from common.config import rule, validate
from common.errors import InvalidValue

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
SPEED_RANGE = (0.5, 2.0)  # the bounds of TrainConfig.speed
SNR_RANGE = (-20.0, 100.0)  # the bounds of TrainConfig.noise_snr_db, in dB


def decay_factor(schedule: str, done: int, horizon: int, floor: float) -> float:
    """The fraction of a base learning rate after `done` of `horizon` units (versions): 1 at 0, falling
    (`linear` or `cosine`) to `floor` at `horizon` and `floor` after it; `constant`: always 1."""
    if schedule not in SCHEDULES:
        raise InvalidValue(f"decay schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if schedule == "constant":
        return 1.0
    t = min(max(done, 0), horizon) / horizon
    shape = 1.0 - t if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return floor + (1.0 - floor) * shape


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Local training hyper-parameters (validated at construction; errors name the field).

    steps: optimizer steps; when 0, `epochs` passes over the data decide (steps = ceil(epochs * N / batch)).
    batch_size, learning_rate, weight_decay: as usual (the default learning rate suits `kws-tiny` tasks of
      20-160 AdamW steps; fine-tuning a pretrained wav2vec2 wants ~1e-4). warmup_steps: linear warm-up from 0.
    schedule: `constant` after warm-up, or a `linear` or `cosine` decay to near 0 at the last step (for a
      decaying schedule the warm-up is capped at half the steps, so the decay always happens).
    max_grad_norm: clip the global gradient norm (None: no clipping).
    optimizer: `adamw` or `sgd` (momentum 0.9).
    time_shift_s: augmentation, roll each clip by up to this many seconds either way (0: off).
    label_smoothing: cross-entropy label smoothing (0: off; 0.1 helped kws-tiny on unheard voices).
    seed: batch order, augmentation and dropout.
    keep_optimizer: a worker goes on from the optimizer state (AdamW moments and step counts, SGD momentum) its
      previous training of the same run and model left, instead of a fresh optimizer per task; held in the
      trainer's memory (two copies of the trainable parameters for AdamW), not across a restart
      (docs/augmentation.md, "The demo's settings").

    Augmentation of each training batch (docs/augmentation.md), applied in this order before the time shift and
    the per-clip normalisation; each is off by default, and with all off training is bit-identical to before:
    speed: speed perturbation, [low, high] factors (within [0.5, 2]): each clip is resampled by a factor drawn
      uniformly from the range (pitch and tempo together, linear interpolation; 1.1 is 10 % faster), then
      centre-cropped or zero-padded back to 1 s (None: off).
    eq_db: random equalisation, each clip coloured by a gain uniform in [-eq_db, eq_db] dB at each octave from
      62.5 Hz to 8 kHz, linear in log frequency between them, its power kept (0: off; common.learning.training).
    gain_db: random gain, each clip scaled by a factor drawn uniformly from [-gain_db, +gain_db] dB and clipped
      to [-1, 1] as a recording would saturate (0: off; the per-clip normalisation undoes the scale itself, so
      what remains is the clipping of loud clips).
    noise_snr_db: additive white Gaussian noise at a signal-to-noise ratio drawn uniformly from [low, high] dB
      per clip (within [-20, 100]; a silent clip stays silent) (None: off).
    time_masks, time_mask_ms: time masking (SpecAugment on the waveform): `time_masks` spans per clip, each of a
      width drawn uniformly from [0, time_mask_ms] milliseconds at a uniform position, set to zero (0: off).
    """

    steps: int = rule(0, ge=0)
    epochs: float = rule(0.0, ge=0)
    batch_size: int = rule(32, ge=1)
    learning_rate: float = rule(2e-3, gt=0)
    warmup_steps: int = rule(0, ge=0)
    schedule: str = rule("constant", choices=SCHEDULES)
    weight_decay: float = rule(0.0, ge=0)
    max_grad_norm: float | None = rule(1.0, gt=0)
    optimizer: str = rule("adamw", choices=OPTIMIZERS)
    time_shift_s: float = rule(0.1, ge=0)
    seed: int = rule(0, ge=0)
    label_smoothing: float = rule(0.1, ge=0, lt=1)
    keep_optimizer: bool = False
    speed: tuple[float, float] | None = None
    gain_db: float = rule(0.0, ge=0, le=40)
    eq_db: float = rule(0.0, ge=0, le=24)
    noise_snr_db: tuple[float, float] | None = None
    time_masks: int = rule(0, ge=0, le=32)
    time_mask_ms: float = rule(0.0, ge=0, le=1000)

    def __post_init__(self) -> None:
        validate(self)
        for name, low, high in (("speed", SPEED_RANGE[0], SPEED_RANGE[1]), ("noise_snr_db", SNR_RANGE[0], SNR_RANGE[1])):
            value = getattr(self, name)
            if value is None:
                continue
            pair = tuple(float(v) for v in value)  # a TOML array or a msgpack list arrives as a list
            if not (len(pair) == 2 and all(math.isfinite(v) for v in pair) and low <= pair[0] <= pair[1] <= high):
                raise InvalidValue(f"TrainConfig.{name} must be [low, high] with {low} <= low <= high <= {high}, "
                                   f"or None, got {value!r}")
            object.__setattr__(self, name, pair)
        if self.steps == 0 and self.epochs == 0:
            raise InvalidValue("TrainConfig: set steps or epochs (both are 0)")

    @property
    def augments(self) -> bool:
        """Whether any augmentation other than the time shift is on."""
        return bool(self.speed or self.eq_db or self.gain_db or self.noise_snr_db or (self.time_masks and self.time_mask_ms))

    def total_steps(self, n: int) -> int:
        return self.steps or max(1, math.ceil(self.epochs * n / self.batch_size))
