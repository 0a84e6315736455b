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

from ..metrics import STATISTIC_NAMES, batch_segmentation_statistics, load_segmentation_metric
from ..file_utils import write_json_atomic

__all__ = [
    "INITIAL_METRICS_FILE",
    "STATISTIC_COLUMNS",
    "SegmentationMetrics",
    "adjust_evaluation_arguments",
    "final_metrics",
    "load_initial_metrics",
    "query_statistics",
    "save_initial_metrics",
]

INITIAL_METRICS_FILE = "eval_before_training.json"
# Columns of query_statistics: the metric counts, then the category and the real-query flag.
STATISTIC_COLUMNS = tuple(STATISTIC_NAMES) + ("category_id", "valid")
# The metric that marks an evaluation entry of the log history.
_MARKER_METRIC = "eval_mean_iou"


def query_statistics(pred_masks: torch.Tensor, iou_scores: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(B, Q, len(STATISTIC_COLUMNS))`` int64: counts of the highest-IoU candidate, category, real-query flag."""
    batch, queries = inputs["query_mask"].shape
    counts = batch_segmentation_statistics(
        pred_masks=pred_masks.float(), iou_scores=iou_scores.float(), labels=inputs["labels"],
        category_ids=inputs["category_ids"],
    )
    columns = [counts[name].reshape(batch, queries).to(torch.int64) for name in STATISTIC_NAMES]
    columns.append(counts["category_id"].reshape(batch, queries))
    columns.append(inputs["query_mask"].to(torch.int64))
    return torch.stack(columns, dim=-1)


class SegmentationMetrics:
    """``compute_metrics`` over the gathered rows of :func:`query_statistics`.

    Args:
        id2label: category index -> name, for the ``iou_<category>`` keys (indices when None).
    """

    def __init__(self, id2label: Optional[Mapping[int, str]] = None):
        self.id2label = dict(id2label) if id2label is not None else None
        self._metric = None

    def __call__(self, eval_prediction) -> Dict[str, float]:
        rows = np.asarray(eval_prediction.predictions).reshape(-1, len(STATISTIC_COLUMNS))
        rows = rows[rows[:, -1] == 1]  # real queries only (padding and cross-process padding are dropped)
        if self._metric is None:
            self._metric = load_segmentation_metric(keep_in_memory=True)
        counts = {name: rows[:, index].astype(np.int64) for index, name in enumerate(STATISTIC_COLUMNS[:-1])}
        result = self._metric.compute(id2label=self.id2label, **counts)
        metrics = {key: float(result[key]) for key in ("mean_iou", "mean_category_iou", "f1", "boundary_f1")}
        metrics["num_instances"] = int(result["num_instances"])
        for category, value in result["per_category_iou"].items():
            metrics[f"iou_{category}"] = float(value)
        return metrics


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
