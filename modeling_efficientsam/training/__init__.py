"""Training components.

Losses (``losses``, ``distillation``), the distillation schedule (``schedules``), loss weighting
(``weighting``, checkpointed by ``weighting_checkpoint``), optimizers and learning-rate schedules
(``optimization``), evaluation metrics (``evaluation``), the trainer (``trainer``), arguments and their
parsing (``arguments``, ``argument_parsing``, ``config_mapping``), what ``train.py`` builds
(``model_building``, ``dataset_building``), callbacks, the model card and decoder-only checkpoints
(``decoder_checkpoint``).
"""

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

# Training entry points: arguments, the trainer, callbacks, model card, the guide's config mapping, decoder-only checkpoints.
from .argument_parsing import load_recipe, parse_efficientsam_args  # noqa: E402
from .arguments import DataArguments, EfficientSamTrainingArguments, ModelArguments  # noqa: E402
from .callbacks import DatasetEpochCallback, TensorBoardOverlayCallback, render_overlay  # noqa: E402
from .config_mapping import map_original_config  # noqa: E402
from .decoder_checkpoint import load_decoder_on_base, save_decoder_only  # noqa: E402
from .model_card import build_model_card, non_default_arguments, write_model_card  # noqa: E402
from .trainer import EfficientSamTrainer  # noqa: E402

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
