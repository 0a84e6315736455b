"""Progressive distillation schedule: temperature and ground-truth / distillation weights.

The schedule is a pure function of the optimizer step, so a resumed run (which restores the step
counter) gets exactly the values the uninterrupted run would have had, with no state to save.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict

__all__ = ["DISTILLATION_DECAYS", "DistillationSchedule", "check_distillation_values"]

DISTILLATION_DECAYS = ("linear", "cosine")


def check_distillation_values(
    *, distill_warmup_epochs: float, max_temperature: float, min_temperature: float,
    alpha_start: float, alpha_end: float, beta_start: float, beta_end: float,
) -> None:
    """Range checks of the schedule's values (also applied to the training arguments of the same names)."""
    if distill_warmup_epochs < 0:
        raise ValueError(f"distill_warmup_epochs must be >= 0, got {distill_warmup_epochs}")
    if not 0 < min_temperature <= max_temperature:
        raise ValueError(f"need 0 < min_temperature <= max_temperature, got {min_temperature} and {max_temperature}")
    for name, value in (("alpha_start", alpha_start), ("alpha_end", alpha_end), ("beta_start", beta_start),
                        ("beta_end", beta_end)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class DistillationSchedule:
    """Temperature ``T``, ground-truth weight ``alpha`` and distillation weight ``beta`` per step.

    Shape: for the first ``warmup_steps = round(distill_warmup_epochs * steps_per_epoch)`` optimizer
    steps everything is held at its start value (``T = max_temperature``, ``alpha_start``,
    ``beta_start``). From there to the last step (``total_steps - 1``) the values move to their end
    values (``min_temperature``, ``alpha_end``, ``beta_end``), linearly or along a half cosine, and are
    reached exactly at the last step. Defaults follow the original guide: T 4.0 held for 5 epochs then
    down to 1.0; alpha / beta from 0.9 / 0.1 to 0.5 / 0.5.

    ``step`` is the number of optimizer updates already done (``TrainerState.global_step``), so the
    first update uses ``step = 0`` and the last ``step = total_steps - 1``. Gradient-accumulation
    micro-batches of one update share its step. Steps past the end keep the end values.

    Attributes:
        total_steps: number of optimizer updates of the whole run (> 0).
        steps_per_epoch: optimizer updates per epoch (> 0), to convert the warm-up from epochs.
        distill_warmup_epochs: epochs (may be fractional) at the start values.
        max_temperature, min_temperature: start and end temperature (0 < min <= max).
        alpha_start, alpha_end, beta_start, beta_end: start and end weights (>= 0).
        decay: ``"linear"`` or ``"cosine"``.
    """

    total_steps: int
    steps_per_epoch: int
    distill_warmup_epochs: float = 5.0
    max_temperature: float = 4.0
    min_temperature: float = 1.0
    alpha_start: float = 0.9
    alpha_end: float = 0.5
    beta_start: float = 0.1
    beta_end: float = 0.5
    decay: str = "linear"

    def __post_init__(self):
        if int(self.total_steps) <= 0:
            raise ValueError(f"total_steps must be > 0, got {self.total_steps}")
        if int(self.steps_per_epoch) <= 0:
            raise ValueError(f"steps_per_epoch must be > 0, got {self.steps_per_epoch}")
        check_distillation_values(
            distill_warmup_epochs=self.distill_warmup_epochs, max_temperature=self.max_temperature,
            min_temperature=self.min_temperature, alpha_start=self.alpha_start, alpha_end=self.alpha_end,
            beta_start=self.beta_start, beta_end=self.beta_end,
        )
        if self.decay not in DISTILLATION_DECAYS:
            raise ValueError(f"decay must be one of {DISTILLATION_DECAYS}, got {self.decay!r}")

    @classmethod
    def from_training_arguments(cls, args, *, total_steps: int, steps_per_epoch: int) -> "DistillationSchedule":
        """The schedule set by ``EfficientSamTrainingArguments`` for a run of the given length."""
        return cls(
            total_steps=total_steps, steps_per_epoch=steps_per_epoch, distill_warmup_epochs=args.distill_warmup_epochs,
            max_temperature=args.max_temperature, min_temperature=args.min_temperature, alpha_start=args.alpha_start,
            alpha_end=args.alpha_end, beta_start=args.beta_start, beta_end=args.beta_end, decay=args.distill_decay,
        )

    @property
    def warmup_steps(self) -> int:
        """Optimizer steps held at the start values."""
        return int(round(self.distill_warmup_epochs * self.steps_per_epoch))

    def progress(self, step: int) -> float:
        """Fraction in [0, 1] of the way from the start values to the end values at ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        warmup = self.warmup_steps
        if step < warmup:
            return 0.0
        span = self.total_steps - 1 - warmup
        if span <= 0:
            return 1.0
        fraction = min(1.0, (step - warmup) / span)
        if self.decay == "cosine":
            fraction = 0.5 * (1.0 - math.cos(math.pi * fraction))
        return fraction

    def state_at(self, step: int) -> Dict[str, float]:
        """``{"temperature": T, "alpha": alpha, "beta": beta}`` for optimizer step ``step``."""
        f = self.progress(step)

        def lerp(start: float, end: float) -> float:
            return start + (end - start) * f

        return {
            "temperature": lerp(self.max_temperature, self.min_temperature),
            "alpha": lerp(self.alpha_start, self.alpha_end),
            "beta": lerp(self.beta_start, self.beta_end),
        }

    __call__ = state_at

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)
