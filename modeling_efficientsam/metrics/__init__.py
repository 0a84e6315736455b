"""Segmentation metrics: a plain-function API (:mod:`.functional`) and an ``evaluate`` module wrapping it."""

from pathlib import Path

from .functional import (
    STATISTIC_NAMES,
    aggregate_segmentation_metrics,
    batch_segmentation_statistics,
    binarize,
    boundary_f_score,
    f1,
    instance_metrics_from_statistics,
    mask_boundary,
    mask_iou,
    segmentation_statistics,
    select_by_predicted_iou,
)

#: Local path of the ``evaluate`` module file.
SEGMENTATION_METRIC_PATH = str(Path(__file__).resolve().with_name("efficientsam_segmentation.py"))


def load_segmentation_metric(**kwargs):
    """Load the ``efficientsam_segmentation`` metric from this package with ``evaluate.load``.

    The path is a local file, so nothing is fetched from the Hub (works with ``HF_HUB_OFFLINE=1`` and
    ``HF_EVALUATE_OFFLINE=1``). Keyword arguments go to ``evaluate.load`` (e.g. ``num_process``,
    ``process_id``, ``experiment_id``, ``keep_in_memory``, ``cache_dir``).
    """
    import evaluate  # imported here: importing evaluate (and datasets) is slow

    return evaluate.load(SEGMENTATION_METRIC_PATH, **kwargs)


__all__ = [
    "SEGMENTATION_METRIC_PATH",
    "STATISTIC_NAMES",
    "aggregate_segmentation_metrics",
    "batch_segmentation_statistics",
    "binarize",
    "boundary_f_score",
    "f1",
    "instance_metrics_from_statistics",
    "load_segmentation_metric",
    "mask_boundary",
    "mask_iou",
    "segmentation_statistics",
    "select_by_predicted_iou",
]
