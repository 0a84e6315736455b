"""What the trainer's evaluation measures and what it keeps of it.

Protocol: one box per validation object, without jitter (the evaluation dataset is built that way),
the candidate mask with the highest predicted IoU, thresholded at 0 in the low-resolution mask frame.

* :func:`query_statistics` turns one batch of predictions into per-query integer counts (the
  statistics of :mod:`modeling_efficientsam.metrics`, the category and a real-query flag). The
  trainer's ``prediction_step`` returns them as its "logits", so the Trainer gathers them across
  processes like any prediction and the metrics are exact over the whole split.
* :class:`SegmentationMetrics` is the ``compute_metrics`` of the trainer: it drops padded rows and
  computes ``mean_iou``, ``mean_category_iou``, ``f1``, ``boundary_f1``, ``num_instances`` and
  ``iou_<category>`` with the package's ``evaluate`` metric.
* Prompt dependence (:mod:`modeling_efficientsam.metrics.prompt_dependence`): the trainer also asks
  the model each question with a wrong box (:func:`wrong_box_points`: another object's box of the
  same image, or the box moved off a lone object), reusing the image embeddings, and
  :func:`query_statistics` appends the counts of that answer against the object's own mask
  (:data:`WRONG_BOX_COLUMNS`). :class:`SegmentationMetrics` then adds ``wrong_box_mean_iou`` and
  ``prompt_gap`` (``mean_iou`` minus it), and :class:`PromptDependenceCallback` logs a warning when
  a trained model's gap is small (it ignores its prompts).
* The evaluation before the first optimizer step is the "before fine-tuning" column of the model
  card: :func:`save_initial_metrics` / :func:`load_initial_metrics` keep it in
  ``<output_dir>/eval_before_training.json`` (a resumed run reads it back), and
  :func:`final_metrics` finds the "after" column in the log history.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Optional

import numpy as np
import torch

from transformers import TrainerCallback

from ..metrics import STATISTIC_NAMES, batch_segmentation_statistics, load_segmentation_metric
from ..metrics.prompt_dependence import DEFAULT_MIN_PROMPT_GAP, prompt_dependence_summary, warn_if_prompt_ignored, wrong_boxes
from ..file_utils import write_json_atomic
from ..modeling_efficientsam import LABEL_BOX_BOTTOM_RIGHT, LABEL_BOX_TOP_LEFT

__all__ = [
    "INITIAL_METRICS_FILE",
    "PromptDependenceCallback",
    "STATISTIC_COLUMNS",
    "SegmentationMetrics",
    "WRONG_BOX_COLUMNS",
    "adjust_evaluation_arguments",
    "final_metrics",
    "load_initial_metrics",
    "query_statistics",
    "save_initial_metrics",
    "wrong_box_points",
]

INITIAL_METRICS_FILE = "eval_before_training.json"
# Columns of query_statistics: the metric counts, then the category and the real-query flag.
STATISTIC_COLUMNS = tuple(STATISTIC_NAMES) + ("category_id", "valid")
# Appended by query_statistics when the wrong-box answers are given: that answer's intersection and
# union with the object's own mask, and whether the query had a wrong box (box queries only).
WRONG_BOX_COLUMNS = ("wrong_intersection", "wrong_union", "wrong_valid")
# The metric that marks an evaluation entry of the log history.
_MARKER_METRIC = "eval_mean_iou"


def wrong_box_points(inputs: Mapping[str, torch.Tensor], image_size: int):
    """``(input_points, wrong_valid)``: the batch's box prompts replaced by wrong boxes.

    For each image, the box of every real box query (corner points labelled 2 and 3) is replaced by
    :func:`~modeling_efficientsam.metrics.prompt_dependence.wrong_boxes` of the image's boxes (in the
    ``image_size`` square model frame). ``wrong_valid`` ``(B, Q)`` bool is False for padded and
    point queries, which keep their prompt and are left out of the wrong-box metrics.
    """
    points, labels = inputs["input_points"], inputs["input_labels"]
    query_mask = inputs["query_mask"].bool()
    is_box = (labels[..., 0] == LABEL_BOX_TOP_LEFT) & (labels[..., 1] == LABEL_BOX_BOTTOM_RIGHT) if labels.shape[-1] >= 2 \
        else torch.zeros_like(query_mask)
    valid = query_mask & is_box
    wrong = points.clone()
    cpu_points, cpu_valid = points.detach().float().cpu().numpy(), valid.cpu().numpy()
    for b in range(points.shape[0]):
        queries = np.nonzero(cpu_valid[b])[0]
        if len(queries) == 0:
            continue
        boxes = cpu_points[b, queries, :2].reshape(-1, 4)
        replaced = torch.from_numpy(wrong_boxes(boxes, image_size, image_size).reshape(-1, 2, 2)).to(points)
        wrong[b, torch.from_numpy(queries).to(points.device), :2] = replaced
    return wrong, valid


def query_statistics(pred_masks: torch.Tensor, iou_scores: torch.Tensor, inputs: Mapping[str, torch.Tensor],
                     wrong_pred_masks: Optional[torch.Tensor] = None, wrong_iou_scores: Optional[torch.Tensor] = None,
                     wrong_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(B, Q, C)`` int64: counts of the highest-IoU candidate, category, real-query flag
    (:data:`STATISTIC_COLUMNS`), then, when the wrong-box answers ``wrong_pred_masks`` /
    ``wrong_iou_scores`` / ``wrong_valid`` (see :func:`wrong_box_points`) are given, :data:`WRONG_BOX_COLUMNS`."""
    batch, queries = inputs["query_mask"].shape
    counts = batch_segmentation_statistics(
        pred_masks=pred_masks.float(), iou_scores=iou_scores.float(), labels=inputs["labels"],
        category_ids=inputs["category_ids"],
    )
    columns = [counts[name].reshape(batch, queries).to(torch.int64) for name in STATISTIC_NAMES]
    columns.append(counts["category_id"].reshape(batch, queries))
    columns.append(inputs["query_mask"].to(torch.int64))
    if wrong_pred_masks is not None:
        wrong = batch_segmentation_statistics(pred_masks=wrong_pred_masks.float(), iou_scores=wrong_iou_scores.float(),
                                              labels=inputs["labels"])
        columns.append(wrong["intersection"].reshape(batch, queries).to(torch.int64))
        columns.append(wrong["union"].reshape(batch, queries).to(torch.int64))
        columns.append(wrong_valid.reshape(batch, queries).to(torch.int64))
    return torch.stack(columns, dim=-1)


