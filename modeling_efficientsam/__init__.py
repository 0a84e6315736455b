"""EfficientSAM (ViT-T / ViT-S) for transformers: model, processors, and fine-tuning tools.

Importing the package registers the model with the transformers Auto classes, so
``AutoModel.from_pretrained(folder)`` and ``AutoProcessor.from_pretrained(folder)`` work on saved
folders; ``save_pretrained`` also ships the model code for ``trust_remote_code=True`` loading.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

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
    AutoProcessor.register(EfficientSamConfig, EfficientSamProcessor, exist_ok=True)
    # Writes auto_map into saved configs so the folder also loads with trust_remote_code=True.
    EfficientSamConfig.register_for_auto_class()
    EfficientSamModel.register_for_auto_class("AutoModel")


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
