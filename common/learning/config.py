"""Local training settings: what a train task asks a worker to do. No torch: the wire format carries them."""
from __future__ import annotations

import dataclasses
import math

from common.config import rule, validate
from common.errors import InvalidValue

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")


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

    def __post_init__(self) -> None:
        validate(self)
        if self.steps == 0 and self.epochs == 0:
            raise InvalidValue("TrainConfig: set steps or epochs (both are 0)")

    def total_steps(self, n: int) -> int:
        return self.steps or max(1, math.ceil(self.epochs * n / self.batch_size))
