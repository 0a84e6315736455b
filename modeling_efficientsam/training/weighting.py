"""Loss weighting strategies: ``fixed``, ``dwa`` (Dynamic Weight Average) and ``uncertainty``.

All three are ``nn.Module`` s with one interface, so the trainer handles them alike:

- ``forward(losses, scales=None, regularizer_scale=1.0) -> total``: combine a dict of (unweighted)
  scalar losses with the current weights, ``sum_i scale_i * w_i * L_i`` (plus the uncertainty
  regularizer). Only the configured names are used; a missing name is an error, extra keys are
  ignored. ``scales`` gives one extra factor per loss (the trainer's alpha for ground-truth terms and
  beta for distillation terms); ``regularizer_scale`` scales the regularizer (the trainer's share of
  the optimizer step held by one micro-batch, so that it counts once per step). This is the one
  place where the training loss is combined.
- ``update(losses)``: call once per optimizer step with that step's loss values (detached floats or
  tensors). DWA learns from it; the others ignore it.
- ``weights``: the weights currently multiplying each loss, as ``{name: float}``, for logging.
- ``state_dict()`` / ``load_state_dict()``: everything needed for an exact resume (for DWA the
  smoothed losses, snapshot, weights and counter are buffers; for uncertainty the log-variances are
  parameters).
- ``parameters()``: empty except for ``uncertainty``, whose log-variances the trainer must add to
  the optimizer.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

__all__ = [
    "LOSS_WEIGHTING_STRATEGIES",
    "check_dwa_settings",
    "FixedLossWeighting",
    "DynamicWeightAverage",
    "UncertaintyWeighting",
    "build_loss_weighting",
]

LOSS_WEIGHTING_STRATEGIES = ("fixed", "dwa", "uncertainty")

LossValue = Union[float, torch.Tensor]


def check_dwa_settings(*, temperature: float, smoothing_factor: float, update_freq: int) -> None:
    """Range checks of the Dynamic Weight Average settings (also applied to the training arguments).

    Messages name the training arguments (``dwa_temperature``, ``smoothing_factor``,
    ``adaptive_update_freq``) that set these values.
    """
    if temperature <= 0:
        raise ValueError(f"the DWA temperature (dwa_temperature) must be > 0, got {temperature}")
    if not 0.0 <= smoothing_factor < 1.0:
        raise ValueError(f"the DWA smoothing_factor must be in [0, 1), got {smoothing_factor}")
    if update_freq < 1:
        raise ValueError(f"the DWA update interval (adaptive_update_freq) must be >= 1, got {update_freq}")


class _LossWeighting(nn.Module):
    def __init__(self, weights: Mapping[str, float]):
        super().__init__()
        if not weights:
            raise ValueError("at least one loss name is needed")
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"weight of {name!r} must be >= 0, got {value}")
        self.names = tuple(weights)
        # Configured (base) weights: constants, kept as a buffer so they travel with the state dict.
        self.register_buffer("base_weights", torch.tensor([float(weights[n]) for n in self.names], dtype=torch.float64))

    def _stack(self, losses: Mapping[str, LossValue]) -> torch.Tensor:
        missing = [n for n in self.names if n not in losses]
        if missing:
            raise KeyError(f"losses missing for weighting: {missing}")
        raw = [losses[n] for n in self.names]
        device = next((v.device for v in raw if isinstance(v, torch.Tensor)), torch.device("cpu"))
        return torch.stack([torch.as_tensor(v, device=device).float().reshape(()) for v in raw])

    def current_weights(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weights(self) -> Dict[str, float]:
        return {n: float(w) for n, w in zip(self.names, self.current_weights().detach().cpu())}

    def regularizer(self) -> Optional[torch.Tensor]:
        """A term added to the weighted sum (None: nothing is added)."""
        return None

    def forward(
        self,
        losses: Mapping[str, LossValue],
        *,
        scales: Optional[Mapping[str, LossValue]] = None,
        regularizer_scale: LossValue = 1.0,
    ) -> torch.Tensor:
        """``sum_i scales_i * w_i * L_i + regularizer_scale * regularizer`` over the configured names."""
        values = self._stack(losses)
        coefficients = self.current_weights().to(values)
        if scales is not None:
            coefficients = self._stack(scales).to(values) * coefficients
        total = (coefficients * values).sum()
        regularizer = self.regularizer()
        if regularizer is not None:
            total = total + regularizer.to(values) * regularizer_scale
        return total

    def update(self, losses: Mapping[str, LossValue]) -> None:
        """Observe one optimizer step's loss values (no-op unless overridden)."""


class FixedLossWeighting(_LossWeighting):
    """The configured weights, unchanged: ``total = sum_i w_i L_i``."""

    def current_weights(self) -> torch.Tensor:
        return self.base_weights


