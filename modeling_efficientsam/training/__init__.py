"""Training components: losses, distillation losses, schedules and loss weighting."""

from .distillation import (
    attention_distillation_loss,
    feature_distillation_loss,
    image_embedding_distillation_loss,
    mask_distillation_loss,
)
from .losses import (
    boundary_loss,
    dice_loss,
    iou_head_loss,
    segmentation_loss,
    sigmoid_focal_loss,
    soft_iou_loss,
)
from .schedules import DistillationSchedule
from .weighting import (
    DynamicWeightAverage,
    FixedLossWeighting,
    UncertaintyWeighting,
    build_loss_weighting,
)

__all__ = [
    "DistillationSchedule",
    "DynamicWeightAverage",
    "FixedLossWeighting",
    "UncertaintyWeighting",
    "attention_distillation_loss",
    "boundary_loss",
    "build_loss_weighting",
    "dice_loss",
    "feature_distillation_loss",
    "iou_head_loss",
    "image_embedding_distillation_loss",
    "mask_distillation_loss",
    "segmentation_loss",
    "sigmoid_focal_loss",
    "soft_iou_loss",
]
