"""``evaluate`` metric for promptable instance segmentation: mIoU, per-category IoU, F1, boundary F1.

Load it with ``modeling_efficientsam.metrics.load_segmentation_metric()`` (a local
``evaluate.load`` of this file; no Hub access, works with ``HF_HUB_OFFLINE=1`` and
``HF_EVALUATE_OFFLINE=1``).

Design: dense 256 x 256 masks are slow to push through ``evaluate``'s Arrow storage, so the stored
features are the per-instance integer counts of
``modeling_efficientsam.metrics.functional.segmentation_statistics`` plus a category id, and
``_compute`` aggregates them with ``aggregate_segmentation_metrics``. Both the counts and the
aggregation come from ``functional.py``, the single definition used by training and evaluation.
Because only counts are stored, multi-process accumulation (``num_process``/``process_id``) stores
little data.

Two ways to feed it:

- counts, e.g. from ``batch_segmentation_statistics`` on a model batch::

      metric.add_batch(intersection=..., union=..., pred_area=..., target_area=...,
                       pred_boundary=..., pred_boundary_matched=..., target_boundary=...,
                       target_boundary_matched=..., category_id=...)

- masks, converted to counts on the fly::

      metric.add_batch(predictions=pred_masks, references=gt_masks, category_ids=cats)

  ``predictions``: ``(N, H, W)`` binary masks (bool or 0/1); pass ``predictions_are_logits=True``
  to threshold logits at 0 instead. ``references``: ``(N, H, W)`` binary masks.
  ``boundary_tolerance`` (default 2) may be given per call.

``compute(id2label=None)`` returns ``mean_iou``, ``per_category_iou``, ``mean_category_iou``,
``f1``, ``boundary_f1`` and ``num_instances``; see ``functional.py`` for the definitions and the
empty-mask conventions.
"""

import datasets
import evaluate
import torch

from .functional import (
    STATISTIC_NAMES,
    aggregate_segmentation_metrics,
    binarize,
    segmentation_statistics,
)

_DESCRIPTION = """Instance-averaged mask IoU (mIoU), per-category IoU, F1 (Dice) and boundary F-score for
one binary mask per prompt. Predictions are logits thresholded at 0 or binary masks."""

_CITATION = ""

_KWARGS_DESCRIPTION = """
Args (add_batch / compute):
    intersection, union, pred_area, target_area, pred_boundary, pred_boundary_matched,
    target_boundary, target_boundary_matched: per-instance int counts (see functional.py).
    category_id: per-instance category id (-1 for none).
    predictions, references, category_ids: alternatively, (N, H, W) masks and (N,) ids.
    predictions_are_logits: threshold predictions at 0 (default False).
    boundary_tolerance: boundary matching distance in pixels for the mask path (default 2).
    id2label (compute only): names for the per-category keys.
Returns:
    mean_iou, per_category_iou, mean_category_iou, f1, boundary_f1, num_instances.
"""

_FEATURES = datasets.Features(
    {**{name: datasets.Value("int64") for name in STATISTIC_NAMES}, "category_id": datasets.Value("int64")}
)


class EfficientSamSegmentation(evaluate.Metric):
    """Segmentation quality of one mask per prompt; see the module docstring."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_FEATURES,
            format="numpy",
        )

    @staticmethod
    def _masks_to_counts(predictions, references, category_ids, predictions_are_logits, boundary_tolerance):
        predictions = torch.as_tensor(predictions)
        references = torch.as_tensor(references)
        if predictions_are_logits:
            predictions = binarize(predictions)
        counts = segmentation_statistics(predictions, references, boundary_tolerance=boundary_tolerance)
        counts = {name: value.reshape(-1).cpu().numpy() for name, value in counts.items()}
        n = counts["intersection"].shape[0]
        if category_ids is None:
            counts["category_id"] = torch.full((n,), -1, dtype=torch.int64).numpy()
        else:
            counts["category_id"] = torch.as_tensor(category_ids).reshape(-1).to(torch.int64).cpu().numpy()
        return counts

    def add_batch(
        self,
        *,
        predictions=None,
        references=None,
        category_ids=None,
        predictions_are_logits=False,
        boundary_tolerance=2,
        **counts,
    ):
        """Add instances, either as masks (``predictions``/``references``) or as per-instance counts."""
        if predictions is not None or references is not None:
            if predictions is None or references is None:
                raise ValueError("pass both predictions and references (masks), or the per-instance counts")
            if counts:
                raise ValueError("pass either masks (predictions/references) or counts, not both")
            counts = self._masks_to_counts(
                predictions, references, category_ids, predictions_are_logits, boundary_tolerance
            )
        else:
            if category_ids is not None:
                counts.setdefault("category_id", category_ids)
            counts = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in counts.items()}
        return super().add_batch(**counts)

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Add the given instances, if any, then aggregate everything added so far."""
        feature_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _FEATURES}
        mask_kwargs = {
            k: kwargs.pop(k) for k in ("category_ids", "predictions_are_logits", "boundary_tolerance") if k in kwargs
        }
        if predictions is not None or references is not None or feature_kwargs:
            self.add_batch(predictions=predictions, references=references, **mask_kwargs, **feature_kwargs)
        if self.writer is None:
            # Nothing was ever added: report the empty result instead of failing in evaluate.
            return aggregate_segmentation_metrics(
                {name: [] for name in STATISTIC_NAMES}, category_ids=[], id2label=kwargs.get("id2label")
            )
        return super().compute(**kwargs)

    def _compute(self, id2label=None, **counts):
        category_ids = counts.pop("category_id")
        return aggregate_segmentation_metrics(counts, category_ids=category_ids, id2label=id2label)
