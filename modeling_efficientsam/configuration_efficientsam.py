"""Configuration of EfficientSAM: an image encoder, a prompt encoder and a mask decoder.

The architecture lives here (and in each saved ``config.json``), never in recipes or code constants.
``EfficientSamConfig.from_variant("vitt" | "vits")`` gives the two released sizes. The original
implementation's constructor numbers are read by the converter (``convert_efficientsam_to_hf``).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from transformers import PretrainedConfig

# The released architectures differ only in the width and heads of the image encoder; everything
# else is the default of the sub-configs below. (The converter maps the original implementation's
# constructor names onto these.)
VARIANT_ENCODERS: dict[str, dict[str, int]] = {
    "vitt": {"hidden_size": 192, "num_attention_heads": 3},
    "vits": {"hidden_size": 384, "num_attention_heads": 6},
}
VARIANTS = tuple(VARIANT_ENCODERS)


def normalize_variant(name: str) -> str:
    """``"ViT-T"`` / ``"vit_t"`` / ``"vitt"`` -> ``"vitt"`` (and the same for ViT-S); other names are errors."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in VARIANT_ENCODERS:
        raise ValueError(f"unknown EfficientSAM variant {name!r}; choose one of {sorted(VARIANTS)}")
    return key


class EfficientSamVisionConfig(PretrainedConfig):
    r"""Image encoder: a plain ViT over all patches, followed by a convolutional neck.

    Args:
        image_size (`int`, defaults to 1024): side of the square model input; images are stretched to it.
        patch_size (`int`, defaults to 16): side of a patch; the token grid is `image_size // patch_size`.
        num_channels (`int`, defaults to 3): input channels.
        hidden_size (`int`, defaults to 192): ViT width (ViT-T 192, ViT-S 384).
        num_hidden_layers (`int`, defaults to 12): number of transformer blocks.
        num_attention_heads (`int`, defaults to 3): heads per block (ViT-T 3, ViT-S 6).
        mlp_ratio (`float`, defaults to 4.0): MLP width as a multiple of `hidden_size`.
        layer_norm_eps (`float`, defaults to 1e-6): epsilon of every LayerNorm in the encoder and neck.
        pretrain_image_size (`int`, defaults to 224): image size the stored position embedding was learnt
            at; it holds `1 + (pretrain_image_size // patch_size) ** 2` positions (the first, a class-token
            slot, is unused) and is resized bicubically to the token grid in every forward pass.
        neck_hidden_sizes (`list[int]`, defaults to `[256, 256]`): output widths of the neck's 1x1 and 3x3
            convolutions; the last one is the image-embedding width.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (exact GELU).
        initializer_range (`float`, defaults to 0.02): std of the truncated normal used for fresh weights.
    """

    model_type = "efficientsam_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        image_size: int = 1024,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 192,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 3,
        mlp_ratio: float = 4.0,
        layer_norm_eps: float = 1e-6,
        pretrain_image_size: int = 224,
        neck_hidden_sizes: Optional[list[int]] = None,
        hidden_act: str = "gelu",
        initializer_range: float = 0.02,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.layer_norm_eps = layer_norm_eps
        self.pretrain_image_size = pretrain_image_size
        self.neck_hidden_sizes = list(neck_hidden_sizes) if neck_hidden_sizes is not None else [256, 256]
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range


# Points per query of the released models (a box counts as two).
MAX_POINTS_PER_QUERY = 6

# Sizes the prompt encoder takes from the rest of the model (token width = image-embedding width,
# coordinate frame = input size, dense grid = token grid). Configs saved by earlier versions stored
# them under `prompt_encoder_config`; they are still read, checked, and not stored again.
_DERIVED_PROMPT_ENCODER_KEYS = ("hidden_size", "image_size", "image_embedding_size")


class EfficientSamPromptEncoderConfig(PretrainedConfig):
    r"""Prompt encoder: random-Fourier position encoding of points plus one learnt vector per label.

    Its token width, coordinate frame and dense grid are those of the image encoder
    (`EfficientSamConfig.image_embedding_width`, `image_size`, `image_embedding_size`).

    Args:
        max_num_points (`int`, defaults to 6): points per query the decoder takes; shorter queries are
            padded with label -1, longer ones are refused.
    """

    model_type = "efficientsam_prompt_encoder"
    base_config_key = "prompt_encoder_config"

    def __init__(self, max_num_points: int = MAX_POINTS_PER_QUERY, **kwargs):
        self.derived_sizes_given = {key: kwargs.pop(key) for key in _DERIVED_PROMPT_ENCODER_KEYS if key in kwargs}
        super().__init__(**kwargs)
        self.max_num_points = max_num_points

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("derived_sizes_given", None)
        return output


