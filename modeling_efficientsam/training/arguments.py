"""Command-line and recipe arguments for ``train.py``: three dataclasses.

``ModelArguments`` says where the student (and the teacher) come from and what is frozen,
``DataArguments`` where the COCO data is and how prompts are drawn, and
``EfficientSamTrainingArguments`` extends ``transformers.TrainingArguments`` with the loss,
distillation, schedule and optimizer fields. Every field has a ``help`` text and every numeric field
is range-checked in ``__post_init__``. The lists of choices and the range checks of values that a
module implements (schedules, loss weighting, optimizers, prompt modes, cache dtypes, model variants)
come from that module. :mod:`.argument_parsing` reads recipes and command lines into these classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

from transformers import TrainingArguments

from ..configuration_efficientsam import VARIANTS, normalize_variant
from ..data.embedding_cache import STORAGE_DTYPES
from ..data.training_dataset import PROMPT_MODES
from .optimization import OPTIMIZERS, SCHEDULERS
from .schedules import DISTILLATION_DECAYS, check_distillation_values
from .weighting import LOSS_WEIGHTING_STRATEGIES, check_dwa_settings

__all__ = [
    "ARGUMENT_CLASSES",
    "DataArguments",
    "EfficientSamTrainingArguments",
    "ModelArguments",
]

MODEL_VARIANTS = VARIANTS
CACHE_DTYPES = tuple(STORAGE_DTYPES)


def _one_of(choices: Sequence[str]) -> str:
    return ", ".join(f"'{choice}'" for choice in choices)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_non_negative(obj, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value is not None and value >= 0, f"{name} must be >= 0, got {value}")


@dataclass
class ModelArguments:
    """Where the student and the teacher come from, and which parts of the student are trained."""

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Student to fine-tune: a folder written by save_pretrained / the conversion script, a Hub model "
            "id, or an original EfficientSAM checkpoint (.pt / .pt.zip file, or a Hub file such as "
            "yunyangx/EfficientSAM/efficient_sam_vitt.pt), which is converted once into converted_models_dir."
        },
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision of model_name_or_path."})
    model_variant: Optional[str] = field(
        default=None,
        metadata={"help": f"Released architecture ({_one_of(MODEL_VARIANTS)}) for a randomly initialized student (needs init_from_scratch)."},
    )
    model_config: Optional[str] = field(  # a dict is accepted too (from a YAML recipe)
        default=None,
        metadata={
            "help": "Architecture of a randomly initialized student: a config.json path (or a dict in a YAML recipe) "
            "with vision_config / prompt_encoder_config / mask_decoder_config (needs init_from_scratch)."
        },
    )
    init_from_scratch: bool = field(
        default=False,
        metadata={"help": "Start from random weights with model_variant or model_config instead of a checkpoint."},
    )
    teacher_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Teacher for knowledge distillation (same forms as model_name_or_path). Setting it turns "
            "distillation on; the teacher is frozen and runs in eval mode."
        },
    )
    teacher_revision: str = field(default="main", metadata={"help": "Hub revision of teacher_model_name_or_path."})
    freeze_vision_encoder: bool = field(
        default=True,
        metadata={"help": "Freeze the student's image encoder (decoder-only fine-tuning; enables the embedding cache)."},
    )
    freeze_prompt_encoder: bool = field(default=True, metadata={"help": "Freeze the student's prompt encoder."})
    attn_implementation: Optional[str] = field(
        default=None,
        metadata={"help": "'sdpa' (default, fused) or 'eager' (reference arithmetic). Attention maps for "
                  "attention distillation are computed eagerly in either case."},
    )
    converted_models_dir: str = field(
        default="models",
        metadata={"help": "Where original .pt checkpoints given as model/teacher are converted to transformers folders."},
    )

    def __post_init__(self):
        for name in ("model_name_or_path", "teacher_model_name_or_path", "model_variant", "model_config"):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
                setattr(self, name, None)  # lets `--teacher_model_name_or_path none` turn a recipe's teacher off
        if self.model_variant is not None:
            self.model_variant = normalize_variant(self.model_variant)  # a ValueError names the choices
        if isinstance(self.model_config, str) and self.model_config.strip().startswith("{"):
            self.model_config = json.loads(self.model_config)
        fresh = self.model_variant is not None or self.model_config is not None
        if self.model_name_or_path is not None:
            _check(not fresh, "give either model_name_or_path, or model_variant / model_config with init_from_scratch, not both")
            _check(not self.init_from_scratch, "init_from_scratch needs model_variant or model_config instead of model_name_or_path")
        elif fresh:
            _check(self.model_variant is None or self.model_config is None, "give model_variant or model_config, not both")
            _check(
                self.init_from_scratch,
                "model_variant / model_config build a randomly initialized student: set init_from_scratch: true to "
                "confirm, or give model_name_or_path to start from trained weights",
            )
        else:
            raise ValueError(
                "no student model: give model_name_or_path (a converted folder, Hub id or original .pt checkpoint), "
                "or model_variant / model_config with init_from_scratch: true"
            )
        _check(self.attn_implementation in (None, "sdpa", "eager"),
               f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")


@dataclass
class DataArguments:
    """Where the COCO data is, how it is converted, and how training prompts are drawn."""

    dataset_path: Optional[str] = field(
        default=None,
        metadata={"help": "A dataset folder written by data/prepare_dataset.py (prepare_coco_dataset), or its Hub-format copy (--hub_format_dir). Alternative to dataset_name and the *_annotations / *_images fields."},
    )
    dataset_name: Optional[str] = field(
        default=None,
        metadata={"help": "A prepared dataset on the Hub (e.g. your-name/pcb-components, pushed with data/prepare_dataset.py --push_to_hub), loaded with datasets.load_dataset; its COCO category ids come from its coco_categories.json. Alternative to dataset_path and the *_annotations / *_images fields."},
    )
    dataset_revision: Optional[str] = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of dataset_name."})
    train_annotations: Optional[str] = field(default=None, metadata={"help": "COCO JSON of the training split."})
    train_images: Optional[str] = field(default=None, metadata={"help": "Image folder of the training split."})
    validation_annotations: Optional[str] = field(default=None, metadata={"help": "COCO JSON of the validation split."})
    validation_images: Optional[str] = field(default=None, metadata={"help": "Image folder of the validation split."})
    box_only_annotations: Optional[str] = field(
        default=None,
        metadata={"help": "COCO JSON of extra training images with boxes but no masks (label-efficient distillation): only the teacher supervises them (distillation terms; the ground-truth terms are masked out). Needs a teacher and box prompts; segmentations in this file are ignored."},
    )
    box_only_images: Optional[str] = field(default=None, metadata={"help": "Image folder of box_only_annotations."})
    box_only_split: str = field(default="box_only", metadata={"help": "Split name of the box-only images in the prepared dataset."})
    prepared_dataset_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where the COCO files are converted to a datasets folder (reused while its inputs are unchanged). Default: <output_dir>/prepared_dataset."},
    )
    train_split: str = field(default="train", metadata={"help": "Name of the training split."})
    validation_split: str = field(default="validation", metadata={"help": "Name of the validation split."})
    box_mask_iou_threshold: float = field(
        default=0.5,
        metadata={"help": "Conversion drops annotations whose box and mask agree less than this IoU (guide: iou_threshold); 0 keeps all."},
    )
    strict_data: bool = field(default=False, metadata={"help": "Stop on the first annotation problem instead of dropping and reporting it."})
    max_objects: Optional[int] = field(default=10, metadata={"help": "Objects (queries) drawn per training image and epoch; null for all."})
    eval_max_objects: Optional[int] = field(default=None, metadata={"help": "Objects evaluated per validation image; null for all."})
    box_noise_scale: float = field(
        default=0.1,
        metadata={"help": "Training box jitter: each side moves by up to this fraction of the box size (0 disables). Evaluation never jitters."},
    )
    prompt_mode: str = field(default="box", metadata={"help": f"Training prompts: {_one_of(PROMPT_MODES)}. Evaluation uses boxes."})
    num_positive_points: int = field(default=1, metadata={"help": "Positive points per query in point mode."})
    num_negative_points: int = field(default=0, metadata={"help": "Negative points per query in point mode."})
    point_probability: float = field(default=0.5, metadata={"help": "Share of point queries in mixed mode."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N training images (debugging)."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N validation images (debugging)."})
    cache_embeddings: bool = field(
        default=True,
        metadata={"help": "With a frozen student encoder, compute image embeddings (student and teacher) once and train from the cache."},
    )
    embedding_cache_dtype: str = field(default="bfloat16", metadata={"help": f"Storage dtype of the embedding cache: {_one_of(CACHE_DTYPES)}."})
    embedding_cache_dir: Optional[str] = field(default=None, metadata={"help": "Where caches go. Default: <dataset folder>/embeddings."})
    image_size: Optional[int] = field(
        default=None,
        metadata={"help": "Expected model input size (guide: target_size). Only checked against the model's config; the architecture decides it."},
    )
    num_overlay_images: int = field(default=4, metadata={"help": "Validation images drawn as TensorBoard overlays at each evaluation (0 disables)."})

    def __post_init__(self):
        for name in ("dataset_path", "dataset_name", "dataset_revision", "train_annotations", "train_images", "validation_annotations", "validation_images",
                     "prepared_dataset_dir", "embedding_cache_dir", "box_only_annotations", "box_only_images"):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
                setattr(self, name, None)  # `--dataset_path none` switches a recipe to COCO files
        files = [self.train_annotations, self.train_images, self.validation_annotations, self.validation_images]
        sources = [name for name, given in (("dataset_name", self.dataset_name is not None), ("dataset_path", self.dataset_path is not None),
                                            ("the COCO files (train_annotations, ...)", any(f is not None for f in files))) if given]
        _check(len(sources) <= 1, f"give one source of data, not {' and '.join(sources)}")
        _check(self.dataset_revision is None or self.dataset_name is not None, "dataset_revision goes with dataset_name")
        if self.dataset_path is None and self.dataset_name is None:
            _check(
                self.train_annotations is not None and self.train_images is not None,
                "no data: give dataset_name (a Hub dataset), dataset_path (a prepared folder) or train_annotations + train_images "
                "(and validation_annotations + validation_images)",
            )
            _check((self.validation_annotations is None) == (self.validation_images is None),
                   "give validation_annotations and validation_images together")
        _check((self.box_only_annotations is None) == (self.box_only_images is None),
               "give box_only_annotations and box_only_images together")
        _check(self.box_only_annotations is None or self.train_annotations is not None,
               "box_only_annotations go with the COCO files (train_annotations, ...), not with dataset_path / dataset_name")
        _check(self.box_only_annotations is None or self.prompt_mode == "box",
               f"box-only images have no masks to sample points from: prompt_mode must be box, got {self.prompt_mode!r}")
        _check(self.box_only_split not in (self.train_split, self.validation_split),
               "box_only_split must differ from train_split and validation_split")
        _check(0.0 <= self.box_mask_iou_threshold <= 1.0, f"box_mask_iou_threshold must be in [0, 1], got {self.box_mask_iou_threshold}")
        for name in ("max_objects", "eval_max_objects", "max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be >= 1 or null, got {value}")
        _check(self.box_noise_scale >= 0, f"box_noise_scale must be >= 0, got {self.box_noise_scale}")
        _check(self.prompt_mode in PROMPT_MODES, f"prompt_mode must be one of {PROMPT_MODES}, got {self.prompt_mode!r}")
        _check(self.num_positive_points >= 1 and self.num_negative_points >= 0,
               "num_positive_points must be >= 1 and num_negative_points >= 0")
        _check(0.0 <= self.point_probability <= 1.0, f"point_probability must be in [0, 1], got {self.point_probability}")
        _check(self.embedding_cache_dtype in CACHE_DTYPES,
               f"embedding_cache_dtype must be one of {CACHE_DTYPES}, got {self.embedding_cache_dtype!r}")
        _check(self.image_size is None or self.image_size > 0, f"image_size must be positive, got {self.image_size}")
        _check(self.num_overlay_images >= 0, f"num_overlay_images must be >= 0, got {self.num_overlay_images}")


@dataclass
class EfficientSamTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus losses, distillation, schedules and the guide's optimizer options.

    Defaults that differ from ``TrainingArguments``: evaluation and saving every epoch, best model on
    validation mIoU (loaded at the end), TensorBoard logging every optimizer step, an evaluation
    before the first step (the "before fine-tuning" row of the model card).
    """

    # ---- defaults changed from TrainingArguments ------------------------------------------------
    output_dir: Optional[str] = field(default="outputs/efficientsam", metadata={"help": "Where checkpoints and the final model go."})
    report_to: Union[None, str, List[str]] = field(default="tensorboard", metadata={"help": "Logging integrations (tensorboard by default; 'none' for none)."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate: 'no', 'steps' or 'epoch'."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save a checkpoint: 'no', 'steps', 'epoch' or 'best'."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N optimizer steps (each loss term, weight, temperature, alpha, beta)."})
    metric_for_best_model: Optional[str] = field(default="eval_mean_iou", metadata={"help": "Validation metric that picks the best checkpoint."})
    greater_is_better: Optional[bool] = field(default=True, metadata={"help": "Whether a larger metric_for_best_model is better."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Load the best checkpoint (by metric_for_best_model) at the end."})
    eval_on_start: bool = field(default=True, metadata={"help": "Evaluate once before training (the 'before' metrics of the model card)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep every batch key (the trainer needs labels, query_mask, ...)."})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "Checkpoints kept; the best and the newest are never deleted, so 1 keeps two when the best is not the newest."})
    # transformers 5 dropped this TrainingArguments field; train.py reads it (see training/run_checks.py).
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Let a new run replace the earlier run in output_dir (its checkpoint-* folders are removed). "
                  "Without it, an output_dir holding a saved model, results or checkpoints is refused unless the run "
                  "resumes from one of its checkpoints."},
    )

    # ---- ground-truth losses ----------------------------------------------------------------------
    focal_alpha: float = field(default=0.25, metadata={"help": "Focal loss foreground weight in [0, 1] (negative: none)."})
    focal_gamma: float = field(default=2.0, metadata={"help": "Focal loss focusing exponent (>= 0)."})
    focal_weight: float = field(default=1.0, metadata={"help": "Weight of the focal loss."})
    dice_weight: float = field(default=1.0, metadata={"help": "Weight of the Dice loss."})
    iou_weight: float = field(default=1.0, metadata={"help": "Weight of the soft IoU loss."})
    boundary_weight: float = field(default=0.5, metadata={"help": "Weight of the boundary-band BCE loss."})
    iou_head_weight: float = field(default=1.0, metadata={"help": "Weight of the IoU-prediction head loss (all candidates)."})
    boundary_band_width: int = field(default=3, metadata={"help": "Half-width in pixels of the boundary band."})

    # ---- distillation (active when teacher_model_name_or_path is set) -----------------------------
    mask_kd_weight: float = field(default=1.0, metadata={"help": "Weight of the soft-label mask KD (Bernoulli KL per pixel, T^2 scaled)."})
    iou_kd_weight: float = field(default=1.0, metadata={"help": "Weight of the MSE between student and teacher IoU scores."})
    feature_distillation: bool = field(default=True, metadata={"help": "Distil decoder features (output tokens, upscaled embedding) and, when the student encoder is trained, image embeddings."})
    feature_distillation_weight: float = field(default=1.0, metadata={"help": "Weight of each decoder-feature MSE term."})
    embedding_distillation_weight: float = field(default=1.0, metadata={"help": "Weight of the image-embedding MSE (student encoder trained only)."})
    attention_distillation: bool = field(default=True, metadata={"help": "Distil the decoder's token-to-image attention maps (KL per head and token)."})
    attention_distillation_weight: float = field(default=1.0, metadata={"help": "Weight of the attention KL."})
    max_temperature: float = field(default=4.0, metadata={"help": "KD temperature at the start (held during distill_warmup_epochs)."})
    min_temperature: float = field(default=1.0, metadata={"help": "KD temperature reached at the last step."})
    alpha_start: float = field(default=0.9, metadata={"help": "Ground-truth loss weight at the start."})
    alpha_end: float = field(default=0.5, metadata={"help": "Ground-truth loss weight at the last step."})
    beta_start: float = field(default=0.1, metadata={"help": "Distillation loss weight at the start."})
    beta_end: float = field(default=0.5, metadata={"help": "Distillation loss weight at the last step."})
    distill_warmup_epochs: float = field(default=5.0, metadata={"help": "Epochs during which temperature, alpha and beta keep their start values."})
    distill_decay: str = field(default="linear", metadata={"help": f"How temperature, alpha and beta move after the warm-up: {_one_of(DISTILLATION_DECAYS)}."})

    # ---- adaptive loss weights ------------------------------------------------------------------
    loss_weighting: str = field(default="fixed", metadata={"help": f"How the loss terms are weighted, one of {_one_of(LOSS_WEIGHTING_STRATEGIES)}: fixed = the configured weights, dwa = Dynamic Weight Average, uncertainty = learned log-variances."})
    dwa_temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of DWA."})
    smoothing_factor: float = field(default=0.95, metadata={"help": "DWA: exponential smoothing of the per-step losses, in [0, 1)."})
    adaptive_update_freq: int = field(default=100, metadata={"help": "DWA: optimizer steps between weight updates."})

    # ---- optimizer and schedule (the guide's options) --------------------------------------------
    optimizer: str = field(default="adamw", metadata={"help": f"One of {_one_of(OPTIMIZERS)}; 'trainer' uses TrainingArguments.optim."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum in [0, 1)."})
    scheduler: str = field(default="cosine", metadata={"help": f"One of {_one_of(SCHEDULERS)}: cosine goes to min_lr; trainer uses lr_scheduler_type."})
    min_lr: float = field(default=1e-6, metadata={"help": "Final learning rate of 'cosine' and 'onecycle'."})
    warmup_epochs: float = field(default=0.0, metadata={"help": "Linear learning-rate warm-up, in epochs (overrides warmup_steps when > 0)."})
    lr_decay_epochs: float = field(default=20.0, metadata={"help": "'step' scheduler: epochs between decays (guide: lr_decay_step)."})
    lr_decay_gamma: float = field(default=0.1, metadata={"help": "'step' scheduler: factor applied at each decay."})

    # ---- saving ----------------------------------------------------------------------------------
    save_decoder_only: bool = field(default=False, metadata={"help": "Also write <output_dir>/decoder/: the mask decoder + prompt encoder weights alone, with the base model's name."})
    push_demo_app: bool = field(default=False, metadata={"help": "Also write a Gradio app.py + requirements.txt into output_dir (so push_to_hub uploads them): a demo of the model that runs as a Hugging Face Space without this package."})

    def __post_init__(self):
        self._auto_select_cpu()
        _check(-1e-12 <= self.focal_alpha <= 1.0 or self.focal_alpha < 0, f"focal_alpha must be in [0, 1] or negative, got {self.focal_alpha}")
        _check_non_negative(self, (
            "focal_gamma", "focal_weight", "dice_weight", "iou_weight", "boundary_weight", "iou_head_weight",
            "mask_kd_weight", "iou_kd_weight", "feature_distillation_weight", "embedding_distillation_weight",
            "attention_distillation_weight", "min_lr", "warmup_epochs",
        ))
        _check(self.boundary_band_width >= 1, f"boundary_band_width must be >= 1, got {self.boundary_band_width}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check_distillation_values(
            distill_warmup_epochs=self.distill_warmup_epochs, max_temperature=self.max_temperature,
            min_temperature=self.min_temperature, alpha_start=self.alpha_start, alpha_end=self.alpha_end,
            beta_start=self.beta_start, beta_end=self.beta_end,
        )
        _check(self.distill_decay in DISTILLATION_DECAYS,
               f"distill_decay must be one of {DISTILLATION_DECAYS}, got {self.distill_decay!r}")
        _check(self.loss_weighting in LOSS_WEIGHTING_STRATEGIES,
               f"loss_weighting must be one of {LOSS_WEIGHTING_STRATEGIES}, got {self.loss_weighting!r}")
        check_dwa_settings(temperature=self.dwa_temperature, smoothing_factor=self.smoothing_factor,
                           update_freq=self.adaptive_update_freq)
        _check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check(self.scheduler in SCHEDULERS, f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        _check(0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1), got {self.momentum}")
        _check(self.lr_decay_epochs > 0, f"lr_decay_epochs must be > 0, got {self.lr_decay_epochs}")
        _check(0.0 < self.lr_decay_gamma <= 1.0, f"lr_decay_gamma must be in (0, 1], got {self.lr_decay_gamma}")
        super().__post_init__()
        _check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        _check(self.min_lr <= self.learning_rate, f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        if self.warmup_epochs > 0 and self.warmup_steps:
            raise ValueError("give warmup_epochs or warmup_steps, not both")

    def _auto_select_cpu(self) -> None:
        """Without a GPU, run on CPU explicitly so that several processes use gloo (and bf16 works)."""
        if self.use_cpu:
            return
        import torch

        has_accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
        has_accelerator = has_accelerator or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
        if not has_accelerator:
            self.use_cpu = True


# The three argument groups, in the order train.py and the parser use them.
ARGUMENT_CLASSES = (ModelArguments, DataArguments, EfficientSamTrainingArguments)