class DynamicWeightAverage(_LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019), on smoothed losses.

    Each :meth:`update` folds the step's losses into an exponential moving average
    ``ema_i <- s * ema_i + (1 - s) * L_i`` (``s = smoothing_factor``; the first value initializes it).
    Every ``update_freq`` updates the current average is compared with the one saved at the previous
    refresh: ``r_i = ema_i / ema_prev_i`` (how fast loss i is falling; near 1 = stalling), and the
    factors become ``lambda_i = K * softmax(r / temperature)_i``, which sum to the number of losses K.
    A loss that decreases more slowly gets a larger factor. Until the second refresh all factors are 1.

    The weight applied to loss i is ``base_i * lambda_i`` (``base`` = the configured weights, 1 by
    default); :attr:`weights` reports that product and :attr:`factors` the ``lambda`` alone.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        *,
        temperature: float = 2.0,
        smoothing_factor: float = 0.95,
        update_freq: int = 100,
        eps: float = 1e-12,
    ):
        super().__init__(weights)
        check_dwa_settings(temperature=temperature, smoothing_factor=smoothing_factor, update_freq=update_freq)
        self.temperature = float(temperature)
        self.smoothing_factor = float(smoothing_factor)
        self.update_freq = int(update_freq)
        self.eps = float(eps)
        k = len(self.names)
        self.register_buffer("smoothed", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("previous", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("lambdas", torch.ones(k, dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))

    @property
    def factors(self) -> Dict[str, float]:
        return {n: float(v) for n, v in zip(self.names, self.lambdas)}

    def current_weights(self) -> torch.Tensor:
        return self.base_weights * self.lambdas

    @torch.no_grad()
    def update(self, losses: Mapping[str, LossValue]) -> None:
        values = self._stack(losses).detach().to(self.smoothed)
        if not torch.isfinite(values).all():
            return  # a non-finite step must not poison the averages
        if int(self.num_updates) == 0:
            self.smoothed.copy_(values)
        else:
            self.smoothed.mul_(self.smoothing_factor).add_((1.0 - self.smoothing_factor) * values)
        self.num_updates += 1
        if int(self.num_updates) % self.update_freq == 0:
            if bool(self.has_previous):
                ratios = self.smoothed / self.previous.clamp_min(self.eps)
                self.lambdas.copy_(len(self.names) * torch.softmax(ratios / self.temperature, dim=0))
            self.previous.copy_(self.smoothed)
            self.has_previous.fill_(True)


class UncertaintyWeighting(_LossWeighting):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    One learnable log-variance ``s_i`` per loss; ``total = sum_i exp(-s_i) * base_i * L_i + s_i``.
    Kendall et al. write ``1 / (2 sigma^2) L + log sigma``; with ``s = log sigma^2`` that is half of the
    expression used here, which has the same minimizer (``s_i = log(base_i L_i)``) and simply a
    gradient twice as large. Gradient descent raises ``s_i`` (lowers the weight) of a loss larger than
    ``exp(s_i)`` and lowers it otherwise. :attr:`weights` reports ``exp(-s_i) * base_i``.

    Add this module's parameters to the optimizer (no weight decay on them is advisable).
    """

    def __init__(self, weights: Mapping[str, float], *, init_log_variance: float = 0.0):
        super().__init__(weights)
        self.log_variances = nn.Parameter(torch.full((len(self.names),), float(init_log_variance)))

    def current_weights(self) -> torch.Tensor:
        return torch.exp(-self.log_variances).to(self.base_weights) * self.base_weights

    def regularizer(self) -> torch.Tensor:
        return self.log_variances.sum()


def build_loss_weighting(
    strategy: str,
    *,
    weights: Optional[Mapping[str, float]] = None,
    names: Optional[Sequence[str]] = None,
    dwa_temperature: float = 2.0,
    smoothing_factor: float = 0.95,
    adaptive_update_freq: int = 100,
) -> _LossWeighting:
    """Build the weighting for ``strategy`` in :data:`LOSS_WEIGHTING_STRATEGIES`.

    ``weights`` gives the configured weight per loss name; alternatively ``names`` gives the names
    with weight 1 each. ``dwa_temperature``, ``smoothing_factor`` and ``adaptive_update_freq`` (the
    original guide's names for the last two) configure ``dwa`` and are ignored otherwise.
    """
    if weights is None:
        if names is None:
            raise ValueError("give weights or names")
        weights = {n: 1.0 for n in names}
    if strategy == "fixed":
        return FixedLossWeighting(weights)
    if strategy == "dwa":
        return DynamicWeightAverage(
            weights, temperature=dwa_temperature, smoothing_factor=smoothing_factor, update_freq=adaptive_update_freq
        )
    if strategy == "uncertainty":
        return UncertaintyWeighting(weights)
    raise ValueError(f"unknown loss weighting {strategy!r}; choose from {LOSS_WEIGHTING_STRATEGIES}")
