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

# Training entry points: arguments, the trainer, callbacks, model card, the guide's config mapping.
from .arguments import (  # noqa: E402
    DataArguments,
    EfficientSamTrainingArguments,
    ModelArguments,
    load_recipe,
    parse_efficientsam_args,
)
from .callbacks import DatasetEpochCallback, TensorBoardOverlayCallback, render_overlay  # noqa: E402
from .config_mapping import map_original_config  # noqa: E402
from .model_card import build_model_card, non_default_arguments, write_model_card  # noqa: E402
from .trainer import EfficientSamTrainer, load_decoder_on_base, save_decoder_only  # noqa: E402

__all__ += [
    "DataArguments",
    "DatasetEpochCallback",
    "EfficientSamTrainer",
    "EfficientSamTrainingArguments",
    "ModelArguments",
    "TensorBoardOverlayCallback",
    "build_model_card",
    "load_decoder_on_base",
    "load_recipe",
    "map_original_config",
    "non_default_arguments",
    "parse_efficientsam_args",
    "render_overlay",
    "save_decoder_only",
    "write_model_card",
]