def _mean_instance_iou(intersection: np.ndarray, union: np.ndarray) -> float:
    if len(union) == 0:
        return float("nan")
    return float(np.mean(np.where(union > 0, intersection / np.maximum(union, 1), 1.0)))


class SegmentationMetrics:
    """``compute_metrics`` over the gathered rows of :func:`query_statistics`.

    Args:
        id2label: category index -> name, for the ``iou_<category>`` keys (indices when None).
    """

    def __init__(self, id2label: Optional[Mapping[int, str]] = None):
        self.id2label = dict(id2label) if id2label is not None else None
        self._metric = None

    def __call__(self, eval_prediction) -> Dict[str, float]:
        predictions = np.asarray(eval_prediction.predictions)
        width = predictions.shape[-1]
        if width not in (len(STATISTIC_COLUMNS), len(STATISTIC_COLUMNS) + len(WRONG_BOX_COLUMNS)):
            raise ValueError(f"evaluation rows have {width} columns; expected those of query_statistics")
        all_rows = predictions.reshape(-1, width)
        valid = len(STATISTIC_COLUMNS) - 1
        rows = all_rows[all_rows[:, valid] == 1]  # real queries only (padding and cross-process padding are dropped)
        if self._metric is None:
            self._metric = load_segmentation_metric(keep_in_memory=True)
        counts = {name: rows[:, index].astype(np.int64) for index, name in enumerate(STATISTIC_COLUMNS[:-1])}
        result = self._metric.compute(id2label=self.id2label, **counts)
        metrics = {key: float(result[key]) for key in ("mean_iou", "mean_category_iou", "f1", "boundary_f1")}
        metrics["num_instances"] = int(result["num_instances"])
        for category, value in result["per_category_iou"].items():
            metrics[f"iou_{category}"] = float(value)
        if width > len(STATISTIC_COLUMNS):
            wrong = rows[rows[:, -1] == 1]
            base = len(STATISTIC_COLUMNS)
            own = _mean_instance_iou(wrong[:, 0].astype(np.float64), wrong[:, 1].astype(np.float64))
            moved = _mean_instance_iou(wrong[:, base].astype(np.float64), wrong[:, base + 1].astype(np.float64))
            metrics["own_box_mean_iou"] = own  # over the queries that also got a wrong box
            metrics["wrong_box_mean_iou"] = moved
            metrics["prompt_gap"] = own - moved
        return metrics


class PromptDependenceCallback(TrainerCallback):
    """Warn, after an evaluation of a trained model (step > 0), when its ``prompt_gap`` is below
    ``min_prompt_gap``: the model returns about the same mask whatever box it is given.

    The warnings given are kept in ``warnings`` (one string per evaluation that warned)."""

    def __init__(self, min_prompt_gap: float = DEFAULT_MIN_PROMPT_GAP):
        self.min_prompt_gap = float(min_prompt_gap)
        self.warnings = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or state.global_step == 0:  # an untrained model ignoring its prompts is no news
            return
        for key in [k for k in metrics if k.endswith("_wrong_box_mean_iou")]:
            prefix = key[: -len("wrong_box_mean_iou")]
            own = metrics.get(prefix + "own_box_mean_iou")
            if own is None or np.isnan(own) or np.isnan(metrics[key]):
                continue
            summary = prompt_dependence_summary(own, metrics[key], self.min_prompt_gap)
            message = warn_if_prompt_ignored(summary, where=f"evaluation at step {state.global_step}")
            if message is not None:
                self.warnings.append(message)


def save_initial_metrics(output_dir: str, metrics: Mapping[str, float]) -> str:
    """Write the metrics of the evaluation before training to ``output_dir``; returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, INITIAL_METRICS_FILE)
    return write_json_atomic(path, dict(metrics), indent=2, sort_keys=True)


def load_initial_metrics(output_dir: str) -> Optional[Dict[str, float]]:
    """The metrics saved by :func:`save_initial_metrics` in ``output_dir`` (None when there are none)."""
    path = os.path.join(output_dir, INITIAL_METRICS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def final_metrics(state) -> Optional[Dict[str, float]]:
    """The evaluation of the best checkpoint in ``state.log_history`` when known, else the last one."""
    evaluations = [entry for entry in state.log_history if _MARKER_METRIC in entry]
    if not evaluations:
        return None
    if state.best_global_step:
        for entry in evaluations:
            if entry.get("step") == state.best_global_step:
                return entry
    return evaluations[-1]


def adjust_evaluation_arguments(training_args, has_validation: bool) -> None:
    """Switch off what needs a validation split when there is none, and the evaluation before
    training when a resumed run has already measured it."""
    if not has_validation:
        training_args.eval_strategy = "no"
        training_args.load_best_model_at_end = False
        training_args.eval_on_start = False
    if training_args.resume_from_checkpoint and os.path.isfile(os.path.join(training_args.output_dir, INITIAL_METRICS_FILE)):
        training_args.eval_on_start = False