class EfficientSamMaskDecoderConfig(PretrainedConfig):
    r"""Mask decoder: a two-way transformer between prompt tokens and the image, then mask heads.

    Args:
        hidden_size (`int`, defaults to 256): token and image-embedding width.
        num_hidden_layers (`int`, defaults to 2): two-way attention layers.
        num_attention_heads (`int`, defaults to 8): heads in every decoder attention.
        mlp_dim (`int`, defaults to 2048): hidden width of the token MLP.
        attention_downsample_rate (`int`, defaults to 2): the cross attentions work at
            `hidden_size // attention_downsample_rate` channels.
        num_multimask_outputs (`int`, defaults to 3): candidate masks per query with multimask output;
            the decoder holds one more mask token for the single-mask output.
        iou_head_depth (`int`, defaults to 3): layers of the IoU prediction MLP.
        iou_head_hidden_dim (`int`, defaults to 256): hidden width of the IoU prediction MLP.
        upscaling_dims (`list[int]`, defaults to `[64, 32]`): channels after each of the two transposed
            convolutions (x2 each); the last one is the hypernetwork output width.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of the decoder LayerNorms and GroupNorm.
        hidden_act (`str`, defaults to `"gelu"`): activation of every decoder MLP and upscaling layer.
    """

    model_type = "efficientsam_mask_decoder"
    base_config_key = "mask_decoder_config"

    def __init__(
        self,
        hidden_size: int = 256,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        upscaling_dims: Optional[list[int]] = None,
        layer_norm_eps: float = 1e-5,
        hidden_act: str = "gelu",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_dim = mlp_dim
        self.attention_downsample_rate = attention_downsample_rate
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_head_depth = iou_head_depth
        self.iou_head_hidden_dim = iou_head_hidden_dim
        self.upscaling_dims = list(upscaling_dims) if upscaling_dims is not None else [64, 32]
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act


def _as_sub_config(value, cls):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, PretrainedConfig):
        return cls(**value.to_dict())
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"expected a dict or {cls.__name__}, got {type(value).__name__}")


class EfficientSamConfig(PretrainedConfig):
    r"""Configuration of [`EfficientSamModel`]. The default is the ViT-T ("vitt") architecture.

    Args:
        vision_config (`dict` or `EfficientSamVisionConfig`): the image encoder.
        prompt_encoder_config (`dict` or `EfficientSamPromptEncoderConfig`): the prompt encoder.
        mask_decoder_config (`dict` or `EfficientSamMaskDecoderConfig`): the mask decoder.
        initializer_range (`float`, defaults to 0.02): std for freshly initialized weights.

    Example:
        >>> from modeling_efficientsam import EfficientSamConfig, EfficientSamModel
        >>> config = EfficientSamConfig.from_variant("vits")
        >>> model = EfficientSamModel(config)  # random weights, ViT-S shapes
    """

    model_type = "efficientsam"
    sub_configs = {
        "vision_config": EfficientSamVisionConfig,
        "prompt_encoder_config": EfficientSamPromptEncoderConfig,
        "mask_decoder_config": EfficientSamMaskDecoderConfig,
    }

    def __init__(
        self,
        vision_config: Union[dict, EfficientSamVisionConfig, None] = None,
        prompt_encoder_config: Union[dict, EfficientSamPromptEncoderConfig, None] = None,
        mask_decoder_config: Union[dict, EfficientSamMaskDecoderConfig, None] = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vision_config = _as_sub_config(vision_config, EfficientSamVisionConfig)
        self.prompt_encoder_config = _as_sub_config(prompt_encoder_config, EfficientSamPromptEncoderConfig)
        self.mask_decoder_config = _as_sub_config(mask_decoder_config, EfficientSamMaskDecoderConfig)
        self.initializer_range = initializer_range
        self._check_consistency()

    def _check_consistency(self) -> None:
        vision, prompt, decoder = self.vision_config, self.prompt_encoder_config, self.mask_decoder_config
        if vision.image_size % vision.patch_size:
            raise ValueError(
                f"vision_config.image_size ({vision.image_size}) must be a multiple of patch_size ({vision.patch_size})"
            )
        embedding_width = vision.neck_hidden_sizes[-1]
        grid = vision.image_size // vision.patch_size
        problems = []
        given = getattr(prompt, "derived_sizes_given", {})
        if given.get("hidden_size", embedding_width) != embedding_width:
            problems.append(f"prompt_encoder_config.hidden_size={given['hidden_size']}")
        if decoder.hidden_size != embedding_width:
            problems.append(f"mask_decoder_config.hidden_size={decoder.hidden_size}")
        if problems:
            raise ValueError(
                f"{' and '.join(problems)} must equal the image-embedding width "
                f"vision_config.neck_hidden_sizes[-1]={embedding_width}"
            )
        if given.get("image_size", vision.image_size) != vision.image_size or given.get(
            "image_embedding_size", grid
        ) != grid:
            raise ValueError(
                f"prompt_encoder_config {given} must match the vision encoder (image_size={vision.image_size}, "
                f"token grid {grid}); these sizes come from vision_config and need not be given"
            )

    # Derived sizes used across the package, so nothing hard-codes 1024 / 64 / 256.
    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def image_embedding_size(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def image_embedding_width(self) -> int:
        """Channels of the image embedding (the neck's output), which prompt tokens share."""
        return self.vision_config.neck_hidden_sizes[-1]

    @property
    def low_res_mask_size(self) -> int:
        return self.image_embedding_size * 4

    @classmethod
    def from_variant(cls, variant: str = "vitt", **kwargs) -> "EfficientSamConfig":
        """The released architectures: ``"vitt"`` (EfficientSAM-Ti) or ``"vits"`` (EfficientSAM-S)."""
        return cls(vision_config=dict(VARIANT_ENCODERS[normalize_variant(variant)]), **kwargs)


__all__ = [
    "EfficientSamConfig",
    "EfficientSamMaskDecoderConfig",
    "EfficientSamPromptEncoderConfig",
    "EfficientSamVisionConfig",
]
