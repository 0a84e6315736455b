"""EfficientSAM (ViT-T / ViT-S) for transformers: model, processors, and fine-tuning tools.

Importing the package registers the model with the transformers Auto classes, so
``AutoModel`` / ``AutoModelForMaskGeneration`` / ``AutoImageProcessor`` / ``AutoProcessor``
``.from_pretrained(folder)`` and ``pipeline("mask-generation", model=folder)`` work on saved folders;
``save_pretrained`` also ships the code of the config, model, image processor and processor, so the
same calls with ``trust_remote_code=True`` work where this package is not installed
(``hub_usage.USAGE_SNIPPET``).
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForMaskGeneration, AutoProcessor

from .configuration_efficientsam import (
    EfficientSamConfig,
    EfficientSamMaskDecoderConfig,
    EfficientSamPromptEncoderConfig,
    EfficientSamVisionConfig,
)
from .image_processing_efficientsam import EfficientSamImageProcessor
from .modeling_efficientsam import (
    EfficientSamImageSegmentationOutput,
    EfficientSamModel,
    EfficientSamPreTrainedModel,
)
from .processing_efficientsam import EfficientSamProcessor

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register(EfficientSamConfig.model_type, EfficientSamConfig, exist_ok=True)
    AutoModel.register(EfficientSamConfig, EfficientSamModel, exist_ok=True)
    AutoImageProcessor.register(EfficientSamConfig, slow_image_processor_class=EfficientSamImageProcessor, exist_ok=True)
    AutoModelForMaskGeneration.register(EfficientSamConfig, EfficientSamModel, exist_ok=True)
    AutoProcessor.register(EfficientSamConfig, EfficientSamProcessor, exist_ok=True)
    # Every save_pretrained / push_to_hub / Trainer.save_model then writes `auto_map` into config.json and
    # processor_config.json and copies the code files (with their relative imports) next to the weights,
    # so the folder also loads with trust_remote_code=True where this package is not installed.
    # EfficientSamModel.save_pretrained adds AutoModelForMaskGeneration to the model's auto_map.
    EfficientSamConfig.register_for_auto_class("AutoConfig")
    EfficientSamModel.register_for_auto_class("AutoModel")
    EfficientSamImageProcessor.register_for_auto_class("AutoImageProcessor")
    EfficientSamProcessor.register_for_auto_class("AutoProcessor")


_register()

__all__ = [
    "EfficientSamConfig",
    "EfficientSamImageProcessor",
    "EfficientSamImageSegmentationOutput",
    "EfficientSamMaskDecoderConfig",
    "EfficientSamModel",
    "EfficientSamPreTrainedModel",
    "EfficientSamProcessor",
    "EfficientSamPromptEncoderConfig",
    "EfficientSamVisionConfig",
]
