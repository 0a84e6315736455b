"""Read the original guide's nested JSON config (``--config my_config.json``) as our flat arguments.

The guide's file has five sections -- ``model``, ``dataset``, ``training``, ``losses``,
``distillation`` -- whose keys are listed in :data:`GUIDE_KEYS` with the argument each becomes.
Everything maps onto the same fields as a flat recipe; a section or key that is not in the table is
an error naming it (nothing is ignored silently).

Choices worth knowing:

* ``student_variant`` / ``teacher_variant`` name released weights; they become the Hub files
  ``yunyangx/EfficientSAM/efficient_sam_<variant>.pt``, which ``train.py`` converts once into
  ``converted_models_dir``. ``teacher_variant: null`` or ``distillation.enabled: false`` means no teacher.
* ``temperature`` and ``max_temperature`` are both the starting temperature; they must agree.
* ``alpha`` / ``beta`` are the starting ground-truth / distillation weights; they decay to
  ``alpha_end`` / ``beta_end`` (0.5 / 0.5 unless the recipe says otherwise).
* ``warmup_epochs`` is both the learning-rate warm-up and the distillation hold period, as in the guide.
* ``adaptive_update_freq`` / ``smoothing_factor`` configure Dynamic Weight Average, which the guide
  always ran: a guide config therefore selects ``loss_weighting: dwa``.
* ``random_box_augmentation: false`` sets ``box_noise_scale`` to 0 (whatever ``box_noise_scale`` says).
* ``batch_size`` is per device, for training and evaluation; ``print_freq`` is ``logging_steps``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from ..configuration_efficientsam import normalize_variant

__all__ = ["GUIDE_KEYS", "RELEASED_CHECKPOINT_TEMPLATE", "map_original_config"]

RELEASED_CHECKPOINT_TEMPLATE = "yunyangx/EfficientSAM/efficient_sam_{variant}.pt"


def _variant(value) -> Optional[str]:
    if value is None:
        return None
    return RELEASED_CHECKPOINT_TEMPLATE.format(variant=normalize_variant(value))


def _same(name: str) -> Callable[[Any], Dict[str, Any]]:
    return lambda value: {name: value}


# section -> key -> function(value) -> {our argument: value}
GUIDE_KEYS: Dict[str, Dict[str, Callable[[Any], Dict[str, Any]]]] = {
    "model": {
        "student_variant": lambda v: {"model_name_or_path": _variant(v)},
        "teacher_variant": lambda v: {"teacher_model_name_or_path": _variant(v)},
        "freeze_encoder": _same("freeze_vision_encoder"),
        "freeze_prompt_encoder": _same("freeze_prompt_encoder"),
    },
    "dataset": {
        "train_root": _same("train_images"),
        "train_annotation": _same("train_annotations"),
        "val_root": _same("validation_images"),
        "val_annotation": _same("validation_annotations"),
        "target_size": _same("image_size"),
        "max_objects": _same("max_objects"),
        "iou_threshold": _same("box_mask_iou_threshold"),
        "random_box_augmentation": lambda v: {"_box_augmentation": bool(v)},
        "box_noise_scale": _same("box_noise_scale"),
    },
    "training": {
        "epochs": _same("num_train_epochs"),
        "batch_size": lambda v: {"per_device_train_batch_size": v, "per_device_eval_batch_size": v},
        "learning_rate": _same("learning_rate"),
        "min_lr": _same("min_lr"),
        "optimizer": _same("optimizer"),
        "scheduler": _same("scheduler"),
        "weight_decay": _same("weight_decay"),
        "momentum": _same("momentum"),
        "lr_decay_step": _same("lr_decay_epochs"),
        "lr_decay_gamma": _same("lr_decay_gamma"),
        "warmup_epochs": lambda v: {"warmup_epochs": v, "distill_warmup_epochs": v},
        "grad_clip_norm": _same("max_grad_norm"),
        "num_workers": _same("dataloader_num_workers"),
        "pin_memory": _same("dataloader_pin_memory"),
        "prefetch_factor": _same("dataloader_prefetch_factor"),
        "print_freq": _same("logging_steps"),
        "adaptive_update_freq": lambda v: {"adaptive_update_freq": v, "loss_weighting": "dwa"},
        "smoothing_factor": lambda v: {"smoothing_factor": v, "loss_weighting": "dwa"},
    },
    "losses": {
        "focal_alpha": _same("focal_alpha"),
        "focal_gamma": _same("focal_gamma"),
        "focal_weight": _same("focal_weight"),
        "dice_weight": _same("dice_weight"),
        "iou_weight": _same("iou_weight"),
        "boundary_weight": _same("boundary_weight"),
    },
    "distillation": {
        "enabled": lambda v: {"_distillation_enabled": bool(v)},
        "temperature": lambda v: {"_temperature": v},
        "max_temperature": lambda v: {"_max_temperature": v},
        "min_temperature": _same("min_temperature"),
        "alpha": _same("alpha_start"),
        "beta": _same("beta_start"),
        "feature_distillation": _same("feature_distillation"),
        "attention_distillation": _same("attention_distillation"),
    },
}


def map_original_config(config: Dict[str, Any], source: str = "config") -> Dict[str, Any]:
    """Translate the guide's nested config into flat argument values (see the module docstring).

    Raises ValueError naming the first section or key it cannot map (``source`` names the file).
    """
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a JSON object with sections {sorted(GUIDE_KEYS)}")
    flat: Dict[str, Any] = {}
    problems = []
    for section, entries in config.items():
        if section not in GUIDE_KEYS:
            problems.append(f"section {section!r} (known sections: {sorted(GUIDE_KEYS)})")
            continue
        if not isinstance(entries, dict):
            problems.append(f"section {section!r} is not an object")
            continue
        for key, value in entries.items():
            mapper = GUIDE_KEYS[section].get(key)
            if mapper is None:
                problems.append(f"{section}.{key}")
                continue
            flat.update(mapper(value))
    if problems:
        raise ValueError(f"{source}: cannot map {', '.join(problems)} onto the training arguments")

    if not flat.pop("_box_augmentation", True):
        flat["box_noise_scale"] = 0.0  # no jitter, whatever box_noise_scale says
    enabled = flat.pop("_distillation_enabled", True)
    if not enabled:
        flat["teacher_model_name_or_path"] = None
    temperature, max_temperature = flat.pop("_temperature", None), flat.pop("_max_temperature", None)
    if temperature is not None and max_temperature is not None and float(temperature) != float(max_temperature):
        raise ValueError(
            f"{source}: distillation.temperature ({temperature}) and distillation.max_temperature ({max_temperature}) "
            "both give the starting temperature; make them equal or drop one"
        )
    start = max_temperature if max_temperature is not None else temperature
    if start is not None:
        flat["max_temperature"] = start
    if flat.get("model_name_or_path") is None:
        flat.pop("model_name_or_path", None)
    return flat
