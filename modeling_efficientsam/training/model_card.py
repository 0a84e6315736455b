"""The README.md written next to a fine-tuned model (and pushed with it to the Hub).

It states what the model is (base model, teacher), the recipe (every argument that differs from its
default), the data (splits, images, instances, categories), the validation metrics before and after
fine-tuning, and code that loads the model and segments boxes.

The YAML metadata is ``huggingface_hub.ModelCardData``: ``library_name``, ``pipeline_tag:
mask-generation``, license, tags, ``base_model`` (only a Hub model id: a local folder is named in the
text, not in the metadata; ``owner/repo/file.pt``, an original checkpoint on the Hub, names
``owner/repo``), ``datasets`` (when the run trained on a Hub dataset) and a ``model-index`` with one
``EvalResult`` per reported validation metric of the fine-tuned model (mIoU, category mIoU, F1,
boundary F, mask AP when measured, and the IoU of each category; see ``_METRIC_ROWS``: the metric
keys ``eval_mean_iou``, ``eval_mean_category_iou``, ``eval_f1``, ``eval_boundary_f1``, ``eval_ap``,
``eval_ap50``, ``eval_ap75`` and ``eval_iou_<category>``; NaN values are left out). Each result names the task
(``mask-generation``, box-prompted), the split and the dataset: its Hub id as ``type`` when it came from
the Hub, else the local folder's name with ``type: local`` (the data is not on the Hub, so there is no
dataset id to give).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional

import yaml

from .evaluation import final_metrics, load_initial_metrics
from .model_building import ORIGINAL_CHECKPOINT_SUFFIXES
from ..file_utils import write_bytes_atomic
from ..hub_usage import MINIMUM_VERSIONS, usage_snippet

__all__ = ["LOCAL_DATASET_TYPE", "build_model_card", "card_context", "eval_results", "hub_base_model",
           "non_default_arguments", "write_model_card"]

# (metric key, table label, model-index metric type, model-index metric name). The first four are always
# in the table; the mask AP rows only when a run measured them.
_METRIC_ROWS = (
    ("eval_mean_iou", "mIoU (instance mean)", "mean_iou", "mIoU (instance mean)"),
    ("eval_mean_category_iou", "mIoU (category mean)", "mean_category_iou", "mIoU (category mean)"),
    ("eval_f1", "F1 / Dice", "f1", "F1 (Dice)"),
    ("eval_boundary_f1", "Boundary F-score", "boundary_f1", "Boundary F-score"),
)
_OPTIONAL_METRIC_ROWS = (
    ("eval_ap", "mask AP", "mask_ap", "mask AP (COCO, IoU 0.50:0.95)"),
    ("eval_ap50", "mask AP50", "mask_ap50", "mask AP50"),
    ("eval_ap75", "mask AP75", "mask_ap75", "mask AP75"),
)
_CATEGORY_PREFIX = "eval_iou_"
#: ``dataset.type`` of the model-index when the data is not a Hub dataset (there is no id to give).
LOCAL_DATASET_TYPE = "local"
TASK_TYPE = "mask-generation"
TASK_NAME = "Box-prompted instance segmentation"
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


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rows(before: Mapping[str, Any], after: Mapping[str, Any]) -> List[tuple]:
    """(key, table label, metric type, metric name, config) of every metric the card reports."""
    present = set(before) | set(after)
    rows = [(key, label, kind, name, None) for key, label, kind, name in _METRIC_ROWS]
    rows += [(key, label, kind, name, None) for key, label, kind, name in _OPTIONAL_METRIC_ROWS if key in present]
    for key in sorted(k for k in present if k.startswith(_CATEGORY_PREFIX)):
        category = key[len(_CATEGORY_PREFIX):]
        rows.append((key, f"IoU: {category}", "iou", f"IoU ({category})", category))
    return rows


def hub_base_model(name: Optional[str]) -> Optional[str]:
    """The Hub model id that ``name`` (a ``model_name_or_path``) stands for, or None for a local path.

    ``owner/repo`` (not an existing local path) is itself; ``owner/repo/file.pt`` (an original checkpoint
    on the Hub, converted by train.py) is ``owner/repo``; anything else (folders, absolute or relative
    paths, URLs) is None, so the card's metadata never names a model the Hub does not have.
    """
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or "://" in name or os.path.exists(name):
        return None
    parts = name.split("/")
    if len(parts) < 2 or not all(re.fullmatch(r"[A-Za-z0-9][\w.-]*", part) for part in parts[:2]):
        return None
    if len(parts) == 2:
        return name
    return "/".join(parts[:2]) if name.endswith(ORIGINAL_CHECKPOINT_SUFFIXES) else None


def eval_results(metrics: Optional[Mapping[str, Any]], dataset_summary: Optional[Mapping[str, Any]] = None) -> list:
    """One ``huggingface_hub.EvalResult`` per finite metric of ``metrics`` that the card reports."""
    from huggingface_hub import EvalResult

    metrics, summary = dict(metrics or {}), dict(dataset_summary or {})
    hub_id = summary.get("hub_id")
    dataset = dict(
        dataset_type=hub_id or LOCAL_DATASET_TYPE,
        dataset_name=hub_id or summary.get("name") or "local COCO-format data",
        dataset_split=summary.get("evaluation_split", "validation"),
        dataset_revision=summary.get("revision") if hub_id else None,
    )
    return [
        EvalResult(task_type=TASK_TYPE, task_name=TASK_NAME, metric_type=kind, metric_name=name, metric_config=config,
                   metric_value=float(metrics[key]), **dataset)
        for key, _, kind, name, config in _rows({}, metrics) if _finite(metrics.get(key))
    ]


def _metrics_table(before: Optional[Mapping[str, Any]], after: Optional[Mapping[str, Any]], mask_size: Optional[int] = None,
                   split: str = "validation") -> str:
    before, after = dict(before or {}), dict(after or {})
    rows: List[tuple] = [(key, label) for key, label, *_ in _rows(before, after)]
    lines = [f"| Metric ({split}) | Before fine-tuning | After fine-tuning |", "| --- | --- | --- |"]
    for key, label in rows:
        lines.append(f"| {label} | {_format(before.get(key))} | {_format(after.get(key))} |")
    count = after.get("eval_num_instances", before.get("eval_num_instances"))
    if count is not None:
        size = f"{mask_size} x {mask_size} " if mask_size else ""
        lines.append(f"\nMeasured on {count} {split} objects, one box prompt each (no jitter), keeping the candidate "
                     f"mask with the highest predicted IoU, thresholded at 0 on the {size}low-resolution logits.")
    return "\n".join(lines)


def _prompt_dependence_text(after: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The wrong-box check of the final evaluation (metrics/prompt_dependence.py), as a paragraph."""
    from ..metrics.prompt_dependence import prompt_dependence_summary, prompt_dependence_warning

    after = dict(after or {})
    own, wrong = after.get("eval_own_box_mean_iou"), after.get("eval_wrong_box_mean_iou")
    if not (_finite(own) and _finite(wrong)):
        return None
    summary = prompt_dependence_summary(own, wrong)
    text = (f"**Does it use its box?** mIoU {own:.3f} with each object's own box, {wrong:.3f} with a wrong box (another "
            f"object's box in the same image, or the box moved off a lone object): gap {summary['prompt_gap']:.3f}.")
    warning = prompt_dependence_warning(summary)
    return text + (f" Warning: {warning}" if warning else " The masks follow the prompt.")


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
    """Markdown text of the model card (YAML front matter first; see the module docstring for the metadata).

    ``dataset_summary`` may carry ``hub_id`` / ``revision`` (the run's Hub dataset) and
    ``evaluation_split`` (the split the metrics were measured on, default ``validation``).
    """
    from huggingface_hub import ModelCardData

    hub_dataset = (dataset_summary or {}).get("hub_id")
    card_data = ModelCardData(
        model_name=model_name,
        base_model=hub_base_model(base_model),
        datasets=[hub_dataset] if hub_dataset else None,
        library_name="transformers",
        pipeline_tag="mask-generation",
        license=license or None,
        tags=sorted(set(["efficientsam", "image-segmentation", "mask-generation", "box-prompts"] + list(tags or []))),
        eval_results=eval_results(metrics_after, dataset_summary) or None,
    )
    repo = repo_id or model_name
    parts = ["---", card_data.to_yaml().strip(), "---", "", f"# {model_name}", ""]
    source = f"`{base_model}`" if base_model else "a randomly initialized EfficientSAM"
    description = (f"EfficientSAM fine-tuned from {source} for box-prompted instance segmentation on COCO-format data "
                   "with the `modeling_efficientsam` training recipe (`accelerate launch train.py RECIPE`).")
    if teacher_model:
        description += f" Knowledge was distilled from the teacher `{teacher_model}` during fine-tuning."
    parts += [description, ""]

    split = (dataset_summary or {}).get("evaluation_split", "validation")
    parts += ["## Results", "", _metrics_table(metrics_before, metrics_after, mask_size, split), ""]
    prompt_text = _prompt_dependence_text(metrics_after)
    if prompt_text:
        parts += [prompt_text, ""]

    if dataset_summary:
        parts += ["## Data", ""]
        for split, info in (dataset_summary.get("splits") or {}).items():
            parts.append(f"- `{split}`: {info.get('images', '?')} images, {info.get('instances', '?')} objects")
        categories = dataset_summary.get("categories")
        if categories:
            parts.append(f"- categories: {', '.join(str(c) for c in categories)}")
        if hub_dataset:
            revision = dataset_summary.get("revision")
            parts.append(f"- source: the Hub dataset [`{hub_dataset}`](https://huggingface.co/datasets/{hub_dataset})"
                         + (f" at revision `{revision}`" if revision else ""))
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
        f"Needs only transformers (>= {MINIMUM_VERSIONS['transformers']}), torch (>= {MINIMUM_VERSIONS['torch']}) "
        "and Pillow: the model code is stored with the weights (`trust_remote_code=True`).", "",
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
