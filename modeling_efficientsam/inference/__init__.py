"""Inference tools: a predictor for box / point prompts, batch prediction and evaluation command lines,
and ONNX export.

* :class:`EfficientSamPredictor` (``predictor.py``): ``set_image`` + ``predict``, or
  ``predict(image, boxes)`` in one call, and ``predict_batch`` for many images; its prompt checks are
  in ``prompt_checks.py`` and its result, :class:`EfficientSamPrediction`, in ``results.py``.
* ``python -m modeling_efficientsam.inference.predict_cli`` (``efficientsam-predict``): COCO
  segmentation results (and overlays) for the boxes of a COCO annotations or detections file.
* ``python -m modeling_efficientsam.inference.evaluate_cli`` (``efficientsam-evaluate``): mIoU,
  per-category IoU, F1, boundary F and COCO mask AP with ground-truth boxes as prompts, for one or
  several models side by side.
* ``python -m modeling_efficientsam.inference.export_onnx`` (``efficientsam-export``): encoder and
  decoder ONNX graphs, checked against PyTorch with ONNX Runtime.
"""

from .predictor import EfficientSamPredictor
from .results import EfficientSamPrediction

__all__ = ["EfficientSamPrediction", "EfficientSamPredictor"]
