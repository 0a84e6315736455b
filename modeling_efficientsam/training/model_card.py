"""The README.md written next to a fine-tuned model (and pushed with it to the Hub).

It states what the model is (base model, teacher), the recipe (every argument that differs from its
default), the data (splits, images, instances, categories), the validation metrics before and after
fine-tuning, and code that loads the model and segments boxes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional

import yaml

from .evaluation import final_metrics, load_initial_metrics
from ..file_utils import write_bytes_atomic
from ..hub_usage import usage_snippet

__all__ = ["build_model_card", "card_context", "non_default_arguments", "write_model_card"]

_METRIC_ROWS = (
    ("eval_mean_iou", "mIoU (instance mean)"),
    ("eval_mean_category_iou", "mIoU (category mean)"),
    ("eval_f1", "F1 / Dice"),
    ("eval_boundary_f1", "Boundary F-score"),
)
# Arguments that only say where things are on one machine; they stay out of the card.
_PRIVATE_FIELDS = {"output_dir", "logging_dir", "hub_token", "resume_from_checkpoint", "local_rank", "run_name",
                   "converted_models_dir", "prepared_dataset_dir", "embedding_cache_dir"}
# Fields that TrainingArguments derives from the machine or from other fields; not part of a recipe.
_DERIVED_FIELDS = {"accelerator_config", "use_cpu", "dataloader_pin_memory", "do_train", "do_eval", "do_predict",
                   "disable_tqdm", "debug", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo"}


def non_default_arguments(*argument_objects) -> Dict[str, Any]:
    """Fields of the given dataclass instances whose value differs from the field default."""
    values: Dict[str, Any] = {}
    for obj in argument_objects:
        if obj is None:
            continue
        for field in dataclasses.fields(obj):
            if not field.init or field.name in _PRIVATE_FIELDS or field.name in _DERIVED_FIELDS or field.name.startswith("_"):
                continue
            value = getattr(obj, field.name)
            if field.default is not dataclasses.MISSING:
                default = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                default = dataclasses.MISSING
            value = getattr(value, "value", value)  # enums -> their string
            default = getattr(default, "value", default)
            if not value and not default:  # None / False / [] / "" all mean "not set"
                continue
            if value != default:
                values[field.name] = value if isinstance(value, (str, int, float, bool, list, dict, type(None))) else str(value)
    return values


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4f}"
    return str(value)


def _metrics_table(before: Optional[Mapping[str, Any]], after: Optional[Mapping[str, Any]], mask_size: Optional[int] = None) -> str:
    before, after = dict(before or {}), dict(after or {})
    rows: List[tuple] = [(key, label) for key, label in _METRIC_ROWS]
    categories = sorted({k for k in list(before) + list(after) if k.startswith("eval_iou_")})
    rows += [(key, f"IoU: {key[len('eval_iou_'):]}") for key in categories]
    lines = ["| Metric (validation) | Before fine-tuning | After fine-tuning |", "| --- | --- | --- |"]
    for key, label in rows:
        lines.append(f"| {label} | {_format(before.get(key))} | {_format(after.get(key))} |")
    count = after.get("eval_num_instances", before.get("eval_num_instances"))
    if count is not None:
        size = f"{mask_size} x {mask_size} " if mask_size else ""
        lines.append(f"\nMeasured on {count} validation objects, one box prompt each (no jitter), keeping the candidate "
                     f"mask with the highest predicted IoU, thresholded at 0 on the {size}low-resolution logits.")
    return "\n".join(lines)


def build_model_card(
    *,
    model_name: str,
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    teacher_model: Optional[str] = None,
    recipe: Optional[Mapping[str, Any]] = None,
    dataset_summary: Optional[Mapping[str, Any]] = None,
    metrics_before: Optional[Mapping[str, Any]] = None,
    metrics_after: Optional[Mapping[str, Any]] = None,
    training_summary: Optional[Mapping[str, Any]] = None,
    decoder_only: bool = False,
    tags: Optional[List[str]] = None,
    license: Optional[str] = "apache-2.0",
    mask_size: Optional[int] = None,
) -> str:
    """Markdown text of the model card (YAML front matter first)."""
    front = {
        "library_name": "transformers",
        "pipeline_tag": "mask-generation",
        "tags": sorted(set(["efficientsam", "image-segmentation", "mask-generation", "box-prompts"] + list(tags or []))),
    }
    if license:
        front["license"] = license
    if base_model and not os.path.isabs(base_model) and not base_model.startswith("."):
        front["base_model"] = base_model
    if metrics_after and metrics_after.get("eval_mean_iou") is not None:
        front["model-index"] = [{
            "name": model_name,
            "results": [{
                "task": {"type": "image-segmentation", "name": "Box-prompted instance segmentation"},
                "dataset": {"type": "coco-format", "name": (dataset_summary or {}).get("name", "custom COCO data")},
                "metrics": [{"type": "mean_iou", "name": "mIoU", "value": round(float(metrics_after["eval_mean_iou"]), 4)}],
            }],
        }]
    repo = repo_id or model_name
    parts = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {model_name}", ""]
    source = f"`{base_model}`" if base_model else "a randomly initialized EfficientSAM"
    description = (f"EfficientSAM fine-tuned from {source} for box-prompted instance segmentation on COCO-format data "
                   "with the `modeling_efficientsam` training recipe (`accelerate launch train.py RECIPE`).")
    if teacher_model:
        description += f" Knowledge was distilled from the teacher `{teacher_model}` during fine-tuning."
    parts += [description, ""]

    parts += ["## Results", "", _metrics_table(metrics_before, metrics_after, mask_size), ""]

    if dataset_summary:
        parts += ["## Data", ""]
        for split, info in (dataset_summary.get("splits") or {}).items():
            parts.append(f"- `{split}`: {info.get('images', '?')} images, {info.get('instances', '?')} objects")
        categories = dataset_summary.get("categories")
        if categories:
            parts.append(f"- categories: {', '.join(str(c) for c in categories)}")
        for key in ("source", "notes"):
            if dataset_summary.get(key):
                parts.append(f"- {key}: {dataset_summary[key]}")
        parts.append("")

    parts += ["## Training", ""]
    if training_summary:
        for key, value in training_summary.items():
            parts.append(f"- {key}: {value:g}" if isinstance(value, float) else f"- {key}: {_format(value)}")
        parts.append("")
    if recipe:
        parts += ["Recipe (every argument that differs from its default):", "", "```yaml",
                  yaml.safe_dump(dict(recipe), sort_keys=True).strip(), "```", ""]

    parts += [
        "## Usage", "",
        "Needs only transformers, torch and Pillow: the model code is stored with the weights "
        "(`trust_remote_code=True`).", "",
        "```python", usage_snippet(repo).rstrip("\n"), "```", "",
        "Automatic mask generation prompts single points on a grid; the metrics above are box-prompted, "
        "so they say nothing about the quality of automatic masks.", "",
    ]
    if decoder_only:
        parts += [
            "The folder `decoder/` also holds the fine-tuned mask decoder and prompt encoder alone; put them on the",
            "base model with:", "",
            "```python",
            "from modeling_efficientsam.training import load_decoder_on_base",
            f'model = load_decoder_on_base("{base_model or "BASE_MODEL"}", "decoder")',
            "```", "",
        ]
    return "\n".join(parts)


def card_context(model_args, data_args, training_args, dataset_summary: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """What ``train.py`` tells the model card about a run: base and teacher model, recipe, data summary."""
    return {
        "base_model": model_args.model_name_or_path,
        "teacher_model": model_args.teacher_model_name_or_path,
        "model_args": model_args, "data_args": data_args,
        "recipe": non_default_arguments(model_args, data_args, training_args),
        "dataset_summary": dataset_summary,
    }


def write_model_card(trainer, model_name: Optional[str] = None, tags=None, license: Optional[str] = "apache-2.0") -> str:
    """Write ``README.md`` into ``trainer.args.output_dir`` from the trainer's run; returns its path.

    Reads ``trainer.card_context`` when train.py set it (see :func:`card_context`), the metrics before
    training from the trainer (or, after a resume, from ``output_dir``) and the final ones from its
    log history.
    """
    context: Dict[str, Any] = dict(getattr(trainer, "card_context", None) or {})
    args = trainer.args
    if model_name is None:
        model_name = args.hub_model_id.split("/")[-1] if args.hub_model_id else os.path.basename(os.path.abspath(args.output_dir))
    recipe = context.get("recipe")
    if recipe is None:
        recipe = non_default_arguments(context.get("model_args"), context.get("data_args"), args)
    after = final_metrics(trainer.state)
    before = getattr(trainer, "initial_metrics", None) or load_initial_metrics(args.output_dir)
    summary = {
        "optimizer steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0.0), 2),
        "best checkpoint step": trainer.state.best_global_step,
    }
    if context.get("train_runtime") is not None:
        summary["training time (s)"] = round(float(context["train_runtime"]), 1)
    text = build_model_card(
        model_name=model_name,
        repo_id=getattr(trainer, "hub_model_id", None) or args.hub_model_id,
        base_model=context.get("base_model"),
        teacher_model=context.get("teacher_model"),
        recipe=recipe,
        dataset_summary=context.get("dataset_summary"),
        metrics_before=before,
        metrics_after=after,
        training_summary=summary,
        decoder_only=bool(getattr(args, "save_decoder_only", False)),
        tags=tags if isinstance(tags, list) else ([tags] if tags else None),
        license=license,
        mask_size=getattr(getattr(trainer.model, "config", None), "low_res_mask_size", None),
    )
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "README.md")
    return write_bytes_atomic(path, text.encode("utf-8"))
