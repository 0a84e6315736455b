"""Optimizers and learning-rate schedules of the training recipes (the original guide's options).

``optimizer``: ``adamw``, ``adam`` or ``sgd`` built from the recipe's learning rate, Adam betas and
epsilon, or SGD momentum; ``trainer`` leaves the choice to ``TrainingArguments.optim``. Weight decay
and parameter groups are the Trainer's. Adam and AdamW use torch's fused implementation (one kernel
over every parameter) on the devices of :data:`FUSED_ADAM_DEVICES`: for the 4 M parameters of the
mask decoder it takes 2.7 ms per step on 2 CPU cores where the default per-parameter loop takes 19 ms.

``scheduler`` (every one with a linear warm-up of ``warmup_epochs`` epochs, or of transformers'
``warmup_steps`` / ``warmup_ratio``):

* ``cosine``: half cosine from the peak to ``min_lr`` at the last step (transformers'
  ``cosine_with_min_lr``);
* ``step``: the rate times ``lr_decay_gamma`` every ``lr_decay_epochs`` epochs;
* ``onecycle``: ``torch.optim.lr_scheduler.OneCycleLR``, rising from ``learning_rate /``
  :data:`ONECYCLE_DIV_FACTOR` to the peak over the warm-up (or :data:`ONECYCLE_DEFAULT_PCT_START` of
  the run when there is none), then a cosine down to ``min_lr``; momentum is cycled for SGD only;
* ``trainer``: transformers' ``lr_scheduler_type`` with ``lr_scheduler_kwargs``.

Epoch-based lengths are converted with the number of optimizer steps per epoch, which the trainer
takes from ``Trainer.set_initial_training_values`` when training starts.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple

import torch
from transformers.optimization import get_scheduler

__all__ = [
    "FUSED_ADAM_DEVICES",
    "ONECYCLE_DEFAULT_PCT_START",
    "ONECYCLE_DIV_FACTOR",
    "ONECYCLE_FINAL_DIV_FACTOR_WITHOUT_MIN_LR",
    "OPTIMIZERS",
    "SCHEDULERS",
    "add_loss_weighting_parameters",
    "create_lr_scheduler",
    "optimizer_class_and_kwargs",
    "step_lr_factor",
    "warmup_steps",
]

OPTIMIZERS = ("adamw", "adam", "sgd", "trainer")
# Device types on which Adam and AdamW run fused (torch has the fused kernels there; the result is
# the same update up to float rounding).
FUSED_ADAM_DEVICES = ("cpu", "cuda")
SCHEDULERS = ("cosine", "onecycle", "step", "trainer")

# OneCycleLR settings. The first two are torch's own defaults; the last replaces min_lr when it is 0
# (OneCycleLR cannot end at exactly 0): the run then ends at the starting rate / 1e4.
ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_DEFAULT_PCT_START = 0.3
ONECYCLE_FINAL_DIV_FACTOR_WITHOUT_MIN_LR = 1e4


def optimizer_class_and_kwargs(args, device_type: Optional[str] = None) -> Optional[Tuple[type, Dict[str, Any]]]:
    """``(optimizer class, keyword arguments)`` for ``args.optimizer``; None for ``trainer``.

    ``device_type``: where the parameters live; Adam and AdamW are fused there when it is one of
    :data:`FUSED_ADAM_DEVICES` (None: not fused, for setups that manage parameters themselves).
    """
    if args.optimizer == "trainer":
        return None
    adam = {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon, "lr": args.learning_rate}
    if device_type in FUSED_ADAM_DEVICES:
        adam["fused"] = True
    choices = {
        "adamw": (torch.optim.AdamW, adam),
        "adam": (torch.optim.Adam, adam),
        "sgd": (torch.optim.SGD, {"lr": args.learning_rate, "momentum": args.momentum}),
    }
    return choices[args.optimizer]


def add_loss_weighting_parameters(optimizer: torch.optim.Optimizer, weighting) -> None:
    """Give the learned parameters of the loss weighting (uncertainty) their own group, without weight decay."""
    extra = [p for p in weighting.parameters() if p.requires_grad]
    if extra:
        optimizer.add_param_group({"params": extra, "weight_decay": 0.0})


def _require_steps_per_epoch(steps_per_epoch: Optional[int], why: str) -> int:
    if not steps_per_epoch:
        raise ValueError(f"{why} needs the number of optimizer steps per epoch, known once training starts")
    return int(steps_per_epoch)


def warmup_steps(args, num_training_steps: int, steps_per_epoch: Optional[int]) -> int:
    """Warm-up length in optimizer steps: ``warmup_epochs`` converted, else transformers' own rule.

    Capped at ``num_training_steps - 1`` so that the last step is past the warm-up.
    """
    if args.warmup_epochs > 0:
        per_epoch = _require_steps_per_epoch(steps_per_epoch, "warmup_epochs")
        steps = int(round(args.warmup_epochs * per_epoch))
    else:
        steps = args.get_warmup_steps(num_training_steps)
    return min(steps, max(0, num_training_steps - 1))


def step_lr_factor(step: int, warmup_steps: int, decay_steps: int, gamma: float) -> float:
    """``step`` schedule: linear warm-up, then the rate times ``gamma`` every ``decay_steps`` optimizer steps."""
    warm = min(1.0, (step + 1) / (warmup_steps + 1)) if warmup_steps > 0 else 1.0
    return warm * gamma ** (step // max(1, decay_steps))


def create_lr_scheduler(optimizer: torch.optim.Optimizer, args, *, num_training_steps: int,
                        steps_per_epoch: Optional[int]) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate scheduler for ``args.scheduler`` (see the module docstring)."""
    warmup = warmup_steps(args, num_training_steps, steps_per_epoch)
    if args.scheduler == "trainer":
        return get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=warmup,
                             num_training_steps=num_training_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    if args.scheduler == "cosine":
        return get_scheduler("cosine_with_min_lr", optimizer=optimizer, num_warmup_steps=warmup,
                             num_training_steps=num_training_steps, scheduler_specific_kwargs={"min_lr": args.min_lr})
    if args.scheduler == "step":
        per_epoch = _require_steps_per_epoch(steps_per_epoch, "the step scheduler")
        decay_steps = max(1, int(round(args.lr_decay_epochs * per_epoch)))
        factor = functools.partial(step_lr_factor, warmup_steps=warmup, decay_steps=decay_steps, gamma=args.lr_decay_gamma)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if args.scheduler == "onecycle":
        initial = args.learning_rate / ONECYCLE_DIV_FACTOR
        final_div = initial / args.min_lr if args.min_lr > 0 else ONECYCLE_FINAL_DIV_FACTOR_WITHOUT_MIN_LR
        pct = warmup / num_training_steps if warmup > 0 else ONECYCLE_DEFAULT_PCT_START
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=max(2, num_training_steps),
            pct_start=min(max(pct, 1e-6), 0.999), anneal_strategy="cos", div_factor=ONECYCLE_DIV_FACTOR,
            final_div_factor=max(final_div, 1.0), cycle_momentum=args.optimizer == "sgd",
        )
    raise ValueError(f"unknown scheduler {args.scheduler!r}; choose one of {SCHEDULERS}")
