"""The models and the processor of a training run, from ``ModelArguments``.

* :func:`build_student`: a pretrained student (a transformers folder, a Hub id, or an original
  EfficientSAM ``.pt`` checkpoint converted once), or a randomly initialized one from a released
  variant or a config; the frozen parts are set from ``freeze_vision_encoder`` /
  ``freeze_prompt_encoder``.
* :func:`build_teacher`: the teacher, frozen and in eval mode (None without one).
* :func:`build_processor`: the processor saved with the student, or a default one for its input size.

A model that cannot be loaded (a mistyped folder, a Hub id offline, damaged weights, a broken
``model_config`` file or original checkpoint) is a :class:`~.run_checks.TrainingSetupError` naming
the argument, the file and the fix; loading goes through the package's one loader,
:func:`~modeling_efficientsam.inference.loading.load_efficientsam_model`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Tuple

from .run_checks import TrainingSetupError

__all__ = [
    "ORIGINAL_CHECKPOINT_SUFFIXES",
    "build_processor",
    "build_student",
    "build_teacher",
    "load_pretrained",
    "resolve_model_source",
]

logger = logging.getLogger(__name__)

ORIGINAL_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pt.zip")


def resolve_model_source(source: str, converted_models_dir: str, training_args, argument: str = "model_name_or_path") -> str:
    """A transformers folder / Hub id as is; an original .pt checkpoint converted once (main process first)."""
    if not source.endswith(ORIGINAL_CHECKPOINT_SUFFIXES):
        return source
    from ..convert_efficientsam_to_hf import convert

    name = os.path.basename(source)
    for suffix in ORIGINAL_CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    # efficient_sam_vitt.pt -> <converted_models_dir>/efficientsam-vitt (the folder the recipes name)
    target = os.path.join(converted_models_dir, name.replace("efficient_sam", "efficientsam").replace("_", "-"))
    with training_args.main_process_first(desc=f"converting {source}"):
        if not os.path.isfile(os.path.join(target, "config.json")):
            logger.info("converting the original checkpoint %s into %s", source, target)
            try:
                convert(source, target)
            except (OSError, ValueError, KeyError) as error:
                raise TrainingSetupError(
                    f"{argument} {source}: the original checkpoint cannot be converted ({' '.join(str(error).split())}). "
                    "Fix: check the path (or Hub file) of the .pt checkpoint, or convert it once with "
                    "python -m modeling_efficientsam.convert_efficientsam_to_hf"
                ) from error
    return target


def load_pretrained(source: str, revision: str = "main", attn_implementation: Optional[str] = None,
                    argument: str = "model_name_or_path"):
    """``EfficientSamModel.from_pretrained`` (through ``load_efficientsam_model``) with the run's revision and
    attention implementation; a model that cannot be loaded is a TrainingSetupError naming ``argument``."""
    from ..inference.loading import ModelLoadError, load_efficientsam_model

    kwargs = {"revision": revision}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return load_efficientsam_model(source, **kwargs)
    except ModelLoadError as error:
        raise TrainingSetupError(f"{argument}: {error}") from error


def build_student(model_args, training_args) -> Tuple[object, str]:
    """The student model (frozen parts set) and a short description of where it came from."""
    from ..configuration_efficientsam import EfficientSamConfig
    from ..modeling_efficientsam import EfficientSamModel

    if model_args.model_name_or_path is not None:
        source = resolve_model_source(model_args.model_name_or_path, model_args.converted_models_dir, training_args)
        model = load_pretrained(source, model_args.model_revision, model_args.attn_implementation)
        origin = model_args.model_name_or_path
    else:
        if model_args.model_variant is not None:
            config = EfficientSamConfig.from_variant(model_args.model_variant)
            origin = f"random initialization ({model_args.model_variant})"
        else:
            spec = model_args.model_config
            if isinstance(spec, str):
                spec = _read_model_config(spec)
            config = EfficientSamConfig(**{k: v for k, v in spec.items() if k not in ("model_type", "architectures", "auto_map")})
            origin = "random initialization (custom config)"
        kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
        model = EfficientSamModel._from_config(config, **kwargs)
    model.vision_encoder.requires_grad_(not model_args.freeze_vision_encoder)
    model.prompt_encoder.requires_grad_(not model_args.freeze_prompt_encoder)
    return model, origin


def _read_model_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as error:
        raise TrainingSetupError(f"model_config {path}: no such file. Fix: give the path of a config.json "
                                 "(recipes/configs/ has examples)") from error
    except (OSError, ValueError) as error:
        raise TrainingSetupError(f"model_config {path}: cannot be read as JSON ({' '.join(str(error).split())}). "
                                 "Fix: repair the file (recipes/configs/ has examples)") from error


def build_teacher(model_args, training_args):
    """The frozen teacher in eval mode, or None when the run has none."""
    if model_args.teacher_model_name_or_path is None:
        return None
    source = resolve_model_source(model_args.teacher_model_name_or_path, model_args.converted_models_dir, training_args,
                                  argument="teacher_model_name_or_path")
    teacher = load_pretrained(source, model_args.teacher_revision, model_args.attn_implementation,
                              argument="teacher_model_name_or_path")
    teacher.requires_grad_(False)
    return teacher.eval()


def build_processor(model_args, model):
    """The student's saved processor when its folder has one, else the default processor for its input size."""
    from ..image_processing_efficientsam import EfficientSamImageProcessor
    from ..processing_efficientsam import EfficientSamProcessor, load_processor

    source = model_args.model_name_or_path
    if source is not None and os.path.isdir(source):
        return load_processor(source, image_size=model.config.image_size)
    return EfficientSamProcessor(EfficientSamImageProcessor(size=model.config.image_size))
