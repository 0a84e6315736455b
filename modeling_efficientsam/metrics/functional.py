"""Plain-function segmentation metrics shared by training, evaluation and the ``evaluate`` module.

Everything here works on binary masks of one query each ("instances"), laid out as tensors of shape
``(..., H, W)``. Predictions coming from the model are mask *logits*; they are binarized with
:func:`binarize` (``logits > 0``, the model's mask threshold) before any metric is computed.

Design
------
Metrics are computed in two stages so that they can be accumulated over many batches and over
several processes without ever shipping dense masks around:

1. :func:`segmentation_statistics` turns a stack of predicted and reference masks into a handful of
   integer counts per instance (intersection, union, areas, boundary pixel counts).
2. :func:`aggregate_segmentation_metrics` turns the concatenated counts of a whole evaluation set
   into the reported numbers.

The single-instance helpers (:func:`mask_iou`, :func:`f1`, :func:`boundary_f_score`) go through the
same two stages, so there is exactly one definition of each metric.

Definitions and conventions
---------------------------
- IoU of one instance: ``|P & T| / |P | T|``. Both masks empty -> 1.0 (the prediction is exactly
  right); exactly one empty -> 0.0 (follows from the formula).
- F1 of one instance (equal to the Dice coefficient): ``2 |P & T| / (|P| + |T|)``. Both empty -> 1.0,
  exactly one empty -> 0.0.
- Boundary of a mask: foreground pixels with at least one background pixel among their 8 neighbours.
  The outside of the image does *not* count as background, so the image border is never a boundary
  (a mask covering the whole image has an empty boundary).
- Boundary F-score of one instance, with tolerance ``d`` pixels (Chebyshev distance, i.e. a square
  ``(2d+1) x (2d+1)`` neighbourhood): precision = share of predicted boundary pixels with a reference
  boundary pixel within ``d``; recall = share of reference boundary pixels with a predicted boundary
  pixel within ``d``; F = 2PR / (P + R) (0 when P + R = 0). Both boundaries empty -> 1.0; exactly
  one empty -> 0.0.
- ``mean_iou`` is *instance-averaged*: the mean of the per-instance IoU over all instances (not the
  semantic-segmentation style ratio of summed intersections to summed unions). ``per_category_iou``
  is the mean IoU of the instances of each category, and ``mean_category_iou`` is the unweighted mean
  of those per-category values. ``f1`` and ``boundary_f1`` are instance-averaged too.
- With zero instances every averaged metric is ``nan``.

This file imports only ``torch`` and ``numpy`` and no other file of this package: the ``evaluate``
module next to it imports it relatively, and ``evaluate.load`` copies both files into its own cache.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "STATISTIC_NAMES",
    "binarize",
    "mask_boundary",
    "dilate",
    "segmentation_statistics",
    "instance_metrics_from_statistics",
    "mask_iou",
    "f1",
    "boundary_f_score",
    "aggregate_segmentation_metrics",
    "select_by_predicted_iou",
    "batch_segmentation_statistics",
]

#: Names (and order) of the per-instance counts produced by :func:`segmentation_statistics`.
STATISTIC_NAMES = (
    "intersection",
    "union",
    "pred_area",
    "target_area",
    "pred_boundary",
    "pred_boundary_matched",
    "target_boundary",
    "target_boundary_matched",
)


def binarize(logits: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Boolean mask ``logits > threshold`` (the model's mask threshold is 0 on the logits)."""
    return logits > threshold


def _as_bool_mask(mask) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        # Values in {0, 1} (or probabilities): foreground is anything above one half.
        return mask > 0.5
    return mask != 0


def _flatten_masks(mask: torch.Tensor) -> torch.Tensor:
    """``(..., H, W)`` -> ``(N, 1, H, W)`` float, ready for pooling."""
    if mask.ndim < 2:
        raise ValueError(f"masks need at least 2 dimensions (H, W), got shape {tuple(mask.shape)}")
    return mask.reshape(-1, 1, *mask.shape[-2:]).float()


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilate boolean masks ``(..., H, W)`` with a square ``(2r+1) x (2r+1)`` structuring element."""
    mask = _as_bool_mask(mask)
    if radius <= 0:
        return mask
    flat = _flatten_masks(mask)
    out = F.max_pool2d(flat, kernel_size=2 * radius + 1, stride=1, padding=radius)
    return out.reshape(mask.shape) > 0.5


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    # Erosion is dilation of the complement. max_pool2d pads with -inf, so pixels outside the image
    # never count as background: the image border does not erode the mask.
    if radius <= 0:
        return mask
    flat = _flatten_masks(mask)
    out = -F.max_pool2d(-flat, kernel_size=2 * radius + 1, stride=1, padding=radius)
    return out.reshape(mask.shape) > 0.5


def mask_boundary(mask) -> torch.Tensor:
    """Boundary pixels of boolean masks ``(..., H, W)``: foreground pixels with a background 8-neighbour."""
    mask = _as_bool_mask(mask)
    return mask & ~_erode(mask, 1)


def segmentation_statistics(pred, target, *, boundary_tolerance: int = 2) -> Dict[str, torch.Tensor]:
    """Per-instance integer counts from binary masks.

    Args:
        pred: predicted binary masks ``(..., H, W)`` (bool, or 0/1 numbers). Binarize logits first
            with :func:`binarize`.
        target: reference binary masks, same shape.
        boundary_tolerance: matching distance for boundary pixels, in pixels (Chebyshev distance).

    Returns:
        A dict with one int64 tensor of shape ``pred.shape[:-2]`` per name in :data:`STATISTIC_NAMES`:
        ``intersection``, ``union``, ``pred_area``, ``target_area``, ``pred_boundary`` (number of
        predicted boundary pixels), ``pred_boundary_matched`` (those within the tolerance of a
        reference boundary pixel), ``target_boundary`` and ``target_boundary_matched`` (the same
        from the reference side).
    """
    pred = _as_bool_mask(pred)
    target = _as_bool_mask(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != reference shape {tuple(target.shape)}")
    if boundary_tolerance < 0:
        raise ValueError(f"boundary_tolerance must be >= 0, got {boundary_tolerance}")

    def count(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-2).sum(-1, dtype=torch.int64)

    pred_edge = mask_boundary(pred)
    target_edge = mask_boundary(target)
    return {
        "intersection": count(pred & target),
        "union": count(pred | target),
        "pred_area": count(pred),
        "target_area": count(target),
        "pred_boundary": count(pred_edge),
        "pred_boundary_matched": count(pred_edge & dilate(target_edge, boundary_tolerance)),
        "target_boundary": count(target_edge),
        "target_boundary_matched": count(target_edge & dilate(pred_edge, boundary_tolerance)),
    }


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def instance_metrics_from_statistics(statistics: Mapping[str, object]) -> Dict[str, np.ndarray]:
    """Per-instance ``iou``, ``f1`` and ``boundary_f1`` (float64 arrays) from the counts.

    Applies the empty-mask conventions in the module docstring.
    """
    s = {name: _to_numpy(statistics[name]).astype(np.float64) for name in STATISTIC_NAMES}
    with np.errstate(divide="ignore", invalid="ignore"):
        union = s["union"]
        iou = np.where(union > 0, s["intersection"] / np.maximum(union, 1), 1.0)

        area_sum = s["pred_area"] + s["target_area"]
        f1_score = np.where(area_sum > 0, 2.0 * s["intersection"] / np.maximum(area_sum, 1), 1.0)

        pb, tb = s["pred_boundary"], s["target_boundary"]
        precision = np.where(pb > 0, s["pred_boundary_matched"] / np.maximum(pb, 1), 0.0)
        recall = np.where(tb > 0, s["target_boundary_matched"] / np.maximum(tb, 1), 0.0)
        pr_sum = precision + recall
        boundary = np.where(pr_sum > 0, 2.0 * precision * recall / np.where(pr_sum > 0, pr_sum, 1.0), 0.0)
        both_empty = (pb == 0) & (tb == 0)
        boundary = np.where(both_empty, 1.0, boundary)
    return {"iou": iou, "f1": f1_score, "boundary_f1": boundary}


def mask_iou(pred, target) -> torch.Tensor:
    """IoU per instance of binary masks ``(..., H, W)`` -> ``(...)`` float32 on CPU (both empty -> 1)."""
    pred = _as_bool_mask(pred)
    target = _as_bool_mask(target)
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def f1(pred, target) -> torch.Tensor:
    """F1 (= Dice) per instance of binary masks ``(..., H, W)`` -> ``(...)`` float32 on CPU (both empty -> 1)."""
    stats = segmentation_statistics(pred, target, boundary_tolerance=0)
    shape = stats["intersection"].shape
    return torch.from_numpy(instance_metrics_from_statistics(stats)["f1"]).float().reshape(shape)


def boundary_f_score(pred, target, *, tolerance: int = 2) -> torch.Tensor:
    """Boundary F-score per instance of binary masks ``(..., H, W)`` -> ``(...)`` float32 (CPU)."""
    stats = segmentation_statistics(pred, target, boundary_tolerance=tolerance)
    shape = stats["intersection"].shape
    return torch.from_numpy(instance_metrics_from_statistics(stats)["boundary_f1"]).float().reshape(shape)


def aggregate_segmentation_metrics(
    statistics: Mapping[str, object],
    *,
    category_ids=None,
    id2label: Optional[Mapping[int, str]] = None,
) -> Dict[str, object]:
    """Dataset-level metrics from per-instance counts concatenated over the whole evaluation set.

    Args:
        statistics: the counts of :func:`segmentation_statistics`, each a 1-D array/tensor/list of
            length N (one entry per instance).
        category_ids: optional length-N category ids (negative ids are ignored for the per-category
            breakdown but still count in the instance averages).
        id2label: optional mapping used to name the keys of ``per_category_iou``.

    Returns:
        ``mean_iou`` (instance-averaged IoU), ``per_category_iou`` (dict category -> mean IoU of its
        instances; keyed by label when ``id2label`` is given, else by integer id),
        ``mean_category_iou`` (mean of the per-category values), ``f1``, ``boundary_f1`` (instance
        averages) and ``num_instances``.
    """
    per_instance = instance_metrics_from_statistics(statistics)
    iou = per_instance["iou"].reshape(-1)
    n = int(iou.shape[0])

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if x.size else float("nan")

    per_category: Dict[object, float] = {}
    if category_ids is not None:
        cats = _to_numpy(category_ids).reshape(-1).astype(np.int64)
        if cats.shape[0] != n:
            raise ValueError(f"got {cats.shape[0]} category ids for {n} instances")
        for cat in sorted(int(c) for c in np.unique(cats) if c >= 0):
            key = id2label.get(cat, cat) if id2label is not None else cat
            per_category[key] = float(iou[cats == cat].mean())
    return {
        "mean_iou": mean(iou),
        "per_category_iou": per_category,
        "mean_category_iou": float(np.mean(list(per_category.values()))) if per_category else float("nan"),
        "f1": mean(per_instance["f1"].reshape(-1)),
        "boundary_f1": mean(per_instance["boundary_f1"].reshape(-1)),
        "num_instances": n,
    }


def select_by_predicted_iou(*, pred_masks: torch.Tensor, iou_scores: torch.Tensor, return_index: bool = False):
    """Pick, per query, the candidate mask with the highest predicted IoU (the one selection rule).

    Training metrics, evaluation, the predictor and the TensorBoard overlays all choose with this.

    Args:
        pred_masks: ``(..., M, H, W)`` mask logits, e.g. ``(B, Q, M, H, W)`` from the model.
        iou_scores: ``(..., M)`` predicted IoU.
        return_index: also return the chosen candidate's index and predicted IoU.

    Returns:
        ``(..., H, W)`` logits of the chosen candidate; with ``return_index``, the tuple
        ``(logits, index (...) int64, score (...))``.
    """
    if pred_masks.shape[:-2] != iou_scores.shape:
        raise ValueError(f"pred_masks {tuple(pred_masks.shape)} and iou_scores {tuple(iou_scores.shape)} do not match")
    best = iou_scores.argmax(dim=-1)  # (...)
    index = best[..., None, None, None].expand(*best.shape, 1, *pred_masks.shape[-2:])
    chosen = pred_masks.gather(-3, index).squeeze(-3)
    if not return_index:
        return chosen
    return chosen, best, iou_scores.gather(-1, best[..., None]).squeeze(-1)


@torch.no_grad()
def batch_segmentation_statistics(
    *,
    pred_masks: torch.Tensor,
    labels: torch.Tensor,
    query_mask: Optional[torch.Tensor] = None,
    iou_scores: Optional[torch.Tensor] = None,
    category_ids: Optional[torch.Tensor] = None,
    boundary_tolerance: int = 2,
) -> Dict[str, torch.Tensor]:
    """Counts for the real queries of a model batch (what an evaluation loop accumulates).

    Args:
        pred_masks: ``(B, Q, M, H, W)`` logits (the candidate with the highest ``iou_scores`` is
            used; ``iou_scores`` may be omitted when M == 1) or ``(B, Q, H, W)`` logits.
        labels: ``(B, Q, H, W)`` reference masks in {0, 1}.
        query_mask: ``(B, Q)`` bool, False for padded queries (dropped). None keeps all.
        iou_scores: ``(B, Q, M)`` predicted IoU.
        category_ids: ``(B, Q)`` category ids, returned for the kept queries as ``category_id``.
        boundary_tolerance: see :func:`segmentation_statistics`.

    Returns:
        The counts of :func:`segmentation_statistics` for the N kept queries, each of shape (N,),
        plus ``category_id`` (N,) (-1 when ``category_ids`` is None).
    """
    if pred_masks.ndim == 5:
        if iou_scores is None:
            if pred_masks.shape[2] != 1:
                raise ValueError("iou_scores are needed to choose among several candidate masks")
            pred_masks = pred_masks[:, :, 0]
        else:
            pred_masks = select_by_predicted_iou(pred_masks=pred_masks, iou_scores=iou_scores)
    if pred_masks.shape != labels.shape:
        raise ValueError(f"mask logits {tuple(pred_masks.shape)} and labels {tuple(labels.shape)} differ in shape")
    if query_mask is None:
        query_mask = torch.ones(labels.shape[:2], dtype=torch.bool, device=labels.device)
    keep = query_mask.bool()
    stats = segmentation_statistics(binarize(pred_masks[keep]), labels[keep], boundary_tolerance=boundary_tolerance)
    if category_ids is None:
        stats["category_id"] = torch.full((int(keep.sum()),), -1, dtype=torch.int64, device=labels.device)
    else:
        stats["category_id"] = category_ids[keep].to(torch.int64)
    return stats
